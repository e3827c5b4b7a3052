//! Typed arguments and replies of the QMP commands tern uses.
//!
//! Field names follow QEMU's `qapi/migration.json` and `qapi/run-state.json` exactly (serde
//! `rename_all = "kebab-case"`). Reply fields are `Option` because QEMU omits most of them
//! depending on state and version (e.g. `ram` only while `active`/`completed`, `downtime` only
//! after completion); unknown extra fields are ignored so that a newer QEMU never breaks
//! parsing. Integers are `u64` even where QAPI says `uint8`, so that a widened type in a future
//! QEMU does not fail to parse either.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::enums::{
    DirtyRateMeasureMode, DirtyRateStatus, MigMode, MigrationCapability, MigrationStatus,
    MultiFdCompression, RunState, TimeUnit, ZeroPageDetection,
};

/// QEMU's version, from the QMP greeting or `query-version`.
///
/// Kept so that reports can say which QEMU ran a migration; behaviour must still be probed
/// (e.g. capabilities via `query-migrate-capabilities`), not inferred from the version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QemuVersion {
    /// Major version (10 for 10.0.2).
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2+deb13u1~bpo12+1` (may be empty).
    pub package: String,
}

impl QemuVersion {
    /// True if this version is `major.minor` or newer (package string ignored).
    pub fn at_least(&self, major: u64, minor: u64) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// Wire shape of QAPI `VersionInfo` (`{"qemu": {major, minor, micro}, "package": ...}`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct VersionInfoWire {
    pub qemu: VersionTripleWire,
    #[serde(default)]
    pub package: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct VersionTripleWire {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
}

impl From<VersionInfoWire> for QemuVersion {
    fn from(w: VersionInfoWire) -> Self {
        QemuVersion {
            major: w.qemu.major,
            minor: w.qemu.minor,
            micro: w.qemu.micro,
            package: w.package.trim().to_owned(),
        }
    }
}

/// The greeting QEMU sends when a client connects, before `qmp_capabilities`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// Protocol capabilities offered (e.g. `oob`, which tern enables when offered).
    pub capabilities: Vec<String>,
}

/// One entry of `qom-list` (QAPI `ObjectPropertyInfo`): a property, or a child object whose
/// type reads `child<TYPE>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectPropertyInfo {
    /// Property (or child) name.
    pub name: String,
    /// Its type: `str`, `link<…>`, or `child<vfio-pci>` for a child device.
    #[serde(rename = "type")]
    pub type_name: String,
}

/// Reply of `query-status` (QAPI `StatusInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// True if all vCPUs are runnable.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// One entry of `query-migrate-capabilities` / argument of `migrate-set-capabilities`
/// (QAPI `MigrationCapabilityStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// Whether it is on.
    pub state: bool,
}

impl MigrationCapabilityStatus {
    /// Convenience constructor.
    pub fn new(capability: MigrationCapability, state: bool) -> Self {
        Self { capability, state }
    }
}

/// RAM transfer statistics (QAPI `MigrationStats`), the main input of tern's convergence model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes already transferred.
    pub transferred: Option<u64>,
    /// Bytes still to transfer (dirty RAM).
    pub remaining: Option<u64>,
    /// Total guest RAM bytes involved.
    pub total: Option<u64>,
    /// Zero pages.
    pub duplicate: Option<u64>,
    /// Normal (non-zero) pages sent.
    pub normal: Option<u64>,
    /// Bytes of normal pages sent.
    pub normal_bytes: Option<u64>,
    /// Pages dirtied per second by the guest, as QEMU estimated at the last sync.
    pub dirty_pages_rate: Option<u64>,
    /// Throughput in megabits per second.
    pub mbps: Option<f64>,
    /// Number of dirty-bitmap syncs (≈ pre-copy iterations).
    pub dirty_sync_count: Option<u64>,
    /// Post-copy page requests from the destination.
    pub postcopy_requests: Option<u64>,
    /// Bytes per page for the page counters.
    pub page_size: Option<u64>,
    /// Bytes sent over multifd channels.
    pub multifd_bytes: Option<u64>,
    /// Pages transferred per second.
    pub pages_per_second: Option<u64>,
    /// Bytes sent during pre-copy.
    pub precopy_bytes: Option<u64>,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: Option<u64>,
    /// Bytes sent during post-copy.
    pub postcopy_bytes: Option<u64>,
    /// Dirty syncs that could not avoid copying with zero-copy-send.
    pub dirty_sync_missed_zero_copy: Option<u64>,
}

