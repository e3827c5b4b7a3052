//! The adapter of leader election (issue 12): asks the store for the lease every
//! `renew_every_ms`, feeds the pure [`LeaseMachine`] and answers, at any instant, whether this
//! controller may act and with which fencing epoch.
//!
//! On SQLite there is one controller: it is always the leader and sends no fencing epoch.
//! On PostgreSQL every controller runs [`Leadership::run`]; the runner ticks only while
//! [`Leadership::may_act`], every mutating agent call carries the epoch
//! ([`crate::agent_client::HttpAgents::with_fencing`]), and the API refuses writes on a
//! standby with a message naming the leader ([`Leadership::standby_refusal`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

use crate::lease::{LeaseChange, LeaseMachine, LeaseReply, LeaseRole, LeaseSettings};
use crate::model::now_ms;
use crate::store::ControllerStore;

/// The name of the controllers' lease row.
pub const LEASE_NAME: &str = "controller-leader";

/// Whether this controller may send a command to an agent now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fencing {
    /// The only controller (SQLite): no epoch is sent.
    Unfenced,
    /// The leader at this epoch.
    Epoch(u64),
    /// Not the leader (or no longer sure to be): send nothing.
    NotLeader(String),
}

/// `GET /v1/leader`: who leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct LeaderStatus {
    /// This controller's id and URL.
    pub controller: String,
    /// `single` (SQLite, always the leader), `leader` or `standby`.
    pub role: String,
    /// The leader's id and URL, when known.
    pub leader: Option<String>,
    /// The leader's lease epoch (the fencing token), when known.
    pub epoch: Option<u64>,
    /// The lease settings (absent on SQLite).
    pub lease: Option<LeaseSettings>,
    /// When this controller last became the leader (ms since the epoch).
    pub leader_since_ms: Option<u64>,
}

#[derive(Debug)]
struct Elected {
    machine: LeaseMachine,
    since_ms: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    /// `id url`, the text stored as the lease holder.
    holder: String,
    started: Instant,
    elected: Option<Mutex<Elected>>,
}

/// Shared, cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership(Arc<Inner>);

impl Leadership {
    /// The only controller (SQLite): always the leader.
    pub fn single(holder: impl Into<String>) -> Self {
        Self(Arc::new(Inner {
            holder: holder.into(),
            started: Instant::now(),
            elected: None,
        }))
    }

    /// One of several controllers: a standby until [`Self::run`] takes the lease.
    pub fn elected(holder: impl Into<String>, settings: LeaseSettings) -> Self {
        Self(Arc::new(Inner {
            holder: holder.into(),
            started: Instant::now(),
            elected: Some(Mutex::new(Elected {
                machine: LeaseMachine::new(settings),
                since_ms: None,
            })),
        }))
    }

