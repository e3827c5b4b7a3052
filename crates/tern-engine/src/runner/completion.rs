//! The end of a migration as QEMU reports it: the destination must run the guest, and when
//! the destination cannot be asked, the runner says so (`unknown`) instead of guessing.

use std::time::Duration;

use tern_qmp::RunState;
use tokio::time::Instant;

use super::MigrationRunner;
use crate::state::MigrationState;

/// How long the destination may take to report `running` after completion.
const DESTINATION_RUNNING_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an unreachable destination agent is asked again.
const UNKNOWN_RETRY: Duration = Duration::from_secs(1);

impl MigrationRunner {
    /// The source reports `completed`: the destination must run the guest.
    pub(super) async fn complete(&mut self) {
        // Final numbers: re-query once (QEMU 7.2 could return zeros right after completion).
        if let Ok(i) = self.source.migration_info().await
            && i.ram.as_ref().and_then(|r| r.transferred).unwrap_or(0) > 0
        {
            self.last_info = Some(i);
        }
        // The destination keeps the source's run state (QEMU's global-state section): a guest
        // paused to force completion arrives paused, and must be resumed there.
        let mut deadline = Instant::now() + DESTINATION_RUNNING_TIMEOUT;
        let mut unknown_since: Option<Instant> = None;
        loop {
            match self.destination.run_state().await {
                Ok(s) if s.running => break,
                Ok(s) if matches!(s.status, RunState::InMigrate | RunState::FinishMigrate) => {}
                Ok(s) => match self.destination.cont().await {
                    Err(e) => self.note(format!(
                        "cont on the destination (state {}) failed: {e}",
                        s.status.as_str()
                    )),
                    Ok(()) => self.note(format!(
                        "destination arrived {}; resumed it with cont",
                        s.status.as_str()
                    )),
                },
                Err(e) if e.is_peer_unreachable() => {
                    // The destination *agent* does not answer; its QEMU may well run the
                    // guest. Declaring it lost would invite a restart elsewhere — a second
                    // copy of the guest. Say what is known and keep asking.
                    let since = *unknown_since.get_or_insert_with(Instant::now);
                    if self.state != MigrationState::Unknown {
                        self.error = Some(format!("destination unreachable after completion: {e}"));
                        self.transition(
                            MigrationState::Unknown,
                            format!(
                                "the source handed the guest over (QEMU completed) but the \
                                 destination's agent does not answer ({e}); where the guest \
                                 runs is not known until it does"
                            ),
                        );
                    }
                    if since.elapsed() > self.setup.recovery_window {
                        self.note(format!(
                            "the destination did not answer for {} s: leaving the migration \
                             unknown; both QEMUs are kept",
                            since.elapsed().as_secs()
                        ));
                        return;
                    }
                    tokio::time::sleep(UNKNOWN_RETRY).await;
                    deadline = Instant::now() + DESTINATION_RUNNING_TIMEOUT;
                    continue;
                }
                Err(e) => {
                    self.error = Some(format!("destination gone after completion: {e}"));
                    self.transition(
                        MigrationState::Lost,
                        format!("the destination QEMU is gone after the source handed over: {e}"),
                    );
                    return;
                }
            }
            if Instant::now() > deadline {
                self.note("destination did not report running within 30 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.state == MigrationState::Unknown {
            self.error = None;
        }
        self.transition(
            MigrationState::Completed,
            "QEMU reports completed and the guest runs on the destination",
        );
    }

    pub(super) async fn resume_source_if_paused(&mut self) {
        if self.paused_guest {
            match self.source.cont().await {
                Ok(()) => {
                    self.paused_guest = false;
                    self.note("resumed the guest on the source");
                }
                Err(e) => self.note(format!("could not resume the guest on the source: {e}")),
            }
        }
    }

    /// The source's QMP connection failed: the source QEMU is known dead (its socket is
    /// local to this process).
    pub(super) async fn source_unreachable(&mut self, err: &str) {
        self.error = Some(format!("source QMP unreachable: {err}"));
        if self.state.is_after_switch() {
            // Post-copy: the destination runs the guest; without the source the missing pages
            // are gone.
            self.transition(
                MigrationState::Lost,
                format!("source QEMU died during post-copy (missing pages are lost): {err}"),
            );
        } else {
            self.transition(
                MigrationState::Failed,
                format!("source QEMU unreachable before the switch: {err}"),
            );
        }
    }
}
