//! `tern`: our policy. Context-aware, SLA-bounded, model-driven. See `POLICY.md`.
//!
//! In one paragraph: start post-copy-capable (when the hosts, VM, QEMU and SLA allow) with the
//! SLA's throttle ceiling and a downtime limit of `min(50 ms, SLA − switchover overhead)`. At
//! each pass boundary fit the convergence model. If pre-copy is predicted to converge in time,
//! continue. If a higher downtime limit within the SLA would make it converge, raise it to what
//! is needed (not to the ceiling). If auto-converge within the SLA's throttle would, let QEMU
//! throttle. Otherwise the migration cannot finish within the SLA by pre-copy (known at the first
//! boundary when the measured dirty rate already outruns the link at the SLA's throttle), and
//! the context decides: evacuate finishes now (post-copy, else stop-and-copy) at a local minimum
//! of remaining bytes; maintenance waits a bounded patience for the workload to calm, then does
//! the same, or earlier when the deadline presses; balance switches to post-copy when the SLA
//! accepts it and otherwise aborts; manual switches like balance when post-copy is acceptable
//! and otherwise keeps trying until its budget is spent (while the guest is not throttled), then
//! behaves like balance. No switch or stop-and-copy happens while the link is degraded (latest
//! throughput below half the smoothed one), which is what a transient network drop looks like.

use crate::MigrationPolicy;
use crate::limits::{
    QEMU_MAX_DOWNTIME_MS, QEMU_THROTTLE_INCREMENT_PCT, QEMU_THROTTLE_INITIAL_PCT,
    UNLIMITED_BANDWIDTH,
};
use crate::model::{ConvergenceModel, Eta, EtaMode, Prediction};
use crate::observe::{Action, Decision, IterationSample, Observation, Phase, mbit, mib, secs};
use crate::plan::{Capabilities, MigrationParameters, MigrationPlan, PlanInput, post_copy_verdict};
use crate::sla::MigrationContext;
use crate::stall::{StallDetector, StallStatus, link_degraded};

/// Link rate assumed for budgets when none is known (100 Mbit/s): pessimistic for the lab's
/// 50 Mbit–1 Gbit links without being absurd.
const ASSUMED_LINK_BYTES_PER_S: u64 = 12_500_000;
/// Safety factor on the time a forced finish needs before a deadline.
const FINISH_SAFETY: f64 = 1.5;
/// Fixed slack before a deadline, ms.
const FINISH_SLACK_MS: u64 = 2_000;
/// Maintenance waits this share of its budget after a confirmed stall for the workload to calm.
const MAINTENANCE_PATIENCE_SHARE: f64 = 0.25;
/// … but at most this long, ms.
const MAINTENANCE_PATIENCE_MAX_MS: u64 = 30_000;
/// A raised "hard" stop-and-copy downtime has this headroom over the predicted blackout.
const HARD_STOP_HEADROOM: f64 = 1.25;
/// Starting `downtime-limit`, ms: Nova's first step (500 ms / 10). A migration that converges
/// anyway finishes with a small blackout; the model raises the limit only when it must.
const START_DOWNTIME_MS: u64 = 50;
/// Post-copy's degraded phase counts this much of its duration as guest impact when
/// `postcopy-preempt` serves faults on their own channel (platform.md: no gap > 100 ms with
/// preempt vs 8–16 s stalls without).
const PREEMPT_IMPACT: f64 = 0.5;
/// Headroom when raising the downtime limit within the SLA.
const RAISE_HEADROOM: f64 = 1.15;
/// A pass smaller than this share of the one before is still shrinking geometrically: the fit's
/// "steady" size is not reached yet, so raising the downtime limit to it would stop the guest a
/// pass or two early with a blackout several times what the next passes leave (the simulator saw
/// 30 → 4.2 → 1.7 MiB passes stopped at 5.4 MiB, 220 ms, where Nova's 50 ms limit took 80 ms at
/// the same total time).
const STILL_SHRINKING_SHARE: f64 = 0.5;
/// Without post-copy recovery a link failure after the switch loses the guest, so tern switches
/// only when the post-copy tail (what is left ÷ measured throughput) is at most this long and the
/// link has looked healthy for the whole migration: the guest is exposed for seconds, not
/// minutes. Nova, KubeVirt and oVirt switch without recovery with no bound at all; refusing
/// outright left a multi-second stop-and-copy blackout (evacuate, maintenance) or an abort
/// (balance, manual) where a few seconds of post-copy met the SLA.
const UNRECOVERABLE_TAIL_MAX_MS: f64 = 20_000.0;

/// Our policy. Create one per migration.
#[derive(Debug, Clone, Default)]
pub struct TernPolicy {
    state: Option<State>,
}

#[derive(Debug, Clone)]
struct State {
    model: ConvergenceModel,
    stall: StallDetector,
    downtime_ms: u64,
    throttle_max: u8,
    finished_by: Option<Action>,
    hard_stop_at: Option<u64>,
    stalled_at: Option<u64>,
    /// When QEMU's auto-converge was first seen throttling the guest (ms since start).
    throttled_since: Option<u64>,
    eta: Option<Eta>,
    /// A sample showed the link degraded (throughput below half the smoothed one) at some point.
    link_trouble: bool,
    /// `remaining` at the previous pass boundary.
    prev_pass_remaining: Option<u64>,
}

