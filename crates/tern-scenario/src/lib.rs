//! One measured migration on lab hosts with a real guest: the building block of `tern demo`,
//! of the integration tests and of the benchmark.
//!
//! A scenario brings up a lab (network namespaces, shaped link), boots a guest running
//! `tern-load` on host `h1`, waits until its page verifier has completed a pass, migrates it
//! to `h2` under a policy and a context, lets it run on its new host for a moment, and then
//! judges the result from the guest's host-timestamped serial logs: blackout, heartbeat
//! continuity, corrupt pages, control-state mismatches, verifier progress. Everything it
//! started (QEMU processes, namespaces, temp dirs) is removed on every path.

pub mod evacuation;
pub mod faults;

use std::path::{Path, PathBuf};
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
const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(90);

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
        self.recovery_s = faults
            .iter()
            .filter_map(|f| f.resumed_after_restore_ms)
            .max()
            .map(|ms| ms as f64 / 1000.0);
        self.faults_injected = faults;
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

/// Live notifications while a scenario runs.
#[derive(Debug, Clone)]
pub enum ScenarioProgress {
    /// A step started (lab up, guest boot, …).
    Step(String),
    /// The migration's live progress.
    Migration(MigrationProgress),
}

/// Runs a scenario and cleans up after it, whatever happens.
pub async fn run_scenario(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    progress: Option<mpsc::UnboundedSender<ScenarioProgress>>,
) -> Result<MigrationSummary, ScenarioError> {
    if let Some(f) = spec.faults.iter().find(|f| f.needs_agents()) {
        return Err(ScenarioError::Unsupported(format!(
            "fault {f} kills an agent process, but this scenario runs the migration in-process; \
             `tern demo --fault {f}` runs it through agent processes"
        )));
    }
    let step = |s: &str| {
        if let Some(p) = &progress {
            let _ = p.send(ScenarioProgress::Step(s.to_string()));
        }
    };
    step(&format!("lab up: 2 hosts, link {}", spec.link_text()));
    let lab_guard = spec.lab_up()?;
    let lab: &Lab = &lab_guard;
    let runtime = tempfile::Builder::new()
        .prefix("tern-run-")
        .tempdir()
        .map_err(|e| ScenarioError::Io(format!("temp dir: {e}")))?;
    let hosts: Vec<HostRuntime> = ["h1", "h2"]
        .iter()
        .map(|name| -> Result<HostRuntime, ScenarioError> {
            let h = lab.host(name)?;
            let permit = if *name == "h1" {
                spec.source_permits_post_copy
            } else {
                spec.destination_permits_post_copy
            };
            Ok(HostRuntime::new(
                HostIdentity {
                    name: name.to_string(),
                    netns: Some(h.netns().to_string()),
                    migration_address: h.address().into(),
                    memory_mib: spec.host_memory_mib,
                },
                HostMigrationConfig {
                    permit_post_copy: permit,
                    postcopy_recovery_window_s: spec
                        .recovery_window
                        .map_or(600, |w| w.as_secs().max(1)),
                    ..HostMigrationConfig::default()
                },
                env.qemu.clone(),
                runtime.path().join(name),
            ))
        })
        .collect::<Result<_, _>>()?;
    let hosts = with_lab_migration_tls(hosts, &runtime.path().join("tls"), spec.migration_tls)?;
    let result = run_on_hosts(env, spec, lab, &hosts[0], &hosts[1], progress.clone()).await;
    for h in &hosts {
        h.stop_all().await;
    }
    step("lab down");
    drop(lab_guard);
    keep_logs_for_post_mortem(runtime.path(), &spec.lab_name);
    let (mut summary, src_log, dst_log) = result?;
    judge(&mut summary, &src_log, dst_log.as_deref())?;
    Ok(summary)
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

async fn run_on_hosts(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    lab: &Lab,
    source: &HostRuntime,
    destination: &HostRuntime,
    progress: Option<mpsc::UnboundedSender<ScenarioProgress>>,
) -> Result<(MigrationSummary, PathBuf, Option<PathBuf>), ScenarioError> {
    let step = |s: &str| {
        if let Some(p) = &progress {
            let _ = p.send(ScenarioProgress::Step(s.to_string()));
        }
    };
    let vm = vm_spec(env, spec);
    step(&format!(
        "boot guest on h1 ({} MiB, working set {} MiB, {} page writes/s, {})",
        vm.memory_mib,
        spec.workload.working_set_mib,
        spec.workload.rate,
        env.accelerator.accelerator
    ));
    let info = source.create_vm(vm.clone()).await?;
    wait_guest_ready(&info.serial_log, 1, GUEST_READY_TIMEOUT).await?;

    step(&format!(
        "migrate h1 → h2 (context {}, policy {})",
        spec.context, spec.policy
    ));
    let (ctl_tx, ctl_rx) = mpsc::channel(8);
    let mut timers = Vec::new();
    for (after, cmd) in [
        (spec.force_complete_after, OperatorCommand::ForceComplete),
        (spec.abort_after, OperatorCommand::Abort),
    ] {
        if let Some(after) = after {
            let tx = ctl_tx.clone();
            timers.push(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let (reply_tx, reply_rx) = oneshot::channel();
                if tx
                    .send(OperatorRequest {
                        command: cmd,
                        reply: reply_tx,
                    })
                    .await
                    .is_err()
                {
                    return format!("{cmd:?}: the migration had already ended");
                }
                match reply_rx.await {
                    Ok(Ok(s)) => format!("{cmd:?}: accepted: {s}"),
                    Ok(Err(s)) => format!("{cmd:?}: refused: {s}"),
                    Err(_) => format!("{cmd:?}: no answer"),
                }
            }));
        }
    }
    drop(ctl_tx);
    let (prog_tx, prog_rx) = oneshot::channel::<tokio::sync::watch::Receiver<MigrationProgress>>();
    let fault_plans = spec.faults.clone();
    let (lab2, src2, dst2, vm_name) = (
        lab.clone(),
        source.clone(),
        destination.clone(),
        vm.name.clone(),
    );
    let progress2 = progress.clone();
    let watcher = tokio::spawn(async move {
        let Ok(rx) = prog_rx.await else {
            return Vec::new();
        };
        let started = Instant::now();
        let forward = progress2.map(|p| {
            let mut rx = rx.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let v = rx.borrow().clone();
                    if p.send(ScenarioProgress::Migration(v)).is_err() {
                        break;
                    }
                }
            })
        });
        let injectors =
            faults::spawn_injectors(fault_plans, &lab2, &src2, &dst2, &vm_name, &rx, started);
        let records = faults::collect(injectors).await;
        if let Some(f) = forward {
            let _ = f.await;
        }
        records
    });
    let order = MigrationOrder {
        vm: vm.name.clone(),
        context: spec.context,
        policy: spec
            .policy
            .parse()
            .map_err(|e: tern_policy::UnknownPolicy| {
                tern_agent::AgentError::Invalid(e.to_string())
            })?,
        link_bytes_per_s: spec.link_rate.map(|r| r.bytes_per_sec()),
        deadline_ms: spec.deadline_ms,
        probe_seconds: spec.probe_seconds,
    };
    let catalog = SlaCatalog::builtin();
    let outcome = tern_agent::migrate(
        source,
        destination,
        order,
        &catalog,
        ctl_rx,
        Some(prog_tx),
        None,
    )
    .await;
    // The runner (and its progress channel) is gone: injectors and the forwarder end.
    let faults_injected = watcher.await.unwrap_or_default();
    let operator_results = operator_results(timers).await;
    let outcome = outcome?;
    step(&format!(
        "migration {}; watching the guest for {} s",
        outcome.report.state,
        spec.settle.as_secs()
    ));
    tokio::time::sleep(spec.settle).await;
    let report = &outcome.report;
    let mut summary = summary_from(
        env,
        &outcome,
        spec.context,
        spec.link_rate,
        &spec.workload,
        spec.memory_mib,
        operator_results,
    );
    summary.record_faults(faults_injected);
    let dest_log = if report.state == MigrationState::Completed || report.state.is_after_switch() {
        outcome.destination_serial_log.clone()
    } else {
        None
    };
    Ok((summary, outcome.source_serial_log.clone(), dest_log))
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

