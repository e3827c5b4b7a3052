//! KubeVirt's two convergence paths, read at `kubevirt@d923fdb`:
//! `pkg/virt-launcher/virtwrap/live-migration-source.go` (the monitor) and
//! `pkg/virt-launcher/virtwrap/stall-detector.go` (VEP 248).
//!
//! Mapping of tern's inputs onto KubeVirt's `MigrationPolicy` fields (the operator picks a policy
//! per VM by labels, so per SLA class):
//! * `allowPostCopy` = the post-copy verdict (SLA accepts it, hosts and QEMU permit it);
//! * `allowWorkloadDisruption` = the SLA accepts post-copy's disruption. KubeVirt defaults it to
//!   the policy's `allowPostCopy` (`virt-config.go`, `migrationpolicy.go::applyMigrationPolicySpec`
//!   L126); here it stays set when only the hosts or QEMU rule post-copy out, so the pause and
//!   stop-and-copy branches run where KubeVirt would run them. [`KubevirtLegacyPolicy::with_options`]
//!   sets it explicitly;
//! * `hasVFIO` = the VM forbids post-copy ([`crate::PostCopyPermission::Forbidden`]);
//! * `maxDowntimeMs` = the SLA's max downtime.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::MigrationPolicy;
use crate::limits::{PostCopyPermission, UNLIMITED_BANDWIDTH};
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
const SWITCHOVER_TIMEOUT_S: u64 = 60;
const EWMA_ALPHA: f64 = 0.4;
const PRECOPY_POSSIBLE_FACTOR: f64 = 1.5;
const PATIENCE_DECAY: f64 = 0.5;
const COMPLETION_TIMEOUT_FACTOR: f64 = 2.0;
/// QEMU's maximum downtime (`migrationutils.QEMUMaxMigrationDowntimeMS`), used by the "hard
/// stop-and-copy".
const HARD_DOWNTIME_MS: u64 = 2_000_000;
/// QEMU's default target downtime (`migrationutils.QEMUDefaultTargetDowntimeMS`).
const QEMU_DEFAULT_TARGET_DOWNTIME_MS: u64 = 300;

/// `acceptableCompletionTime = completionTimeoutPerGiB × size` in seconds, where size is the
/// memory in decimal GB rounded up (`ScaledValue(resource.Giga)`,
/// `manager.go::getVMIMigrationDataSize` L852; `live-migration-source.go::newMigrationMonitor`
/// L398).
fn acceptable_completion_s(ram_bytes: u64) -> u64 {
    let gb = ram_bytes.div_ceil(1_000_000_000).max(1);
    COMPLETION_TIMEOUT_PER_GIB * gb
}

/// The `MigrationPolicy` flags KubeVirt acts on, derived from the plan (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubevirtFlags {
    /// `allowPostCopy` (and the plan enabled `postcopy-ram`).
    pub allow_post_copy: bool,
    /// `allowWorkloadDisruption`.
    pub allow_workload_disruption: bool,
    /// `vmitrait.HasVFIO(vmi)`.
    pub has_vfio: bool,
}

impl KubevirtFlags {
    /// The flags for `plan`, with `awd` overriding `allowWorkloadDisruption` when given.
    pub fn from_plan(plan: &MigrationPlan, awd: Option<bool>) -> Self {
        KubevirtFlags {
            allow_post_copy: plan.may_switch_to_postcopy(),
            allow_workload_disruption: awd.unwrap_or(plan.input.sla.post_copy_acceptable),
            has_vfio: plan.input.vm.post_copy == PostCopyPermission::Forbidden,
        }
    }
}

fn kubevirt_plan(name: &str, input: &PlanInput) -> MigrationPlan {
    // allowPostCopy comes from the MigrationPolicy the operator selects per VM (by labels), so we
    // honour the SLA class.
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
            "allowPostCopy = {post} ({}); allowWorkloadDisruption = {} (SLA accepts disruption)",
            verdict.reason, input.sla.post_copy_acceptable
        ),
        format!(
            "acceptableCompletionTime {} s = {COMPLETION_TIMEOUT_PER_GIB} s × {} GB",
            acceptable_completion_s(input.vm.ram_bytes),
            input.vm.ram_bytes.div_ceil(1_000_000_000)
        ),
    ];
    plan
}

