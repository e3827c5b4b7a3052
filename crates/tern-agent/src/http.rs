//! The agent's HTTP/JSON API (axum), described by the OpenAPI 3 document at `/openapi.json`.
//!
//! Every route is listed once in [`ROUTES`]; the OpenAPI document is generated from that
//! table and a test checks that the router answers every route of the table, so the two
//! cannot drift apart. Errors are JSON `{"error": "..."}` with a status derived from the
//! [`AgentError`] variant: 404 unknown thing, 409 conflicting state, 422 not enough memory,
//! 400 invalid request, 503 another agent unreachable, 500 QEMU or internal failures.

use std::future::Future;

use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tern_engine::{DestinationEndpoint, OperatorCommand};
use tern_qmp::{MigrationCapabilityStatus, MigrationParameters};

use crate::AgentError;
use crate::api::{
    BandwidthRequest, ErrorBody, Health, IncomingRequest, NoBody, OperatorReply,
    StartMigrationRequest,
};
use crate::daemon::Agent;

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Explanation.
    pub message: String,
}

/// The HTTP status an agent error maps to.
pub fn status_of(e: &AgentError) -> StatusCode {
    match e {
        AgentError::NotFound(_) => StatusCode::NOT_FOUND,
        AgentError::Conflict(_) => StatusCode::CONFLICT,
        AgentError::InsufficientMemory(_) => StatusCode::UNPROCESSABLE_ENTITY,
        AgentError::Invalid(_) | AgentError::Config(_) => StatusCode::BAD_REQUEST,
        AgentError::Qemu(tern_qemu::QemuError::InvalidSpec(_)) => StatusCode::BAD_REQUEST,
        AgentError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        AgentError::Qemu(_) | AgentError::Qmp(_) | AgentError::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        Self {
            status: status_of(&e),
            message: e.to_string(),
        }
    }
}

impl From<tern_engine::EngineError> for ApiError {
    fn from(e: tern_engine::EngineError) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The largest request body the agent reads (a VM spec is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A request body, or the JSON error saying what is wrong with it: 413 over
/// [`MAX_BODY_BYTES`], 415 without `Content-Type: application/json`, 400 for bad JSON, an
/// unknown field or an invalid value (serde names the field and the valid values).
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(|e| {
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => format!(
                "request body too large: at most {MAX_BODY_BYTES} bytes (1 MiB) are accepted"
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => format!(
                "invalid request body: {}: send JSON with `Content-Type: application/json`",
                e.body_text()
            ),
            _ => format!("invalid request body: {}", e.body_text()),
        };
        ApiError { status, message }
    })
}

/// The body of `/start` and `/recover`: `{}`. A `uri` is refused with why.
fn no_body(b: Result<Json<NoBody>, JsonRejection>) -> Result<(), ApiError> {
    body(b).map(|_| ()).map_err(|mut e| {
        if e.status == StatusCode::BAD_REQUEST {
            e.message.push_str(
                ": send {} — the destination agent listens on the URI it chose itself \
                 (tcp:<its migration_address>:<reserved port>); clients never supply one",
            );
        }
        e
    })
}

/// One route: method, path (axum syntax), summary, request and response schema names.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    /// HTTP method.
    pub method: &'static str,
    /// Path, with `{param}` placeholders.
    pub path: &'static str,
    /// What it does.
    pub summary: &'static str,
    /// Request body schema (component name), if any.
    pub request: Option<&'static str>,
    /// Success response schema (component name).
    pub response: &'static str,
}

const fn r(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    request: Option<&'static str>,
    response: &'static str,
) -> RouteDoc {
    RouteDoc {
        method,
        path,
        summary,
        request,
        response,
    }
}

