//! Inputs known before a migration starts and the plan a policy derives from them.

use serde::{Deserialize, Serialize};

use crate::limits::{
    HostLimits, PostCopyPermission, QEMU_DEFAULT_DOWNTIME_MS, QEMU_DEFAULT_MAX_BANDWIDTH,
    QEMU_MAX_CPU_THROTTLE_PCT, QEMU_THROTTLE_INCREMENT_PCT, QEMU_THROTTLE_INITIAL_PCT,
    QemuFeatures, VmLimits,
};
use crate::model::PreflightEstimate;
use crate::sla::{MigrationContext, SlaClass};

/// A short dirty-rate measurement taken before the migration (QEMU `calc-dirty-rate` with
/// `calc-time`, read back with `query-dirty-rate`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtyRateProbe {
    /// Measurement period in ms (`calc-time`, typically 1000).
    pub period_ms: u64,
    /// Distinct bytes dirtied during the period, divided by the period (`dirty-rate` MB/s × 2^20).
    pub dirty_bytes_per_s: u64,
}

/// Everything a policy needs to plan a migration. Built by the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInput {
    /// Why the VM moves.
    pub context: MigrationContext,
    /// The VM's SLA class.
    pub sla: SlaClass,
    /// Source host limits.
    pub source: HostLimits,
    /// Destination host limits.
    pub destination: HostLimits,
    /// VM limits.
    pub vm: VmLimits,
    /// QEMU features both ends have.
    pub features: QemuFeatures,
    /// Measured or configured link rate between the hosts, bytes/s.
    pub link_bytes_per_s: Option<u64>,
    /// Pre-flight dirty-rate probe, if `calc-dirty-rate` was available.
    pub probe: Option<DirtyRateProbe>,
    /// Caller's clock at start, for reference only (observations are relative to start).
    pub started_at_ms: u64,
    /// Must be finished by this many ms after start (maintenance windows, evacuation bounds).
    pub deadline_ms: Option<u64>,
    /// Expected device-state/switchover time added to every blackout, in ms. QEMU's
    /// `downtime-limit` does not include it, so policies that promise an SLA subtract it.
    pub switchover_overhead_ms: u64,
}

impl PlanInput {
    /// An input with permissive defaults: both hosts default, link unknown, no probe, no deadline,
    /// 50 ms switchover overhead.
    pub fn new(
        context: MigrationContext,
        sla: SlaClass,
        vm: VmLimits,
        features: QemuFeatures,
    ) -> Self {
        PlanInput {
            context,
            sla,
            source: HostLimits::default(),
            destination: HostLimits::default(),
            vm,
            features,
            link_bytes_per_s: None,
            probe: None,
            started_at_ms: 0,
            deadline_ms: None,
            switchover_overhead_ms: 50,
        }
    }

    /// The tightest downtime the guest accepts: SLA class and per-VM cap.
    pub fn max_downtime_ms(&self) -> u64 {
        self.vm
            .max_downtime_ms
            .map_or(self.sla.max_downtime_ms, |v| {
                v.min(self.sla.max_downtime_ms)
            })
    }

    /// The bandwidth cap set by either host, if any.
    pub fn host_bandwidth_cap(&self) -> Option<u64> {
        match (
            self.source.bandwidth_cap_bytes_per_s,
            self.destination.bandwidth_cap_bytes_per_s,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether throttling is permitted by hosts, QEMU and the SLA.
    pub fn throttle_permitted(&self) -> bool {
        self.source.permit_throttle
            && self.destination.permit_throttle
            && self.sla.max_throttle_pct > 0
            && (self.features.auto_converge || self.features.dirty_limit)
    }
}

/// Whether post-copy may be used, and why. Computed once by [`post_copy_verdict`]; every policy's
/// `plan` starts from it, so no policy can grant more than the hosts, VM and QEMU allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostCopyVerdict {
    /// Post-copy may be switched to.
    pub allowed: bool,
    /// Which condition decided.
    pub reason: String,
}

/// Hard permission for post-copy: source and destination hosts permit it, the VM is not
/// forbidden (VFIO, vpmem, …), and both QEMUs have `postcopy-ram`. The SLA's preference is *not*
/// part of this (policies decide whether to honour it); see [`crate::TernPolicy`].
pub fn post_copy_permission(input: &PlanInput) -> PostCopyVerdict {
    let deny = |why: &str| PostCopyVerdict {
        allowed: false,
        reason: why.to_string(),
    };
    if !input.source.permit_post_copy {
        return deny("source host does not permit post-copy");
    }
    if !input.destination.permit_post_copy {
        return deny("destination host does not permit post-copy");
    }
    if input.vm.post_copy == PostCopyPermission::Forbidden {
        return deny("VM forbids post-copy (e.g. VFIO device)");
    }
    if !input.features.postcopy_ram {
        return deny("postcopy-ram capability missing on one end");
    }
    PostCopyVerdict {
        allowed: true,
        reason: "both hosts, the VM and both QEMUs (postcopy-ram) permit post-copy".into(),
    }
}

/// Permission plus the SLA's tolerance: what tern (and the per-VM-policy baselines, KubeVirt and
/// oVirt, whose policies an operator would pick per class) use.
pub fn post_copy_verdict(input: &PlanInput) -> PostCopyVerdict {
    let hard = post_copy_permission(input);
    if !hard.allowed {
        return hard;
    }
    if !input.sla.post_copy_acceptable {
        return PostCopyVerdict {
            allowed: false,
            reason: format!(
                "SLA class {:?} does not accept post-copy's degraded phase",
                input.sla.name
            ),
        };
    }
    PostCopyVerdict {
        allowed: true,
        reason: format!(
            "{}; SLA class {:?} accepts post-copy",
            hard.reason, input.sla.name
        ),
    }
}

/// Migration capabilities to set (on both ends where QEMU requires it) before `migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// `postcopy-ram` (both ends). Never true unless the post-copy verdict allowed it.
    pub postcopy_ram: bool,
    /// `postcopy-preempt` (both ends).
    pub postcopy_preempt: bool,
    /// `auto-converge` (source only).
    pub auto_converge: bool,
    /// `dirty-limit` (source; excludes auto-converge).
    pub dirty_limit: bool,
    /// `multifd` (both ends, same channel count).
    pub multifd: bool,
    /// `xbzrle` (both ends).
    pub xbzrle: bool,
}

