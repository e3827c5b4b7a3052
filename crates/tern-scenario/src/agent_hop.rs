//! One hop through real agent processes ([`crate::HopBackend::AgentProcesses`]): the path an
//! operator's migration takes (`tern lab up --agents`, then `tern migrate`), and the only one
//! on which an agent can be killed.
//!
//! Each lab host gets a `tern agent` process; the guest is booted and migrated through their
//! HTTP API. The source agent's view of the migration is polled into the same live-progress
//! channel the in-process runner publishes, so the fault injectors ([`crate::faults`]) and
//! the judgement are those of every other hop: link cuts, QEMU kills and agent kills combine
//! freely. While the source agent is dead its API does not answer and the progress simply
//! stands still. QEMU drives the migration on its own, so the guest must not notice any of
//! it: the summary is judged from the same host-timestamped serial logs.
//!
//! Everything started is removed on every path: the agents by PID ([`AgentFleet`]'s `Drop`),
//! then the lab, whose teardown kills every QEMU in its namespaces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_agent::api::{MigrationView, StartMigrationRequest};
use tern_agent::{AgentClient, VmInfo};
use tern_engine::{MigrationProgress, MigrationReport, MigrationState, OperatorCommand};
use tern_lab::agents::lab_agents_dir;
use tokio::sync::{mpsc, watch};

use crate::agents::{AgentFleet, AgentLauncher, AgentSettings, free_port_base};
use crate::faults::{self, FaultHost, FaultHosts};
use crate::{
    GUEST_READY_TIMEOUT, LabEnvironment, MigrationSummary, ScenarioError, ScenarioProgress,
    ScenarioSpec,
};

/// How long the whole migration may take before the hop gives up on it.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the source agent is asked for the migration's state.
const POLL: Duration = Duration::from_millis(250);

type Progress = Option<mpsc::UnboundedSender<ScenarioProgress>>;

/// Runs `spec` through agent processes started by `launcher`.
pub(crate) async fn run(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    launcher: Arc<dyn AgentLauncher>,
    progress: Progress,
) -> Result<MigrationSummary, ScenarioError> {
    let step = |s: String| {
        if let Some(p) = &progress {
            let _ = p.send(ScenarioProgress::Step(s));
        }
    };
    step(format!(
        "lab up: 2 hosts, link {}, one agent process per host",
        spec.link_text()
    ));
    let lab_guard = spec.lab_up()?;
    let settings = AgentSettings {
        port_base: free_port_base()?,
        memory_mib: spec.host_memory_mib,
        deny_post_copy_hosts: if spec.destination_permits_post_copy {
            Vec::new()
        } else {
            vec!["h2".into()]
        },
    };
    let result = match AgentFleet::start(&lab_guard, launcher, settings, "h1", "h2").await {
        Ok(fleet) => migrate(env, spec, &lab_guard, Arc::new(fleet), &progress).await,
        Err(e) => Err(e),
    };
    // The fleet (and with it the agents) is gone here; the lab goes when the guard drops.
    crate::keep_logs_for_post_mortem(&lab_agents_dir(&spec.lab_name), &spec.lab_name);
    step("agents stopped, lab down".into());
    result
}

/// Operator commands a spec asks for, sent to the source agent on their timers.
fn operator_timers(
    spec: &ScenarioSpec,
    source: &AgentClient,
    id: &str,
) -> Vec<tokio::task::JoinHandle<String>> {
    let mut timers = Vec::new();
    for (after, cmd) in [
        (spec.force_complete_after, OperatorCommand::ForceComplete),
        (spec.abort_after, OperatorCommand::Abort),
    ] {
        if let Some(after) = after {
            let client = source.clone();
            let id = id.to_string();
            timers.push(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                match client.operator(&id, cmd).await {
                    Ok(r) => format!("{cmd:?}: accepted: {}", r.result),
                    Err(e) => format!("{cmd:?}: refused: {e}"),
                }
            }));
        }
    }
    timers
}

/// The live progress of an agent's migration view, with the record's state (the agent's
/// word on where the migration is, also when it no longer runs an engine for it).
fn progress_of(view: &MigrationView) -> MigrationProgress {
    let mut p = view.progress.clone().unwrap_or_default();
    p.state = Some(view.record.state);
    p
}