// ---------------------------------------------------------------------------------------------
// Sessions: one guest, many migrations.
// ---------------------------------------------------------------------------------------------

/// A lab whose single guest is migrated back and forth between `h1` and `h2`, one hop per
/// call of [`ScenarioSession::migrate_once`].
///
/// Booting a TCG guest costs 6–11 s, more than many migrations take; a benchmark that compares
/// nine policies with several repeats cannot afford one boot per run. A session boots once and
/// judges each hop from that hop's own serial logs (every incoming QEMU writes a new log; the
/// old source's log ends at the switchover), so hops are as independent as separate scenarios
/// except for the guest's age.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSpec {
    /// Lab name (unique per concurrently running session).
    pub lab_name: String,
    /// Link rate between the hosts; `None` = unshaped.
    pub link_rate: Option<LinkRate>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// What the guest's workload does.
    pub workload: WorkloadParams,
    /// The VM's own downtime cap.
    pub vm_max_downtime_ms: Option<u64>,
    /// The VM's SLA class.
    pub sla_class: String,
    /// Memory each lab host offers to guests (MiB).
    pub host_memory_mib: u64,
    /// How long to let the guest run after each hop before judging it (and before the next).
    pub settle: Duration,
    /// Encrypt every hop's migration stream with lab certificates.
    #[serde(default)]
    pub migration_tls: bool,
}

