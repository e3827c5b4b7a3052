//! The handlers of the agent's API, each described once by its `#[utoipa::path]`: the
//! router registers them from those descriptions and `/openapi.json` is generated from them.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use tern_engine::{DestinationEndpoint, OperatorCommand};
use tern_qmp::{MigrationCapabilityStatus, MigrationParameters};

use super::{ApiError, ApiErrors, ApiResult, body, no_body};
use crate::AgentError;
use crate::api::{
    BandwidthRequest, Health, IncomingRequest, NoBody, OperatorReply, StartMigrationRequest,
};
use crate::daemon::Agent;

#[utoipa::path(get, path = "/healthz", summary = "Liveness: host name and agent PID",
    responses((status = 200, description = "success", body = Health), ApiErrors))]
pub(super) async fn health(State(a): State<Agent>) -> Json<Health> {
    Json(Health {
        host: a.config().host.clone(),
        pid: std::process::id(),
    })
}

#[utoipa::path(get, path = "/v1/host", summary = "Host facts: memory, QEMU version and migration capabilities, accelerator, limits",
    responses((status = 200, description = "success", body = crate::api::HostFacts), ApiErrors))]
pub(super) async fn host_facts(State(a): State<Agent>) -> Json<crate::api::HostFacts> {
    Json(a.facts().await)
}

#[utoipa::path(get, path = "/v1/vms", summary = "VMs of this host",
    responses((status = 200, description = "success", body = Vec<crate::VmInfo>), ApiErrors))]
pub(super) async fn list_vms(State(a): State<Agent>) -> Json<Vec<crate::VmInfo>> {
    Json(a.host().list().await)
}

#[utoipa::path(post, path = "/v1/vms", summary = "Boot a VM from a VmSpec (kernel and initrd inside the host's image directories, known SLA class)",
    request_body = tern_qemu::VmSpec,
    responses((status = 200, description = "success", body = crate::VmInfo), ApiErrors))]
pub(super) async fn create_vm(
    State(a): State<Agent>,
    spec: Result<Json<tern_qemu::VmSpec>, JsonRejection>,
) -> ApiResult<crate::VmInfo> {
    Ok(Json(a.create_vm(body(spec)?).await?))
}

#[utoipa::path(get, path = "/v1/vms/{name}", summary = "One VM",
    params(("name" = String, Path, description = "the VM")),
    responses((status = 200, description = "success", body = crate::VmInfo), ApiErrors))]
pub(super) async fn show_vm(
    State(a): State<Agent>,
    Path(name): Path<String>,
) -> ApiResult<crate::VmInfo> {
    Ok(Json(a.host().show(&name).await?))
}

#[utoipa::path(delete, path = "/v1/vms/{name}", summary = "Stop a VM (refused while it migrates)",
    params(("name" = String, Path, description = "the VM")),
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn stop_vm(State(a): State<Agent>, Path(name): Path<String>) -> ApiResult<Value> {
    a.stop_vm(&name).await?;
    Ok(Json(json!({"stopped": name})))
}

#[utoipa::path(post, path = "/v1/incoming", summary = "Destination side: start a paused QEMU waiting for a migration; returns the stream URI the destination chose",
    request_body = IncomingRequest,
    responses((status = 200, description = "success", body = crate::api::IncomingReply), ApiErrors))]
pub(super) async fn prepare_incoming(
    State(a): State<Agent>,
    axum::Extension(caller): axum::Extension<tern_pki::Identity>,
    req: Result<Json<IncomingRequest>, JsonRejection>,
) -> ApiResult<crate::api::IncomingReply> {
    // The source host is the one whose certificate made this call, never a name in the body:
    // the destination QEMU's tls-authz accepts a stream only from it.
    let source_host = (caller.kind == tern_pki::CertKind::Host).then_some(caller.name.as_str());
    Ok(Json(a.prepare_incoming(body(req)?, source_host).await?))
}

#[utoipa::path(delete, path = "/v1/incoming/{vm}", summary = "Destination side: remove an incoming QEMU (failed migration); refused for a VM that runs here",
    params(("vm" = String, Path, description = "the incoming VM")),
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn delete_incoming(
    State(a): State<Agent>,
    Path(vm): Path<String>,
) -> ApiResult<Value> {
    a.delete_incoming(&vm).await?;
    Ok(Json(json!({"deleted": vm})))
}

