//! Fencing of controller commands (issue 12): the agent refuses a command whose fencing epoch
//! is older than the newest it has seen, so a deposed controller leader cannot act.
//!
//! Several controllers share one PostgreSQL; one holds the leader lease, whose epoch grows by
//! one at every change of leader. The leader sends its epoch with every mutating call in the
//! [`FENCING_HEADER`] header. The agent keeps the newest epoch it has accepted in a file of
//! its runtime directory (0600, written atomically before the command runs, so a restarted
//! agent still refuses the old leader) and answers 409 to an older one. This is the classic
//! fencing token of Chubby/ZooKeeper-style leases: a lease alone cannot stop a leader that
//! was paused or cut off and does not know it lost; the resource must check.
//!
//! A request without the header is not fenced: operators (`tern migrate`, lab tools) call
//! agents directly, and a single controller on SQLite sends none. The check runs on every
//! method but `GET`/`HEAD` (reads change nothing).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::http::ApiError;

/// The header carrying the controller leader's lease epoch.
pub const FENCING_HEADER: &str = "x-tern-fencing-epoch";

/// What the agent does with a presented epoch, given the newest it has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencingVerdict {
    /// The epoch is the newest seen: run the command.
    Accept,
    /// A newer leader: record its epoch, then run the command.
    AcceptNewer,
    /// An older leader: refuse.
    Refuse {
        /// The newest epoch seen.
        newest: u64,
    },
}

/// The pure rule: older than the newest seen is refused, newer is recorded.
pub fn verdict(newest_seen: u64, presented: u64) -> FencingVerdict {
    match presented.cmp(&newest_seen) {
        std::cmp::Ordering::Less => FencingVerdict::Refuse {
            newest: newest_seen,
        },
        std::cmp::Ordering::Equal => FencingVerdict::Accept,
        std::cmp::Ordering::Greater => FencingVerdict::AcceptNewer,
    }
}

/// Why a fenced request was refused or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum FencingError {
    /// The epoch is older than the newest seen.
    #[error(
        "fencing epoch {presented} is older than epoch {newest} of the current controller \
         leader: this controller lost its leadership, command refused"
    )]
    Stale {
        /// The request's epoch.
        presented: u64,
        /// The newest seen.
        newest: u64,
    },
    /// The header is not a number.
    #[error("{FENCING_HEADER}: {0:?} is not an epoch: give a whole number")]
    Malformed(String),
    /// The epoch file cannot be read or written.
    #[error("fencing epoch file {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
}

/// The newest epoch seen, persisted in one file.
#[derive(Debug)]
pub struct FencingLedger {
    path: PathBuf,
    newest: Mutex<u64>,
}

impl FencingLedger {
    /// Opens (or starts) the ledger at `path` (a file in the agent's 0700 runtime directory).
    pub fn open(path: &Path) -> Result<Arc<Self>, FencingError> {
        let io = |message: String| FencingError::Io {
            path: path.display().to_string(),
            message,
        };
        let newest = match std::fs::read_to_string(path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| io(format!("holds {:?}, not an epoch", text.trim())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(e.to_string())),
        };
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            newest: Mutex::new(newest),
        }))
    }

    /// The newest epoch seen (0: none).
    pub fn newest(&self) -> u64 {
        *self.newest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `presented`; a newer epoch is written to the file before this returns.
    pub fn check(&self, presented: u64) -> Result<(), FencingError> {
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        match verdict(*newest, presented) {
            FencingVerdict::Accept => Ok(()),
            FencingVerdict::Refuse { newest } => Err(FencingError::Stale { presented, newest }),
            FencingVerdict::AcceptNewer => {
                self.persist(presented)?;
                tracing::info!(
                    epoch = presented,
                    previous = *newest,
                    "new controller leader"
                );
                *newest = presented;
                Ok(())
            }
        }
    }

    fn persist(&self, epoch: u64) -> Result<(), FencingError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |message: String| FencingError::Io {
            path: self.path.display().to_string(),
            message,
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(format!("writing {}: {e}", tmp.display())))?;
        writeln!(f, "{epoch}").map_err(|e| io(e.to_string()))?;
        f.sync_all().map_err(|e| io(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io(e.to_string()))
    }
}