    fn mono_ms(&self) -> u64 {
        u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Elected) -> T) -> Option<T> {
        self.0
            .elected
            .as_ref()
            .map(|m| f(&mut m.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// This controller's id and URL.
    pub fn holder(&self) -> &str {
        &self.0.holder
    }

    /// What an agent call may carry now.
    pub fn fencing(&self) -> Fencing {
        let now = self.mono_ms();
        match self.with(|e| (e.machine.acting_epoch(now), e.machine.role().clone())) {
            None => Fencing::Unfenced,
            Some((Some(epoch), _)) => Fencing::Epoch(epoch),
            Some((None, role)) => Fencing::NotLeader(self.describe_leader(&role)),
        }
    }

    /// Whether this controller may start, steer or settle work now.
    pub fn may_act(&self) -> bool {
        !matches!(self.fencing(), Fencing::NotLeader(_))
    }

    fn describe_leader(&self, role: &LeaseRole) -> String {
        match role {
            LeaseRole::Standby {
                leader: Some((h, e)),
            } => format!("the leader is {h} (lease epoch {e})"),
            LeaseRole::Standby { leader: None } | LeaseRole::Leader { .. } => {
                "no leader is known right now (the lease is being renewed or taken over)".into()
            }
        }
    }

    /// The message of a write refused on a standby, or `None` when this controller leads.
    pub fn standby_refusal(&self) -> Option<String> {
        match self.fencing() {
            Fencing::NotLeader(leader) => Some(format!(
                "controller {} is a standby and does not accept changes: {leader}; send the \
                 request to the leader (reads are served here)",
                self.0.holder
            )),
            _ => None,
        }
    }

    /// Who leads, for the API.
    pub fn status(&self) -> LeaderStatus {
        let now = self.mono_ms();
        let holder = self.0.holder.clone();
        let elected = self.with(|e| {
            (
                e.machine.acting_epoch(now),
                e.machine.role().clone(),
                e.machine.settings(),
                e.since_ms,
            )
        });
        match elected {
            None => LeaderStatus {
                controller: holder.clone(),
                role: "single".into(),
                leader: Some(holder),
                epoch: None,
                lease: None,
                leader_since_ms: None,
            },
            Some((Some(epoch), _, settings, since)) => LeaderStatus {
                controller: holder.clone(),
                role: "leader".into(),
                leader: Some(holder),
                epoch: Some(epoch),
                lease: Some(settings),
                leader_since_ms: since,
            },
            Some((None, role, settings, _)) => {
                let (leader, epoch) = match role {
                    LeaseRole::Standby {
                        leader: Some((h, e)),
                    } => (Some(h), Some(e)),
                    _ => (None, None),
                };
                LeaderStatus {
                    controller: holder,
                    role: "standby".into(),
                    leader,
                    epoch,
                    lease: Some(settings),
                    leader_since_ms: None,
                }
            }
        }
    }

    /// One attempt: take or renew the lease (bounded by the renewal period), then feed the
    /// answer to the machine. Returns what changed.
    pub async fn attempt(&self, store: &dyn ControllerStore) -> Vec<LeaseChange> {
        let Some(settings) = self.with(|e| e.machine.settings()) else {
            return Vec::new();
        };
        let asked = self.mono_ms();
        // An answer is useful until the acting window it would open has passed; waiting
        // longer only delays the next attempt. Safety does not depend on this bound: the
        // window counts from `asked`.
        let budget = Duration::from_millis(settings.ttl_ms.saturating_sub(settings.margin_ms));
        let reply = match tokio::time::timeout(budget, self.ask(store, settings)).await {
            Ok(r) => r,
            Err(_) => LeaseReply::Failed {
                error: format!("the lease store did not answer within {budget:?}"),
            },
        };
        let now = self.mono_ms();
        let changes = self
            .with(|e| {
                let changes = e.machine.observe(asked, now, reply);
                for c in &changes {
                    match c {
                        LeaseChange::BecameLeader { .. } => e.since_ms = Some(now_ms()),
                        LeaseChange::SteppedDown { .. } => e.since_ms = None,
                        LeaseChange::FollowsLeader { .. } => {}
                    }
                }
                changes
            })
            .unwrap_or_default();
        for c in &changes {
            log_change(&self.0.holder, c);
        }
        changes
    }

    async fn ask(&self, store: &dyn ControllerStore, s: LeaseSettings) -> LeaseReply {
        let wall = now_ms();
        match store
            .acquire_lease(LEASE_NAME, &self.0.holder, wall, s.ttl_ms)
            .await
        {
            Ok(Some(epoch)) => LeaseReply::Held { epoch },
            Ok(None) => match store.lease(LEASE_NAME).await {
                Ok(Some(l)) => LeaseReply::HeldByOther {
                    holder: l.leader,
                    epoch: l.epoch,
                },
                Ok(None) => LeaseReply::Failed {
                    error: "the lease row vanished".into(),
                },
                Err(e) => LeaseReply::Failed {
                    error: e.to_string(),
                },
            },
            Err(e) => LeaseReply::Failed {
                error: e.to_string(),
            },
        }
    }

    /// Takes and renews the lease forever (until the task is dropped). A no-op on SQLite.
    pub async fn run(self, store: Arc<dyn ControllerStore>) {
        let Some(settings) = self.with(|e| e.machine.settings()) else {
            return;
        };
        let mut t = tokio::time::interval(Duration::from_millis(settings.renew_every_ms));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            self.attempt(store.as_ref()).await;
        }
    }
}

fn log_change(holder: &str, c: &LeaseChange) {
    match c {
        LeaseChange::BecameLeader { epoch } => {
            tracing::warn!(
                controller = holder,
                epoch,
                "this controller is now the leader"
            );
        }
        LeaseChange::SteppedDown { epoch, reason } => {
            tracing::warn!(
                controller = holder,
                epoch,
                ?reason,
                "this controller stopped leading"
            );
        }
        LeaseChange::FollowsLeader { holder: h, epoch } => {
            tracing::info!(controller = holder, leader = %h, epoch, "standby: following the leader");
        }
    }
}
