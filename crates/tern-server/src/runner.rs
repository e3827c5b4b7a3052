//! The executor: starts planned migrations through the source agents, watches them, retries
//! failures before the switch, re-targets steps whose destination went away, and finishes
//! evacuations.
//!
//! Everything it knows is in the store, so a restarted controller simply runs [`Runner::tick`]
//! again. Nothing is started twice: before an agent is called the attempt's idempotency key
//! is recorded with state `starting`; a `starting` migration found after a restart is
//! reconciled against the source agent's own list (the agent's migration for this VM and
//! destination accepted after the key was recorded is adopted; none means the call never
//! landed, and the step is planned again). The key also travels as the `Idempotency-Key`
//! header, for agents that deduplicate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::agent_client::{
    AgentCallError, AgentMigration, AgentOutcome, AgentStartRequest, outcome_of,
};
use crate::controller::{Controller, ControllerError};
use crate::model::{
    EvacuationRecord, EvacuationState, HostState, MigrationRecord, MigrationState, PlanTrigger,
    VmRecord, enum_str, now_ms,
};
use crate::placement::{Fleet, describe};
use crate::planner;

/// An observed dirty rate this far (relative) from the plan's assumption triggers a re-plan.
pub const DIRTY_DEVIATION: f64 = 0.5;

/// Attempts of a must-finish migration that belongs to no evacuation (no deadline).
pub const STANDALONE_ATTEMPTS: u32 = 5;
/// First retry delay; doubles per attempt up to [`MAX_BACKOFF_MS`].
pub const FIRST_BACKOFF_MS: u64 = 1000;
/// Longest retry delay.
pub const MAX_BACKOFF_MS: u64 = 30_000;
/// How long a step with no destination waits before looking again.
pub const NO_DESTINATION_WAIT_MS: u64 = 5000;
/// Clock skew tolerated between controller and agents when matching an attempt.
const SKEW_MS: u64 = 5000;

/// The retry delay after `attempts` failed attempts.
pub fn backoff_ms(attempts: u32) -> u64 {
    FIRST_BACKOFF_MS
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF_MS)
}

/// The executor.
pub struct Runner {
    ctl: Controller,
    /// Last agent state seen per migration (to count transitions once per process).
    seen: Mutex<HashMap<String, String>>,
    /// Evacuations (and plan versions) already warned about their deadline.
    warned: Mutex<std::collections::HashSet<String>>,
    /// Failed attempts already re-planned for (migration id, attempts).
    replanned_failures: Mutex<std::collections::HashSet<(String, u32)>>,
}

impl Runner {
    /// A runner over `ctl`.
    pub fn new(ctl: Controller) -> Self {
        Self {
            ctl,
            seen: Mutex::new(HashMap::new()),
            warned: Mutex::default(),
            replanned_failures: Mutex::default(),
        }
    }

