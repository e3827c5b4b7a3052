//! QAPI enumerations that tolerate values from a newer QEMU.
//!
//! QEMU adds enum members in almost every release (`postcopy-recover-setup` in 9.1, `device`
//! in 2.11, `mapped-ram` in 9.0, `qatzip` in 9.2 …). A client that rejects a reply because of
//! one unknown member would break the migration it is supervising, so every enum here has an
//! `Unknown(String)` variant that keeps the exact string QEMU sent and serializes back to it.
//! `#[serde(other)]` would lose the string, hence the small macro below.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a QAPI string enum with an `Unknown(String)` fallback, `as_str`, `Display`,
/// `FromStr` (infallible), and serde impls using QEMU's exact (kebab-case) spelling.
macro_rules! qapi_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
            /// A value this build of tern does not know (typically from a newer QEMU), kept
            /// verbatim so that it can be logged and sent back unchanged.
            Unknown(String),
        }

        impl $name {
            /// Every member this build knows, in QEMU's schema order.
            pub const KNOWN: &'static [$name] = &[ $( $name::$variant ),+ ];

            /// The exact string QEMU uses on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $wire, )+
                    $name::Unknown(other) => other.as_str(),
                }
            }

            /// Maps QEMU's string to a member; never fails (unknown strings become `Unknown`).
            pub fn from_wire(value: &str) -> Self {
                match value {
                    $( $wire => $name::$variant, )+
                    other => $name::Unknown(other.to_owned()),
                }
            }

            /// False for `Unknown(_)`: lets callers warn about values they cannot interpret.
            pub fn is_known(&self) -> bool {
                !matches!(self, $name::Unknown(_))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = Infallible;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok(Self::from_wire(s))
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::from_wire(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok(Self::from_wire(&value))
            }
        }
    };
}

/// Lets other modules of this crate declare QAPI enums the same way.
pub(crate) use qapi_enum;

qapi_enum! {
    /// State of a migration as reported by `query-migrate` and the `MIGRATION` event
    /// (QAPI `MigrationStatus`, QEMU 10.0 member list).
    pub enum MigrationStatus {
        /// No migration has ever happened.
        None = "none",
        /// `migrate` was issued; connections are being set up.
        Setup = "setup",
        /// `migrate_cancel` is in progress.
        Cancelling = "cancelling",
        /// Cancelled; the source keeps running.
        Cancelled = "cancelled",
        /// Pre-copy iterations in progress.
        Active = "active",
        /// Switched to post-copy: the destination runs, pages are pulled on demand.
        PostcopyActive = "postcopy-active",
        /// Post-copy lost its connection; both sides wait for `migrate-recover`/`resume`.
        PostcopyPaused = "postcopy-paused",
        /// Setting up a post-copy recovery (QEMU ≥ 9.1).
        PostcopyRecoverSetup = "postcopy-recover-setup",
        /// Recovering a paused post-copy.
        PostcopyRecover = "postcopy-recover",
        /// Finished successfully.
        Completed = "completed",
        /// Failed; see `error-desc`.
        Failed = "failed",
        /// COLO fault-tolerance mode.
        Colo = "colo",
        /// Paused before device serialisation (`pause-before-switchover`).
        PreSwitchover = "pre-switchover",
        /// Serialising device state; QEMU 10 shows it between `active` and `completed`.
        Device = "device",
        /// Waiting for the guest to unplug a failover device.
        WaitUnplug = "wait-unplug",
    }
}

impl MigrationStatus {
    /// True once the migration can no longer change by itself: `completed`, `failed`,
    /// `cancelled`. `none` is *not* terminal: a destination reports it until the source
    /// connects, and treating it as an end would make a waiter return before anything
    /// started. Unknown values are not terminal either, so a waiter keeps polling rather than
    /// declaring victory on a state it cannot interpret.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// True in any post-copy phase. Once post-copy started, cancelling is no longer possible
    /// and a failure loses the guest, so the engine must treat these states specially.
    pub fn is_postcopy(&self) -> bool {
        matches!(
            self,
            Self::PostcopyActive
                | Self::PostcopyPaused
                | Self::PostcopyRecoverSetup
                | Self::PostcopyRecover
        )
    }

    /// True while a migration is in flight (neither terminal nor `none`). Unknown values
    /// count as in flight, for the same reason as in [`Self::is_terminal`].
    pub fn is_in_progress(&self) -> bool {
        !self.is_terminal() && *self != Self::None
    }
}

