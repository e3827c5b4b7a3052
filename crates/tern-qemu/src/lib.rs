//! The QEMU process adapter: typed VM specs, supervised QEMU processes, host-timestamped
//! serial consoles and the accelerator probe.
//!
//! This crate knows how to *run* QEMU; it makes no migration decisions (that is
//! `tern-policy`) and speaks no QMP (that is `tern-qmp`).

pub mod accel;
pub mod binary;
pub mod process;
pub mod serial;
pub mod spec;

pub use accel::{AcceleratorVerdict, probe_accelerator};
pub use binary::{MIN_QEMU, QemuBinary, QemuVersion};
pub use process::{VmLaunch, VmProcess};
pub use serial::{SerialRecorder, host_monotonic_ns};
pub use spec::{
    Accelerator, LaunchMode, PostCopyPermission, VmMigrationSettings, VmSockets, VmSpec,
};

/// Errors from starting or describing QEMU processes.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU is not installed or cannot be run.
    #[error("{0}")]
    QemuMissing(String),
    /// QEMU is older than tern accepts.
    #[error("{0}")]
    QemuTooOld(String),
    /// The VM spec has a value QEMU would reject.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// QEMU exited or hung during start-up.
    #[error("QEMU failed to start ({status}); its last words:\n{stderr}")]
    StartFailed {
        /// Exit status or reason.
        status: String,
        /// The end of QEMU's stderr.
        stderr: String,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What tern was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
