//! One migration between two hosts: admission checks, destination preparation, the engine
//! run, and cleanup that leaves the guest in exactly one place.
//!
//! Invariant: when this returns, the guest runs on exactly one host — the destination after
//! `completed`, the source after `failed`/`aborted` — or, for `lost`, the report says why
//! and what is left. Nothing is started before every admission check passed.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tern_engine::{
    DEFAULT_POLL_INTERVAL, MigrationProgress, MigrationReport, MigrationRunner, MigrationSetup,
    MigrationState, OperatorRequest,
};
use tern_policy::{MigrationContext, PlanInput, PolicyName, SlaCatalog};
use tokio::sync::{mpsc, watch};

use crate::host::HostRuntime;
use crate::{AgentError, admission};

/// What an operator (or a controller) asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationOrder {
    /// The VM to move.
    pub vm: String,
    /// Why it moves; decides how hard tern tries to finish.
    pub context: MigrationContext,
    /// The policy (`tern` or a baseline).
    pub policy: PolicyName,
    /// Link rate between the hosts in bytes/s, when known (lab links are shaped).
    pub link_bytes_per_s: Option<u64>,
    /// Deadline for `maintenance`/`evacuate`, in ms from the start.
    pub deadline_ms: Option<u64>,
    /// Seconds of `calc-dirty-rate` probing before starting (0 = none).
    pub probe_seconds: u64,
}

/// The result of a migration, with where to find each side's serial log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationOutcome {
    /// The engine's report (state, actions, bytes, events).
    pub report: MigrationReport,
    /// Source host name.
    pub source_host: String,
    /// Destination host name.
    pub destination_host: String,
    /// Where the guest runs now (`None` when lost).
    pub guest_location: Option<String>,
    /// Whether the source QEMU still runs the guest.
    pub source_running: bool,
    /// The source QEMU's run state when the migration ended (`postmigrate` after a
    /// completed pre-copy or post-copy, `running` after an abort).
    pub source_final_run_state: Option<String>,
    /// Whether a destination QEMU for this VM still exists after cleanup (it must not,
    /// unless the migration completed).
    pub destination_vm_present: bool,
    /// The source's serial log.
    pub source_serial_log: PathBuf,
    /// The destination's serial log (exists only if the destination was started).
    pub destination_serial_log: Option<PathBuf>,
    /// CPU time the source QEMU spent outside its vCPUs during the migration (ms): the
    /// migration's cost on the source (stream, TLS, dirty tracking). `None` if unreadable.
    #[serde(default)]
    pub source_migration_cpu_ms: Option<u64>,
    /// The same for the destination QEMU, from `migrate-incoming` to the end.
    #[serde(default)]
    pub destination_migration_cpu_ms: Option<u64>,
}

/// The facts of one in-process host, for [`admission::admit`].
fn side<'a>(h: &'a HostRuntime, vm: &str) -> admission::HostSide<'a> {
    admission::HostSide {
        name: &h.identity().name,
        memory_mib: h.identity().memory_mib,
        free_memory_mib: h.free_memory_mib(),
        migration: h.settings(),
        has_vm_named: h.has_vm(vm),
        userfaultfd: tern_qemu::userfaultfd_available(),
    }
}

/// Checks an order against both (in-process) hosts without changing anything, through the
/// one admission path, and returns the policy's input.
pub fn check_order(
    source: &HostRuntime,
    destination: &HostRuntime,
    order: &MigrationOrder,
    catalog: &SlaCatalog,
) -> Result<PlanInput, AgentError> {
    let spec = source.spec(&order.vm)?;
    if source.migration_tls() != destination.migration_tls() {
        let mode = |h: &HostRuntime| if h.migration_tls() { "required" } else { "off" };
        return Err(AgentError::Conflict(format!(
            "host {} has migration_tls = {} but host {} has migration_tls = {}: a stream is \
             encrypted at both ends or at neither; set the same mode on both hosts",
            source.identity().name,
            mode(source),
            destination.identity().name,
            mode(destination)
        )));
    }
    let migrating = source.is_migrating(&order.vm).then_some("in progress");
    let vm = admission::SourceVm {
        spec: &spec,
        role: source.role(&order.vm)?,
        migrating,
    };
    admission::admit(
        order,
        vm,
        side(source, &order.vm),
        side(destination, &order.vm),
        catalog,
    )
}

/// Migrates `order.vm` from `source` to `destination`.
///
/// `progress` receives the engine's live progress receiver once the migration started, and
/// `control` carries operator commands (force-complete, abort, bandwidth).
pub async fn migrate(
    source: &HostRuntime,
    destination: &HostRuntime,
    order: MigrationOrder,
    catalog: &SlaCatalog,
    control: mpsc::Receiver<OperatorRequest>,
    progress: Option<tokio::sync::oneshot::Sender<watch::Receiver<MigrationProgress>>>,
    event_sink: Option<mpsc::UnboundedSender<tern_engine::MigrationEvent>>,
) -> Result<MigrationOutcome, AgentError> {
    migrate_with(
        source,
        destination,
        order,
        catalog,
        control,
        progress,
        event_sink,
        |_| {},
    )
    .await
}

