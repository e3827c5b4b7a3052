//! The controller's HTTP/JSON API (axum): `/v1/...`, `/openapi.json` generated from the Rust
//! types (utoipa), `/metrics` (Prometheus) and `/v1/events` (server-sent events).
//!
//! Who calls is an [`Identity`]: with mutual TLS the client certificate's (put on the request
//! by `tern_pki::serve_mtls`); in the loopback lab mode the holder of the bearer token, an
//! admin named `token` (401 without the token). What each identity may do is one table,
//! [`required_role`]: viewers read everything, operators migrate and evacuate, admins change
//! host settings and anything else, host certificates only send their own heartbeat (403
//! naming who, their role and the role needed). Every call is logged on one line, and every
//! mutating call (but accepted agent heartbeats), refused ones included, is recorded in the
//! audit table with the identity and its role. Errors are `{"error": "...", "details": ...}`
//! naming the bad value and what is valid: 400 invalid input, 401 no or wrong token, 403 wrong
//! role, 404 unknown thing, 409 conflicting state, 422 valid but impossible (with per-item
//! reasons), 500 store failures.

mod ha;
mod handlers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tern_pki::{AuthzError, CertKind, Identity, Role};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::controller::{Controller, ControllerError};
use crate::store::AuditEntry;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the bad value and what would be valid.
    pub error: String,
    /// Per-item reasons (e.g. why each host refused each VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// An error as the API answers it.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
}

impl ApiError {
    /// A 400 naming the problem.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                error: message.into(),
                details: None,
            },
        }
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        let (status, details) = match &e {
            ControllerError::NotFound(_) => (StatusCode::NOT_FOUND, None),
            ControllerError::Invalid(_) => (StatusCode::BAD_REQUEST, None),
            ControllerError::Conflict(_) => (StatusCode::CONFLICT, None),
            ControllerError::Unprocessable { details, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, Some(details.clone()))
            }
            ControllerError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        Self {
            status,
            body: ErrorBody {
                error: e.to_string(),
                details,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// The controller.
    pub ctl: Controller,
    /// How callers authenticate.
    pub auth: ApiAuth,
}

/// How the API knows who calls.
#[derive(Clone)]
pub enum ApiAuth {
    /// Mutual TLS: the [`Identity`] comes from the client certificate (`serve_mtls`).
    Mtls,
    /// Loopback lab mode: bearer tokens, one per role ([`LabTokens`]).
    Token(Arc<LabTokens>),
}

/// The bearer tokens of the loopback lab mode: the admin token of `token_file`, and one
/// viewer and one operator token beside it, so a lab (and the web view's browser test) can
/// show what each role may do without certificates.
#[derive(Debug, Clone)]
pub struct LabTokens {
    /// The admin token (`token_file`).
    pub admin: String,
    /// The viewer token (`token_file` + `.viewer`).
    pub viewer: String,
    /// The operator token (`token_file` + `.operator`).
    pub operator: String,
}

impl LabTokens {
    /// One token for all three roles (unit tests).
    pub fn single(token: &str) -> Self {
        Self {
            admin: token.into(),
            viewer: token.into(),
            operator: token.into(),
        }
    }

    /// The identity of `given`'s holder (compared in constant time), or `None`.
    pub fn identify(&self, given: &str) -> Option<Identity> {
        [
            (&self.admin, Role::Admin),
            (&self.operator, Role::Operator),
            (&self.viewer, Role::Viewer),
        ]
        .into_iter()
        .find(|(t, _)| token_matches(given, t))
        .map(|(_, role)| lab_identity(role))
    }
}

/// The identity of the bearer-token holder in the loopback lab mode: an admin named `token`,
/// so audit records and 403 messages say plainly that no certificate was involved.
pub fn token_identity() -> Identity {
    lab_identity(Role::Admin)
}

/// The identity of a lab token of `role`: `token` (admin), `token-operator`, `token-viewer`.
pub fn lab_identity(role: Role) -> Identity {
    let name = match role {
        Role::Admin | Role::Host => "token".to_string(),
        other => format!("token-{other}"),
    };
    Identity {
        name,
        kind: CertKind::User,
        role,
        serial: "none".to_string(),
        not_after_unix: i64::MAX,
    }
}

/// The cookie the web view's login (`/ui/login?token=`) sets in the loopback lab mode.
pub const TOKEN_COOKIE: &str = "tern_token";

/// The token of a request: `Authorization: Bearer`, else the web view's cookie.
fn request_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    bearer.or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == TOKEN_COOKIE)
            .map(|(_, v)| v.trim())
    })
}

