//! Leader election among controllers sharing one PostgreSQL (issue 12): the pure lease state
//! machine. No I/O, no clock: the adapter ([`crate::leader`]) asks the store for the lease,
//! and feeds the reply here with the local monotonic time at which it *asked*.
//!
//! The lease row (`leases`: holder, epoch, expiry) is written with the asker's wall time plus
//! the TTL. A leader may act only until `asked_at + ttl - margin` on its own monotonic clock:
//! the row cannot expire before `asked_at + ttl`, so the leader stops `margin` before anyone
//! else could take the lease (the margin absorbs clock skew between controllers and the time
//! a command already sent needs to arrive). A leader that cannot renew (database gone, slow,
//! or refused) therefore stops by itself; the agents' fencing check ([`tern_agent`]'s
//! `fencing` module, the epoch in `x-tern-fencing-epoch`) covers what is still in flight.
//! Kubernetes' `leaderelection` package uses the same renew-deadline < lease-duration rule.

use serde::Serialize;
use utoipa::ToSchema;

/// Timing of the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct LeaseSettings {
    /// How long a lease row stays valid after it was written (ms).
    pub ttl_ms: u64,
    /// How often the leader renews and standbys try to take it (ms).
    pub renew_every_ms: u64,
    /// How long before the lease can expire elsewhere the leader stops acting (ms).
    pub margin_ms: u64,
}

impl Default for LeaseSettings {
    /// 5 s lease, renewed every second, the leader stops 1.5 s before expiry: a standby
    /// takes over at most 1 s after the lease expires, about 6 s after the leader died.
    fn default() -> Self {
        Self {
            ttl_ms: 5000,
            renew_every_ms: 1000,
            margin_ms: 1500,
        }
    }
}

impl LeaseSettings {
    /// Checks that a leader renews (twice) before it must stop acting.
    pub fn validate(&self) -> Result<(), String> {
        let renew_window = self.ttl_ms.saturating_sub(self.margin_ms);
        if self.renew_every_ms == 0 || self.renew_every_ms.saturating_mul(2) > renew_window {
            return Err(format!(
                "lease_ttl_ms = {}, lease_renew_ms = {}, lease_margin_ms = {}: the leader must \
                 be able to renew at least twice before it stops acting, so give \
                 2 × lease_renew_ms ≤ lease_ttl_ms − lease_margin_ms (and lease_renew_ms > 0)",
                self.ttl_ms, self.renew_every_ms, self.margin_ms
            ));
        }
        Ok(())
    }
}

/// What the store answered to one attempt to take or renew the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseReply {
    /// This controller holds the lease at `epoch` (taken or renewed).
    Held {
        /// The lease's epoch (the fencing token).
        epoch: u64,
    },
    /// Another controller holds an unexpired lease.
    HeldByOther {
        /// Who (its id and URL).
        holder: String,
        /// Its epoch.
        epoch: u64,
    },
    /// The store did not answer in time, or failed.
    Failed {
        /// Why.
        error: String,
    },
}

/// The controller's role now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRole {
    /// Not leading; `leader` is the last holder seen.
    Standby {
        /// The current leader (id and URL) and its epoch, when known.
        leader: Option<(String, u64)>,
    },
    /// Leading at `epoch` until `acts_until_ms` (monotonic) unless renewed.
    Leader {
        /// The lease's epoch.
        epoch: u64,
        /// When it must stop acting without a renewal.
        acts_until_ms: u64,
    },
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepDownReason {
    /// Another controller holds the lease.
    TakenBy(String),
    /// No renewal succeeded in time (the last error, if any).
    NotRenewed(Option<String>),
}

/// What changed, for the adapter to log and publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// This controller became the leader.
    BecameLeader {
        /// The epoch it leads at.
        epoch: u64,
    },
    /// This controller stopped leading.
    SteppedDown {
        /// The epoch it led at.
        epoch: u64,
        /// Why.
        reason: StepDownReason,
    },
    /// A (new) leader elsewhere was seen.
    FollowsLeader {
        /// Its id and URL.
        holder: String,
        /// Its epoch.
        epoch: u64,
    },
}

/// The state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseMachine {
    settings: LeaseSettings,
    role: LeaseRole,
    last_error: Option<String>,
}

impl LeaseMachine {
    /// A standby that knows no leader yet.
    pub fn new(settings: LeaseSettings) -> Self {
        Self {
            settings,
            role: LeaseRole::Standby { leader: None },
            last_error: None,
        }
    }

