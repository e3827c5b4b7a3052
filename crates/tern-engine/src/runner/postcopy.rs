//! After the switch: the runner executes what the pure [`PostcopySupervisor`] decides, and
//! gates the switch itself on the destination answering.
//!
//! QEMU only enters `postcopy-paused` when a socket errors out; a silently dropped network
//! can leave both sides in `postcopy-active` for minutes while TCP retransmits (qemu-devel,
//! Sept 2025: "QEMU would stay in postcopy-active waiting for pages indefinitely"). The
//! supervisor watches the bytes sent and asks for `migrate-pause` on both sides; recovery is
//! QEMU's own protocol (`migrate-recover` on the destination, `migrate resume=true` on the
//! source; docs/devel/migration/postcopy.rst, "Postcopy recovery").

use std::collections::VecDeque;
use std::time::Duration;

use tern_policy::{
    IterationSample, PostcopyAction, PostcopyDecision, PostcopyObservation, PostcopyStatus,
};
use tern_qmp::MigrationStatus;

use super::MigrationRunner;
use crate::EngineError;
use crate::state::{MigrationEventKind, MigrationState};

/// How long the destination may take to leave `postcopy-active` after `migrate-pause`, and
/// the least time between two pauses sent to it.
///
/// Why: QEMU's destination pause is asynchronous and racy. `qmp_migrate_pause`
/// (migration/migration.c, QEMU 10.0) calls `qemu_file_shutdown(mis->from_src_file)` with
/// no lock and no NULL check, while the listen thread it wakes runs
/// `postcopy_pause_incoming` (migration/savevm.c), which closes that file and sets it NULL
/// before the state becomes `postcopy-paused`; the source side of the same function checks
/// `ms->to_dst_file` under `qemu_file_lock`, the destination side does not. A second pause
/// sent in that window (we used to re-pause whenever a recovery attempt still saw
/// `postcopy-active`) crashed the destination QEMU with SIGSEGV in about one lab run in
/// ten — and with it the only running copy of the guest. So: one pause, then wait for it
/// to land; pause again only if the destination is still active long after.
const DESTINATION_PAUSE_SETTLE: Duration = Duration::from_secs(10);

/// Poll interval while waiting for the destination's pause to land.
const DESTINATION_PAUSE_POLL: Duration = Duration::from_millis(100);

/// QEMU's status as the supervisor sees it.
fn postcopy_status(status: &MigrationStatus) -> PostcopyStatus {
    match status {
        MigrationStatus::PostcopyActive => PostcopyStatus::Active,
        MigrationStatus::PostcopyPaused => PostcopyStatus::Paused,
        MigrationStatus::PostcopyRecover | MigrationStatus::PostcopyRecoverSetup => {
            PostcopyStatus::Recovering
        }
        _ => PostcopyStatus::Ended,
    }
}

impl MigrationRunner {
    /// Switches to post-copy, after checking that the destination answers: the switch cannot
    /// be undone, and recovering a post-copy interrupted later needs the destination
    /// (`migrate-recover`). An unreachable destination agent therefore blocks the switch.
    pub(super) async fn switch_to_postcopy(&mut self, reason: &str) -> Result<(), String> {
        if let Err(e) = self.destination.migration_info().await {
            return Err(format!(
                "the destination does not answer ({e}): no switch to post-copy, since \
                 recovering an interrupted post-copy needs it (requested: {reason})"
            ));
        }
        self.take_action("switch-to-postcopy", reason);
        self.source
            .migrate_start_postcopy()
            .await
            .map_err(|e| format!("QEMU refused migrate-start-postcopy: {e}"))
    }

