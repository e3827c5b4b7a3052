//! Starting the controller: open the store, set up mutual TLS (or, on loopback only, the
//! bearer token of the lab mode), start the runner and serve the API.

use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::agent_client::{AgentApi, HttpAgents};
use crate::api::{ApiAuth, AppState, LabTokens, router};
use crate::config::ServerConfig;
use crate::controller::Controller;
use crate::events::EventBus;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::runner::Runner;
use crate::store::{ControllerStore, SqlStore, StoreError};

/// Errors starting the controller.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token file cannot be read or created, or is readable by others.
    #[error("token file {path}: {message}")]
    Token {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// `[tls]` is missing and the listen address is not loopback, or the TLS files are bad.
    #[error("{0}")]
    Tls(String),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Reads the bearer token at `path`, creating a random one (0600, directory 0700) at first
/// start. A token file others can read is refused.
pub fn load_or_create_token(path: &Path) -> Result<String, ServerError> {
    let err = |message: String| ServerError::Token {
        path: path.display().to_string(),
        message,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("creating its directory: {e}")))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err(format!("making its directory 0700: {e}")))?;
        }
    }
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(err(format!(
                    "mode {:o} lets others read it: chmod 600 it",
                    meta.permissions().mode() & 0o777
                )));
            }
            let t = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                return Err(err(
                    "holds no token (at least 16 characters expected)".into()
                ));
            }
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 32] = rand::random();
            let token = hex::encode(bytes);
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(format!("creating it: {e}")))?;
            writeln!(f, "{token}").map_err(|e| err(format!("writing it: {e}")))?;
            Ok(token)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The lab mode's tokens: the admin one at `path`, the viewer and operator ones beside it
/// (`path.viewer`, `path.operator`), each created at first start like it.
pub fn load_or_create_lab_tokens(path: &Path) -> Result<LabTokens, ServerError> {
    let beside = |role: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{role}"));
        std::path::PathBuf::from(p)
    };
    Ok(LabTokens {
        admin: load_or_create_token(path)?,
        viewer: load_or_create_token(&beside("viewer"))?,
        operator: load_or_create_token(&beside("operator"))?,
    })
}

/// A running controller: the API on a bound address and the runner.
pub struct RunningServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The (admin) bearer token in the loopback lab mode; `None` with mutual TLS.
    pub token: Option<String>,
    /// Every lab-mode token (admin, operator, viewer); `None` with mutual TLS.
    pub lab_tokens: Option<LabTokens>,
    /// Whether the API is served with mutual TLS (`https://`).
    pub tls: bool,
    /// The controller.
    pub controller: Controller,
    server: tokio::task::JoinHandle<()>,
    runner: tokio::task::JoinHandle<()>,
    lease: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    store: SqlStore,
    lease_store: Option<SqlStore>,
}

impl RunningServer {
    /// Opens the configured store and starts serving (agents reached over HTTP).
    /// With a PostgreSQL database the agent calls carry the leader's fencing epoch.
    pub async fn start(config: ServerConfig) -> Result<Self, ServerError> {
        // Check the agent client's TLS files before anything starts (a missing
        // `[tls] agent_client_user` with https agents is refused here, with the fix).
        let client = match &config.tls {
            Some(t) => t.agent_client_files().map_err(ServerError::Tls)?,
            None => None,
        };
        HttpAgents::with_tls(config.agents.clone(), client.as_ref()).map_err(ServerError::Tls)?;
        Self::start_inner(config, None).await
    }

    /// Same, with the given agent client (not fenced: tests and simulations).
    pub async fn start_with_agents(
        config: ServerConfig,
        agents: Arc<dyn AgentApi>,
    ) -> Result<Self, ServerError> {
        Self::start_inner(config, Some(agents)).await
    }

