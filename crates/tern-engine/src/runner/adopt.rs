//! Taking over a migration that another runner started (the agent that ran it was killed or
//! upgraded), at whatever phase QEMU reports.
//!
//! QEMU drives the stream on its own, so a migration outlives the process that started it.
//! The new runner asks the source where it is and continues from there with the same rules
//! as a fresh one: before the switch it cancels (the guest stays on the source, which holds
//! the only complete state; the migration ends `failed`); after it, it supervises post-copy — including pause and
//! recovery — until completion.

use serde::{Deserialize, Serialize};
use tern_policy::{ActionKind, PostcopySupervisor};
use tern_qmp::{MigrationStatus, RunState};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{MigrationReport, MigrationRunner, OperatorRequest};
use crate::state::MigrationState;

/// What survived of a migration whose runner died: its last recorded state, how long it has
/// been running, recoveries already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedMigration {
    /// The state last recorded.
    pub state: MigrationState,
    /// Milliseconds since the migration started (event times continue from here).
    pub elapsed_ms: u64,
    /// Post-copy recoveries recorded before.
    pub recoveries: u32,
}

impl MigrationRunner {
    /// Adopts a running migration (see the module docs) and follows it to a terminal state.
    /// The setup must carry the migration's URI (recovery listens on it again).
    pub async fn adopt(
        mut self,
        adopted: AdoptedMigration,
        mut control: mpsc::Receiver<OperatorRequest>,
    ) -> MigrationReport {
        self.started = Instant::now();
        self.elapsed_offset_ms = adopted.elapsed_ms;
        self.state = adopted.state;
        self.recoveries_before = adopted.recoveries;
        self.switched = adopted.state.is_after_switch();
        self.note(format!(
            "adopted after an agent restart; the migration was {}: asking QEMU where it is",
            adopted.state
        ));
        let info = match self.source.migration_info().await {
            Ok(i) => i,
            Err(e) => {
                self.source_unreachable(&e.to_string()).await;
                return self.report();
            }
        };
        let status = info.status_or_none();
        self.last_info = Some(info.clone());
        match status {
            MigrationStatus::Completed => {
                if !self.state.is_after_switch() && self.state != MigrationState::Precopy {
                    self.transition(MigrationState::Precopy, "QEMU reports completed");
                }
                self.complete().await;
            }
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => {
                self.switched = true;
                let to = match status {
                    MigrationStatus::PostcopyActive => MigrationState::Postcopy,
                    MigrationStatus::PostcopyPaused => MigrationState::PostcopyPaused,
                    _ => MigrationState::Recovering,
                };
                if !self.state.is_after_switch() && self.state != MigrationState::Precopy {
                    self.state = MigrationState::Precopy;
                }
                self.supervisor = Some(PostcopySupervisor::new(self.setup.postcopy_timings()));
                self.transition(
                    to,
                    format!(
                        "QEMU reports {} after the agent restart: the guest runs on the \
                         destination; supervising post-copy, including recovery",
                        status.as_str()
                    ),
                );
                self.monitor(&mut control).await;
            }
            MigrationStatus::Failed | MigrationStatus::Cancelled | MigrationStatus::None => {
                let why = format!(
                    "QEMU reports the migration {} after the agent restart",
                    status.as_str()
                );
                self.error = Some(why.clone());
                if self.state.is_after_switch() {
                    self.transition(MigrationState::Lost, why);
                } else {
                    self.mark_paused_guest().await;
                    self.resume_source_if_paused().await;
                    self.transition(
                        MigrationState::Failed,
                        format!("{why}: the guest keeps running on the source"),
                    );
                }
            }
            _ => {
                // Pre-copy (setup, active, device, …): cancel; the source keeps the guest.
                // The switch may still race the cancel; the monitor follows whatever QEMU
                // reports next (cancelled, completed or post-copy).
                if matches!(
                    self.state,
                    MigrationState::Pending | MigrationState::Preparing
                ) {
                    self.transition(MigrationState::Precopy, "QEMU reports pre-copy");
                }
                self.mark_paused_guest().await;
                self.take_action(
                    ActionKind::Abort,
                    None,
                    "adopted during pre-copy after an agent restart: cancelling, the guest \
                     stays on the source (the plan and the policy's state died with the agent)",
                );
                match self.source.migrate_cancel().await {
                    Ok(()) => {
                        self.abort_requested = true;
                        self.adoption_cancel = Some(
                            "agent restarted during pre-copy; migration cancelled, guest kept \
                             on the source"
                                .into(),
                        );
                    }
                    Err(e) => self.note(format!("migrate_cancel failed: {e}")),
                }
                self.monitor(&mut control).await;
            }
        }
        self.report()
    }

    /// A guest found paused on the source during an unfinished pre-copy was paused by tern
    /// (force-complete or `PauseGuest`), so it is resumed when the migration ends there.
    async fn mark_paused_guest(&mut self) {
        if let Ok(s) = self.source.run_state().await
            && !s.running
            && matches!(s.status, RunState::Paused)
        {
            self.paused_guest = true;
        }
    }
}
