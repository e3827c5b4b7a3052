//! Supervision of a migration after the switch to post-copy: when to force a pause, when to
//! try recovery, how long to keep trying. Pure: time arrives in the observations, the answer
//! is a list of actions with reasons; the engine executes them and the simulator replays
//! them.
//!
//! After `migrate-start-postcopy` the guest runs on the destination and faults its missing
//! pages in from the source (QEMU `docs/devel/migration/postcopy.rst`). Neither side holds
//! the whole current state, so nothing here may abort or cancel: [`PostcopyAction`] has no
//! such variant. What can go wrong is the channel:
//!
//! * QEMU enters `postcopy-paused` when a migration socket errors out
//!   (`postcopy_pause()` in `migration/migration.c`). A silently dead network (no RST, no
//!   carrier change) can instead leave both sides in `postcopy-active` for minutes while TCP
//!   retransmits, so the supervisor also watches the bytes sent: none for
//!   [`PostcopyTimings::stall_timeout_ms`] while pages remain means the channel is dead, and
//!   it asks for `migrate-pause` on both sides ([`PostcopyAction::PauseBoth`];
//!   qapi/migration.json: "migrate-pause: Pause a migration. Currently it only supports
//!   postcopy").
//! * From `postcopy-paused`, recovery is QEMU's own protocol: `migrate-recover` with a fresh
//!   listening URI on the destination, then `migrate` with `resume=true` on the source
//!   ([`PostcopyAction::Recover`]). An attempt that fails is retried after a backoff
//!   (every 250 ms while the outage is younger than the stall timeout, so a short cut costs at
//!   most the cut + 0.35 s; then 0.5 s doubling to 2 s by default); an attempt stuck in `postcopy-recover-setup` /
//!   `postcopy-recover` (a connect into a dead network hangs in SYN retries) is paused after
//!   [`PostcopyTimings::attempt_timeout_ms`] and retried.
//! * After [`PostcopyTimings::recovery_window_ms`] in one outage the supervisor gives up
//!   ([`PostcopyAction::GiveUpStranded`]): both QEMUs stay paused, because the guest's state is
//!   split between them and an operator can still recover once the network is back.

use serde::{Deserialize, Serialize};

/// Default: no byte sent for this long with pages left means the post-copy channel is dead.
pub const DEFAULT_POSTCOPY_STALL_TIMEOUT_MS: u64 = 2_000;
/// Default recovery window: an outage of minutes is survivable.
pub const DEFAULT_RECOVERY_WINDOW_MS: u64 = 600_000;
/// Default time one recovery attempt may stay in `postcopy-recover(-setup)`.
pub const DEFAULT_RECOVERY_ATTEMPT_TIMEOUT_MS: u64 = 10_000;
/// Default first retry delay; doubles up to [`DEFAULT_RECOVERY_BACKOFF_MAX_MS`].
pub const DEFAULT_RECOVERY_BACKOFF_MIN_MS: u64 = 500;
/// Default longest retry delay.
pub const DEFAULT_RECOVERY_BACKOFF_MAX_MS: u64 = 2_000;
/// Default retry delay while an outage is younger than the stall timeout: a short cut (a flap,
/// a switch reboot) must cost the guest at most the cut + 0.5 s of stall, so the supervisor
/// retries at the engine's poll pace (250 ms) + one recovery handshake instead of backing off
/// (0.5 → 1 → 2 s backoff turned a 1 s cut into a 1.6 s stall, a 0.6 s cut into 1.6 s). A
/// refused connect costs nothing; the backoff starts once the outage outlasts the stall timeout.
pub const DEFAULT_SHORT_OUTAGE_RETRY_MS: u64 = 250;

/// The supervisor's time constants, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyTimings {
    /// No byte sent for this long while pages remain ⇒ force `migrate-pause`.
    pub stall_timeout_ms: u64,
    /// Give up (stranded) after the channel has been down this long in one outage.
    pub recovery_window_ms: u64,
    /// An attempt still recovering after this long is paused and retried.
    pub attempt_timeout_ms: u64,
    /// First retry delay.
    pub backoff_min_ms: u64,
    /// Longest retry delay.
    pub backoff_max_ms: u64,
    /// Retry delay while the outage is younger than `stall_timeout_ms` (no backoff yet).
    #[serde(default = "default_short_outage_retry_ms")]
    pub short_outage_retry_ms: u64,
}