/// KubeVirt's default ("legacy") monitor, polled every 400 ms (`monitorSleepPeriodMS`, L60;
/// `startMonitor` L890):
/// * **progress** (`processInflightMigration` L859–L862): `lastProgressUpdate` is refreshed when
///   `DataRemaining` is below the *previous poll's* value (the watermark is overwritten at every
///   poll, kubevirt commit b945fce381, 2022). Pre-copy's sawtooth falls between syncs, so only a
///   stalled link stops the clock; the pre-2022 rule (a new all-time low) fired on any workload
///   whose pass size had settled;
/// * `handleLegacyConvergence` (L762), in order:
///   1. in post-copy: nothing;
///   2. `allowWorkloadDisruption && elapsed > acceptable && !paused` (L775): post-copy if
///      `allowPostCopy && !VFIO` (L776); with VFIO the downtime limit goes to
///      `min(2·acceptable s, 2000 s)` and `acceptable` doubles (L786–L806); otherwise
///      `dom.Suspend()` and `acceptable *= 2` (L812–L821);
///   3. no progress for more than `progressTimeout` (150 s, `isMigrationProgressing` L562): abort
///      (L826);
///   4. `elapsed > acceptable` (`shouldTriggerTimeout` L533): abort (L837).
///
/// Downtime stays at QEMU's 300 ms (no `DowntimeTuning` gate), auto-converge off (default).
#[derive(Debug, Clone, Default)]
pub struct KubevirtLegacyPolicy {
    awd: Option<bool>,
    acceptable_s: Option<u64>,
    watermark: u64,
    last_progress_ms: u64,
    paused: bool,
    done: bool,
}

impl KubevirtLegacyPolicy {
    /// Defaults: `allowWorkloadDisruption` follows the SLA.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `allowWorkloadDisruption` set explicitly.
    pub fn with_options(allow_workload_disruption: bool) -> Self {
        KubevirtLegacyPolicy {
            awd: Some(allow_workload_disruption),
            ..Self::default()
        }
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
        let elapsed_s = at / 1000;
        let acceptable = *self
            .acceptable_s
            .get_or_insert_with(|| acceptable_completion_s(plan.input.vm.ram_bytes));
        // L859–L862: progress is "below the previous poll", and the watermark is every poll's value.
        if let Some(s) = obs.sample() {
            if self.watermark == 0 || s.remaining_bytes < self.watermark {
                self.last_progress_ms = at;
            }
            self.watermark = s.remaining_bytes;
        }
        let in_postcopy = obs.sample().is_some_and(|s| s.phase == Phase::Postcopy);
        if in_postcopy || self.done {
            return finish_decisions(obs, out, "kubevirt: in post-copy or finished");
        }
        let flags = KubevirtFlags::from_plan(plan, self.awd);
        let stuck_s = at.saturating_sub(self.last_progress_ms) / 1000;
        if flags.allow_workload_disruption && elapsed_s > acceptable && !self.paused {
            let why = format!(
                "elapsed {elapsed_s} s > acceptableCompletionTime {acceptable} s; allowWorkloadDisruption"
            );
            if flags.allow_post_copy && !flags.has_vfio {
                self.done = true;
                out.push(Decision::new(
                    Action::SwitchToPostcopy,
                    format!("{why}, allowPostCopy: post-copy"),
                ));
            } else if flags.has_vfio {
                let max_downtime_s = acceptable * 2;
                let ms = (max_downtime_s * 1000).min(HARD_DOWNTIME_MS);
                self.acceptable_s = Some(max_downtime_s);
                self.paused = true;
                out.push(Decision::new(
                    Action::SetDowntimeLimit { ms },
                    format!("{why}, VFIO: max downtime {ms} ms to trigger QEMU's switchover"),
                ));
            } else {
                self.paused = true;
                self.acceptable_s = Some(acceptable * 2);
                out.push(Decision::new(
                    Action::PauseGuest,
                    format!(
                        "{why}, no post-copy: suspend the guest; acceptableCompletionTime → {} s",
                        acceptable * 2
                    ),
                ));
            }
        } else if stuck_s > PROGRESS_TIMEOUT_S {
            self.done = true;
            out.push(Decision::new(
                Action::Abort,
                format!(
                    "remaining has not fallen below the previous poll's {} for {stuck_s} s > \
                     progressTimeout {PROGRESS_TIMEOUT_S} s",
                    mib(self.watermark as f64),
                ),
            ));
        } else if elapsed_s > acceptable {
            self.done = true;
            out.push(Decision::new(
                Action::Abort,
                format!("elapsed {elapsed_s} s > acceptableCompletionTime {acceptable} s: abort"),
            ));
        }
        finish_decisions(
            obs,
            out,
            "kubevirt: within progress and completion timeouts",
        )
    }
}

