//! One measured migration on lab hosts with a real guest: the building block of `tern demo`,
//! of the integration tests and of the benchmark.
//!
//! A scenario brings up a lab (network namespaces, shaped link), boots a guest running
//! `tern-load` on host `h1`, waits until its page verifier has completed a pass, migrates it
//! to `h2` under a policy and a context, lets it run on its new host for a moment, and then
//! judges the result from the guest's host-timestamped serial logs: blackout, heartbeat
//! continuity, corrupt pages, control-state mismatches, verifier progress. Everything it
//! started (QEMU processes, namespaces, temp dirs) is removed on every path.

mod agent_hop;
pub mod agents;
pub mod evacuation;
pub mod faults;
mod in_process;
mod session;

pub use session::{HopRecord, HopSpec, ScenarioSession, SessionSpec};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_agent::{HostIdentity, HostMigrationConfig, HostRuntime, MigrationOrder};
use tern_engine::{
    MigrationProgress, MigrationState, OperatorCommand, OperatorRequest, TakenAction,
};
use tern_guest::{GuestImage, GuestImageSpec, HostSerialLog, WorkloadParams};
use tern_lab::{Lab, LabSpec, LinkRate};
use tern_policy::{MigrationContext, SlaCatalog};
use tern_qemu::{
    Accelerator, AcceleratorVerdict, PostCopyPermission, QemuBinary, VmMigrationSettings, VmSpec,
};
use tokio::sync::{mpsc, oneshot};

