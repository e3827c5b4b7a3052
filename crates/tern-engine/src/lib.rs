//! The migration engine: runs one migration between two QEMUs by executing a policy's
//! decisions over QMP, and records every state change and decision as an event.
//!
//! It owns no processes (the host agent does) and makes no decisions (the policy core
//! does): it is the shell around the pure core.

pub mod endpoint;
pub mod runner;
pub mod state;

pub use endpoint::{DestinationEndpoint, EndpointFacts};
pub use runner::{
    DEFAULT_POLL_INTERVAL, DEFAULT_POSTCOPY_STALL_TIMEOUT, DEFAULT_RECOVERY_WINDOW,
    MigrationProgress, MigrationReport, MigrationRunner, MigrationSetup, OperatorCommand,
    OperatorRequest, TakenAction, probe_dirty_rate,
};
pub use state::{MigrationEvent, MigrationEventKind, MigrationState};

/// Errors while preparing or driving a migration.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// QEMU refused a command or went away.
    #[error("QMP: {0}")]
    Qmp(#[from] tern_qmp::QmpError),
    /// The destination agent could not be reached or refused a request.
    #[error("destination: {0}")]
    Remote(String),
    /// The dirty-rate probe failed.
    #[error("dirty-rate probe: {0}")]
    Probe(String),
}
