//! Audit: who changed what, recorded for every mutating request.
//!
//! The layer sits outside the role checks so that refused attempts are recorded too (a
//! viewer trying to migrate is exactly what an audit log is for). Storage is the caller's:
//! the agent's SQLite store implements [`AuditSink`]; tests use [`MemoryAuditSink`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::Method;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower_layer::Layer;
use tower_service::Service;

use crate::identity::{CertKind, Identity, Role};

/// How a recorded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutcome {
    /// 1xx–3xx: the change was made (or started).
    Succeeded,
    /// 4xx: refused (authorization, validation, conflict); nothing changed.
    Refused,
    /// 5xx: tern tried and failed.
    Failed,
}

impl AuditOutcome {
    /// The outcome an HTTP status means.
    pub fn from_status(status: u16) -> Self {
        match status {
            400..=499 => AuditOutcome::Refused,
            500.. => AuditOutcome::Failed,
            _ => AuditOutcome::Succeeded,
        }
    }
}

/// One mutating request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the request finished, RFC 3339 UTC.
    pub at: String,
    /// The certificate's name, or `None` for a request without identity (only possible on
    /// a router not served by [`crate::serve_mtls`]).
    pub identity: Option<String>,
    /// Host or user.
    pub kind: Option<CertKind>,
    /// The role the certificate carried.
    pub role: Option<Role>,
    /// The certificate serial (which of a user's certificates was used).
    pub serial: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Request path (no query string: it may carry values nobody should keep).
    pub path: String,
    /// What was acted on (VM, migration id), if the handler named it with [`AuditTarget`].
    pub target: Option<String>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// The HTTP status.
    pub status: u16,
}

/// A response extension a handler sets to name what it acted on (`"vm web"`,
/// `"migration 42"`): the path alone does not say it for `POST /v1/migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditTarget(pub String);

/// Where audit records go. The agent's store implements it (an `INSERT` into its audit
/// table, plus a migration event when the target is a migration). The hook, for the lead
/// wiring `tern-agent` (sketch; the store's own connection handling applies):
///
/// ```text
/// CREATE TABLE IF NOT EXISTS audit (
///     id INTEGER PRIMARY KEY, at TEXT NOT NULL, identity TEXT, kind TEXT, role TEXT,
///     serial TEXT, method TEXT NOT NULL, path TEXT NOT NULL, target TEXT,
///     outcome TEXT NOT NULL, status INTEGER NOT NULL);
///
/// impl tern_pki::AuditSink for Store {
///     fn record(&self, r: AuditRecord) -> Result<(), Box<dyn Error + Send + Sync>> {
///         self.conn().execute("INSERT INTO audit (...) VALUES (?1, ..., ?10)", params![
///             r.at, r.identity, r.kind.map(|k| k.as_str()), r.role.map(|r| r.as_str()),
///             r.serial, r.method, r.path, r.target,
///             serde_json::to_value(r.outcome)?.as_str(), r.status])?;
///         Ok(())
///     }
/// }
/// // http.rs: router.layer(tern_pki::AuditLayer::new(store.clone()))  (outermost layer)
/// ```
///
/// Called on the request's task after the handler finished: keep it short (a local SQLite
/// insert is fine); a failure is logged and does not change the response — the action has
/// already happened by then.
pub trait AuditSink: Send + Sync + 'static {
    /// Stores one record.
    fn record(&self, record: AuditRecord) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// Keeps records in memory (tests, labs).
#[derive(Debug, Default)]
pub struct MemoryAuditSink {
    records: Mutex<Vec<AuditRecord>>,
}

impl MemoryAuditSink {
    /// A copy of the records so far.
    pub fn records(&self) -> Vec<AuditRecord> {
        match self.records.lock() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, record: AuditRecord) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match self.records.lock() {
            Ok(mut r) => r.push(record),
            Err(p) => p.into_inner().push(record),
        }
        Ok(())
    }
}

/// Records every request whose method is not GET, HEAD or OPTIONS:
/// `router.layer(AuditLayer::new(sink))` (outermost, so refused requests are recorded).
#[derive(Clone)]
pub struct AuditLayer {
    sink: Arc<dyn AuditSink>,
}

impl std::fmt::Debug for AuditLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLayer").finish_non_exhaustive()
    }
}

impl AuditLayer {
    /// Records into `sink`.
    pub fn new(sink: Arc<dyn AuditSink>) -> Self {
        Self { sink }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = AuditService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuditService {
            inner,
            sink: self.sink.clone(),
        }
    }
}

/// The service made by [`AuditLayer`].
#[derive(Clone)]
pub struct AuditService<S> {
    inner: S,
    sink: Arc<dyn AuditSink>,
}

impl<S> Service<Request> for AuditService<S>
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
        let method = req.method().clone();
        if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
            return Box::pin(self.inner.call(req));
        }
        let identity = req.extensions().get::<Identity>().cloned();
        let path = req.uri().path().to_string();
        let sink = self.sink.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let Ok(response) = result;
            let status = response.status().as_u16();
            let record = AuditRecord {
                at: OffsetDateTime::now_utc()
                    .format(&Rfc3339)
                    .unwrap_or_else(|_| "unknown".to_string()),
                identity: identity.as_ref().map(|i| i.name.clone()),
                kind: identity.as_ref().map(|i| i.kind),
                role: identity.as_ref().map(|i| i.role),
                serial: identity.as_ref().map(|i| i.serial.clone()),
                method: method.to_string(),
                path,
                target: response
                    .extensions()
                    .get::<AuditTarget>()
                    .map(|t| t.0.clone()),
                outcome: AuditOutcome::from_status(status),
                status,
            };
            if let Err(e) = sink.record(record) {
                tracing::error!(error = %e, "could not write the audit record");
            }
            Ok(response)
        })
    }
}