/// Budget defaults by context, as multiples of the first pass (RAM / link) plus a constant.
fn default_budget_ms(context: MigrationContext, first_pass_ms: u64) -> u64 {
    match context {
        // Bounded: about one pass to send RAM, one for the post-copy tail, and slack.
        MigrationContext::Evacuate => first_pass_ms * 2 + 30_000,
        // Optional moves keep trying as long as an unthrottled guest does not notice (the cost is
        // link time): an early abort loses moves that a calmer minute would have completed.
        MigrationContext::Maintenance | MigrationContext::Manual | MigrationContext::Balance => {
            first_pass_ms * 4 + 120_000
        }
    }
}

impl TernPolicy {
    /// A fresh policy.
    pub fn new() -> Self {
        TernPolicy { state: None }
    }

    fn state(&mut self, plan: &MigrationPlan) -> &mut State {
        self.state.get_or_insert_with(|| State {
            model: ConvergenceModel::from_input(&plan.input),
            stall: StallDetector::new(),
            downtime_ms: plan.parameters.downtime_limit_ms,
            throttle_max: if plan.capabilities.auto_converge {
                plan.parameters.max_cpu_throttle_pct
            } else {
                0
            },
            finished_by: None,
            hard_stop_at: None,
            stalled_at: None,
            throttled_since: None,
            eta: None,
            link_trouble: false,
            prev_pass_remaining: None,
        })
    }
}

/// Pass boundaries (plus the probe) needed before acting on a predicted non-convergence: the
/// probe is one (T, D) point, each boundary after the first pass another; two points fix the fit.
/// An evacuation acts on the minimum. So does any context whose answer is post-copy: the switch
/// costs the same whenever it happens (remaining ÷ link of degraded running), so a third point
/// only buys one more pass of the working set over the link (the quick bench saw +1.4 s and
/// +0.5 × RAM at ρ ≈ 1 waiting for it). A stop-and-copy or an abort is harder to take back, and
/// waits one more pass. (A measured ρ that rules pre-copy out acts at once, see `on_pass`.)
fn evidence_needed(plan: &MigrationPlan) -> u64 {
    if plan.input.context == MigrationContext::Evacuate || plan.may_switch_to_postcopy() {
        2
    } else {
        3
    }
}

/// The SLA's downtime ceiling for `downtime-limit`: max downtime minus the switchover overhead.
fn downtime_ceiling(input: &PlanInput) -> u64 {
    input
        .max_downtime_ms()
        .saturating_sub(input.switchover_overhead_ms)
        .max(1)
}