/// multifd compression method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MultifdCompression {
    /// No compression (QEMU's default).
    None,
    /// zlib.
    Zlib,
    /// zstd (KubeVirt's experimental choice).
    Zstd,
}

/// Migration parameters to set with `migrate-set-parameters` before `migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationParameters {
    /// `downtime-limit`, ms.
    pub downtime_limit_ms: u64,
    /// `max-bandwidth`, bytes/s.
    pub max_bandwidth_bytes_per_s: u64,
    /// `cpu-throttle-initial`.
    pub cpu_throttle_initial_pct: u8,
    /// `cpu-throttle-increment`.
    pub cpu_throttle_increment_pct: u8,
    /// `max-cpu-throttle`.
    pub max_cpu_throttle_pct: u8,
    /// `vcpu-dirty-limit` MB/s per vCPU, when the dirty-limit capability is on.
    pub vcpu_dirty_limit_mb_per_s: Option<u64>,
    /// `multifd-channels`.
    pub multifd_channels: u8,
    /// `multifd-compression`.
    pub multifd_compression: MultifdCompression,
    /// `xbzrle-cache-size`, bytes.
    pub xbzrle_cache_bytes: Option<u64>,
    /// `max-postcopy-bandwidth`, bytes/s (0 = unlimited).
    pub max_postcopy_bandwidth_bytes_per_s: u64,
}

impl Default for MigrationParameters {
    /// QEMU's own defaults (`migration/options.c`).
    fn default() -> Self {
        MigrationParameters {
            downtime_limit_ms: QEMU_DEFAULT_DOWNTIME_MS,
            max_bandwidth_bytes_per_s: QEMU_DEFAULT_MAX_BANDWIDTH,
            cpu_throttle_initial_pct: QEMU_THROTTLE_INITIAL_PCT,
            cpu_throttle_increment_pct: QEMU_THROTTLE_INCREMENT_PCT,
            max_cpu_throttle_pct: QEMU_MAX_CPU_THROTTLE_PCT,
            vcpu_dirty_limit_mb_per_s: None,
            multifd_channels: 2,
            multifd_compression: MultifdCompression::None,
            xbzrle_cache_bytes: None,
            max_postcopy_bandwidth_bytes_per_s: 0,
        }
    }
}

/// A policy's plan for one migration: what to set before `migrate`, and the bounds it will
/// enforce while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationPlan {
    /// Name of the policy that made the plan.
    pub policy: String,
    /// The input the plan was made from (policies read limits from here during `decide`).
    pub input: PlanInput,
    /// Capabilities to enable.
    pub capabilities: Capabilities,
    /// Parameters to set.
    pub parameters: MigrationParameters,
    /// Whether the policy may switch to post-copy, and why. `capabilities.postcopy_ram` implies it.
    pub post_copy: PostCopyVerdict,
    /// Whether the engine should recover a failed post-copy (`migrate-recover` +
    /// `migrate resume=true`) instead of declaring the VM lost. No public manager does this
    /// (manager-policies.md §0.5); tern does when both QEMUs support it.
    pub postcopy_recovery: bool,
    /// The time by which the policy intends to have finished (ms since start), if bounded.
    pub deadline_ms: Option<u64>,
    /// Pre-flight estimate.
    pub estimate: PreflightEstimate,
    /// Why the plan looks as it does, with numbers.
    pub reasons: Vec<String>,
}

impl MigrationPlan {
    /// A plan with QEMU defaults and nothing enabled, for `policy` on `input`.
    pub fn qemu_defaults(policy: &str, input: &PlanInput, post_copy: PostCopyVerdict) -> Self {
        MigrationPlan {
            policy: policy.to_string(),
            input: input.clone(),
            capabilities: Capabilities::default(),
            parameters: MigrationParameters::default(),
            post_copy,
            postcopy_recovery: false,
            deadline_ms: input.deadline_ms,
            estimate: crate::model::preflight_estimate(input),
            reasons: Vec::new(),
        }
    }

    /// Whether a `SwitchToPostcopy` is valid under this plan.
    pub fn may_switch_to_postcopy(&self) -> bool {
        self.post_copy.allowed && self.capabilities.postcopy_ram
    }

    /// Effective migration bandwidth the plan expects: link rate, capped by `max-bandwidth`.
    pub fn expected_bandwidth(&self) -> Option<u64> {
        self.input
            .link_bytes_per_s
            .map(|l| l.min(self.parameters.max_bandwidth_bytes_per_s))
    }
}
