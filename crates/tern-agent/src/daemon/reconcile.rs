//! Destination-side reconciliation after an agent restart: an incoming VM this agent
//! re-attached to, whose migration it no longer follows.
//!
//! Migration records live on the source host; the destination only holds an incoming QEMU.
//! Normally the source agent settles it (promotes it after completion, removes it after a
//! failure). But the source may have concluded while this agent was dead — it tries to
//! promote for a few seconds, then stops its own QEMU — and the destination would keep the
//! guest `incoming` for ever, or an orphan incoming QEMU would hold memory and a port. So a
//! restarted agent asks its peers for the migration's record and its own QEMU for its state,
//! and acts only when both agree ([`incoming_verdict`], pure): one copy of the guest,
//! always. A QEMU that runs the guest is never removed here, and nothing is done while the
//! source cannot be asked or still follows the migration.
//!
//! Like libvirt's `qemuProcessRecoverMigrationIn` (src/qemu/qemu_migration.c), which on
//! daemon restart resumes or kills an incoming domain from the job phase and the QEMU
//! state; tern has no job phase on the destination, so it asks the source's record instead.

use std::time::Duration;

use tern_engine::MigrationState;
use tern_qmp::{MigrationStatus, RunState};

use super::Agent;
use crate::host::VmRole;

/// How often an unsettled incoming VM is looked at again (the first look waits as long, so
/// a source agent that is alive settles it first, as it always does).
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// What the source side says about the migration that brought an incoming VM here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceWord {
    /// No peer could be asked (and none answered with a record).
    Unreachable,
    /// Every peer answered and none has a migration of this VM to this host.
    NoRecord,
    /// The source's record of the latest such migration.
    Record {
        /// Its state.
        state: MigrationState,
        /// Whether the source concluded it.
        finished: bool,
    },
}

/// What this host's incoming QEMU says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IncomingQemu {
    /// The guest's vCPUs run here.
    pub running: bool,
    /// Still receiving the stream (`inmigrate`): it never ran the guest.
    pub inmigrate: bool,
    /// Its incoming migration reports `completed`: it holds the whole guest.
    pub received_all: bool,
}

/// What to do with the incoming VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IncomingVerdict {
    /// Make it this host's guest (resumed if it arrived paused): the source concluded the
    /// migration completed and this QEMU holds the whole guest.
    Promote,
    /// Remove the incoming QEMU: it never ran the guest, and the source concluded the
    /// migration failed or was aborted (the guest stays on the source), or has no record of it.
    Remove,
    /// Look again later: the source still follows the migration, or cannot be asked.
    Wait,
    /// Leave it (and the source's QEMU) for the operator, with the reason.
    LeaveForOperator(String),
}

/// The decision ([`IncomingVerdict`]) from the two sides' words. Never removes a QEMU that
/// ran the guest, and never promotes one that does not hold all of it.
pub(crate) fn incoming_verdict(source: SourceWord, qemu: IncomingQemu) -> IncomingVerdict {
    let ran = !qemu.inmigrate;
    match source {
        SourceWord::Unreachable
        | SourceWord::Record {
            finished: false, ..
        } => IncomingVerdict::Wait,
        SourceWord::Record {
            state: MigrationState::Completed,
            ..
        } if qemu.received_all => IncomingVerdict::Promote,
        SourceWord::Record {
            state: MigrationState::Completed,
            ..
        } => IncomingVerdict::LeaveForOperator(
            "the source recorded the migration completed, but this QEMU does not report its \
             incoming migration completed"
                .into(),
        ),
        SourceWord::Record {
            state: MigrationState::Failed | MigrationState::Aborted,
            ..
        }
        | SourceWord::NoRecord
            if !ran && !qemu.running =>
        {
            IncomingVerdict::Remove
        }
        SourceWord::NoRecord => IncomingVerdict::LeaveForOperator(
            "no peer has a record of this migration, and this QEMU ran the guest".into(),
        ),
        SourceWord::Record { state, .. } => IncomingVerdict::LeaveForOperator(format!(
            "the source recorded the migration {state} and this QEMU {}",
            if ran { "ran the guest" } else { "never ran it" }
        )),
    }
}

impl Agent {
    /// Settles incoming VM `vm` (re-attached after a restart) in the background.
    pub(super) fn reconcile_incoming_later(&self, vm: String) {
        let agent = self.clone();
        tokio::spawn(async move { agent.reconcile_incoming(&vm).await });
    }

    async fn reconcile_incoming(&self, vm: &str) {
        loop {
            tokio::time::sleep(RECONCILE_EVERY).await;
            if self.inner.host.role(vm).ok() != Some(VmRole::Incoming) {
                return; // settled by the source (promoted or removed), or gone
            }
            let Some(qemu) = self.incoming_qemu(vm).await else {
                tracing::warn!(
                    vm,
                    "incoming QEMU does not answer; leaving it to the operator"
                );
                return;
            };
            let source = self.source_word(vm).await;
            let verdict = incoming_verdict(source, qemu);
            tracing::info!(
                vm,
                ?source,
                ?qemu,
                ?verdict,
                "reconciling incoming VM after restart"
            );
            match verdict {
                IncomingVerdict::Wait => continue,
                IncomingVerdict::Promote => match self.promote_incoming(vm).await {
                    Ok(_) => {
                        tracing::info!(vm, "promoted: the source recorded the migration completed");
                        return;
                    }
                    Err(e) => tracing::warn!(vm, error = %e, "promotion failed; trying again"),
                },
                IncomingVerdict::Remove => {
                    if let Err(e) = self.delete_incoming(vm).await {
                        tracing::warn!(vm, error = %e, "removing the incoming QEMU failed");
                    }
                    return;
                }
                IncomingVerdict::LeaveForOperator(why) => {
                    tracing::warn!(vm, %why, "incoming VM left for the operator");
                    return;
                }
            }
        }
    }

