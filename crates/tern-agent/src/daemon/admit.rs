//! The source side's admission of a migration request: the destination comes from the
//! configured peers (never from the request), its facts from its agent, and every check from
//! the one admission path ([`crate::admission::admit`]).

use tern_policy::PlanInput;
use tern_qemu::VmSpec;

use super::Agent;
use crate::admission::{self, HostSide, SourceVm};
use crate::api::{HostFacts, StartMigrationRequest};
use crate::config::PeerConfig;
use crate::migration::MigrationOrder;
use crate::remote::{AgentClient, ClientError};
use crate::{AgentError, bounds};

/// A migration request that passed every check.
pub(super) struct Admitted {
    pub(super) spec: VmSpec,
    pub(super) url: String,
    pub(super) dest: AgentClient,
    pub(super) facts: HostFacts,
    pub(super) order: MigrationOrder,
    pub(super) input: PlanInput,
}

impl Agent {
    /// The configured peer called `host`, or a refusal listing the configured ones.
    fn resolve_peer(&self, host: &str) -> Result<&PeerConfig, AgentError> {
        let peers = &self.inner.config.peers;
        peers.get(host).ok_or_else(|| {
            let known: Vec<&str> = peers
                .keys()
                .map(String::as_str)
                .filter(|h| *h != self.inner.config.host)
                .collect();
            AgentError::NotFound(format!(
                "unknown destination host {host:?}: this agent migrates only to its configured \
                 peers ({})",
                if known.is_empty() {
                    "none: add [peers] to the agent configuration".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    /// Every check of a migration request, without changing anything.
    pub(super) async fn admit(&self, req: &StartMigrationRequest) -> Result<Admitted, AgentError> {
        let h = &self.inner.host;
        let me = &self.inner.config.host;
        // Numbers first: a bad value is refused before any other host is contacted.
        if let Some(s) = req.deadline_s {
            bounds::check_deadline_s(s)?;
        }
        if let Some(r) = req.link_bytes_per_s {
            bounds::check_bandwidth("link rate", r)?;
        }
        if req.to_host == *me {
            return Err(AgentError::Invalid(format!(
                "VM {:?} already runs on host {me}: choose a different destination host",
                req.vm
            )));
        }
        let peer = self.resolve_peer(&req.to_host)?;
        let spec = h.spec(&req.vm)?;
        let role = h.role(&req.vm)?;
        let url = peer.url().to_string();
        let dest = self.peer_client(&url)?;
        let facts = dest.host().await.map_err(|e| match e {
            ClientError::Unreachable { .. } => {
                AgentError::Unavailable(format!("destination host {}: {e}", req.to_host))
            }
            other => super::client_err(other),
        })?;
        if facts.host != req.to_host {
            return Err(AgentError::Config(format!(
                "peer {} = {url} is the agent of host {:?}: fix [peers] in the agent configuration",
                req.to_host, facts.host
            )));
        }
        let order = MigrationOrder {
            vm: req.vm.clone(),
            context: req.context,
            policy: req.policy,
            link_bytes_per_s: req.link_bytes_per_s.or(peer.link_bytes_per_s()),
            deadline_ms: req.deadline_s.map(|s| s * 1000),
            probe_seconds: 0,
        };
        let migrating = self.migration_of(&req.vm);
        let source = HostSide {
            name: me,
            memory_mib: self.inner.config.memory_mib,
            free_memory_mib: h.free_memory_mib(),
            migration: &self.inner.config.migration,
            has_vm_named: true,
            userfaultfd: tern_qemu::userfaultfd_available(),
        };
        let destination = HostSide {
            name: &facts.host,
            memory_mib: facts.memory_mib,
            free_memory_mib: facts.free_memory_mib,
            migration: &facts.migration,
            // The destination agent refuses a duplicate name itself when asked for the
            // incoming QEMU; its facts do not list VM names.
            has_vm_named: false,
            userfaultfd: tern_qemu::userfaultfd_available(),
        };
        let vm = SourceVm {
            spec: &spec,
            role,
            migrating: migrating.as_deref(),
        };
        let input = admission::admit(&order, vm, source, destination, &self.inner.catalog)?;
        Ok(Admitted {
            spec,
            url,
            dest,
            facts,
            order,
            input,
        })
    }

    /// The plan the policy would make for this request, with its pre-flight estimate
    /// (`POST /v1/migrations/plan`, `tern migrate --dry-run`). Features are taken from the
    /// capabilities both QEMUs list; the guest's dirty rate is measured with `calc-dirty-rate`
    /// for `probe_s` seconds when asked. Nothing is started.
    pub async fn plan_migration(
        &self,
        req: StartMigrationRequest,
        probe_s: u64,
    ) -> Result<tern_policy::MigrationPlan, AgentError> {
        let a = self.admit(&req).await?;
        let policy = a.order.policy.build();
        let qmp = self.inner.host.qmp(&req.vm)?;
        // The same function as the real run (`tern_engine::features`): the source QEMU
        // itself (capabilities, commands, the `dirty-limit` probe), and for the destination,
        // which has no QEMU yet, what its agent reports of its QEMU binary.
        let destination = tern_engine::features::facts_from_names(
            a.facts.migration_capabilities.iter().map(|c| c.as_str()),
            a.facts.qemu_commands.iter().map(String::as_str),
            tern_engine::features::parse_version(&a.facts.qemu_version),
        );
        let tern_engine::QemuPlanInput {
            mut input,
            refusals,
            ..
        } = tern_engine::plan_input_from_qemus(&qmp, destination, a.input)
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        if probe_s > 0 {
            let p = tern_engine::probe_dirty_rate(&qmp, probe_s.min(10))
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            input.probe = Some(p);
        }
        let mut plan = policy.plan(&input);
        plan.reasons.extend(refusals);
        Ok(plan)
    }
}
