//! Running one migration: the only place where policy decisions become QMP calls.
//!
//! The runner is given the QMP clients of the source QEMU and of the destination QEMU
//! (started with `-incoming defer`), a policy and the plan input. It detects what both QEMUs
//! support, asks the policy for a plan, sets capabilities and parameters on both ends,
//! starts the stream, then feeds the policy with samples at pass boundaries (QEMU's
//! `MIGRATION_PASS` event, confirmed by `dirty-sync-count`) and with periodic ticks, and
//! executes what it answers. Operators can force completion, abort or change bandwidth
//! mid-flight.
//!
//! Decisions are made on completed passes, not on raw polls: Nova removed its 2016 automatic
//! post-copy switch because per-poll sampling of a saw-tooth `remaining` looked like no
//! progress (LP#1644248).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_policy::{
    Action, Decision, IterationSample, MigrationPlan, MigrationPolicy, Observation, Phase,
    PlanInput, QemuFeatures,
};
use tern_qmp::{
    MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationParameters,
    MigrationStatus, QmpClient, QmpEventKind, RunState,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::EngineError;
use crate::endpoint::{DestinationEndpoint, command_names};
use crate::state::{MigrationEvent, MigrationEventKind, MigrationState};

/// How often `query-migrate` is polled between pass events.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What the runner needs besides the two QMP clients.
#[derive(Debug, Clone)]
pub struct MigrationSetup {
    /// Migration identifier (for logs).
    pub id: String,
    /// Where the destination listens, as a QEMU URI (`tcp:198.18.0.2:49152`).
    pub uri: String,
    /// Context, SLA, limits; `features` is overwritten with what both QEMUs report.
    pub plan_input: PlanInput,
    /// Poll interval between pass events.
    pub poll_interval: Duration,
    /// Measure the guest's dirty rate with `calc-dirty-rate` before starting (seconds, 0 = no).
    pub probe_seconds: u64,
    /// How long post-copy recovery keeps trying while the network is down before the
    /// migration is declared stranded (both QEMUs kept paused for the operator).
    pub recovery_window: Duration,
    /// In post-copy, no byte sent for this long while pages remain means the channel is dead
    /// even if QEMU has not noticed (TCP can take minutes): tern forces `migrate-pause`.
    pub postcopy_stall_timeout: Duration,
}

impl MigrationSetup {
    /// A setup with tern's defaults for polling (250 ms), no dirty-rate probe, a 10-minute
    /// post-copy recovery window and a 2 s post-copy stall timeout.
    pub fn new(id: impl Into<String>, uri: impl Into<String>, plan_input: PlanInput) -> Self {
        Self {
            id: id.into(),
            uri: uri.into(),
            plan_input,
            poll_interval: DEFAULT_POLL_INTERVAL,
            probe_seconds: 0,
            recovery_window: DEFAULT_RECOVERY_WINDOW,
            postcopy_stall_timeout: DEFAULT_POSTCOPY_STALL_TIMEOUT,
        }
    }
}

/// Default post-copy recovery window: generous, a network outage of minutes is survivable.
pub const DEFAULT_RECOVERY_WINDOW: Duration = Duration::from_secs(600);
/// Default post-copy stall timeout.
pub const DEFAULT_POSTCOPY_STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one recovery attempt may stay in `postcopy-recover-setup`/`postcopy-recover`
/// before tern pauses it and tries again (a connect into a dead network hangs in SYN retries).
const RECOVERY_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay; doubles up to [`RECOVERY_BACKOFF_MAX`].
const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest retry delay.
const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Post-copy recovery bookkeeping.
#[derive(Debug, Default)]
struct RecoveryTracker {
    /// When the current outage was detected.
    paused_since: Option<Instant>,
    /// Next attempt not before this.
    next_attempt: Option<Instant>,
    /// Current backoff.
    backoff: Duration,
    /// When the running attempt started.
    attempt_started: Option<Instant>,
    /// Attempts in the current outage.
    attempts: u32,
    /// Completed recoveries.
    recoveries: u32,
    /// Last time `transferred` grew during post-copy, and its value.
    last_progress: Option<(u64, Instant)>,
}

/// A command an operator sends to a running migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum OperatorCommand {
    /// Finish now: post-copy if allowed, else pause the guest until the copy finishes
    /// (Nova's `force_complete` semantics).
    ForceComplete,
    /// Cancel; allowed only before the switch to post-copy.
    Abort,
    /// Change the migration bandwidth cap (bytes per second).
    SetBandwidth {
        /// New cap in bytes per second.
        bytes_per_s: u64,
    },
}

/// An operator command with a channel for the answer.
#[derive(Debug)]
pub struct OperatorRequest {
    /// The command.
    pub command: OperatorCommand,
    /// Accepted (with what was done) or refused (with why).
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// A live view of a running migration, for progress bars and `migration show`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// State machine state.
    pub state: Option<MigrationState>,
    /// QEMU's migration status string.
    pub qemu_status: String,
    /// Milliseconds since the start.
    pub elapsed_ms: u64,
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// Guest RAM bytes.
    pub total_bytes: u64,
    /// Dirty rate (bytes/s).
    pub dirty_bytes_per_s: u64,
    /// Throughput (bytes/s).
    pub throughput_bytes_per_s: u64,
    /// Completed passes (`dirty-sync-count`).
    pub pass: u64,
    /// Predicted milliseconds until completion, when the model can tell.
    pub eta_ms: Option<u64>,
}

/// A decision as taken, for reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenAction {
    /// Milliseconds since the start.
    pub at_ms: u64,
    /// Short action name.
    pub action: String,
    /// The reason given by the policy or operator.
    pub reason: String,
}