/// XBZRLE cache statistics (QAPI `XBZRLECacheStats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleCacheStats {
    /// Cache size in bytes.
    pub cache_size: Option<u64>,
    /// Bytes transferred.
    pub bytes: Option<u64>,
    /// Pages transferred.
    pub pages: Option<u64>,
    /// Cache misses.
    pub cache_miss: Option<u64>,
    /// Cache miss rate.
    pub cache_miss_rate: Option<f64>,
    /// Encoding rate.
    pub encoding_rate: Option<f64>,
    /// Overflows.
    pub overflow: Option<u64>,
}

/// VFIO device statistics (QAPI `VfioStats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioStats {
    /// Bytes transferred by VFIO devices.
    pub transferred: Option<u64>,
}

/// Reply of `query-migrate` (QAPI `MigrationInfo`).
///
/// `status` is absent before the first migration (`{}`); [`MigrationInfo::status_or_none`]
/// maps that to [`MigrationStatus::None`]. Note (platform notes): QEMU's `downtime` is
/// meaningless after post-copy; measure blackout on the host instead.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Migration status; absent if no migration was ever started.
    pub status: Option<MigrationStatus>,
    /// RAM statistics (only while `active` or after `completed`).
    pub ram: Option<MigrationStats>,
    /// VFIO statistics.
    pub vfio: Option<VfioStats>,
    /// XBZRLE statistics (only with the `xbzrle` capability).
    pub xbzrle_cache: Option<XbzrleCacheStats>,
    /// Milliseconds since the migration started (total time once ended).
    pub total_time: Option<u64>,
    /// QEMU's estimate of the stop-and-copy downtime, in ms (while active).
    pub expected_downtime: Option<u64>,
    /// Actual downtime in ms (after completion; unreliable in post-copy).
    pub downtime: Option<u64>,
    /// Setup time in ms.
    pub setup_time: Option<u64>,
    /// Current auto-converge throttle percentage (only while throttling).
    pub cpu_throttle_percentage: Option<u64>,
    /// Human-readable error (do not parse).
    pub error_desc: Option<String>,
    /// Reasons an outgoing migration is blocked.
    pub blocked_reasons: Option<Vec<String>>,
    /// Total time all vCPUs were blocked in post-copy, ms (needs `postcopy-blocktime`).
    pub postcopy_blocktime: Option<u64>,
    /// Per-vCPU post-copy block time, ms.
    pub postcopy_vcpu_blocktime: Option<Vec<u64>>,
    /// Listening addresses (incoming side, e.g. the real TCP port for `tcp:…:0`).
    pub socket_address: Option<Vec<Value>>,
    /// Max dirty-limit throttle time per round, µs.
    pub dirty_limit_throttle_time_per_round: Option<u64>,
    /// Estimated average dirty-ring full time, µs.
    pub dirty_limit_ring_full_time: Option<u64>,
}

impl MigrationInfo {
    /// The status, with an absent field read as `none` (QEMU's meaning of `{}`).
    pub fn status_or_none(&self) -> MigrationStatus {
        self.status.clone().unwrap_or(MigrationStatus::None)
    }
}

