//! Typed wrappers of the migration-related QMP commands.
//!
//! Names and arguments follow `qapi/migration.json` and `qapi/run-state.json` of QEMU 10.0.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::client::QmpClient;
use crate::enums::{MigrationCapability, MigrationStatus};
use crate::error::{QmpError, Result};
use crate::event::QmpEventKind;
use crate::types::{
    CalcDirtyRateArgs, DirtyRateInfo, MigrateArgs, MigrationCapabilityStatus, MigrationInfo,
    MigrationParameters, ObjectPropertyInfo, QemuVersion, SetCapabilitiesArgs, StatusInfo, UriArgs,
    VersionInfoWire,
};

/// Default polling period of [`QmpClient::wait_for_migration_status`]: events normally
/// answer first; polling covers QEMUs where the `events` capability is off.
pub const DEFAULT_STATUS_POLL: Duration = Duration::from_millis(200);

impl QmpClient {
    /// `query-version`: QEMU's version (same as the greeting's, but asked now).
    pub async fn query_version(&self) -> Result<QemuVersion> {
        let wire: VersionInfoWire = self.execute("query-version", ()).await?;
        Ok(wire.into())
    }

    /// `query-status`: run state and whether the vCPUs run.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute("query-status", ()).await
    }

    /// Names of the commands this QEMU accepts (`query-commands`), to detect features that
    /// are commands rather than capabilities (`migrate-pause`, `migrate-recover`,
    /// `calc-dirty-rate`, `set-vcpu-dirty-limit` …) without assuming them from the version.
    pub async fn supported_commands(&self) -> Result<BTreeSet<String>> {
        #[derive(serde::Deserialize)]
        struct CommandInfo {
            name: String,
        }
        let commands: Vec<CommandInfo> = self.execute("query-commands", ()).await?;
        Ok(commands.into_iter().map(|c| c.name).collect())
    }

    /// `query-migrate`: status and statistics of the current (or last) migration.
    pub async fn query_migrate(&self) -> Result<MigrationInfo> {
        self.execute("query-migrate", ()).await
    }

    /// `query-migrate-capabilities`: every capability this QEMU knows, with its state.
    pub async fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapabilityStatus>> {
        self.execute("query-migrate-capabilities", ()).await
    }

    /// The capabilities this QEMU supports, from `query-migrate-capabilities` (never inferred
    /// from the version: distributions backport and compile features out). Includes
    /// `Unknown(_)` members for capabilities newer than this build.
    pub async fn supported_capabilities(&self) -> Result<BTreeSet<MigrationCapability>> {
        Ok(self
            .query_migrate_capabilities()
            .await?
            .into_iter()
            .map(|c| c.capability)
            .collect())
    }

    /// The capabilities currently switched on.
    pub async fn enabled_capabilities(&self) -> Result<BTreeSet<MigrationCapability>> {
        Ok(self
            .query_migrate_capabilities()
            .await?
            .into_iter()
            .filter(|c| c.state)
            .map(|c| c.capability)
            .collect())
    }

    /// `migrate-set-capabilities`. Capabilities must be set before `migrate` /
    /// `migrate-incoming`; `postcopy-ram`, `postcopy-preempt`, `multifd` on both sides.
    pub async fn migrate_set_capabilities(
        &self,
        capabilities: &[MigrationCapabilityStatus],
    ) -> Result<()> {
        self.execute_unit(
            "migrate-set-capabilities",
            SetCapabilitiesArgs { capabilities },
        )
        .await
    }

    /// `query-migrate-parameters`.
    pub async fn query_migrate_parameters(&self) -> Result<MigrationParameters> {
        self.execute("query-migrate-parameters", ()).await
    }

    /// `migrate-set-parameters`: changes only the fields that are `Some` (and `extra`).
    /// Several (e.g. `max-bandwidth`, `downtime-limit`) may be changed during a migration.
    pub async fn migrate_set_parameters(&self, parameters: &MigrationParameters) -> Result<()> {
        self.execute_unit("migrate-set-parameters", parameters)
            .await
    }

    /// `migrate` with a URI (`tcp:host:port`, `unix:/path`, `exec:…`). Returns once QEMU
    /// accepted the command; follow progress with `query-migrate` or events.
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.execute_unit("migrate", MigrateArgs { uri, resume: false })
            .await
    }

    /// `migrate` with `resume: true`: resumes a `postcopy-paused` migration on the source,
    /// after `migrate-recover` was issued on the destination.
    pub async fn migrate_resume(&self, uri: &str) -> Result<()> {
        self.execute_unit("migrate", MigrateArgs { uri, resume: true })
            .await
    }

    /// `migrate-incoming` on a destination started with `-incoming defer`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.execute_unit("migrate-incoming", UriArgs { uri }).await
    }

    /// `migrate-start-postcopy`: switch a running pre-copy to post-copy (source side; needs
    /// `postcopy-ram` on both sides).
    pub async fn migrate_start_postcopy(&self) -> Result<()> {
        self.execute_unit("migrate-start-postcopy", ()).await
    }

    /// `migrate_cancel` (note QEMU's underscore). Succeeds even if nothing runs; cannot undo
    /// a post-copy.
    pub async fn migrate_cancel(&self) -> Result<()> {
        self.execute_unit("migrate_cancel", ()).await
    }

    /// `migrate-continue`: leave a paused state such as `pre-switchover`
    /// (with `pause-before-switchover`).
    pub async fn migrate_continue(&self, expected_state: &MigrationStatus) -> Result<()> {
        self.execute_unit(
            "migrate-continue",
            serde_json::json!({ "state": expected_state }),
        )
        .await
    }

    /// `migrate-pause`: force a post-copy into `postcopy-paused` (e.g. to move it to another
    /// network path).
    ///
    /// Sent out of band when negotiated (`allow-oob` in qapi/migration.json): it must work
    /// while a faulting vCPU holds the big lock.
    pub async fn migrate_pause(&self) -> Result<()> {
        self.execute_unit_oob("migrate-pause", ()).await
    }

    /// `migrate-recover` on the destination: listen on a new URI for a paused post-copy.
    ///
    /// Sent out of band when negotiated: run in the monitor's I/O thread, QEMU also accepts
    /// the recovery connection there (`socket_start_incoming_migration_internal` listens on
    /// `g_main_context_get_thread_default()`, migration/socket.c), so recovery works while
    /// the destination's main loop waits for the big lock held by a vCPU stuck on a missing
    /// page — the deadlock seen under TCG when a link is cut at that moment.
    pub async fn migrate_recover(&self, uri: &str) -> Result<()> {
        self.execute_unit_oob("migrate-recover", UriArgs { uri })
            .await
    }

    /// `cont`: start or resume the vCPUs.
    pub async fn cont(&self) -> Result<()> {
        self.execute_unit("cont", ()).await
    }

    /// `stop`: pause the vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.execute_unit("stop", ()).await
    }

    /// `quit`: ask QEMU to exit. A connection that closes before the reply counts as success,
    /// since that is what quitting does.
    pub async fn quit(&self) -> Result<()> {
        match self.execute_unit("quit", ()).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_closed() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `calc-dirty-rate`: start measuring the guest's dirty rate; read the result with
    /// [`QmpClient::query_dirty_rate`] after `calc_time`.
    pub async fn calc_dirty_rate(&self, args: &CalcDirtyRateArgs) -> Result<()> {
        self.execute_unit("calc-dirty-rate", args).await
    }

    /// `query-dirty-rate`: result of the last `calc-dirty-rate`.
    pub async fn query_dirty_rate(&self) -> Result<DirtyRateInfo> {
        self.execute("query-dirty-rate", ()).await
    }

    /// Waits until the migration status satisfies `pred`, using `MIGRATION` events (if the
    /// `events` capability is on) and polling `query-migrate` every
    /// [`DEFAULT_STATUS_POLL`]. Returns the status that matched.
    ///
    /// Polling alone can miss short states (e.g. `device`); enable `events` when every
    /// transition matters. Fails with [`QmpError::WaitTimeout`] (carrying the last status
    /// seen) or [`QmpError::Closed`] if QEMU goes away.
    pub async fn wait_for_migration_status<F>(
        &self,
        pred: F,
        timeout: Duration,
    ) -> Result<MigrationStatus>
    where
        F: Fn(&MigrationStatus) -> bool,
    {
        self.wait_for_migration_status_polling(pred, timeout, DEFAULT_STATUS_POLL)
            .await
    }

    /// [`QmpClient::wait_for_migration_status`] with an explicit polling period.
    pub async fn wait_for_migration_status_polling<F>(
        &self,
        pred: F,
        timeout: Duration,
        poll: Duration,
    ) -> Result<MigrationStatus>
    where
        F: Fn(&MigrationStatus) -> bool,
    {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        // Subscribe before the first query so no transition falls between the two.
        let mut events = self.subscribe_events();
        let mut last = self.query_migrate().await?.status_or_none();
        if pred(&last) {
            return Ok(last);
        }
        let poll = poll.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(start + poll, poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(QmpError::WaitTimeout { waited: start.elapsed(), last_status: last });
                }
                received = events.recv() => match received {
                    Ok(event) => {
                        if let QmpEventKind::Migration { status } = event.kind {
                            last = status;
                            if pred(&last) {
                                return Ok(last);
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        last = self.query_migrate().await?.status_or_none();
                        if pred(&last) {
                            return Ok(last);
                        }
                    }
                    // The event channel closes only with the connection.
                    Err(RecvError::Closed) => {
                        self.query_migrate().await?;
                        return Err(QmpError::Closed {
                            reason: "event stream ended while waiting for a migration status".into(),
                        });
                    }
                },
                _ = ticker.tick() => {
                    last = self.query_migrate().await?.status_or_none();
                    if pred(&last) {
                        return Ok(last);
                    }
                }
            }
        }
    }

    /// `qom-list PATH`: the properties and children of one QOM object.
    pub async fn qom_list(&self, path: &str) -> Result<Vec<ObjectPropertyInfo>> {
        self.execute("qom-list", serde_json::json!({ "path": path }))
            .await
    }

    /// The guest's VFIO devices (`vfio-pci`, `vfio-ccw`, `vfio-ap`, …), as QOM paths.
    ///
    /// A device passed through from the host keeps state in hardware that post-copy cannot
    /// fetch on demand; QEMU refuses `postcopy-ram` next to VFIO migration, and Nova forbids
    /// post-copy for instances with PCI passthrough. Devices added with `-device` or
    /// `device_add` live under `/machine/peripheral` (with an id) or
    /// `/machine/peripheral-anon` (without), which is where this looks.
    pub async fn vfio_devices(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for parent in ["/machine/peripheral", "/machine/peripheral-anon"] {
            for p in self.qom_list(parent).await? {
                let is_vfio = p
                    .type_name
                    .strip_prefix("child<")
                    .is_some_and(|t| t.starts_with("vfio-"));
                if is_vfio {
                    found.push(format!("{parent}/{} ({})", p.name, p.type_name));
                }
            }
        }
        Ok(found)
    }

    /// `execute_raw` for commands without arguments.
    pub async fn execute_simple(&self, command: &str) -> Result<Value> {
        self.execute_raw(command, Value::Null).await
    }
}