/// Every route the agent serves.
pub const ROUTES: &[RouteDoc] = &[
    r(
        "get",
        "/healthz",
        "Liveness: host name and agent PID",
        None,
        "Health",
    ),
    r("get", "/openapi.json", "This document", None, "Object"),
    r(
        "get",
        "/v1/host",
        "Host facts: memory, QEMU version and migration capabilities, accelerator, limits",
        None,
        "HostFacts",
    ),
    r("get", "/v1/vms", "VMs of this host", None, "VmInfoList"),
    r(
        "post",
        "/v1/vms",
        "Boot a VM from a VmSpec",
        Some("VmSpec"),
        "VmInfo",
    ),
    r("get", "/v1/vms/{name}", "One VM", None, "VmInfo"),
    r(
        "delete",
        "/v1/vms/{name}",
        "Stop a VM (refused while it migrates)",
        None,
        "Object",
    ),
    r(
        "post",
        "/v1/incoming",
        "Destination side: start a paused QEMU waiting for a migration; returns the stream URI",
        Some("IncomingRequest"),
        "IncomingReply",
    ),
    r(
        "delete",
        "/v1/incoming/{vm}",
        "Destination side: remove an incoming QEMU (failed migration)",
        None,
        "Object",
    ),
    r(
        "get",
        "/v1/incoming/{vm}/facts",
        "Destination QEMU capabilities, commands and version",
        None,
        "Object",
    ),
    r(
        "post",
        "/v1/incoming/{vm}/capabilities",
        "migrate-set-capabilities on the destination",
        Some("CapabilityList"),
        "Object",
    ),
    r(
        "post",
        "/v1/incoming/{vm}/parameters",
        "migrate-set-parameters on the destination",
        Some("Object"),
        "Object",
    ),
    r(
        "post",
        "/v1/incoming/{vm}/start",
        "migrate-incoming with the given URI",
        Some("UriBody"),
        "Object",
    ),
    r(
        "get",
        "/v1/incoming/{vm}/status",
        "query-status of the destination QEMU",
        None,
        "Object",
    ),
    r(
        "get",
        "/v1/incoming/{vm}/migration",
        "query-migrate on the destination",
        None,
        "Object",
    ),
    r(
        "post",
        "/v1/incoming/{vm}/cont",
        "cont (resume) the destination guest",
        None,
        "Object",
    ),
    r(
        "post",
        "/v1/incoming/{vm}/recover",
        "migrate-recover (post-copy recovery) with a new URI",
        Some("UriBody"),
        "Object",
    ),
    r(
        "post",
        "/v1/incoming/{vm}/pause",
        "migrate-pause on the destination",
        None,
        "Object",
    ),
    r(
        "post",
        "/v1/incoming/{vm}/promote",
        "Make a completed incoming VM this host's running guest",
        None,
        "VmInfo",
    ),
    r(
        "get",
        "/v1/migrations",
        "Migrations this host ran as source, newest first",
        None,
        "MigrationList",
    ),
    r(
        "post",
        "/v1/migrations",
        "Start migrating a VM of this host",
        Some("StartMigrationRequest"),
        "MigrationRecord",
    ),
    r(
        "post",
        "/v1/migrations/plan",
        "The policy's plan and pre-flight estimate for a migration request (nothing is started)",
        Some("PlanRequest"),
        "MigrationPlan",
    ),
    r(
        "get",
        "/v1/migrations/{id}",
        "A migration with live progress and its events (after=N for later events only)",
        None,
        "MigrationView",
    ),
    r(
        "post",
        "/v1/migrations/{id}/force-complete",
        "Finish now: post-copy if permitted, else pause the guest until the copy finishes",
        None,
        "OperatorReply",
    ),
    r(
        "post",
        "/v1/migrations/{id}/abort",
        "Cancel (refused once post-copy started)",
        None,
        "OperatorReply",
    ),
    r(
        "post",
        "/v1/migrations/{id}/bandwidth",
        "Change the bandwidth cap mid-flight",
        Some("BandwidthRequest"),
        "OperatorReply",
    ),
];

fn obj(props: &[(&str, Value)], required: &[&str]) -> Value {
    let mut p = serde_json::Map::new();
    for (k, v) in props {
        p.insert((*k).to_string(), v.clone());
    }
    json!({"type": "object", "properties": p, "required": required})
}

