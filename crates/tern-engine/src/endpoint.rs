//! The destination side of a migration, behind one interface.
//!
//! The source agent runs the migration next to its QEMU; the destination QEMU belongs to
//! another host's agent. The runner therefore talks to the destination only through
//! [`DestinationEndpoint`]: in-process (a [`QmpClient`] of a QEMU this process owns) or over
//! the destination agent's HTTP API. Only what a migration needs is exposed — capabilities,
//! parameters, the incoming stream, the run state, and post-copy recovery.

use std::collections::BTreeSet;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tern_qmp::{
    MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationParameters, QmpClient,
    StatusInfo,
};

use crate::EngineError;

/// What a destination QEMU supports, detected from the running process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointFacts {
    /// `query-migrate-capabilities`.
    pub capabilities: BTreeSet<MigrationCapability>,
    /// `query-commands`.
    pub commands: BTreeSet<String>,
    /// QEMU version `(major, minor)`.
    pub version: (u64, u64),
}

/// The operations a migration needs on the destination QEMU.
#[async_trait]
pub trait DestinationEndpoint: Send + Sync {
    /// What the destination QEMU supports.
    async fn facts(&self) -> Result<EndpointFacts, EngineError>;
    /// `migrate-set-capabilities`.
    async fn set_capabilities(&self, caps: &[MigrationCapabilityStatus])
    -> Result<(), EngineError>;
    /// `migrate-set-parameters`.
    async fn set_parameters(&self, params: &MigrationParameters) -> Result<(), EngineError>;
    /// `migrate-incoming`.
    async fn migrate_incoming(&self, uri: &str) -> Result<(), EngineError>;
    /// `query-status`.
    async fn run_state(&self) -> Result<StatusInfo, EngineError>;
    /// `query-migrate` on the destination.
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError>;
    /// `cont`.
    async fn cont(&self) -> Result<(), EngineError>;
    /// `migrate-recover` with a fresh listening URI (post-copy recovery).
    async fn migrate_recover(&self, uri: &str) -> Result<(), EngineError>;
    /// `migrate-pause` (forces a side stuck in `postcopy-active` into `postcopy-paused`).
    async fn migrate_pause(&self) -> Result<(), EngineError>;
}

/// Collects `query-commands` names.
pub async fn command_names(qmp: &QmpClient) -> BTreeSet<String> {
    match qmp
        .execute_raw("query-commands", serde_json::json!({}))
        .await
    {
        Ok(v) => v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.get("name").and_then(|n| n.as_str()).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => BTreeSet::new(),
    }
}

#[async_trait]
impl DestinationEndpoint for QmpClient {
    async fn facts(&self) -> Result<EndpointFacts, EngineError> {
        let v = self.qemu_version();
        Ok(EndpointFacts {
            capabilities: self.supported_capabilities().await?,
            commands: command_names(self).await,
            version: (v.major, v.minor),
        })
    }
    async fn set_capabilities(
        &self,
        caps: &[MigrationCapabilityStatus],
    ) -> Result<(), EngineError> {
        Ok(self.migrate_set_capabilities(caps).await?)
    }
    async fn set_parameters(&self, params: &MigrationParameters) -> Result<(), EngineError> {
        Ok(self.migrate_set_parameters(params).await?)
    }
    async fn migrate_incoming(&self, uri: &str) -> Result<(), EngineError> {
        Ok(QmpClient::migrate_incoming(self, uri).await?)
    }
    async fn run_state(&self) -> Result<StatusInfo, EngineError> {
        Ok(self.query_status().await?)
    }
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError> {
        Ok(self.query_migrate().await?)
    }
    async fn cont(&self) -> Result<(), EngineError> {
        Ok(QmpClient::cont(self).await?)
    }
    async fn migrate_recover(&self, uri: &str) -> Result<(), EngineError> {
        Ok(QmpClient::migrate_recover(self, uri).await?)
    }
    async fn migrate_pause(&self) -> Result<(), EngineError> {
        Ok(QmpClient::migrate_pause(self).await?)
    }
}