fn default_short_outage_retry_ms() -> u64 {
    DEFAULT_SHORT_OUTAGE_RETRY_MS
}

impl Default for PostcopyTimings {
    fn default() -> Self {
        Self {
            stall_timeout_ms: DEFAULT_POSTCOPY_STALL_TIMEOUT_MS,
            recovery_window_ms: DEFAULT_RECOVERY_WINDOW_MS,
            attempt_timeout_ms: DEFAULT_RECOVERY_ATTEMPT_TIMEOUT_MS,
            backoff_min_ms: DEFAULT_RECOVERY_BACKOFF_MIN_MS,
            backoff_max_ms: DEFAULT_RECOVERY_BACKOFF_MAX_MS,
            short_outage_retry_ms: DEFAULT_SHORT_OUTAGE_RETRY_MS,
        }
    }
}

/// The source QEMU's migration status after the switch, reduced to what supervision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostcopyStatus {
    /// `postcopy-active`: pages flow (or should).
    Active,
    /// `postcopy-paused`: the channel broke; both sides wait for recovery.
    Paused,
    /// `postcopy-recover-setup` or `postcopy-recover`: an attempt is under way.
    Recovering,
    /// Anything else (`completed`, `failed`, …): the engine ends the migration itself.
    Ended,
}

/// What the engine saw, with the time it saw it (ms since the migration started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "observation", rename_all = "kebab-case")]
pub enum PostcopyObservation {
    /// A poll of the source's `query-migrate`.
    Poll {
        /// When.
        at_ms: u64,
        /// The source's status.
        status: PostcopyStatus,
        /// `ram.transferred`.
        transferred_bytes: u64,
        /// `ram.remaining`.
        remaining_bytes: u64,
    },
    /// Executing [`PostcopyAction::Recover`] failed before QEMU took the attempt up
    /// (`migrate-recover` or `migrate resume=true` refused, the destination still
    /// `postcopy-active`, or the destination's agent did not answer).
    RecoveryAttemptFailed {
        /// When.
        at_ms: u64,
        /// Why, for the log.
        reason: String,
    },
}

impl PostcopyObservation {
    /// When the observation was made.
    pub fn at_ms(&self) -> u64 {
        match self {
            Self::Poll { at_ms, .. } | Self::RecoveryAttemptFailed { at_ms, .. } => *at_ms,
        }
    }
}

/// What to do. None of these aborts, cancels or resumes the source's vCPUs: after the switch
/// the destination holds the guest's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum PostcopyAction {
    /// `migrate-pause` on the source and on the destination: the channel is dead but QEMU
    /// has not noticed.
    PauseBoth,
    /// `migrate-recover URI` on the destination, then `migrate URI resume=true` on the
    /// source. If the destination is still `postcopy-active` it must be paused first (it
    /// cannot listen again before), and the attempt reported as failed.
    Recover {
        /// Attempt number in this outage, from 1.
        attempt: u32,
    },
    /// `migrate-pause` on the source: the running attempt is stuck; it is retried later.
    PauseStuckAttempt {
        /// The attempt being paused.
        attempt: u32,
    },
    /// Post-copy runs again (informational: the engine records the transition).
    Recovered {
        /// How long the channel was down, ms.
        outage_ms: u64,
        /// Attempts it took.
        attempts: u32,
    },
    /// The recovery window is over: keep both QEMUs paused and hand over to an operator.
    GiveUpStranded {
        /// How long the channel was down, ms.
        outage_ms: u64,
    },
}

impl PostcopyAction {
    /// The action's name in event logs (`postcopy-pause-both`, `postcopy-recover`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Self::PauseBoth => "postcopy-pause-both",
            Self::Recover { .. } => "postcopy-recover",
            Self::PauseStuckAttempt { .. } => "postcopy-pause-stuck-attempt",
            Self::Recovered { .. } => "postcopy-recovered",
            Self::GiveUpStranded { .. } => "postcopy-stranded",
        }
    }
}

