//! What the hosts, the VM and the two QEMUs permit. Policies may only choose among what these allow.

use serde::{Deserialize, Serialize};

/// QEMU's default `downtime-limit` (`migration/options.c`: `DEFAULT_MIGRATE_SET_DOWNTIME 300`).
pub const QEMU_DEFAULT_DOWNTIME_MS: u64 = 300;
/// QEMU's maximum `downtime-limit` (`MAX_MIGRATE_DOWNTIME_SECONDS 2000`). Proxmox bug #7044 is what
/// happens when a manager doubles past it.
pub const QEMU_MAX_DOWNTIME_MS: u64 = 2_000_000;
/// QEMU's default `max-bandwidth` (`MAX_THROTTLE`, 128 MiB/s). Every manager except plain QEMU
/// raises it; leaving it is one reason `qemu-default` fails on fast links.
pub const QEMU_DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// What tern and Proxmox set `max-bandwidth` to when nothing caps it (16 GiB/s, Proxmox
/// `QemuMigrate.pm::phase2`: "use 16 GiBps").
pub const UNLIMITED_BANDWIDTH: u64 = 16 << 30;
/// QEMU `cpu-throttle-initial` default (20 %).
pub const QEMU_THROTTLE_INITIAL_PCT: u8 = 20;
/// QEMU `cpu-throttle-increment` default (10 %).
pub const QEMU_THROTTLE_INCREMENT_PCT: u8 = 10;
/// QEMU `max-cpu-throttle` default and maximum (99 %).
pub const QEMU_MAX_CPU_THROTTLE_PCT: u8 = 99;
/// QEMU `throttle-trigger-threshold` default: auto-converge throttles when the bytes dirtied in a
/// sync period exceed this percentage of the bytes sent in it, twice (`ram.c::migration_trigger_throttle`).
pub const QEMU_THROTTLE_TRIGGER_PCT: u8 = 50;
/// Guest page size assumed when a sample does not say.
pub const DEFAULT_PAGE_SIZE: u64 = 4096;

/// Per-host configuration, one for the source and one for the destination (Nova keeps
/// `live_migration_permit_post_copy` per compute host; so do we).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLimits {
    /// The host allows post-copy (e.g. false on hosts with VFIO devices or without
    /// userfaultfd: manager-policies.md §0.8).
    pub permit_post_copy: bool,
    /// The host allows vCPU throttling of guests (auto-converge / dirty-limit).
    pub permit_throttle: bool,
    /// Migration bandwidth cap for this host, bytes/s.
    pub bandwidth_cap_bytes_per_s: Option<u64>,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            permit_post_copy: true,
            permit_throttle: true,
            bandwidth_cap_bytes_per_s: None,
        }
    }
}

/// Whether a VM may be migrated with post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostCopyPermission {
    /// Post-copy may be used if hosts, QEMU and the SLA also allow it.
    Allowed,
    /// Never (VFIO devices, vpmem, volume migration, paused VM: manager-policies.md §0.8).
    Forbidden,
}

/// Per-VM facts and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLimits {
    /// Post-copy permission for this VM.
    pub post_copy: PostCopyPermission,
    /// A per-VM downtime cap stricter than its SLA class, if any.
    pub max_downtime_ms: Option<u64>,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Number of vCPUs (sizes the dirty-limit).
    pub vcpus: u32,
}

impl VmLimits {
    /// A VM of `ram_bytes` with post-copy allowed, one vCPU and no extra downtime cap.
    pub fn new(ram_bytes: u64) -> Self {
        VmLimits {
            post_copy: PostCopyPermission::Allowed,
            max_downtime_ms: None,
            ram_bytes,
            vcpus: 1,
        }
    }
}

/// Migration features both QEMUs support (the intersection of source and destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuFeatures {
    /// `postcopy-ram` capability (must be set on both ends).
    pub postcopy_ram: bool,
    /// `postcopy-preempt` (QEMU ≥ 8.0): urgent page requests on their own channel.
    pub postcopy_preempt: bool,
    /// Post-copy recovery (`migrate-pause`/`migrate-recover`/`migrate resume=true`, QEMU ≥ 3.0).
    pub postcopy_recovery: bool,
    /// `auto-converge` capability.
    pub auto_converge: bool,
    /// `dirty-limit` capability (QEMU ≥ 8.1, needs KVM's dirty ring; excludes auto-converge).
    pub dirty_limit: bool,
    /// `multifd` capability.
    pub multifd: bool,
    /// multifd together with post-copy works (QEMU ≥ 10.1; Nova's `MIN_MULTIFD_WITH_POSTCOPY_QEMU_VERSION`).
    pub multifd_with_postcopy: bool,
    /// `xbzrle` capability.
    pub xbzrle: bool,
    /// `calc-dirty-rate` QMP command (QEMU ≥ 5.2) for the pre-flight probe.
    pub calc_dirty_rate: bool,
}

impl QemuFeatures {
    /// What QEMU 10.0 under TCG offers on the lab machines (platform.md): everything except
    /// dirty-limit (needs KVM) and multifd with post-copy (needs 10.1).
    pub fn qemu_10_tcg() -> Self {
        QemuFeatures {
            postcopy_ram: true,
            postcopy_preempt: true,
            postcopy_recovery: true,
            auto_converge: true,
            dirty_limit: false,
            multifd: true,
            multifd_with_postcopy: false,
            xbzrle: true,
            calc_dirty_rate: true,
        }
    }

    /// The features both ends have.
    pub fn intersect(self, other: QemuFeatures) -> QemuFeatures {
        QemuFeatures {
            postcopy_ram: self.postcopy_ram && other.postcopy_ram,
            postcopy_preempt: self.postcopy_preempt && other.postcopy_preempt,
            postcopy_recovery: self.postcopy_recovery && other.postcopy_recovery,
            auto_converge: self.auto_converge && other.auto_converge,
            dirty_limit: self.dirty_limit && other.dirty_limit,
            multifd: self.multifd && other.multifd,
            multifd_with_postcopy: self.multifd_with_postcopy && other.multifd_with_postcopy,
            xbzrle: self.xbzrle && other.xbzrle,
            calc_dirty_rate: self.calc_dirty_rate && other.calc_dirty_rate,
        }
    }
}