impl Default for SessionSpec {
    fn default() -> Self {
        let s = ScenarioSpec::default();
        Self {
            lab_name: "session".into(),
            link_rate: s.link_rate,
            memory_mib: s.memory_mib,
            workload: s.workload,
            vm_max_downtime_ms: None,
            sla_class: s.sla_class,
            host_memory_mib: s.host_memory_mib,
            settle: Duration::from_secs(2),
            migration_tls: false,
        }
    }
}

/// What one hop of a session asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopSpec {
    /// Why the VM moves.
    pub context: MigrationContext,
    /// Policy name.
    pub policy: String,
    /// The VM's post-copy permission for this hop. `Forbidden` keeps the `postcopy-ram`
    /// capability off whatever the policy wants, which is how the benchmark measures the cost
    /// of merely *enabling* post-copy (the capability on, never switched) against a run without it.
    pub post_copy: PostCopyPermission,
    /// Deadline for must-finish contexts (ms from the start).
    pub deadline_ms: Option<u64>,
    /// Seconds of dirty-rate probing before the migration.
    pub probe_seconds: u64,
    /// Hard cap: when the migration has not ended after this long, the session asks the
    /// engine to abort it (refused after the switch to post-copy, which always finishes) and
    /// marks the hop as timed out. Policies that never give up (QEMU's defaults, Proxmox)
    /// would otherwise run forever on a guest that out-dirties the link.
    pub time_cap: Option<Duration>,
    /// Faults injected during this hop. Only link cuts: a killed QEMU would end the session's
    /// guest, and an agent kill needs agent processes ([`ScenarioSession::migrate_once`]
    /// refuses both).
    #[serde(default)]
    pub faults: Vec<faults::FaultPlan>,
}

impl Default for HopSpec {
    fn default() -> Self {
        Self {
            context: MigrationContext::Manual,
            policy: tern_policy::DEFAULT_POLICY.to_string(),
            post_copy: PostCopyPermission::Allowed,
            deadline_ms: None,
            probe_seconds: 0,
            time_cap: Some(Duration::from_secs(90)),
            faults: Vec::new(),
        }
    }
}

/// Everything one hop measured: the judged summary plus the raw material a benchmark needs
/// (progress series, both serial logs, host-clock anchors).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopRecord {
    /// The judged summary (same fields as `tern demo`'s).
    pub summary: MigrationSummary,
    /// The hop's time cap expired before the migration ended.
    pub timed_out: bool,
    /// Every distinct live-progress value the engine published, in order.
    pub progress: Vec<MigrationProgress>,
    /// Host CLOCK_MONOTONIC (ns) when the hop was requested (before the destination QEMU
    /// started).
    pub requested_mono_ns: u64,
    /// Host CLOCK_MONOTONIC (ns) when the migration reached its terminal state; the engine's
    /// `at_ms` values map to host time as `ended_mono_ns - (total_time_ms - at_ms) * 1e6`.
    pub ended_mono_ns: u64,
    /// Source host name.
    pub source_host: String,
    /// Destination host name.
    pub destination_host: String,
    /// The source's host serial log, as read after the settle time.
    pub source_log: HostSerialLog,
    /// The destination's host serial log, when the guest ran there.
    pub destination_log: Option<HostSerialLog>,
}

impl HopRecord {
    /// Host monotonic time (ns) of an engine timestamp (`at_ms` since `migrate`).
    pub fn mono_ns_at(&self, at_ms: u64) -> u64 {
        let total_ms = (self.summary.total_time_s * 1000.0).round() as u64;
        self.ended_mono_ns
            .saturating_sub(total_ms.saturating_sub(at_ms) * 1_000_000)
    }
}

/// A running session: a lab, two host runtimes and one guest.
pub struct ScenarioSession {
    env: LabEnvironment,
    spec: SessionSpec,
    hosts: [HostRuntime; 2],
    /// Index into `hosts` of where the guest runs now.
    location: usize,
    // Declared after `hosts` so the QEMUs are killed before the namespaces go.
    _runtime: tempfile::TempDir,
    lab: Option<tern_lab::LabGuard>,
}