fn s() -> Value {
    json!({"type": "string"})
}
fn i() -> Value {
    json!({"type": "integer", "minimum": 0})
}
fn b() -> Value {
    json!({"type": "boolean"})
}
fn rf(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn schemas() -> Value {
    let states = json!({"type": "string", "enum": ["pending", "preparing", "precopy", "guest-paused",
        "postcopy", "postcopy-paused", "recovering", "completed", "aborted", "failed", "lost"]});
    json!({
        "Object": {"type": "object"},
        "Error": obj(&[("error", s())], &["error"]),
        "Health": obj(&[("host", s()), ("pid", i())], &["host", "pid"]),
        "HostMigrationConfig": obj(&[("permit_post_copy", b()), ("max_outbound", i()), ("max_inbound", i()),
            ("bandwidth_mib_per_s", i()), ("port_min", i()), ("port_max", i())], &[]),
        "HostFacts": obj(&[("host", s()), ("migration_address", s()), ("netns", s()), ("memory_mib", i()),
            ("committed_memory_mib", i()), ("free_memory_mib", i()), ("machine_available_mib", i()),
            ("qemu_version", s()), ("qemu_path", s()),
            ("migration_capabilities", json!({"type": "array", "items": s()})),
            ("accelerator", s()), ("kvm_device", b()), ("migration", rf("HostMigrationConfig")),
            ("outbound_migrations", i()), ("inbound_migrations", i())],
            &["host", "memory_mib", "free_memory_mib", "qemu_version", "migration"]),
        "VmSpec": obj(&[("name", s()), ("memory_mib", i()), ("vcpus", i()), ("kernel", s()), ("initrd", s()),
            ("cmdline", s()), ("accelerator", json!({"type": "string", "enum": ["kvm", "tcg"]})),
            ("migration", obj(&[("post_copy", json!({"type": "string", "enum": ["allowed", "forbidden"]})),
                ("max_downtime_ms", i()), ("sla_class", s())], &[]))],
            &["name", "memory_mib", "vcpus", "kernel", "initrd", "cmdline", "accelerator"]),
        "VmInfo": obj(&[("spec", rf("VmSpec")), ("role", json!({"type": "string", "enum": ["running", "incoming"]})),
            ("pid", i()), ("run_state", s()), ("serial_log", s())], &["spec", "role", "pid", "run_state"]),
        "VmInfoList": {"type": "array", "items": rf("VmInfo")},
        "IncomingRequest": obj(&[("spec", rf("VmSpec")), ("migration_id", s())], &["spec"]),
        "IncomingReply": obj(&[("uri", s()), ("port", i())], &["uri", "port"]),
        "UriBody": obj(&[("uri", s())], &["uri"]),
        "CapabilityList": {"type": "array", "items": obj(&[("capability", s()), ("state", b())], &["capability", "state"])},
        "StartMigrationRequest": obj(&[("vm", s()), ("to_host", s()), ("to_agent_url", s()),
            ("context", json!({"type": "string", "enum": ["evacuate", "maintenance", "balance", "manual"]})),
            ("policy", s()), ("deadline_s", i()), ("link_bytes_per_s", i())], &["vm", "to_host"]),
        "PlanRequest": {"allOf": [rf("StartMigrationRequest"), obj(&[("probe_s", i())], &[])]},
        "MigrationPlan": obj(&[("policy", s()), ("input", json!({"type": "object"})),
            ("capabilities", json!({"type": "object"})), ("parameters", json!({"type": "object"})),
            ("post_copy", obj(&[("allowed", b()), ("reason", s())], &["allowed", "reason"])),
            ("postcopy_recovery", b()), ("deadline_ms", i()),
            ("estimate", obj(&[("link_bytes_per_s", i()), ("dirty_bytes_per_s", i()), ("first_pass_ms", i()),
                ("converges", b()), ("precopy_total_ms", i()), ("postcopy_total_ms", i()), ("bytes", i())], &["converges"])),
            ("reasons", json!({"type": "array", "items": s()}))], &["policy", "post_copy", "estimate", "reasons"]),
        "MigrationState": states,
        "MigrationRecord": obj(&[("id", s()), ("vm", s()), ("source", s()), ("destination", s()),
            ("destination_url", s()), ("context", s()), ("policy", s()), ("state", rf("MigrationState")),
            ("created_ms", i()), ("updated_ms", i()), ("finished_ms", i()), ("error", s()),
            ("report", json!({"type": "object", "nullable": true})), ("link_bytes_per_s", i())],
            &["id", "vm", "source", "destination", "state", "created_ms"]),
        "MigrationList": {"type": "array", "items": rf("MigrationRecord")},
        "MigrationProgress": obj(&[("state", rf("MigrationState")), ("qemu_status", s()), ("elapsed_ms", i()),
            ("transferred_bytes", i()), ("remaining_bytes", i()), ("total_bytes", i()),
            ("dirty_bytes_per_s", i()), ("throughput_bytes_per_s", i()), ("pass", i()), ("eta_ms", i())], &[]),
        "MigrationEvent": obj(&[("seq", i()), ("wall_ms", i()), ("at_ms", i()),
            ("event", json!({"type": "string", "enum": ["state", "decision", "pass", "operator", "note"]}))],
            &["seq", "wall_ms", "at_ms", "event"]),
        "MigrationView": {"allOf": [rf("MigrationRecord"), obj(&[
            ("progress", rf("MigrationProgress")),
            ("events", json!({"type": "array", "items": rf("MigrationEvent")}))], &["events"])]},
        "BandwidthRequest": obj(&[("bytes_per_s", i())], &["bytes_per_s"]),
        "OperatorReply": obj(&[("command", obj(&[("command", s())], &["command"])), ("result", s())], &["command", "result"]),
    })
}

/// The OpenAPI 3 document describing [`ROUTES`].
pub fn openapi() -> Value {
    let mut paths = serde_json::Map::new();
    for rt in ROUTES {
        let entry = paths
            .entry(rt.path.to_string())
            .or_insert_with(|| json!({}));
        let params: Vec<Value> = rt
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .chain(
                (rt.path == "/v1/migrations/{id}" && rt.method == "get").then(|| {
                    json!({"name": "after", "in": "query", "required": false,
                        "description": "only events with a larger seq", "schema": {"type": "integer"}})
                }),
            )
            .collect();
        let err = json!({"description": "error", "content": {"application/json": {"schema": rf("Error")}}});
        let mut op = json!({
            "summary": rt.summary,
            "operationId": format!("{}_{}", rt.method, rt.path.trim_matches('/').replace(['/', '{', '}', '.', '-'], "_")),
            "parameters": params,
            "responses": {
                "200": {"description": "success", "content": {"application/json": {"schema": rf(rt.response)}}},
                "400": err.clone(), "404": err.clone(), "409": err.clone(), "422": err.clone(),
                "500": err.clone(), "503": err,
            },
        });
        if let Some(req) = rt.request {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": rf(req)}}});
        }
        entry[rt.method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "tern agent API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Per-host agent of tern: VMs, incoming migrations, and migrations run by the source agent.",
        },
        "paths": paths,
        "components": {"schemas": schemas()},
    })
}

