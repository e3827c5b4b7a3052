//! `tern server`: run the cluster controller in the foreground.

use std::path::PathBuf;

use clap::Args;
use tern_server::{RunningServer, ServerConfig, ServerError};

use crate::Failure;

/// Where `tern server` looks for its configuration when `--config` is not given.
pub const DEFAULT_SERVER_CONFIG: &str = "/etc/tern/server.toml";

/// `tern server` options.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Configuration file (TOML, see docs/server.toml). Without it, /etc/tern/server.toml
    /// if present, else the defaults (loopback, SQLite under /var/lib/tern).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(a: ServerArgs) -> Result<(), Failure> {
    let config = match &a.config {
        Some(p) => ServerConfig::load(p).map_err(Failure::input)?,
        None if std::path::Path::new(DEFAULT_SERVER_CONFIG).exists() => {
            ServerConfig::load(std::path::Path::new(DEFAULT_SERVER_CONFIG))
                .map_err(Failure::input)?
        }
        None => ServerConfig::default(),
    };
    let token_file = config.token_file.clone();
    let server = RunningServer::start(config).await.map_err(|e| match e {
        ServerError::Tls(_) => Failure::input(e),
        ServerError::Listen { .. } | ServerError::Store(_) | ServerError::Token { .. } => {
            Failure::environment(e)
        }
    })?;
    if server.tls {
        eprintln!(
            "tern server listening on {} (pid {}); mutual TLS, clients need a certificate of the \
             installation CA; web view at {}/ (the browser presents a user certificate)",
            server.url(),
            std::process::id(),
            server.url()
        );
    } else {
        eprintln!(
            "tern server listening on {} (pid {}) in LAB MODE: no TLS, loopback only; token in {} \
             (admin; {}.operator and {}.viewer beside it); web view: {}/ui/login?token=TOKEN",
            server.url(),
            std::process::id(),
            token_file.display(),
            token_file.display(),
            token_file.display(),
            server.url()
        );
    }
    server
        .run_until(async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        })
        .await;
    Ok(())
}
