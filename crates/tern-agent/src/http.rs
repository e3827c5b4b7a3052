//! The agent's HTTP/JSON API (axum), described by the OpenAPI 3 document at `/openapi.json`.
//!
//! Every route is described once, by its handler's `#[utoipa::path]` (in `routes`): the
//! router registers the handlers from those descriptions ([`utoipa_axum`]) and [`openapi`]
//! derives the document from them and from the Rust types of the bodies, so the two cannot
//! drift apart. Errors are JSON `{"error": "..."}` with a status derived from the
//! [`AgentError`] variant: 404 unknown thing, 409 conflicting state, 422 not enough memory,
//! 400 invalid request, 503 another agent unreachable, 500 QEMU or internal failures.

use std::future::Future;
use std::sync::LazyLock;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tern_pki::{Identity, Role};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::AgentError;
use crate::api::{ErrorBody, NoBody};
use crate::daemon::Agent;

mod routes;

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

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

/// The largest request body the agent reads (a VM spec is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A request body, or the JSON error saying what is wrong with it: 413 over
/// [`MAX_BODY_BYTES`], 415 without `Content-Type: application/json`, 400 for bad JSON, an
/// unknown field or an invalid value (serde names the field and the valid values).
pub(crate) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
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
pub(crate) fn no_body(b: Result<Json<NoBody>, JsonRejection>) -> Result<(), ApiError> {
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

/// The error statuses every route may answer, each with an [`ErrorBody`].
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only described, never built: errors are built from [`ApiError`]
pub enum ApiErrors {
    /// Invalid input: the message names the bad value and what would be valid.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No such VM or migration, or an unknown destination host.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Wrong method for the route (`Allow` lists the right ones).
    #[response(status = 405)]
    MethodNotAllowed(ErrorBody),
    /// Conflicting state (already migrating, not an incoming VM, …).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// A body over 1 MiB.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// A body that is not `application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Not enough memory on the destination.
    #[response(status = 422)]
    InsufficientMemory(ErrorBody),
    /// QEMU or an internal failure.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// Another agent cannot be reached.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "tern agent API",
        description = "Per-host agent of tern: VMs, incoming migrations, and migrations run by the source agent."
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// Every route, registered from its handler's `#[utoipa::path]` description.
fn api() -> OpenApiRouter<Agent> {
    use routes::*;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(utoipa_axum::routes!(health))
        .routes(utoipa_axum::routes!(host_facts))
        .routes(utoipa_axum::routes!(list_vms, create_vm))
        .routes(utoipa_axum::routes!(show_vm, stop_vm))
        .routes(utoipa_axum::routes!(prepare_incoming))
        .routes(utoipa_axum::routes!(delete_incoming))
        .routes(utoipa_axum::routes!(in_facts))
        .routes(utoipa_axum::routes!(in_caps))
        .routes(utoipa_axum::routes!(in_params))
        .routes(utoipa_axum::routes!(in_start))
        .routes(utoipa_axum::routes!(in_status))
        .routes(utoipa_axum::routes!(in_migration))
        .routes(utoipa_axum::routes!(in_cont))
        .routes(utoipa_axum::routes!(in_recover))
        .routes(utoipa_axum::routes!(in_pause))
        .routes(utoipa_axum::routes!(in_promote))
        .routes(utoipa_axum::routes!(list_migrations, start_migration))
        .routes(utoipa_axum::routes!(plan_migration))
        .routes(utoipa_axum::routes!(show_migration))
        .routes(utoipa_axum::routes!(force_complete))
        .routes(utoipa_axum::routes!(abort))
        .routes(utoipa_axum::routes!(bandwidth))
        .routes(utoipa_axum::routes!(audit_log))
}

/// The OpenAPI 3.1 document of the API, generated from the handlers' descriptions and the
/// Rust types of their bodies (plus `/openapi.json` itself).
pub fn openapi() -> utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
        let mut doc = api().split_for_parts().1;
        let op = utoipa::openapi::path::OperationBuilder::new()
            .summary(Some("This document"))
            .response(
                "200",
                utoipa::openapi::ResponseBuilder::new().description("the OpenAPI document"),
            )
            .build();
        doc.paths
            .add_path_operation("/openapi.json", vec![utoipa::openapi::HttpMethod::Get], op);
        doc
    });
    DOC.clone()
}