/// The agent's router.
pub fn router(agent: Agent) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        .route("/v1/host", get(host_facts))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(show_vm).delete(stop_vm))
        .route("/v1/incoming", post(prepare_incoming))
        .route("/v1/incoming/{vm}", axum::routing::delete(delete_incoming))
        .route("/v1/incoming/{vm}/facts", get(in_facts))
        .route("/v1/incoming/{vm}/capabilities", post(in_caps))
        .route("/v1/incoming/{vm}/parameters", post(in_params))
        .route("/v1/incoming/{vm}/start", post(in_start))
        .route("/v1/incoming/{vm}/status", get(in_status))
        .route("/v1/incoming/{vm}/migration", get(in_migration))
        .route("/v1/incoming/{vm}/cont", post(in_cont))
        .route("/v1/incoming/{vm}/recover", post(in_recover))
        .route("/v1/incoming/{vm}/pause", post(in_pause))
        .route("/v1/incoming/{vm}/promote", post(in_promote))
        .route("/v1/migrations", get(list_migrations).post(start_migration))
        .route("/v1/migrations/plan", post(plan_migration))
        .route("/v1/migrations/{id}", get(show_migration))
        .route("/v1/migrations/{id}/force-complete", post(force_complete))
        .route("/v1/migrations/{id}/abort", post(abort))
        .route("/v1/migrations/{id}/bandwidth", post(bandwidth))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(agent)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route {method} {uri}: the API is described at /openapi.json"),
    }
}