/// Errors that stop a scenario before it could measure anything.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// QEMU is missing or too old.
    #[error(transparent)]
    Qemu(#[from] tern_qemu::QemuError),
    /// The guest image could not be built.
    #[error(transparent)]
    Guest(#[from] tern_guest::GuestError),
    /// The lab could not be set up.
    #[error(transparent)]
    Lab(#[from] tern_lab::LabError),
    /// An agent operation failed (bad input is reported here).
    #[error(transparent)]
    Agent(#[from] tern_agent::AgentError),
    /// The guest did not become ready.
    #[error("{0}")]
    Guest2(String),
    /// Local I/O.
    #[error("{0}")]
    Io(String),
    /// The scenario asks for something this runner cannot do (names what and where it can).
    #[error("{0}")]
    Unsupported(String),
    /// An agent process of a hop driven through agents could not be started, asked or
    /// killed.
    #[error("{0}")]
    AgentProcess(String),
}

/// What every scenario on this machine shares: the QEMU binary, the guest image and the
/// accelerator verdict. Prepared once per process.
#[derive(Debug, Clone)]
pub struct LabEnvironment {
    /// The checked QEMU binary.
    pub qemu: QemuBinary,
    /// The guest image.
    pub image: GuestImage,
    /// KVM or TCG, and why.
    pub accelerator: AcceleratorVerdict,
}

/// How long a guest may take to boot and finish its first verify pass (TCG boots the Debian
/// kernel in ~6 s on an idle host, ~11 s on a busy one).
pub(crate) const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(90);

impl LabEnvironment {
    /// Checks QEMU, builds (or reuses) the guest image and decides the accelerator.
    pub fn prepare(progress: impl Fn(&str)) -> Result<Self, ScenarioError> {
        let qemu = QemuBinary::locate()?;
        let cache = tern_guest::default_cache_dir();
        let image = tern_guest::build(&GuestImageSpec::default(), &cache, &progress)?;
        let probe_dir = tempfile::Builder::new()
            .prefix("tern-probe-")
            .tempdir()
            .map_err(|e| ScenarioError::Io(format!("temp dir: {e}")))?;
        let template = VmSpec {
            name: "accel-probe".into(),
            memory_mib: 192,
            vcpus: 1,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: image.cmdline(&WorkloadParams {
                working_set_mib: 8,
                ..WorkloadParams::default()
            }),
            accelerator: Accelerator::Kvm,
            devices: Default::default(),
            migration: VmMigrationSettings::default(),
        };
        let accelerator = tern_qemu::probe_accelerator(
            &qemu,
            &template,
            probe_dir.path(),
            Some(&cache.join("accelerator.json")),
            Duration::from_secs(20),
            |line| line.starts_with("HB "),
        )?;
        Ok(Self {
            qemu,
            image,
            accelerator,
        })
    }
}

/// One scenario's settings. `Default` is the demo's: a guest dirtying memory faster than a
/// 200 Mbit/s link carries, post-copy permitted everywhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioSpec {
    /// Lab name (unique per concurrently running scenario).
    pub lab_name: String,
    /// Link rate between the hosts; `None` = unshaped.
    pub link_rate: Option<LinkRate>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// What the guest's workload does.
    pub workload: WorkloadParams,
    /// Why the VM moves.
    pub context: MigrationContext,
    /// Policy name.
    pub policy: String,
    /// The VM's post-copy permission.
    pub vm_post_copy: PostCopyPermission,
    /// Whether the source host permits post-copy.
    pub source_permits_post_copy: bool,
    /// Whether the destination host permits post-copy.
    pub destination_permits_post_copy: bool,
    /// The VM's own downtime cap.
    pub vm_max_downtime_ms: Option<u64>,
    /// The VM's SLA class.
    pub sla_class: String,
    /// Deadline for must-finish contexts (ms from the start).
    pub deadline_ms: Option<u64>,
    /// Send `force-complete` this long after the start.
    pub force_complete_after: Option<Duration>,
    /// Send `abort` this long after the start.
    pub abort_after: Option<Duration>,
    /// How long to watch the guest after the migration ended.
    pub settle: Duration,
    /// Memory each lab host offers to guests (MiB).
    pub host_memory_mib: u64,
    /// Seconds of dirty-rate probing before the migration.
    pub probe_seconds: u64,
    /// Faults to inject at chosen phases.
    #[serde(default)]
    pub faults: Vec<faults::FaultPlan>,
    /// Post-copy recovery window of the source host (default 600 s).
    #[serde(default)]
    pub recovery_window: Option<Duration>,
    /// Encrypt the migration stream with lab certificates (`tern demo --tls`).
    #[serde(default)]
    pub migration_tls: bool,
}

impl Default for ScenarioSpec {
    fn default() -> Self {
        Self {
            lab_name: "demo".into(),
            link_rate: Some(
                LinkRate::from_bits_per_sec(200_000_000).unwrap_or_else(|_| unreachable_rate()),
            ),
            memory_mib: 256,
            workload: WorkloadParams::default(),
            context: MigrationContext::Manual,
            policy: tern_policy::DEFAULT_POLICY.to_string(),
            vm_post_copy: PostCopyPermission::Allowed,
            source_permits_post_copy: true,
            destination_permits_post_copy: true,
            vm_max_downtime_ms: None,
            sla_class: "standard".into(),
            deadline_ms: None,
            force_complete_after: None,
            abort_after: None,
            settle: Duration::from_secs(3),
            host_memory_mib: 4096,
            probe_seconds: 0,
            faults: Vec::new(),
            recovery_window: None,
            migration_tls: false,
        }
    }
}

impl ScenarioSpec {
    /// The scenario's two lab hosts (`h1`, `h2`) and their shaped link; taken down when the
    /// guard drops.
    pub fn lab_up(&self) -> Result<tern_lab::LabGuard, ScenarioError> {
        Ok(Lab::up_guarded(&LabSpec {
            name: self.lab_name.clone(),
            hosts: 2,
            link_rate: self.link_rate,
            link_delay: None,
        })?)
    }

    /// The link rate as given, or `unshaped`.
    pub fn link_text(&self) -> String {
        self.link_rate.map_or("unshaped".into(), |r| r.to_string())
    }
}

fn unreachable_rate() -> LinkRate {
    // 200 Mbit/s is within LinkRate's range; this is only the type-level fallback.
    LinkRate::from_bits_per_sec(100_000_000).expect("100 Mbit/s is a valid link rate")
}

/// How a migration ended, as the summary reports it (JSON: `"completed"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The guest runs on the destination.
    Completed,
    /// Cancelled (operator or policy) before the switch; the guest runs on the source.
    Aborted,
    /// Failed before the switch; the guest runs on the source.
    Failed,
    /// A QEMU died after the switch: the guest cannot be resumed.
    Lost,
    /// The network stayed down past the recovery window: both QEMUs wait.
    Stranded,
    /// A peer agent did not answer after the switch: what happened is not known yet, both
    /// QEMUs are kept (never reported as lost while a QEMU may still hold the guest).
    Unknown,
}

impl Outcome {
    /// The outcome of an engine state at the end of a migration.
    pub fn of(state: MigrationState) -> Self {
        match state {
            MigrationState::Completed => Self::Completed,
            MigrationState::Aborted => Self::Aborted,
            MigrationState::Lost => Self::Lost,
            MigrationState::Stranded => Self::Stranded,
            MigrationState::Unknown => Self::Unknown,
            _ => Self::Failed,
        }
    }

    /// Its name (`"completed"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Aborted => "aborted",
            Self::Failed => "failed",
            Self::Lost => "lost",
            Self::Stranded => "stranded",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `outcome == "completed"` reads as it did when the outcome was a string.
impl PartialEq<&str> for Outcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What a scenario measured. The JSON form is `tern demo -o json`'s output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// How it ended.
    pub outcome: Outcome,
    /// Whether post-copy was entered.
    pub switched_to_postcopy: bool,
    /// Whether the guest was paused to force completion.
    pub paused_guest: bool,
    /// Seconds from `migrate` to the end.
    pub total_time_s: f64,
    /// Host-measured blackout (ms): source's last heartbeat → destination's first.
    pub blackout_ms: Option<f64>,
    /// Bytes sent over the migration stream.
    pub bytes_sent: u64,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// Pages the guest's verifier found corrupt (both sides).
    pub corrupt_pages: u64,
    /// Control-state mismatches (stack vs .bss twin counters).
    pub control_mismatches: u64,
    /// The heartbeat sequence had no gap or backwards step, including across the switch.
    pub heartbeat_continuous: bool,
    /// Where the heartbeat sequence broke, if it did (side, previous → next): the detail a
    /// failed integrity check needs to tell a lost console line from state from the past.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heartbeat_anomalies: Vec<tern_guest::SequenceAnomaly>,
    /// Heartbeat gaps left by console lines nobody recorded — forward jumps that arrived
    /// while (or just after) a killed agent, which records its guests' consoles, was away.
    /// Not counted against continuity: the guest's status lines carry cumulative corrupt and
    /// mismatch counts, so what was not recorded cannot hide corruption, and a backwards
    /// step (state from the past) is never excused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heartbeat_unrecorded: Vec<tern_guest::SequenceAnomaly>,
    /// Verifier passes completed before the switch.
    pub verify_passes_before: u64,
    /// Verifier passes completed on the destination.
    pub verify_passes_after: u64,
    /// Longest heartbeat gap on the destination (post-copy stalls), ms.
    pub max_dest_gap_ms: f64,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// QEMU version.
    pub qemu_version: String,
    /// Migration context.
    pub context: String,
    /// Policy name.
    pub policy: String,
    /// Actions taken, with reasons.
    pub actions: Vec<TakenAction>,
    /// Whether the source QEMU still runs the guest.
    pub source_running: bool,
    /// The source QEMU's run state when the migration ended (`postmigrate` once handed over).
    pub source_final_run_state: Option<String>,
    /// Whether a destination QEMU was left after the migration ended (only if completed).
    pub destination_vm_present: bool,
    /// Host the guest runs on (`None`: lost).
    pub guest_location: Option<String>,
    /// Capabilities used.
    pub capabilities: Vec<String>,
    /// Why post-copy was or was not permitted.
    pub post_copy_verdict: String,
    /// Completed passes.
    pub passes: u64,
    /// Link rate, as given.
    pub link_rate: Option<String>,
    /// Working set (MiB) and dirty rate of the guest.
    pub working_set_mib: u32,
    /// Page writes per second (`max` or a number).
    pub dirty_rate: String,
    /// Guest RAM (MiB).
    pub memory_mib: u64,
    /// Answers to operator commands.
    pub operator_results: Vec<String>,
    /// Faults injected, with detection and recovery times.
    pub faults_injected: Vec<faults::FaultRecord>,
    /// Post-copy recoveries the engine performed.
    pub recoveries: u32,
    /// Longest time from a link's restoration to post-copy running again, seconds.
    pub recovery_s: Option<f64>,
    /// Engine error text, if any.
    pub error: Option<String>,
    /// The engine's event log.
    pub events: Vec<tern_engine::MigrationEvent>,
    /// How many hosts run the guest after the hop, as their agents report it (hops through
    /// agent processes): 1 unless something went wrong; never 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_copies: Option<u32>,
    /// Whether the migration stream was TLS (`tern demo --tls`).
    #[serde(default)]
    pub stream_encrypted: bool,
    /// CPU seconds the source QEMU spent outside its vCPUs during the migration.
    #[serde(default)]
    pub source_migration_cpu_s: Option<f64>,
    /// CPU seconds the destination QEMU spent outside its vCPUs during the migration.
    #[serde(default)]
    pub destination_migration_cpu_s: Option<f64>,
}

impl MigrationSummary {
    /// Records the injected faults and the slowest recovery among them.
    pub fn record_faults(&mut self, faults: Vec<faults::FaultRecord>) {
        // Post-copy recoveries after a link came back; an agent kill's "answered again" is
        // not a recovery of the migration.
        self.recovery_s = faults
            .iter()
            .filter(|f| f.console_unrecorded_ns.is_none())
            .filter_map(|f| f.resumed_after_restore_ms)
            .max()
            .map(|ms| ms as f64 / 1000.0);
        self.faults_injected = faults;
    }

    /// Moves heartbeat gaps explained by an agent's absence (see
    /// [`MigrationSummary::heartbeat_unrecorded`]) out of the anomalies, and judges continuity
    /// on the rest. A gap is explained when it jumps forward and its first heartbeat after
    /// the gap arrived between the kill and [`UNRECORDED_SLACK`] after the agent answered
    /// again.
    pub fn excuse_unrecorded_console(&mut self) {
        let windows: Vec<(u64, u64)> = self
            .faults_injected
            .iter()
            .filter_map(|f| f.console_unrecorded_ns)
            .collect();
        if windows.is_empty() {
            return;
        }
        let (unrecorded, real) = split_unrecorded(&self.heartbeat_anomalies, &windows);
        if unrecorded.is_empty() {
            return;
        }
        // Anomalies existed, so heartbeats did: continuity rests on the rest.
        self.heartbeat_continuous = real.is_empty();
        self.heartbeat_unrecorded = unrecorded;
        self.heartbeat_anomalies = real;
    }

    /// Integrity as defined for every migration: zero corrupt pages and control mismatches,
    /// a continuous heartbeat sequence, and (after a switch) the verifier still running.
    pub fn integrity_ok(&self) -> bool {
        self.corrupt_pages == 0
            && self.control_mismatches == 0
            && self.heartbeat_continuous
            && (self.outcome != "completed" || self.verify_passes_after >= 1)
    }
}

/// How long after a killed agent answers again its console recorder may take to deliver the
/// first line (it re-attaches to the serial socket when the agent re-adopts the VM).
pub const UNRECORDED_SLACK: Duration = Duration::from_secs(3);

/// Splits heartbeat anomalies into those explained by a console nobody recorded (a forward
/// jump whose heartbeat arrived within one of `windows`, host ns, or [`UNRECORDED_SLACK`]
/// after it) and the rest.
fn split_unrecorded(
    anomalies: &[tern_guest::SequenceAnomaly],
    windows: &[(u64, u64)],
) -> (
    Vec<tern_guest::SequenceAnomaly>,
    Vec<tern_guest::SequenceAnomaly>,
) {
    let slack = UNRECORDED_SLACK.as_nanos() as u64;
    anomalies.iter().partition(|a| {
        !a.is_backwards()
            && windows
                .iter()
                .any(|&(from, to)| a.at_ns >= from && a.at_ns <= to.saturating_add(slack))
    })
}

/// Live notifications while a scenario runs.
#[derive(Debug, Clone)]
pub enum ScenarioProgress {
    /// A step started (lab up, guest boot, …).
    Step(String),
    /// The migration's live progress.
    Migration(MigrationProgress),
}

/// What drives a hop: the one interface behind which a migration runs, in this process or
/// through agent processes. Both boot the same guest, publish the same live progress, take
/// the same faults ([`faults::FaultHosts`]) and are judged the same way.
#[derive(Clone)]
pub enum HopBackend {
    /// The runner in this process, on two in-process host runtimes ([`tern_agent::migrate`]):
    /// no agent to kill, and the fastest way to measure.
    InProcess,
    /// One `tern agent` process per lab host, started by the launcher and driven over the
    /// agents' HTTP API, as an operator's migration runs. The only backend on which an agent
    /// can be killed.
    AgentProcesses(Arc<dyn agents::AgentLauncher>),
}

impl std::fmt::Debug for HopBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::InProcess => "InProcess",
            Self::AgentProcesses(_) => "AgentProcesses",
        })
    }
}

