//! The demo run through real agent processes, for faults that kill an agent
//! (`tern demo --fault kill-source-agent-postcopy`).
//!
//! The ordinary demo drives the migration in-process ([`tern_scenario::run_scenario`]): there
//! is no agent to kill. Here each lab host gets a `tern agent` process (exactly what
//! `tern lab up --agents` starts); the guest is booted and migrated through their HTTP API,
//! the source agent is killed with SIGKILL one second into post-copy and started again, and
//! the restarted agent must re-attach to its QEMU, see the migration through and record it.
//! QEMU drives post-copy on its own, so the guest must not notice: the summary is judged from
//! the same host-timestamped serial logs as every other demo.
//!
//! Everything started is removed on every path: the agents by PID ([`AgentsGuard`]), then the
//! lab, whose teardown kills every QEMU in its namespaces.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use tern_agent::AgentClient;
use tern_agent::api::StartMigrationRequest;
use tern_engine::{MigrationReport, MigrationState, OperatorCommand};
use tern_lab::Lab;
use tern_lab::agents::{LabAgents, lab_agents_dir};
use tern_scenario::faults::{FaultAction, FaultRecord, FaultTrigger};
use tern_scenario::{LabEnvironment, MigrationSummary, ScenarioProgress, ScenarioSpec};
use tokio::sync::mpsc;

use crate::Failure;
use crate::lab_agents::{LabAgentSettings, ensure_agents, stop_agents};

/// How long the whole migration may take before the demo gives up on it.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a killed agent may take to come back and answer again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// Stops the lab's agents when dropped (before the lab itself goes down).
struct AgentsGuard {
    lab: String,
}

impl Drop for AgentsGuard {
    fn drop(&mut self) {
        stop_agents(&self.lab);
    }
}