/// Who may call what: the role each route needs, by method and route template.
///
/// Viewers read; operators run migrations; admins create and stop VMs; the destination-side
/// `/v1/incoming…` routes take host certificates only (other agents), so a user — even an
/// admin — cannot drive a destination QEMU by hand. A route missing here is refused (403),
/// and a test checks that every documented route is listed.
pub const ROUTE_ROLES: &[(&str, &str, Role)] = &[
    ("GET", "/healthz", Role::Viewer),
    ("GET", "/openapi.json", Role::Viewer),
    ("GET", "/v1/host", Role::Viewer),
    ("GET", "/v1/vms", Role::Viewer),
    ("GET", "/v1/vms/{name}", Role::Viewer),
    ("GET", "/v1/migrations", Role::Viewer),
    ("GET", "/v1/migrations/{id}", Role::Viewer),
    ("POST", "/v1/migrations", Role::Operator),
    ("POST", "/v1/migrations/plan", Role::Operator),
    ("POST", "/v1/migrations/{id}/force-complete", Role::Operator),
    ("POST", "/v1/migrations/{id}/abort", Role::Operator),
    ("POST", "/v1/migrations/{id}/bandwidth", Role::Operator),
    ("POST", "/v1/vms", Role::Admin),
    ("DELETE", "/v1/vms/{name}", Role::Admin),
    ("POST", "/v1/incoming", Role::Host),
    ("DELETE", "/v1/incoming/{vm}", Role::Host),
    ("GET", "/v1/incoming/{vm}/facts", Role::Host),
    ("POST", "/v1/incoming/{vm}/capabilities", Role::Host),
    ("POST", "/v1/incoming/{vm}/parameters", Role::Host),
    ("POST", "/v1/incoming/{vm}/start", Role::Host),
    ("GET", "/v1/incoming/{vm}/status", Role::Host),
    ("GET", "/v1/incoming/{vm}/migration", Role::Host),
    ("POST", "/v1/incoming/{vm}/cont", Role::Host),
    ("POST", "/v1/incoming/{vm}/recover", Role::Host),
    ("POST", "/v1/incoming/{vm}/pause", Role::Host),
    ("POST", "/v1/incoming/{vm}/promote", Role::Host),
    // Who did what on this host: names of people and their refused attempts, for admins.
    ("GET", "/v1/audit", Role::Admin),
];

/// The role `method path_template` needs, from [`ROUTE_ROLES`].
pub fn role_needed(method: &Method, template: &str) -> Option<Role> {
    ROUTE_ROLES
        .iter()
        .find(|(m, p, _)| *m == method.as_str() && *p == template)
        .map(|(_, _, r)| *r)
}

/// Marks requests served in plain lab mode (see [`serve`]).
#[derive(Debug, Clone, Copy)]
struct LabPlainHttp;

/// The router as served in plain lab mode: every request acts as
/// [`Identity::lab_without_tls`] (an admin), and may also use the host-only routes, since
/// the lab's agents call each other without certificates.
pub fn lab_router(agent: Agent) -> Router {
    router(agent)
        .layer(axum::Extension(Identity::lab_without_tls()))
        .layer(axum::Extension(LabPlainHttp))
}