/// How a migration ended, from the engine's point of view (guest integrity and blackout are
/// measured separately, from the guest's serial logs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Migration identifier.
    pub id: String,
    /// Policy name.
    pub policy: String,
    /// Final state.
    pub state: MigrationState,
    /// Whether post-copy was entered.
    pub switched_to_postcopy: bool,
    /// Whether the guest was paused to force completion.
    pub paused_guest: bool,
    /// Wall time from `migrate` to the terminal state, in milliseconds.
    pub total_time_ms: u64,
    /// Bytes sent over the migration stream (`ram.transferred`).
    pub bytes_sent: u64,
    /// Guest RAM bytes (`ram.total`).
    pub ram_bytes: u64,
    /// Completed passes.
    pub passes: u64,
    /// QEMU's own downtime figure (meaningless in post-copy; kept for comparison).
    pub qemu_downtime_ms: Option<u64>,
    /// Capabilities enabled on the source.
    pub capabilities: Vec<String>,
    /// Why post-copy was or was not permitted.
    pub post_copy_verdict: String,
    /// Actions taken (policy and operator), with reasons.
    pub actions: Vec<TakenAction>,
    /// Every event.
    pub events: Vec<MigrationEvent>,
    /// QEMU's error text when it failed.
    pub error: Option<String>,
    /// Post-copy recoveries performed.
    pub recoveries: u32,
    /// The plan the policy made.
    pub plan: Option<MigrationPlan>,
}

/// Drives one migration from prepare to a terminal state.
pub struct MigrationRunner {
    source: QmpClient,
    destination: Box<dyn DestinationEndpoint>,
    policy: Box<dyn MigrationPolicy + Send>,
    setup: MigrationSetup,
    started: Instant,
    state: MigrationState,
    events: Vec<MigrationEvent>,
    actions: Vec<TakenAction>,
    event_tx: Option<mpsc::UnboundedSender<MigrationEvent>>,
    progress_tx: watch::Sender<MigrationProgress>,
    progress_rx: watch::Receiver<MigrationProgress>,
    plan: Option<MigrationPlan>,
    paused_guest: bool,
    switched: bool,
    last_info: Option<MigrationInfo>,
    error: Option<String>,
    recovery: RecoveryTracker,
    /// An abort was requested (by the policy or an operator) and QEMU accepted it.
    abort_requested: bool,
}

impl MigrationRunner {
    /// A runner for one migration.
    pub fn new(
        source: QmpClient,
        destination: Box<dyn DestinationEndpoint>,
        policy: Box<dyn MigrationPolicy + Send>,
        setup: MigrationSetup,
    ) -> Self {
        let (progress_tx, progress_rx) = watch::channel(MigrationProgress::default());
        Self {
            source,
            destination,
            policy,
            setup,
            started: Instant::now(),
            state: MigrationState::Pending,
            events: Vec::new(),
            actions: Vec::new(),
            event_tx: None,
            progress_tx,
            progress_rx,
            plan: None,
            paused_guest: false,
            switched: false,
            last_info: None,
            error: None,
            recovery: RecoveryTracker::default(),
            abort_requested: false,
        }
    }

    /// Every event is also sent here as it happens (for persistence and live logs).
    pub fn with_event_sink(mut self, tx: mpsc::UnboundedSender<MigrationEvent>) -> Self {
        self.event_tx = Some(tx);
        self
    }