/// A port base whose two agent ports (base+1, base+2) are free on 127.0.0.1 right now.
///
/// Searched below Linux's ephemeral range (32768–60999 by default), where no outgoing
/// connection can be holding the port when the killed agent is started again.
fn free_port_base() -> Result<u16, Failure> {
    (17_000u16..32_000)
        .step_by(10)
        .find(|base| (1..=2).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .ok_or_else(|| {
            Failure::environment(anyhow::anyhow!(
                "no two free TCP ports on 127.0.0.1 between 17001 and 32000 for the demo's agents"
            ))
        })
}

fn agent_url(lab: &str, host: &str) -> Result<String, Failure> {
    let agents = LabAgents::load(lab).map_err(Failure::environment)?;
    agents
        .agents
        .get(host)
        .map(|a| a.url.clone())
        .ok_or_else(|| Failure::failed(anyhow::anyhow!("lab {lab} has no agent for {host}")))
}

fn agent_pid(lab: &str, host: &str) -> Result<u32, Failure> {
    let agents = LabAgents::load(lab).map_err(Failure::environment)?;
    agents
        .agents
        .get(host)
        .map(|a| a.pid)
        .ok_or_else(|| Failure::failed(anyhow::anyhow!("lab {lab} has no agent for {host}")))
}

async fn start_agents(lab: &Lab, settings: LabAgentSettings) -> Result<(), Failure> {
    let lab = lab.clone();
    tokio::task::spawn_blocking(move || ensure_agents(&lab, settings).map(|_| ()))
        .await
        .map_err(|e| Failure::failed(anyhow::anyhow!("agent start task failed: {e}")))?
}

/// Runs `spec` through agent processes; its faults must all be agent kills (checked by the
/// caller). Returns the same summary as the in-process demo.
pub async fn run(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    progress: mpsc::UnboundedSender<ScenarioProgress>,
) -> Result<MigrationSummary, Failure> {
    let step = |s: String| {
        let _ = progress.send(ScenarioProgress::Step(s));
    };
    step(format!(
        "lab up: 2 hosts, link {}, one agent process per host",
        spec.link_text()
    ));
    let lab_guard = spec.lab_up().map_err(Failure::environment)?;
    let lab: &Lab = &lab_guard;
    let _agents_guard = AgentsGuard {
        lab: spec.lab_name.clone(),
    };
    let settings = LabAgentSettings {
        tls: false,
        port_base: free_port_base()?,
        memory_mib: spec.host_memory_mib,
        deny_post_copy_hosts: if spec.destination_permits_post_copy {
            Vec::new()
        } else {
            vec!["h2".into()]
        },
    };
    start_agents(lab, settings.clone()).await?;
    let result = migrate_through_agents(env, spec, lab, settings, &step, &progress).await;
    tern_scenario::keep_logs_for_post_mortem(&lab_agents_dir(&spec.lab_name), &spec.lab_name);
    step("agents stopped, lab down".into());
    result
}

async fn migrate_through_agents(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    lab: &Lab,
    settings: LabAgentSettings,
    step: &impl Fn(String),
    progress: &mpsc::UnboundedSender<ScenarioProgress>,
) -> Result<MigrationSummary, Failure> {
    let lab_name = lab.name().to_string();
    let source = AgentClient::new(&agent_url(&lab_name, "h1")?);
    let dest_url = agent_url(&lab_name, "h2")?;
    let destination = AgentClient::new(&dest_url);
    let vm = tern_scenario::vm_spec(env, spec);
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
        .map_err(|e| Failure::failed(anyhow::anyhow!("creating the guest on h1: {e}")))?;
    tern_scenario::wait_guest_ready(&created.serial_log, 1, Duration::from_secs(90))
        .await
        .map_err(Failure::failed)?;

    step(format!(
        "migrate h1 → h2 through the agents (context {}, policy {})",
        spec.context, spec.policy
    ));
    let record = source
        .start_migration(&StartMigrationRequest {
            vm: vm.name.clone(),
            to_host: "h2".into(),
            context: spec.context,
            policy: spec.policy.parse().map_err(Failure::input)?,
            deadline_s: spec.deadline_ms.map(|ms| ms.div_ceil(1000)),
            link_bytes_per_s: spec.link_rate.map(|r| r.bytes_per_sec()),
        })
        .await
        .map_err(|e| Failure::failed(anyhow::anyhow!("starting the migration: {e}")))?;
    let id = record.id.clone();
    let started = Instant::now();
    let ms = |at: Instant| at.duration_since(started).as_millis() as u64;

    let mut timers = Vec::new();
    for (after, cmd) in [
        (spec.force_complete_after, OperatorCommand::ForceComplete),
        (spec.abort_after, OperatorCommand::Abort),
    ] {
        if let Some(after) = after {
            let client = source.clone();
            let id = id.clone();
            timers.push(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                match client.operator(&id, cmd).await {
                    Ok(r) => format!("{cmd:?}: accepted: {}", r.result),
                    Err(e) => format!("{cmd:?}: refused: {e}"),
                }
            }));
        }
    }

    let mut plans: Vec<(tern_scenario::faults::FaultPlan, FaultRecord)> = spec
        .faults
        .iter()
        .map(|p| {
            (
                *p,
                FaultRecord {
                    fault: p.to_string(),
                    fired_at_ms: None,
                    restored_at_ms: None,
                    detected_after_ms: None,
                    resumed_after_restore_ms: None,
                    error: None,
                },
            )
        })
        .collect();
    let mut phase_since: Option<(MigrationState, Instant)> = None;
    let mut restarted_at: Option<Instant> = None;
    let final_view = loop {
        if started.elapsed() > MIGRATION_TIMEOUT {
            return Err(Failure::failed(anyhow::anyhow!(
                "migration {id} did not end within {} s",
                MIGRATION_TIMEOUT.as_secs()
            )));
        }
        // While the source agent is dead (or restarting) its API does not answer: keep asking.
        let view = match source.show_migration(&id, u64::MAX).await {
            Ok(v) => v,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        if let Some(p) = &view.progress {
            let _ = progress.send(ScenarioProgress::Migration(p.clone()));
        }
        let state = view.record.state;
        if phase_since.is_none_or(|(s, _)| s != state) {
            phase_since = Some((state, Instant::now()));
        }
        if let Some(r) = restarted_at {
            // The restarted agent has re-attached once it answers for the migration again.
            for (_, rec) in plans.iter_mut() {
                if rec.restored_at_ms.is_some() && rec.resumed_after_restore_ms.is_none() {
                    rec.resumed_after_restore_ms = Some(r.elapsed().as_millis() as u64);
                }
            }
            restarted_at = None;
        }
        if view.record.finished_ms.is_some() {
            break view;
        }
        for (plan, rec) in plans.iter_mut() {
            if rec.fired_at_ms.is_some() || plan.action != FaultAction::KillSourceAgent {
                continue;
            }
            let (want, after) = match plan.trigger {
                FaultTrigger::Precopy { after } => (MigrationState::Precopy, after),
                FaultTrigger::Postcopy { after } => (MigrationState::Postcopy, after),
                FaultTrigger::Recovering { after } => (MigrationState::Recovering, after),
            };
            let due = phase_since.is_some_and(|(s, since)| s == want && since.elapsed() >= after);
            if !due {
                continue;
            }
            let pid = agent_pid(&lab_name, "h1")?;
            step(format!(
                "fault: kill -9 the source agent (pid {pid}) during {state}; QEMU keeps migrating"
            ));
            rec.fired_at_ms = Some(ms(Instant::now()));
            if let Err(e) = tern_lab::kill_process(pid, tern_lab::Signal::SIGKILL) {
                rec.error = Some(e.to_string());
                continue;
            }
            let t = Instant::now();
            while tern_qemu::process::pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            step("restart the source agent: it re-attaches to its QEMU".into());
            start_agents(lab, settings.clone()).await?;
            let back = Instant::now();
            rec.restored_at_ms = Some(ms(back));
            restarted_at = Some(back);
            if back.duration_since(t) > RESTART_TIMEOUT {
                rec.error = Some(format!(
                    "the agent took {:.1} s to come back",
                    back.duration_since(t).as_secs_f64()
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let operator_results = tern_scenario::operator_results(timers).await;
    step(format!(
        "migration {}; watching the guest for {} s",
        final_view.record.state,
        spec.settle.as_secs()
    ));
    tokio::time::sleep(spec.settle).await;

    let full = source
        .show_migration(&id, 0)
        .await
        .map_err(|e| Failure::failed(anyhow::anyhow!("reading migration {id}: {e}")))?;
    let rec = &full.record;
    let report = rec.report.clone().unwrap_or_else(|| MigrationReport {
        id: rec.id.clone(),
        policy: rec.policy.to_string(),
        state: rec.state,
        switched_to_postcopy: full
            .events
            .iter()
            .any(|e| matches!(&e.event.kind, tern_engine::MigrationEventKind::State { to, .. } if *to == MigrationState::Postcopy)),
        paused_guest: false,
        total_time_ms: rec.finished_ms.unwrap_or(rec.updated_ms).saturating_sub(rec.created_ms),
        bytes_sent: 0,
        ram_bytes: vm.memory_mib << 20,
        passes: 0,
        qemu_downtime_ms: None,
        capabilities: Vec::new(),
        post_copy_verdict: "unknown".into(),
        actions: Vec::new(),
        events: full.events.iter().map(|e| e.event.clone()).collect(),
        error: rec.error.clone(),
        recoveries: 0,
        plan: None,
        stream_encrypted: false,
    });
    let on_source = source.show_vm(&vm.name).await.ok();
    let on_destination = destination.show_vm(&vm.name).await.ok();
    let running =
        |i: &Option<tern_agent::VmInfo>| i.as_ref().is_some_and(|i| i.run_state.is_running());
    let guest_location = if running(&on_destination) {
        Some("h2".to_string())
    } else if running(&on_source) {
        Some("h1".to_string())
    } else {
        None
    };
    let destination_serial_log = on_destination.as_ref().map(|i| i.serial_log.clone());
    let outcome = tern_agent::MigrationOutcome {
        source_host: "h1".into(),
        destination_host: "h2".into(),
        guest_location,
        source_running: running(&on_source),
        source_final_run_state: on_source.as_ref().map(|i| i.run_state.to_string()),
        destination_vm_present: on_destination.is_some(),
        source_serial_log: created.serial_log.clone(),
        destination_serial_log: destination_serial_log.clone(),
        report,
        source_migration_cpu_ms: None,
        destination_migration_cpu_ms: None,
    };
    let mut summary = tern_scenario::summary_from(
        env,
        &outcome,
        spec.context,
        spec.link_rate,
        &spec.workload,
        spec.memory_mib,
        operator_results,
    );
    summary.record_faults(plans.into_iter().map(|(_, r)| r).collect());
    let handed_over = rec.state == MigrationState::Completed || rec.state.is_after_switch();
    tern_scenario::judge(
        &mut summary,
        &created.serial_log,
        destination_serial_log.as_deref().filter(|_| handed_over),
    )
    .map_err(Failure::failed)?;
    Ok(summary)
}