/// The role a request needs: the one authorization table of the API.
///
/// Reads (`GET`, `HEAD`: every list and view, `/v1/events`, `/metrics`, `/openapi.json`) need
/// `viewer`; starting, steering and evacuating (`POST /v1/migrations`, `.../abort`,
/// `.../force-complete`, `.../bandwidth`,
/// `POST /v1/hosts/{name}/evacuate`, evacuation pause/resume/cancel) need `operator`; agent
/// heartbeats need a host certificate; everything else that changes state (host settings
/// `PATCH /v1/hosts/{name}`, and any route added later) needs `admin`, so a new route is
/// closed by default.
pub fn required_role(method: &Method, path: &str) -> Role {
    if method == Method::GET || method == Method::HEAD {
        return Role::Viewer;
    }
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if method == Method::POST {
        match parts.as_slice() {
            ["", "v1", "agents", "heartbeat"] => return Role::Host,
            ["", "v1", "migrations"]
            | [
                "",
                "v1",
                "migrations",
                _,
                "abort" | "force-complete" | "bandwidth",
            ]
            | ["", "v1", "hosts", _, "evacuate"]
            | ["", "v1", "evacuations", _, "pause" | "resume" | "cancel"] => return Role::Operator,
            _ => {}
        }
    }
    Role::Admin
}

/// Whether `who` may make a request needing `needed`. Host certificates may only use host
/// routes (their heartbeat), not even read; users follow viewer < operator < admin. In token
/// mode the admin token holder may also heartbeat (it stands for every lab agent).
fn permit(auth: &ApiAuth, who: &Identity, needed: Role) -> Result<(), AuthzError> {
    match (auth, who.kind, needed) {
        (ApiAuth::Token(_), _, Role::Host) if who.role == Role::Admin => Ok(()),
        (_, CertKind::Host, Role::Host) => Ok(()),
        (_, CertKind::Host, _) => Err(AuthzError::Forbidden {
            identity: who.clone(),
            needed,
        }),
        _ => tern_pki::authorize(Some(who), needed),
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "mutualTLS",
            SecurityScheme::MutualTls {
                description: Some(
                    "a client certificate of the installation CA (`tern pki`); its role \
                     (viewer, operator, admin, or host for agents) decides what it may do"
                        .into(),
                ),
                extensions: None,
            },
        );
        // Alternatives: mutual TLS when `[tls]` is configured, the bearer token in the
        // loopback lab mode.
        openapi.security = Some(vec![
            utoipa::openapi::security::SecurityRequirement::new("mutualTLS", Vec::<String>::new()),
            utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new()),
        ]);
    }
}

