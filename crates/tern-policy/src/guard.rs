//! A wrapper that enforces the plan's permissions on any policy's decisions.

use crate::MigrationPolicy;
use crate::limits::{QEMU_MAX_CPU_THROTTLE_PCT, QEMU_MAX_DOWNTIME_MS};
use crate::model::Eta;
use crate::observe::{Action, Decision, Observation, Phase};
use crate::plan::{MigrationPlan, PlanInput};

/// Enforces, whatever the inner policy says:
/// * no `SwitchToPostcopy` unless the plan's post-copy verdict allowed it and enabled
///   `postcopy-ram` (post-copy needs the capability on both ends before `migrate`);
/// * no `Abort` once post-copy started (QEMU/libvirt refuse it and the guest already runs on the
///   destination; Nova's `live_migrate_abort` and KubeVirt's monitor also skip it);
/// * no second terminal choice after a switch or pause;
/// * `downtime-limit` within QEMU's 1..=2 000 000 ms and throttle ≤ 99 % (Proxmox bug #7044).
///
/// A refused action becomes `Continue` whose reason says what was refused and why.
pub struct PermissionGuard {
    inner: Box<dyn MigrationPolicy>,
    switched: bool,
    paused: bool,
}

impl PermissionGuard {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn MigrationPolicy>) -> Self {
        PermissionGuard {
            inner,
            switched: false,
            paused: false,
        }
    }

    /// Applies the rules to one decision.
    pub fn check(&mut self, plan: &MigrationPlan, at_ms: u64, d: Decision) -> Decision {
        let refuse = |why: String| Decision::cont(format!("{why} (at {at_ms} ms)"));
        match d.action {
            Action::SwitchToPostcopy if !plan.may_switch_to_postcopy() => refuse(format!(
                "refused SwitchToPostcopy from {}: {} (postcopy-ram enabled: {})",
                plan.policy, plan.post_copy.reason, plan.capabilities.postcopy_ram
            )),
            Action::SwitchToPostcopy | Action::PauseGuest if self.switched || self.paused => {
                refuse(format!(
                    "refused {:?}: post-copy or pause already started",
                    d.action
                ))
            }
            Action::Abort if self.switched => {
                refuse("refused Abort: post-copy started, the guest runs on the destination".into())
            }
            Action::SwitchToPostcopy => {
                self.switched = true;
                d
            }
            Action::PauseGuest => {
                self.paused = true;
                d
            }
            Action::SetDowntimeLimit { ms } if !(1..=QEMU_MAX_DOWNTIME_MS).contains(&ms) => {
                let ms2 = ms.clamp(1, QEMU_MAX_DOWNTIME_MS);
                Decision::new(
                    Action::SetDowntimeLimit { ms: ms2 },
                    format!(
                        "{} (clamped {ms} ms to QEMU's range 1..=2000000 ms)",
                        d.reason
                    ),
                )
            }
            Action::SetCpuThrottle {
                initial_pct,
                increment_pct,
                max_pct,
            } if max_pct > QEMU_MAX_CPU_THROTTLE_PCT || initial_pct > QEMU_MAX_CPU_THROTTLE_PCT => {
                Decision::new(
                    Action::SetCpuThrottle {
                        initial_pct: initial_pct.min(QEMU_MAX_CPU_THROTTLE_PCT),
                        increment_pct,
                        max_pct: max_pct.min(QEMU_MAX_CPU_THROTTLE_PCT),
                    },
                    format!("{} (clamped to QEMU's 99 % maximum)", d.reason),
                )
            }
            _ => d,
        }
    }
}

impl MigrationPolicy for PermissionGuard {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let mut plan = self.inner.plan(input);
        if plan.capabilities.postcopy_ram && !plan.post_copy.allowed {
            plan.capabilities.postcopy_ram = false;
            plan.capabilities.postcopy_preempt = false;
            plan.reasons.push(format!(
                "guard: disabled postcopy-ram because {}",
                plan.post_copy.reason
            ));
        }
        if plan.capabilities.dirty_limit && plan.capabilities.auto_converge {
            plan.capabilities.auto_converge = false;
            plan.reasons
                .push("guard: dirty-limit excludes auto-converge (QEMU migrate_caps_check)".into());
        }
        plan.parameters.downtime_limit_ms = plan
            .parameters
            .downtime_limit_ms
            .clamp(1, QEMU_MAX_DOWNTIME_MS);
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        if obs.sample().is_some_and(|s| s.phase == Phase::Postcopy) {
            self.switched = true;
        }
        let out = self.inner.decide(plan, obs);
        let at = obs.at_ms();
        out.into_iter().map(|d| self.check(plan, at, d)).collect()
    }

    fn eta(&self) -> Option<Eta> {
        self.inner.eta()
    }
}