    /// Feeds one poll to the supervisor and executes its decisions.
    pub(super) async fn supervise(&mut self, status: &MigrationStatus, sample: &IterationSample) {
        if status == &MigrationStatus::PostcopyRecover
            || status == &MigrationStatus::PostcopyRecoverSetup
        {
            // QEMU took an attempt up (ours, or an operator's by hand).
            if self.state == MigrationState::PostcopyPaused {
                self.transition(
                    MigrationState::Recovering,
                    format!("QEMU reports {}", status.as_str()),
                );
            }
        }
        self.supervise_with(PostcopyObservation::Poll {
            at_ms: sample.at_ms,
            status: postcopy_status(status),
            transferred_bytes: sample.transferred_bytes,
            remaining_bytes: sample.remaining_bytes,
        })
        .await;
    }

    async fn supervise_with(&mut self, first: PostcopyObservation) {
        let mut queue = VecDeque::from([first]);
        while let Some(obs) = queue.pop_front() {
            let Some(supervisor) = self.supervisor.as_mut() else {
                return;
            };
            for d in supervisor.observe(&obs) {
                if let Some(follow_up) = self.execute_postcopy(d).await {
                    queue.push_back(follow_up);
                }
                if self.state.is_terminal() {
                    return;
                }
            }
        }
    }

    /// Executes one supervisor decision; returns an observation to feed back (a failed
    /// recovery attempt).
    async fn execute_postcopy(&mut self, d: PostcopyDecision) -> Option<PostcopyObservation> {
        let PostcopyDecision { action, reason } = d;
        match action {
            PostcopyAction::Recovered { .. } => {
                self.destination_silent = false;
                self.transition(MigrationState::Postcopy, reason);
                return None;
            }
            PostcopyAction::GiveUpStranded { outage_ms } => {
                self.error = Some(format!(
                    "post-copy stayed paused for {} s (recovery window {} s)",
                    outage_ms / 1000,
                    self.setup.recovery_window.as_secs()
                ));
                self.transition(
                    MigrationState::Stranded,
                    format!(
                        "{reason}. Once the network is back, recover with `migrate-recover \
                         {uri}` on the destination and `migrate uri={uri} resume=true` on the \
                         source; do not resume or kill either QEMU",
                        uri = self.setup.uri
                    ),
                );
                return None;
            }
            _ => {}
        }
        self.record(MigrationEventKind::Decision {
            action: action.name().to_string(),
            reason: reason.clone(),
        });
        match action {
            PostcopyAction::PauseBoth => {
                if let Err(e) = self.source.migrate_pause().await {
                    self.note(format!("migrate-pause on the source: {e}"));
                }
                self.pause_destination().await;
                None
            }
            PostcopyAction::PauseStuckAttempt { .. } => {
                if let Err(e) = self.source.migrate_pause().await {
                    self.note(format!("migrate-pause on the source: {e}"));
                }
                None
            }
            PostcopyAction::Recover { attempt } => self.attempt_recovery(attempt).await,
            PostcopyAction::Recovered { .. } | PostcopyAction::GiveUpStranded { .. } => None,
        }
    }