/// Lets a request through only if its [`Identity`] (from the client certificate, or the lab
/// identity in plain mode) has the role [`ROUTE_ROLES`] gives its route.
async fn require_route_role(
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let template = matched.as_ref().map_or("", |m| m.as_str());
    let Some(needed) = role_needed(request.method(), template) else {
        return ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "{} {template} has no role assigned in the agent's route table: refused",
                request.method()
            ),
        }
        .into_response();
    };
    // In plain lab mode no peer can be told from a user: the lab's agents call each other's
    // host-only routes as the lab identity. The marker is private to this module and only
    // [`serve`]'s plain branch inserts it, so no client certificate can stand in for it.
    let lab = request.extensions().get::<LabPlainHttp>().is_some();
    if lab && needed == Role::Host {
        return next.run(request).await;
    }
    match tern_pki::authorize(request.extensions().get::<Identity>(), needed) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            tracing::info!(error = %e, path = %request.uri().path(), "refused request");
            e.into_response()
        }
    }
}

/// The agent's router: the described routes, `/openapi.json`, the role each route needs
/// ([`ROUTE_ROLES`]), JSON errors for unknown routes (404) and wrong methods (405), and the
/// body limit (413). Requests must carry an [`Identity`] (put there by
/// [`tern_pki::serve_mtls_until`], or [`Identity::lab_without_tls`] in plain lab mode).
pub fn router(agent: Agent) -> Router {
    let (routes, _) = api().split_for_parts();
    // Outermost, so that requests refused by the role check or the body limit are recorded
    // too; the identity is already in the request (mTLS, or the lab layer outside this one).
    let audit = tern_pki::AuditLayer::new(std::sync::Arc::new(agent.audit().clone()));
    let fencing = agent.fencing();
    routes
        .route("/openapi.json", get(|| async { Json(openapi()) }))
        // Inner to the role check: only an authorised caller's epoch is recorded.
        .route_layer(axum::middleware::from_fn_with_state(
            fencing,
            crate::fencing::enforce,
        ))
        .route_layer(axum::middleware::from_fn(require_route_role))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(agent)
        .layer(audit)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route {method} {uri}: the API is described at /openapi.json"),
    }
}

/// The methods the API serves on `path` (`/v1/vms/web` matches `/v1/vms/{name}`), from the
/// OpenAPI document.
pub fn allowed_methods(path: &str) -> Vec<String> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let doc = serde_json::to_value(openapi()).unwrap_or_default();
    let mut methods: Vec<String> = doc["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(template, _)| {
            let pat: Vec<&str> = template.split('/').collect();
            pat.len() == segs.len()
                && pat
                    .iter()
                    .zip(&segs)
                    .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()))
        })
        .flat_map(|(_, ops)| ops.as_object().into_iter().flatten())
        .map(|(m, _)| m.to_uppercase())
        .filter(|m| !matches!(m.as_str(), "PARAMETERS" | "SUMMARY" | "DESCRIPTION"))
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