/// The methods the API serves on `path` (`/v1/vms/web` matches `/v1/vms/{name}`).
pub fn allowed_methods(path: &str) -> Vec<String> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut methods: Vec<String> = ROUTES
        .iter()
        .filter(|r| {
            let pat: Vec<&str> = r.path.split('/').collect();
            pat.len() == segs.len()
                && pat
                    .iter()
                    .zip(&segs)
                    .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
        })
        .map(|r| r.method.to_uppercase())
        .collect();
    methods.sort();
    methods.dedup();
    methods
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    let allowed = allowed_methods(uri.path()).join(", ");
    let mut resp = ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!(
            "method {method} is not allowed on {}: use {allowed} (see /openapi.json)",
            uri.path()
        ),
    }
    .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&allowed) {
        resp.headers_mut().insert(axum::http::header::ALLOW, v);
    }
    resp
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    agent: Agent,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(agent))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn health(State(a): State<Agent>) -> Json<Health> {
    Json(Health {
        host: a.config().host.clone(),
        pid: std::process::id(),
    })
}

async fn host_facts(State(a): State<Agent>) -> Json<crate::api::HostFacts> {
    Json(a.facts().await)
}

async fn list_vms(State(a): State<Agent>) -> Json<Vec<crate::VmInfo>> {
    Json(a.host().list().await)
}

async fn create_vm(
    State(a): State<Agent>,
    spec: Result<Json<tern_qemu::VmSpec>, JsonRejection>,
) -> ApiResult<crate::VmInfo> {
    Ok(Json(a.create_vm(body(spec)?).await?))
}

async fn show_vm(State(a): State<Agent>, Path(name): Path<String>) -> ApiResult<crate::VmInfo> {
    Ok(Json(a.host().show(&name).await?))
}

async fn stop_vm(State(a): State<Agent>, Path(name): Path<String>) -> ApiResult<Value> {
    a.stop_vm(&name).await?;
    Ok(Json(json!({"stopped": name})))
}

async fn prepare_incoming(
    State(a): State<Agent>,
    req: Result<Json<IncomingRequest>, JsonRejection>,
) -> ApiResult<crate::api::IncomingReply> {
    Ok(Json(a.prepare_incoming(body(req)?).await?))
}

async fn delete_incoming(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    a.delete_incoming(&vm).await?;
    Ok(Json(json!({"deleted": vm})))
}

async fn in_facts(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    let f = DestinationEndpoint::facts(&a.incoming_qmp(&vm)?).await?;
    Ok(Json(serde_json::to_value(f).unwrap_or(Value::Null)))
}

async fn in_caps(
    State(a): State<Agent>,
    Path(vm): Path<String>,
    caps: Result<Json<Vec<MigrationCapabilityStatus>>, JsonRejection>,
) -> ApiResult<Value> {
    let caps = body(caps)?;
    a.incoming_qmp(&vm)?
        .migrate_set_capabilities(&caps)
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({})))
}

async fn in_params(
    State(a): State<Agent>,
    Path(vm): Path<String>,
    p: Result<Json<MigrationParameters>, JsonRejection>,
) -> ApiResult<Value> {
    let p = body(p)?;
    check_parameters(&p)?;
    a.incoming_qmp(&vm)?
        .migrate_set_parameters(&p)
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({})))
}

async fn in_start(
    State(a): State<Agent>,
    Path(vm): Path<String>,
    b: Result<Json<NoBody>, JsonRejection>,
) -> ApiResult<Value> {
    no_body(b)?;
    let uri = a.incoming_uri(&vm)?;
    a.incoming_qmp(&vm)?
        .migrate_incoming(&uri)
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({"uri": uri})))
}

/// Parameters a client may set on the destination: no TLS object names (the agent sets those
/// from its own configuration) and a bandwidth within the API's bounds.
fn check_parameters(p: &MigrationParameters) -> Result<(), AgentError> {
    for (name, v) in [
        ("tls-creds", &p.tls_creds),
        ("tls-hostname", &p.tls_hostname),
        ("tls-authz", &p.tls_authz),
    ] {
        if let Some(v) = v {
            return Err(AgentError::Invalid(format!(
                "parameter {name} = {v:?} is refused: TLS settings come from the destination \
                 agent's configuration, not from a client"
            )));
        }
    }
    if let Some(b) = p.max_bandwidth {
        crate::bounds::check_bandwidth("max-bandwidth", b)?;
    }
    Ok(())
}

async fn in_status(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    let s = a
        .incoming_qmp(&vm)?
        .query_status()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(serde_json::to_value(s).unwrap_or(Value::Null)))
}

async fn in_migration(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    let s = a
        .incoming_qmp(&vm)?
        .query_migrate()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(serde_json::to_value(s).unwrap_or(Value::Null)))
}