    async fn start_inner(
        config: ServerConfig,
        agents: Option<Arc<dyn AgentApi>>,
    ) -> Result<Self, ServerError> {
        let tls = match &config.tls {
            Some(section) => {
                let files = section.files().map_err(ServerError::Tls)?;
                let tls = tern_pki::server_config(&files)
                    .map_err(|e| ServerError::Tls(format!("[tls] of server.toml: {e}")))?;
                Some(tls)
            }
            None if config.listen.ip().is_loopback() => None,
            None => {
                return Err(ServerError::Tls(format!(
                    "refusing to listen on {} without TLS: a non-loopback address needs a [tls] \
                     section in server.toml (pki_dir of `tern pki`, or cert, key and ca); \
                     without [tls] only a loopback address (127.0.0.1, ::1) is allowed, for labs",
                    config.listen
                )));
            }
        };
        let store = if config.database.contains("://") {
            SqlStore::connect(&config.database).await?
        } else {
            SqlStore::open_sqlite(Path::new(&config.database)).await?
        };
        let lab_tokens = match tls {
            Some(_) => None,
            None => Some(load_or_create_lab_tokens(&config.token_file)?),
        };
        let token = lab_tokens.as_ref().map(|t| t.admin.clone());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let tick = Duration::from_millis(config.runner_tick_ms);
        // Issue 12: on PostgreSQL several controllers elect one leader; on SQLite this one is.
        let holder = config.lease_holder(addr);
        let leadership = if config.is_shared_database() {
            Leadership::elected(holder, config.ha.settings())
        } else {
            Leadership::single(holder)
        };
        let agents = match agents {
            Some(a) => a,
            None => {
                let client = match &config.tls {
                    Some(t) => t.agent_client_files().map_err(ServerError::Tls)?,
                    None => None,
                };
                Arc::new(
                    HttpAgents::with_tls(config.agents.clone(), client.as_ref())
                        .map_err(ServerError::Tls)?
                        .with_fencing(leadership.clone()),
                )
            }
        };
        let shared_store = Arc::new(store.clone()) as Arc<dyn ControllerStore>;
        // The lease gets its own connection: under a flood of heartbeats the API's pool is
        // saturated, and a renewal queued behind it would depose a healthy leader.
        let lease_store = if config.is_shared_database() {
            Some(SqlStore::connect_with(&config.database, 1).await?)
        } else {
            None
        };
        let lease_handle: Arc<dyn ControllerStore> = match &lease_store {
            Some(s) => Arc::new(s.clone()),
            None => shared_store.clone(),
        };
        leadership.attempt(lease_handle.as_ref()).await;
        let lease = tokio::spawn(leadership.clone().run(lease_handle));
        let controller = Controller {
            store: shared_store,
            leadership,
            agents,
            config: Arc::new(config),
            metrics: Arc::new(Metrics::new()),
            events: EventBus::new(),
            work: Arc::default(),
            progress: Default::default(),
            forwarded: Default::default(),
        };
        let app = router(AppState {
            ctl: controller.clone(),
            auth: match &lab_tokens {
                Some(t) => ApiAuth::Token(Arc::new(t.clone())),
                None => ApiAuth::Mtls,
            },
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let with_tls = tls.is_some();
        let server = tokio::spawn(async move {
            let stopped = async {
                let _ = stop_rx.await;
            };
            let r = match tls {
                Some(tls) => tern_pki::serve_mtls_until(listener, app, tls, stopped).await,
                None => {
                    let svc = app.into_make_service_with_connect_info::<SocketAddr>();
                    axum::serve(listener, svc)
                        .with_graceful_shutdown(stopped)
                        .await
                }
            };
            if let Err(e) = r {
                tracing::error!("controller API: {e}");
            }
        });
        let runner = tokio::spawn(Runner::new(controller.clone()).run(tick));
        if with_tls {
            tracing::info!("tern server listening on https://{addr} (mutual TLS, roles)");
        } else {
            tracing::warn!(
                "tern server in LAB MODE on http://{addr}: no TLS, bearer tokens per role (the \
                 token_file: admin; .operator and .viewer beside it), loopback only; web view: \
                 http://{addr}/ui/login?token=TOKEN; configure [tls] in server.toml for real hosts"
            );
        }
        Ok(Self {
            addr,
            token,
            lab_tokens,
            tls: with_tls,
            controller,
            server,
            runner,
            lease,
            stop: Some(stop_tx),
            store,
            lease_store,
        })
    }

    /// Rows per table of the store (for sizing reports such as `tern fleet-sim`).
    pub async fn row_counts(&self) -> Result<std::collections::BTreeMap<String, i64>, StoreError> {
        self.store.row_counts().await
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Serves until `signal` resolves, then stops.
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) {
        tokio::select! {
            _ = signal => {}
            _ = &mut self.server => {}
        }
        self.stop().await;
    }

    /// Stops the runner and the API (open event streams are cut after 2 s), and closes the
    /// store.
    pub async fn stop(mut self) {
        self.runner.abort();
        let _ = (&mut self.runner).await;
        self.lease.abort();
        let _ = (&mut self.lease).await;
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(2), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
            let _ = (&mut self.server).await;
        }
        self.store.close().await;
        if let Some(s) = &self.lease_store {
            s.close().await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.runner.abort();
        self.lease.abort();
        self.server.abort();
    }
}
