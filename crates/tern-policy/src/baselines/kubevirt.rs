//! KubeVirt's two convergence paths (`kubevirt@d923fdb:pkg/virt-launcher/virtwrap/live-migration-source.go`).

use crate::MigrationPolicy;
use crate::limits::UNLIMITED_BANDWIDTH;
use crate::observe::{Action, Decision, Observation, Phase, mbit, mib};
use crate::plan::{Capabilities, MigrationPlan, PlanInput, post_copy_verdict};

use super::finish_decisions;

/// `completionTimeoutPerGiB` default, s (`pkg/virt-config/virt-config.go`).
pub const COMPLETION_TIMEOUT_PER_GIB: u64 = 150;
/// `progressTimeout` default, s.
pub const PROGRESS_TIMEOUT_S: u64 = 150;
/// `DefaultMigrationMaxDowntimeMs` (used when no SLA is given).
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 900;
/// Stall detector constants (`virt-config.go`): margin 4 %, window 40 s, switchover timeout 60 s,
/// EWMA α 0.4, pre-copy-possible factor 1.5, patience decay 0.5, completion-timeout factor 2.
const STALL_MARGIN: f64 = 0.04;
const STALL_WINDOW_MS: u64 = 40_000;
const SWITCHOVER_TIMEOUT_MS: u64 = 60_000;
const EWMA_ALPHA: f64 = 0.4;
const PRECOPY_POSSIBLE_FACTOR: f64 = 1.5;
const PATIENCE_DECAY: f64 = 0.5;
const COMPLETION_TIMEOUT_FACTOR: u64 = 2;
/// QEMU's maximum downtime, used by the "hard stop-and-copy".
const HARD_DOWNTIME_MS: u64 = 2_000_000;

/// `acceptableCompletionTime = completionTimeoutPerGiB × size`, where size is the memory in
/// decimal GB rounded up (`ScaledValue(resource.Giga)`, `manager.go::getVMIMigrationDataSize` L852).
fn acceptable_completion_ms(ram_bytes: u64) -> u64 {
    let gb = ram_bytes.div_ceil(1_000_000_000).max(1);
    COMPLETION_TIMEOUT_PER_GIB * gb * 1000
}

fn kubevirt_plan(name: &str, input: &PlanInput) -> MigrationPlan {
    // allowPostCopy comes from the MigrationPolicy the operator selects per VM (by labels), so we
    // honour the SLA class; allowWorkloadDisruption defaults to allowPostCopy.
    let verdict = post_copy_verdict(input);
    let mut plan = MigrationPlan::qemu_defaults(name, input, verdict.clone());
    let post = verdict.allowed;
    let f = input.features;
    plan.capabilities = Capabilities {
        postcopy_ram: post,
        // 8 multifd threads unless CPU limits (`configureParallelMigrationThreads` L724); with
        // post-copy only where QEMU supports it (PR #17106).
        multifd: f.multifd && (!post || f.multifd_with_postcopy),
        ..Capabilities::default()
    };
    plan.parameters.multifd_channels = if plan.capabilities.multifd { 8 } else { 1 };
    // bandwidthPerMigration 0 = unlimited.
    plan.parameters.max_bandwidth_bytes_per_s =
        input.host_bandwidth_cap().unwrap_or(UNLIMITED_BANDWIDTH);
    plan.deadline_ms = None;
    plan.reasons = vec![
        format!(
            "allowPostCopy = allowWorkloadDisruption = {post} ({})",
            verdict.reason
        ),
        format!(
            "acceptableCompletionTime {} s = {COMPLETION_TIMEOUT_PER_GIB} s × {} GB",
            acceptable_completion_ms(input.vm.ram_bytes) / 1000,
            input.vm.ram_bytes.div_ceil(1_000_000_000)
        ),
    ];
    plan
}