/// The router layer: checks [`FENCING_HEADER`] on every non-read request (409 when stale,
/// 400 when malformed, 500 when the epoch cannot be recorded).
pub async fn enforce(
    State(ledger): State<Arc<FencingLedger>>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    let Some(value) = request.headers().get(FENCING_HEADER) else {
        return next.run(request).await;
    };
    let text = String::from_utf8_lossy(value.as_bytes()).to_string();
    let result = text
        .trim()
        .parse::<u64>()
        .map_err(|_| FencingError::Malformed(text.clone()))
        .and_then(|epoch| ledger.check(epoch));
    let status = match &result {
        Ok(()) => return next.run(request).await,
        Err(FencingError::Stale { .. }) => StatusCode::CONFLICT,
        Err(FencingError::Malformed(_)) => StatusCode::BAD_REQUEST,
        Err(FencingError::Io { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    tracing::warn!(path = %request.uri().path(), %message, "fenced request refused");
    ApiError { status, message }.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::post;
    use tower::ServiceExt;

    #[test]
    fn older_epochs_are_refused_newer_recorded() {
        assert_eq!(verdict(0, 1), FencingVerdict::AcceptNewer);
        assert_eq!(verdict(3, 3), FencingVerdict::Accept);
        assert_eq!(verdict(3, 2), FencingVerdict::Refuse { newest: 3 });
        for newest in 0..20u64 {
            for presented in 0..20u64 {
                let v = verdict(newest, presented);
                assert_eq!(
                    matches!(v, FencingVerdict::Refuse { .. }),
                    presented < newest
                );
            }
        }
    }

    #[test]
    fn the_newest_epoch_survives_a_restart_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fencing-epoch");
        let ledger = FencingLedger::open(&path).unwrap();
        assert_eq!(ledger.newest(), 0);
        ledger.check(4).unwrap();
        ledger.check(4).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = FencingLedger::open(&path).unwrap();
        assert_eq!(again.newest(), 4);
        let e = again.check(3).unwrap_err().to_string();
        assert!(e.contains("epoch 3 is older than epoch 4"), "{e}");
        std::fs::write(&path, "garbage").unwrap();
        let e = FencingLedger::open(&path).unwrap_err().to_string();
        assert!(e.contains("garbage"), "{e}");
    }

    #[tokio::test]
    async fn the_layer_refuses_an_old_leader_with_409_and_lets_reads_through() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = FencingLedger::open(&dir.path().join("epoch")).unwrap();
        let app = Router::new()
            .route(
                "/v1/migrations",
                post(|| async { "started" }).get(|| async { "list" }),
            )
            .layer(axum::middleware::from_fn_with_state(
                ledger.clone(),
                enforce,
            ));
        let call = |method: &str, epoch: Option<&str>| {
            let mut b = Request::builder().method(method).uri("/v1/migrations");
            if let Some(e) = epoch {
                b = b.header(FENCING_HEADER, e);
            }
            app.clone().oneshot(b.body(Body::empty()).unwrap())
        };
        assert_eq!(call("POST", Some("7")).await.unwrap().status(), 200);
        let refused = call("POST", Some("6")).await.unwrap();
        assert_eq!(refused.status(), 409);
        let body = axum::body::to_bytes(refused.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("epoch 6 is older than epoch 7"), "{body}");
        assert_eq!(call("GET", Some("6")).await.unwrap().status(), 200);
        assert_eq!(call("POST", None).await.unwrap().status(), 200);
        assert_eq!(call("POST", Some("x")).await.unwrap().status(), 400);
        assert_eq!(call("POST", Some("8")).await.unwrap().status(), 200);
        assert_eq!(ledger.newest(), 8);
    }
}