/// The OpenAPI document, derived from the handlers' annotations and the Rust types.
#[derive(OpenApi)]
#[openapi(
    info(title = "tern controller API", description = "Hosts, VMs, migrations and evacuations over every tern agent."),
    paths(
        handlers::heartbeat,
        handlers::list_hosts,
        handlers::show_host,
        handlers::patch_host,
        handlers::evacuate,
        handlers::list_vms,
        handlers::list_migrations,
        handlers::create_migration,
        handlers::show_migration,
        handlers::abort_migration,
        handlers::force_complete_migration,
        handlers::bandwidth_migration,
        handlers::list_evacuations,
        handlers::show_evacuation,
        handlers::pause_evacuation,
        handlers::resume_evacuation,
        handlers::cancel_evacuation,
        handlers::events,
        handlers::metrics,
        ha::leader,
    ),
    components(schemas(ErrorBody, crate::events::ControllerEvent, crate::leader::LeaderStatus, crate::lease::LeaseSettings)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The router with authentication, request logging and auditing.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/openapi.json", get(handlers::openapi))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/agents/heartbeat", post(handlers::heartbeat))
        .route("/v1/hosts", get(handlers::list_hosts))
        .route(
            "/v1/hosts/{name}",
            get(handlers::show_host).patch(handlers::patch_host),
        )
        .route("/v1/hosts/{name}/evacuate", post(handlers::evacuate))
        .route("/v1/vms", get(handlers::list_vms))
        .route(
            "/v1/migrations",
            get(handlers::list_migrations).post(handlers::create_migration),
        )
        .route("/v1/migrations/{id}", get(handlers::show_migration))
        .route("/v1/migrations/{id}/abort", post(handlers::abort_migration))
        .route(
            "/v1/migrations/{id}/force-complete",
            post(handlers::force_complete_migration),
        )
        .route(
            "/v1/migrations/{id}/bandwidth",
            post(handlers::bandwidth_migration),
        )
        .route("/v1/evacuations", get(handlers::list_evacuations))
        .route("/v1/evacuations/{id}", get(handlers::show_evacuation))
        .route(
            "/v1/evacuations/{id}/pause",
            post(handlers::pause_evacuation),
        )
        .route(
            "/v1/evacuations/{id}/resume",
            post(handlers::resume_evacuation),
        )
        .route(
            "/v1/evacuations/{id}/cancel",
            post(handlers::cancel_evacuation),
        )
        .route("/v1/events", get(handlers::events))
        .merge(crate::web::routes())
        .route("/v1/leader", get(ha::leader))
        .fallback(no_route)
        .method_not_allowed_fallback(no_route)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        body: ErrorBody {
            error: format!("no route {method} {uri}: the API is described at /openapi.json"),
            details: None,
        },
    }
}

fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The 401 of token mode.
fn token_refused(wrong: bool) -> Response {
    let why = if wrong {
        "wrong bearer token"
    } else {
        "missing Authorization: Bearer TOKEN header"
    };
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        body: ErrorBody {
            error: format!(
                "{why}: every call needs the controller's token (the token_file of server.toml)"
            ),
            details: None,
        },
    }
    .into_response()
}