impl MigrationPolicy for TernPolicy {
    fn name(&self) -> &'static str {
        "tern"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let mut verdict = post_copy_verdict(input);
        // Post-copy without recovery turns any network failure after the switch into the loss
        // of the VM (what Nova, KubeVirt and oVirt accept unconditionally). tern arms post-copy
        // then, but switches only for a short tail over a healthy link
        // (`UNRECOVERABLE_TAIL_MAX_MS`, `State::postcopy_ok`).
        if verdict.allowed && !input.features.postcopy_recovery {
            verdict.reason = format!(
                "{}; post-copy recovery (migrate-pause/migrate-recover) is missing on one end, so \
                 a network failure after the switch would lose the guest: switching only for a \
                 tail of at most {} over a link that stayed healthy",
                verdict.reason,
                secs(UNRECOVERABLE_TAIL_MAX_MS)
            );
        }
        let mut plan = MigrationPlan::qemu_defaults(self.name(), input, verdict.clone());
        let f = input.features;
        let post = verdict.allowed;
        let throttle = input.throttle_permitted();
        // dirty-limit slows a writing vCPU by whatever factor brings it under the quota, which no
        // SLA throttle ceiling bounds; use it only where auto-converge is missing and the SLA
        // tolerates any throttle.
        let dirty_limit =
            throttle && f.dirty_limit && !f.auto_converge && input.sla.max_throttle_pct >= 99;
        let multifd = f.multifd && (!post || f.multifd_with_postcopy);
        plan.capabilities = Capabilities {
            postcopy_ram: post,
            postcopy_preempt: post && f.postcopy_preempt,
            auto_converge: throttle && f.auto_converge && !dirty_limit,
            dirty_limit,
            multifd,
            // XBZRLE misses ~99 % of its cache on random writers (Proxmox forum, manager-policies
            // §c.10) and is incompatible with multifd; we leave it off.
            xbzrle: false,
        };
        let ceiling = downtime_ceiling(input);
        let link = input
            .link_bytes_per_s
            .map(|l| input.host_bandwidth_cap().map_or(l, |c| c.min(l)));
        let max_throttle = input.sla.max_throttle_pct.min(99);
        plan.parameters = MigrationParameters {
            downtime_limit_ms: ceiling.min(START_DOWNTIME_MS),
            max_bandwidth_bytes_per_s: input.host_bandwidth_cap().unwrap_or(UNLIMITED_BANDWIDTH),
            cpu_throttle_initial_pct: QEMU_THROTTLE_INITIAL_PCT.min(max_throttle.max(1)),
            cpu_throttle_increment_pct: QEMU_THROTTLE_INCREMENT_PCT,
            max_cpu_throttle_pct: max_throttle.max(1),
            vcpu_dirty_limit_mb_per_s: dirty_limit.then(|| {
                // Let each vCPU dirty at most a quarter of the link, so the set drains.
                let per_vcpu = link.unwrap_or(ASSUMED_LINK_BYTES_PER_S) as f64
                    / 4.0
                    / f64::from(input.vm.vcpus.max(1))
                    / 1e6;
                per_vcpu.max(1.0) as u64
            }),
            multifd_channels: if multifd { 2 } else { 1 },
            ..MigrationParameters::default()
        };
        plan.postcopy_recovery = post && f.postcopy_recovery;
        let first_pass_ms = plan
            .estimate
            .first_pass_ms
            .unwrap_or_else(|| input.vm.ram_bytes.saturating_mul(1000) / ASSUMED_LINK_BYTES_PER_S);
        let budget = default_budget_ms(input.context, first_pass_ms);
        plan.deadline_ms = Some(input.deadline_ms.unwrap_or(budget));
        plan.reasons = vec![
            format!(
                "context {}, SLA {:?}: max downtime {} ms, max throttle {} %, post-copy acceptable {}",
                input.context,
                input.sla.name,
                input.max_downtime_ms(),
                input.sla.max_throttle_pct,
                input.sla.post_copy_acceptable
            ),
            format!(
                "post-copy: {} ({})",
                if post { "allowed" } else { "not used" },
                verdict.reason
            ),
            format!(
                "downtime-limit {} ms = min({START_DOWNTIME_MS}, SLA {} − switchover {} ms), raised up to {} ms only if the model needs it",
                plan.parameters.downtime_limit_ms,
                input.max_downtime_ms(),
                input.switchover_overhead_ms,
                ceiling
            ),
            format!(
                "deadline {} ({})",
                secs(plan.deadline_ms.unwrap_or(0) as f64),
                if input.deadline_ms.is_some() {
                    "given"
                } else {
                    "default budget from first pass estimate"
                }
            ),
            format!(
                "throttle: {}",
                if plan.capabilities.dirty_limit {
                    "dirty-limit (gentler than auto-converge)".to_string()
                } else if plan.capabilities.auto_converge {
                    format!("auto-converge up to {} %", max_throttle)
                } else {
                    "none".to_string()
                }
            ),
        ];
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let st = self.state(plan);
        match obs {
            Observation::PassCompleted(s) => {
                st.note_link(s);
                st.model.observe_pass(s);
                let status = st.stall.observe(s);
                if s.phase == Phase::Postcopy {
                    st.finished_by = Some(Action::SwitchToPostcopy);
                }
                let out = st.on_pass(plan, s, &status);
                st.update_eta(plan, s.at_ms);
                if out.is_empty() {
                    vec![Decision::cont(format!("no change at pass {}", s.pass))]
                } else {
                    out
                }
            }
            Observation::Tick { at_ms, latest } => {
                if let Some(s) = latest {
                    st.note_link(s);
                    st.model.observe_tick(s);
                    if s.phase == Phase::Postcopy {
                        st.finished_by = Some(Action::SwitchToPostcopy);
                    }
                }
                let out = st.on_tick(plan, *at_ms, latest.as_ref());
                st.update_eta(plan, *at_ms);
                out
            }
        }
    }

    fn eta(&self) -> Option<Eta> {
        self.state.as_ref().and_then(|s| s.eta)
    }
}

impl State {
    fn note_link(&mut self, s: &IterationSample) {
        if s.phase == Phase::Precopy
            && link_degraded(s.throughput_bytes_per_s, self.model.bandwidth())
        {
            self.link_trouble = true;
        }
    }

    /// Whether a switch to post-copy is open now with `remaining` bytes left: the plan allows
    /// it, and either recovery is armed or the tail is short over a link that stayed healthy.
    fn postcopy_ok(&self, plan: &MigrationPlan, remaining: u64) -> bool {
        if !plan.may_switch_to_postcopy() {
            return false;
        }
        if plan.postcopy_recovery {
            return true;
        }
        let bw = self.bandwidth().unwrap_or(ASSUMED_LINK_BYTES_PER_S as f64);
        !self.link_trouble && remaining as f64 / bw * 1000.0 <= UNRECOVERABLE_TAIL_MAX_MS
    }

    fn bandwidth(&self) -> Option<f64> {
        self.model.bandwidth().filter(|b| *b > 0.0)
    }

    /// ms a forced finish (post-copy, else stop-and-copy) would take from a set of `remaining`.
    fn finish_cost_ms(&self, plan: &MigrationPlan, remaining: u64) -> u64 {
        let bw = self.bandwidth().unwrap_or(ASSUMED_LINK_BYTES_PER_S as f64);
        (remaining as f64 / bw * 1000.0) as u64 + plan.input.switchover_overhead_ms
    }