/// An action with the reason, citing the numbers used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyDecision {
    /// What to do.
    pub action: PostcopyAction,
    /// Why.
    pub reason: String,
}

/// Where the supervisor believes post-copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum SupervisionPhase {
    /// Pages flow; watching for a stall.
    Running {
        /// Last time `transferred` grew, and its value then.
        last_progress: Option<(u64, u64)>,
    },
    /// The channel is down; the next attempt is due at `next_attempt_at_ms`.
    Paused {
        /// When the outage was detected.
        since_ms: u64,
        /// When the next attempt is due.
        next_attempt_at_ms: u64,
    },
    /// An attempt is under way.
    Recovering {
        /// When the outage was detected.
        since_ms: u64,
        /// When this attempt started.
        attempt_started_ms: u64,
    },
    /// Given up; nothing more is decided.
    Stranded,
}

/// The post-copy supervisor of one migration. Create it at the switch (or when adopting a
/// migration already past it) and feed it every observation in time order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopySupervisor {
    timings: PostcopyTimings,
    phase: SupervisionPhase,
    /// Current retry delay.
    backoff_ms: u64,
    /// Attempts in the current outage.
    attempts: u32,
    /// Completed recoveries.
    recoveries: u32,
}

impl PostcopySupervisor {
    /// A supervisor for a migration that just switched (or was adopted in post-copy).
    pub fn new(timings: PostcopyTimings) -> Self {
        Self {
            timings,
            phase: SupervisionPhase::Running {
                last_progress: None,
            },
            backoff_ms: timings.backoff_min_ms,
            attempts: 0,
            recoveries: 0,
        }
    }

    /// The time constants.
    pub fn timings(&self) -> PostcopyTimings {
        self.timings
    }

    /// Where post-copy is, as far as the supervisor knows.
    pub fn phase(&self) -> SupervisionPhase {
        self.phase
    }

    /// Completed recoveries so far.
    pub fn recoveries(&self) -> u32 {
        self.recoveries
    }

