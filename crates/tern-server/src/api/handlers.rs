//! Thin handlers: HTTP in, one controller call, JSON out.

use std::convert::Infallible;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, OpenApi};

use super::{ApiDoc, ApiError, AppState, ErrorBody};
use crate::controller::{HostPage, MigrationCreated, MigrationRequest, MigrationView};
use crate::evacuation::{EvacuateRequest, EvacuateResponse, EvacuationView};
use crate::model::{
    EvacuationRecord, EvacuationState, Heartbeat, HostPatch, HostRecord, MigrationRecord, VmRecord,
};
use crate::operator::{BandwidthRequest, OperatorAction};

type ApiResult<T> = Result<Json<T>, ApiError>;

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {}", e.body_text())))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::invalid(format!("invalid query: {}", e.body_text())))
}

pub(super) async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
pub(super) async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.ctl.metrics.render(),
    )
}

/// An agent registers and reports its host and VMs.
#[utoipa::path(post, path = "/v1/agents/heartbeat", request_body = Heartbeat,
    responses((status = 200, body = HostRecord), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(super) async fn heartbeat(
    State(st): State<AppState>,
    who: tern_pki::Identity,
    hb: Result<Json<Heartbeat>, JsonRejection>,
) -> ApiResult<HostRecord> {
    let hb = body(hb)?;
    // A host certificate speaks only for its own host: a compromised agent must not be able
    // to report another host's guests away (token mode has no hosts: the lab token holder
    // stands for every agent).
    if who.kind == tern_pki::CertKind::Host && hb.host != who.name {
        return Err(ApiError {
            status: axum::http::StatusCode::FORBIDDEN,
            body: ErrorBody {
                error: format!(
                    "{who} may not send a heartbeat for host {:?}: a host certificate can only \
                     report for its own name ({:?})",
                    hb.host, who.name
                ),
                details: None,
            },
        });
    }
    Ok(Json(st.ctl.heartbeat(hb).await?))
}

/// `?limit=&after=` of `GET /v1/hosts`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct PageQuery {
    /// Hosts per page (1–1000, default 100).
    limit: Option<u32>,
    /// The `next_page` token of the previous page.
    after: Option<String>,
}

/// Hosts by name, a page at a time; unreachable hosts are listed as such.
#[utoipa::path(get, path = "/v1/hosts", params(PageQuery),
    responses((status = 200, body = HostPage), (status = 400, body = ErrorBody)))]