    fn deadline_presses(&self, plan: &MigrationPlan, now: u64, remaining: u64) -> Option<String> {
        let deadline = plan.deadline_ms?;
        let need = self.finish_cost_ms(plan, remaining);
        let margin = (need as f64 * FINISH_SAFETY) as u64 + FINISH_SLACK_MS;
        (now.saturating_add(margin) >= deadline).then(|| {
            format!(
                "deadline {} is {} away; finishing {} takes ≈{} (×{FINISH_SAFETY} + {} slack)",
                secs(deadline as f64),
                secs(deadline.saturating_sub(now) as f64),
                mib(remaining as f64),
                secs(need as f64),
                secs(FINISH_SLACK_MS as f64)
            )
        })
    }

    /// Finish now: post-copy when allowed, else stop-and-copy (`stop_now` pauses the guest;
    /// otherwise a hard downtime limit lets QEMU complete at its next check).
    fn finish(
        &mut self,
        plan: &MigrationPlan,
        s: &IterationSample,
        why: &str,
        stop_now: bool,
    ) -> Vec<Decision> {
        if link_degraded(s.throughput_bytes_per_s, self.model.bandwidth()) {
            return vec![Decision::cont(format!(
                "would finish ({why}) but the link is degraded: {} now vs {} smoothed; holding so a \
                 transient drop does not trigger a switch",
                mbit(s.throughput_bytes_per_s as f64),
                mbit(self.model.bandwidth().unwrap_or(0.0))
            ))];
        }
        let bw = self.bandwidth().unwrap_or(ASSUMED_LINK_BYTES_PER_S as f64);
        let remaining = s.remaining_bytes as f64;
        if self.postcopy_ok(plan, s.remaining_bytes) {
            self.finished_by = Some(Action::SwitchToPostcopy);
            return vec![Decision::new(
                Action::SwitchToPostcopy,
                format!(
                    "{why}; switching to post-copy with {} left at {}: ≈{} of degraded running{}",
                    mib(remaining),
                    mbit(bw),
                    secs(remaining / bw * 1000.0),
                    if plan.postcopy_recovery {
                        ", recovery armed"
                    } else {
                        ""
                    }
                ),
            )];
        }
        let blackout = remaining / bw * 1000.0;
        if stop_now || self.hard_stop_at.is_some() {
            self.finished_by = Some(Action::PauseGuest);
            return vec![Decision::new(
                Action::PauseGuest,
                format!(
                    "{why}; post-copy not available ({}); pausing the guest to finish: {} at {} ≈ {} blackout",
                    plan.post_copy.reason,
                    mib(remaining),
                    mbit(bw),
                    secs(blackout)
                ),
            )];
        }
        let ms = ((blackout * HARD_STOP_HEADROOM) as u64)
            .clamp(self.downtime_ms + 1, QEMU_MAX_DOWNTIME_MS);
        self.downtime_ms = ms;
        self.hard_stop_at = Some(s.at_ms);
        vec![Decision::new(
            Action::SetDowntimeLimit { ms },
            format!(
                "{why}; post-copy not available ({}); stop-and-copy at this local minimum: {} at {} ≈ {} \
                 blackout, downtime-limit {} ms (×{HARD_STOP_HEADROOM})",
                plan.post_copy.reason,
                mib(remaining),
                mbit(bw),
                secs(blackout),
                ms
            ),
        )]
    }

