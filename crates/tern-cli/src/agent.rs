//! `tern agent`: run the host agent in the foreground.

use std::path::PathBuf;

use clap::Args;
use tern_agent::config::DEFAULT_CONFIG_PATH;
use tern_agent::{Agent, AgentConfig, AgentOptions};

use crate::Failure;

/// `tern agent` options.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Configuration file (TOML).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Stop every VM when the agent exits. By default QEMUs keep running and a restarted
    /// agent re-attaches to them.
    #[arg(long)]
    stop_vms_on_exit: bool,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(a: AgentArgs) -> Result<(), Failure> {
    let config = AgentConfig::load(&a.config).map_err(Failure::input)?;
    let listen = config.listen;
    let scheme = if config.tls.is_some() {
        "https (mutual TLS)"
    } else {
        "http (LAB MODE: no authentication, loopback only)"
    };
    let agent = Agent::start(
        config,
        AgentOptions {
            stop_vms_on_exit: a.stop_vms_on_exit,
        },
    )
    .await
    .map_err(|e| match e {
        tern_agent::AgentError::Config(_) => Failure::input(e),
        other => Failure::environment(other),
    })?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        Failure::environment(anyhow::anyhow!(
            "cannot listen on {listen}: {e} (change `listen` in {})",
            a.config.display()
        ))
    })?;
    eprintln!(
        "tern agent for host {} listening on {listen}, {scheme} (pid {})",
        agent.config().host,
        std::process::id()
    );
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
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
        let _ = signalled_tx.send(());
    };
    let server = tern_agent::http::serve(agent.clone(), listener, shutdown);
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(|e| Failure::environment(anyhow::anyhow!("HTTP server: {e}")))?,
        _ = async {
            let _ = signalled_rx.await;
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        } => {
            // Long-polling or stuck clients must not keep a stopping agent alive.
            tracing::warn!("connections still open 3 s after the stop signal; exiting anyway");
        }
    }
    agent.shutdown().await;
    Ok(())
}