/// [`migrate`], with a hook that adjusts the policy's input before planning (experiments that
/// change a permission between migrations of the same guest, whose boot-time spec is fixed).
#[allow(clippy::too_many_arguments)]
pub async fn migrate_with(
    source: &HostRuntime,
    destination: &HostRuntime,
    order: MigrationOrder,
    catalog: &SlaCatalog,
    control: mpsc::Receiver<OperatorRequest>,
    progress: Option<tokio::sync::oneshot::Sender<watch::Receiver<MigrationProgress>>>,
    event_sink: Option<mpsc::UnboundedSender<tern_engine::MigrationEvent>>,
    adjust: impl FnOnce(&mut PlanInput),
) -> Result<MigrationOutcome, AgentError> {
    let mut input = check_order(source, destination, &order, catalog)?;
    adjust(&mut input);
    let policy = admission::policy_of(&order);
    let spec = source.spec(&order.vm)?;
    source.begin_outbound(&order.vm)?;
    let port = match destination.begin_inbound(&order.vm) {
        Ok(p) => p,
        Err(e) => {
            source.end_migration(&order.vm);
            return Err(e);
        }
    };
    let release = || {
        source.end_migration(&order.vm);
        destination.end_migration(&order.vm);
    };
    let source_log = source.show(&order.vm).await.map(|i| i.serial_log)?;
    let dest_qmp = match destination
        .prepare_incoming(spec.clone(), &source.identity().name)
        .await
    {
        Ok(q) => q,
        Err(e) => {
            release();
            return Err(e);
        }
    };
    let dest_log = destination.show(&order.vm).await.ok().map(|i| i.serial_log);
    let source_qmp = source.qmp(&order.vm)?;
    let setup = MigrationSetup {
        id: format!(
            "{}-{}-to-{}",
            order.vm,
            source.identity().name,
            destination.identity().name
        ),
        uri: format!("tcp:{}:{}", destination.identity().migration_address, port),
        plan_input: input,
        poll_interval: DEFAULT_POLL_INTERVAL,
        probe_seconds: order.probe_seconds,
        recovery_window: std::time::Duration::from_secs(
            source.settings().postcopy_recovery_window_s,
        ),
        postcopy_stall_timeout: tern_engine::DEFAULT_POSTCOPY_STALL_TIMEOUT,
        tls: source.source_stream_tls(&destination.identity().name),
    };
    let mut runner = MigrationRunner::new(source_qmp, Box::new(dest_qmp), policy, setup);
    if let Some(sink) = event_sink {
        runner = runner.with_event_sink(sink);
    }
    if let Some(tx) = progress {
        let _ = tx.send(runner.progress());
    }
    let cpu_of = |h: &HostRuntime| h.pid(&order.vm).ok().and_then(tern_qemu::qemu_cpu);
    let (source_cpu_before, destination_cpu_before) = (cpu_of(source), cpu_of(destination));
    let mut report = runner.run(control).await;
    let cpu_used = |before: Option<tern_qemu::QemuCpu>, h: &HostRuntime| {
        Some(cpu_of(h)?.non_vcpu_ms_since(&before?))
    };
    let source_migration_cpu_ms = cpu_used(source_cpu_before, source);
    let destination_migration_cpu_ms = cpu_used(destination_cpu_before, destination);
    if report.state == MigrationState::Lost {
        // Say which QEMU died and how: the engine only saw its QMP connection drop.
        let exits: Vec<String> = [(source, "source"), (destination, "destination")]
            .iter()
            .filter_map(|(h, side)| {
                h.exit_report(&order.vm)
                    .map(|r| format!("{side} {}: {r}", h.identity().name))
            })
            .collect();
        if !exits.is_empty() {
            let text = exits.join("; ");
            report.events.push(tern_engine::MigrationEvent {
                at_ms: report.total_time_ms,
                kind: tern_engine::MigrationEventKind::Note { text: text.clone() },
            });
            report.error = Some(match report.error.take() {
                Some(e) => format!("{e}; {text}"),
                None => text,
            });
        }
    }
    let source_final_run_state = match source.qmp(&order.vm) {
        Ok(q) => q
            .query_status()
            .await
            .ok()
            .map(|s| s.status.as_str().to_string()),
        Err(_) => None,
    };

    let (guest_location, source_running) = match report.state {
        MigrationState::Completed => {
            // The guest runs on the destination: the source QEMU (in `postmigrate`) goes.
            let _ = source.stop_vm(&order.vm).await;
            let _ = destination.promote_incoming(&order.vm);
            (Some(destination.identity().name.clone()), false)
        }
        MigrationState::Lost | MigrationState::Stranded | MigrationState::Unknown => {
            // Keep both QEMUs for the operator: the report says what is left where.
            (None, source.has_vm(&order.vm))
        }
        _ => {
            // Before the switch: the source keeps the guest; the destination QEMU goes.
            let _ = destination.kill_vm(&order.vm).await;
            let running = match source.qmp(&order.vm) {
                Ok(q) => q.query_status().await.map(|s| s.running).unwrap_or(false),
                Err(_) => false,
            };
            (Some(source.identity().name.clone()), running)
        }
    };
    release();
    let destination_vm_present = destination.has_vm(&order.vm);
    Ok(MigrationOutcome {
        source_final_run_state,
        destination_vm_present,
        report,
        source_host: source.identity().name.clone(),
        destination_host: destination.identity().name.clone(),
        guest_location,
        source_running,
        source_serial_log: source_log,
        destination_serial_log: dest_log,
        source_migration_cpu_ms,
        destination_migration_cpu_ms,
    })
}