/// One `iterationRecord` (`stall-detector.go` L44).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Record {
    elapsed_ms: u64,
    remaining: u64,
}

/// KubeVirt's VEP-248 stall detector (alpha gate `MigrationStallDetection`), followed line by
/// line (`kubevirt@d923fdb`):
/// * start: `downtime = min(maxDowntimeMs, 300)` (`handleStallDetection` L715–L722);
/// * every poll that is not an iteration boundary (L749): `updateBandwidthEstimate` (L80), which
///   *starts at the first sample* (L82) and then smooths with α = 0.4 (zero readings included);
/// * at iteration boundaries (`processStallDetectionIteration` L229, skipped until the EWMA has a
///   value and after a switchover was initiated):
///   - `updateCandidates` (L96): records at least 40 s old leave the candidate list and fold into
///     the out-of-window minimum;
///   - `checkStallCondition` (L137): `remaining ≥ outOfWindowMin × 0.96`. Once true the stall is
///     **latched** (`stallDetected`, L243–L250): it is never cleared;
///   - on the first stall `best = min(outOfWindowMin, candidates)` (L150) and a 40 s patience
///     (L167); afterwards every record is pushed onto a min-heap and, when the patience runs out,
///     **the heap is popped** into `best` (L174–L190): each relaxation takes the next larger value
///     seen since the stall, so the target climbs, and the patience halves;
/// * `decideAction` (L259) when stalled: nothing unless `remaining ≤ best × 1.04` (L221) and
///   `est ≤ (2·acceptable − elapsed)` (L292, `est = remaining / ewmaBps`, L205); then post-copy
///   (`allowWorkloadDisruption && allowPostCopy && !VFIO`, L298), hard stop-and-copy (AWD:
///   downtime 2 000 000 ms, L302), soft stop-and-copy (`est ≤ 1.5 × maxDowntimeMs`: downtime =
///   maxDowntimeMs, L308–L310), else abort (L313). A stop-and-copy sets a switchover deadline 60 s
///   ahead (`triggerConvergenceAction` L634);
/// * `processCompletionTimeouts` (L580), after every poll and event: past the switchover deadline
///   (initially `acceptable`) and not in post-copy: without an initiated switchover and within
///   budget, post-copy (`allowPostCopy && !VFIO`) or hard stop-and-copy (AWD; `acceptable`
///   doubles); otherwise abort.
#[derive(Debug, Clone, Default)]
pub struct KubevirtStallPolicy {
    awd: Option<bool>,
    started: bool,
    ewma_bps: f64,
    candidates: Vec<Record>,
    min_outside: Option<Record>,
    stall_detected: bool,
    history: BinaryHeap<Reverse<u64>>,
    best: u64,
    relax_deadline_ms: u64,
    patience_ms: u64,
    record: Record,
    acceptable_s: u64,
    switchover_deadline_s: u64,
    initiated: bool,
    done: bool,
}

impl KubevirtStallPolicy {
    /// Defaults: `allowWorkloadDisruption` follows the SLA.
    pub fn new() -> Self {
        Self::default()
    }

    /// With `allowWorkloadDisruption` set explicitly.
    pub fn with_options(allow_workload_disruption: bool) -> Self {
        KubevirtStallPolicy {
            awd: Some(allow_workload_disruption),
            ..Self::default()
        }
    }

    /// The smoothed bandwidth, bytes/s (0 until the first poll).
    pub fn ewma_bandwidth(&self) -> f64 {
        self.ewma_bps
    }

    /// The current local-minimum target (`bestRemainingBytes`), once a stall was detected.
    pub fn best_remaining(&self) -> Option<u64> {
        self.stall_detected.then_some(self.best)
    }

    /// L80–L90.
    fn update_bandwidth(&mut self, sample: u64) {
        if self.ewma_bps == 0.0 {
            self.ewma_bps = sample as f64;
            return;
        }
        self.ewma_bps = EWMA_ALPHA * sample as f64 + (1.0 - EWMA_ALPHA) * self.ewma_bps;
    }

