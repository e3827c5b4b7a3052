//! Authorization: which role a route needs, checked against the certificate's role.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Json;
use axum::extract::{FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::identity::{Identity, Role};

/// Why a request was not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    /// No identity on the request: it did not come through [`crate::serve_mtls`].
    #[error("no client certificate: this API requires a certificate of the tern CA")]
    Unauthenticated,
    /// The identity's role does not allow the route.
    #[error("{identity} may not do this: it needs role {needed}")]
    Forbidden {
        /// Who asked.
        identity: Identity,
        /// The role the route needs.
        needed: Role,
    },
}

impl IntoResponse for AuthzError {
    /// 401 or 403 with `{"error": "..."}`, the JSON error shape of tern's APIs.
    fn into_response(self) -> Response {
        let status = match self {
            AuthzError::Unauthenticated => StatusCode::UNAUTHORIZED,
            AuthzError::Forbidden { .. } => StatusCode::FORBIDDEN,
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// Whether `identity` may use a route that needs `needed` (see [`Role::allows`]).
pub fn authorize(identity: Option<&Identity>, needed: Role) -> Result<(), AuthzError> {
    let identity = identity.ok_or(AuthzError::Unauthenticated)?;
    if identity.role.allows(needed) {
        Ok(())
    } else {
        Err(AuthzError::Forbidden {
            identity: identity.clone(),
            needed,
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = AuthzError;
    /// The caller, as [`crate::serve_mtls`] put it on the request; 401 if absent.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Identity>()
            .cloned()
            .ok_or(AuthzError::Unauthenticated)
    }
}

/// A layer that lets a request through only if its [`Identity`] allows `needed`:
/// `Router::new().route("/v1/migrations", post(h)).route_layer(RequireRole::new(Role::Operator))`.
///
/// Applied per route group rather than inside handlers so that a new route cannot forget
/// its check: the route table says which role each group needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequireRole {
    needed: Role,
}

impl RequireRole {
    /// Requires `needed` (for users: at least it on the viewer < operator < admin ladder).
    pub fn new(needed: Role) -> Self {
        Self { needed }
    }

    /// Host-only routes (destination side of a migration): only agents' host certificates.
    pub fn host() -> Self {
        Self::new(Role::Host)
    }
}

impl<S> Layer<S> for RequireRole {
    type Service = RequireRoleService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireRoleService {
            inner,
            needed: self.needed,
        }
    }
}

/// The service made by [`RequireRole`].
#[derive(Debug, Clone)]
pub struct RequireRoleService<S> {
    inner: S,
    needed: Role,
}

impl<S> Service<Request> for RequireRoleService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match authorize(req.extensions().get::<Identity>(), self.needed) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(e) => {
                tracing::info!(error = %e, path = %req.uri().path(), "refused request");
                Box::pin(std::future::ready(Ok(e.into_response())))
            }
        }
    }
}
