//! One hop in this process ([`crate::HopBackend::InProcess`]): two in-process host runtimes
//! and the runner (`tern_agent::migrate`), with the runner's own live progress feeding the
//! fault injectors. No agent process exists, so agent kills are refused.

use super::*;

pub(crate) async fn run(
    env: &LabEnvironment,
    spec: &ScenarioSpec,
    progress: Option<mpsc::UnboundedSender<ScenarioProgress>>,
) -> Result<MigrationSummary, ScenarioError> {
    if let Some(f) = spec.faults.iter().find(|f| f.needs_agents()) {
        return Err(ScenarioError::Unsupported(format!(
            "fault {f} kills an agent process, but this hop runs in-process; run it through \
             agent processes (`tern demo --fault {f}` does)"
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
    let hosts =
        crate::with_lab_migration_tls(hosts, &runtime.path().join("tls"), spec.migration_tls)?;
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
        let hosts = faults::FaultHosts::InProcess {
            source: src2,
            destination: dst2,
        };
        let injectors = faults::spawn_injectors(fault_plans, &lab2, &hosts, &vm_name, &rx, started);
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
