//! The QEMU process adapter: typed VM specs, supervised QEMU processes, host-timestamped
//! serial consoles and the accelerator probe.
//!
//! This crate knows how to *run* QEMU; it makes no migration decisions (that is
//! `tern-policy`) and speaks no QMP (that is `tern-qmp`).

pub mod accel;
pub mod binary;
mod cpu;
pub mod devices;
pub mod disk;
pub mod net;
pub mod process;
pub mod serial;
pub mod spec;
pub mod tls;

pub use accel::{AcceleratorVerdict, probe_accelerator};
pub use binary::{MIN_QEMU, QemuBinary, QemuVersion};
pub use cpu::{QemuCpu, qemu_cpu};
pub use devices::{BootSource, VmDevices};
pub use disk::{CacheMode, DiskFormat, DiskSpec};
pub use net::{MacAddress, NicSpec};
pub use process::{VmLaunch, VmProcess};
pub use serial::{SerialRecorder, host_monotonic_ns};
pub use spec::{
    Accelerator, LaunchMode, PostCopyPermission, VmMigrationSettings, VmSockets, VmSpec,
};
pub use tls::{MigrationTls, TlsMigrationParameters};

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

/// Whether this host can serve post-copy as a destination: QEMU's incoming side registers
/// guest RAM with `userfaultfd(2)` to catch faults on pages that have not arrived yet.
/// Without it (kernel built without `CONFIG_USERFAULTFD`, or an unprivileged QEMU with
/// `vm.unprivileged_userfaultfd=0` and no `/dev/userfaultfd` access — Nova LP#2052473) the
/// switch to post-copy fails, so tern must not attempt it.
pub fn userfaultfd_available() -> bool {
    // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1; the fd is closed
    // at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: fd is a descriptor we own.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .is_ok()
}