    /// L96–L135.
    fn update_candidates(&mut self, r: Record) {
        while let Some(&oldest) = self.candidates.first() {
            if r.elapsed_ms.saturating_sub(oldest.elapsed_ms) < STALL_WINDOW_MS {
                break;
            }
            self.candidates.remove(0);
            if self
                .min_outside
                .is_none_or(|m| oldest.remaining < m.remaining)
            {
                self.min_outside = Some(oldest);
            }
        }
        if self.min_outside.is_some_and(|m| r.remaining > m.remaining) {
            return;
        }
        if self
            .candidates
            .last()
            .is_some_and(|l| r.remaining >= l.remaining)
        {
            return;
        }
        self.candidates.push(r);
    }

    /// L137–L148.
    fn check_stall(&self, remaining: u64) -> bool {
        self.min_outside
            .is_some_and(|m| remaining >= (m.remaining as f64 * (1.0 - STALL_MARGIN)) as u64)
    }

    /// L174–L193.
    fn relax(&mut self, r: Record) {
        self.history.push(Reverse(r.remaining));
        if r.elapsed_ms < self.relax_deadline_ms {
            return;
        }
        if let Some(Reverse(next)) = self.history.pop() {
            self.best = next;
            self.patience_ms = (self.patience_ms as f64 * PATIENCE_DECAY) as u64;
            self.relax_deadline_ms = r.elapsed_ms + self.patience_ms;
        }
    }

    /// L229–L257: whether the migration is (still) stalled.
    fn process_iteration(&mut self, r: Record) -> bool {
        if self.ewma_bps == 0.0 || self.initiated {
            return false;
        }
        self.update_candidates(r);
        if self.stall_detected {
            self.relax(r);
            true
        } else if self.check_stall(r.remaining) {
            let outside = self.min_outside.map_or(u64::MAX, |m| m.remaining);
            self.best = self
                .candidates
                .iter()
                .map(|c| c.remaining)
                .fold(outside, u64::min);
            self.history.clear();
            self.patience_ms = STALL_WINDOW_MS;
            self.relax_deadline_ms = r.elapsed_ms + self.patience_ms;
            self.stall_detected = true;
            true
        } else {
            false
        }
    }

    /// L205–L219 (0 without a bandwidth estimate).
    fn est_downtime_ms(&self, remaining: u64) -> u64 {
        if self.ewma_bps == 0.0 {
            return 0;
        }
        (remaining as f64 / (self.ewma_bps / 1000.0)).min(u32::MAX as f64) as u64
    }

    /// L195–L203.
    fn can_finish_by(&self, elapsed_s: u64, deadline_s: u64, est_ms: u64) -> bool {
        self.ewma_bps != 0.0 && (est_ms as i64) <= (deadline_s as i64 - elapsed_s as i64) * 1000
    }

    fn hard_stop(&mut self, elapsed_s: u64, why: String) -> Decision {
        self.initiated = true;
        self.switchover_deadline_s = elapsed_s + SWITCHOVER_TIMEOUT_S;
        Decision::new(
            Action::SetDowntimeLimit {
                ms: HARD_DOWNTIME_MS,
            },
            format!(
                "{why}; allowWorkloadDisruption: hard stop-and-copy (downtime {HARD_DOWNTIME_MS} ms, \
                 switchover deadline {} s)",
                self.switchover_deadline_s
            ),
        )
    }

    /// `decideAction` (L259–L314) followed by `triggerConvergenceAction` (L634).
    fn decide_action(&mut self, plan: &MigrationPlan, at: u64, r: Record) -> Option<Decision> {
        if self.initiated {
            return None;
        }
        let target = (self.best as f64 * (1.0 + STALL_MARGIN)) as u64;
        if r.remaining > target {
            return None;
        }
        let est = self.est_downtime_ms(r.remaining);
        let elapsed_s = at / 1000;
        let deadline_s = (self.acceptable_s as f64 * COMPLETION_TIMEOUT_FACTOR) as u64;
        if !self.can_finish_by(elapsed_s, deadline_s, est) {
            return None;
        }
        let flags = KubevirtFlags::from_plan(plan, self.awd);
        let max_dt = plan.input.max_downtime_ms();
        let why = format!(
            "stalled; local minimum {} ≤ best {} × 1.04; estimated downtime {est} ms at {}",
            mib(r.remaining as f64),
            mib(self.best as f64),
            mbit(self.ewma_bps)
        );
        if flags.allow_workload_disruption && flags.allow_post_copy && !flags.has_vfio {
            self.initiated = true;
            self.done = true;
            return Some(Decision::new(
                Action::SwitchToPostcopy,
                format!("{why}; post-copy"),
            ));
        }
        if flags.allow_workload_disruption {
            return Some(self.hard_stop(elapsed_s, why));
        }
        if est as f64 <= PRECOPY_POSSIBLE_FACTOR * max_dt as f64 {
            self.initiated = true;
            self.switchover_deadline_s = elapsed_s + SWITCHOVER_TIMEOUT_S;
            return Some(Decision::new(
                Action::SetDowntimeLimit { ms: max_dt },
                format!(
                    "{why}; ≤ {PRECOPY_POSSIBLE_FACTOR} × maxDowntimeMs {max_dt}: soft stop-and-copy \
                     (switchover deadline {} s)",
                    self.switchover_deadline_s
                ),
            ));
        }
        self.initiated = true;
        self.done = true;
        Some(Decision::new(
            Action::Abort,
            format!(
                "{why}; > {PRECOPY_POSSIBLE_FACTOR} × maxDowntimeMs {max_dt} and no workload \
                 disruption allowed: abort"
            ),
        ))
    }

