//! How long one migration takes at a given bandwidth, and the per-pass rule that decides how it
//! ends.
//!
//! Dirtying follows tern-policy's convergence model (`model.rs`): during an interval `T` a guest
//! with writable working set `W` and raw write rate `r` dirties `D(T) = W(1 − e^{−rT/W})`
//! distinct bytes (the formula is private there, so [`dirtied_in`] copies it). Pre-copy sends
//! RAM, then what was dirtied meanwhile, and so on: with `ρ = r/b` the passes shrink roughly
//! geometrically while `ρ < 1` and total `RAM/(1−ρ)`; at `ρ ≥ 1` they never shrink and the
//! migration needs post-copy, throttling or a stop-and-copy. Post-copy after the first pass is
//! bounded: `RAM/b` plus one pass of `D(RAM/b)/b`.
//!
//! [`ConvergenceRule`] is the runtime rule at each pass boundary (a simplified `TernPolicy`:
//! continue while pre-copy converges promptly, else finish by context). The planner applies it
//! at constant bandwidth ([`predict_duration`]); the evaluator (`evaluate.rs`) applies the same
//! rule to a time-stepped simulation with bandwidth that changes as other migrations start and
//! end, so the rule is the shared *policy*, not a shared prediction.

use serde::{Deserialize, Serialize};
use tern_policy::MigrationContext;

use crate::facts::{SWITCHOVER_OVERHEAD_MS, VmFacts};

/// Passes after which pre-copy is declared slow whatever the shrink ratio (Nova's
/// `live_migration_completion_timeout` and KubeVirt's progress timeout serve the same purpose).
pub const MAX_PRECOPY_PASSES: u32 = 30;
/// QEMU's `cpu-throttle-initial` (20 %) and `cpu-throttle-increment` (10 %): the throttle steps
/// the rule applies when post-copy is not available.
pub const THROTTLE_INITIAL_PCT: u8 = 20;
/// See [`THROTTLE_INITIAL_PCT`].
pub const THROTTLE_INCREMENT_PCT: u8 = 10;

/// `D(T) = W(1 − e^{−rT/W})`, copied from tern-policy `model.rs::dirty_curve` (private there).
pub fn dirtied_in(working_set: f64, rate: f64, t: f64) -> f64 {
    if working_set <= 0.0 || rate <= 0.0 || t <= 0.0 {
        return 0.0;
    }
    working_set * (1.0 - (-rate * t / working_set).exp())
}

/// What the rule decides at a pass boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PassStep {
    /// Send the next pass with pre-copy.
    Continue,
    /// The next pass fits the downtime budget: pause and send it (converged).
    FinalCopy,
    /// Switch to post-copy: the destination runs the guest, the rest is sent once.
    SwitchToPostCopy,
    /// Raise the vCPU throttle to this percentage and continue (QEMU auto-converge).
    RaiseThrottle(u8),
    /// Must finish and nothing else helps: pause and send the rest (downtime over the SLA).
    StopAndCopy,
    /// Optional migration that cannot honour the SLA: abort, the guest stays on its source.
    GiveUp,
}

/// Per-VM parameters of the rule, derived from the VM, its destination and the context.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConvergenceRule {
    /// Guest RAM, bytes.
    pub ram: f64,
    /// Writable working set, bytes.
    pub working_set: f64,
    /// Raw dirty rate, bytes/s.
    pub dirty_rate: f64,
    /// Blackout the SLA allows minus the switchover overhead, seconds.
    pub downtime_budget_s: f64,
    /// Post-copy may be used on this source/destination pair for this VM in this context.
    pub post_copy: bool,
    /// Highest throttle the SLA allows, %.
    pub max_throttle_pct: u8,
    /// The context requires completion (evacuate, maintenance).
    pub must_finish: bool,
    /// A pass must shrink below this fraction of the previous one to count as converging.
    /// Evacuation uses 0.25: every byte re-sent delays every VM queued behind it, so it
    /// finishes by post-copy earlier than maintenance or balance (0.5), which value the guest's
    /// calm over the makespan.
    pub slow_ratio: f64,
}

impl ConvergenceRule {
    /// The rule for `vm` going to a destination where post-copy is (or is not) permitted.
    /// `pair_permits_post_copy`: both hosts permit it and both QEMUs have `postcopy-ram`.
    pub fn new(vm: &VmFacts, context: MigrationContext, pair_permits_post_copy: bool) -> Self {
        let (dirty_rate, _) = vm.dirty_rate();
        // Evacuation must end in bounded time: post-copy is used whenever the hosts and the VM
        // permit it, even if the SLA class would rather not (as TernPolicy does for evacuate).
        let sla_ok = vm.sla.post_copy_acceptable || context == MigrationContext::Evacuate;
        ConvergenceRule {
            ram: vm.memory_bytes.max(4096) as f64,
            working_set: vm.working_set(),
            dirty_rate,
            downtime_budget_s: vm
                .sla
                .max_downtime_ms
                .saturating_sub(SWITCHOVER_OVERHEAD_MS)
                .max(1) as f64
                / 1000.0,
            post_copy: pair_permits_post_copy && vm.post_copy_allowed && sla_ok,
            max_throttle_pct: vm.sla.max_throttle_pct,
            must_finish: context.must_finish(),
            slow_ratio: if context == MigrationContext::Evacuate {
                0.25
            } else {
                0.5
            },
        }
    }

