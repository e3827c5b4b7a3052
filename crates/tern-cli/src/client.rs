//! The CLI's view of the cluster, behind one interface ([`ClusterClient`]).
//!
//! Today the CLI talks to the host agents directly ([`AgentsClient`]: `--agent URL`, or the
//! agents of a lab found through its discovery file). A cluster controller will come in
//! front of the agents later; it only has to implement [`ClusterClient`].

use std::collections::BTreeMap;

use async_trait::async_trait;
use tern_agent::api::{HostFacts, MigrationView, OperatorReply, StartMigrationRequest};
use tern_agent::store::MigrationRecord;
use tern_agent::{AgentClient, ClientError, VmInfo, VmRole};
use tern_engine::OperatorCommand;
use tern_lab::agents::LabAgents;
use tern_qemu::VmSpec;

use crate::Failure;

/// Why a cluster operation failed, with the exit code it maps to.
///
/// Deliberately not a `std::error::Error`: `?` then converts it into a [`Failure`] with the
/// right exit code instead of the generic "operation failed" one.
#[derive(Debug)]
pub enum ClusterError {
    /// The request names something unknown or is invalid (exit 2).
    BadInput(String),
    /// No agent could be reached (exit 3).
    Unreachable(String),
    /// The operation was attempted and failed (exit 1).
    Failed(String),
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadInput(m) | Self::Unreachable(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

impl From<ClientError> for ClusterError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Unreachable { .. } => Self::Unreachable(e.to_string()),
            ClientError::Api { status, .. } => match status {
                400 | 404 | 409 | 422 => Self::BadInput(e.to_string()),
                503 => Self::Unreachable(e.to_string()),
                _ => Self::Failed(e.to_string()),
            },
            ClientError::InvalidAnswer { .. } => Self::Failed(e.to_string()),
        }
    }
}

impl From<ClusterError> for Failure {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::BadInput(m) => Failure::input(anyhow::anyhow!(m)),
            ClusterError::Unreachable(m) => Failure::environment(anyhow::anyhow!(m)),
            ClusterError::Failed(m) => Failure::failed(anyhow::anyhow!(m)),
        }
    }
}

/// A VM and the host it is on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlacedVm {
    /// Host name.
    pub host: String,
    /// The VM.
    #[serde(flatten)]
    pub vm: VmInfo,
}

/// Everything the CLI asks of the cluster.
#[async_trait]
pub trait ClusterClient: Send + Sync {
    /// Facts of every host.
    async fn hosts(&self) -> Result<Vec<HostFacts>, ClusterError>;
    /// Every VM, with its host (incoming halves of migrations included).
    async fn list_vms(&self, host: Option<&str>) -> Result<Vec<PlacedVm>, ClusterError>;
    /// The running guest named `name`.
    async fn find_vm(&self, name: &str) -> Result<PlacedVm, ClusterError>;
    /// Boots a VM on `host`.
    async fn create_vm(&self, host: &str, spec: &VmSpec) -> Result<PlacedVm, ClusterError>;
    /// Stops the VM named `name`; returns its host.
    async fn stop_vm(&self, name: &str) -> Result<String, ClusterError>;
    /// Starts a migration of `req.vm` (found wherever it runs) to `req.to_host`.
    async fn start_migration(
        &self,
        req: StartMigrationRequest,
    ) -> Result<MigrationRecord, ClusterError>;
    /// The policy's plan for a migration request (nothing is started).
    async fn plan_migration(
        &self,
        req: StartMigrationRequest,
        probe_s: u64,
    ) -> Result<tern_policy::MigrationPlan, ClusterError>;
    /// Every migration, newest first.
    async fn list_migrations(&self) -> Result<Vec<MigrationRecord>, ClusterError>;
    /// One migration with progress and the events after `after`.
    async fn migration(&self, id: &str, after: u64) -> Result<MigrationView, ClusterError>;
    /// An operator command on a running migration.
    async fn operator(
        &self,
        id: &str,
        command: OperatorCommand,
    ) -> Result<OperatorReply, ClusterError>;
}

/// Talks to the host agents directly.
pub struct AgentsClient {
    /// Agents by host name.
    agents: BTreeMap<String, AgentClient>,
    /// Where they came from, for error messages.
    origin: String,
}

impl AgentsClient {
    /// The agents given by `--agent URL` (host names are asked from each agent), or else
    /// those of lab `lab`.
    pub async fn connect(urls: &[String], lab: &str) -> Result<Self, ClusterError> {
        let mut agents = BTreeMap::new();
        if !urls.is_empty() {
            for u in urls {
                let c = AgentClient::new(u);
                let h = c.health().await?;
                agents.insert(h.host, c);
            }
            return Ok(Self {
                agents,
                origin: format!("--agent {}", urls.join(", ")),
            });
        }
        let lab_agents = LabAgents::load(lab)
            .map_err(|e| ClusterError::Unreachable(format!("{e} (or pass --agent URL)")))?;
        // A TLS lab: the CLI is the lab's admin user (certificate made by `tern lab up
        // --agents --tls`); the agents' CA is the lab's.
        let files = lab_agents.pki_dir.as_ref().map(|dir| {
            let mut f = tern_pki::TlsFiles::in_pki_dir(dir, "user", "lab-admin");
            f.deny_list = None;
            f
        });
        for (host, a) in lab_agents.agents {
            let client = AgentClient::for_peer(&a.url, files.as_ref())
                .map_err(|e| ClusterError::BadInput(e.to_string()))?;
            agents.insert(host, client);
        }
        Ok(Self {
            agents,
            origin: format!("lab {lab}"),
        })
    }