pub(super) async fn list_hosts(
    State(st): State<AppState>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<HostPage> {
    let q = query(q)?;
    Ok(Json(st.ctl.hosts_page(q.limit, q.after.as_deref()).await?))
}

/// One host.
#[utoipa::path(get, path = "/v1/hosts/{name}", params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = HostRecord), (status = 404, body = ErrorBody)))]
pub(super) async fn show_host(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<HostRecord> {
    Ok(Json(st.ctl.host(&name).await?))
}

/// Post-copy permit/deny, outbound/inbound concurrency, drain.
#[utoipa::path(patch, path = "/v1/hosts/{name}", params(("name" = String, Path, description = "host name")),
    request_body = HostPatch,
    responses((status = 200, body = HostRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn patch_host(
    State(st): State<AppState>,
    Path(name): Path<String>,
    p: Result<Json<HostPatch>, JsonRejection>,
) -> ApiResult<HostRecord> {
    Ok(Json(st.ctl.patch_host(&name, body(p)?).await?))
}

/// Plans (and unless `dry_run`, starts) emptying a host before a deadline.
#[utoipa::path(post, path = "/v1/hosts/{name}/evacuate", params(("name" = String, Path, description = "host name")),
    request_body = EvacuateRequest,
    responses((status = 200, body = EvacuateResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn evacuate(
    State(st): State<AppState>,
    Path(name): Path<String>,
    r: Result<Json<EvacuateRequest>, JsonRejection>,
) -> ApiResult<EvacuateResponse> {
    Ok(Json(st.ctl.evacuate(&name, body(r)?).await?))
}

/// `?host=` of `GET /v1/vms`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct VmQuery {
    /// Only the VMs of this host.
    host: Option<String>,
}

/// VMs as the agents report them.
#[utoipa::path(get, path = "/v1/vms", params(VmQuery),
    responses((status = 200, body = Vec<VmRecord>), (status = 404, body = ErrorBody)))]
pub(super) async fn list_vms(
    State(st): State<AppState>,
    q: Result<Query<VmQuery>, QueryRejection>,
) -> ApiResult<Vec<VmRecord>> {
    let q = query(q)?;
    Ok(Json(st.ctl.vms(q.host.as_deref()).await?))
}

/// Every migration, newest first.
#[utoipa::path(get, path = "/v1/migrations", responses((status = 200, body = Vec<MigrationRecord>)))]
pub(super) async fn list_migrations(State(st): State<AppState>) -> ApiResult<Vec<MigrationRecord>> {
    Ok(Json(st.ctl.migrations().await?))
}

/// Migrates a VM; without `to` the controller chooses and says why.
#[utoipa::path(post, path = "/v1/migrations", request_body = MigrationRequest,
    responses((status = 200, body = MigrationCreated), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn create_migration(
    State(st): State<AppState>,
    r: Result<Json<MigrationRequest>, JsonRejection>,
) -> ApiResult<MigrationCreated> {
    Ok(Json(st.ctl.create_migration(body(r)?).await?))
}

/// One migration with its events.
#[utoipa::path(get, path = "/v1/migrations/{id}", params(("id" = String, Path, description = "migration id")),
    responses((status = 200, body = MigrationView), (status = 404, body = ErrorBody)))]
pub(super) async fn show_migration(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<MigrationView> {
    Ok(Json(st.ctl.migration(&id).await?))
}

/// Aborts a migration: one not started yet ends `aborted`; a running one is aborted on its
/// source agent (refused after the switch to post-copy: it then finishes). A step of a
/// running evacuation is retried, as the evacuation must finish: pause or cancel it to stop.
#[utoipa::path(post, path = "/v1/migrations/{id}/abort", params(("id" = String, Path, description = "migration id")),
    responses((status = 200, body = MigrationView), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn abort_migration(
    State(st): State<AppState>,
    who: tern_pki::Identity,
    Path(id): Path<String>,
) -> ApiResult<MigrationView> {
    Ok(Json(st.ctl.abort_migration(&id, &who.name).await?))
}

/// Asks the source agent to finish a running migration now (post-copy where permitted, else
/// a short pause of the guest, as its policy decides).
#[utoipa::path(post, path = "/v1/migrations/{id}/force-complete", params(("id" = String, Path, description = "migration id")),
    responses((status = 200, body = MigrationView), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn force_complete_migration(
    State(st): State<AppState>,
    who: tern_pki::Identity,
    Path(id): Path<String>,
) -> ApiResult<MigrationView> {
    Ok(Json(
        st.ctl
            .operate(&id, &who.name, OperatorAction::ForceComplete)
            .await?,
    ))
}

/// Caps a running migration's bandwidth.
#[utoipa::path(post, path = "/v1/migrations/{id}/bandwidth", params(("id" = String, Path, description = "migration id")),
    request_body = BandwidthRequest,
    responses((status = 200, body = MigrationView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn bandwidth_migration(
    State(st): State<AppState>,
    who: tern_pki::Identity,
    Path(id): Path<String>,
    r: Result<Json<BandwidthRequest>, JsonRejection>,
) -> ApiResult<MigrationView> {
    let b = body(r)?;
    Ok(Json(
        st.ctl
            .operate(&id, &who.name, OperatorAction::Bandwidth(b.bytes_per_s))
            .await?,
    ))
}

/// Every evacuation, newest first.
#[utoipa::path(get, path = "/v1/evacuations", responses((status = 200, body = Vec<EvacuationRecord>)))]
pub(super) async fn list_evacuations(
    State(st): State<AppState>,
) -> ApiResult<Vec<EvacuationRecord>> {
    Ok(Json(st.ctl.evacuations().await?))
}

/// One evacuation with its migrations.
#[utoipa::path(get, path = "/v1/evacuations/{id}", params(("id" = String, Path, description = "evacuation id")),
    responses((status = 200, body = EvacuationView), (status = 404, body = ErrorBody)))]
pub(super) async fn show_evacuation(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<EvacuationView> {
    Ok(Json(st.ctl.evacuation(&id).await?))
}

/// No new migration starts; running ones go on.
#[utoipa::path(post, path = "/v1/evacuations/{id}/pause", params(("id" = String, Path, description = "evacuation id")),
    responses((status = 200, body = EvacuationView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn pause_evacuation(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<EvacuationView> {
    Ok(Json(
        st.ctl
            .steer_evacuation(&id, EvacuationState::Paused)
            .await?,
    ))
}

/// Continue a paused evacuation.
#[utoipa::path(post, path = "/v1/evacuations/{id}/resume", params(("id" = String, Path, description = "evacuation id")),
    responses((status = 200, body = EvacuationView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn resume_evacuation(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<EvacuationView> {
    Ok(Json(
        st.ctl
            .steer_evacuation(&id, EvacuationState::Running)
            .await?,
    ))
}

/// Stop: steps not started are aborted, running ones aborted where the agent still can.
#[utoipa::path(post, path = "/v1/evacuations/{id}/cancel", params(("id" = String, Path, description = "evacuation id")),
    responses((status = 200, body = EvacuationView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn cancel_evacuation(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<EvacuationView> {
    Ok(Json(
        st.ctl
            .steer_evacuation(&id, EvacuationState::Cancelled)
            .await?,
    ))
}

/// Every state change as server-sent events (`event:` host, migration or evacuation).
#[utoipa::path(get, path = "/v1/events",
    responses((status = 200, description = "text/event-stream of ControllerEvent JSON", body = crate::events::ControllerEvent)))]
pub(super) async fn events(
    State(st): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = st.ctl.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await {
            Ok(ev) => Event::default()
                .event(ev.kind)
                .json_data(&ev)
                .unwrap_or_else(|_| Event::default().event("error")),
            Err(RecvError::Lagged(n)) => Event::default()
                .event("lagged")
                .data(format!("{n} events dropped: re-read state with GET")),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(ev), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
