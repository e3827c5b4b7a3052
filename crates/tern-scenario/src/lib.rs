//! One measured migration on lab hosts with a real guest: the building block of `tern demo`,
//! of the integration tests and of the benchmark.
//!
//! A scenario brings up a lab (network namespaces, shaped link), boots a guest running
//! `tern-load` on host `h1`, waits until its page verifier has completed a pass, migrates it
//! to `h2` under a policy and a context, lets it run on its new host for a moment, and then
//! judges the result from the guest's host-timestamped serial logs: blackout, heartbeat
//! continuity, corrupt pages, control-state mismatches, verifier progress. Everything it
//! started (QEMU processes, namespaces, temp dirs) is removed on every path.

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
        }
    }
}

fn unreachable_rate() -> LinkRate {
    // 200 Mbit/s is within LinkRate's range; this is only the type-level fallback.
    LinkRate::from_bits_per_sec(100_000_000).expect("100 Mbit/s is a valid link rate")
}

/// What a scenario measured. The JSON form is `tern demo -o json`'s output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// `completed`, `aborted`, `failed` or `lost`.
    pub outcome: String,
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
    /// Engine error text, if any.
    pub error: Option<String>,
    /// The engine's event log.
    pub events: Vec<tern_engine::MigrationEvent>,
}

impl MigrationSummary {
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
    let step = |s: &str| {
        if let Some(p) = &progress {
            let _ = p.send(ScenarioProgress::Step(s.to_string()));
        }
    };
    step(&format!(
        "lab up: 2 hosts, link {}",
        spec.link_rate.map_or("unshaped".into(), |r| r.to_string())
    ));
    let lab_guard = Lab::up_guarded(&LabSpec {
        name: spec.lab_name.clone(),
        hosts: 2,
        link_rate: spec.link_rate,
        link_delay: None,
    })?;
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
                    ..HostMigrationConfig::default()
                },
                env.qemu.clone(),
                runtime.path().join(name),
            ))
        })
        .collect::<Result<_, _>>()?;
    let result = run_on_hosts(env, spec, &hosts[0], &hosts[1], progress.clone()).await;
    for h in &hosts {
        h.stop_all().await;
    }
    step("lab down");
    drop(lab_guard);
    let (mut summary, src_log, dst_log) = result?;
    judge(&mut summary, &src_log, dst_log.as_deref())?;
    Ok(summary)
}

fn vm_spec(env: &LabEnvironment, spec: &ScenarioSpec) -> VmSpec {
    VmSpec {
        name: "guest".into(),
        memory_mib: spec.memory_mib,
        vcpus: 1,
        kernel: env.image.kernel.clone(),
        initrd: env.image.initrd.clone(),
        cmdline: env.image.cmdline(&spec.workload),
        accelerator: env.accelerator.accelerator,
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
    let forward = progress.clone().map(|p| {
        tokio::spawn(async move {
            let Ok(mut rx) = prog_rx.await else { return };
            while rx.changed().await.is_ok() {
                let v = rx.borrow().clone();
                if p.send(ScenarioProgress::Migration(v)).is_err() {
                    break;
                }
            }
        })
    });
    let order = MigrationOrder {
        vm: vm.name.clone(),
        context: spec.context,
        policy: spec.policy.clone(),
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
        if forward.is_some() {
            Some(prog_tx)
        } else {
            None
        },
        None,
    )
    .await;
    if let Some(f) = forward {
        f.abort();
    }
    let mut operator_results = Vec::new();
    for t in timers {
        if t.is_finished() {
            if let Ok(s) = t.await {
                operator_results.push(s);
            }
        } else {
            t.abort();
        }
    }
    let outcome = outcome?;
    step(&format!(
        "migration {}; watching the guest for {} s",
        outcome.report.state,
        spec.settle.as_secs()
    ));
    tokio::time::sleep(spec.settle).await;
    let report = &outcome.report;
    let summary = MigrationSummary {
        outcome: match report.state {
            MigrationState::Completed => "completed",
            MigrationState::Aborted => "aborted",
            MigrationState::Lost => "lost",
            _ => "failed",
        }
        .to_string(),
        switched_to_postcopy: report.switched_to_postcopy,
        paused_guest: report.paused_guest,
        total_time_s: report.total_time_ms as f64 / 1000.0,
        blackout_ms: None,
        bytes_sent: report.bytes_sent,
        ram_bytes: report.ram_bytes,
        corrupt_pages: 0,
        control_mismatches: 0,
        heartbeat_continuous: false,
        verify_passes_before: 0,
        verify_passes_after: 0,
        max_dest_gap_ms: 0.0,
        accelerator: env.accelerator.accelerator.to_string(),
        qemu_version: env.qemu.version.to_string(),
        context: spec.context.to_string(),
        policy: report.policy.clone(),
        actions: report.actions.clone(),
        source_running: outcome.source_running,
        source_final_run_state: outcome.source_final_run_state.clone(),
        destination_vm_present: outcome.destination_vm_present,
        guest_location: outcome.guest_location.clone(),
        capabilities: report.capabilities.clone(),
        post_copy_verdict: report.post_copy_verdict.clone(),
        passes: report.passes,
        link_rate: spec.link_rate.map(|r| r.to_string()),
        working_set_mib: spec.workload.working_set_mib,
        dirty_rate: spec.workload.rate.to_string(),
        memory_mib: spec.memory_mib,
        operator_results,
        error: report.error.clone(),
        events: report.events.clone(),
    };
    let dest_log = if report.state == MigrationState::Completed || report.state.is_after_switch() {
        outcome.destination_serial_log.clone()
    } else {
        None
    };
    Ok((summary, outcome.source_serial_log.clone(), dest_log))
}

/// Fills the integrity fields from the serial logs.
fn judge(
    summary: &mut MigrationSummary,
    src: &Path,
    dst: Option<&Path>,
) -> Result<(), ScenarioError> {
    let src_log = HostSerialLog::read(src)?;
    match dst {
        Some(dst) => {
            let dst_log = HostSerialLog::read(dst)?;
            let i = tern_guest::analyze_migration(&src_log, &dst_log);
            summary.blackout_ms = i.blackout_ms;
            summary.corrupt_pages = i.corrupt_pages;
            summary.control_mismatches = i.control_mismatches;
            summary.heartbeat_continuous = i.heartbeat_continuous;
            summary.verify_passes_before = i.verify_passes_before;
            summary.verify_passes_after = i.verify_passes_after;
            summary.max_dest_gap_ms = i.max_dest_gap_ms;
        }
        None => {
            let h = tern_guest::analyze_boot(&src_log);
            summary.corrupt_pages = h.corrupt_pages;
            summary.control_mismatches = h.control_mismatches;
            summary.heartbeat_continuous = h.sequence_anomalies.is_empty() && h.heartbeats > 0;
            summary.verify_passes_before = h.verify_passes;
        }
    }
    Ok(())
}
