//! The migration engine: runs one migration between two QEMUs by executing a policy's
//! decisions over QMP, and records every state change and decision as an event.
//!
//! It owns no processes (the host agent does) and makes no decisions (the policy core
//! does): it is the shell around the pure core.

pub mod endpoint;
pub mod features;
pub mod runner;
pub mod state;

pub use endpoint::{DestinationEndpoint, EndpointFacts, SourceEndpoint};
pub use features::{
    FeatureFacts, QemuPlanInput, detect_features, plan_input_from_qemus, post_copy_safety_gates,
    qemu_features,
};
pub use runner::{
    AdoptedMigration, DEFAULT_POLL_INTERVAL, DEFAULT_POSTCOPY_STALL_TIMEOUT,
    DEFAULT_RECOVERY_WINDOW, MigrationProgress, MigrationReport, MigrationRunner, MigrationSetup,
    OperatorCommand, OperatorRequest, SourceStreamTls, TakenAction, probe_dirty_rate,
};
pub use state::{MigrationEvent, MigrationEventKind, MigrationState};

/// Errors while preparing or driving a migration.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// QEMU refused a command or went away.
    #[error("QMP: {0}")]
    Qmp(#[from] tern_qmp::QmpError),
    /// The destination agent answered with an error (it runs; its QEMU refused or is gone).
    #[error("destination: {0}")]
    Remote(String),
    /// The agent in front of a QEMU did not answer at all (not running, network down,
    /// timeout): nothing is known about that QEMU, which may well be running the guest.
    #[error("peer unreachable: {0}")]
    PeerUnreachable(String),
    /// The dirty-rate probe failed.
    #[error("dirty-rate probe: {0}")]
    Probe(String),
}

impl EngineError {
    /// Whether only the peer's agent failed to answer, so nothing is known about its QEMU
    /// (as opposed to a QEMU that answered with an error or whose socket closed).
    pub fn is_peer_unreachable(&self) -> bool {
        matches!(self, Self::PeerUnreachable(_))
    }
}