/// Migration parameters: the reply of `query-migrate-parameters` and the argument of
/// `migrate-set-parameters` (QAPI `MigrationParameters` / `MigrateSetParameters`).
///
/// When sent, `None` fields are omitted so that only what is set changes. Members this build
/// does not know are kept in `extra` (and sent back if set), so a newer QEMU's parameters
/// survive a query → modify → set round trip.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Initial delay before the first self-announce, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    /// Max delay between announce packets, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    /// Number of announce packets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    /// Delay increase between announce packets, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    /// Dirty/transferred ratio (percent) that triggers auto-converge throttling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u64>,
    /// Initial auto-converge throttle, percent (default 20).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u64>,
    /// Auto-converge throttle increment, percent (default 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u64>,
    /// Slower throttle increase at the tail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    /// TLS credentials object id (empty = plain text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// TLS hostname to verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// TLS authz object id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    /// Pre-copy bandwidth cap, bytes/s (QEMU's default 128 MiB/s throttles fast links).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Bandwidth assumed available at switchover for the downtime estimate, bytes/s (0 = estimate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    /// Maximum tolerated downtime, ms (default 300).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// COLO checkpoint delay, ms (experimental).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_checkpoint_delay: Option<u64>,
    /// Number of multifd channels (must match on both sides).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u64>,
    /// XBZRLE cache size, bytes (power of two, multiple of the page size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    /// Background bandwidth during post-copy, bytes/s (0 = unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Maximum auto-converge throttle, percent (default 99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u64>,
    /// Multifd compression method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultiFdCompression>,
    /// zlib level 0–9.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zlib_level: Option<u64>,
    /// zstd level 0–20.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zstd_level: Option<u64>,
    /// QATzip level 1–9 (QEMU ≥ 9.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_qatzip_level: Option<u64>,
    /// Dirty-bitmap alias mapping (kept as raw JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_bitmap_mapping: Option<Value>,
    /// Dirty-limit period, ms (experimental).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_vcpu_dirty_limit_period: Option<u64>,
    /// Dirty-rate limit during migration, MB/s (with `dirty-limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_limit: Option<u64>,
    /// Migration mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigMode>,
    /// Zero-page detection method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_page_detection: Option<ZeroPageDetection>,
    /// O_DIRECT for migration files (with `mapped-ram`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
    /// Parameters this build does not know, by QEMU's name.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// Per-vCPU dirty rate (QAPI `DirtyRateVcpu`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateVcpu {
    /// vCPU index.
    pub id: i64,
    /// Dirty rate, MiB/s.
    pub dirty_rate: i64,
}

/// Reply of `query-dirty-rate` (QAPI `DirtyRateInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// Estimated dirty rate in MiB/s; present only when `status` is `measured`.
    pub dirty_rate: Option<i64>,
    /// Measurement state.
    pub status: DirtyRateStatus,
    /// Start of the measurement (seconds, QEMU's clock).
    pub start_time: Option<i64>,
    /// Measurement period, in `calc_time_unit`.
    pub calc_time: Option<i64>,
    /// Unit of `calc_time` (absent before QEMU 8.2: seconds).
    pub calc_time_unit: Option<TimeUnit>,
    /// Sampled pages per GiB (page-sampling mode).
    pub sample_pages: Option<u64>,
    /// Measurement mode.
    pub mode: Option<DirtyRateMeasureMode>,
    /// Per-vCPU rates (dirty-ring mode).
    pub vcpu_dirty_rate: Option<Vec<DirtyRateVcpu>>,
}

/// Arguments of `calc-dirty-rate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CalcDirtyRateArgs {
    /// Measurement period (seconds unless `calc_time_unit` says otherwise).
    pub calc_time: i64,
    /// Unit of `calc_time` (QEMU ≥ 8.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calc_time_unit: Option<TimeUnit>,
    /// Sampled pages per GiB (page-sampling; default 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_pages: Option<u64>,
    /// Measurement mode (default page-sampling, the only one that works under TCG).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<DirtyRateMeasureMode>,
}

impl CalcDirtyRateArgs {
    /// Measure for `seconds` with QEMU's default mode.
    pub fn seconds(seconds: i64) -> Self {
        Self {
            calc_time: seconds,
            calc_time_unit: None,
            sample_pages: None,
            mode: None,
        }
    }
}

/// Arguments of `migrate`. Only the `uri` form is used; QEMU 10's `channels` form is not
/// needed for a single TCP/unix/exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct MigrateArgs<'a> {
    pub uri: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// Arguments of commands that take only a `uri` (`migrate-incoming`, `migrate-recover`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct UriArgs<'a> {
    pub uri: &'a str,
}