/// Authentication, authorization ([`required_role`]), one log line per request, audit of
/// mutating calls (refused ones included).
async fn guard(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "?".to_string(), |c| c.0.to_string());
    let identity = match &st.auth {
        ApiAuth::Mtls => req
            .extensions()
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| AuthzError::Unauthenticated.into_response()),
        ApiAuth::Token(tokens) => match request_token(req.headers()) {
            Some(t) => tokens.identify(t).ok_or_else(|| token_refused(true)),
            None => Err(token_refused(false)),
        },
    };
    // The web view's login carries a token in its query: never log or audit it.
    if crate::web::is_login(req.uri().path()) {
        return crate::web::login(&st, req.uri()).await;
    }
    let identity = identity.map_err(|resp| crate::web::unauthenticated(req.uri().path(), resp));
    let mut standby_refusal = false;
    let (actor, resp) = match identity {
        Ok(who) => {
            let actor = format!(
                "{}@{peer} ({}, role {}, serial {})",
                who.name, who.kind, who.role, who.serial
            );
            let needed = required_role(&method, req.uri().path());
            match permit(&st.auth, &who, needed) {
                Ok(()) => match ha::refuse_on_standby(&st, &method, req.uri().path()) {
                    Some(refused) => {
                        standby_refusal = true;
                        (actor, refused.into_response())
                    }
                    None => {
                        req.extensions_mut().insert(who);
                        (actor, next.run(req).await)
                    }
                },
                Err(e) => {
                    tracing::warn!(%method, path = %path, error = %e, "refused request");
                    (actor, e.into_response())
                }
            }
        }
        Err(resp) => (format!("anonymous@{peer}"), resp),
    };
    let status = resp.status().as_u16();
    tracing::info!(
        target: "tern_server::http",
        %method, path = %path, status, ms = started.elapsed().as_millis() as u64, actor = %actor,
        "request"
    );
    st.ctl
        .metrics
        .requests
        .get_or_create(&vec![
            ("method".into(), method.to_string()),
            ("status".into(), status.to_string()),
        ])
        .inc();
    // Agents' heartbeats are reports, not operator actions (and would flood the table); a
    // refused heartbeat is still recorded.
    let heartbeat = path.starts_with("/v1/agents/heartbeat") && status < 400;
    if method != Method::GET && method != Method::HEAD && !heartbeat {
        let entry = AuditEntry {
            actor,
            method: method.to_string(),
            path,
            status,
        };
        let store = st.ctl.store.clone();
        let write = async move {
            if let Err(e) = store.audit(&entry, crate::model::now_ms()).await {
                tracing::error!("audit: {e}");
            }
        };
        if standby_refusal {
            // A standby may be the one cut from the database: its refusal must not wait.
            tokio::spawn(write);
        } else {
            write.await;
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_table_opens_reads_to_viewers_and_closes_unknown_mutations_to_admins() {
        let cases = [
            (Method::GET, "/v1/hosts", Role::Viewer),
            (Method::GET, "/v1/events", Role::Viewer),
            (Method::GET, "/metrics", Role::Viewer),
            (Method::POST, "/v1/agents/heartbeat", Role::Host),
            (Method::POST, "/v1/migrations", Role::Operator),
            (Method::POST, "/v1/migrations/7/abort", Role::Operator),
            (
                Method::POST,
                "/v1/migrations/7/force-complete",
                Role::Operator,
            ),
            (Method::POST, "/v1/migrations/7/bandwidth", Role::Operator),
            (Method::POST, "/v1/migrations/7/delete", Role::Admin),
            (Method::POST, "/v1/hosts/h1/evacuate", Role::Operator),
            (Method::POST, "/v1/evacuations/e1/pause", Role::Operator),
            (Method::POST, "/v1/evacuations/e1/resume", Role::Operator),
            (Method::POST, "/v1/evacuations/e1/cancel", Role::Operator),
            (Method::PATCH, "/v1/hosts/h1", Role::Admin),
            (Method::DELETE, "/v1/migrations", Role::Admin),
            (Method::POST, "/v1/hosts/h1/evacuate/extra", Role::Admin),
            (Method::POST, "/v1/something-new", Role::Admin),
        ];
        for (m, p, want) in cases {
            assert_eq!(required_role(&m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn hosts_only_heartbeat_and_the_lab_token_may_too() {
        let host = Identity {
            kind: CertKind::Host,
            role: Role::Host,
            name: "h1".into(),
            ..token_identity()
        };
        let mut admin = token_identity();
        admin.name = "ada".into();
        assert!(permit(&ApiAuth::Mtls, &host, Role::Host).is_ok());
        assert!(permit(&ApiAuth::Mtls, &host, Role::Viewer).is_err());
        assert!(permit(&ApiAuth::Mtls, &host, Role::Operator).is_err());
        assert!(permit(&ApiAuth::Mtls, &admin, Role::Host).is_err());
        assert!(permit(&ApiAuth::Mtls, &admin, Role::Admin).is_ok());
        let token = ApiAuth::Token(Arc::new(LabTokens::single(&"t".repeat(32))));
        assert!(permit(&token, &token_identity(), Role::Host).is_ok());
        assert!(permit(&token, &lab_identity(Role::Operator), Role::Host).is_err());
    }
}