/// The VM name used inside a session.
const SESSION_VM: &str = "guest";

impl ScenarioSession {
    /// Brings the lab up and boots the guest on `h1`, waiting for its first verify pass.
    /// On error everything started so far is torn down.
    pub async fn start(env: &LabEnvironment, spec: &SessionSpec) -> Result<Self, ScenarioError> {
        let lab = Lab::up_guarded(&LabSpec {
            name: spec.lab_name.clone(),
            hosts: 2,
            link_rate: spec.link_rate,
            link_delay: None,
        })?;
        let runtime = tempfile::Builder::new()
            .prefix("tern-session-")
            .tempdir()
            .map_err(|e| ScenarioError::Io(format!("temp dir: {e}")))?;
        let make = |name: &str| -> Result<HostRuntime, ScenarioError> {
            let h = lab.host(name)?;
            Ok(HostRuntime::new(
                HostIdentity {
                    name: name.to_string(),
                    netns: Some(h.netns().to_string()),
                    migration_address: h.address().into(),
                    memory_mib: spec.host_memory_mib,
                },
                HostMigrationConfig::default(),
                env.qemu.clone(),
                runtime.path().join(name),
            ))
        };
        let hosts = with_lab_migration_tls(
            vec![make("h1")?, make("h2")?],
            &runtime.path().join("tls"),
            spec.migration_tls,
        )?;
        let [h1, h2]: [HostRuntime; 2] = hosts
            .try_into()
            .map_err(|_| ScenarioError::Io("a session has two hosts".into()))?;
        let hosts = [h1, h2];
        let session = Self {
            env: env.clone(),
            spec: spec.clone(),
            hosts,
            location: 0,
            _runtime: runtime,
            lab: Some(lab),
        };
        let vm = VmSpec {
            name: SESSION_VM.into(),
            memory_mib: spec.memory_mib,
            vcpus: 1,
            kernel: env.image.kernel.clone(),
            initrd: env.image.initrd.clone(),
            cmdline: env.image.cmdline(&spec.workload),
            accelerator: env.accelerator.accelerator,
            devices: Default::default(),
            migration: VmMigrationSettings {
                post_copy: PostCopyPermission::Allowed,
                max_downtime_ms: spec.vm_max_downtime_ms,
                sla_class: spec.sla_class.clone(),
            },
        };
        let booted = async {
            let info = session.hosts[0].create_vm(vm).await?;
            wait_guest_ready(&info.serial_log, 1, GUEST_READY_TIMEOUT).await
        }
        .await;
        match booted {
            Ok(()) => Ok(session),
            Err(e) => {
                session.finish().await;
                Err(e)
            }
        }
    }

    /// Name of the host the guest runs on now (`None` once it was lost).
    pub fn location(&self) -> Option<&str> {
        self.hosts
            .get(self.location)
            .map(|h| h.identity().name.as_str())
    }

    /// The session's settings.
    pub fn spec(&self) -> &SessionSpec {
        &self.spec
    }

    /// The guest's current host serial log path.
    pub async fn current_serial_log(&self) -> Result<PathBuf, ScenarioError> {
        let host = self
            .hosts
            .get(self.location)
            .ok_or_else(|| ScenarioError::Guest2("the session's guest was lost".into()))?;
        Ok(host.show(SESSION_VM).await?.serial_log)
    }

