//! Both sides of a migration, each behind one interface.
//!
//! The runner reaches the source QEMU through [`SourceEndpoint`] and the destination through
//! [`DestinationEndpoint`]; production implements both with a [`QmpClient`] (or, for the
//! destination, the destination agent's HTTP API), and unit tests with a scripted fake, so the
//! runner's whole life cycle can be tested in milliseconds without QEMU.
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
    QmpEvents, StatusInfo,
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

/// The operations a migration needs on the source QEMU (the one the guest runs on before the
/// switch). Every QMP command the runner sends to the source goes through here.
#[async_trait]
pub trait SourceEndpoint: Send + Sync {
    /// What the source QEMU supports (`query-migrate-capabilities`, `query-commands`,
    /// version).
    async fn facts(&self) -> Result<EndpointFacts, EngineError>;
    /// Whether QEMU accepts enabling `cap` now (run-time probe, see
    /// [`crate::features::detect_features`]); switches it off again.
    async fn capability_accepted(&self, cap: MigrationCapability) -> bool;
    /// `migrate-set-capabilities`.
    async fn set_capabilities(&self, caps: &[MigrationCapabilityStatus])
    -> Result<(), EngineError>;
    /// `migrate-set-parameters`.
    async fn set_parameters(&self, params: &MigrationParameters) -> Result<(), EngineError>;
    /// `migrate-set-parameters vcpu-dirty-limit` (MB/s per vCPU).
    async fn set_dirty_limit(&self, mb_per_s: u64) -> Result<(), EngineError>;
    /// `query-status`.
    async fn run_state(&self) -> Result<StatusInfo, EngineError>;
    /// The guest's VFIO devices (post-copy safety gate).
    async fn vfio_devices(&self) -> Result<Vec<String>, EngineError>;
    /// `migrate` to `uri`.
    async fn migrate(&self, uri: &str) -> Result<(), EngineError>;
    /// `migrate uri resume=true` (post-copy recovery, after `migrate-recover` on the
    /// destination).
    async fn migrate_resume(&self, uri: &str) -> Result<(), EngineError>;
    /// `migrate_cancel` (only ever sent before the switch).
    async fn migrate_cancel(&self) -> Result<(), EngineError>;
    /// `migrate-pause`.
    async fn migrate_pause(&self) -> Result<(), EngineError>;
    /// `migrate-start-postcopy`.
    async fn migrate_start_postcopy(&self) -> Result<(), EngineError>;
    /// `stop` (pause the vCPUs).
    async fn stop(&self) -> Result<(), EngineError>;
    /// `cont`.
    async fn cont(&self) -> Result<(), EngineError>;
    /// `query-migrate`.
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError>;
    /// `calc-dirty-rate` for `seconds`.
    async fn start_dirty_rate_probe(&self, seconds: u64) -> Result<(), EngineError>;
    /// `query-dirty-rate`: the measured rate in MB/s once measured, `None` while measuring.
    async fn measured_dirty_rate(&self) -> Result<Option<u64>, EngineError>;
    /// QEMU's events (`MIGRATION_PASS` wakes the monitor up early). A closed receiver
    /// means the QMP connection is gone.
    fn subscribe_events(&self) -> QmpEvents;
}