    /// The role as of the last observation (see [`Self::acting_epoch`] for "may I act now").
    pub fn role(&self) -> &LeaseRole {
        &self.role
    }

    /// The settings.
    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    /// The epoch this controller may act with at `now_ms`, or `None`: not the leader, or its
    /// lease could expire elsewhere within the margin.
    pub fn acting_epoch(&self, now_ms: u64) -> Option<u64> {
        match self.role {
            LeaseRole::Leader {
                epoch,
                acts_until_ms,
            } if now_ms < acts_until_ms => Some(epoch),
            _ => None,
        }
    }

    /// Feeds the store's `reply` to an attempt made at `asked_at_ms`, received at `now_ms`.
    pub fn observe(
        &mut self,
        asked_at_ms: u64,
        now_ms: u64,
        reply: LeaseReply,
    ) -> Vec<LeaseChange> {
        let mut changes = self.expire(now_ms);
        match reply {
            LeaseReply::Held { epoch } => {
                let acts_until_ms = asked_at_ms
                    .saturating_add(self.settings.ttl_ms)
                    .saturating_sub(self.settings.margin_ms);
                if now_ms >= acts_until_ms {
                    // The answer came too late to act on: as good as no renewal.
                    self.last_error = Some(format!(
                        "the lease store answered after {} ms",
                        now_ms.saturating_sub(asked_at_ms)
                    ));
                    return changes;
                }
                self.last_error = None;
                match self.role {
                    LeaseRole::Leader { epoch: led, .. } if led == epoch => {}
                    LeaseRole::Leader { epoch: led, .. } => {
                        changes.push(LeaseChange::SteppedDown {
                            epoch: led,
                            reason: StepDownReason::TakenBy(format!("epoch {epoch}")),
                        });
                        changes.push(LeaseChange::BecameLeader { epoch });
                    }
                    LeaseRole::Standby { .. } => {
                        changes.push(LeaseChange::BecameLeader { epoch });
                    }
                }
                self.role = LeaseRole::Leader {
                    epoch,
                    acts_until_ms,
                };
            }
            LeaseReply::HeldByOther { holder, epoch } => {
                if let LeaseRole::Leader { epoch: led, .. } = self.role {
                    changes.push(LeaseChange::SteppedDown {
                        epoch: led,
                        reason: StepDownReason::TakenBy(holder.clone()),
                    });
                }
                let known = matches!(&self.role, LeaseRole::Standby { leader: Some((h, e)) }
                    if *h == holder && *e == epoch);
                if !known {
                    changes.push(LeaseChange::FollowsLeader {
                        holder: holder.clone(),
                        epoch,
                    });
                }
                self.role = LeaseRole::Standby {
                    leader: Some((holder, epoch)),
                };
            }
            LeaseReply::Failed { error } => {
                self.last_error = Some(error);
            }
        }
        changes
    }

