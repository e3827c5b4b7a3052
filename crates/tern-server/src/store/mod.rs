//! The controller's durable state behind one interface ([`ControllerStore`]).
//!
//! [`SqlStore`] implements it with sqlx's `Any` driver, so SQLite (the default, one file) and
//! PostgreSQL (several controllers, issue 12) run the same queries: `$N` placeholders (SQLite
//! accepts them too) and portable SQL only (see [`schema`]).

mod schema;
mod sql;

use async_trait::async_trait;

pub use sql::SqlStore;

use crate::model::{
    EvacuationRecord, Heartbeat, HostPatch, HostRecord, MigrationEvent, MigrationRecord, VmRecord,
};

/// Errors of the store; each names what was asked and where.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed an operation.
    #[error("controller database {location}: {what}: {source}")]
    Database {
        /// The database (file path or URL without credentials).
        location: String,
        /// What was being done.
        what: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A stored value cannot be read back (a bug or a hand-edited database).
    #[error("controller database {location}: {0}", location = .1)]
    Corrupt(String, String),
    /// The database was written by a newer tern.
    #[error(
        "controller database {location} has schema version {found}, this tern knows up to {known}: run a newer tern"
    )]
    SchemaTooNew {
        /// The database.
        location: String,
        /// Its version.
        found: i64,
        /// The newest this binary knows.
        known: i64,
    },
    /// Preparing the database file or directory failed.
    #[error("controller database {location}: {what}: {source}")]
    Io {
        /// The path.
        location: String,
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A record to append to the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Who (the credential's name and peer address).
    pub actor: String,
    /// HTTP method.
    pub method: String,
    /// Path (with query).
    pub path: String,
    /// Status answered.
    pub status: u16,
}

/// Everything the controller keeps.
#[async_trait]
pub trait ControllerStore: Send + Sync {
    /// Records a heartbeat: creates or updates the host's facts and replaces its VMs.
    async fn record_heartbeat(&self, hb: &Heartbeat, now_ms: u64) -> Result<(), StoreError>;
    /// One host (state `up` or `draining` as stored; unreachability is the caller's).
    async fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError>;
    /// Hosts ordered by name, after `after`, at most `limit`.
    async fn hosts_page(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<HostRecord>, StoreError>;
    /// Every host.
    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError>;
    /// Applies an operator patch; `None` when the host is unknown.
    async fn patch_host(
        &self,
        name: &str,
        patch: &HostPatch,
    ) -> Result<Option<HostRecord>, StoreError>;
    /// VMs, of one host or all, by name.
    async fn vms(&self, host: Option<&str>) -> Result<Vec<VmRecord>, StoreError>;
    /// Inserts or replaces a migration.
    async fn put_migration(&self, m: &MigrationRecord) -> Result<(), StoreError>;
    /// One migration.
    async fn migration(&self, id: &str) -> Result<Option<MigrationRecord>, StoreError>;
    /// Migrations (of one evacuation, in plan order; or all, newest first).
    async fn migrations(
        &self,
        evacuation_id: Option<&str>,
    ) -> Result<Vec<MigrationRecord>, StoreError>;
    /// Appends an event to a migration's history; returns its sequence number.
    async fn add_event(
        &self,
        migration_id: &str,
        kind: &str,
        detail: &str,
        now_ms: u64,
    ) -> Result<u64, StoreError>;
    /// A migration's history, oldest first.
    async fn events(&self, migration_id: &str) -> Result<Vec<MigrationEvent>, StoreError>;
    /// Inserts or replaces an evacuation.
    async fn put_evacuation(&self, e: &EvacuationRecord) -> Result<(), StoreError>;
    /// One evacuation.
    async fn evacuation(&self, id: &str) -> Result<Option<EvacuationRecord>, StoreError>;
    /// Every evacuation, newest first.
    async fn evacuations(&self) -> Result<Vec<EvacuationRecord>, StoreError>;
    /// Appends to the audit log.
    async fn audit(&self, entry: &AuditEntry, now_ms: u64) -> Result<(), StoreError>;
    /// The audit log, oldest first (at most `limit`, newest kept).
    async fn audit_log(&self, limit: u32) -> Result<Vec<(u64, AuditEntry)>, StoreError>;
    /// Takes or renews lease `name` for `leader` until `now + ttl`; returns the epoch held,
    /// or `None` when another leader holds an unexpired lease (issue 12's leader election).
    async fn acquire_lease(
        &self,
        name: &str,
        leader: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<Option<u64>, StoreError>;
    /// Lease `name` as stored (holder, epoch, expiry), whoever holds it.
    async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError>;
}

/// A lease row: who holds it, at which epoch, until when (wall ms of the holder's clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The holder (controller id and URL).
    pub leader: String,
    /// The epoch (the fencing token; +1 at every change of holder).
    pub epoch: u64,
    /// When it expires unless renewed.
    pub expires_ms: u64,
}