#[async_trait]
impl SourceEndpoint for QmpClient {
    async fn facts(&self) -> Result<EndpointFacts, EngineError> {
        DestinationEndpoint::facts(self).await
    }
    async fn capability_accepted(&self, cap: MigrationCapability) -> bool {
        let on = [MigrationCapabilityStatus::new(cap.clone(), true)];
        if self.migrate_set_capabilities(&on).await.is_err() {
            return false;
        }
        let off = [MigrationCapabilityStatus::new(cap, false)];
        let _ = self.migrate_set_capabilities(&off).await;
        true
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
    async fn set_dirty_limit(&self, mb_per_s: u64) -> Result<(), EngineError> {
        self.execute_raw(
            "migrate-set-parameters",
            serde_json::json!({ "vcpu-dirty-limit": mb_per_s }),
        )
        .await?;
        Ok(())
    }
    async fn run_state(&self) -> Result<StatusInfo, EngineError> {
        Ok(self.query_status().await?)
    }
    async fn vfio_devices(&self) -> Result<Vec<String>, EngineError> {
        Ok(QmpClient::vfio_devices(self).await?)
    }
    async fn migrate(&self, uri: &str) -> Result<(), EngineError> {
        Ok(QmpClient::migrate(self, uri).await?)
    }
    async fn migrate_resume(&self, uri: &str) -> Result<(), EngineError> {
        Ok(QmpClient::migrate_resume(self, uri).await?)
    }
    async fn migrate_cancel(&self) -> Result<(), EngineError> {
        Ok(QmpClient::migrate_cancel(self).await?)
    }
    async fn migrate_pause(&self) -> Result<(), EngineError> {
        Ok(QmpClient::migrate_pause(self).await?)
    }
    async fn migrate_start_postcopy(&self) -> Result<(), EngineError> {
        Ok(QmpClient::migrate_start_postcopy(self).await?)
    }
    async fn stop(&self) -> Result<(), EngineError> {
        Ok(QmpClient::stop(self).await?)
    }
    async fn cont(&self) -> Result<(), EngineError> {
        Ok(QmpClient::cont(self).await?)
    }
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError> {
        Ok(self.query_migrate().await?)
    }
    async fn start_dirty_rate_probe(&self, seconds: u64) -> Result<(), EngineError> {
        self.execute_raw(
            "calc-dirty-rate",
            serde_json::json!({ "calc-time": seconds }),
        )
        .await?;
        Ok(())
    }
    async fn measured_dirty_rate(&self) -> Result<Option<u64>, EngineError> {
        let v = self
            .execute_raw("query-dirty-rate", serde_json::json!({}))
            .await?;
        if v.get("status").and_then(|s| s.as_str()) == Some("measured") {
            Ok(Some(
                v.get("dirty-rate").and_then(|d| d.as_u64()).unwrap_or(0),
            ))
        } else {
            Ok(None)
        }
    }
    fn subscribe_events(&self) -> QmpEvents {
        QmpClient::subscribe_events(self)
    }
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

/// How long an in-process destination QEMU may take to answer one QMP command before the
/// runner stops waiting and treats it as not answering ([`EngineError::PeerUnreachable`]:
/// `unknown` at completion, a failed attempt during recovery — never `lost`).
///
/// Why: under TCG a destination vCPU that faults on a page still on the source during
/// post-copy can block in the userfault while holding QEMU's big lock; if the link is cut at
/// that moment the main loop (and with it QMP) never runs again. Seen in a lab run
/// (destination main thread in `bql_lock_impl`, vCPU in `do_interrupt_all` → `cpu_ldl_*`);
/// without a bound the runner waited forever. Every command the runner sends returns at
/// once in QEMU (`migrate-incoming` and `migrate-recover` only set up a listener), so 20 s
/// is far beyond a healthy answer even on a loaded machine.
pub const LOCAL_QMP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

async fn bounded<T>(
    command: &str,
    call: impl std::future::Future<Output = Result<T, tern_qmp::QmpError>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(LOCAL_QMP_TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(EngineError::PeerUnreachable(format!(
            "the QEMU did not answer `{command}` within {} s (its main loop is \
             blocked)",
            LOCAL_QMP_TIMEOUT.as_secs()
        ))),
    }
}

#[async_trait]
impl DestinationEndpoint for QmpClient {
    async fn facts(&self) -> Result<EndpointFacts, EngineError> {
        let v = self.qemu_version();
        Ok(EndpointFacts {
            capabilities: bounded("query-migrate-capabilities", self.supported_capabilities())
                .await?,
            commands: tokio::time::timeout(LOCAL_QMP_TIMEOUT, command_names(self))
                .await
                .unwrap_or_default(),
            version: (v.major, v.minor),
        })
    }
    async fn set_capabilities(
        &self,
        caps: &[MigrationCapabilityStatus],
    ) -> Result<(), EngineError> {
        bounded(
            "migrate-set-capabilities",
            self.migrate_set_capabilities(caps),
        )
        .await
    }
    async fn set_parameters(&self, params: &MigrationParameters) -> Result<(), EngineError> {
        bounded(
            "migrate-set-parameters",
            self.migrate_set_parameters(params),
        )
        .await
    }
    async fn migrate_incoming(&self, uri: &str) -> Result<(), EngineError> {
        bounded("migrate-incoming", QmpClient::migrate_incoming(self, uri)).await
    }
    async fn run_state(&self) -> Result<StatusInfo, EngineError> {
        bounded("query-status", self.query_status()).await
    }
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError> {
        bounded("query-migrate", self.query_migrate()).await
    }
    async fn cont(&self) -> Result<(), EngineError> {
        bounded("cont", QmpClient::cont(self)).await
    }
    async fn migrate_recover(&self, uri: &str) -> Result<(), EngineError> {
        bounded("migrate-recover", QmpClient::migrate_recover(self, uri)).await
    }
    async fn migrate_pause(&self) -> Result<(), EngineError> {
        bounded("migrate-pause", QmpClient::migrate_pause(self)).await
    }
}