/// KubeVirt's default ("legacy") monitor, `handleLegacyConvergence` (L762), polled every 400 ms:
/// 1. in post-copy: nothing;
/// 2. `allowWorkloadDisruption && elapsed > acceptable && !paused`: post-copy if allowed, else
///    `dom.Suspend()` and `acceptable ×= 2`;
/// 3. no new low of remaining bytes for `progressTimeout` (150 s): abort;
/// 4. `elapsed > acceptable`: abort.
///
/// Downtime stays at QEMU's 300 ms (no `DowntimeTuning` gate), auto-converge off (default).
#[derive(Debug, Clone, Default)]
pub struct KubevirtLegacyPolicy {
    acceptable_ms: Option<u64>,
    lowest: Option<u64>,
    last_progress_ms: u64,
    paused: bool,
    done: bool,
}

impl KubevirtLegacyPolicy {
    /// Defaults.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MigrationPolicy for KubevirtLegacyPolicy {
    fn name(&self) -> &'static str {
        "kubevirt"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        kubevirt_plan(self.name(), input)
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        let at = obs.at_ms();
        let acceptable = *self
            .acceptable_ms
            .get_or_insert_with(|| acceptable_completion_ms(plan.input.vm.ram_bytes));
        let in_postcopy = obs.sample().is_some_and(|s| s.phase == Phase::Postcopy);
        if in_postcopy || self.done {
            return finish_decisions(obs, out, "kubevirt: in post-copy or finished");
        }
        let lowest = self.lowest;
        if let Some(s) = obs
            .sample()
            .filter(|s| lowest.is_none_or(|l| s.remaining_bytes < l))
        {
            self.lowest = Some(s.remaining_bytes);
            self.last_progress_ms = at;
        }
        let awd = plan.post_copy.allowed;
        if awd && at > acceptable && !self.paused {
            if plan.capabilities.postcopy_ram {
                self.done = true;
                out.push(Decision::new(
                    Action::SwitchToPostcopy,
                    format!(
                        "elapsed {} s > acceptableCompletionTime {} s; allowPostCopy",
                        at / 1000,
                        acceptable / 1000
                    ),
                ));
            } else {
                self.paused = true;
                self.acceptable_ms = Some(acceptable * 2);
                out.push(Decision::new(
                    Action::PauseGuest,
                    format!("elapsed {} s > acceptableCompletionTime {} s; allowWorkloadDisruption: suspend", at / 1000, acceptable / 1000),
                ));
            }
        } else if at.saturating_sub(self.last_progress_ms) > PROGRESS_TIMEOUT_S * 1000 {
            self.done = true;
            out.push(Decision::new(
                Action::Abort,
                format!(
                    "no new low below {} for {} s > progressTimeout {PROGRESS_TIMEOUT_S} s",
                    mib(self.lowest.unwrap_or(0) as f64),
                    at.saturating_sub(self.last_progress_ms) / 1000
                ),
            ));
        } else if at > self.acceptable_ms.unwrap_or(acceptable) {
            self.done = true;
            out.push(Decision::new(
                Action::Abort,
                format!(
                    "elapsed {} s > acceptableCompletionTime {} s",
                    at / 1000,
                    self.acceptable_ms.unwrap_or(acceptable) / 1000
                ),
            ));
        }
        finish_decisions(
            obs,
            out,
            "kubevirt: within progress and completion timeouts",
        )
    }
}