qapi_enum! {
    /// VM run state from `query-status` (QAPI `RunState`).
    pub enum RunState {
        /// Running under a debugger.
        Debug = "debug",
        /// Paused, waiting for an incoming migration.
        InMigrate = "inmigrate",
        /// An internal error stopped the guest.
        InternalError = "internal-error",
        /// Paused on an I/O error.
        IoError = "io-error",
        /// Paused by `stop`.
        Paused = "paused",
        /// Paused after a successful outgoing migration.
        Postmigrate = "postmigrate",
        /// Started with `-S`, not yet running.
        Prelaunch = "prelaunch",
        /// Paused to finish a migration (stop-and-copy).
        FinishMigrate = "finish-migrate",
        /// Paused to restore VM state.
        RestoreVm = "restore-vm",
        /// Guest running.
        Running = "running",
        /// Paused to save VM state.
        SaveVm = "save-vm",
        /// Guest shut down (with `-no-shutdown`).
        Shutdown = "shutdown",
        /// Guest suspended (ACPI S3).
        Suspended = "suspended",
        /// Paused by the watchdog.
        Watchdog = "watchdog",
        /// Guest panicked.
        GuestPanicked = "guest-panicked",
        /// Paused for a COLO checkpoint.
        Colo = "colo",
    }
}

qapi_enum! {
    /// Migration capability names (QAPI `MigrationCapability`). Which ones a QEMU supports
    /// must be detected with `query-migrate-capabilities`, never assumed from its version.
    pub enum MigrationCapability {
        /// XOR-based zero-run-length encoding of re-sent pages.
        Xbzrle = "xbzrle",
        /// RDMA: pin all guest memory up front.
        RdmaPinAll = "rdma-pin-all",
        /// Throttle the guest's vCPUs when pre-copy does not converge (source only).
        AutoConverge = "auto-converge",
        /// Encode zero blocks efficiently during storage migration.
        ZeroBlocks = "zero-blocks",
        /// Emit `MIGRATION` / `MIGRATION_PASS` events (off by default in QEMU 10).
        Events = "events",
        /// Allow switching to post-copy (must be set on both sides).
        PostcopyRam = "postcopy-ram",
        /// COLO fault tolerance (experimental).
        XColo = "x-colo",
        /// Free migrated RAM on the source during post-copy.
        ReleaseRam = "release-ram",
        /// Use the return path even for pre-copy.
        ReturnPath = "return-path",
        /// Pause before device serialisation (`pre-switchover` status).
        PauseBeforeSwitchover = "pause-before-switchover",
        /// Several parallel migration channels.
        Multifd = "multifd",
        /// Migrate named dirty bitmaps.
        DirtyBitmaps = "dirty-bitmaps",
        /// Account vCPU block time during post-copy (destination only).
        PostcopyBlocktime = "postcopy-blocktime",
        /// Destination activates block devices late.
        LateBlockActivate = "late-block-activate",
        /// Skip shared memory reachable from the destination (experimental).
        XIgnoreShared = "x-ignore-shared",
        /// Send the source UUID for the destination to check.
        ValidateUuid = "validate-uuid",
        /// Snapshot the VM as of the start of the migration.
        BackgroundSnapshot = "background-snapshot",
        /// Zero-copy sending of pages (needs locked memory).
        ZeroCopySend = "zero-copy-send",
        /// Separate channel so post-copy page requests preempt the background stream.
        PostcopyPreempt = "postcopy-preempt",
        /// Wait for the destination's ACK before switchover (needs `return-path`).
        SwitchoverAck = "switchover-ack",
        /// Dirty-rate limit per vCPU (needs KVM dirty ring).
        DirtyLimit = "dirty-limit",
        /// Fixed file offsets for each RAM page (file migration).
        MappedRam = "mapped-ram",
    }
}

qapi_enum! {
    /// Why a `SHUTDOWN` event was emitted (QAPI `ShutdownCause`).
    pub enum ShutdownCause {
        /// No shutdown pending.
        None = "none",
        /// A host error.
        HostError = "host-error",
        /// The QMP `quit` command.
        HostQmpQuit = "host-qmp-quit",
        /// The QMP `system_reset` command.
        HostQmpSystemReset = "host-qmp-system-reset",
        /// A signal such as SIGINT or SIGTERM.
        HostSignal = "host-signal",
        /// A UI event.
        HostUi = "host-ui",
        /// The guest asked to shut down.
        GuestShutdown = "guest-shutdown",
        /// The guest asked to reset and the command line turned that into a shutdown.
        GuestReset = "guest-reset",
        /// The guest panicked and the command line turned that into a shutdown.
        GuestPanic = "guest-panic",
        /// Partial reset (s390).
        SubsystemReset = "subsystem-reset",
        /// Record/replay snapshot load (internal to QEMU).
        SnapshotLoad = "snapshot-load",
    }
}

