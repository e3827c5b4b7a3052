//! An operator's commands on one migration, as the web view's buttons and the API give them:
//! abort, force-complete, bandwidth. Each is sent to the source agent, which owns the running
//! migration (the controller never talks to QEMU), and recorded in the migration's history
//! with who asked and what the agent answered; the runner then records the outcome the agent
//! reports on its next poll.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent_client::AgentCallError;
use crate::controller::{Controller, ControllerError, MigrationView};
use crate::model::{MigrationRecord, MigrationState, now_ms};

/// The bandwidth caps an agent accepts (8 kbit/s to 400 Gbit/s, as `tern-agent`'s
/// `BandwidthRequest`), checked here too so a bad value is named before any agent call.
pub const BANDWIDTH_RANGE: std::ops::RangeInclusive<u64> = 1000..=50_000_000_000;

/// `POST /v1/migrations/{id}/bandwidth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BandwidthRequest {
    /// New cap in bytes per second (1000 to 50000000000).
    pub bytes_per_s: u64,
}

/// A command on a started migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// Stop it (QEMU's `migrate_cancel`; refused after the switch to post-copy).
    Abort,
    /// Finish now (the agent's policy: post-copy where permitted, else pause the guest).
    ForceComplete,
    /// Cap its bandwidth (bytes/s).
    Bandwidth(u64),
}

impl OperatorAction {
    fn describe(self) -> String {
        match self {
            Self::Abort => "abort".into(),
            Self::ForceComplete => "force-complete".into(),
            Self::Bandwidth(b) => format!("bandwidth {b} B/s"),
        }
    }
}

impl Controller {
    /// An operator's abort (`POST /v1/migrations/{id}/abort`): a migration not started yet
    /// ends `aborted` here; a started one is aborted on its source agent (QEMU's
    /// `migrate_cancel` cannot undo a switch to post-copy: the agent then refuses, 409 with
    /// its reason). A step of a running evacuation is retried, as the evacuation must finish.
    pub async fn abort_migration(
        &self,
        id: &str,
        actor: &str,
    ) -> Result<MigrationView, ControllerError> {
        self.operate(id, actor, OperatorAction::Abort).await
    }

    /// An operator's command on migration `id`, recorded with `actor`.
    pub async fn operate(
        &self,
        id: &str,
        actor: &str,
        action: OperatorAction,
    ) -> Result<MigrationView, ControllerError> {
        if let OperatorAction::Bandwidth(b) = action {
            if !BANDWIDTH_RANGE.contains(&b) {
                return Err(ControllerError::Invalid(format!(
                    "bytes_per_s={b} is out of range: give {} to {} (8 kbit/s to 400 Gbit/s)",
                    BANDWIDTH_RANGE.start(),
                    BANDWIDTH_RANGE.end()
                )));
            }
        }
        let work = self.work.lock().await;
        let m = self.migration(id).await?.migration;
        if m.state.is_terminal() {
            return Err(ControllerError::Conflict(format!(
                "migration {id} is {}: {} applies to an unfinished migration only",
                m.state.as_str(),
                action.describe()
            )));
        }
        match (m.agent_migration_id.clone(), action) {
            (None, OperatorAction::Abort) => self.abort_unstarted(m, actor).await?,
            (None, _) => {
                return Err(ControllerError::Conflict(format!(
                    "migration {id} is {} and has not reached its agent yet: {} applies once \
                     it runs (abort works now)",
                    m.state.as_str(),
                    action.describe()
                )));
            }
            (Some(agent_id), action) => {
                let r = self.send_to_agent(&m.source, &agent_id, action).await;
                let what = action.describe();
                match r {
                    Ok(()) => {
                        self.note(&m, "operator", &format!("{what} requested by {actor}"))
                            .await?;
                    }
                    Err(e) => {
                        self.note(&m, "operator", &format!("{what} by {actor} refused: {e}"))
                            .await?;
                        return Err(ControllerError::Conflict(format!(
                            "migration {id}: {what} refused: {e}"
                        )));
                    }
                }
            }
        }
        drop(work);
        self.migration(id).await
    }

    async fn send_to_agent(
        &self,
        source: &str,
        agent_id: &str,
        action: OperatorAction,
    ) -> Result<(), AgentCallError> {
        match action {
            OperatorAction::Abort => self.agents.abort(source, agent_id).await,
            OperatorAction::ForceComplete => self.agents.force_complete(source, agent_id).await,
            OperatorAction::Bandwidth(b) => self.agents.set_bandwidth(source, agent_id, b).await,
        }
    }

    async fn abort_unstarted(
        &self,
        mut m: MigrationRecord,
        actor: &str,
    ) -> Result<(), ControllerError> {
        let now = now_ms();
        let why = format!("aborted by {actor} before it started");
        m.state = MigrationState::Aborted;
        m.ended_ms = Some(now);
        m.updated_ms = now;
        m.error = Some(why.clone());
        self.store.put_migration(&m).await?;
        self.metrics.aborts.inc();
        self.note(&m, "state", &why).await
    }
}