    /// A receiver of live progress.
    pub fn progress(&self) -> watch::Receiver<MigrationProgress> {
        self.progress_rx.clone()
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn record(&mut self, kind: MigrationEventKind) {
        let ev = MigrationEvent {
            at_ms: self.elapsed_ms(),
            kind,
        };
        tracing::info!(migration = %self.setup.id, event = ?ev, "migration event");
        if let Some(tx) = &self.event_tx {
            let _ = tx.send(ev.clone());
        }
        self.events.push(ev);
    }

    fn transition(&mut self, to: MigrationState, reason: impl Into<String>) {
        let from = self.state;
        if from == to {
            return;
        }
        let reason = reason.into();
        if !from.can_become(to) {
            // Never silently break the state machine: record the anomaly and follow reality.
            self.record(MigrationEventKind::Note {
                text: format!("unexpected transition {from} -> {to}: {reason}"),
            });
        }
        self.state = to;
        self.record(MigrationEventKind::State { from, to, reason });
        self.progress_tx.send_modify(|p| p.state = Some(to));
    }

    fn take_action(&mut self, action: &str, reason: &str) {
        self.actions.push(TakenAction {
            at_ms: self.elapsed_ms(),
            action: action.to_string(),
            reason: reason.to_string(),
        });
        self.record(MigrationEventKind::Decision {
            action: action.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Runs the migration to a terminal state. Errors are reported in the returned report
    /// (state `failed`/`lost`), not as `Err`, so callers always learn where the guest is.
    pub async fn run(mut self, mut control: mpsc::Receiver<OperatorRequest>) -> MigrationReport {
        self.started = Instant::now();
        self.transition(MigrationState::Preparing, "migration accepted");
        if let Err(e) = self.prepare().await {
            let msg = e.to_string();
            self.error = Some(msg.clone());
            let _ = self.source.migrate_cancel().await;
            self.transition(MigrationState::Failed, format!("prepare failed: {msg}"));
            return self.report();
        }
        self.monitor(&mut control).await;
        self.report()
    }

    async fn detect_features(
        &self,
    ) -> Result<
        (
            QemuFeatures,
            BTreeSet<MigrationCapability>,
            BTreeSet<MigrationCapability>,
        ),
        EngineError,
    > {
        let src = self.source.supported_capabilities().await?;
        let dst_facts = self.destination.facts().await?;
        let dst = dst_facts.capabilities.clone();
        let both: BTreeSet<MigrationCapability> = src.intersection(&dst).cloned().collect();
        let src_cmds = command_names(&self.source).await;
        let dst_cmds = dst_facts.commands.clone();
        let has = |c: MigrationCapability| both.contains(&c);
        let multifd_with_postcopy =
            self.source.qemu_version().at_least(10, 1) && dst_facts.version >= (10, 1);
        let features = QemuFeatures {
            postcopy_ram: has(MigrationCapability::PostcopyRam),
            postcopy_preempt: has(MigrationCapability::PostcopyPreempt),
            postcopy_recovery: src_cmds.contains("migrate-pause")
                && dst_cmds.contains("migrate-recover"),
            auto_converge: src.contains(&MigrationCapability::AutoConverge),
            dirty_limit: src.contains(&MigrationCapability::DirtyLimit)
                && src_cmds.contains("set-vcpu-dirty-limit")
                && capability_accepted(&self.source, MigrationCapability::DirtyLimit).await,
            multifd: has(MigrationCapability::Multifd),
            multifd_with_postcopy,
            xbzrle: src.contains(&MigrationCapability::Xbzrle),
            calc_dirty_rate: src_cmds.contains("calc-dirty-rate"),
        };
        Ok((features, src, dst))
    }

    async fn prepare(&mut self) -> Result<(), EngineError> {
        let (features, src_supported, dst_supported) = self.detect_features().await?;
        let mut input = self.setup.plan_input.clone();
        input.features = features;
        // Safety gate: a paused guest must not be migrated post-copy (Nova LP#1671011: the
        // destination would start a guest the operator stopped).
        if let Ok(st) = self.source.query_status().await
            && !st.running
            && input.vm.post_copy == tern_policy::PostCopyPermission::Allowed
        {
            input.vm.post_copy = tern_policy::PostCopyPermission::Forbidden;
            self.record(MigrationEventKind::Note {
                text: format!(
                    "the guest is {} on the source: post-copy refused for this migration",
                    st.status.as_str()
                ),
            });
        }
        // Safety gate: no post-copy with a VFIO device (state in host hardware that cannot be
        // fetched page by page; Nova forbids post-copy with PCI passthrough too). A QEMU
        // that cannot list its devices is treated as having one.
        if input.vm.post_copy == tern_policy::PostCopyPermission::Allowed {
            let refused = match self.source.vfio_devices().await {
                Ok(devs) if devs.is_empty() => None,
                Ok(devs) => Some(format!(
                    "VFIO device(s) on the source: {}: post-copy refused for this migration",
                    devs.join(", ")
                )),
                Err(e) => Some(format!(
                    "cannot list the guest's devices to rule out VFIO ({e}): post-copy refused \
                     for this migration"
                )),
            };
            if let Some(text) = refused {
                input.vm.post_copy = tern_policy::PostCopyPermission::Forbidden;
                self.record(MigrationEventKind::Note { text });
            }
        }
        if self.setup.probe_seconds > 0 && features.calc_dirty_rate {
            match probe_dirty_rate(&self.source, self.setup.probe_seconds).await {
                Ok(p) => input.probe = Some(p),
                Err(e) => self.record(MigrationEventKind::Note {
                    text: format!("dirty-rate probe failed, planning without it: {e}"),
                }),
            }
        }
        let plan = self.policy.plan(&input);
        self.record(MigrationEventKind::Note {
            text: format!(
                "plan by {}: post-copy {} ({}); {}",
                plan.policy,
                if plan.may_switch_to_postcopy() {
                    "permitted"
                } else {
                    "not permitted"
                },
                plan.post_copy.reason,
                plan.reasons.join("; ")
            ),
        });
        // Capabilities: the post-copy family and multifd on both ends, the rest source-only.
        let caps = &plan.capabilities;
        let both_sides = [
            (MigrationCapability::PostcopyRam, caps.postcopy_ram),
            (MigrationCapability::PostcopyPreempt, caps.postcopy_preempt),
            (MigrationCapability::Multifd, caps.multifd),
        ];
        let source_only = [
            (MigrationCapability::Events, true),
            (MigrationCapability::AutoConverge, caps.auto_converge),
            (MigrationCapability::DirtyLimit, caps.dirty_limit),
            (MigrationCapability::Xbzrle, caps.xbzrle),
        ];
        // Every capability tern manages is set explicitly, off as well as on: a QEMU that
        // arrived by an earlier migration still carries that migration's capabilities, and a
        // mismatch between the two ends fails the stream ("Sibling indicated error").
        let src_caps: Vec<MigrationCapabilityStatus> = both_sides
            .iter()
            .chain(source_only.iter())
            .filter(|(c, on)| *on || src_supported.contains(c))
            .map(|(c, on)| MigrationCapabilityStatus::new(c.clone(), *on))
            .collect();
        let dst_caps: Vec<MigrationCapabilityStatus> = both_sides
            .iter()
            .chain([(MigrationCapability::Events, true)].iter())
            .filter(|(c, on)| *on || dst_supported.contains(c))
            .map(|(c, on)| MigrationCapabilityStatus::new(c.clone(), *on))
            .collect();
        self.source.migrate_set_capabilities(&src_caps).await?;
        self.destination.set_capabilities(&dst_caps).await?;
        let used: Vec<String> = src_caps
            .iter()
            .filter(|c| c.state)
            .map(|c| c.capability.as_str().to_string())
            .collect();
        self.record(MigrationEventKind::Note {
            text: format!("capabilities enabled: {}", used.join(", ")),
        });

        let p = &plan.parameters;
        let mut src_params = MigrationParameters {
            downtime_limit: Some(p.downtime_limit_ms),
            max_bandwidth: Some(p.max_bandwidth_bytes_per_s),
            ..Default::default()
        };
        if caps.auto_converge {
            src_params.cpu_throttle_initial = Some(p.cpu_throttle_initial_pct as u64);
            src_params.cpu_throttle_increment = Some(p.cpu_throttle_increment_pct as u64);
            src_params.max_cpu_throttle = Some(p.max_cpu_throttle_pct as u64);
        }
        if caps.xbzrle {
            if let Some(c) = p.xbzrle_cache_bytes {
                src_params.xbzrle_cache_size = Some(c);
            }
        }
        if p.max_postcopy_bandwidth_bytes_per_s > 0 {
            src_params.max_postcopy_bandwidth = Some(p.max_postcopy_bandwidth_bytes_per_s);
        }
        if caps.multifd {
            src_params.multifd_channels = Some(p.multifd_channels as u64);
            let dst_params = MigrationParameters {
                multifd_channels: Some(p.multifd_channels as u64),
                ..Default::default()
            };
            self.destination.set_parameters(&dst_params).await?;
        }
        self.source.migrate_set_parameters(&src_params).await?;
        self.plan = Some(plan);

        self.destination.migrate_incoming(&self.setup.uri).await?;
        self.started = Instant::now();
        self.source.migrate(&self.setup.uri).await?;
        self.transition(
            MigrationState::Precopy,
            format!("migration stream started to {}", self.setup.uri),
        );
        Ok(())
    }

    async fn monitor(&mut self, control: &mut mpsc::Receiver<OperatorRequest>) {
        let mut events = self.source.subscribe_events();
        let mut ticker = tokio::time::interval(self.setup.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pass = 0u64;
        let mut control_open = true;
        while !self.state.is_terminal() {
            let mut pass_event = false;
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) => match ev.kind {
                        QmpEventKind::MigrationPass { .. } => pass_event = true,
                        QmpEventKind::Migration { .. } | QmpEventKind::Stop | QmpEventKind::Resume => {}
                        _ => continue,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        // QMP connection gone: the source QEMU exited. Poll once more below,
                        // which fails and ends the migration.
                    }
                },
                _ = ticker.tick() => {}
                req = control.recv(), if control_open => match req {
                    Some(req) => { self.operator(req).await; continue; }
                    None => { control_open = false; continue; }
                },
            }
            let info = match self.source.query_migrate().await {
                Ok(i) => i,
                Err(e) => {
                    self.source_unreachable(&e.to_string()).await;
                    continue;
                }
            };
            let status = info.status_or_none();
            let sample = self.sample_from(&info);
            self.publish_progress(&info, &sample);
            self.last_info = Some(info.clone());
            if self.handle_status(&status, &info).await {
                continue;
            }
            if self.state.is_after_switch() {
                self.watch_postcopy(&status, &sample).await;
                continue;
            }
            // dirty-sync-count is 1 during the first pass and grows by one at each boundary; the
            // MIGRATION_PASS event only makes us look sooner.
            let _ = pass_event;
            let obs = if sample.pass > last_pass.max(1) {
                last_pass = sample.pass;
                self.record(MigrationEventKind::Pass {
                    pass: sample.pass,
                    remaining_bytes: sample.remaining_bytes,
                    transferred_bytes: sample.transferred_bytes,
                    dirty_bytes_per_s: sample.dirty_bytes_per_s() as u64,
                    throughput_bytes_per_s: sample.throughput_bytes_per_s,
                    expected_downtime_ms: sample.expected_downtime_ms,
                    throttle_pct: sample.throttle_pct,
                });
                Observation::PassCompleted(sample)
            } else {
                Observation::Tick {
                    at_ms: sample.at_ms,
                    latest: Some(sample),
                }
            };
            if matches!(self.state, MigrationState::Precopy) {
                let Some(plan) = self.plan.clone() else {
                    continue;
                };
                let decisions = self.policy.decide(&plan, &obs);
                for d in decisions {
                    self.execute(d, matches!(obs, Observation::PassCompleted(_)))
                        .await;
                    if self.state != MigrationState::Precopy {
                        break;
                    }
                }
            }
        }
    }

    fn sample_from(&self, info: &MigrationInfo) -> IterationSample {
        let ram = info.ram.clone().unwrap_or_default();
        let phase = match info.status_or_none() {
            MigrationStatus::Active if self.paused_guest => Phase::PausedPrecopy,
            MigrationStatus::Active | MigrationStatus::Device => Phase::Precopy,
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => Phase::Postcopy,
            MigrationStatus::PostcopyPaused => Phase::PostcopyPaused,
            MigrationStatus::Completed => Phase::Completed,
            MigrationStatus::Failed | MigrationStatus::Cancelled => Phase::Failed,
            _ => Phase::Setup,
        };
        IterationSample {
            at_ms: self.elapsed_ms(),
            pass: ram.dirty_sync_count.unwrap_or(0),
            transferred_bytes: ram.transferred.unwrap_or(0),
            remaining_bytes: ram.remaining.unwrap_or(0),
            total_bytes: ram.total.unwrap_or(0),
            dirty_pages_rate: ram.dirty_pages_rate.unwrap_or(0),
            page_size: ram.page_size.unwrap_or(4096),
            throughput_bytes_per_s: (ram.mbps.unwrap_or(0.0) * 1e6 / 8.0) as u64,
            expected_downtime_ms: info.expected_downtime,
            throttle_pct: info.cpu_throttle_percentage.map(|p| p.min(100) as u8),
            phase,
        }
    }

    fn publish_progress(&self, info: &MigrationInfo, s: &IterationSample) {
        // The policy's model predicts the finish when it has one (ours does; baselines
        // don't); otherwise a naive remaining / (throughput − dirty rate).
        let model_eta = self
            .policy
            .eta()
            .and_then(|e| e.finish_at_ms)
            .map(|f| f.saturating_sub(s.at_ms));
        let naive_eta = if s.throughput_bytes_per_s > 0 && s.remaining_bytes > 0 {
            let dirty = s.dirty_bytes_per_s() as u64;
            if matches!(s.phase, Phase::Postcopy) || dirty < s.throughput_bytes_per_s {
                let net = if matches!(s.phase, Phase::Postcopy) {
                    s.throughput_bytes_per_s
                } else {
                    s.throughput_bytes_per_s - dirty
                };
                Some(s.remaining_bytes.saturating_mul(1000) / net.max(1))
            } else {
                None
            }
        } else {
            None
        };
        let eta_ms = model_eta.or(naive_eta);
        let status = info.status_or_none();
        self.progress_tx.send_modify(|p| {
            p.qemu_status = status.as_str().to_string();
            p.elapsed_ms = s.at_ms;
            p.transferred_bytes = s.transferred_bytes;
            p.remaining_bytes = s.remaining_bytes;
            p.total_bytes = s.total_bytes;
            p.dirty_bytes_per_s = s.dirty_bytes_per_s() as u64;
            p.throughput_bytes_per_s = s.throughput_bytes_per_s;
            p.pass = s.pass;
            p.eta_ms = eta_ms;
        });
    }

    /// Reacts to QEMU's status. Returns true when the state became terminal.
    async fn handle_status(&mut self, status: &MigrationStatus, info: &MigrationInfo) -> bool {
        match status {
            MigrationStatus::PostcopyActive if self.state == MigrationState::Precopy => {
                self.switched = true;
                self.transition(
                    MigrationState::Postcopy,
                    "QEMU reports postcopy-active: the guest now runs on the destination",
                );
            }
            MigrationStatus::PostcopyActive if self.state == MigrationState::Recovering => {
                self.recovery.recoveries += 1;
                let outage = self
                    .recovery
                    .paused_since
                    .take()
                    .map(|t| t.elapsed().as_millis())
                    .unwrap_or(0);
                self.recovery.attempt_started = None;
                self.recovery.last_progress = None;
                self.transition(
                    MigrationState::Postcopy,
                    format!(
                        "post-copy recovered after {outage} ms and {} attempt(s) (recovery #{})",
                        self.recovery.attempts, self.recovery.recoveries
                    ),
                );
            }
            MigrationStatus::PostcopyPaused
                if matches!(
                    self.state,
                    MigrationState::Postcopy | MigrationState::Recovering
                ) =>
            {
                let first = self.recovery.paused_since.is_none();
                if first {
                    self.recovery.paused_since = Some(Instant::now());
                    self.recovery.backoff = RECOVERY_BACKOFF_MIN;
                    self.recovery.next_attempt = Some(Instant::now());
                    self.recovery.attempts = 0;
                } else {
                    self.schedule_retry();
                }
                self.recovery.attempt_started = None;
                self.transition(
                    MigrationState::PostcopyPaused,
                    if first {
                        "the migration channel broke during post-copy; both QEMUs wait in \
                         postcopy-paused and the guest keeps running on the destination"
                    } else {
                        "the recovery attempt failed; retrying"
                    },
                );
            }
            MigrationStatus::Completed => {
                self.complete().await;
                return true;
            }
            MigrationStatus::Failed => {
                let why = info
                    .error_desc
                    .clone()
                    .unwrap_or_else(|| "QEMU reported failed".to_string());
                self.error = Some(why.clone());
                if self.state.is_after_switch() {
                    self.transition(
                        MigrationState::Lost,
                        format!("failed after the switch: {why}"),
                    );
                } else if self.abort_requested {
                    // `migrate_cancel` tears the socket down; QEMU may report that as
                    // `failed` ("Broken pipe") rather than `cancelled`. It was our abort.
                    self.resume_source_if_paused().await;
                    self.transition(
                        MigrationState::Aborted,
                        format!(
                            "aborted as requested; the guest keeps running on the source (QEMU: {why})"
                        ),
                    );
                } else {
                    self.resume_source_if_paused().await;
                    self.transition(
                        MigrationState::Failed,
                        format!(
                            "failed before the switch, the guest keeps running on the source: {why}"
                        ),
                    );
                }
                return true;
            }
            MigrationStatus::Cancelled => {
                self.resume_source_if_paused().await;
                self.transition(
                    MigrationState::Aborted,
                    "cancelled; the guest keeps running on the source",
                );
                return true;
            }
            _ => {}
        }
        false
    }

    fn schedule_retry(&mut self) {
        let b = self.recovery.backoff.max(RECOVERY_BACKOFF_MIN);
        self.recovery.next_attempt = Some(Instant::now() + b);
        self.recovery.backoff = (b * 2).min(RECOVERY_BACKOFF_MAX);
    }

    /// After the switch: detect a dead channel QEMU has not noticed, and recover a paused one.
    ///
    /// QEMU only enters `postcopy-paused` when a socket errors out; a silently dropped
    /// network (no RST, no carrier change) can leave both sides in `postcopy-active` for
    /// minutes while TCP retransmits (qemu-devel, Sept 2025: "QEMU would stay in
    /// postcopy-active waiting for pages indefinitely"). tern watches the bytes sent instead
    /// and forces both sides into `postcopy-paused` with `migrate-pause` when nothing moved
    /// for `postcopy_stall_timeout` while pages remain. Recovery is then QEMU's own protocol:
    /// `migrate-recover` on the destination, `migrate resume=true` on the source, retried
    /// with backoff until the recovery window ends.
    async fn watch_postcopy(&mut self, status: &MigrationStatus, sample: &IterationSample) {
        match self.state {
            MigrationState::Postcopy => {
                let now = Instant::now();
                let moved = match self.recovery.last_progress {
                    Some((t, _)) => sample.transferred_bytes > t,
                    None => true,
                };
                if moved {
                    self.recovery.last_progress = Some((sample.transferred_bytes, now));
                    return;
                }
                let since = self.recovery.last_progress.map(|(_, at)| at).unwrap_or(now);
                if *status == MigrationStatus::PostcopyActive
                    && sample.remaining_bytes > 0
                    && since.elapsed() >= self.setup.postcopy_stall_timeout
                {
                    self.record(MigrationEventKind::Note {
                        text: format!(
                            "post-copy stalled: no bytes sent for {} ms with {} bytes left; \
                             forcing migrate-pause on both sides",
                            since.elapsed().as_millis(),
                            sample.remaining_bytes
                        ),
                    });
                    let _ = self.source.migrate_pause().await;
                    let _ = self.destination.migrate_pause().await;
                    self.recovery.last_progress = None;
                }
            }
            MigrationState::PostcopyPaused => {
                let since = self.recovery.paused_since.unwrap_or_else(Instant::now);
                if since.elapsed() > self.setup.recovery_window {
                    self.error = Some(format!(
                        "post-copy stayed paused for {} s (recovery window {} s)",
                        since.elapsed().as_secs(),
                        self.setup.recovery_window.as_secs()
                    ));
                    self.transition(
                        MigrationState::Stranded,
                        format!(
                            "the network did not come back within the recovery window ({} s): \
                             both QEMUs are kept paused and the guest's current state is split \
                             between them. Once the network is back, recover with \
                             `migrate-recover {uri}` on the destination and `migrate \
                             uri={uri} resume=true` on the source; do not resume or kill \
                             either QEMU",
                            self.setup.recovery_window.as_secs(),
                            uri = self.setup.uri
                        ),
                    );
                    return;
                }
                if self
                    .recovery
                    .next_attempt
                    .is_some_and(|t| Instant::now() >= t)
                {
                    self.attempt_recovery().await;
                }
            }
            MigrationState::Recovering => {
                let started = self.recovery.attempt_started.unwrap_or_else(Instant::now);
                if started.elapsed() > RECOVERY_ATTEMPT_TIMEOUT
                    && !matches!(status, MigrationStatus::PostcopyActive)
                {
                    self.record(MigrationEventKind::Note {
                        text: format!(
                            "recovery attempt {} still in {} after {} ms: pausing it to retry",
                            self.recovery.attempts,
                            status.as_str(),
                            started.elapsed().as_millis()
                        ),
                    });
                    let _ = self.source.migrate_pause().await;
                    self.recovery.attempt_started = Some(Instant::now());
                    self.schedule_retry();
                }
            }
            _ => {}
        }
    }

    async fn attempt_recovery(&mut self) {
        self.recovery.attempts += 1;
        let n = self.recovery.attempts;
        // The destination must be in postcopy-paused too before it can listen again.
        match self.destination.migration_info().await {
            Ok(i) if i.status_or_none() == MigrationStatus::PostcopyActive => {
                let _ = self.destination.migrate_pause().await;
                self.schedule_retry();
                return;
            }
            Ok(_) => {}
            Err(e) => {
                self.error = Some(format!("destination unreachable during post-copy: {e}"));
                self.transition(
                    MigrationState::Lost,
                    format!(
                        "the destination QEMU is gone during post-copy: the guest's current \
                         state (vCPUs, devices, pages written since the switch) died with it; \
                         the source still holds the pre-switch memory but not that state, so \
                         the guest must be restarted ({e})"
                    ),
                );
                return;
            }
        }
        if let Err(e) = self.destination.migrate_recover(&self.setup.uri).await {
            self.record(MigrationEventKind::Note {
                text: format!("recovery attempt {n}: migrate-recover on the destination: {e}"),
            });
        }
        match self.source.migrate_resume(&self.setup.uri).await {
            Ok(()) => {
                self.recovery.attempt_started = Some(Instant::now());
                self.transition(
                    MigrationState::Recovering,
                    format!(
                        "recovery attempt {n}: migrate-recover on the destination, migrate \
                         resume on the source"
                    ),
                );
            }
            Err(e) => {
                self.record(MigrationEventKind::Note {
                    text: format!("recovery attempt {n}: migrate resume failed: {e}"),
                });
                self.schedule_retry();
            }
        }
    }

    async fn complete(&mut self) {
        // Final numbers: re-query once (QEMU 7.2 could return zeros right after completion).
        if let Ok(i) = self.source.query_migrate().await
            && i.ram.as_ref().and_then(|r| r.transferred).unwrap_or(0) > 0
        {
            self.last_info = Some(i);
        }
        // The destination keeps the source's run state (QEMU's global-state section): a guest
        // paused to force completion arrives paused, and must be resumed there.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.destination.run_state().await {
                Ok(s) if s.running => break,
                Ok(s) if matches!(s.status, RunState::InMigrate | RunState::FinishMigrate) => {}
                Ok(s) => {
                    if let Err(e) = self.destination.cont().await {
                        self.record(MigrationEventKind::Note {
                            text: format!(
                                "cont on the destination (state {}) failed: {e}",
                                s.status.as_str()
                            ),
                        });
                    } else {
                        self.record(MigrationEventKind::Note {
                            text: format!(
                                "destination arrived {}; resumed it with cont",
                                s.status.as_str()
                            ),
                        });
                    }
                }
                Err(e) => {
                    self.error = Some(format!("destination unreachable after completion: {e}"));
                    self.transition(
                        MigrationState::Lost,
                        "the destination QEMU is gone after the source handed over",
                    );
                    return;
                }
            }
            if Instant::now() > deadline {
                self.record(MigrationEventKind::Note {
                    text: "destination did not report running within 30 s".into(),
                });
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.transition(
            MigrationState::Completed,
            "QEMU reports completed and the guest runs on the destination",
        );
    }

    async fn resume_source_if_paused(&mut self) {
        if self.paused_guest {
            match self.source.cont().await {
                Ok(()) => {
                    self.paused_guest = false;
                    self.record(MigrationEventKind::Note {
                        text: "resumed the guest on the source".into(),
                    });
                }
                Err(e) => self.record(MigrationEventKind::Note {
                    text: format!("could not resume the guest on the source: {e}"),
                }),
            }
        }
    }

    async fn source_unreachable(&mut self, err: &str) {
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

    /// Executes one policy decision. `log_continue` records `Continue` decisions (only those
    /// made at pass boundaries, to keep the log readable).
    async fn execute(&mut self, d: Decision, log_continue: bool) {
        let Decision { action, reason } = d;
        let result = match action {
            Action::Continue => {
                if log_continue && !reason.is_empty() {
                    self.record(MigrationEventKind::Decision {
                        action: "continue".into(),
                        reason,
                    });
                }
                return;
            }
            Action::SetDowntimeLimit { ms } => {
                self.take_action(&format!("set-downtime-limit {ms} ms"), &reason);
                self.source
                    .migrate_set_parameters(&MigrationParameters {
                        downtime_limit: Some(ms.clamp(1, 2_000_000)),
                        ..Default::default()
                    })
                    .await
            }
            Action::SetBandwidth { bytes_per_s } => {
                self.take_action(&format!("set-bandwidth {bytes_per_s} B/s"), &reason);
                self.source
                    .migrate_set_parameters(&MigrationParameters {
                        max_bandwidth: Some(bytes_per_s),
                        ..Default::default()
                    })
                    .await
            }
            Action::SetCpuThrottle {
                initial_pct,
                increment_pct,
                max_pct,
            } => {
                self.take_action(
                    &format!("set-cpu-throttle {initial_pct}/{increment_pct}/{max_pct} %"),
                    &reason,
                );
                self.source
                    .migrate_set_parameters(&MigrationParameters {
                        cpu_throttle_initial: Some(initial_pct as u64),
                        cpu_throttle_increment: Some(increment_pct as u64),
                        max_cpu_throttle: Some(max_pct as u64),
                        ..Default::default()
                    })
                    .await
            }
            Action::SetDirtyLimit { mb_per_s } => {
                self.take_action(&format!("set-dirty-limit {mb_per_s} MB/s"), &reason);
                self.source
                    .execute_raw(
                        "migrate-set-parameters",
                        serde_json::json!({ "vcpu-dirty-limit": mb_per_s }),
                    )
                    .await
                    .map(|_| ())
            }
            Action::SwitchToPostcopy => {
                let allowed = self
                    .plan
                    .as_ref()
                    .is_some_and(|p| p.may_switch_to_postcopy());
                if !allowed {
                    // Defence in depth: the policy core guarantees this never happens.
                    self.record(MigrationEventKind::Note {
                        text: format!(
                            "refused a switch to post-copy the plan does not permit ({reason})"
                        ),
                    });
                    return;
                }
                self.take_action("switch-to-postcopy", &reason);
                self.source.migrate_start_postcopy().await
            }
            Action::PauseGuest => {
                self.take_action("pause-guest", &reason);
                let r = self.source.stop().await;
                if r.is_ok() {
                    self.paused_guest = true;
                    self.transition(MigrationState::GuestPaused, reason.clone());
                }
                r
            }
            Action::Abort => {
                self.take_action("abort", &reason);
                let r = self.source.migrate_cancel().await;
                self.abort_requested |= r.is_ok();
                r
            }
        };
        if let Err(e) = result {
            self.record(MigrationEventKind::Note {
                text: format!("QMP refused the action: {e}"),
            });
        }
    }

    async fn operator(&mut self, req: OperatorRequest) {
        let OperatorRequest { command, reply } = req;
        let answer = match command {
            OperatorCommand::Abort => {
                if self.state.is_after_switch() {
                    Err(format!(
                        "cannot abort: the migration is in {} and the destination holds the only \
                         current copy of the guest; it can only complete (or be recovered)",
                        self.state
                    ))
                } else if self.state.is_terminal() {
                    Err(format!("the migration already ended ({})", self.state))
                } else {
                    self.take_action("abort", "operator requested abort");
                    match self.source.migrate_cancel().await {
                        Ok(()) => {
                            self.abort_requested = true;
                            Ok("abort requested; the guest stays on the source".to_string())
                        }
                        Err(e) => Err(format!("QEMU refused migrate_cancel: {e}")),
                    }
                }
            }
            OperatorCommand::ForceComplete => match self.state {
                MigrationState::Precopy => {
                    let post = self
                        .plan
                        .as_ref()
                        .is_some_and(|p| p.may_switch_to_postcopy());
                    if post {
                        self.take_action(
                            "switch-to-postcopy",
                            "operator requested force-complete; post-copy is permitted",
                        );
                        match self.source.migrate_start_postcopy().await {
                            Ok(()) => Ok("switching to post-copy".to_string()),
                            Err(e) => Err(format!("QEMU refused migrate-start-postcopy: {e}")),
                        }
                    } else {
                        let why = self
                            .plan
                            .as_ref()
                            .map(|p| p.post_copy.reason.clone())
                            .unwrap_or_default();
                        let reason = format!(
                            "operator requested force-complete; post-copy not permitted ({why}): \
                             pausing the guest until the copy finishes"
                        );
                        self.execute(Decision::new(Action::PauseGuest, reason), true)
                            .await;
                        Ok("guest paused; the copy will finish and the guest resumes on the destination".to_string())
                    }
                }
                s => Err(format!(
                    "force-complete applies during pre-copy; the migration is {s}"
                )),
            },
            OperatorCommand::SetBandwidth { bytes_per_s } => {
                if self.state.is_terminal() {
                    Err(format!("the migration already ended ({})", self.state))
                } else {
                    self.take_action(
                        &format!("set-bandwidth {bytes_per_s} B/s"),
                        "operator changed the bandwidth",
                    );
                    let params = MigrationParameters {
                        max_bandwidth: Some(bytes_per_s),
                        max_postcopy_bandwidth: if self.state.is_after_switch() {
                            Some(bytes_per_s)
                        } else {
                            None
                        },
                        ..Default::default()
                    };
                    match self.source.migrate_set_parameters(&params).await {
                        Ok(()) => Ok(format!("bandwidth set to {bytes_per_s} B/s")),
                        Err(e) => Err(format!("QEMU refused the bandwidth: {e}")),
                    }
                }
            }
        };
        self.record(MigrationEventKind::Operator {
            command: serde_json::to_string(&command).unwrap_or_default(),
            result: match &answer {
                Ok(s) => format!("accepted: {s}"),
                Err(s) => format!("refused: {s}"),
            },
        });
        let _ = reply.send(answer);
    }

    fn report(&self) -> MigrationReport {
        let ram = self
            .last_info
            .as_ref()
            .and_then(|i| i.ram.clone())
            .unwrap_or_default();
        let caps = self
            .plan
            .as_ref()
            .map(|p| {
                let c = &p.capabilities;
                [
                    ("postcopy-ram", c.postcopy_ram),
                    ("postcopy-preempt", c.postcopy_preempt),
                    ("auto-converge", c.auto_converge),
                    ("dirty-limit", c.dirty_limit),
                    ("multifd", c.multifd),
                    ("xbzrle", c.xbzrle),
                ]
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(n, _)| n.to_string())
                .collect()
            })
            .unwrap_or_default();
        MigrationReport {
            id: self.setup.id.clone(),
            policy: self.policy.name().to_string(),
            state: self.state,
            switched_to_postcopy: self.switched,
            paused_guest: self.paused_guest
                || self.actions.iter().any(|a| a.action == "pause-guest"),
            total_time_ms: self
                .events
                .iter()
                .rev()
                .find(|e| matches!(e.kind, MigrationEventKind::State { .. }))
                .map(|e| e.at_ms)
                .unwrap_or(0),
            bytes_sent: ram.transferred.unwrap_or(0),
            ram_bytes: ram.total.unwrap_or(0),
            passes: self
                .events
                .iter()
                .filter_map(|e| match e.kind {
                    MigrationEventKind::Pass { pass, .. } => Some(pass),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
                .max(ram.dirty_sync_count.unwrap_or(0)),
            qemu_downtime_ms: self.last_info.as_ref().and_then(|i| i.downtime),
            capabilities: caps,
            post_copy_verdict: self
                .plan
                .as_ref()
                .map(|p| p.post_copy.reason.clone())
                .unwrap_or_default(),
            actions: self.actions.clone(),
            events: self.events.clone(),
            error: self.error.clone(),
            recoveries: self.recovery.recoveries,
            plan: self.plan.clone(),
        }
    }
}

/// Whether QEMU accepts enabling `cap` now. Some capabilities are listed by
/// `query-migrate-capabilities` but refused at run time: `dirty-limit` needs KVM with a dirty
/// ring, which TCG guests (and KVM without `dirty-ring-size`) do not have. The probe switches
/// the capability off again.
async fn capability_accepted(qmp: &QmpClient, cap: MigrationCapability) -> bool {
    let on = [MigrationCapabilityStatus::new(cap.clone(), true)];
    if qmp.migrate_set_capabilities(&on).await.is_err() {
        return false;
    }
    let off = [MigrationCapabilityStatus::new(cap, false)];
    let _ = qmp.migrate_set_capabilities(&off).await;
    true
}

/// Measures the guest's dirty rate with QEMU's `calc-dirty-rate` (page-sampling mode) before a
/// migration starts; the policy's pre-flight estimate uses it.
///
/// KubeVirt #17504 warns that such a probe contends with an ongoing migration's dirty
/// tracking, so it is only ever run before `migrate`.
pub async fn probe_dirty_rate(
    qmp: &QmpClient,
    seconds: u64,
) -> Result<tern_policy::DirtyRateProbe, EngineError> {
    qmp.execute_raw(
        "calc-dirty-rate",
        serde_json::json!({ "calc-time": seconds }),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(seconds + 5);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let v = qmp
            .execute_raw("query-dirty-rate", serde_json::json!({}))
            .await?;
        if v.get("status").and_then(|s| s.as_str()) == Some("measured") {
            let mb_per_s = v.get("dirty-rate").and_then(|d| d.as_u64()).unwrap_or(0);
            return Ok(tern_policy::DirtyRateProbe {
                period_ms: seconds * 1000,
                dirty_bytes_per_s: mb_per_s * 1024 * 1024,
            });
        }
        if Instant::now() > deadline {
            return Err(EngineError::Probe(format!(
                "calc-dirty-rate did not finish within {} s",
                seconds + 5
            )));
        }
    }
}