qapi_enum! {
    /// Multifd compression method (QAPI `MultiFDCompression`); availability depends on how
    /// QEMU was built.
    pub enum MultiFdCompression {
        /// No compression.
        None = "none",
        /// zlib.
        Zlib = "zlib",
        /// zstd.
        Zstd = "zstd",
        /// Intel QPL (IAA accelerator).
        Qpl = "qpl",
        /// UADK.
        Uadk = "uadk",
        /// Intel QAT zip.
        Qatzip = "qatzip",
    }
}

qapi_enum! {
    /// Migration mode (QAPI `MigMode`).
    pub enum MigMode {
        /// Ordinary live migration.
        Normal = "normal",
        /// Checkpoint/restart across a reboot.
        CprReboot = "cpr-reboot",
        /// CPR with fd passing (QEMU ≥ 10.0).
        CprTransfer = "cpr-transfer",
    }
}

qapi_enum! {
    /// Where zero pages are detected (QAPI `ZeroPageDetection`).
    pub enum ZeroPageDetection {
        /// No zero-page checking.
        None = "none",
        /// In the main migration thread.
        Legacy = "legacy",
        /// In the multifd sender threads.
        Multifd = "multifd",
    }
}

qapi_enum! {
    /// Progress of a `calc-dirty-rate` measurement (QAPI `DirtyRateStatus`).
    pub enum DirtyRateStatus {
        /// No measurement started yet.
        Unstarted = "unstarted",
        /// Measuring.
        Measuring = "measuring",
        /// Result available.
        Measured = "measured",
    }
}

qapi_enum! {
    /// How `calc-dirty-rate` measures (QAPI `DirtyRateMeasureMode`).
    pub enum DirtyRateMeasureMode {
        /// Hash a random sample of pages twice (works with any accelerator, including TCG).
        PageSampling = "page-sampling",
        /// KVM dirty ring (needs `dirty-ring-size`).
        DirtyRing = "dirty-ring",
        /// Dirty bitmap (KVM without dirty ring).
        DirtyBitmap = "dirty-bitmap",
    }
}

qapi_enum! {
    /// Unit of `calc-time` (QAPI `TimeUnit`, QEMU ≥ 8.2).
    pub enum TimeUnit {
        /// Seconds.
        Second = "second",
        /// Milliseconds.
        Millisecond = "millisecond",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_round_trip_in_kebab_case() {
        for status in MigrationStatus::KNOWN {
            let json = serde_json::to_string(status).unwrap();
            let back: MigrationStatus = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, status);
            assert!(back.is_known());
        }
        assert_eq!(
            serde_json::to_string(&MigrationStatus::PostcopyRecoverSetup).unwrap(),
            "\"postcopy-recover-setup\""
        );
        assert_eq!(
            serde_json::to_string(&MigrationCapability::XIgnoreShared).unwrap(),
            "\"x-ignore-shared\""
        );
        assert_eq!(
            RunState::from_wire("finish-migrate"),
            RunState::FinishMigrate
        );
    }

    #[test]
    fn unknown_values_are_kept_verbatim_and_serialize_back() {
        let status: MigrationStatus = serde_json::from_str("\"some-future-state\"").unwrap();
        assert_eq!(status, MigrationStatus::Unknown("some-future-state".into()));
        assert!(!status.is_known());
        assert!(!status.is_terminal());
        assert!(status.is_in_progress());
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            "\"some-future-state\""
        );
        let cap: MigrationCapability = "future-cap".parse().unwrap();
        assert_eq!(cap.to_string(), "future-cap");
    }

    #[test]
    fn status_classification() {
        use MigrationStatus::*;
        for s in [Completed, Failed, Cancelled] {
            assert!(s.is_terminal(), "{s}");
            assert!(!s.is_in_progress(), "{s}");
        }
        assert!(!None.is_terminal());
        assert!(!None.is_in_progress());
        for s in [
            Setup,
            Active,
            Device,
            PreSwitchover,
            Cancelling,
            PostcopyActive,
        ] {
            assert!(!s.is_terminal(), "{s}");
        }
        for s in [
            PostcopyActive,
            PostcopyPaused,
            PostcopyRecoverSetup,
            PostcopyRecover,
        ] {
            assert!(s.is_postcopy(), "{s}");
        }
        assert!(!Active.is_postcopy());
        assert!(!Completed.is_postcopy());
    }
}