/// Polls the source agent until the migration has ended, publishing each new view on
/// `tx` (and to the caller's progress). A dead agent is asked again until it answers.
async fn follow(
    source: &AgentClient,
    id: &str,
    tx: watch::Sender<MigrationProgress>,
    progress: &Progress,
) -> Result<MigrationView, ScenarioError> {
    let started = Instant::now();
    loop {
        if started.elapsed() > MIGRATION_TIMEOUT {
            return Err(ScenarioError::AgentProcess(format!(
                "migration {id} did not end within {} s",
                MIGRATION_TIMEOUT.as_secs()
            )));
        }
        if let Ok(view) = source.show_migration(id, u64::MAX).await {
            let p = progress_of(&view);
            if let (Some(out), Some(live)) = (progress, &view.progress) {
                let _ = out.send(ScenarioProgress::Migration(live.clone()));
            }
            tx.send_if_modified(|old| {
                let changed = *old != p;
                *old = p;
                changed
            });
            if view.record.finished_ms.is_some() {
                return Ok(view);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn migrate(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    lab: &tern_lab::Lab,
    fleet: Arc<AgentFleet>,
    progress: &Progress,
) -> Result<MigrationSummary, ScenarioError> {
    let step = |s: String| {
        if let Some(p) = progress {
            let _ = p.send(ScenarioProgress::Step(s));
        }
    };
    let source = fleet.client(FaultHost::Source).clone();
    let destination = fleet.client(FaultHost::Destination).clone();
    let vm = crate::vm_spec(env, spec);
    step(format!(
        "boot guest on h1 through its agent ({} MiB, working set {} MiB, {} page writes/s, {})",
        vm.memory_mib,
        spec.workload.working_set_mib,
        spec.workload.rate,
        env.accelerator.accelerator
    ));
    let created = source
        .create_vm(&vm)
        .await
        .map_err(|e| ScenarioError::AgentProcess(format!("creating the guest on h1: {e}")))?;
    crate::wait_guest_ready(&created.serial_log, 1, GUEST_READY_TIMEOUT).await?;

    step(format!(
        "migrate h1 → h2 through the agents (context {}, policy {})",
        spec.context, spec.policy
    ));
    let policy = spec
        .policy
        .parse()
        .map_err(|e: tern_policy::UnknownPolicy| tern_agent::AgentError::Invalid(e.to_string()))?;
    let record = source
        .start_migration(&StartMigrationRequest {
            vm: vm.name.clone(),
            to_host: "h2".into(),
            context: spec.context,
            policy,
            deadline_s: spec.deadline_ms.map(|ms| ms.div_ceil(1000)),
            link_bytes_per_s: spec.link_rate.map(|r| r.bytes_per_sec()),
        })
        .await
        .map_err(|e| ScenarioError::AgentProcess(format!("starting the migration: {e}")))?;
    let id = record.id.clone();
    fleet.set_migration(&id);
    let started = Instant::now();
    let timers = operator_timers(spec, &source, &id);
    let (tx, rx) = watch::channel(MigrationProgress {
        state: Some(record.state),
        ..MigrationProgress::default()
    });
    let injectors = faults::spawn_injectors(
        spec.faults.clone(),
        lab,
        &FaultHosts::Agents(fleet.clone()),
        &vm.name,
        &rx,
        started,
    );
    drop(rx);
    let followed = follow(&source, &id, tx, progress).await;
    // The progress channel is closed: injectors still waiting for their phase end.
    let fault_records = faults::collect(injectors).await;
    let operator_results = crate::operator_results(timers).await;
    let final_view = followed?;
    step(format!(
        "migration {}; watching the guest for {} s",
        final_view.record.state,
        spec.settle.as_secs()
    ));
    tokio::time::sleep(spec.settle).await;

    let full = source
        .show_migration(&id, 0)
        .await
        .map_err(|e| ScenarioError::AgentProcess(format!("reading migration {id}: {e}")))?;
    let on_source = source.show_vm(&vm.name).await.ok();
    let on_destination = destination.show_vm(&vm.name).await.ok();
    let outcome = outcome_of(&full, vm.memory_mib, &created, &on_source, &on_destination);
    let mut summary = crate::summary_from(
        env,
        &outcome,
        spec.context,
        spec.link_rate,
        &spec.workload,
        spec.memory_mib,
        operator_results,
    );
    summary.running_copies = Some(
        [&on_source, &on_destination]
            .iter()
            .filter(|i| running(i))
            .count() as u32,
    );
    summary.record_faults(fault_records);
    let state = full.record.state;
    let handed_over = state == MigrationState::Completed || state.is_after_switch();
    let dest_log = outcome.destination_serial_log.clone();
    crate::judge(
        &mut summary,
        &created.serial_log,
        dest_log.as_deref().filter(|_| handed_over),
    )?;
    summary.excuse_unrecorded_console();
    Ok(summary)
}

fn running(i: &Option<VmInfo>) -> bool {
    i.as_ref().is_some_and(|i| i.run_state.is_running())
}

/// The engine's outcome as the agents report it: the source agent's report (rebuilt by a
/// restarted agent from QEMU's statistics) and where each agent says the guest is.
fn outcome_of(
    full: &MigrationView,
    memory_mib: u64,
    created: &VmInfo,
    on_source: &Option<VmInfo>,
    on_destination: &Option<VmInfo>,
) -> tern_agent::MigrationOutcome {
    let rec = &full.record;
    let report = rec.report.clone().unwrap_or_else(|| MigrationReport {
        id: rec.id.clone(),
        policy: rec.policy.to_string(),
        state: rec.state,
        switched_to_postcopy: full.events.iter().any(|e| {
            matches!(&e.event.kind, tern_engine::MigrationEventKind::State { to, .. }
                if *to == MigrationState::Postcopy)
        }),
        paused_guest: false,
        total_time_ms: rec
            .finished_ms
            .unwrap_or(rec.updated_ms)
            .saturating_sub(rec.created_ms),
        bytes_sent: 0,
        ram_bytes: memory_mib << 20,
        passes: 0,
        qemu_downtime_ms: None,
        capabilities: Vec::new(),
        post_copy_verdict: "unknown".into(),
        actions: Vec::new(),
        events: full.events.iter().map(|e| e.event.clone()).collect(),
        error: rec.error.clone(),
        recoveries: 0,
        plan: None,
        stream_encrypted: rec.stream_encrypted,
    });
    let guest_location = if running(on_destination) {
        Some("h2".to_string())
    } else if running(on_source) {
        Some("h1".to_string())
    } else {
        None
    };
    tern_agent::MigrationOutcome {
        source_host: "h1".into(),
        destination_host: "h2".into(),
        guest_location,
        source_running: running(on_source),
        source_final_run_state: on_source.as_ref().map(|i| i.run_state.to_string()),
        destination_vm_present: on_destination.is_some(),
        source_serial_log: created.serial_log.clone(),
        destination_serial_log: on_destination.as_ref().map(|i| i.serial_log.clone()),
        report,
        source_migration_cpu_ms: None,
        destination_migration_cpu_ms: None,
    }
}
