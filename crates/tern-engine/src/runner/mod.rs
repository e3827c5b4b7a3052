//! Running one migration: the only place where policy decisions become QMP calls.
//!
//! The runner is given the source QEMU and the destination QEMU (started with
//! `-incoming defer`) as two endpoints ([`SourceEndpoint`], [`DestinationEndpoint`]), a policy
//! and the plan input. It detects what both QEMUs
//! support, asks the policy for a plan, sets capabilities and parameters on both ends,
//! starts the stream, then feeds the policy with samples at pass boundaries (QEMU's
//! `MIGRATION_PASS` event, confirmed by `dirty-sync-count`) and with periodic ticks, and
//! executes what it answers. Operators can force completion, abort or change bandwidth
//! mid-flight.
//!
//! Decisions are made on completed passes, not on raw polls: Nova removed its 2016 automatic
//! post-copy switch because per-poll sampling of a saw-tooth `remaining` looked like no
//! progress (LP#1644248).
//!
//! After the switch to post-copy, decisions come from the pure [`PostcopySupervisor`]
//! (stall → `migrate-pause`, recovery with backoff, the recovery window); the runner only
//! executes them. The runner's parts, by role: `prepare` (features, plan, capabilities,
//! `migrate`), `monitor` (the loop, policy decisions), `postcopy` (supervisor actions),
//! `completion` (the end states), `operator` (commands from operators), `adopt` (taking over
//! a migration after an agent restart).

mod adopt;
pub use adopt::AdoptedMigration;
mod completion;
mod monitor;
mod operator;
mod postcopy;
mod prepare;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_policy::{MigrationPlan, MigrationPolicy, PlanInput, PostcopySupervisor, PostcopyTimings};
use tern_qmp::MigrationInfo;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::EngineError;
use crate::endpoint::{DestinationEndpoint, SourceEndpoint};
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
    /// Encrypt the stream (source side; the destination QEMU's TLS is set by the host that
    /// started it, from its own configuration). `None` sends plain text.
    pub tls: Option<SourceStreamTls>,
}

/// The source half of an encrypted migration stream: QEMU's `tls-creds` and `tls-hostname`
/// parameters (qapi/migration.json). The same parameters serve the post-copy return path,
/// preempt channel, multifd channels and recovery channels: QEMU opens them all with the
/// migration's TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStreamTls {
    /// Id of the source QEMU's `tls-creds-x509` object with `endpoint=client`.
    pub creds_id: String,
    /// The name the destination's certificate must carry (its host name).
    pub destination_host: String,
}

impl MigrationSetup {
    /// The post-copy supervisor's time constants for this setup.
    pub fn postcopy_timings(&self) -> PostcopyTimings {
        PostcopyTimings {
            stall_timeout_ms: self.postcopy_stall_timeout.as_millis() as u64,
            recovery_window_ms: self.recovery_window.as_millis() as u64,
            ..PostcopyTimings::default()
        }
    }

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
            tls: None,
        }
    }
}

/// Default post-copy recovery window: generous, a network outage of minutes is survivable.
pub const DEFAULT_RECOVERY_WINDOW: Duration =
    Duration::from_millis(tern_policy::DEFAULT_RECOVERY_WINDOW_MS);
/// Default post-copy stall timeout.
pub const DEFAULT_POSTCOPY_STALL_TIMEOUT: Duration =
    Duration::from_millis(tern_policy::DEFAULT_POSTCOPY_STALL_TIMEOUT_MS);

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
    /// Whether the stream was TLS (QEMU `tls-creds` on both ends). A TLS stream cannot fall
    /// back to plain text: a handshake failure fails the migration before the switch.
    #[serde(default)]
    pub stream_encrypted: bool,
}

/// Drives one migration from prepare to a terminal state.
pub struct MigrationRunner {
    source: Box<dyn SourceEndpoint>,
    destination: Box<dyn DestinationEndpoint>,
    policy: Box<dyn MigrationPolicy + Send>,
    setup: MigrationSetup,
    started: Instant,
    /// Added to every event time: a migration adopted after an agent restart keeps counting
    /// from its original start.
    elapsed_offset_ms: u64,
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
    /// Post-copy decisions; created at the switch (or at adoption past it).
    supervisor: Option<PostcopySupervisor>,
    /// Recoveries counted before this runner (adoption) plus the supervisor's.
    recoveries_before: u32,
    /// An abort was requested (by the policy or an operator) and QEMU accepted it.
    abort_requested: bool,
    /// Set when an adopted pre-copy was cancelled: it ends `failed` with this reason (the
    /// migration did not end as anyone asked), not `aborted`.
    adoption_cancel: Option<String>,
    /// When (elapsed ms) `migrate-pause` was last sent to the destination: a second one must
    /// not follow while the first is still taking effect (see `postcopy::pause_destination`).
    destination_paused_at_ms: Option<u64>,
    /// The destination did not answer its last in-band query in post-copy (agent away, or
    /// its main loop blocked): recovery goes straight to the out-of-band `migrate-recover`.
    destination_silent: bool,
}

impl MigrationRunner {
    /// A runner for one migration. `source` is usually a [`tern_qmp::QmpClient`].
    pub fn new(
        source: impl SourceEndpoint + 'static,
        destination: Box<dyn DestinationEndpoint>,
        policy: Box<dyn MigrationPolicy + Send>,
        setup: MigrationSetup,
    ) -> Self {
        let (progress_tx, progress_rx) = watch::channel(MigrationProgress::default());
        Self {
            source: Box::new(source),
            destination,
            policy,
            setup,
            started: Instant::now(),
            elapsed_offset_ms: 0,
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
            supervisor: None,
            recoveries_before: 0,
            abort_requested: false,
            adoption_cancel: None,
            destination_paused_at_ms: None,
            destination_silent: false,
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
        self.elapsed_offset_ms + self.started.elapsed().as_millis() as u64
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

    fn note(&mut self, text: impl Into<String>) {
        self.record(MigrationEventKind::Note { text: text.into() });
    }

    fn transition(&mut self, to: MigrationState, reason: impl Into<String>) {
        let from = self.state;
        if from == to {
            return;
        }
        let reason = reason.into();
        if !from.can_become(to) {
            // Never silently break the state machine: record the anomaly and follow reality.
            self.note(format!("unexpected transition {from} -> {to}: {reason}"));
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
    /// (state `failed`/`lost`/`unknown`), not as `Err`, so callers always learn where the
    /// guest is.
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

    fn recoveries(&self) -> u32 {
        self.recoveries_before + self.supervisor.as_ref().map_or(0, |s| s.recoveries())
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
            recoveries: self.recoveries(),
            plan: self.plan.clone(),
            stream_encrypted: self.setup.tls.is_some(),
        }
    }
}

/// Measures the guest's dirty rate with QEMU's `calc-dirty-rate` (page-sampling mode) before a
/// migration starts; the policy's pre-flight estimate uses it.
///
/// KubeVirt #17504 warns that such a probe contends with an ongoing migration's dirty
/// tracking, so it is only ever run before `migrate`.
pub async fn probe_dirty_rate(
    source: &dyn SourceEndpoint,
    seconds: u64,
) -> Result<tern_policy::DirtyRateProbe, EngineError> {
    source.start_dirty_rate_probe(seconds).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds + 5);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(mb_per_s) = source.measured_dirty_rate().await? {
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
