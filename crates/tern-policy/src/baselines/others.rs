//! oVirt, Proxmox VE, libvirt's `--postcopy-after-precopy` and plain QEMU.

use std::collections::VecDeque;

use crate::MigrationPolicy;
use crate::limits::{QEMU_MAX_DOWNTIME_MS, UNLIMITED_BANDWIDTH};
use crate::observe::{Action, Decision, Observation, Phase, mbit, mib};
use crate::plan::{
    Capabilities, MigrationPlan, PlanInput, PostCopyVerdict, post_copy_permission,
    post_copy_verdict,
};

use super::finish_decisions;

/// vdsm's monitor period (`migration_monitor_interval` = 10 s, `lib/vdsm/common/config.py.in`
/// L83). `monitor_migration` waits one period *before* its first poll (`migration.py` L939).
const VDSM_POLL_MS: u64 = 10_000;
/// vdsm's `migration_max_bandwidth` default, 52 MiB/s (`config.py.in` L76): used by "Hypervisor
/// default" when the engine passes no limit (here: the link rate is unknown).
const VDSM_DEFAULT_BANDWIDTH: u64 = 52 << 20;
/// `maxMigrations` of both policies modelled ("Minimal downtime" and "Post-copy migration").
const OVIRT_MAX_MIGRATIONS: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OvirtStep {
    SetDowntime(u64),
    Postcopy,
    Abort,
}

/// Which shipped oVirt migration policy (`ovirt-engine@0111fc6:packaging/dbscripts/upgrade/
/// pre_upgrade/0000_config.sql` L837–L838).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OvirtPolicyKind {
    /// "Post-copy migration" (a7aeedb2-…): initial 100 ms, (1 → 150 ms), (2 → 200 ms), then
    /// `postcopy`, `abort`. For a VM that may not use post-copy the operator picks
    /// [`OvirtPolicyKind::MinimalDowntime`], and so does this policy.
    Postcopy,
    /// "Minimal downtime" (80554327-…827b): initial 100 ms, (1 → 150), (2 → 200), (3 → 300),
    /// (4 → 400), (6 → 500 ms), then `abort`.
    MinimalDowntime,
}

impl OvirtPolicyKind {
    fn schedule(self, postcopy: bool) -> VecDeque<(i64, OvirtStep)> {
        let mut s: VecDeque<(i64, OvirtStep)> = match (self, postcopy) {
            (OvirtPolicyKind::Postcopy, true) => vec![
                (1, OvirtStep::SetDowntime(150)),
                (2, OvirtStep::SetDowntime(200)),
                (-1, OvirtStep::Postcopy),
            ],
            _ => vec![
                (1, OvirtStep::SetDowntime(150)),
                (2, OvirtStep::SetDowntime(200)),
                (3, OvirtStep::SetDowntime(300)),
                (4, OvirtStep::SetDowntime(400)),
                (6, OvirtStep::SetDowntime(500)),
            ],
        }
        .into();
        s.push_back((-1, OvirtStep::Abort));
        s
    }
}

/// oVirt (engine + vdsm) running one of its shipped migration policies:
/// * **engine** (`MigrateVmCommand.java::createMigrateVDSCommandParameters` L399): auto-converge
///   on (`autoConvergence: true` in every shipped policy), no compression, no parallel
///   connections; `maxBandwidth = cluster limit / policy.maxMigrations` (L518) with the cluster
///   limit "auto" = the link speed (L502), so each migration gets half the link (both policies
///   have `maxMigrations` 2); `postcopy` only when the schedule contains it
///   (`vdsm migration.py::_calculate_migration_flags` L725);
/// * **vdsm** `MonitorThread.monitor_migration` (L932): sleeps 10 s, then polls; the first poll's
///   `memory_iteration` is `initial_iteration` (L956–L960); on each poll where the iteration grew
///   and post-copy was not started (L992–L999), `_next_action(current = iteration − initial)`
///   (L1011) runs the head item if `limit < current` (L1021) and pops it: at most one step per
///   poll. Last items have limit −1, so they run on the next new-iteration polls. Post-copy is a
///   final state: nothing runs after it (L964).
///
/// `ovirt-postcopy` uses the Post-copy policy when the post-copy verdict allows it (SLA, hosts,
/// VM, QEMU) and Minimal downtime otherwise; `ovirt-minimal-downtime` always uses Minimal downtime.
#[derive(Debug, Clone)]
pub struct OvirtPolicy {
    kind: OvirtPolicyKind,
    schedule: Option<VecDeque<(i64, OvirtStep)>>,
    initial_iteration: Option<u64>,
    last_iteration: u64,
    next_poll_ms: u64,
    done: bool,
}

