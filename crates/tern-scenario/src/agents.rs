//! The agent processes of a hop driven through agents ([`crate::HopBackend::AgentProcesses`]):
//! who starts them, how they are found, and how one is killed and brought back.
//!
//! Starting an agent means running the `tern` binary's `agent` subcommand with a generated
//! configuration; only the CLI knows that binary, so it is behind [`AgentLauncher`] (the CLI's
//! `tern lab up --agents` code implements it). Everything else — the clients, the PIDs from
//! the lab's discovery file, the kill and the restart — is here, so that every fault and the
//! hop driver itself are the same whatever runs the migration.

use std::net::TcpListener;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tern_agent::AgentClient;
use tern_lab::Lab;
use tern_lab::agents::LabAgents;

use crate::ScenarioError;
use crate::faults::FaultHost;

/// Settings shared by the agents of a hop's lab (what `tern lab up --agents` is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// The agent of host hN listens on 127.0.0.1:(port_base + N).
    pub port_base: u16,
    /// Memory each host offers to guests (MiB).
    pub memory_mib: u64,
    /// Hosts whose agent is configured with `permit_post_copy = false`.
    pub deny_post_copy_hosts: Vec<String>,
}

/// Starts and stops the agent processes of a lab. Implemented by the `tern` CLI, which is
/// the agent binary.
pub trait AgentLauncher: Send + Sync {
    /// Starts every agent of `lab` that is not running, and returns once each answers on its
    /// port. Idempotent: running agents are kept, and an agent that died is started again
    /// with its configuration (it re-attaches to its QEMUs). Blocking.
    fn ensure(&self, lab: &Lab, settings: &AgentSettings) -> Result<(), String>;
    /// Stops the agents of lab `lab` by PID and removes their files (their QEMUs are left to
    /// the lab's teardown). Blocking.
    fn stop(&self, lab: &str);
}

/// How long a killed agent may take to come back and answer again before the fault records
/// an error.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// A port base whose two agent ports (base+1, base+2) are free on 127.0.0.1 right now.
///
/// Searched below Linux's ephemeral range (32768–60999 by default), where no outgoing
/// connection can be holding the port when a killed agent is started again.
pub fn free_port_base() -> Result<u16, ScenarioError> {
    (17_000u16..32_000)
        .step_by(10)
        .find(|base| (1..=2).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .ok_or_else(|| {
            ScenarioError::AgentProcess(
                "no two free TCP ports on 127.0.0.1 between 17001 and 32000 for the hop's agents"
                    .into(),
            )
        })
}

/// The running agents of a hop's two hosts. Dropping it stops them (before the lab, which
/// is declared first, goes down).
pub struct AgentFleet {
    lab: Lab,
    launcher: Arc<dyn AgentLauncher>,
    settings: AgentSettings,
    source: (String, AgentClient),
    destination: (String, AgentClient),
    migration: OnceLock<String>,
}

impl std::fmt::Debug for AgentFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentFleet")
            .field("lab", &self.lab.name())
            .field("source", &self.source.0)
            .field("destination", &self.destination.0)
            .field("migration", &self.migration.get())
            .finish()
    }
}

impl AgentFleet {
    /// Starts the agents of `lab` (hosts `source` and `destination`).
    pub async fn start(
        lab: &Lab,
        launcher: Arc<dyn AgentLauncher>,
        settings: AgentSettings,
        source: &str,
        destination: &str,
    ) -> Result<Self, ScenarioError> {
        let mut fleet = Self {
            lab: lab.clone(),
            launcher,
            settings,
            source: (source.to_string(), AgentClient::new("http://127.0.0.1:1")),
            destination: (
                destination.to_string(),
                AgentClient::new("http://127.0.0.1:1"),
            ),
            migration: OnceLock::new(),
        };
        // From here on, a failure stops whatever did start (Drop).
        fleet.ensure().await?;
        fleet.source.1 = AgentClient::new(&fleet.url(source)?);
        fleet.destination.1 = AgentClient::new(&fleet.url(destination)?);
        Ok(fleet)
    }

    /// Starts the agents that are not running (all of them at first; a killed one later).
    pub async fn ensure(&self) -> Result<(), ScenarioError> {
        let (lab, launcher, settings) = (
            self.lab.clone(),
            self.launcher.clone(),
            self.settings.clone(),
        );
        tokio::task::spawn_blocking(move || launcher.ensure(&lab, &settings))
            .await
            .map_err(|e| ScenarioError::AgentProcess(format!("agent start task failed: {e}")))?
            .map_err(ScenarioError::AgentProcess)
    }

    fn agent(&self, host: &str) -> Result<tern_lab::agents::LabAgent, ScenarioError> {
        let agents = LabAgents::load(self.lab.name())?;
        agents.agents.get(host).cloned().ok_or_else(|| {
            ScenarioError::AgentProcess(format!("lab {} has no agent for {host}", self.lab.name()))
        })
    }

    fn url(&self, host: &str) -> Result<String, ScenarioError> {
        Ok(self.agent(host)?.url)
    }

    /// The PID of `host`'s agent now (a restarted agent has a new one).
    pub fn pid(&self, host: FaultHost) -> Result<u32, ScenarioError> {
        Ok(self.agent(self.name(host))?.pid)
    }

    /// The lab host name of a side of the hop.
    pub fn name(&self, host: FaultHost) -> &str {
        match host {
            FaultHost::Source => &self.source.0,
            FaultHost::Destination => &self.destination.0,
        }
    }

    /// The API client of a side's agent.
    pub fn client(&self, host: FaultHost) -> &AgentClient {
        match host {
            FaultHost::Source => &self.source.1,
            FaultHost::Destination => &self.destination.1,
        }
    }

    /// Records the migration the hop started (faults ask the agents about it).
    pub fn set_migration(&self, id: &str) {
        let _ = self.migration.set(id.to_string());
    }

    /// The PID of `vm`'s QEMU on a side, as its agent reports it.
    pub async fn qemu_pid(&self, host: FaultHost, vm: &str) -> Result<u32, String> {
        self.client(host)
            .show_vm(vm)
            .await
            .map(|i| i.pid)
            .map_err(|e| format!("asking the {} agent for {vm}: {e}", self.name(host)))
    }

    /// SIGKILLs a side's agent and waits until the process is gone (its QEMU is untouched).
    /// Returns the PID killed.
    pub async fn kill(&self, host: FaultHost) -> Result<u32, String> {
        let pid = self.pid(host).map_err(|e| e.to_string())?;
        tern_lab::kill_process(pid, tern_lab::Signal::SIGKILL).map_err(|e| e.to_string())?;
        let t = Instant::now();
        while tern_qemu::process::pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(pid)
    }

    /// Waits until a restarted agent answers for the hop's migration (the source) or at all
    /// (the destination), up to [`RESTART_TIMEOUT`].
    pub async fn wait_answering(&self, host: FaultHost) -> Result<(), String> {
        let t = Instant::now();
        loop {
            let answered = match (host, self.migration.get()) {
                (FaultHost::Source, Some(id)) => {
                    self.source.1.show_migration(id, u64::MAX).await.is_ok()
                }
                _ => self.client(host).health().await.is_ok(),
            };
            if answered {
                return Ok(());
            }
            if t.elapsed() > RESTART_TIMEOUT {
                return Err(format!(
                    "the {} agent did not answer within {} s of its restart",
                    self.name(host),
                    RESTART_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for AgentFleet {
    fn drop(&mut self) {
        self.launcher.stop(self.lab.name());
    }
}
