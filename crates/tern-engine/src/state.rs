//! The migration state machine: states, the table of allowed transitions, and the event log.
//!
//! States and transitions are data so that every change can be checked against the table
//! and recorded with its timestamp and reason; a reader can see the whole life cycle here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a migration is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// Accepted, nothing started yet.
    Pending,
    /// Capabilities and parameters are being set on both ends; the destination listens.
    Preparing,
    /// Pre-copy: RAM is copied while the guest runs on the source.
    Precopy,
    /// The guest's vCPUs were paused on the source so the copy can finish (stop-and-copy
    /// forced by `force-complete` without post-copy, or by a policy's `PauseGuest`).
    GuestPaused,
    /// Post-copy: the guest runs on the destination and pulls missing pages.
    Postcopy,
    /// Post-copy was interrupted (network); both QEMUs wait in `postcopy-paused`.
    PostcopyPaused,
    /// Post-copy recovery in progress (`migrate-recover` + `migrate resume=true`).
    Recovering,
    /// The guest runs on the destination; the source QEMU is gone.
    Completed,
    /// Cancelled before the switch: the guest keeps running on the source.
    Aborted,
    /// Failed before the switch: the guest keeps running on the source.
    Failed,
    /// Failed after the switch and not recoverable: a QEMU holding part of the guest's
    /// current state died.
    Lost,
    /// Post-copy stayed paused (network down) for longer than the recovery window. Both
    /// QEMUs are kept, paused, so an operator can still recover once the network is back.
    Stranded,
    /// The source handed the guest over (or post-copy runs) but the destination's agent does
    /// not answer, so where the guest runs is not known. Not `lost`: the destination QEMU may
    /// well be running it, and treating it as lost would invite starting a second copy.
    /// Both QEMUs are kept; it becomes `completed` (or is recovered) once the peer answers.
    Unknown,
}

impl MigrationState {
    /// Terminal states end the migration; nothing follows them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Aborted | Self::Failed | Self::Lost | Self::Stranded
        )
    }

    /// After the switch the destination holds the only current guest state, so the migration
    /// can no longer be aborted (Nova refuses `DELETE` on a post-copy migration for the same
    /// reason).
    pub fn is_after_switch(self) -> bool {
        matches!(
            self,
            Self::Postcopy
                | Self::PostcopyPaused
                | Self::Recovering
                | Self::Completed
                | Self::Lost
                | Self::Stranded
                | Self::Unknown
        )
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: MigrationState) -> bool {
        use MigrationState::*;
        matches!(
            (self, next),
            (Pending, Preparing | Failed | Aborted)
                | (Preparing, Precopy | Failed | Aborted)
                | (
                    Precopy,
                    GuestPaused | Postcopy | Completed | Failed | Aborted | Unknown
                )
                | (GuestPaused, Completed | Failed | Aborted | Unknown)
                | (Postcopy, PostcopyPaused | Completed | Lost | Unknown)
                | (PostcopyPaused, Recovering | Lost | Stranded | Unknown)
                | (
                    Recovering,
                    Postcopy | PostcopyPaused | Completed | Lost | Stranded | Unknown
                )
                | (
                    Unknown,
                    Completed | Postcopy | PostcopyPaused | Recovering | Lost | Stranded
                )
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// One entry of a migration's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationEvent {
    /// Milliseconds since the migration started.
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: MigrationEventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum MigrationEventKind {
    /// The state machine moved.
    State {
        /// Previous state.
        from: MigrationState,
        /// New state.
        to: MigrationState,
        /// Why.
        reason: String,
    },
    /// The policy decided something (including `continue` only when it says why).
    Decision {
        /// The action, as a short name (`switch-to-postcopy`, `set-downtime-limit`, …).
        action: String,
        /// The policy's reason, citing the numbers it used.
        reason: String,
    },
    /// A completed pre-copy pass.
    Pass {
        /// QEMU's dirty-sync-count.
        pass: u64,
        /// Bytes still to send.
        remaining_bytes: u64,
        /// Bytes sent so far.
        transferred_bytes: u64,
        /// Dirty rate in bytes per second.
        dirty_bytes_per_s: u64,
        /// Throughput in bytes per second.
        throughput_bytes_per_s: u64,
        /// QEMU's expected downtime at this point, if reported.
        #[serde(default)]
        expected_downtime_ms: Option<u64>,
        /// vCPU throttle applied by auto-converge, percent.
        #[serde(default)]
        throttle_pct: Option<u8>,
    },
    /// An operator command and its outcome.
    Operator {
        /// The command.
        command: String,
        /// What came of it.
        result: String,
    },
    /// Anything else worth keeping (capabilities used, QEMU errors).
    Note {
        /// The text.
        text: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationState::*;

    const ALL: [MigrationState; 13] = [
        Unknown,
        Stranded,
        Pending,
        Preparing,
        Precopy,
        GuestPaused,
        Postcopy,
        PostcopyPaused,
        Recovering,
        Completed,
        Aborted,
        Failed,
        Lost,
    ];

    #[test]
    fn terminal_states_have_no_successor() {
        for s in ALL.into_iter().filter(|s| s.is_terminal()) {
            for n in ALL {
                assert!(!s.can_become(n), "{s} -> {n} must be impossible");
            }
        }
    }

    #[test]
    fn after_the_switch_the_source_cannot_take_over() {
        // Once post-copy started, abort/failed (which mean "guest keeps running on the
        // source") are impossible: only completion or loss.
        for s in [Postcopy, PostcopyPaused, Recovering, Unknown] {
            assert!(!s.can_become(Aborted));
            assert!(!s.can_become(Failed));
            assert!(s.is_after_switch());
        }
        assert!(!Precopy.is_after_switch());
        assert!(Precopy.can_become(Aborted));
        assert!(
            !Precopy.can_become(Lost),
            "before the switch nothing is lost"
        );
    }

    #[test]
    fn every_non_terminal_state_can_end() {
        for s in ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert!(
                ALL.iter().any(|n| n.is_terminal() && s.can_become(*n)),
                "{s} has no way to end"
            );
        }
    }

    #[test]
    fn events_serialize_with_a_tag() {
        let e = MigrationEvent {
            at_ms: 12,
            kind: MigrationEventKind::State {
                from: Precopy,
                to: Postcopy,
                reason: "stalled".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "state");
        assert_eq!(v["to"], "postcopy");
        assert_eq!(v["at_ms"], 12);
        assert_eq!(Postcopy.to_string(), "postcopy");
        assert_eq!(GuestPaused.to_string(), "guest-paused");
        assert_eq!(Unknown.to_string(), "unknown");
    }

    #[test]
    fn unknown_is_never_terminal_and_can_become_what_the_peer_says() {
        assert!(!Unknown.is_terminal());
        for to in [Completed, Postcopy, PostcopyPaused, Recovering] {
            assert!(Unknown.can_become(to));
        }
        assert!(!Unknown.can_become(Aborted) && !Unknown.can_become(Failed));
    }
}