impl OvirtPolicy {
    /// A fresh policy of `kind`.
    pub fn new(kind: OvirtPolicyKind) -> Self {
        OvirtPolicy {
            kind,
            schedule: None,
            initial_iteration: None,
            last_iteration: 0,
            next_poll_ms: VDSM_POLL_MS,
            done: false,
        }
    }

    /// The "Post-copy migration" policy (Minimal downtime where post-copy is not allowed).
    pub fn postcopy() -> Self {
        Self::new(OvirtPolicyKind::Postcopy)
    }

    /// The "Minimal downtime" policy.
    pub fn minimal_downtime() -> Self {
        Self::new(OvirtPolicyKind::MinimalDowntime)
    }
}

impl MigrationPolicy for OvirtPolicy {
    fn name(&self) -> &'static str {
        match self.kind {
            OvirtPolicyKind::Postcopy => "ovirt-postcopy",
            OvirtPolicyKind::MinimalDowntime => "ovirt-minimal-downtime",
        }
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        // Per-VM migration policy override: the operator picks per SLA class, so honour it.
        let verdict = match self.kind {
            OvirtPolicyKind::Postcopy => post_copy_verdict(input),
            OvirtPolicyKind::MinimalDowntime => PostCopyVerdict {
                allowed: false,
                reason: "the Minimal downtime policy has no postcopy step".into(),
            },
        };
        let mut plan = MigrationPlan::qemu_defaults(self.name(), input, verdict.clone());
        plan.capabilities = Capabilities {
            postcopy_ram: verdict.allowed,
            auto_converge: input.features.auto_converge,
            ..Capabilities::default()
        };
        plan.parameters.downtime_limit_ms = 100;
        let cluster_limit = input.host_bandwidth_cap().or(input.link_bytes_per_s);
        plan.parameters.max_bandwidth_bytes_per_s = cluster_limit
            .map_or(VDSM_DEFAULT_BANDWIDTH, |l| {
                (l / OVIRT_MAX_MIGRATIONS).max(1)
            });
        plan.deadline_ms = None;
        let steps: Vec<String> = self
            .kind
            .schedule(verdict.allowed)
            .iter()
            .map(|(limit, step)| match step {
                OvirtStep::SetDowntime(ms) => format!("{limit}→{ms} ms"),
                OvirtStep::Postcopy => "postcopy".into(),
                OvirtStep::Abort => "abort".into(),
            })
            .collect();
        plan.reasons = vec![
            format!(
                "schedule: initial 100 ms, {} ({})",
                steps.join(", "),
                verdict.reason
            ),
            format!(
                "bandwidth {} = cluster limit ÷ maxMigrations {OVIRT_MAX_MIGRATIONS}; first vdsm poll at 10 s",
                mbit(plan.parameters.max_bandwidth_bytes_per_s as f64)
            ),
        ];
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        let kind = self.kind;
        let schedule = self
            .schedule
            .get_or_insert_with(|| kind.schedule(plan.capabilities.postcopy_ram));
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
        let initial = *self.initial_iteration.get_or_insert_with(|| {
            self.last_iteration = sample.pass;
            sample.pass
        });
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

/// Proxmox's poll period before the migration nears its end, µs → ms (`$usleep = 1000000`,
/// `QemuMigrate.pm` L1440).
const PROXMOX_POLL_MS: u64 = 1000;
/// … and once remaining is below the average sent per poll (`$usleep = 100_000`, L1525).
const PROXMOX_FAST_POLL_MS: u64 = 100;

/// Proxmox VE (`qemu-server@e6352be:src/PVE/QemuMigrate.pm::phase2` L1214,
/// `increase_migrate_downtime` L1190; `QemuMigrate/Helpers.pm::set_migration_caps` L116):
/// auto-converge and xbzrle always on (cache = 10 % of RAM rounded up to a power of two), never
/// post-copy, downtime 100 ms (VM `migrate_downtime` default), bandwidth 16 GiB/s unless limited.
/// The loop (L1445–L1590):
/// * polls every second; `avglstat = last transferred / poll count` (L1447) and, once
///   `remaining < avglstat`, every 100 ms for the rest of the migration (L1525);
/// * only polls where `transferred` changed count (L1515–L1518); in those, a poll where
///   remaining rose above the previous one, or is 0, increments a counter (L1563–L1566);
/// * after more than 5 such polls it doubles the downtime (capped at 2 000 000 ms) and resets the
///   counter (L1568–L1571). Polling ten times faster near the end catches every sync's rise, so
///   the doublings come sooner there.
///
/// No timeout: a non-converging migration ends in a long blackout, never an abort. (The
/// simulator ticks every 500 ms, so there the fast polls run at its tick rate.)
#[derive(Debug, Clone, Default)]
pub struct ProxmoxPolicy {
    downtime_ms: u64,
    counter: u32,
    polls: u64,
    last_transferred: u64,
    last_remaining: Option<u64>,
    poll_ms: u64,
    next_poll_ms: u64,
}

impl ProxmoxPolicy {
    /// Defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current poll period, ms (1000, or 100 near the end).
    pub fn poll_period_ms(&self) -> u64 {
        if self.poll_ms == 0 {
            PROXMOX_POLL_MS
        } else {
            self.poll_ms
        }
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
        plan.reasons = vec!["auto-converge + xbzrle, downtime 100 ms doubling after >5 polls where remaining rose, \
             polls 1 s then 100 ms once remaining < average sent per poll, no timeout"
            .into()];
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        if self.downtime_ms == 0 {
            self.downtime_ms = plan.parameters.downtime_limit_ms;
            self.poll_ms = PROXMOX_POLL_MS;
            self.next_poll_ms = PROXMOX_POLL_MS;
        }
        let at = obs.at_ms();
        let Some(s) = obs.sample() else {
            return finish_decisions(obs, out, "proxmox: no sample");
        };
        if at < self.next_poll_ms || s.phase != Phase::Precopy {
            return finish_decisions(obs, out, "proxmox: between polls");
        }
        // L1446–L1449: the average uses the previous poll's transferred and this poll's count.
        self.polls += 1;
        let avg_per_poll = self.last_transferred / self.polls;
        self.next_poll_ms = at + self.poll_ms;
        let transferred = s.transferred_bytes;
        if transferred != self.last_transferred {
            let rem = s.remaining_bytes;
            if avg_per_poll > 0 && rem < avg_per_poll && self.poll_ms != PROXMOX_FAST_POLL_MS {
                self.poll_ms = PROXMOX_FAST_POLL_MS;
                self.next_poll_ms = at + self.poll_ms;
                out.push(Decision::cont(format!(
                    "remaining {} < average {} sent per poll: polling every {PROXMOX_FAST_POLL_MS} ms",
                    mib(rem as f64),
                    mib(avg_per_poll as f64)
                )));
            }
            if self.last_remaining.is_some_and(|l| l > 0 && rem > l) || rem == 0 {
                self.counter += 1;
            }
            self.last_remaining = Some(rem);
            if self.counter > 5 {
                self.counter = 0;
                let new = if self.downtime_ms >= QEMU_MAX_DOWNTIME_MS {
                    QEMU_MAX_DOWNTIME_MS
                } else {
                    (self.downtime_ms * 2).min(QEMU_MAX_DOWNTIME_MS)
                };
                if new != self.downtime_ms {
                    let old = self.downtime_ms;
                    self.downtime_ms = new;
                    out.push(Decision::new(
                        Action::SetDowntimeLimit { ms: new },
                        format!(
                            "remaining rose or was 0 in more than 5 polls ({} now): downtime {old} → {new} ms",
                            mib(rem as f64)
                        ),
                    ));
                }
            }
        }
        self.last_transferred = transferred;
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