/// Runs a scenario in-process ([`HopBackend::InProcess`]) and cleans up after it, whatever
/// happens.
pub async fn run_scenario(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    progress: Option<mpsc::UnboundedSender<ScenarioProgress>>,
) -> Result<MigrationSummary, ScenarioError> {
    run_scenario_with(env, spec, &HopBackend::InProcess, progress).await
}

/// Runs a scenario on `backend` and cleans up after it, whatever happens. A fault that
/// kills an agent needs [`HopBackend::AgentProcesses`]; every other fault runs on both, and
/// any faults combine.
pub async fn run_scenario_with(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    backend: &HopBackend,
    progress: Option<mpsc::UnboundedSender<ScenarioProgress>>,
) -> Result<MigrationSummary, ScenarioError> {
    match backend {
        HopBackend::InProcess => in_process::run(env, spec, progress).await,
        HopBackend::AgentProcesses(launcher) => {
            agent_hop::run(env, spec, launcher.clone(), progress).await
        }
    }
}

/// With `on`, makes a lab CA in `dir` with a host certificate per host (the name its
/// migration TLS peers verify, and its migration address) and gives each host its QEMU
/// credentials: every stream between them is then TLS with `tls-authz` pinning the source.
pub fn with_lab_migration_tls(
    hosts: Vec<HostRuntime>,
    dir: &Path,
    on: bool,
) -> Result<Vec<HostRuntime>, ScenarioError> {
    if !on {
        return Ok(hosts);
    }
    let names: Vec<(&str, Vec<std::net::IpAddr>)> = hosts
        .iter()
        .map(|h| {
            (
                h.identity().name.as_str(),
                vec![h.identity().migration_address],
            )
        })
        .collect();
    let pki = tern_pki::provision_lab(dir, &names)
        .map_err(|e| ScenarioError::Io(format!("lab certificates in {}: {e}", dir.display())))?;
    Ok(hosts
        .iter()
        .zip(pki.hosts)
        .map(|(h, t)| h.clone().with_migration_tls(t.qemu_creds_dir))
        .collect())
}