/// KubeVirt's VEP-248 stall detector (alpha gate `MigrationStallDetection`;
/// `handleStallDetection` L705, `processCompletionTimeouts` L580, `stall-detector.go`):
/// * start: `downtime = min(maxDowntimeMs, 300)`;
/// * every poll: `ewmaBps = 0.4·MemBps + 0.6·ewmaBps` (zero readings included);
/// * at iteration boundaries: stalled if `remaining ≥ minOlderThan40s × 0.96`; on the first stall
///   `best = min(seen)` with 40 s patience, relaxed to the smallest value since the stall and
///   patience halved whenever it runs out;
/// * at a local minimum (`remaining ≤ best × 1.04`) and within budget (`est ≤ (2·acceptable −
///   elapsed)`), with `est = remaining / ewmaBps`: post-copy (AWD and allowed), else hard
///   stop-and-copy (AWD: downtime 2 000 000 ms), else soft stop-and-copy if `est ≤ maxDowntime`
///   or `est ≤ 1.5·maxDowntime` (downtime = maxDowntime), else abort; a stop-and-copy that has
///   not completed 60 s later aborts;
/// * past the completion timeout without a switchover: post-copy or hard stop-and-copy if
///   completable within budget, else abort.
///
/// `maxDowntimeMs` is the SLA's max downtime.
#[derive(Debug, Clone, Default)]
pub struct KubevirtStallPolicy {
    started: bool,
    ewma_bps: f64,
    records: Vec<(u64, u64)>,
    best: Option<u64>,
    stall_start: usize,
    patience_ms: u64,
    relax_at_ms: u64,
    acceptable_ms: u64,
    switchover_deadline_ms: u64,
    initiated: bool,
    done: bool,
}

impl KubevirtStallPolicy {
    /// Defaults.
    pub fn new() -> Self {
        Self::default()
    }

    fn max_downtime(plan: &MigrationPlan) -> u64 {
        plan.input.max_downtime_ms()
    }

    fn est_downtime_ms(&self, remaining: u64) -> f64 {
        if self.ewma_bps <= 0.0 {
            f64::INFINITY
        } else {
            remaining as f64 / (self.ewma_bps / 1000.0)
        }
    }

    fn within_budget(&self, est_ms: f64, at: u64) -> bool {
        let budget = (COMPLETION_TIMEOUT_FACTOR * self.acceptable_ms) as f64 - at as f64;
        est_ms <= budget
    }

    fn hard_stop(&mut self, at: u64, why: String) -> Decision {
        self.initiated = true;
        self.switchover_deadline_ms = at + SWITCHOVER_TIMEOUT_MS;
        Decision::new(
            Action::SetDowntimeLimit {
                ms: HARD_DOWNTIME_MS,
            },
            format!(
                "{why}; allowWorkloadDisruption: hard stop-and-copy (downtime {HARD_DOWNTIME_MS} ms)"
            ),
        )
    }

    fn decide_action(&mut self, plan: &MigrationPlan, at: u64, remaining: u64) -> Option<Decision> {
        let best = self.best?;
        if remaining as f64 > best as f64 * (1.0 + STALL_MARGIN) {
            return None;
        }
        let est = self.est_downtime_ms(remaining);
        if !self.within_budget(est, at) {
            return None;
        }
        let max_dt = Self::max_downtime(plan);
        let awd = plan.post_copy.allowed;
        let why = format!(
            "stalled; local minimum {} ≤ best {} × 1.04; estimated downtime {est:.0} ms at {}",
            mib(remaining as f64),
            mib(best as f64),
            mbit(self.ewma_bps)
        );
        if awd && plan.capabilities.postcopy_ram {
            self.done = true;
            return Some(Decision::new(
                Action::SwitchToPostcopy,
                format!("{why}; post-copy"),
            ));
        }
        if awd {
            return Some(self.hard_stop(at, why));
        }
        if est <= max_dt as f64 || est <= PRECOPY_POSSIBLE_FACTOR * max_dt as f64 {
            self.initiated = true;
            self.switchover_deadline_ms = at + SWITCHOVER_TIMEOUT_MS;
            return Some(Decision::new(
                Action::SetDowntimeLimit { ms: max_dt },
                format!("{why}; soft stop-and-copy with maxDowntimeMs {max_dt}"),
            ));
        }
        self.done = true;
        Some(Decision::new(
            Action::Abort,
            format!(
                "{why}; > {PRECOPY_POSSIBLE_FACTOR} × maxDowntimeMs {max_dt} and no workload disruption allowed: abort"
            ),
        ))
    }
}