    fn on_pass(
        &mut self,
        plan: &MigrationPlan,
        s: &IterationSample,
        status: &StallStatus,
    ) -> Vec<Decision> {
        if let Some(done) = self.finished_by {
            return vec![Decision::cont(format!(
                "already finishing by {done:?}; {} left",
                mib(s.remaining_bytes as f64)
            ))];
        }
        let input = &plan.input;
        let now = s.at_ms;
        let still_shrinking = self
            .prev_pass_remaining
            .is_some_and(|p| (s.remaining_bytes as f64) < p as f64 * STILL_SHRINKING_SHARE);
        self.prev_pass_remaining = Some(s.remaining_bytes);
        if s.throttle_pct.is_some_and(|t| t > 0) && self.throttled_since.is_none() {
            self.throttled_since = Some(now);
        }
        if self.hard_stop_at.is_some() {
            // The raised limit did not complete at QEMU's next check (the set grew or the link
            // slowed): pause so it cannot run on.
            return self.finish(
                plan,
                s,
                "hard stop-and-copy did not complete by the next pass",
                true,
            );
        }
        if s.pass < 2 {
            return vec![Decision::cont(format!(
                "first pass (dirty-sync-count {}): {} of RAM left to send",
                s.pass,
                mib(s.remaining_bytes as f64)
            ))];
        }
        let Some(bw) = self.bandwidth() else {
            return vec![Decision::cont(format!(
                "no throughput measured yet at pass {} ({} left)",
                s.pass,
                mib(s.remaining_bytes as f64)
            ))];
        };
        let throttle_now = s.throttle_pct.unwrap_or(0);
        let Some(now_pred) = self.model.predict(self.downtime_ms, throttle_now) else {
            return vec![Decision::cont(format!(
                "no prediction yet at pass {} ({} left)",
                s.pass,
                mib(s.remaining_bytes as f64)
            ))];
        };
        let deadline = plan.deadline_ms;
        let in_time = |p: &Prediction| match (p.eta_ms, deadline) {
            (Some(eta), Some(d)) => now + eta + input.switchover_overhead_ms <= d,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let pressing = self.deadline_presses(plan, now, s.remaining_bytes);
        if now_pred.converges && in_time(&now_pred) && pressing.is_none() {
            return vec![Decision::cont(format!(
                "pre-copy converges: {} left, {} passes, ETA {}, {} more to send at {} under {} ms",
                mib(s.remaining_bytes as f64),
                now_pred.passes,
                secs(now_pred.eta_ms.unwrap_or(0) as f64),
                mib(now_pred.bytes as f64),
                mbit(bw),
                self.downtime_ms
            ))];
        }
        let ceiling = downtime_ceiling(input);
        // Post-copy's cost to the guest: its degraded phase, halved with preempt.
        let postcopy_cost_ms = now_pred.postcopy_ms.unwrap_or(0) as f64
            * if plan.capabilities.postcopy_preempt {
                PREEMPT_IMPACT
            } else {
                1.0
            };
        // A blackout stops the guest entirely; when recovery covers post-copy's link risk and its
        // degraded phase costs less than the blackout a raised limit would bring, prefer it.
        let prefer_postcopy = plan.may_switch_to_postcopy()
            && plan.postcopy_recovery
            && postcopy_cost_ms < now_pred.downtime_needed_ms as f64;
        // Does a higher downtime limit within the SLA make it converge (at the current throttle)?
        let need = ((now_pred.downtime_needed_ms as f64) * RAISE_HEADROOM).ceil() as u64;
        if !now_pred.converges
            && !prefer_postcopy
            && !still_shrinking
            && need > self.downtime_ms
            && need <= ceiling
        {
            let p = self.model.predict(need, throttle_now);
            if p.is_some_and(|p| p.converges) {
                let old = self.downtime_ms;
                self.downtime_ms = need;
                return vec![Decision::new(
                    Action::SetDowntimeLimit { ms: need },
                    format!(
                        "pass size settles near {} at {}: needs ≈{} ms; raising downtime-limit {old} → {need} ms \
                         (SLA ceiling {ceiling} ms)",
                        mib(now_pred.steady_remaining_bytes as f64),
                        mbit(bw),
                        now_pred.downtime_needed_ms
                    ),
                )];
            }
        }
        // Would QEMU's auto-converge, within the SLA's throttle ceiling, get there?
        // QEMU raises the throttle by one increment per two sync periods of at least 1 s
        // (`ram.c::migration_trigger_throttle`), so reaching the ceiling takes time.
        let pass_ms = self
            .model
            .last_boundary()
            .map_or(1000, |b| (b.remaining_bytes as f64 / bw * 1000.0) as u64)
            .max(1000);
        let steps = u64::from(self.throttle_max.saturating_sub(throttle_now))
            .div_ceil(u64::from(plan.parameters.cpu_throttle_increment_pct.max(1)));
        let ramp_ms = steps * 2 * pass_ms;
        let with_throttle = self.model.predict(ceiling, self.throttle_max);
        let throttle_converges = self.throttle_max > throttle_now
            && with_throttle.is_some_and(|p| {
                p.converges
                    && in_time(&Prediction {
                        eta_ms: p.eta_ms.map(|e| e + ramp_ms),
                        ..p
                    })
            });
        // Throttling costs its percentage of the guest for the ramp and the rest of pre-copy;
        // post-copy costs its degraded phase. Prefer the cheaper when both are allowed.
        let throttle_cost_ms = with_throttle
            .and_then(|p| p.eta_ms)
            .map_or(f64::INFINITY, |e| {
                (e + ramp_ms) as f64 * f64::from(self.throttle_max) / 100.0 / 2.0
            });

        // The measured ratio ρ = dirty rate / link over the pass just synced. QEMU's
        // `dirty-pages-rate` counts distinct pages per second of the sync period, and the
        // distinct-pages curve D(T) is concave with D(0) = 0, so the next pass (shorter than the
        // period, since it sends what the period dirtied) dirties at least ρ × its own size:
        // ρ ≥ 1 means no pass can shrink. auto-converge at throttle t scales the write rate by
        // (1 − t) and the distinct rate by at least as much, so ρ·(1 − t_max) ≥ 1 means no
        // throttle within the SLA helps either. That is known at the first boundary: act there
        // instead of a pass later (the quick bench lost 31–33 % of total time at ρ ≈ 1 and 3).
        // The rate was measured under the current throttle; rescale it to the ceiling.
        let rho = s.dirty_bytes_per_s() / bw;
        let rho_at_max_throttle = rho
            * (1.0 - f64::from(self.throttle_max.max(throttle_now)) / 100.0)
            / (1.0 - f64::from(throttle_now.min(99)) / 100.0);
        let rho_says_never = !now_pred.converges && rho_at_max_throttle >= 1.0;
        let throttle_helps = throttle_converges
            && !rho_says_never
            && !(self.postcopy_ok(plan, s.remaining_bytes) && postcopy_cost_ms < throttle_cost_ms);
        let needed = evidence_needed(plan);
        let probe = u64::from(input.probe.is_some());
        let confirmed = status.stalled
            || rho_says_never
            || (!now_pred.converges && self.model.boundaries() + probe >= needed);
        if confirmed && self.stalled_at.is_none() {
            self.stalled_at = Some(now);
        }
        if let Some(why) = pressing.filter(|_| input.context.must_finish()) {
            return self.finish(plan, s, &why, true);
        }
        if throttle_helps {
            return vec![Decision::cont(format!(
                "not converging at throttle {throttle_now} % (steady {}); auto-converge up to {} % is predicted to converge",
                mib(now_pred.steady_remaining_bytes as f64),
                self.throttle_max
            ))];
        }
        if now_pred.converges {
            // An evacuation wants the host empty soon: if switching now finishes much sooner
            // than the remaining pre-copy, and a link failure could be recovered, switch.
            let pre = now_pred.eta_ms.unwrap_or(0);
            let post = now_pred.postcopy_ms.unwrap_or(0);
            if input.context == MigrationContext::Evacuate
                && plan.may_switch_to_postcopy()
                && plan.postcopy_recovery
                && pre > post * 3 / 2 + 2_000
            {
                return self.finish(
                    plan,
                    s,
                    &format!(
                        "evacuate: pre-copy needs ≈{} more but post-copy only ≈{}",
                        secs(pre as f64),
                        secs(post as f64)
                    ),
                    false,
                );
            }
            return vec![Decision::cont(format!(
                "pre-copy converges but late: ETA {} from {} vs deadline {}; finishing when the deadline presses",
                secs(now_pred.eta_ms.unwrap_or(0) as f64),
                secs(now as f64),
                secs(deadline.unwrap_or(0) as f64)
            ))];
        }
        if !confirmed {
            return vec![Decision::cont(format!(
                "not yet converging ({} left, steady ≈{}); waiting for more passes before acting",
                mib(s.remaining_bytes as f64),
                mib(now_pred.steady_remaining_bytes as f64)
            ))];
        }
        let why = format!(
            "pre-copy cannot finish within the SLA: steady pass ≈{} at {} needs ≈{} ms downtime \
             (ceiling {ceiling} ms) at throttle up to {} % (measured ρ {rho:.2}, {:.2} at that \
             throttle); stall window min {}, best {}",
            mib(now_pred.steady_remaining_bytes as f64),
            mbit(bw),
            now_pred.downtime_needed_ms,
            self.throttle_max,
            rho_at_max_throttle,
            status.window_min.map_or("-".into(), |v| mib(v as f64)),
            status.best.map_or("-".into(), |v| mib(v as f64)),
        );
        // Without a windowed stall the passes are still shrinking towards the model's steady
        // size: the minimum is reached when the pass is within 10 % of it.
        let at_min = if status.stalled {
            status.at_local_minimum
        } else {
            s.remaining_bytes as f64 <= now_pred.steady_remaining_bytes as f64 * 1.1
        };
        match input.context {
            MigrationContext::Evacuate => {
                // Post-copy total time from here is remaining / link whenever we switch, so an
                // evacuation switches at once. A stop-and-copy beyond the SLA is a broken
                // promise, so without post-copy tern keeps pre-copying (the workload may calm,
                // the model may be pessimistic) until the evacuation's deadline presses, and
                // only then stops the guest (`deadline_presses` above). The simulator saw 70 of
                // 250 evacuations break the SLA at the first local minimum where the baselines,
                // still pre-copying, converged within it.
                if self.postcopy_ok(plan, s.remaining_bytes) {
                    self.finish(plan, s, &format!("evacuate: {why}"), false)
                } else {
                    vec![Decision::cont(format!(
                        "evacuate: {why}; pre-copying on until the deadline presses ({} now, local \
                         minimum: {at_min})",
                        mib(s.remaining_bytes as f64)
                    ))]
                }
            }
            MigrationContext::Maintenance => {
                let budget = deadline.unwrap_or(0);
                let patience = ((budget as f64 * MAINTENANCE_PATIENCE_SHARE) as u64)
                    .min(MAINTENANCE_PATIENCE_MAX_MS);
                let waited = now.saturating_sub(self.stalled_at.unwrap_or(now));
                // Waiting only helps a stop-and-copy (the blackout shrinks if the workload calms);
                // post-copy's cost is the same later, so it goes at the local minimum.
                let patience = if self.postcopy_ok(plan, s.remaining_bytes) {
                    0
                } else {
                    patience
                };
                if waited >= patience && at_min {
                    self.finish(
                        plan,
                        s,
                        &format!(
                            "maintenance: {why}; waited {} for the workload to calm",
                            secs(waited as f64)
                        ),
                        false,
                    )
                } else {
                    vec![Decision::cont(format!(
                        "maintenance: {why}; waiting ({} of {} patience, local minimum: {at_min})",
                        secs(waited as f64),
                        secs(patience as f64)
                    ))]
                }
            }
            MigrationContext::Balance | MigrationContext::Manual => {
                let over_budget = deadline.is_some_and(|d| now >= d);
                // Manual: an operator asked for the move without saying why. Post-copy (when
                // the SLA accepts it) is the gentle way to finish, so take it as balance does;
                // without it, keep trying pre-copy until the budget rather than abort at once
                // (the workload may calm), but bound what that costs the guest: once QEMU's
                // auto-converge throttles it (which cannot be undone mid-migration) and the
                // throttle does not buy convergence (else `throttle_helps` above), wait at most
                // maintenance's patience (25 % of the budget, ≤ 30 s) more, then abort. The
                // simulator saw 80–104 s of throttle per manual migration without the bound.
                let throttled_ms = self.throttled_since.map_or(0, |t| now.saturating_sub(t));
                let patience = ((deadline.unwrap_or(0) as f64 * MAINTENANCE_PATIENCE_SHARE) as u64)
                    .min(MAINTENANCE_PATIENCE_MAX_MS);
                if !over_budget
                    && !self.postcopy_ok(plan, s.remaining_bytes)
                    && (throttle_now == 0 || throttled_ms < patience)
                {
                    return vec![Decision::cont(format!(
                        "manual: {why}; throttled {} of {} patience, continuing until the budget {}",
                        secs(throttled_ms as f64),
                        secs(patience as f64),
                        secs(deadline.unwrap_or(0) as f64)
                    ))];
                }
                if self.postcopy_ok(plan, s.remaining_bytes) {
                    // As for evacuate: post-copy's remaining time is remaining ÷ link whenever
                    // the switch happens, and waiting for a local minimum only spends more
                    // passes (the lab saw a fourth pass spent waiting); switch once confirmed.
                    self.finish(plan, s, &format!("{}: {why}", input.context), false)
                } else {
                    self.finished_by = Some(Action::Abort);
                    vec![Decision::new(
                        Action::Abort,
                        format!(
                            "{}: {why}; post-copy not acceptable ({}); aborting rather than exceed \
                             SLA max downtime {} ms",
                            input.context,
                            plan.post_copy.reason,
                            input.max_downtime_ms()
                        ),
                    )]
                }
            }
        }
    }

    fn on_tick(
        &mut self,
        plan: &MigrationPlan,
        now: u64,
        latest: Option<&IterationSample>,
    ) -> Vec<Decision> {
        if self.finished_by.is_some() {
            return vec![];
        }
        let Some(s) = latest else { return vec![] };
        let input = &plan.input;
        let deadline = plan.deadline_ms;
        if input.context.must_finish() {
            // Between boundaries (a long first pass), the deadline may still press.
            let remaining = s.remaining_bytes;
            if let Some(why) = self.deadline_presses(plan, now, remaining) {
                let mut s2 = *s;
                s2.at_ms = now;
                return self.finish(plan, &s2, &why, true);
            }
            return vec![];
        }
        if deadline.is_some_and(|d| now >= d) {
            let why = format!(
                "{}: budget {} spent with {} left",
                input.context,
                secs(deadline.unwrap_or(0) as f64),
                mib(s.remaining_bytes as f64)
            );
            if self.postcopy_ok(plan, s.remaining_bytes)
                && !link_degraded(s.throughput_bytes_per_s, self.model.bandwidth())
            {
                self.finished_by = Some(Action::SwitchToPostcopy);
                return vec![Decision::new(
                    Action::SwitchToPostcopy,
                    format!("{why}; SLA accepts post-copy"),
                )];
            }
            self.finished_by = Some(Action::Abort);
            return vec![Decision::new(
                Action::Abort,
                format!(
                    "{why}; finishing would exceed SLA max downtime {} ms",
                    input.max_downtime_ms()
                ),
            )];
        }
        vec![]
    }

    /// The ETA while pre-copy runs, from the latest sample:
    /// * **what is left of the current pass on the wire.** In the first pass QEMU's `remaining`
    ///   counts every page not yet scanned, but zero and never-touched pages go as zero-page
    ///   markers that cost almost nothing. The share of scanned pages that cost bytes,
    ///   `transferred ÷ (total − remaining)`, scales what is left (an idle guest's ETA was +128 %
    ///   at 25 % progress without it);
    /// * **then what the policy intends.** If the model says pre-copy converges (at the throttle
    ///   tern allows), its passes. Otherwise tern waits for the evidence it needs
    ///   ([`evidence_needed`]; none when the measured ρ already rules pre-copy out, and
    ///   maintenance's patience before a stop-and-copy) and finishes the steady set by post-copy
    ///   or stop-and-copy. Balance and manual without post-copy will abort: no finish time.
    fn precopy_eta(&self, plan: &MigrationPlan, now: u64, bw: f64) -> Option<Eta> {
        let s = self.model.last_sample()?;
        let input = &plan.input;
        let remaining = s.remaining_bytes as f64;
        let first_pass = s.pass < 2 || self.model.last_boundary().is_none();
        let wire_share = if first_pass {
            let scanned = s.total_bytes.saturating_sub(s.remaining_bytes) as f64;
            if scanned > 0.0 && (s.transferred_bytes as f64) < scanned {
                (s.transferred_bytes as f64 / scanned).clamp(0.01, 1.0)
            } else {
                1.0
            }
        } else {
            1.0
        };
        let pass_left_ms = remaining * wire_share / bw * 1000.0;
        // The pass after the current one, and the prediction from there.
        let (next_bytes, origin_ms) = if first_pass {
            let first_pass_s = (now as f64 + pass_left_ms) / 1000.0;
            (
                self.model.dirtied_in(first_pass_s, 0.0),
                now as f64 + pass_left_ms,
            )
        } else {
            let b = self.model.last_boundary()?;
            (b.remaining_bytes as f64, b.at_ms as f64)
        };
        let finish = |ms: f64, mode: EtaMode| {
            Some(Eta {
                at_ms: now,
                finish_at_ms: Some((ms.max(now as f64)) as u64),
                remaining_bytes: s.remaining_bytes,
                mode,
            })
        };
        let overhead = input.switchover_overhead_ms as f64;
        if next_bytes <= 0.0 {
            return finish(now as f64 + pass_left_ms + overhead, EtaMode::Precopy);
        }
        let throttled =
            self.model
                .predict_from(next_bytes, bw, self.downtime_ms, self.throttle_max);
        if throttled.converges {
            let eta = throttled.eta_ms.unwrap_or(0) as f64;
            return finish(origin_ms + eta + overhead, EtaMode::Precopy);
        }
        let throttle_now = s.throttle_pct.unwrap_or(0);
        let p = self
            .model
            .predict_from(next_bytes, bw, self.downtime_ms, throttle_now);
        let postcopy = self.postcopy_ok(plan, p.steady_remaining_bytes);
        if !postcopy && !input.context.must_finish() {
            return Some(Eta {
                at_ms: now,
                finish_at_ms: None,
                remaining_bytes: s.remaining_bytes,
                mode: EtaMode::NotConverging,
            });
        }
        let steady = (p.steady_remaining_bytes as f64).max(1.0);
        let steady_ms = steady / bw * 1000.0;
        // The policy acts at the next boundary when it has the evidence by then (or a measured
        // ρ rules pre-copy out); otherwise one more pass of the steady size per missing point.
        let rate = if first_pass {
            self.model.dirty_rate().unwrap_or(0.0)
        } else {
            s.dirty_bytes_per_s()
        };
        let rho = rate / bw * (1.0 - f64::from(self.throttle_max) / 100.0);
        let have = self.model.boundaries() + u64::from(input.probe.is_some());
        let extra = if self.stalled_at.is_some() || rho >= 1.0 {
            0
        } else {
            evidence_needed(plan).saturating_sub(have + 1)
        };
        let patience = if !postcopy && input.context == MigrationContext::Maintenance {
            let budget = plan.deadline_ms.unwrap_or(0) as f64;
            let waited = self.stalled_at.map_or(0, |t| now.saturating_sub(t)) as f64;
            ((budget * MAINTENANCE_PATIENCE_SHARE).min(MAINTENANCE_PATIENCE_MAX_MS as f64) - waited)
                .max(0.0)
        } else {
            0.0
        };
        let next_boundary = now as f64 + pass_left_ms;
        // An evacuation without post-copy pre-copies on until its deadline presses
        // (`deadline_presses`: finishing would take ×FINISH_SAFETY + slack of the time left),
        // then stops the guest.
        let stop_at = match plan.deadline_ms {
            Some(d) if !postcopy && input.context == MigrationContext::Evacuate => {
                let need = steady_ms + overhead;
                (d as f64 - need * FINISH_SAFETY - FINISH_SLACK_MS as f64).max(next_boundary)
            }
            _ => next_boundary + extra as f64 * steady_ms + patience,
        };
        finish(
            stop_at + steady_ms + overhead,
            if postcopy {
                EtaMode::Postcopy
            } else {
                EtaMode::StopAndCopy
            },
        )
    }

    fn update_eta(&mut self, plan: &MigrationPlan, now: u64) {
        let bw = self.bandwidth();
        let remaining = self.model.last_sample().map_or(0, |s| s.remaining_bytes);
        self.eta = match self.finished_by {
            Some(Action::Abort) => None,
            Some(Action::SwitchToPostcopy) | Some(Action::PauseGuest) => bw.map(|b| Eta {
                at_ms: now,
                finish_at_ms: Some(
                    now + (remaining as f64 / b * 1000.0) as u64
                        + plan.input.switchover_overhead_ms,
                ),
                remaining_bytes: remaining,
                mode: if self.finished_by == Some(Action::PauseGuest) {
                    EtaMode::StopAndCopy
                } else {
                    EtaMode::Postcopy
                },
            }),
            _ => bw.and_then(|b| self.precopy_eta(plan, now, b)),
        };
        if let (Some(eta), Some(_)) = (self.eta.as_mut(), self.hard_stop_at) {
            eta.mode = EtaMode::StopAndCopy;
        }
    }
}