    /// Runs [`Self::tick`] every `period` until the task is dropped.
    pub async fn run(self, period: Duration) {
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            // A standby (issue 12) only watches: the leader starts and settles work.
            if !self.ctl.leadership.may_act() {
                continue;
            }
            if let Err(e) = self.tick().await {
                tracing::warn!("runner: {e}");
            }
        }
    }

    /// One pass: watch what runs, drive evacuations, start due standalone migrations.
    pub async fn tick(&self) -> Result<(), ControllerError> {
        let _work = self.ctl.work.lock().await;
        let all = self.ctl.store.migrations(None).await?;
        let evacuations = self.ctl.store.evacuations().await?;
        // Idle: nothing to start or watch. Loading the fleet (every host's facts) each tick
        // would keep a core busy at 10,000 hosts for nothing (issue 12's fleet simulation).
        if all.iter().all(|m| m.state.is_terminal())
            && evacuations.iter().all(|e| e.state.is_terminal())
        {
            return Ok(());
        }
        let fleet = self.ctl.fleet().await?;
        let deadline_of = |m: &MigrationRecord| {
            m.evacuation_id.as_ref().and_then(|id| {
                evacuations
                    .iter()
                    .find(|e| &e.id == id)
                    .map(|e| (e.deadline_ms, e.state))
            })
        };
        for m in all.into_iter().filter(|m| {
            matches!(
                m.state,
                MigrationState::Starting | MigrationState::Running | MigrationState::Unknown
            )
        }) {
            let d = deadline_of(&m);
            self.watch(m, &fleet, d).await?;
        }
        for e in evacuations.iter().filter(|e| !e.state.is_terminal()) {
            self.drive(e.clone(), &fleet).await?;
        }
        let now = now_ms();
        for m in self.ctl.store.migrations(None).await? {
            if m.evacuation_id.is_none()
                && m.state == MigrationState::Planned
                && m.next_attempt_ms.is_none_or(|t| t <= now)
            {
                self.start_attempt(m, None).await?;
            }
        }
        let mut counts: HashMap<MigrationState, i64> = HashMap::new();
        for m in self.ctl.store.migrations(None).await? {
            *counts.entry(m.state).or_default() += 1;
        }
        let counts: Vec<_> = counts.into_iter().collect();
        self.ctl.metrics.set_phases(&counts);
        Ok(())
    }

    async fn save(
        &self,
        m: &mut MigrationRecord,
        kind: &str,
        detail: &str,
    ) -> Result<(), ControllerError> {
        m.updated_ms = now_ms();
        self.ctl.store.put_migration(m).await?;
        self.ctl.note(m, kind, detail).await
    }

    /// Follows one started migration on its source agent.
    async fn watch(
        &self,
        mut m: MigrationRecord,
        fleet: &Fleet,
        evac: Option<(u64, EvacuationState)>,
    ) -> Result<(), ControllerError> {
        let source_up = fleet
            .hosts
            .get(&m.source)
            .is_some_and(|h| h.state != HostState::Unreachable);
        if !source_up {
            if m.state != MigrationState::Unknown && m.state != MigrationState::Starting {
                m.state = MigrationState::Unknown;
                self.save(
                    &mut m,
                    "state",
                    "unknown: the source host stopped heartbeating",
                )
                .await?;
            }
            return Ok(());
        }
        if m.state == MigrationState::Starting {
            return self.reconcile_start(m).await;
        }
        let Some(agent_id) = m.agent_migration_id.clone() else {
            return self
                .failed_attempt(m, "no agent migration id recorded".into(), evac)
                .await;
        };
        let am = match self.ctl.agents.migration(&m.source, &agent_id).await {
            Ok(am) => am,
            Err(AgentCallError::Refused { status: 404, .. }) => {
                let e = format!(
                    "the agent of {} no longer knows migration {agent_id}",
                    m.source
                );
                return self.failed_attempt(m, e, evac).await;
            }
            Err(e) => {
                if m.state != MigrationState::Unknown {
                    m.state = MigrationState::Unknown;
                    self.save(&mut m, "state", &format!("unknown: {e}")).await?;
                }
                return Ok(());
            }
        };
        self.record_outcome(m, am, evac).await
    }

    /// Records what the agent reports about a started migration.
    async fn record_outcome(
        &self,
        mut m: MigrationRecord,
        am: AgentMigration,
        evac: Option<(u64, EvacuationState)>,
    ) -> Result<(), ControllerError> {
        let previous = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(m.id.clone(), am.state.clone());
        // Progress and the policy's decisions (a last decision may come with the end).
        self.ctl.record_agent_report(&m, &am).await?;
        if !matches!(outcome_of(&am.state), AgentOutcome::Running { .. }) {
            self.ctl.progress.forget(&m.id);
        }
        match outcome_of(&am.state) {
            AgentOutcome::Running {
                switched,
                recovering,
            } => {
                if m.state == MigrationState::Unknown {
                    m.state = MigrationState::Running;
                    self.save(
                        &mut m,
                        "state",
                        &format!("running again (agent: {})", am.state),
                    )
                    .await?;
                }
                if switched && !m.switched_to_postcopy {
                    m.switched_to_postcopy = true;
                    self.ctl.metrics.switches.inc();
                    self.save(&mut m, "note", "switched to post-copy").await?;
                }
                if recovering && previous.as_deref() != Some("recovering") {
                    self.ctl.metrics.recoveries.inc();
                    self.ctl
                        .note(&m, "note", "post-copy recovery under way")
                        .await?;
                }
                Ok(())
            }
            AgentOutcome::Completed => {
                let now = now_ms();
                m.state = MigrationState::Completed;
                m.ended_ms = Some(now);
                m.error = None;
                if let Some(s) = m.started_ms {
                    self.ctl
                        .metrics
                        .duration
                        .observe(now.saturating_sub(s) as f64 / 1000.0);
                }
                let d = format!("completed on {}", m.destination);
                self.save(&mut m, "state", &d).await
            }
            AgentOutcome::FailedBeforeSwitch { aborted } => {
                // An abort ends a standalone migration (the operator's intent) and a cancelled
                // evacuation's steps; a running evacuation must finish, so its aborted steps
                // are retried like failures (pause or cancel the evacuation to stop them).
                let cancelled = evac.is_some_and(|(_, s)| s == EvacuationState::Cancelled);
                let why = am.error.unwrap_or_else(|| am.state.clone());
                if cancelled || (aborted && evac.is_none()) {
                    m.state = MigrationState::Aborted;
                    m.ended_ms = Some(now_ms());
                    m.error = Some(why.clone());
                    self.ctl.metrics.aborts.inc();
                    let d = format!("aborted, guest on {}: {why}", m.source);
                    self.save(&mut m, "state", &d).await
                } else {
                    self.failed_attempt(m, why, evac).await
                }
            }
            AgentOutcome::Lost => {
                m.state = MigrationState::Lost;
                m.ended_ms = Some(now_ms());
                m.error = am.error.clone();
                let d = format!(
                    "{} after the switch: {}",
                    am.state,
                    am.error.unwrap_or_default()
                );
                self.save(&mut m, "state", &d).await
            }
        }
    }

    /// A `starting` migration after a restart: adopt the agent's migration or plan again.
    async fn reconcile_start(&self, mut m: MigrationRecord) -> Result<(), ControllerError> {
        let list = match self.ctl.agents.migrations(&m.source).await {
            Ok(l) => l,
            Err(e) => {
                tracing::info!("reconciling {}: {e}", m.id);
                return Ok(());
            }
        };
        let key = m.idempotency_key.clone().unwrap_or_default();
        let found = list.into_iter().find(|a| {
            a.vm == m.vm && a.destination == m.destination && a.created_ms + SKEW_MS >= m.updated_ms
        });
        match found {
            Some(a) => {
                m.agent_migration_id = Some(a.id.clone());
                m.state = MigrationState::Running;
                let d = format!("adopted agent migration {} for attempt {key}", a.id);
                self.save(&mut m, "attempt", &d).await
            }
            None => {
                m.state = MigrationState::Planned;
                m.next_attempt_ms = None;
                let d = format!("attempt {key} never reached the agent: planned again");
                self.save(&mut m, "attempt", &d).await
            }
        }
    }

    /// An attempt failed before the switch (the guest is on its source): retry with backoff
    /// in must-finish contexts while the deadline allows, else record the failure.
    async fn failed_attempt(
        &self,
        mut m: MigrationRecord,
        error: String,
        evac: Option<(u64, EvacuationState)>,
    ) -> Result<(), ControllerError> {
        let now = now_ms();
        let wait = backoff_ms(m.attempts);
        let retry = match evac {
            Some((deadline, state)) => state != EvacuationState::Cancelled && now + wait < deadline,
            None => m.context.must_finish() && m.attempts < STANDALONE_ATTEMPTS,
        };
        m.error = Some(error.clone());
        if retry {
            m.state = MigrationState::Planned;
            m.next_attempt_ms = Some(now + wait);
            self.ctl.metrics.retries.inc();
            let d = format!(
                "attempt {} failed before the switch (guest on {}): {error}; retry in {} ms",
                m.attempts, m.source, wait
            );
            self.save(&mut m, "retry", &d).await
        } else {
            m.state = MigrationState::Failed;
            m.ended_ms = Some(now);
            let d = format!(
                "failed after {} attempt(s), guest on {}: {error}",
                m.attempts, m.source
            );
            self.save(&mut m, "state", &d).await
        }
    }

    /// Records the attempt's key, then asks the source agent to start it.
    async fn start_attempt(
        &self,
        mut m: MigrationRecord,
        evac: Option<(u64, EvacuationState)>,
    ) -> Result<(), ControllerError> {
        let now = now_ms();
        m.attempts += 1;
        let key = format!("{}-a{}", m.id, m.attempts);
        m.idempotency_key = Some(key.clone());
        m.agent_migration_id = None;
        m.state = MigrationState::Starting;
        m.started_ms.get_or_insert(now);
        m.next_attempt_ms = None;
        let d = format!("attempt {} ({key}) to {}", m.attempts, m.destination);
        self.save(&mut m, "attempt", &d).await?;
        self.ctl.metrics.attempts.inc();
        let req = AgentStartRequest {
            vm: m.vm.clone(),
            to_host: m.destination.clone(),
            context: m.context,
            deadline_s: evac.map(|(d, _)| d.saturating_sub(now) / 1000),
        };
        match self.ctl.agents.start_migration(&m.source, &key, &req).await {
            Ok(am) => {
                m.agent_migration_id = Some(am.id.clone());
                m.state = MigrationState::Running;
                self.save(
                    &mut m,
                    "state",
                    &format!("running: agent migration {}", am.id),
                )
                .await
            }
            Err(e) => self.failed_attempt(m, e.to_string(), evac).await,
        }
    }

    /// Finishes, fails, or starts the next steps of one evacuation.
    async fn drive(&self, e: EvacuationRecord, fleet: &Fleet) -> Result<(), ControllerError> {
        let now = now_ms();
        let mut steps = self.ctl.store.migrations(Some(&e.id)).await?;
        if steps.iter().all(|m| m.state == MigrationState::Completed) {
            return self.finish(e, EvacuationState::Completed, None).await;
        }
        if steps.iter().all(|m| m.state.is_terminal()) {
            let failed: Vec<String> = steps
                .iter()
                .filter(|m| m.state != MigrationState::Completed)
                .map(|m| format!("{} ({})", m.vm, m.state.as_str()))
                .collect();
            let why = format!("not moved: {}", failed.join(", "));
            return self.finish(e, EvacuationState::Failed, Some(why)).await;
        }
        if now > e.deadline_ms {
            for m in steps
                .iter_mut()
                .filter(|m| m.state == MigrationState::Planned)
            {
                m.state = MigrationState::Failed;
                m.ended_ms = Some(now);
                self.save(m, "state", "deadline passed before it could start")
                    .await?;
            }
            if !steps.iter().any(|m| !m.state.is_terminal()) {
                let why = "deadline passed with VMs left on the host".to_string();
                return self.finish(e, EvacuationState::Failed, Some(why)).await;
            }
        }
        let vms = self.ctl.store.vms(None).await?;
        let mut e = e;
        if e.state == EvacuationState::Running {
            self.replan_if_deviating(&mut e, &mut steps, fleet, &vms, now)
                .await?;
        }
        self.warn_if_at_risk(&e, now);
        if e.state == EvacuationState::Paused {
            return Ok(());
        }
        let Some(source) = fleet.hosts.get(&e.host) else {
            return Ok(());
        };
        let plan_t0 = if e.plan.made_ms == 0 {
            e.created_ms
        } else {
            e.plan.made_ms
        };
        let ended: std::collections::HashSet<String> = steps
            .iter()
            .filter(|m| m.state.is_terminal())
            .map(|m| m.vm.clone())
            .collect();
        // A first attempt starts when the plan's trigger fires; a retry when its backoff ends.
        let triggered = |m: &MigrationRecord| {
            if m.attempts > 0 {
                return true;
            }
            match e
                .plan
                .migrations
                .iter()
                .find(|p| p.vm == m.vm)
                .map(|p| &p.trigger)
            {
                None | Some(PlanTrigger::Now) | Some(PlanTrigger::AlreadyRunning) => true,
                Some(PlanTrigger::AfterMigrationOf { vm }) => {
                    ended.contains(vm) || !steps.iter().any(|s| &s.vm == vm)
                }
                Some(PlanTrigger::AtTime { at_s }) => {
                    now >= plan_t0.saturating_add((at_s.max(0.0) * 1000.0) as u64)
                }
            }
        };
        let ready: Vec<bool> = steps.iter().map(triggered).collect();
        let limit = e.plan.concurrency.min(source.outbound_limit()).max(1) as usize;
        let mut in_flight = steps
            .iter()
            .filter(|m| !m.state.is_terminal() && m.state != MigrationState::Planned)
            .count();
        for (mut m, _) in steps.into_iter().zip(ready).filter(|(m, ready)| {
            *ready
                && m.state == MigrationState::Planned
                && m.next_attempt_ms.is_none_or(|t| t <= now)
        }) {
            let Some(vm) = vms.iter().find(|v| v.name == m.vm && v.host == e.host) else {
                // Its agent no longer reports it on the host (moved or stopped by other
                // means): the step's goal, a host without this VM, is reached.
                m.state = MigrationState::Completed;
                m.ended_ms = Some(now);
                let d = format!("nothing to do: {} no longer reports {}", e.host, m.vm);
                self.save(&mut m, "state", &d).await?;
                continue;
            };
            if in_flight >= limit {
                break;
            }
            let mut f = fleet.clone();
            if let Some(r) = f.reserved_mib.get_mut(&m.destination) {
                *r = r.saturating_sub(vm.memory_mib);
            }
            let Some(m) = self.retarget(m, vm, source, &f).await? else {
                continue;
            };
            self.start_attempt(m, Some((e.deadline_ms, e.state)))
                .await?;
            in_flight += 1;
        }
        Ok(())
    }

    /// Tells the operator once per plan (event + log) when the plan's predicted end is past
    /// the deadline, with the planner's suggestions.
    fn warn_if_at_risk(&self, e: &EvacuationRecord, now: u64) {
        let t0 = if e.plan.made_ms == 0 {
            e.created_ms
        } else {
            e.plan.made_ms
        };
        let end_ms = t0.saturating_add((e.plan.predicted_makespan_s.max(0.0) * 1000.0) as u64);
        if e.plan.fits_deadline && end_ms <= e.deadline_ms {
            return;
        }
        let first = self
            .warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(format!("{}@{}", e.id, e.plan.made_ms));
        if first {
            let left_s = end_ms.saturating_sub(now) as f64 / 1000.0;
            let to_deadline_s = e.deadline_ms.saturating_sub(now) as f64 / 1000.0;
            let help = if e.plan.suggestions.is_empty() {
                "failed attempts are retried until it passes".to_string()
            } else {
                format!("suggestions: {}", e.plan.suggestions.join("; "))
            };
            let msg = format!(
                "deadline at risk: predicted {left_s:.1} s of work left, {to_deadline_s:.1} s \
                 to the deadline; {help}"
            );
            tracing::warn!("evacuation {}: {msg}", e.id);
            self.ctl
                .events
                .publish("evacuation", &e.id, &enum_str(&e.state), msg);
        }
    }

    /// Re-plans with `tern_planner::replan` when progress deviates from the plan: a planned
    /// step's destination gone (unregistered, unreachable, draining), an attempt that failed
    /// before the switch, or a VM dirtying far from what the plan assumed. Planned steps take
    /// the new plan's destinations; each affected step records a `replan` event naming the
    /// deviation and the new predicted makespan.
    async fn replan_if_deviating(
        &self,
        e: &mut EvacuationRecord,
        steps: &mut [MigrationRecord],
        fleet: &Fleet,
        vms: &[VmRecord],
        now: u64,
    ) -> Result<(), ControllerError> {
        let (Some(req), Some(prev)) = (&e.plan.request, &e.plan.detail) else {
            return Ok(());
        };
        let (Ok(req), Ok(prev)) = (
            serde_json::from_value::<tern_planner::EvacuationRequest>(req.clone()),
            serde_json::from_value::<tern_planner::EvacuationPlan>(prev.clone()),
        ) else {
            return Ok(());
        };
        let mut progress = tern_planner::Progress::default();
        let mut why: Vec<String> = Vec::new();
        let mut touched: std::collections::HashSet<String> = Default::default();
        for m in steps.iter().filter(|m| m.state == MigrationState::Planned) {
            let gone = match fleet.hosts.get(&m.destination) {
                None => Some("not registered any more"),
                Some(h) if h.state == HostState::Unreachable => Some("unreachable"),
                Some(h) if h.state == HostState::Draining => Some("draining"),
                _ => None,
            };
            if let Some(g) = gone {
                if !progress.hosts_gone.contains(&m.destination) {
                    progress.hosts_gone.push(m.destination.clone());
                    why.push(format!("destination {} {g}", m.destination));
                }
                touched.insert(m.vm.clone());
            }
            if m.attempts > 0 {
                let fresh = self
                    .replanned_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((m.id.clone(), m.attempts));
                if fresh {
                    why.push(format!(
                        "attempt {} of {} failed before the switch",
                        m.attempts, m.vm
                    ));
                    touched.insert(m.vm.clone());
                }
                progress.failed.push(tern_planner::FailedAttempt {
                    vm: m.vm.clone(),
                    destination: m.destination.clone(),
                    attempts: m.attempts,
                });
            }
        }
        for v in req.vms.iter() {
            let Some(rec) = vms.iter().find(|r| r.name == v.name && r.host == e.host) else {
                continue;
            };
            let (Some(obs), assumed) = (rec.dirty_bytes_per_s, v.dirty_rate().0) else {
                continue;
            };
            let pending = steps
                .iter()
                .any(|m| m.vm == v.name && !m.state.is_terminal());
            if pending && (obs as f64 - assumed).abs() > DIRTY_DEVIATION * assumed.max(1.0) {
                progress.observed_dirty.push((v.name.clone(), obs));
                why.push(format!(
                    "{} dirties {obs} bytes/s, {assumed:.0} assumed",
                    v.name
                ));
                touched.insert(v.name.clone());
            }
        }
        if why.is_empty() {
            return Ok(());
        }
        let t0 = if e.plan.made_ms == 0 {
            e.created_ms
        } else {
            e.plan.made_ms
        };
        progress.elapsed_s = now.saturating_sub(t0) as f64 / 1000.0;
        for m in steps.iter() {
            match m.state {
                MigrationState::Completed => progress.completed.push(m.vm.clone()),
                MigrationState::Starting | MigrationState::Running | MigrationState::Unknown => {
                    let mem = vms
                        .iter()
                        .find(|v| v.name == m.vm)
                        .map_or(0, |v| v.memory_mib << 20);
                    progress.in_flight.push(tern_planner::InFlightMigration {
                        vm: m.vm.clone(),
                        destination: m.destination.clone(),
                        remaining_bytes: mem,
                        elapsed_s: m
                            .started_ms
                            .map_or(0.0, |s| now.saturating_sub(s) as f64 / 1000.0),
                        in_post_copy: m.switched_to_postcopy,
                    })
                }
                _ => {}
            }
        }
        let why = why.join("; ");
        let next = tern_planner::replan(&req, &prev, &progress)
            .map_err(|x| x.to_string())
            .and_then(|r| {
                let deadline_left_s = e.deadline_ms.saturating_sub(now) / 1000;
                planner::to_controller_plan(&e.host, deadline_left_s, &r.request, &r.plan)
                    .map_err(|x| x.to_string())
            });
        let mut plan = match next {
            Ok(p) => p,
            Err(x) => {
                // No plan without the gone host: the per-step re-targeting below keeps waiting.
                tracing::info!("evacuation {}: re-plan after {why} impossible: {x}", e.id);
                return Ok(());
            }
        };
        plan.made_ms = now;
        let detail = format!(
            "replan: {why}; predicted makespan {:.1} s from now (was {:.1} s){}",
            plan.predicted_makespan_s,
            e.plan.predicted_makespan_s,
            if plan.deviations.is_empty() {
                String::new()
            } else {
                format!("; planner: {}", plan.deviations.join("; "))
            }
        );
        for m in steps
            .iter_mut()
            .filter(|m| m.state == MigrationState::Planned)
        {
            let Some(p) = plan.migrations.iter().find(|p| p.vm == m.vm) else {
                continue;
            };
            if p.destination != m.destination {
                let d = format!("{detail}; {} now to {} ({})", m.vm, p.destination, p.reason);
                m.destination = p.destination.clone();
                m.reason = p.reason.clone();
                self.save(m, "replan", &d).await?;
            } else if touched.contains(&m.vm) {
                self.ctl.note(m, "replan", &detail).await?;
            }
        }
        e.plan = plan;
        e.updated_ms = now;
        self.ctl.store.put_evacuation(e).await?;
        self.ctl
            .events
            .publish("evacuation", &e.id, &enum_str(&e.state), detail);
        Ok(())
    }

    /// Keeps the step's destination if it still can take the VM, else re-plans it.
    async fn retarget(
        &self,
        mut m: MigrationRecord,
        vm: &crate::model::VmRecord,
        source: &crate::model::HostRecord,
        f: &Fleet,
    ) -> Result<Option<MigrationRecord>, ControllerError> {
        let why = match f.hosts.get(&m.destination) {
            Some(d) => f.reject(vm, source, d, true),
            None => Some("not registered any more".into()),
        };
        let Some(why) = why else {
            return Ok(Some(m));
        };
        match f.choose(vm, source, &[m.destination.as_str()]) {
            Ok(c) => {
                let d = format!("replanned: {} {why}; now {}", m.destination, c.reason);
                m.destination = c.host;
                m.reason = c.reason;
                self.save(&mut m, "replan", &d).await?;
                Ok(Some(m))
            }
            Err(rej) => {
                let err = format!(
                    "no destination now ({} {why}; {})",
                    m.destination,
                    describe(&rej)
                );
                m.next_attempt_ms = Some(now_ms() + NO_DESTINATION_WAIT_MS);
                if m.error.as_deref() != Some(err.as_str()) {
                    m.error = Some(err.clone());
                    self.save(&mut m, "replan", &err).await?;
                } else {
                    m.updated_ms = now_ms();
                    self.ctl.store.put_migration(&m).await?;
                }
                Ok(None)
            }
        }
    }

    async fn finish(
        &self,
        mut e: EvacuationRecord,
        state: EvacuationState,
        error: Option<String>,
    ) -> Result<(), ControllerError> {
        let now = now_ms();
        e.state = state;
        e.ended_ms = Some(now);
        e.error = error.clone();
        e.updated_ms = now;
        let actual = now.saturating_sub(e.created_ms) as f64 / 1000.0;
        e.actual_makespan_s = Some(actual);
        self.ctl.store.put_evacuation(&e).await?;
        self.ctl
            .metrics
            .evacuation_actual
            .get_or_create(&vec![("host".into(), e.host.clone())])
            .set(actual);
        self.ctl.events.publish(
            "evacuation",
            &e.id,
            &enum_str(&state),
            format!(
                "actual {actual:.1} s vs predicted {:.1} s{}",
                e.predicted_makespan_s,
                error.map(|x| format!(": {x}")).unwrap_or_default()
            ),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ms(1), 1000);
        assert_eq!(backoff_ms(2), 2000);
        assert_eq!(backoff_ms(3), 4000);
        assert_eq!(backoff_ms(50), MAX_BACKOFF_MS);
    }
}