    /// Steps down when the acting window has passed without a renewal.
    pub fn expire(&mut self, now_ms: u64) -> Vec<LeaseChange> {
        match self.role {
            LeaseRole::Leader {
                epoch,
                acts_until_ms,
            } if now_ms >= acts_until_ms => {
                self.role = LeaseRole::Standby { leader: None };
                vec![LeaseChange::SteppedDown {
                    epoch,
                    reason: StepDownReason::NotRenewed(self.last_error.clone()),
                }]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn held(epoch: u64) -> LeaseReply {
        LeaseReply::Held { epoch }
    }

    #[test]
    fn a_standby_leads_once_it_holds_the_lease_and_stops_before_it_can_expire() {
        let s = LeaseSettings::default();
        let mut m = LeaseMachine::new(s);
        assert_eq!(m.acting_epoch(0), None);
        assert_eq!(
            m.observe(0, 10, held(3)),
            vec![LeaseChange::BecameLeader { epoch: 3 }]
        );
        assert_eq!(m.acting_epoch(10), Some(3));
        // Renewals extend the window from the time they were asked.
        assert!(m.observe(1000, 1020, held(3)).is_empty());
        assert_eq!(m.acting_epoch(1000 + s.ttl_ms - s.margin_ms - 1), Some(3));
        assert_eq!(m.acting_epoch(1000 + s.ttl_ms - s.margin_ms), None);
        // The database is gone: failures change nothing until the window ends.
        let fail = LeaseReply::Failed {
            error: "timeout".into(),
        };
        assert!(m.observe(2000, 3000, fail.clone()).is_empty());
        let changes = m.observe(4000, 4600, fail);
        assert_eq!(
            changes,
            vec![LeaseChange::SteppedDown {
                epoch: 3,
                reason: StepDownReason::NotRenewed(Some("timeout".into()))
            }]
        );
        assert_eq!(m.acting_epoch(4600), None);
    }

    #[test]
    fn another_holder_ends_leadership_at_once_and_is_named() {
        let mut m = LeaseMachine::new(LeaseSettings::default());
        m.observe(0, 0, held(1));
        let c = m.observe(
            100,
            100,
            LeaseReply::HeldByOther {
                holder: "c2 http://127.0.0.1:2".into(),
                epoch: 2,
            },
        );
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(m.acting_epoch(100), None);
        assert_eq!(
            m.role(),
            &LeaseRole::Standby {
                leader: Some(("c2 http://127.0.0.1:2".into(), 2))
            }
        );
    }

    #[test]
    fn a_late_answer_is_not_acted_on() {
        let s = LeaseSettings::default();
        let mut m = LeaseMachine::new(s);
        assert!(m.observe(0, s.ttl_ms, held(1)).is_empty());
        assert_eq!(m.acting_epoch(s.ttl_ms), None);
    }

    #[test]
    fn settings_must_leave_room_for_two_renewals() {
        assert!(LeaseSettings::default().validate().is_ok());
        let bad = LeaseSettings {
            ttl_ms: 2000,
            renew_every_ms: 1000,
            margin_ms: 500,
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("lease_renew_ms = 1000")
        );
    }

    fn reply() -> impl Strategy<Value = LeaseReply> {
        prop_oneof![
            (1u64..5).prop_map(|epoch| LeaseReply::Held { epoch }),
            (1u64..5).prop_map(|epoch| LeaseReply::HeldByOther {
                holder: "other".into(),
                epoch
            }),
            Just(LeaseReply::Failed {
                error: "down".into()
            }),
        ]
    }

    proptest! {
        /// Whatever the store answers and however late, the machine never acts at or after
        /// `asked_at + ttl - margin` of its last successful renewal (so never after the row
        /// can expire and another controller take it), and never right after a reply naming
        /// another holder.
        #[test]
        fn never_acts_once_the_lease_could_be_taken_elsewhere(
            steps in proptest::collection::vec((0u64..3000, 0u64..6000, reply(), 0u64..8000), 1..40)
        ) {
            let s = LeaseSettings::default();
            let mut m = LeaseMachine::new(s);
            let mut now = 0u64;
            let mut last_held: Option<(u64, u64)> = None;
            for (gap, latency, r, probe) in steps {
                let asked = now + gap;
                now = asked + latency;
                let other = matches!(r, LeaseReply::HeldByOther { .. });
                if let LeaseReply::Held { epoch } = r { last_held = Some((asked, epoch)); }
                m.observe(asked, now, r);
                if other {
                    prop_assert_eq!(m.acting_epoch(now), None);
                }
                for t in [now, now + probe] {
                    if let Some(epoch) = m.acting_epoch(t) {
                        let (asked_held, held_epoch) = last_held.expect("acts without a lease");
                        prop_assert_eq!(epoch, held_epoch);
                        prop_assert!(t < asked_held + s.ttl_ms - s.margin_ms);
                    }
                }
            }
        }

        /// Leadership changes are announced in pairs: every `BecameLeader` is followed by a
        /// `SteppedDown` of the same epoch before the next `BecameLeader`.
        #[test]
        fn changes_alternate(
            steps in proptest::collection::vec((0u64..3000, 0u64..3000, reply()), 1..40)
        ) {
            let mut m = LeaseMachine::new(LeaseSettings::default());
            let mut now = 0u64;
            let mut leading: Option<u64> = None;
            for (gap, latency, r) in steps {
                let asked = now + gap;
                now = asked + latency;
                for c in m.observe(asked, now, r) {
                    match c {
                        LeaseChange::BecameLeader { epoch } => {
                            prop_assert_eq!(leading, None);
                            leading = Some(epoch);
                        }
                        LeaseChange::SteppedDown { epoch, .. } => {
                            prop_assert_eq!(leading, Some(epoch));
                            leading = None;
                        }
                        LeaseChange::FollowsLeader { .. } => {}
                    }
                }
                prop_assert_eq!(leading.is_some(), matches!(m.role(), LeaseRole::Leader { .. }));
            }
        }
    }
}