/// Serves the API on `listener` until `shutdown` resolves: with mutual TLS when the
/// configuration has a `[tls]` section (clients without a certificate of the installation's
/// CA are refused in the handshake), otherwise plain HTTP in lab mode, where every request
/// acts as [`Identity::lab_without_tls`] (an admin). The configuration refuses plain HTTP on
/// a non-loopback address; this re-checks the address actually bound.
pub async fn serve(
    agent: Agent,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let config = agent.config().clone();
    let local = listener
        .local_addr()
        .map_err(|e| AgentError::Internal(format!("listener address: {e}")))?;
    let io = |e: std::io::Error| AgentError::Internal(format!("HTTP server on {local}: {e}"));
    match &config.tls {
        Some(tls) => {
            let files = tls.files(&config.host)?;
            let server_tls = tern_pki::server_config(&files).map_err(|e| {
                AgentError::Config(format!("[tls] of the agent for host {}: {e}", config.host))
            })?;
            tracing::info!(%local, cert = %files.cert.display(), "agent API served with mutual TLS");
            tern_pki::serve_mtls_until(listener, router(agent), server_tls, shutdown)
                .await
                .map_err(io)
        }
        None => {
            if !local.ip().is_loopback() {
                return Err(AgentError::Config(format!(
                    "listen = \"{local}\" is not a loopback address and there is no [tls] \
                     section: refusing to serve the agent API without authentication"
                )));
            }
            tracing::warn!(
                %local,
                "LAB MODE: agent API served over plain HTTP without authentication; every \
                 request acts as admin `lab-plain-http`. Add a [tls] section outside a lab."
            );
            axum::serve(listener, lab_router(agent))
                .with_graceful_shutdown(shutdown)
                .await
                .map_err(io)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tern_engine::OperatorCommand;

    use super::*;
    use crate::api::StartMigrationRequest;
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

    /// The document is generated from the handlers: every operation has a summary, error
    /// responses and resolvable schema references, and the request/response types are the
    /// Rust types (their fields, including the refusal of unknown ones, come from serde).
    #[test]
    fn openapi_is_derived_from_the_handlers_and_types() {
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        let mut n = 0;
        for (path, ops) in paths {
            for (method, op) in ops.as_object().unwrap() {
                n += 1;
                assert!(op["summary"].is_string(), "{method} {path}");
                if path != "/openapi.json" {
                    for code in ["400", "404", "405", "409", "413", "415", "500"] {
                        assert!(op["responses"][code].is_object(), "{method} {path} {code}");
                    }
                }
                let text = op.to_string();
                for part in text.split("#/components/schemas/").skip(1) {
                    let name: String = part
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                        .collect();
                    assert!(doc["components"]["schemas"].get(&name).is_some(), "{name}");
                }
            }
        }
        assert_eq!(n, 27, "operations: 26 routes and /openapi.json");
        let schemas = &doc["components"]["schemas"];
        let start = &schemas["StartMigrationRequest"];
        assert!(start["properties"]["to_host"].is_object(), "{start}");
        assert!(start["properties"].get("to_agent_url").is_none(), "{start}");
        assert_eq!(start["additionalProperties"], false, "{start}");
        let policy = schemas["PolicyName"]["enum"].as_array().unwrap();
        assert_eq!(policy.len(), tern_policy::POLICY_NAMES.len());
        assert!(schemas["VmSpec"]["properties"]["kernel"].is_object());
        assert_eq!(schemas["NoBody"]["additionalProperties"], false);
        assert_eq!(allowed_methods("/v1/vms"), ["GET", "POST"]);
        assert_eq!(allowed_methods("/v1/vms/web"), ["DELETE", "GET"]);
        assert_eq!(allowed_methods("/v1/incoming/web/promote"), ["POST"]);
        assert!(allowed_methods("/v2").is_empty());
    }

    /// Every documented route has exactly one role in the table (a forgotten route would be
    /// refused to everyone), and every `/v1/incoming` route is host-only.
    #[test]
    fn every_route_has_a_role_and_incoming_is_host_only() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut n = 0;
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                let role = role_needed(&m, path).unwrap_or_else(|| panic!("{m} {path}"));
                n += 1;
                assert_eq!(
                    path.starts_with("/v1/incoming"),
                    role == Role::Host,
                    "{path}"
                );
                if m == Method::GET && !path.starts_with("/v1/incoming") && path != "/v1/audit" {
                    assert_eq!(role, Role::Viewer, "{path}");
                }
            }
        }
        assert_eq!(n, ROUTE_ROLES.len());
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
        let doc = serde_json::to_value(openapi()).unwrap();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                let path = path
                    .replace("{name}", "nope")
                    .replace("{vm}", "nope")
                    .replace("{id}", "nope");
                let req = match method.as_str() {
                    "get" => http.get(format!("{url}{path}")),
                    "post" => http.post(format!("{url}{path}")).json(&json!({})),
                    "delete" => http.delete(format!("{url}{path}")),
                    m => panic!("method {m}"),
                };
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap();
                assert!(!text.contains("no route"), "{method} {path}: {text}");
                assert_ne!(status, 405, "{method} {path}: {text}");
                if status >= 400 {
                    let e: ErrorBody = serde_json::from_str(&text)
                        .unwrap_or_else(|_| panic!("{method} {path} non-JSON error: {text}"));
                    assert!(!e.error.is_empty());
                }
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