#[utoipa::path(get, path = "/v1/incoming/{vm}/facts", summary = "Destination QEMU capabilities, commands and version",
    params(("vm" = String, Path, description = "the incoming VM")),
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_facts(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    let f = DestinationEndpoint::facts(&a.incoming_qmp(&vm)?).await?;
    Ok(Json(serde_json::to_value(f).unwrap_or(Value::Null)))
}

#[utoipa::path(post, path = "/v1/incoming/{vm}/capabilities", summary = "migrate-set-capabilities on the destination",
    params(("vm" = String, Path, description = "the incoming VM")),
    request_body = Vec<Object>,
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_caps(
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

#[utoipa::path(post, path = "/v1/incoming/{vm}/parameters", summary = "migrate-set-parameters on the destination (no TLS object names; bandwidth within bounds)",
    params(("vm" = String, Path, description = "the incoming VM")),
    request_body = Object,
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_params(
    State(a): State<Agent>,
    Path(vm): Path<String>,
    p: Result<Json<Value>, JsonRejection>,
) -> ApiResult<Value> {
    let p = typed_parameters(body(p)?)?;
    check_parameters(&p)?;
    a.incoming_qmp(&vm)?
        .migrate_set_parameters(&p)
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({})))
}

#[utoipa::path(post, path = "/v1/incoming/{vm}/start", summary = "migrate-incoming on the URI the destination agent chose (body: {})",
    params(("vm" = String, Path, description = "the incoming VM")),
    request_body = NoBody,
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_start(
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

/// The parameters of a `/parameters` body, refusing names tern does not know (the QMP type
/// keeps those in `extra` to read newer QEMUs' answers; a client must not pass them through)
/// and raw-JSON parameters.
fn typed_parameters(v: Value) -> Result<MigrationParameters, AgentError> {
    let p: MigrationParameters = serde_json::from_value(v)
        .map_err(|e| AgentError::Invalid(format!("invalid migration parameters: {e}")))?;
    if let Some(unknown) = p.extra.keys().next() {
        return Err(AgentError::Invalid(format!(
            "unknown migration parameter `{unknown}`: give QEMU parameter names tern sets \
             (downtime-limit, max-bandwidth, multifd-channels, …)"
        )));
    }
    if p.block_bitmap_mapping.is_some() {
        return Err(AgentError::Invalid(
            "migration parameter `block-bitmap-mapping` is not settable through the API".into(),
        ));
    }
    Ok(p)
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

#[utoipa::path(get, path = "/v1/incoming/{vm}/status", summary = "query-status of the destination QEMU",
    params(("vm" = String, Path, description = "the incoming VM")),
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_status(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    let s = a
        .incoming_qmp(&vm)?
        .query_status()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(serde_json::to_value(s).unwrap_or(Value::Null)))
}

#[utoipa::path(get, path = "/v1/incoming/{vm}/migration", summary = "query-migrate on the destination",
    params(("vm" = String, Path, description = "the incoming VM")),
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_migration(
    State(a): State<Agent>,
    Path(vm): Path<String>,
) -> ApiResult<Value> {
    let s = a
        .incoming_qmp(&vm)?
        .query_migrate()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(serde_json::to_value(s).unwrap_or(Value::Null)))
}

#[utoipa::path(post, path = "/v1/incoming/{vm}/cont", summary = "cont (resume) the destination guest",
    params(("vm" = String, Path, description = "the incoming VM")),
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_cont(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    a.incoming_qmp(&vm)?
        .cont()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({})))
}

#[utoipa::path(post, path = "/v1/incoming/{vm}/recover", summary = "migrate-recover (post-copy recovery) on the destination agent's own URI (body: {})",
    params(("vm" = String, Path, description = "the incoming VM")),
    request_body = NoBody,
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_recover(
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

#[utoipa::path(post, path = "/v1/incoming/{vm}/pause", summary = "migrate-pause on the destination",
    params(("vm" = String, Path, description = "the incoming VM")),
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn in_pause(State(a): State<Agent>, Path(vm): Path<String>) -> ApiResult<Value> {
    a.incoming_qmp(&vm)?
        .migrate_pause()
        .await
        .map_err(AgentError::from)?;
    Ok(Json(json!({})))
}

#[utoipa::path(post, path = "/v1/incoming/{vm}/promote", summary = "Make a completed incoming VM this host's running guest",
    params(("vm" = String, Path, description = "the incoming VM")),
    responses((status = 200, description = "success", body = crate::VmInfo), ApiErrors))]
pub(super) async fn in_promote(
    State(a): State<Agent>,
    Path(vm): Path<String>,
) -> ApiResult<crate::VmInfo> {
    Ok(Json(a.promote_incoming(&vm).await?))
}