async fn in_cont(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    a.incoming_qmp(&vm)?
        .cont()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({})))
}

async fn in_recover(
    State(a): State<Agent>,
    Path(vm): Path<String>,
    b: Result<Json<NoBody>, JsonRejection>,
) -> ApiResult<Value> {
    no_body(b)?;
    let uri = a.incoming_uri(&vm)?;
    a.incoming_qmp(&vm)?
        .migrate_recover(&uri)
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({"uri": uri})))
}

async fn in_pause(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    a.incoming_qmp(&vm)?
        .migrate_pause()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({})))
}

async fn in_promote(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<crate::VmInfo> {
    Ok(Json(a.promote_incoming(&vm).await?))
}

async fn list_migrations(State(a): State<Agent>) -> ApiResult<Vec<crate::store::MigrationRecord>> {
    Ok(Json(a.migrations().await?))
}

async fn start_migration(
    State(a): State<Agent>,
    req: Result<Json<StartMigrationRequest>, JsonRejection>,
) -> ApiResult<crate::store::MigrationRecord> {
    Ok(Json(a.start_migration(body(req)?).await?))
}

async fn plan_migration(
    State(a): State<Agent>,
    req: Result<Json<crate::api::PlanRequest>, JsonRejection>,
) -> ApiResult<tern_policy::MigrationPlan> {
    let (req, probe_s) = body(req)?.split();
    Ok(Json(a.plan_migration(req, probe_s).await?))
}

#[derive(Debug, Deserialize)]
struct AfterQuery {
    #[serde(default)]
    after: u64,
}

async fn show_migration(
    State(a): State<Agent>,
    Path(id): Path<String>,
    Query(q): Query<AfterQuery>,
) -> ApiResult<crate::api::MigrationView> {
    Ok(Json(a.migration(&id, q.after).await?))
}

async fn operator(a: &Agent, id: &str, command: OperatorCommand) -> ApiResult<OperatorReply> {
    let result = a.operator(id, command).await?;
    Ok(Json(OperatorReply { command, result }))
}

async fn force_complete(
    State(a): State<Agent>,
    Path(id): Path<String>,
) -> ApiResult<OperatorReply> {
    operator(&a, &id, OperatorCommand::ForceComplete).await
}

async fn abort(State(a): State<Agent>, Path(id): Path<String>) -> ApiResult<OperatorReply> {
    operator(&a, &id, OperatorCommand::Abort).await
}

async fn bandwidth(
    State(a): State<Agent>,
    Path(id): Path<String>,
    req: Result<Json<BandwidthRequest>, JsonRejection>,
) -> ApiResult<OperatorReply> {
    let req = body(req)?;
    crate::bounds::check_bandwidth("bandwidth", req.bytes_per_s)?;
    operator(
        &a,
        &id,
        OperatorCommand::SetBandwidth {
            bytes_per_s: req.bytes_per_s,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use crate::daemon::AgentOptions;

    #[test]
    fn errors_map_to_statuses() {
        let cases = [
            (AgentError::NotFound("x".into()), 404),
            (AgentError::Conflict("x".into()), 409),
            (AgentError::InsufficientMemory("x".into()), 422),
            (AgentError::Invalid("x".into()), 400),
            (AgentError::Config("x".into()), 400),
            (
                AgentError::Qemu(tern_qemu::QemuError::InvalidSpec("x".into())),
                400,
            ),
            (AgentError::Unavailable("x".into()), 503),
            (AgentError::Internal("x".into()), 500),
        ];
        for (e, code) in cases {
            assert_eq!(status_of(&e).as_u16(), code, "{e:?}");
            let api: ApiError = e.into();
            assert_eq!(api.status.as_u16(), code);
        }
    }

    #[test]
    fn openapi_documents_every_route_once() {
        let doc = openapi();
        assert_eq!(doc["openapi"], "3.0.3");
        let paths = doc["paths"].as_object().unwrap();
        let mut n = 0;
        for (path, ops) in paths {
            for (method, op) in ops.as_object().unwrap() {
                n += 1;
                assert!(
                    ROUTES.iter().any(|r| r.path == path && r.method == method),
                    "{method} {path}"
                );
                // Every schema reference resolves.
                let text = op.to_string();
                for part in text.split("#/components/schemas/").skip(1) {
                    let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
                    assert!(doc["components"]["schemas"].get(&name).is_some(), "{name}");
                }
            }
        }
        assert_eq!(n, ROUTES.len(), "duplicate routes in ROUTES");
    }

    /// The reverse of the test above: every `.route(...)` registered in [`router`] (read from
    /// this file's source) is in [`ROUTES`], with the same methods.
    #[test]
    fn every_registered_route_is_documented() {
        let src = include_str!("http.rs");
        let start = src.find("pub fn router(").unwrap();
        let end = src.find("async fn no_route").unwrap();
        let mut registered = Vec::new();
        for call in src[start..end].split(".route(").skip(1) {
            let path = call.split('"').nth(1).unwrap().to_string();
            // The method chain of this call ends where the next builder call starts.
            let chain = call.split("\n        .").next().unwrap_or_default();
            for m in ["get", "post", "delete"] {
                if chain.contains(&format!("{m}(")) {
                    registered.push((m.to_string(), path.clone()));
                }
            }
        }
        for (m, p) in &registered {
            assert!(
                ROUTES.iter().any(|r| r.method == m && r.path == p),
                "{m} {p} is served but not in ROUTES/openapi.json"
            );
        }
        for r in ROUTES {
            assert!(
                registered.iter().any(|(m, p)| m == r.method && p == r.path),
                "{} {} documented but not registered (found {registered:?})",
                r.method,
                r.path
            );
        }
    }

    /// Starts an agent with no VMs on a free port; every route of the table must reach a
    /// handler (not the fallback), and bad input must come back as JSON errors.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn router_serves_every_documented_route_with_json_errors() {
        if let Err(e) = tern_qemu::QemuBinary::locate() {
            panic!("this test needs QEMU (an agent refuses to start without it): {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = AgentConfig::from_toml(
            &format!(
                "host = \"t1\"\nlisten = \"127.0.0.1:0\"\nmigration_address = \"127.0.0.1\"\n\
                 memory_mib = 512\nruntime_dir = \"{}\"\n",
                dir.path().display()
            ),
            "test",
        )
        .unwrap();
        let agent = Agent::start(cfg, AgentOptions::default()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(agent, listener, async {
            let _ = stop_rx.await;
        }));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        for rt in ROUTES {
            let path = rt
                .path
                .replace("{name}", "nope")
                .replace("{vm}", "nope")
                .replace("{id}", "nope");
            let req = match rt.method {
                "get" => http.get(format!("{url}{path}")),
                "post" => http.post(format!("{url}{path}")).json(&json!({})),
                "delete" => http.delete(format!("{url}{path}")),
                m => panic!("method {m}"),
            };
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            assert!(
                !text.contains("no route"),
                "{} {}: {text}",
                rt.method,
                rt.path
            );
            if status >= 400 {
                let e: ErrorBody = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{} {} non-JSON error: {text}", rt.method, rt.path));
                assert!(!e.error.is_empty());
            }
        }
        // Specific mappings.
        let c = crate::remote::AgentClient::new(&url);
        let e = c.show_vm("ghost").await.unwrap_err();
        assert_eq!(e.status(), Some(404));
        assert!(e.to_string().contains("\"ghost\""), "{e}");
        let resp = http
            .post(format!("{url}/v1/migrations"))
            .json(&json!({"vm": "ghost", "to_host": "t2", "policy": "no-such-policy"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let e = resp.text().await.unwrap();
        assert!(
            e.contains("no-such-policy") && e.contains("nova-2016"),
            "{e}"
        );
        let e = c
            .start_migration(&StartMigrationRequest {
                vm: "ghost".into(),
                to_host: "t2".into(),
                context: tern_policy::MigrationContext::Manual,
                policy: tern_policy::PolicyName::Tern,
                deadline_s: None,
                link_bytes_per_s: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        assert!(e.to_string().contains("\"t2\""), "{e}");
        let e = c
            .operator("ghost", OperatorCommand::Abort)
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(404));
        let resp = http
            .post(format!("{url}/v1/vms"))
            .body("{not json")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let resp = http.get(format!("{url}/v2/nothing")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 404);
        assert!(resp.text().await.unwrap().contains("no route"));
        let doc = c.openapi().await.unwrap();
        assert!(doc["paths"]["/v1/migrations/{id}/abort"]["post"].is_object());
        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }
}