    /// Migrates the guest to the other host once, lets it settle, and judges the hop.
    ///
    /// After a completed hop the guest lives on the other host; after an abort or failure it
    /// stays where it was, so the next hop starts from there. A lost guest ends the session
    /// (later calls fail).
    pub async fn migrate_once(
        &mut self,
        hop: &HopSpec,
        progress: Option<mpsc::UnboundedSender<ScenarioProgress>>,
    ) -> Result<HopRecord, ScenarioError> {
        if self.location > 1 {
            return Err(ScenarioError::Guest2(
                "the session's guest was lost in an earlier hop".into(),
            ));
        }
        if let Some(f) = hop
            .faults
            .iter()
            .find(|f| !matches!(f.action, faults::FaultAction::LinkCut { .. }))
        {
            return Err(ScenarioError::Unsupported(format!(
                "fault {f} in a session: a session keeps one guest across hops, so only link \
                 cuts (link-cut-precopy, link-cut-postcopy, link-cut-recovery) can be injected"
            )));
        }
        let lab = self
            .lab
            .as_ref()
            .map(|l| Lab::clone(l))
            .ok_or_else(|| ScenarioError::Io("the session's lab is gone".into()))?;
        let (src_i, dst_i) = (self.location, 1 - self.location);
        let source = self.hosts[src_i].clone();
        let destination = self.hosts[dst_i].clone();
        let requested_mono_ns = tern_qemu::host_monotonic_ns();
        let order = MigrationOrder {
            vm: SESSION_VM.into(),
            context: hop.context,
            policy: hop
                .policy
                .parse()
                .map_err(|e: tern_policy::UnknownPolicy| {
                    tern_agent::AgentError::Invalid(e.to_string())
                })?,
            link_bytes_per_s: self.spec.link_rate.map(|r| r.bytes_per_sec()),
            deadline_ms: hop.deadline_ms,
            probe_seconds: hop.probe_seconds,
        };
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let timed_out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (prog_tx, prog_rx) =
            oneshot::channel::<tokio::sync::watch::Receiver<MigrationProgress>>();
        // The cap starts when the stream starts (the progress receiver arrives then).
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let cap_timer = hop.time_cap.map(|cap| {
            let tx = ctl_tx.clone();
            let flag = timed_out.clone();
            tokio::spawn(async move {
                if started_rx.await.is_err() {
                    return;
                }
                tokio::time::sleep(cap).await;
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                let (reply_tx, reply_rx) = oneshot::channel();
                if tx
                    .send(OperatorRequest {
                        command: OperatorCommand::Abort,
                        reply: reply_tx,
                    })
                    .await
                    .is_ok()
                {
                    let _ = reply_rx.await;
                }
            })
        });
        drop(ctl_tx);
        let fault_plans = hop.faults.clone();
        let (fault_src, fault_dst) = (source.clone(), destination.clone());
        let collector = tokio::spawn(async move {
            let mut series = Vec::new();
            let Ok(mut rx) = prog_rx.await else {
                return (series, Vec::new());
            };
            let _ = started_tx.send(());
            let started = Instant::now();
            let injectors = faults::spawn_injectors(
                fault_plans,
                &lab,
                &fault_src,
                &fault_dst,
                SESSION_VM,
                &rx,
                started,
            );
            while rx.changed().await.is_ok() {
                let v = rx.borrow().clone();
                if series.last() != Some(&v) {
                    if let Some(p) = &progress {
                        let _ = p.send(ScenarioProgress::Migration(v.clone()));
                    }
                    series.push(v);
                }
            }
            (series, faults::collect(injectors).await)
        });
        let post_copy = hop.post_copy;
        let outcome = tern_agent::migration::migrate_with(
            &source,
            &destination,
            order,
            &SlaCatalog::builtin(),
            ctl_rx,
            Some(prog_tx),
            None,
            move |input| {
                if post_copy == PostCopyPermission::Forbidden {
                    input.vm.post_copy = tern_policy::PostCopyPermission::Forbidden;
                }
            },
        )
        .await
        .map_err(ScenarioError::from);
        let ended_mono_ns = tern_qemu::host_monotonic_ns();
        if let Some(t) = cap_timer {
            t.abort();
        }
        let (series, faults_injected) = collector.await.unwrap_or_default();
        let outcome = outcome?;
        let timed_out = timed_out.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.spec.settle).await;
        let report = &outcome.report;
        self.location = match outcome.guest_location.as_deref() {
            Some(h) if h == destination.identity().name => dst_i,
            Some(_) => src_i,
            None => usize::MAX,
        };
        let mut summary = summary_from(
            &self.env,
            &outcome,
            hop.context,
            self.spec.link_rate,
            &self.spec.workload,
            self.spec.memory_mib,
            Vec::new(),
        );
        summary.record_faults(faults_injected);
        let source_log = HostSerialLog::read(&outcome.source_serial_log)?;
        let destination_log =
            if report.state == MigrationState::Completed || report.state.is_after_switch() {
                match &outcome.destination_serial_log {
                    Some(p) => Some(HostSerialLog::read(p)?),
                    None => None,
                }
            } else {
                None
            };
        judge_logs(&mut summary, &source_log, destination_log.as_ref());
        Ok(HopRecord {
            summary,
            timed_out,
            progress: series,
            requested_mono_ns,
            ended_mono_ns,
            source_host: source.identity().name.clone(),
            destination_host: destination.identity().name.clone(),
            source_log,
            destination_log,
        })
    }

    /// Stops every QEMU and takes the lab down.
    pub async fn finish(mut self) {
        for h in &self.hosts {
            h.stop_all().await;
        }
        drop(self.lab.take());
        keep_logs_for_post_mortem(self._runtime.path(), &self.spec.lab_name);
    }
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