#[utoipa::path(get, path = "/v1/migrations", summary = "Migrations this host ran as source, newest first",
    responses((status = 200, description = "success", body = Vec<crate::store::MigrationRecord>), ApiErrors))]
pub(super) async fn list_migrations(
    State(a): State<Agent>,
) -> ApiResult<Vec<crate::store::MigrationRecord>> {
    Ok(Json(a.migrations().await?))
}

#[utoipa::path(post, path = "/v1/migrations", summary = "Start migrating a VM of this host to one of its configured peers",
    request_body = StartMigrationRequest,
    responses((status = 200, description = "success", body = crate::store::MigrationRecord), ApiErrors))]
pub(super) async fn start_migration(
    State(a): State<Agent>,
    req: Result<Json<StartMigrationRequest>, JsonRejection>,
) -> Result<
    (
        axum::Extension<tern_pki::AuditTarget>,
        Json<crate::store::MigrationRecord>,
    ),
    ApiError,
> {
    let record = a.start_migration(body(req)?).await?;
    // Names the new migration in the audit record (and so in its own events).
    let target = tern_pki::AuditTarget(format!("migration {}", record.id));
    Ok((axum::Extension(target), Json(record)))
}

/// How many records `GET /v1/audit` returns.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    /// The newest N records (default 100, at most 10000).
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/audit", summary = "The audit log: every mutating request with the identity that made it and how it ended (admins)",
    params(AuditQuery),
    responses((status = 200, description = "oldest first", body = Vec<crate::audit::AuditEntry>), ApiErrors))]
pub(super) async fn audit_log(
    State(a): State<Agent>,
    q: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Vec<crate::audit::AuditEntry>> {
    let q = q.map_err(|e| AgentError::Invalid(format!("invalid query: {e}; use ?limit=N")))?;
    Ok(Json(a.audit().list(q.limit.unwrap_or(100)).await?))
}

#[utoipa::path(post, path = "/v1/migrations/plan", summary = "The policy's plan and pre-flight estimate for a migration request (nothing is started)",
    request_body = crate::api::PlanRequest,
    responses((status = 200, description = "success", body = Object), ApiErrors))]
pub(super) async fn plan_migration(
    State(a): State<Agent>,
    req: Result<Json<crate::api::PlanRequest>, JsonRejection>,
) -> ApiResult<tern_policy::MigrationPlan> {
    let (req, probe_s) = body(req)?.split();
    Ok(Json(a.plan_migration(req, probe_s).await?))
}

/// `?after=N`: only events with a larger sequence number.
#[derive(Debug, Deserialize)]
pub(super) struct AfterQuery {
    #[serde(default)]
    after: u64,
}

#[utoipa::path(get, path = "/v1/migrations/{id}", summary = "A migration with live progress and its events (after=N for later events only)",
    params(("id" = String, Path, description = "the migration"), ("after" = Option<u64>, Query, description = "only events with a larger seq")),
    responses((status = 200, description = "success", body = crate::api::MigrationView), ApiErrors))]
pub(super) async fn show_migration(
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

#[utoipa::path(post, path = "/v1/migrations/{id}/force-complete", summary = "Finish now: post-copy if permitted, else pause the guest until the copy finishes",
    params(("id" = String, Path, description = "the migration")),
    responses((status = 200, description = "success", body = OperatorReply), ApiErrors))]
pub(super) async fn force_complete(
    State(a): State<Agent>,
    Path(id): Path<String>,
) -> ApiResult<OperatorReply> {
    operator(&a, &id, OperatorCommand::ForceComplete).await
}

#[utoipa::path(post, path = "/v1/migrations/{id}/abort", summary = "Cancel (refused once post-copy started)",
    params(("id" = String, Path, description = "the migration")),
    responses((status = 200, description = "success", body = OperatorReply), ApiErrors))]
pub(super) async fn abort(
    State(a): State<Agent>,
    Path(id): Path<String>,
) -> ApiResult<OperatorReply> {
    operator(&a, &id, OperatorCommand::Abort).await
}

#[utoipa::path(post, path = "/v1/migrations/{id}/bandwidth", summary = "Change the bandwidth cap mid-flight (8 kbit/s to 400 gbit/s)",
    params(("id" = String, Path, description = "the migration")),
    request_body = BandwidthRequest,
    responses((status = 200, description = "success", body = OperatorReply), ApiErrors))]
pub(super) async fn bandwidth(
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