    fn hosts_list(&self) -> String {
        self.agents.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Every agent, by host name.
    pub fn agents(&self) -> impl Iterator<Item = (&String, &AgentClient)> {
        self.agents.iter()
    }

    /// The agent of `host`.
    pub fn agent(&self, host: &str) -> Result<&AgentClient, ClusterError> {
        self.agents.get(host).ok_or_else(|| {
            ClusterError::BadInput(format!(
                "unknown host {host:?}: hosts of {} are {}",
                self.origin,
                self.hosts_list()
            ))
        })
    }

    async fn migration_agent(
        &self,
        id: &str,
        after: u64,
    ) -> Result<(&AgentClient, MigrationView), ClusterError> {
        let mut unreachable = None;
        for c in self.agents.values() {
            match c.show_migration(id, after).await {
                Ok(v) => return Ok((c, v)),
                Err(e @ ClientError::Unreachable { .. }) => unreachable = Some(e),
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(match unreachable {
            Some(e) => ClusterError::Unreachable(format!(
                "migration {id:?} not found on the reachable agents, and {e}"
            )),
            None => ClusterError::BadInput(format!(
                "no migration {id:?} on any host of {} (list them with `tern migration list`)",
                self.origin
            )),
        })
    }
}

#[async_trait]
impl ClusterClient for AgentsClient {
    async fn hosts(&self) -> Result<Vec<HostFacts>, ClusterError> {
        let mut out = Vec::new();
        for c in self.agents.values() {
            out.push(c.host().await?);
        }
        Ok(out)
    }

    async fn list_vms(&self, host: Option<&str>) -> Result<Vec<PlacedVm>, ClusterError> {
        let mut out = Vec::new();
        for (h, c) in &self.agents {
            if host.is_some_and(|x| x != h) {
                continue;
            }
            for vm in c.list_vms().await? {
                out.push(PlacedVm {
                    host: h.clone(),
                    vm,
                });
            }
        }
        if let Some(h) = host {
            self.agent(h)?;
        }
        Ok(out)
    }

    async fn find_vm(&self, name: &str) -> Result<PlacedVm, ClusterError> {
        let all = self.list_vms(None).await?;
        let known: Vec<String> = all.iter().map(|p| p.vm.spec.name.clone()).collect();
        all.into_iter()
            .find(|p| p.vm.spec.name == name && p.vm.role == VmRole::Running)
            .ok_or_else(|| {
                ClusterError::BadInput(format!(
                    "unknown VM {name:?}: VMs on the hosts of {} are {}",
                    self.origin,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })
    }

    async fn create_vm(&self, host: &str, spec: &VmSpec) -> Result<PlacedVm, ClusterError> {
        let agent = self.agent(host)?;
        if let Ok(existing) = self.find_vm(&spec.name).await {
            return Err(ClusterError::BadInput(format!(
                "a VM named {:?} already runs on host {}: choose another name",
                spec.name, existing.host
            )));
        }
        let vm = agent.create_vm(spec).await?;
        Ok(PlacedVm {
            host: host.to_string(),
            vm,
        })
    }

    async fn stop_vm(&self, name: &str) -> Result<String, ClusterError> {
        let p = self.find_vm(name).await?;
        self.agent(&p.host)?.stop_vm(name).await?;
        Ok(p.host)
    }

    async fn start_migration(
        &self,
        req: StartMigrationRequest,
    ) -> Result<MigrationRecord, ClusterError> {
        let src = self.find_vm(&req.vm).await?;
        if req.to_host == src.host {
            return Err(ClusterError::BadInput(format!(
                "VM {:?} already runs on host {}: choose a different destination (hosts: {})",
                req.vm,
                src.host,
                self.hosts_list()
            )));
        }
        // The destination must be known here too; the source agent finds it in its own
        // configured peers (requests never carry an agent URL).
        self.agent(&req.to_host)?;
        Ok(self.agent(&src.host)?.start_migration(&req).await?)
    }

    async fn plan_migration(
        &self,
        req: StartMigrationRequest,
        probe_s: u64,
    ) -> Result<tern_policy::MigrationPlan, ClusterError> {
        let src = self.find_vm(&req.vm).await?;
        if req.to_host == src.host {
            return Err(ClusterError::BadInput(format!(
                "VM {:?} already runs on host {}: choose a different destination (hosts: {})",
                req.vm,
                src.host,
                self.hosts_list()
            )));
        }
        self.agent(&req.to_host)?;
        Ok(self
            .agent(&src.host)?
            .plan_migration(&tern_agent::api::PlanRequest::new(req, probe_s))
            .await?)
    }

    async fn list_migrations(&self) -> Result<Vec<MigrationRecord>, ClusterError> {
        let mut out = Vec::new();
        for c in self.agents.values() {
            out.extend(c.list_migrations().await?);
        }
        out.sort_by_key(|m| std::cmp::Reverse(m.created_ms));
        Ok(out)
    }

    async fn migration(&self, id: &str, after: u64) -> Result<MigrationView, ClusterError> {
        Ok(self.migration_agent(id, after).await?.1)
    }

    async fn operator(
        &self,
        id: &str,
        command: OperatorCommand,
    ) -> Result<OperatorReply, ClusterError> {
        let (c, _) = self.migration_agent(id, u64::MAX >> 1).await?;
        Ok(c.operator(id, command).await?)
    }
}