/// With `TERN_KEEP_LOGS=DIR`, copies `runtime` (QEMU's stderr, the serial logs of both hosts,
/// agent databases) to `DIR/<lab>/` before it is removed: the post-mortem of a failed run.
pub fn keep_logs_for_post_mortem(runtime: &Path, lab: &str) {
    if let Some(keep) = std::env::var_os("TERN_KEEP_LOGS") {
        let dest = PathBuf::from(keep).join(lab);
        let _ = std::fs::create_dir_all(&dest);
        let _ = std::process::Command::new("cp")
            .arg("-r")
            .arg(runtime)
            .arg(&dest)
            .status();
    }
}

/// The guest a scenario boots on `h1`: the environment's image running the scenario's
/// workload, with the VM's migration settings. Public so that runners outside this crate
/// (`tern demo` through agent processes) boot exactly the same guest.
pub fn vm_spec(env: &LabEnvironment, spec: &ScenarioSpec) -> VmSpec {
    VmSpec {
        name: "guest".into(),
        memory_mib: spec.memory_mib,
        vcpus: 1,
        kernel: env.image.kernel.clone(),
        initrd: env.image.initrd.clone(),
        cmdline: env.image.cmdline(&spec.workload),
        accelerator: env.accelerator.accelerator,
        devices: Default::default(),
        migration: VmMigrationSettings {
            post_copy: spec.vm_post_copy,
            max_downtime_ms: spec.vm_max_downtime_ms,
            sla_class: spec.sla_class.clone(),
        },
    }
}