    /// One recovery attempt: the destination must be in `postcopy-paused` before it can
    /// listen again (`migrate-recover`), then the source reconnects (`migrate resume=true`).
    async fn attempt_recovery(&mut self, n: u32) -> Option<PostcopyObservation> {
        let failed = |runner: &Self, reason: String| PostcopyObservation::RecoveryAttemptFailed {
            at_ms: runner.elapsed_ms(),
            reason,
        };
        let info = if self.destination_silent {
            // It did not answer the last in-band query; another would only queue behind the
            // blocked main loop (QEMU stops reading the monitor, out-of-band commands
            // included, once 8 in-band commands wait: QMP_REQ_QUEUE_LEN_MAX, monitor/qmp.c).
            Err(EngineError::PeerUnreachable(
                "it did not answer the previous query".into(),
            ))
        } else {
            self.destination.migration_info().await
        };
        self.destination_silent = matches!(&info, Err(e) if e.is_peer_unreachable());
        match info {
            Ok(i) if i.status_or_none() == MigrationStatus::PostcopyActive => {
                let what = self.pause_destination().await;
                let why = format!(
                    "recovery attempt {n}: the destination was still postcopy-active; {what}"
                );
                self.note(why.clone());
                return Some(failed(self, why));
            }
            Ok(_) => {}
            Err(e) if e.is_peer_unreachable() => {
                // Nothing is known about the destination QEMU; it may well be running the
                // guest, with its main loop blocked: under TCG a vCPU that faults on a page
                // still on the source while delivering an interrupt holds the big lock, and
                // that page only comes back through a recovered channel. `migrate-recover`
                // goes out of band and works then (QEMU refuses it unless post-copy is
                // paused, so trying is safe). Keep trying within the window.
                self.note(format!(
                    "recovery attempt {n}: the destination does not answer in band ({e}); \
                     trying migrate-recover out of band"
                ));
            }
            Err(e) => {
                self.error = Some(format!("destination gone during post-copy: {e}"));
                self.transition(
                    MigrationState::Lost,
                    format!(
                        "the destination QEMU is gone during post-copy: the guest's current \
                         state (vCPUs, devices, pages written since the switch) died with it; \
                         the source still holds the pre-switch memory but not that state, so \
                         the guest must be restarted ({e})"
                    ),
                );
                return None;
            }
        }
        if let Err(e) = self.destination.migrate_recover(&self.setup.uri).await {
            let why = format!("recovery attempt {n}: migrate-recover on the destination: {e}");
            self.note(why.clone());
            if self.destination_silent {
                // Nothing listens for the source: resuming it would only fail.
                return Some(failed(self, why));
            }
        }
        match self.source.migrate_resume(&self.setup.uri).await {
            Ok(()) => {
                self.transition(
                    MigrationState::Recovering,
                    format!(
                        "recovery attempt {n}: migrate-recover on the destination, migrate \
                         resume on the source"
                    ),
                );
                None
            }
            Err(e) => {
                let why = format!("recovery attempt {n}: migrate resume failed: {e}");
                self.note(why.clone());
                Some(failed(self, why))
            }
        }
    }

    /// Sends `migrate-pause` to the destination unless one sent less than
    /// [`DESTINATION_PAUSE_SETTLE`] ago may still be taking effect, then waits (bounded) for
    /// the destination to leave `postcopy-active`. Returns what it did, for the event log.
    async fn pause_destination(&mut self) -> String {
        if let Some(at) = self.destination_paused_at_ms {
            let since = self.elapsed_ms().saturating_sub(at);
            if since < DESTINATION_PAUSE_SETTLE.as_millis() as u64 {
                return format!(
                    "not pausing it again: the pause sent {since} ms ago may still be taking \
                     effect (a second migrate-pause in that window crashes QEMU's destination)"
                );
            }
        }
        if let Err(e) = self.destination.migrate_pause().await {
            let what = format!("migrate-pause on the destination: {e}");
            self.note(what.clone());
            return what;
        }
        self.destination_paused_at_ms = Some(self.elapsed_ms());
        if self.destination_silent {
            return "paused it out of band (it does not answer in band)".into();
        }
        let sent = tokio::time::Instant::now();
        loop {
            match self.destination.migration_info().await {
                Ok(i) if i.status_or_none() == MigrationStatus::PostcopyActive => {}
                Ok(i) => {
                    return format!(
                        "paused it (destination {} after {} ms)",
                        i.status_or_none().as_str(),
                        sent.elapsed().as_millis()
                    );
                }
                Err(e) => {
                    self.destination_silent = e.is_peer_unreachable();
                    return format!("paused it; the destination then did not answer: {e}");
                }
            }
            if sent.elapsed() >= DESTINATION_PAUSE_SETTLE {
                return format!(
                    "paused it, but it still reports postcopy-active after {} s",
                    DESTINATION_PAUSE_SETTLE.as_secs()
                );
            }
            tokio::time::sleep(DESTINATION_PAUSE_POLL).await;
        }
    }
}