impl MigrationPolicy for KubevirtStallPolicy {
    fn name(&self) -> &'static str {
        "kubevirt-stall"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let mut plan = kubevirt_plan(self.name(), input);
        plan.parameters.downtime_limit_ms = input.max_downtime_ms().min(300);
        plan.reasons.push(format!(
            "stall detector: downtime min(maxDowntimeMs {}, 300), margin 4 %, window 40 s",
            input.max_downtime_ms()
        ));
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        let at = obs.at_ms();
        if !self.started {
            self.started = true;
            self.acceptable_ms = acceptable_completion_ms(plan.input.vm.ram_bytes);
            self.switchover_deadline_ms = self.acceptable_ms;
        }
        if obs.sample().is_some_and(|s| s.phase == Phase::Postcopy) {
            self.done = true;
        }
        if self.done {
            return finish_decisions(obs, out, "kubevirt-stall: post-copy or finished");
        }
        match obs {
            Observation::Tick { latest, .. } => {
                if let Some(s) = latest {
                    self.ewma_bps = EWMA_ALPHA * s.throughput_bytes_per_s as f64
                        + (1.0 - EWMA_ALPHA) * self.ewma_bps;
                }
            }
            Observation::PassCompleted(s) => {
                if self.ewma_bps == 0.0 {
                    self.ewma_bps = s.throughput_bytes_per_s as f64;
                }
                let remaining = s.remaining_bytes;
                let older_min = self
                    .records
                    .iter()
                    .filter(|(t, _)| at.saturating_sub(*t) > STALL_WINDOW_MS)
                    .map(|&(_, r)| r)
                    .min();
                self.records.push((at, remaining));
                let stalled =
                    older_min.is_some_and(|m| remaining as f64 >= m as f64 * (1.0 - STALL_MARGIN));
                if !stalled {
                    self.best = None;
                } else {
                    if self.best.is_none() {
                        self.best = self.records.iter().map(|&(_, r)| r).min();
                        self.stall_start = self.records.len() - 1;
                        self.patience_ms = STALL_WINDOW_MS;
                        self.relax_at_ms = at + self.patience_ms;
                    } else if at >= self.relax_at_ms {
                        self.best = self.records[self.stall_start..]
                            .iter()
                            .map(|&(_, r)| r)
                            .min();
                        self.patience_ms = ((self.patience_ms as f64) * PATIENCE_DECAY) as u64;
                        self.relax_at_ms = at + self.patience_ms;
                    }
                    if !self.initiated {
                        out.extend(self.decide_action(plan, at, remaining));
                    }
                }
            }
        }
        if !self.done && at > self.switchover_deadline_ms {
            let remaining = obs.sample().map_or(0, |s| s.remaining_bytes);
            let est = self.est_downtime_ms(remaining);
            let why = format!(
                "elapsed {} s > switchover deadline {} s; estimated downtime {est:.0} ms",
                at / 1000,
                self.switchover_deadline_ms / 1000
            );
            if !self.initiated && self.within_budget(est, at) {
                if plan.post_copy.allowed && plan.capabilities.postcopy_ram {
                    self.done = true;
                    out.push(Decision::new(
                        Action::SwitchToPostcopy,
                        format!("{why}; completion timeout: post-copy"),
                    ));
                } else if plan.post_copy.allowed {
                    self.acceptable_ms *= 2;
                    out.push(self.hard_stop(at, why));
                } else {
                    self.done = true;
                    out.push(Decision::new(
                        Action::Abort,
                        format!("{why}; no workload disruption allowed: abort"),
                    ));
                }
            } else {
                self.done = true;
                out.push(Decision::new(
                    Action::Abort,
                    format!("{why}; not completable in budget or switchover timed out: abort"),
                ));
            }
        }
        finish_decisions(
            obs,
            out,
            "kubevirt-stall: not stalled or not at a local minimum",
        )
    }
}