    async fn incoming_qemu(&self, vm: &str) -> Option<IncomingQemu> {
        let qmp = self.incoming_qmp(vm).ok()?;
        let status = qmp.query_status().await.ok()?;
        let migration = qmp.query_migrate().await.ok()?;
        Some(IncomingQemu {
            running: status.running,
            inmigrate: matches!(status.status, RunState::InMigrate),
            received_all: migration.status_or_none() == MigrationStatus::Completed,
        })
    }

    /// The latest record any peer holds of a migration of `vm` to this host.
    async fn source_word(&self, vm: &str) -> SourceWord {
        let me = &self.inner.config.host;
        let mut latest: Option<crate::store::MigrationRecord> = None;
        let mut unreachable = false;
        for peer in self.inner.config.peers.values() {
            let Ok(client) = self.peer_client(peer.url()) else {
                unreachable = true;
                continue;
            };
            match client.list_migrations().await {
                Ok(records) => {
                    for r in records {
                        if r.vm == vm
                            && &r.destination == me
                            && latest.as_ref().is_none_or(|l| r.created_ms > l.created_ms)
                        {
                            latest = Some(r);
                        }
                    }
                }
                Err(_) => unreachable = true,
            }
        }
        match latest {
            Some(r) => SourceWord::Record {
                state: r.state,
                finished: r.finished_ms.is_some(),
            },
            None if unreachable => SourceWord::Unreachable,
            None => SourceWord::NoRecord,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [MigrationState; 6] = [
        MigrationState::Completed,
        MigrationState::Failed,
        MigrationState::Aborted,
        MigrationState::Lost,
        MigrationState::Stranded,
        MigrationState::Unknown,
    ];

    fn every_source_word() -> Vec<SourceWord> {
        let mut w = vec![SourceWord::Unreachable, SourceWord::NoRecord];
        for state in STATES {
            for finished in [false, true] {
                w.push(SourceWord::Record { state, finished });
            }
        }
        w
    }

    fn every_qemu() -> Vec<IncomingQemu> {
        let mut q = Vec::new();
        for running in [false, true] {
            for inmigrate in [false, true] {
                for received_all in [false, true] {
                    q.push(IncomingQemu {
                        running,
                        inmigrate,
                        received_all,
                    });
                }
            }
        }
        q
    }

    /// Over every combination: a QEMU that ran the guest is never removed, only a QEMU that
    /// holds all of it is promoted and only on the source's word "completed", and nothing is
    /// done while the source cannot be asked or has not concluded.
    #[test]
    fn one_copy_always_over_every_combination() {
        for source in every_source_word() {
            for qemu in every_qemu() {
                let v = incoming_verdict(source, qemu);
                let ctx = format!("{source:?} {qemu:?} → {v:?}");
                if v == IncomingVerdict::Remove {
                    assert!(qemu.inmigrate && !qemu.running, "{ctx}");
                }
                if v == IncomingVerdict::Promote {
                    assert!(qemu.received_all, "{ctx}");
                    assert_eq!(
                        source,
                        SourceWord::Record {
                            state: MigrationState::Completed,
                            finished: true
                        },
                        "{ctx}"
                    );
                }
                if matches!(
                    source,
                    SourceWord::Unreachable
                        | SourceWord::Record {
                            finished: false,
                            ..
                        }
                ) {
                    assert_eq!(v, IncomingVerdict::Wait, "{ctx}");
                }
            }
        }
    }

    #[test]
    fn the_common_cases() {
        let done = IncomingQemu {
            running: true,
            inmigrate: false,
            received_all: true,
        };
        let waiting = IncomingQemu {
            running: false,
            inmigrate: true,
            received_all: false,
        };
        let completed = SourceWord::Record {
            state: MigrationState::Completed,
            finished: true,
        };
        let aborted = SourceWord::Record {
            state: MigrationState::Aborted,
            finished: true,
        };
        // The source concluded while this agent was dead and could not promote.
        assert_eq!(incoming_verdict(completed, done), IncomingVerdict::Promote);
        // An aborted migration's incoming QEMU, never started.
        assert_eq!(incoming_verdict(aborted, waiting), IncomingVerdict::Remove);
        assert_eq!(
            incoming_verdict(SourceWord::NoRecord, waiting),
            IncomingVerdict::Remove
        );
        // The source's record says aborted, but the guest runs here: leave it.
        assert!(matches!(
            incoming_verdict(aborted, done),
            IncomingVerdict::LeaveForOperator(_)
        ));
        let lost = SourceWord::Record {
            state: MigrationState::Lost,
            finished: true,
        };
        assert!(matches!(
            incoming_verdict(lost, done),
            IncomingVerdict::LeaveForOperator(_)
        ));
    }
}