    /// The decision after pass `pass` (1 = the first full pass) that sent `prev` bytes while
    /// `next` bytes were dirtied, at bandwidth `bw` bytes/s and current throttle `throttle_pct`.
    pub fn at_pass_boundary(
        &self,
        pass: u32,
        prev: f64,
        next: f64,
        bw: f64,
        throttle_pct: u8,
    ) -> PassStep {
        if next <= bw * self.downtime_budget_s {
            return PassStep::FinalCopy;
        }
        let slow = next > self.slow_ratio * prev || pass >= MAX_PRECOPY_PASSES;
        if !slow {
            return PassStep::Continue;
        }
        if self.post_copy {
            return PassStep::SwitchToPostCopy;
        }
        if throttle_pct < self.max_throttle_pct {
            let raised = if throttle_pct == 0 {
                THROTTLE_INITIAL_PCT
            } else {
                throttle_pct.saturating_add(THROTTLE_INCREMENT_PCT)
            };
            return PassStep::RaiseThrottle(raised.min(self.max_throttle_pct));
        }
        if self.must_finish {
            PassStep::StopAndCopy
        } else {
            PassStep::GiveUp
        }
    }
}

/// How a migration is predicted to end.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum PredictedEnding {
    /// Pre-copy converges (possibly after throttling) within the SLA downtime.
    Converges {
        /// Pre-copy passes including the final one.
        passes: u32,
        /// Highest throttle applied, %.
        throttle_pct: u8,
    },
    /// Switches to post-copy after `passes` pre-copy passes.
    PostCopy {
        /// Pre-copy passes before the switch.
        passes: u32,
        /// Seconds in post-copy (degraded guest).
        post_copy_s: f64,
    },
    /// Must finish, cannot converge: stop-and-copy with a blackout over the SLA.
    StopAndCopy {
        /// Predicted blackout, ms.
        downtime_ms: u64,
    },
    /// Optional context and the SLA cannot be honoured: the migration would abort.
    GivesUp,
}

impl PredictedEnding {
    /// Whether the prediction involves post-copy.
    pub fn uses_post_copy(&self) -> bool {
        matches!(self, PredictedEnding::PostCopy { .. })
    }
}

/// Duration and bytes of one migration at constant bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DurationPrediction {
    /// Seconds from start to the guest running on the destination (or the abort).
    pub duration_s: f64,
    /// Bytes sent.
    pub bytes: f64,
    /// How it ends.
    pub ending: PredictedEnding,
}

/// Predicts one migration at constant bandwidth `bw` (bytes/s), starting with a first pass of
/// `first_pass` bytes (the RAM for a fresh migration, `remaining` for one in flight).
pub fn predict_from(rule: &ConvergenceRule, first_pass: f64, bw: f64) -> DurationPrediction {
    let bw = bw.max(1.0);
    let mut r = first_pass.max(0.0);
    let (mut t, mut bytes, mut throttle) = (0.0, 0.0, 0u8);
    let mut pass = 0u32;
    loop {
        let dt = r / bw;
        let rate = rule.dirty_rate * (1.0 - f64::from(throttle) / 100.0);
        let next = dirtied_in(rule.working_set, rate, dt);
        t += dt;
        bytes += r;
        pass += 1;
        let finish = |ending| DurationPrediction {
            duration_s: t + next / bw,
            bytes: bytes + next,
            ending,
        };
        match rule.at_pass_boundary(pass, r, next, bw, throttle) {
            PassStep::FinalCopy => {
                return finish(PredictedEnding::Converges {
                    passes: pass + 1,
                    throttle_pct: throttle,
                });
            }
            PassStep::SwitchToPostCopy => {
                return finish(PredictedEnding::PostCopy {
                    passes: pass,
                    post_copy_s: next / bw,
                });
            }
            PassStep::StopAndCopy => {
                return finish(PredictedEnding::StopAndCopy {
                    downtime_ms: (next / bw * 1000.0).ceil() as u64,
                });
            }
            PassStep::GiveUp => {
                return DurationPrediction {
                    duration_s: t,
                    bytes,
                    ending: PredictedEnding::GivesUp,
                };
            }
            PassStep::RaiseThrottle(p) => throttle = p,
            PassStep::Continue => {}
        }
        r = next;
    }
}