/// Arguments of `migrate-set-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct SetCapabilitiesArgs<'a> {
    pub capabilities: &'a [MigrationCapabilityStatus],
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn migration_info_empty_reply_means_no_migration() {
        let info: MigrationInfo = serde_json::from_value(json!({})).unwrap();
        assert_eq!(info.status, None);
        assert_eq!(info.status_or_none(), MigrationStatus::None);
        assert!(info.ram.is_none());
    }

    #[test]
    fn migration_info_parses_active_reply_with_unknown_fields_and_values() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "some-future-state",
            "total-time": 1234,
            "expected-downtime": 4000,
            "setup-time": 12,
            "cpu-throttle-percentage": 40,
            "a-field-from-qemu-12": {"x": 1},
            "ram": {
                "transferred": 100, "remaining": 50, "total": 1073741824,
                "duplicate": 3, "normal": 4, "normal-bytes": 16384,
                "dirty-pages-rate": 250000, "mbps": 9876.5, "dirty-sync-count": 7,
                "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0,
                "pages-per-second": 300000, "precopy-bytes": 100,
                "downtime-bytes": 0, "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0, "future-counter": 5
            }
        }))
        .unwrap();
        assert_eq!(
            info.status,
            Some(MigrationStatus::Unknown("some-future-state".into()))
        );
        assert_eq!(info.expected_downtime, Some(4000));
        assert_eq!(info.cpu_throttle_percentage, Some(40));
        let ram = info.ram.unwrap();
        assert_eq!(ram.dirty_pages_rate, Some(250000));
        assert_eq!(ram.mbps, Some(9876.5));
        assert_eq!(ram.page_size, Some(4096));
        assert_eq!(ram.dirty_sync_count, Some(7));
        assert_eq!(info.downtime, None);
    }

    #[test]
    fn set_parameters_omits_unset_fields() {
        let params = MigrationParameters {
            downtime_limit: Some(300),
            max_bandwidth: Some(10 << 30),
            multifd_compression: Some(MultiFdCompression::None),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&params).unwrap(),
            json!({"downtime-limit": 300, "max-bandwidth": 10u64 << 30, "multifd-compression": "none"})
        );
        assert_eq!(
            serde_json::to_value(MigrationParameters::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn parameters_keep_unknown_members_for_round_trip() {
        let reply = json!({"downtime-limit": 300, "multifd-channels": 2, "future-knob": 7});
        let params: MigrationParameters = serde_json::from_value(reply.clone()).unwrap();
        assert_eq!(params.multifd_channels, Some(2));
        assert_eq!(params.extra.get("future-knob"), Some(&json!(7)));
        assert_eq!(serde_json::to_value(&params).unwrap(), reply);
    }

    #[test]
    fn migrate_args_skip_false_resume() {
        let plain = MigrateArgs {
            uri: "tcp:10.0.0.2:4444",
            resume: false,
        };
        assert_eq!(
            serde_json::to_value(plain).unwrap(),
            json!({"uri": "tcp:10.0.0.2:4444"})
        );
        let resume = MigrateArgs {
            uri: "tcp:10.0.0.2:4444",
            resume: true,
        };
        assert_eq!(
            serde_json::to_value(resume).unwrap(),
            json!({"uri": "tcp:10.0.0.2:4444", "resume": true})
        );
    }

    #[test]
    fn dirty_rate_info_parses_qemu_reply() {
        let info: DirtyRateInfo = serde_json::from_value(json!({
            "status": "measured", "sample-pages": 512, "dirty-rate": 108,
            "mode": "page-sampling", "start-time": 1693900454, "calc-time": 10,
            "calc-time-unit": "second"
        }))
        .unwrap();
        assert_eq!(info.status, DirtyRateStatus::Measured);
        assert_eq!(info.dirty_rate, Some(108));
        assert_eq!(info.mode, Some(DirtyRateMeasureMode::PageSampling));
        assert_eq!(
            serde_json::to_value(CalcDirtyRateArgs::seconds(1)).unwrap(),
            json!({"calc-time": 1})
        );
    }

    #[test]
    fn version_display_and_comparison() {
        let v = QemuVersion {
            major: 10,
            minor: 0,
            micro: 2,
            package: "Debian".into(),
        };
        assert!(v.at_least(9, 0));
        assert!(v.at_least(10, 0));
        assert!(!v.at_least(10, 1));
        assert_eq!(v.to_string(), "10.0.2 (Debian)");
    }
}