/// Waits until the guest's verifier has finished `passes` passes, or fails with the log tail.
pub async fn wait_guest_ready(
    log: &Path,
    passes: u64,
    timeout: Duration,
) -> Result<(), ScenarioError> {
    let start = Instant::now();
    loop {
        if let Ok(l) = HostSerialLog::read(log) {
            let h = tern_guest::analyze_boot(&l);
            if h.heartbeats > 0 && h.verify_passes >= passes {
                return Ok(());
            }
        }
        if start.elapsed() > timeout {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            return Err(ScenarioError::Guest2(format!(
                "the guest did not finish {passes} verify pass(es) within {} s; last serial lines: {:?}",
                timeout.as_secs(),
                tail
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The answers of operator-command timers that fired before the migration ended; timers
/// still waiting are cancelled (their command came too late to matter).
pub async fn operator_results(timers: Vec<tokio::task::JoinHandle<String>>) -> Vec<String> {
    let mut results = Vec::new();
    for t in timers {
        if t.is_finished() {
            if let Ok(s) = t.await {
                results.push(s);
            }
        } else {
            t.abort();
        }
    }
    results
}

/// Fills the integrity fields from the serial logs: the source's, and the destination's when
/// the guest was handed over (`None`: judge the source alone).
pub fn judge(
    summary: &mut MigrationSummary,
    src: &Path,
    dst: Option<&Path>,
) -> Result<(), ScenarioError> {
    let src_log = HostSerialLog::read(src)?;
    let dst_log = match dst {
        Some(dst) => Some(HostSerialLog::read(dst)?),
        None => None,
    };
    judge_logs(summary, &src_log, dst_log.as_ref());
    Ok(())
}

/// The summary of an engine outcome, before the serial logs are judged ([`judge`]).
pub fn summary_from(
    env: &LabEnvironment,
    outcome: &tern_agent::MigrationOutcome,
    context: MigrationContext,
    link_rate: Option<LinkRate>,
    workload: &WorkloadParams,
    memory_mib: u64,
    operator_results: Vec<String>,
) -> MigrationSummary {
    let report = &outcome.report;
    MigrationSummary {
        outcome: Outcome::of(report.state),
        switched_to_postcopy: report.switched_to_postcopy,
        paused_guest: report.paused_guest,
        total_time_s: report.total_time_ms as f64 / 1000.0,
        blackout_ms: None,
        bytes_sent: report.bytes_sent,
        ram_bytes: report.ram_bytes,
        corrupt_pages: 0,
        control_mismatches: 0,
        heartbeat_continuous: false,
        heartbeat_anomalies: Vec::new(),
        heartbeat_unrecorded: Vec::new(),
        verify_passes_before: 0,
        verify_passes_after: 0,
        max_dest_gap_ms: 0.0,
        accelerator: env.accelerator.accelerator.to_string(),
        qemu_version: env.qemu.version.to_string(),
        context: context.to_string(),
        policy: report.policy.clone(),
        actions: report.actions.clone(),
        source_running: outcome.source_running,
        source_final_run_state: outcome.source_final_run_state.clone(),
        destination_vm_present: outcome.destination_vm_present,
        guest_location: outcome.guest_location.clone(),
        capabilities: report.capabilities.clone(),
        post_copy_verdict: report.post_copy_verdict.clone(),
        passes: report.passes,
        link_rate: link_rate.map(|r| r.to_string()),
        working_set_mib: workload.working_set_mib,
        dirty_rate: workload.rate.to_string(),
        memory_mib,
        operator_results,
        faults_injected: Vec::new(),
        recoveries: report.recoveries,
        recovery_s: None,
        error: report.error.clone(),
        events: report.events.clone(),
        running_copies: None,
        stream_encrypted: report.stream_encrypted,
        source_migration_cpu_s: outcome.source_migration_cpu_ms.map(|ms| ms as f64 / 1000.0),
        destination_migration_cpu_s: outcome
            .destination_migration_cpu_ms
            .map(|ms| ms as f64 / 1000.0),
    }
}

/// Fills the integrity fields from parsed serial logs (the in-memory form of `judge`).
fn judge_logs(
    summary: &mut MigrationSummary,
    src_log: &HostSerialLog,
    dst: Option<&HostSerialLog>,
) {
    match dst {
        Some(dst_log) => {
            let i = tern_guest::analyze_migration(src_log, dst_log);
            summary.blackout_ms = i.blackout_ms;
            summary.corrupt_pages = i.corrupt_pages;
            summary.control_mismatches = i.control_mismatches;
            summary.heartbeat_continuous = i.heartbeat_continuous;
            summary.heartbeat_anomalies = i.sequence_anomalies.clone();
            summary.verify_passes_before = i.verify_passes_before;
            summary.verify_passes_after = i.verify_passes_after;
            summary.max_dest_gap_ms = i.max_dest_gap_ms;
        }
        None => {
            let h = tern_guest::analyze_boot(src_log);
            summary.corrupt_pages = h.corrupt_pages;
            summary.control_mismatches = h.control_mismatches;
            summary.heartbeat_continuous = h.sequence_anomalies.is_empty() && h.heartbeats > 0;
            summary.heartbeat_anomalies = h.sequence_anomalies.clone();
            summary.verify_passes_before = h.verify_passes;
        }
    }
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    #[test]
    fn only_forward_gaps_while_an_agent_was_away_are_unrecorded_console() {
        use tern_guest::{LogSide, SequenceAnomaly};
        let gap = |at_ns, previous, next| SequenceAnomaly {
            side: LogSide::Switchover,
            at_ns,
            previous,
            next,
        };
        let s = 1_000_000_000u64;
        let windows = [(10 * s, 16 * s)];
        let anomalies = [
            gap(12 * s, 963, 1409),  // forward, inside: lines lost while away
            gap(18 * s, 1500, 1600), // forward, within the slack after the restart
            gap(12 * s, 1409, 1200), // backwards: state from the past, never excused
            gap(9 * s, 10, 20),      // before the kill
            gap(20 * s, 1700, 1800), // long after the restart
        ];
        let (unrecorded, real) = split_unrecorded(&anomalies, &windows);
        assert_eq!(unrecorded, anomalies[..2].to_vec());
        assert_eq!(real, anomalies[2..].to_vec());
        let (none, all) = split_unrecorded(&anomalies, &[]);
        assert!(none.is_empty());
        assert_eq!(all.len(), anomalies.len());
    }

    #[test]
    fn outcomes_keep_their_json_names_and_compare_with_text() {
        for (state, text) in [
            (MigrationState::Completed, "completed"),
            (MigrationState::Aborted, "aborted"),
            (MigrationState::Failed, "failed"),
            (MigrationState::Lost, "lost"),
            (MigrationState::Stranded, "stranded"),
        ] {
            let o = Outcome::of(state);
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{text}\""));
            assert!(o == text);
            assert_eq!(o.to_string(), text);
        }
    }
}
