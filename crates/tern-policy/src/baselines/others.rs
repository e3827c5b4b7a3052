//! oVirt, Proxmox VE, libvirt's `--postcopy-after-precopy` and plain QEMU.

use std::collections::VecDeque;

use crate::MigrationPolicy;
use crate::limits::{QEMU_MAX_DOWNTIME_MS, UNLIMITED_BANDWIDTH};
use crate::observe::{Action, Decision, Observation, Phase, mib};
use crate::plan::{
    Capabilities, MigrationPlan, PlanInput, PostCopyVerdict, post_copy_permission,
    post_copy_verdict,
};

use super::finish_decisions;

/// vdsm's monitor period (`migration_monitor_interval` = 10 s, `lib/vdsm/common/config.py.in` L83).
const VDSM_POLL_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OvirtStep {
    SetDowntime(u64),
    Postcopy,
    Abort,
}

/// oVirt's "Post-copy migration" policy (`ovirt-engine@0111fc6:packaging/dbscripts/upgrade/
/// pre_upgrade/0000_config.sql` L837–L838): auto-converge on, initial downtime 100 ms,
/// convergence items (stallingLimit 1 → 150 ms), (2 → 200 ms), last items `postcopy`, `abort`.
/// Executed by vdsm `MonitorThread.monitor_migration` (L932) / `_next_action` (L1011): every 10 s,
/// if `memory_iteration` grew, `current = iteration − initial`; if the head item's limit is below
/// `current` it runs (one per poll; last items have limit −1, so they run on the following
/// new-iteration polls). Post-copy is a final state: nothing runs after it. The engine strips
/// `postcopy` when parallel connections (multifd) are used or the VM may not use it
/// (`MigrateVmCommand.java::filterOutPostcopy` L478), leaving 150, 200, abort.
#[derive(Debug, Clone, Default)]
pub struct OvirtPostcopyPolicy {
    schedule: Option<VecDeque<(i64, OvirtStep)>>,
    initial_iteration: Option<u64>,
    last_iteration: u64,
    next_poll_ms: u64,
    done: bool,
}

impl OvirtPostcopyPolicy {
    /// Defaults.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MigrationPolicy for OvirtPostcopyPolicy {
    fn name(&self) -> &'static str {
        "ovirt-postcopy"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        // Per-VM migration policy override: the operator picks per SLA class, so honour it.
        let verdict = post_copy_verdict(input);
        let mut plan = MigrationPlan::qemu_defaults(self.name(), input, verdict.clone());
        plan.capabilities = Capabilities {
            postcopy_ram: verdict.allowed,
            auto_converge: input.features.auto_converge,
            ..Capabilities::default()
        };
        plan.parameters.downtime_limit_ms = 100;
        // Cluster limit ÷ maxMigrations (2); with no QoS, the link speed.
        plan.parameters.max_bandwidth_bytes_per_s = input
            .host_bandwidth_cap()
            .or(input.link_bytes_per_s)
            .unwrap_or(UNLIMITED_BANDWIDTH);
        plan.deadline_ms = None;
        plan.reasons = vec![format!(
            "schedule 100 → 150 → 200 ms{}, then abort ({})",
            if verdict.allowed {
                " → post-copy"
            } else {
                ""
            },
            verdict.reason
        )];
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        let schedule = self.schedule.get_or_insert_with(|| {
            let mut s = VecDeque::from(vec![
                (1, OvirtStep::SetDowntime(150)),
                (2, OvirtStep::SetDowntime(200)),
            ]);
            if plan.capabilities.postcopy_ram {
                s.push_back((-1, OvirtStep::Postcopy));
            }
            s.push_back((-1, OvirtStep::Abort));
            s
        });
        let at = obs.at_ms();
        let Some(sample) = obs.sample() else {
            return finish_decisions(obs, out, "ovirt: no sample");
        };
        if sample.phase == Phase::Postcopy {
            self.done = true;
        }
        if self.done || at < self.next_poll_ms {
            return finish_decisions(obs, out, "ovirt: between 10 s polls or final state");
        }
        self.next_poll_ms = at + VDSM_POLL_MS;
        let initial = *self.initial_iteration.get_or_insert(sample.pass);
        if sample.pass > self.last_iteration {
            self.last_iteration = sample.pass;
            let current = (sample.pass - initial) as i64;
            if let Some(&(limit, step)) = schedule.front().filter(|(limit, _)| *limit < current) {
                schedule.pop_front();
                let why = format!(
                    "iteration {} (current {current} > stalling limit {limit})",
                    sample.pass
                );
                out.push(match step {
                    OvirtStep::SetDowntime(ms) => Decision::new(
                        Action::SetDowntimeLimit { ms },
                        format!("{why}: setDowntime {ms} ms"),
                    ),
                    OvirtStep::Postcopy => {
                        self.done = true;
                        Decision::new(Action::SwitchToPostcopy, format!("{why}: postcopy"))
                    }
                    OvirtStep::Abort => {
                        self.done = true;
                        Decision::new(Action::Abort, format!("{why}: abort (schedule exhausted)"))
                    }
                });
            }
        }
        finish_decisions(obs, out, "ovirt: no schedule step due")
    }
}

/// Proxmox VE (`qemu-server@e6352be:src/PVE/QemuMigrate.pm::phase2` L1214,
/// `increase_migrate_downtime` L1190; `QemuMigrate/Helpers.pm::set_migration_caps` L116):
/// auto-converge and xbzrle always on (cache = 10 % of RAM rounded up to a power of two), never
/// post-copy, downtime 100 ms (VM `migrate_downtime` default), bandwidth 16 GiB/s unless limited.
/// Polls every second; counts polls where remaining rose or is 0; after more than 5 it doubles the
/// downtime (capped at 2 000 000 ms) and resets the count. No timeout: a non-converging migration
/// ends in a long blackout, never an abort.
#[derive(Debug, Clone, Default)]
pub struct ProxmoxPolicy {
    downtime_ms: u64,
    counter: u32,
    last_remaining: Option<u64>,
    next_poll_ms: u64,
}

