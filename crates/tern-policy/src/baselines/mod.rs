//! Other managers' policies, implemented from their sources so tern can be compared against them
//! on the same scenarios. Each type's doc comment cites the function it follows
//! (`repo@commit:path::Function`, as collected in `shared/reference/manager-policies.md`).
//!
//! Mapping of our inputs onto their knobs, chosen to be fair and faithful:
//! * Post-copy permission: Nova and libvirt know only the per-host switch (our
//!   [`crate::HostLimits::permit_post_copy`], i.e. nova.conf `live_migration_permit_post_copy`)
//!   plus hard VM/QEMU limits ([`crate::post_copy_permission`]). KubeVirt and oVirt select a
//!   per-VM policy, which an operator would choose per SLA class, so they also honour the SLA's
//!   `post_copy_acceptable` ([`crate::post_copy_verdict`]). Proxmox never uses post-copy.
//! * Downtime: KubeVirt's per-policy `maxDowntimeMs` is set to the SLA's max downtime; the others
//!   use their own fixed schedules.
//! * Every baseline is oblivious to the migration context, as its original is.
//! * None uses post-copy recovery: no public manager does (manager-policies.md §0.5).

mod kubevirt;
mod nova;
mod others;

pub use kubevirt::{
    COMPLETION_TIMEOUT_PER_GIB, DEFAULT_MAX_DOWNTIME_MS, KubevirtFlags, KubevirtLegacyPolicy,
    KubevirtStallPolicy, PROGRESS_TIMEOUT_S,
};
pub use nova::{Nova2016Policy, NovaConfig, NovaPolicy, NovaTimeoutAction};
pub use others::{
    LibvirtPostcopyAfterPrecopyPolicy, OvirtPolicy, OvirtPolicyKind, ProxmoxPolicy,
    QemuDefaultPolicy,
};

use crate::observe::{Decision, Observation};

/// On `PassCompleted` a policy answers at least `Continue`; on `Tick` it may answer nothing.
pub(crate) fn finish_decisions(
    obs: &Observation,
    mut out: Vec<Decision>,
    idle: &str,
) -> Vec<Decision> {
    if let (true, Observation::PassCompleted(s)) = (out.is_empty(), obs) {
        out.push(Decision::cont(format!(
            "{idle} (pass {}, {} left at {})",
            s.pass,
            crate::mib(s.remaining_bytes as f64),
            crate::secs(s.at_ms as f64)
        )));
    }
    out
}

/// GiB as libvirt/Nova compute them (binary).
pub(crate) fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