    /// Attempts in the current (or last) outage.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The earliest time at which a poll could lead to a time-based action (a due attempt,
    /// the window's end, a stuck attempt, a stall). For simulators that jump in time.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let t = &self.timings;
        match self.phase {
            SupervisionPhase::Running { last_progress } => {
                last_progress.map(|(_, at)| at.saturating_add(t.stall_timeout_ms))
            }
            SupervisionPhase::Paused {
                since_ms,
                next_attempt_at_ms,
            } => Some(next_attempt_at_ms.min(since_ms.saturating_add(t.recovery_window_ms) + 1)),
            SupervisionPhase::Recovering {
                attempt_started_ms, ..
            } => Some(attempt_started_ms.saturating_add(t.attempt_timeout_ms) + 1),
            SupervisionPhase::Stranded => None,
        }
    }

    /// Feeds one observation; returns what to do now, in order.
    pub fn observe(&mut self, obs: &PostcopyObservation) -> Vec<PostcopyDecision> {
        if self.phase == SupervisionPhase::Stranded {
            return Vec::new();
        }
        match obs {
            PostcopyObservation::Poll {
                at_ms,
                status,
                transferred_bytes,
                remaining_bytes,
            } => self.poll(*at_ms, *status, *transferred_bytes, *remaining_bytes),
            PostcopyObservation::RecoveryAttemptFailed { at_ms, .. } => {
                if let SupervisionPhase::Recovering { since_ms, .. } = self.phase {
                    let delay = self.schedule_retry(since_ms, *at_ms);
                    self.phase = SupervisionPhase::Paused {
                        since_ms,
                        next_attempt_at_ms: at_ms.saturating_add(delay),
                    };
                }
                Vec::new()
            }
        }
    }

    /// Returns the delay before the next attempt: the short-outage pace while the outage (since
    /// `since_ms`) is younger than the stall timeout, then the backoff, doubled each time
    /// (capped).
    fn schedule_retry(&mut self, since_ms: u64, at_ms: u64) -> u64 {
        if at_ms.saturating_sub(since_ms) < self.timings.stall_timeout_ms {
            return self.timings.short_outage_retry_ms.max(1);
        }
        let delay = self.backoff_ms.max(self.timings.backoff_min_ms);
        self.backoff_ms = delay
            .saturating_mul(2)
            .min(self.timings.backoff_max_ms.max(self.timings.backoff_min_ms));
        delay
    }

    fn poll(
        &mut self,
        at: u64,
        status: PostcopyStatus,
        transferred: u64,
        remaining: u64,
    ) -> Vec<PostcopyDecision> {
        let t = self.timings;
        match (self.phase, status) {
            (_, PostcopyStatus::Ended) => Vec::new(),
            (SupervisionPhase::Running { last_progress }, PostcopyStatus::Active) => {
                let moved = match last_progress {
                    Some((bytes, _)) => transferred > bytes,
                    None => true,
                };
                if moved {
                    self.phase = SupervisionPhase::Running {
                        last_progress: Some((transferred, at)),
                    };
                    return Vec::new();
                }
                let since = last_progress.map(|(_, at)| at).unwrap_or(at);
                let quiet = at.saturating_sub(since);
                if remaining > 0 && quiet >= t.stall_timeout_ms {
                    // Start a fresh stall measurement after the pause: if QEMU refused it and
                    // stays active, the next pause comes one timeout later, not at every poll.
                    self.phase = SupervisionPhase::Running {
                        last_progress: Some((transferred, at)),
                    };
                    return vec![PostcopyDecision {
                        action: PostcopyAction::PauseBoth,
                        reason: format!(
                            "post-copy stalled: no bytes sent for {quiet} ms (threshold {} ms) \
                             with {remaining} bytes left; forcing migrate-pause on both sides",
                            t.stall_timeout_ms
                        ),
                    }];
                }
                Vec::new()
            }
            (SupervisionPhase::Running { .. }, PostcopyStatus::Paused) => {
                self.attempts = 0;
                self.backoff_ms = t.backoff_min_ms;
                self.phase = SupervisionPhase::Paused {
                    since_ms: at,
                    next_attempt_at_ms: at,
                };
                self.paused_poll(at)
            }
            (SupervisionPhase::Running { .. }, PostcopyStatus::Recovering) => {
                // Adopted mid-attempt (or an operator started one): supervise it as ours.
                self.phase = SupervisionPhase::Recovering {
                    since_ms: at,
                    attempt_started_ms: at,
                };
                Vec::new()
            }
            (
                SupervisionPhase::Paused { since_ms, .. }
                | SupervisionPhase::Recovering { since_ms, .. },
                PostcopyStatus::Active,
            ) => {
                self.recoveries += 1;
                let outage_ms = at.saturating_sub(since_ms);
                let attempts = self.attempts;
                self.phase = SupervisionPhase::Running {
                    last_progress: Some((transferred, at)),
                };
                vec![PostcopyDecision {
                    action: PostcopyAction::Recovered {
                        outage_ms,
                        attempts,
                    },
                    reason: format!(
                        "post-copy recovered after {outage_ms} ms and {attempts} attempt(s) \
                         (recovery #{})",
                        self.recoveries
                    ),
                }]
            }
            (SupervisionPhase::Paused { .. }, PostcopyStatus::Paused) => self.paused_poll(at),
            (SupervisionPhase::Paused { since_ms, .. }, PostcopyStatus::Recovering) => {
                self.phase = SupervisionPhase::Recovering {
                    since_ms,
                    attempt_started_ms: at,
                };
                Vec::new()
            }
            (SupervisionPhase::Recovering { since_ms, .. }, PostcopyStatus::Paused) => {
                // The attempt failed (QEMU went back to postcopy-paused).
                let delay = self.schedule_retry(since_ms, at);
                self.phase = SupervisionPhase::Paused {
                    since_ms,
                    next_attempt_at_ms: at.saturating_add(delay),
                };
                self.paused_poll(at)
            }
            (
                SupervisionPhase::Recovering {
                    since_ms,
                    attempt_started_ms,
                },
                PostcopyStatus::Recovering,
            ) => {
                let running = at.saturating_sub(attempt_started_ms);
                if running <= t.attempt_timeout_ms {
                    return Vec::new();
                }
                let delay = self.schedule_retry(since_ms, at);
                self.phase = SupervisionPhase::Paused {
                    since_ms,
                    next_attempt_at_ms: at.saturating_add(delay),
                };
                vec![PostcopyDecision {
                    action: PostcopyAction::PauseStuckAttempt {
                        attempt: self.attempts,
                    },
                    reason: format!(
                        "recovery attempt {} still recovering after {running} ms (limit {} ms): \
                         pausing it to retry in {delay} ms",
                        self.attempts, t.attempt_timeout_ms
                    ),
                }]
            }
            (SupervisionPhase::Stranded, _) => Vec::new(),
        }
    }

    /// In `Paused`: give up past the window, else start an attempt when one is due.
    fn paused_poll(&mut self, at: u64) -> Vec<PostcopyDecision> {
        let SupervisionPhase::Paused {
            since_ms,
            next_attempt_at_ms,
        } = self.phase
        else {
            return Vec::new();
        };
        let t = self.timings;
        let outage_ms = at.saturating_sub(since_ms);
        if outage_ms > t.recovery_window_ms {
            self.phase = SupervisionPhase::Stranded;
            return vec![PostcopyDecision {
                action: PostcopyAction::GiveUpStranded { outage_ms },
                reason: format!(
                    "post-copy stayed paused for {outage_ms} ms, beyond the recovery window of \
                     {} ms, after {} attempt(s): both QEMUs are kept paused because the guest's \
                     current state is split between them",
                    t.recovery_window_ms, self.attempts
                ),
            }];
        }
        if at < next_attempt_at_ms {
            return Vec::new();
        }
        self.attempts += 1;
        self.phase = SupervisionPhase::Recovering {
            since_ms,
            attempt_started_ms: at,
        };
        vec![PostcopyDecision {
            action: PostcopyAction::Recover {
                attempt: self.attempts,
            },
            reason: format!(
                "post-copy paused for {outage_ms} ms: recovery attempt {} (window {} ms, next \
                 retry delay {} ms)",
                self.attempts, t.recovery_window_ms, self.backoff_ms
            ),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn poll(at_ms: u64, status: PostcopyStatus, sent: u64, left: u64) -> PostcopyObservation {
        PostcopyObservation::Poll {
            at_ms,
            status,
            transferred_bytes: sent,
            remaining_bytes: left,
        }
    }

    fn actions(d: Vec<PostcopyDecision>) -> Vec<PostcopyAction> {
        d.into_iter().map(|d| d.action).collect()
    }

    #[test]
    fn progress_keeps_it_quiet_and_a_stall_pauses_both_with_numbers() {
        let mut s = PostcopySupervisor::new(PostcopyTimings::default());
        for i in 0..10 {
            assert!(
                s.observe(&poll(i * 250, PostcopyStatus::Active, i * 1000, 5000))
                    .is_empty()
            );
        }
        // Bytes stop at 9000 (t = 2250).
        assert!(
            s.observe(&poll(4000, PostcopyStatus::Active, 9000, 5000))
                .is_empty()
        );
        let d = s.observe(&poll(4250, PostcopyStatus::Active, 9000, 5000));
        assert_eq!(actions(d.clone()), vec![PostcopyAction::PauseBoth]);
        assert!(d[0].reason.contains("2000 ms") && d[0].reason.contains("5000 bytes"));
    }

    #[test]
    fn no_pause_when_nothing_is_left() {
        let mut s = PostcopySupervisor::new(PostcopyTimings::default());
        s.observe(&poll(0, PostcopyStatus::Active, 100, 0));
        assert!(
            s.observe(&poll(60_000, PostcopyStatus::Active, 100, 0))
                .is_empty()
        );
    }

    #[test]
    fn a_pause_starts_recovery_at_once_and_failures_back_off_to_the_cap() {
        let mut s = PostcopySupervisor::new(PostcopyTimings::default());
        s.observe(&poll(0, PostcopyStatus::Active, 10, 10));
        let d = s.observe(&poll(1000, PostcopyStatus::Paused, 10, 10));
        assert_eq!(actions(d), vec![PostcopyAction::Recover { attempt: 1 }]);
        // Attempt 1 fails at once; while the outage is younger than the 2 s stall timeout the
        // retries come every 250 ms (a short cut costs at most cut + 0.35 s), then 500, 1000,
        // 2000, 2000 ms apart.
        let mut at = 1000;
        let mut starts = vec![];
        for attempt in 1..=12u32 {
            s.observe(&PostcopyObservation::RecoveryAttemptFailed {
                at_ms: at,
                reason: "connection refused".into(),
            });
            // Poll every 50 ms until the next attempt starts.
            loop {
                at += 50;
                let d = s.observe(&poll(at, PostcopyStatus::Paused, 10, 10));
                if !d.is_empty() {
                    assert_eq!(
                        actions(d),
                        vec![PostcopyAction::Recover {
                            attempt: attempt + 1
                        }]
                    );
                    starts.push(at);
                    break;
                }
            }
        }
        let gaps: Vec<u64> = std::iter::once(1000)
            .chain(starts.iter().copied())
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .collect();
        assert_eq!(
            gaps,
            vec![
                250, 250, 250, 250, 250, 250, 250, 250, 500, 1000, 2000, 2000
            ]
        );
        let d = s.observe(&poll(at + 300, PostcopyStatus::Active, 20, 5));
        assert_eq!(
            actions(d),
            vec![PostcopyAction::Recovered {
                outage_ms: at + 300 - 1000,
                attempts: 13
            }]
        );
        assert_eq!(s.recoveries(), 1);
    }

    #[test]
    fn a_stuck_attempt_is_paused_after_the_attempt_timeout() {
        let mut s = PostcopySupervisor::new(PostcopyTimings::default());
        s.observe(&poll(0, PostcopyStatus::Paused, 0, 10));
        assert!(
            s.observe(&poll(10_000, PostcopyStatus::Recovering, 0, 10))
                .is_empty()
        );
        let d = s.observe(&poll(10_250, PostcopyStatus::Recovering, 0, 10));
        assert_eq!(
            actions(d),
            vec![PostcopyAction::PauseStuckAttempt { attempt: 1 }]
        );
    }

    #[test]
    fn the_window_ends_in_stranded_and_then_nothing() {
        let t = PostcopyTimings {
            recovery_window_ms: 5_000,
            ..Default::default()
        };
        let mut s = PostcopySupervisor::new(t);
        let mut all = vec![];
        for i in 0..200 {
            all.extend(actions(s.observe(&poll(
                i * 100,
                PostcopyStatus::Paused,
                0,
                10,
            ))));
        }
        assert!(matches!(
            all.last(),
            Some(PostcopyAction::GiveUpStranded { outage_ms: 5100 })
        ));
        assert_eq!(s.phase(), SupervisionPhase::Stranded);
        assert!(
            s.observe(&poll(30_000, PostcopyStatus::Active, 10, 10))
                .is_empty()
        );
    }

    #[test]
    fn adoption_mid_attempt_supervises_it() {
        let mut s = PostcopySupervisor::new(PostcopyTimings::default());
        s.observe(&poll(0, PostcopyStatus::Recovering, 0, 10));
        let d = s.observe(&poll(10_001, PostcopyStatus::Recovering, 0, 10));
        assert_eq!(
            actions(d),
            vec![PostcopyAction::PauseStuckAttempt { attempt: 0 }]
        );
        let d = s.observe(&poll(10_501, PostcopyStatus::Paused, 0, 10));
        assert_eq!(actions(d), vec![PostcopyAction::Recover { attempt: 1 }]);
    }

    fn status() -> impl Strategy<Value = PostcopyStatus> {
        prop_oneof![
            4 => Just(PostcopyStatus::Active),
            3 => Just(PostcopyStatus::Paused),
            2 => Just(PostcopyStatus::Recovering),
            1 => Just(PostcopyStatus::Ended),
        ]
    }

    proptest! {
        /// With bytes frozen and pages left in `postcopy-active`, a pause always comes within
        /// one poll interval after the threshold.
        #[test]
        fn a_long_stall_with_pages_left_always_pauses(
            stall in 100u64..20_000,
            poll_ms in 10u64..1_000,
            warmup in 0u64..20,
            left in 1u64..u64::MAX / 2,
        ) {
            let t = PostcopyTimings { stall_timeout_ms: stall, ..Default::default() };
            let mut s = PostcopySupervisor::new(t);
            let mut at = 0;
            for i in 0..warmup {
                s.observe(&poll(at, PostcopyStatus::Active, i * 4096, left));
                at += poll_ms;
            }
            let frozen_since = at;
            let mut paused_at = None;
            while at <= frozen_since + stall + poll_ms {
                let d = s.observe(&poll(at, PostcopyStatus::Active, warmup * 4096, left));
                if d.iter().any(|d| d.action == PostcopyAction::PauseBoth) {
                    paused_at = Some(at);
                    break;
                }
                at += poll_ms;
            }
            let paused_at = paused_at.expect("no pause");
            prop_assert!(paused_at >= frozen_since.saturating_sub(poll_ms) + stall);
        }

        /// Attempts never come closer than the short-outage pace after a failure, never later
        /// than the maximum plus one poll, and nothing is attempted past the window.
        #[test]
        fn attempts_back_off_and_stop_at_the_window(
            window in 1_000u64..60_000,
            poll_ms in 10u64..400,
            fail_fast in any::<bool>(),
        ) {
            let t = PostcopyTimings { recovery_window_ms: window, ..Default::default() };
            let mut s = PostcopySupervisor::new(t);
            let mut at = 0;
            let mut last_attempt: Option<u64> = None;
            let mut stranded = false;
            let mut status = PostcopyStatus::Paused;
            while at < window + 20_000 {
                for d in s.observe(&poll(at, status, 0, 10)) {
                    match d.action {
                        PostcopyAction::Recover { .. } => {
                            prop_assert!(!stranded);
                            prop_assert!(at <= window + poll_ms, "attempt at {at} past window {window}");
                            if let Some(prev) = last_attempt {
                                prop_assert!(at - prev >= t.backoff_min_ms.min(t.short_outage_retry_ms));
                            }
                            last_attempt = Some(at);
                            if fail_fast {
                                s.observe(&PostcopyObservation::RecoveryAttemptFailed { at_ms: at, reason: String::new() });
                            } else {
                                status = PostcopyStatus::Recovering;
                            }
                        }
                        PostcopyAction::PauseStuckAttempt { .. } => status = PostcopyStatus::Paused,
                        PostcopyAction::GiveUpStranded { outage_ms } => {
                            prop_assert!(outage_ms > window);
                            stranded = true;
                        }
                        other => prop_assert!(false, "unexpected {other:?}"),
                    }
                }
                at += poll_ms;
            }
            prop_assert!(stranded);
            prop_assert!(last_attempt.is_some());
        }

        /// Whatever QEMU reports, the supervisor is deterministic, never acts after
        /// stranding, and only ever pauses or recovers (no abort or cancel exists to return).
        #[test]
        fn arbitrary_histories_are_safe_and_deterministic(
            steps in proptest::collection::vec((1u64..3_000, status(), 0u64..3, any::<bool>()), 1..200),
        ) {
            let mut a = PostcopySupervisor::new(PostcopyTimings::default());
            let mut b = a.clone();
            let (mut at, mut sent) = (0u64, 0u64);
            let mut stranded = false;
            for (dt, st, grow, fail) in steps {
                at += dt;
                sent += grow * 4096;
                let obs = if fail {
                    PostcopyObservation::RecoveryAttemptFailed { at_ms: at, reason: "x".into() }
                } else {
                    poll(at, st, sent, 4096)
                };
                let da = a.observe(&obs);
                prop_assert_eq!(&da, &b.observe(&obs));
                if stranded {
                    prop_assert!(da.is_empty());
                }
                for d in &da {
                    prop_assert!(!d.reason.is_empty());
                    if matches!(d.action, PostcopyAction::GiveUpStranded { .. }) {
                        stranded = true;
                    }
                }
            }
        }
    }
}