impl ProxmoxPolicy {
    /// Defaults.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MigrationPolicy for ProxmoxPolicy {
    fn name(&self) -> &'static str {
        "proxmox"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let verdict = PostCopyVerdict {
            allowed: false,
            reason: "Proxmox never enables postcopy-ram".into(),
        };
        let mut plan = MigrationPlan::qemu_defaults(self.name(), input, verdict);
        plan.capabilities = Capabilities {
            auto_converge: input.features.auto_converge,
            xbzrle: input.features.xbzrle,
            ..Capabilities::default()
        };
        plan.parameters.downtime_limit_ms = 100;
        plan.parameters.max_bandwidth_bytes_per_s =
            input.host_bandwidth_cap().unwrap_or(UNLIMITED_BANDWIDTH);
        plan.parameters.xbzrle_cache_bytes = input
            .features
            .xbzrle
            .then(|| (input.vm.ram_bytes / 10).max(1).next_power_of_two());
        plan.deadline_ms = None;
        plan.reasons = vec!["auto-converge + xbzrle, downtime 100 ms doubling after >5 non-decreasing polls, no timeout".into()];
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        if self.downtime_ms == 0 {
            self.downtime_ms = plan.parameters.downtime_limit_ms;
        }
        let at = obs.at_ms();
        let Some(s) = obs.sample() else {
            return finish_decisions(obs, out, "proxmox: no sample");
        };
        if at < self.next_poll_ms || s.phase != Phase::Precopy {
            return finish_decisions(obs, out, "proxmox: between 1 s polls");
        }
        self.next_poll_ms = at + 1000;
        let rem = s.remaining_bytes;
        if self.last_remaining.is_some_and(|l| rem > l) || rem == 0 {
            self.counter += 1;
        }
        self.last_remaining = Some(rem);
        if self.counter > 5 {
            self.counter = 0;
            let new = (self.downtime_ms * 2).min(QEMU_MAX_DOWNTIME_MS);
            if new != self.downtime_ms {
                let old = self.downtime_ms;
                self.downtime_ms = new;
                out.push(Decision::new(
                    Action::SetDowntimeLimit { ms: new },
                    format!("remaining rose or was 0 in more than 5 polls ({} now): downtime {old} → {new} ms", mib(rem as f64)),
                ));
            }
        }
        finish_decisions(obs, out, "proxmox: no downtime increase due")
    }
}

/// `virsh migrate --postcopy --postcopy-after-precopy` (`libvirt@0151db8:docs/manpages/virsh.rst`):
/// "automatically switch to post-copy after the first pass of pre-copy is finished". libvirt
/// knows no SLA, so only hard permissions gate it; without them it is a plain pre-copy.
#[derive(Debug, Clone, Default)]
pub struct LibvirtPostcopyAfterPrecopyPolicy {
    switched: bool,
}

impl LibvirtPostcopyAfterPrecopyPolicy {
    /// Defaults.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MigrationPolicy for LibvirtPostcopyAfterPrecopyPolicy {
    fn name(&self) -> &'static str {
        "libvirt-postcopy-after-precopy"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let verdict = post_copy_permission(input);
        let mut plan = MigrationPlan::qemu_defaults(self.name(), input, verdict.clone());
        plan.capabilities.postcopy_ram = verdict.allowed;
        // libvirt's default migration bandwidth is unlimited.
        plan.parameters.max_bandwidth_bytes_per_s =
            input.host_bandwidth_cap().unwrap_or(UNLIMITED_BANDWIDTH);
        plan.deadline_ms = None;
        plan.reasons = vec![format!(
            "post-copy after the first pass: {} ({})",
            verdict.allowed, verdict.reason
        )];
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        let due = match obs {
            Observation::PassCompleted(s) => {
                s.pass >= 2
                    && !self.switched
                    && plan.capabilities.postcopy_ram
                    && s.phase == Phase::Precopy
            }
            Observation::Tick { .. } => false,
        };
        if let (true, Some(s)) = (due, obs.sample()) {
            self.switched = true;
            out.push(Decision::new(
                Action::SwitchToPostcopy,
                format!(
                    "first pre-copy pass finished (dirty-sync-count {}), {} left",
                    s.pass,
                    mib(s.remaining_bytes as f64)
                ),
            ));
        }
        finish_decisions(
            obs,
            out,
            "libvirt: waiting for the first pass or already switched",
        )
    }
}

/// Plain QEMU: defaults (`downtime-limit` 300 ms, `max-bandwidth` 128 MiB/s), no capability, no
/// action. A non-converging guest iterates forever.
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuDefaultPolicy;

impl MigrationPolicy for QemuDefaultPolicy {
    fn name(&self) -> &'static str {
        "qemu-default"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let verdict = PostCopyVerdict {
            allowed: false,
            reason: "plain QEMU migration does not enable postcopy-ram".into(),
        };
        let mut plan = MigrationPlan::qemu_defaults(self.name(), input, verdict);
        plan.deadline_ms = None;
        plan.reasons = vec!["QEMU defaults: 300 ms, 128 MiB/s, no capabilities".into()];
        plan
    }

    fn decide(&mut self, _plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        finish_decisions(obs, vec![], "qemu-default: no policy")
    }
}
