//! tern's policy core: pure functions from (context, SLA, limits, features, observations) to
//! migration actions, each with a reason that cites its numbers.
//!
//! No I/O, no async, no clock: time arrives inside [`Observation`]s as milliseconds since the
//! migration started. The same inputs always give the same outputs, which is what lets the
//! simulator (`tern-sim`) run thousands of migrations per second and property tests check
//! invariants.
//!
//! The engine's loop:
//! 1. `let policy = policy_by_name("tern")?;` (or a baseline, see [`POLICY_NAMES`])
//! 2. `let plan = policy.plan(&input);` → set `plan.capabilities` and `plan.parameters` on both
//!    QEMUs, then `migrate`.
//! 3. On every `dirty-sync-count` increment call `decide(&plan, &Observation::PassCompleted(..))`,
//!    and every poll `decide(&plan, &Observation::Tick{..})`; execute the returned actions in order.
//! 4. `policy.eta()` for progress display; [`preflight_estimate`] before starting.
//!
//! Policies returned by [`policy_by_name`] are wrapped in [`PermissionGuard`], which refuses any
//! action the plan does not permit (for example `SwitchToPostcopy` without the `postcopy-ram`
//! verdict), so a baseline's bug cannot break a host's rules.

pub mod baselines;
mod guard;
mod limits;
mod model;
mod names;
mod observe;
mod plan;
mod postcopy;
mod sla;
mod stall;
mod tern;

pub use guard::PermissionGuard;
pub use limits::*;
pub use model::{
    ConvergenceModel, EWMA_ALPHA, Eta, EtaMode, FIT_WINDOW, Prediction, PreflightEstimate,
    preflight_estimate,
};
pub use names::PolicyName;
pub use observe::{
    Action, ActionKind, Decision, IterationSample, Observation, Phase, mbit, mib, secs,
};
pub use plan::{
    Capabilities, DirtyRateProbe, MigrationParameters, MigrationPlan, MultifdCompression,
    PlanInput, PostCopyVerdict, post_copy_permission, post_copy_verdict,
};
pub use postcopy::{
    DEFAULT_POSTCOPY_STALL_TIMEOUT_MS, DEFAULT_RECOVERY_ATTEMPT_TIMEOUT_MS,
    DEFAULT_RECOVERY_BACKOFF_MAX_MS, DEFAULT_RECOVERY_BACKOFF_MIN_MS, DEFAULT_RECOVERY_WINDOW_MS,
    PostcopyAction, PostcopyDecision, PostcopyObservation, PostcopyStatus, PostcopySupervisor,
    PostcopyTimings, SupervisionPhase,
};
pub use sla::{MigrationContext, SlaCatalog, SlaClass, SlaError, UnknownContext};
pub use stall::{StallDetector, StallStatus, link_degraded};
pub use tern::TernPolicy;

/// A migration policy: plans a migration, then decides at each observation.
///
/// Implementations keep their own state between `decide` calls; create a fresh one per migration
/// (via [`policy_by_name`]). `decide` must be deterministic in its inputs.
pub trait MigrationPolicy: Send {
    /// The policy's name as listed in [`POLICY_NAMES`].
    fn name(&self) -> &'static str;
    /// What to set before `migrate`.
    fn plan(&self, input: &PlanInput) -> MigrationPlan;
    /// What to do now. On `PassCompleted` the result has at least one decision (`Continue` with a
    /// reason when nothing changes); on `Tick` it is often empty.
    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision>;
    /// The latest ETA, if the policy models one.
    fn eta(&self) -> Option<Eta> {
        None
    }
}

/// Every selectable policy name; `tern` (ours) first and the default.
pub const POLICY_NAMES: &[&str] = &[
    "tern",
    "nova",
    "nova-force-complete",
    "nova-2016",
    "kubevirt",
    "kubevirt-stall",
    "ovirt-postcopy",
    "ovirt-minimal-downtime",
    "proxmox",
    "libvirt-postcopy-after-precopy",
    "qemu-default",
];

/// The default policy name.
pub const DEFAULT_POLICY: &str = "tern";

/// A policy name that is not in [`POLICY_NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {given:?}; valid policies: {}", POLICY_NAMES.join(", "))]
pub struct UnknownPolicy {
    /// The name asked for.
    pub given: String,
}

/// The policy called `name`, without the [`PermissionGuard`]. For tests that check a policy's
/// own behaviour; the engine should use [`policy_by_name`].
pub fn unguarded_policy_by_name(name: &str) -> Result<Box<dyn MigrationPolicy>, UnknownPolicy> {
    use baselines::*;
    Ok(match name.trim() {
        "tern" => Box::new(TernPolicy::new()),
        "nova" => Box::new(NovaPolicy::new(NovaConfig::default())),
        "nova-force-complete" => Box::new(NovaPolicy::force_complete()),
        "nova-2016" => Box::new(Nova2016Policy::new()),
        "kubevirt" => Box::new(KubevirtLegacyPolicy::new()),
        "kubevirt-stall" => Box::new(KubevirtStallPolicy::new()),
        "ovirt-postcopy" => Box::new(OvirtPolicy::postcopy()),
        "ovirt-minimal-downtime" => Box::new(OvirtPolicy::minimal_downtime()),
        "proxmox" => Box::new(ProxmoxPolicy::new()),
        "libvirt-postcopy-after-precopy" => Box::new(LibvirtPostcopyAfterPrecopyPolicy::new()),
        "qemu-default" => Box::new(QemuDefaultPolicy),
        other => {
            return Err(UnknownPolicy {
                given: other.to_string(),
            });
        }
    })
}

/// The policy called `name`, wrapped in a [`PermissionGuard`].
pub fn policy_by_name(name: &str) -> Result<Box<dyn MigrationPolicy>, UnknownPolicy> {
    unguarded_policy_by_name(name).map(|p| Box::new(PermissionGuard::new(p)) as _)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_resolves_and_unknown_lists_valid_names() {
        for name in POLICY_NAMES {
            assert_eq!(policy_by_name(name).unwrap().name(), *name);
        }
        let err = policy_by_name("vmware").err().unwrap().to_string();
        assert!(err.contains("\"vmware\"") && err.contains("kubevirt-stall"));
        assert_eq!(POLICY_NAMES[0], DEFAULT_POLICY);
    }
}
