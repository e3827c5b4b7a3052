//! The host agent: owns the QEMU processes of one host and runs the outgoing migrations of
//! its guests (close to QEMU, so a migration survives an outage of whatever sits above).
//!
//! - [`host`]: the VMs of one host (start, incoming, stop, QMP access);
//! - [`admission`]: the one admission path (pure): order + facts of both hosts → policy input;
//! - [`bounds`]: the bounds of every number a client may send (shared with the CLI);
//! - [`migration`]: one migration between two hosts, from admission checks to cleanup;
//! - [`config`]: the agent's TOML configuration (`/etc/tern/agent.toml`);
//! - [`daemon`]: the long-running agent (`tern agent`): VMs and migrations of one host, kept
//!   in [`store`] (SQLite) so a restarted agent re-attaches to its QEMUs and finishes or
//!   cleanly fails the migrations it was running;
//! - [`http`]: its HTTP/JSON API (OpenAPI at `/openapi.json`, derived from the handlers),
//!   [`api`] the shared types and [`remote`] the client (also the engine's destination
//!   endpoint over HTTP);
//! - [`edge`]: checks of client input against the host's configuration (image directories,
//!   SLA classes); [`files`]: the private runtime directory and its lock.

pub mod admission;
pub mod api;
pub mod audit;
pub mod bounds;
pub mod config;
pub mod daemon;
pub mod edge;
pub mod fencing;
pub mod files;
pub mod host;
pub mod http;
pub mod migration;
pub mod remote;
pub mod store;

pub use config::{AgentConfig, ControllerConfig, HostMigrationConfig};
pub use daemon::{Agent, AgentOptions};
pub use host::{HostIdentity, HostRuntime, ProcessState, VmInfo, VmRole, VmRunState};
pub use migration::{MigrationOrder, MigrationOutcome, migrate};
pub use remote::{AgentClient, ClientError, RemoteDestination};

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
    /// Another agent (the destination's) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an environment failure.
    #[error("internal error: {0}")]
    Internal(String),
}