/// Predicts a fresh migration of the whole RAM at constant bandwidth `bw`.
pub fn predict_duration(rule: &ConvergenceRule, bw: f64) -> DurationPrediction {
    predict_from(rule, rule.ram, bw)
}

/// The fewest bytes a fresh migration can send: RAM once, plus whatever is dirtied during a
/// first pass at the fastest rate it could get (`best_bw`), which the next pass, the post-copy
/// tail or the stop-and-copy must send. A valid lower bound for any schedule.
pub fn min_bytes(rule: &ConvergenceRule, best_bw: f64) -> f64 {
    rule.ram
        + dirtied_in(
            rule.working_set,
            rule.dirty_rate,
            rule.ram / best_bw.max(1.0),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_policy::SlaCatalog;

    const GIB: u64 = 1 << 30;

    fn vm(dirty: u64, post_copy: bool, class: &str) -> VmFacts {
        VmFacts {
            name: "v".into(),
            host: "h0".into(),
            memory_bytes: 4 * GIB,
            dirty_bytes_per_s: Some(dirty),
            working_set_bytes: None,
            sla: SlaCatalog::builtin().get(class).unwrap().clone(),
            post_copy_allowed: post_copy,
            required_features: Default::default(),
        }
    }

    #[test]
    fn idle_vm_takes_ram_over_bandwidth() {
        let r = ConvergenceRule::new(&vm(0, true, "standard"), MigrationContext::Evacuate, true);
        let p = predict_duration(&r, 1e9);
        assert!((p.duration_s - 4.0 * GIB as f64 / 1e9).abs() < 1e-6);
        assert!(matches!(p.ending, PredictedEnding::Converges { .. }));
    }

    #[test]
    fn fast_writer_needs_post_copy_and_is_bounded() {
        // ρ = 2: pre-copy never converges; post-copy is RAM/b plus one working set.
        let v = vm(2_000_000_000, true, "standard");
        let r = ConvergenceRule::new(&v, MigrationContext::Evacuate, true);
        let p = predict_duration(&r, 1e9);
        assert!(p.ending.uses_post_copy(), "{p:?}");
        assert!(p.duration_s <= 2.0 * 4.0 * GIB as f64 / 1e9 + 1e-6);
        // No post-copy, evacuate: throttles up to the SLA then stop-and-copy, and is slower.
        let r2 = ConvergenceRule::new(&v, MigrationContext::Evacuate, false);
        let p2 = predict_duration(&r2, 1e9);
        assert!(
            matches!(p2.ending, PredictedEnding::StopAndCopy { .. }),
            "{p2:?}"
        );
        assert!(p2.duration_s > p.duration_s);
        // Balance, latency-critical (no post-copy, 10 % throttle): gives up.
        let v3 = vm(2_000_000_000, true, "latency-critical");
        let r3 = ConvergenceRule::new(&v3, MigrationContext::Balance, true);
        assert_eq!(predict_duration(&r3, 1e9).ending, PredictedEnding::GivesUp);
    }

    #[test]
    fn agrees_with_tern_policy_preflight_for_a_converging_guest() {
        use tern_policy::{DirtyRateProbe, PlanInput, QemuFeatures, VmLimits, preflight_estimate};
        let v = vm(1 << 20, true, "standard");
        let mut input = PlanInput::new(
            MigrationContext::Maintenance,
            v.sla.clone(),
            VmLimits::new(v.memory_bytes),
            QemuFeatures::qemu_10_tcg(),
        );
        input.link_bytes_per_s = Some(125_000_000);
        input.probe = Some(DirtyRateProbe {
            period_ms: 1000,
            dirty_bytes_per_s: 1 << 20,
        });
        let e = preflight_estimate(&input);
        let ours = predict_duration(
            &ConvergenceRule::new(&v, MigrationContext::Maintenance, true),
            125e6,
        );
        let theirs = e.precopy_total_ms.unwrap() as f64 / 1000.0;
        assert!(
            (ours.duration_s - theirs).abs() / theirs < 0.05,
            "ours {} vs preflight {theirs}",
            ours.duration_s
        );
    }

    #[test]
    fn min_bytes_never_exceeds_prediction() {
        for dirty in [0u64, 1 << 20, 100 << 20, 1 << 30, 4 << 30] {
            for pc in [true, false] {
                let r =
                    ConvergenceRule::new(&vm(dirty, pc, "batch"), MigrationContext::Evacuate, pc);
                for bw in [1e8, 1e9, 3e9] {
                    let p = predict_duration(&r, bw);
                    assert!(p.bytes + 1.0 >= min_bytes(&r, bw), "{dirty} {pc} {bw}");
                }
            }
        }
    }
}
