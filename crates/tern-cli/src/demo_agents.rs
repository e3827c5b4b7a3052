//! The CLI's half of a hop through agent processes: starting and stopping `tern agent`
//! processes, which only this binary can do. The hop itself (booting the guest through the
//! agents, following the migration, every fault, the judgement) is
//! [`tern_scenario::HopBackend::AgentProcesses`]; this file is the launcher it is given —
//! the same code as `tern lab up --agents` and `tern lab down`.

use std::sync::Arc;

use tern_lab::Lab;
use tern_scenario::HopBackend;
use tern_scenario::agents::{AgentLauncher, AgentSettings};

use crate::lab_agents::{LabAgentSettings, ensure_agents, stop_agents};

/// Starts lab agents as `tern lab up --agents` does.
struct CliAgentLauncher;

impl AgentLauncher for CliAgentLauncher {
    fn ensure(&self, lab: &Lab, settings: &AgentSettings) -> Result<(), String> {
        let settings = LabAgentSettings {
            port_base: settings.port_base,
            memory_mib: settings.memory_mib,
            deny_post_copy_hosts: settings.deny_post_copy_hosts.clone(),
            // The demo's agents talk plain loopback HTTP (`--tls` with an agent fault is
            // refused in demo.rs).
            tls: false,
        };
        ensure_agents(lab, settings)
            .map(|_| ())
            .map_err(|e| format!("{:#}", e.error))
    }

    fn stop(&self, lab: &str) {
        stop_agents(lab);
    }
}

/// The backend that runs a demo's hop through one agent process per lab host.
pub fn backend() -> HopBackend {
    HopBackend::AgentProcesses(Arc::new(CliAgentLauncher))
}