    /// `processCompletionTimeouts` (L580–L632).
    fn completion_timeouts(
        &mut self,
        plan: &MigrationPlan,
        at: u64,
        paused: bool,
    ) -> Option<Decision> {
        let elapsed_s = at / 1000;
        // shouldTriggerTimeout (L533–L550).
        let limit = if paused {
            self.acceptable_s
        } else {
            self.switchover_deadline_s
        };
        if self.acceptable_s == 0 || elapsed_s <= limit {
            return None;
        }
        let est = self.est_downtime_ms(self.record.remaining);
        let why = format!(
            "elapsed {elapsed_s} s > switchover deadline {limit} s; estimated downtime {est} ms"
        );
        if self.ewma_bps == 0.0 {
            self.done = true;
            return Some(Decision::new(
                Action::Abort,
                format!("{why}; no bandwidth estimate (illegal state): abort"),
            ));
        }
        let flags = KubevirtFlags::from_plan(plan, self.awd);
        if !self.initiated {
            let budget_s = (self.acceptable_s as f64 * COMPLETION_TIMEOUT_FACTOR) as u64;
            let completable = self.can_finish_by(elapsed_s, budget_s, est);
            if flags.allow_post_copy && !flags.has_vfio && completable {
                self.initiated = true;
                self.done = true;
                return Some(Decision::new(
                    Action::SwitchToPostcopy,
                    format!("{why}; completion timeout: post-copy"),
                ));
            }
            if flags.allow_workload_disruption && completable {
                self.acceptable_s = budget_s;
                return Some(self.hard_stop(elapsed_s, format!("{why}; completion timeout")));
            }
        }
        self.done = true;
        Some(Decision::new(
            Action::Abort,
            format!(
                "{why}; switchover {} or not completable within {} s: abort",
                if self.initiated {
                    "initiated but not finished"
                } else {
                    "not allowed"
                },
                (self.acceptable_s as f64 * COMPLETION_TIMEOUT_FACTOR) as u64
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
        plan.parameters.downtime_limit_ms =
            input.max_downtime_ms().min(QEMU_DEFAULT_TARGET_DOWNTIME_MS);
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
            self.acceptable_s = acceptable_completion_s(plan.input.vm.ram_bytes);
            self.switchover_deadline_s = self.acceptable_s;
        }
        let phase = obs.sample().map(|s| s.phase);
        if phase == Some(Phase::Postcopy) {
            self.done = true;
        }
        if self.done {
            return finish_decisions(obs, out, "kubevirt-stall: post-copy or finished");
        }
        let paused = phase == Some(Phase::PausedPrecopy);
        match obs {
            Observation::PassCompleted(s) => {
                let r = Record {
                    elapsed_ms: s.at_ms,
                    remaining: s.remaining_bytes,
                };
                self.record = r;
                if self.process_iteration(r) {
                    out.extend(self.decide_action(plan, at, r));
                }
            }
            Observation::Tick {
                latest: Some(s), ..
            } => {
                if paused {
                    self.record = Record {
                        elapsed_ms: s.at_ms,
                        remaining: s.remaining_bytes,
                    };
                } else {
                    self.update_bandwidth(s.throughput_bytes_per_s);
                }
            }
            Observation::Tick { latest: None, .. } => {}
        }
        if !self.done {
            out.extend(self.completion_timeouts(plan, at, paused));
        }
        finish_decisions(
            obs,
            out,
            "kubevirt-stall: not stalled or not at a local minimum",
        )
    }
}
