//! The host agent: owns the QEMU processes of one host and runs the outgoing migrations of
//! its guests (close to QEMU, so a migration survives an outage of whatever sits above).
//!
//! - [`host`]: the VMs of one host (start, incoming, stop, QMP access);
//! - [`migration`]: one migration between two hosts, from admission checks to cleanup;
//! - [`config`]: the agent's TOML configuration (`/etc/tern/agent.toml`).

pub mod config;
pub mod host;
pub mod migration;

pub use config::{AgentConfig, HostMigrationConfig};
pub use host::{HostIdentity, HostRuntime, VmInfo, VmRole};
pub use migration::{MigrationOrder, MigrationOutcome, migrate};

/// Errors an agent reports; each names the bad value and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (duplicate name, already migrating).
    #[error("{0}")]
    Conflict(String),
    /// The destination cannot hold the guest.
    #[error("{0}")]
    InsufficientMemory(String),
    /// The request itself is invalid.
    #[error("{0}")]
    Invalid(String),
    /// Starting QEMU failed, or the spec is invalid.
    #[error(transparent)]
    Qemu(#[from] tern_qemu::QemuError),
    /// QEMU refused a command or went away.
    #[error("QMP: {0}")]
    Qmp(#[from] tern_qmp::QmpError),
    /// The configuration file is invalid.
    #[error("{0}")]
    Config(String),
    /// A bug or an environment failure.
    #[error("internal error: {0}")]
    Internal(String),
}
