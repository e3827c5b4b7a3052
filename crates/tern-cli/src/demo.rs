//! `tern demo`: one live migration on two lab hosts with a real guest, shown and judged.

use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_lab::LinkRate;
use tern_policy::MigrationContext;
use tern_qemu::PostCopyPermission;
use tern_scenario::{LabEnvironment, MigrationSummary, ScenarioProgress, ScenarioSpec};
use tokio::sync::mpsc;

use crate::Failure;
use crate::output::{OutputArgs, OutputFormat, print_json, require_root};

/// Whether a host permits post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HostPostCopy {
    /// The host permits post-copy.
    Permit,
    /// The host denies post-copy.
    Deny,
}

/// `tern demo` options.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Why the VM moves: evacuate, maintenance, balance or manual.
    #[arg(long, default_value = "manual")]
    context: MigrationContext,
    /// Policy deciding the migration (tern, or a baseline: nova, kubevirt, …).
    #[arg(long, default_value = tern_policy::DEFAULT_POLICY)]
    policy: String,
    /// The VM's post-copy permission.
    #[arg(long, default_value = "allowed")]
    vm_post_copy: PostCopyPermission,
    /// Whether the destination host permits post-copy.
    #[arg(long, value_enum, default_value_t = HostPostCopy::Permit)]
    dest_host_post_copy: HostPostCopy,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Working set the guest writes and verifies, in MiB.
    #[arg(long, default_value_t = 64)]
    working_set: u32,
    /// Page writes per second, or `max`.
    #[arg(long, default_value = "max")]
    dirty_rate: PageRate,
    /// Write pattern: seq, random or bursty (2 s of writes at the rate, 2 s idle).
    #[arg(long, default_value = "seq")]
    pattern: WritePattern,
    /// Link rate between the two hosts (e.g. 200mbit, 1gbit).
    #[arg(long, default_value = "200mbit")]
    link_rate: LinkRate,
    /// The VM's own downtime limit in ms (default: its SLA class's).
    #[arg(long)]
    max_downtime_ms: Option<u64>,
    /// The VM's SLA class (latency-critical, standard, batch).
    #[arg(long, default_value = "standard")]
    sla_class: String,
    /// Deadline in seconds for must-finish contexts.
    #[arg(long)]
    deadline: Option<u64>,
    /// Ask for force-complete this many seconds after the start.
    #[arg(long)]
    force_complete_after: Option<f64>,
    /// Ask for abort this many seconds after the start.
    #[arg(long)]
    abort_after: Option<f64>,
    /// Seconds to watch the guest after the migration.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Inject a fault (repeatable, or comma-separated): link-cut-precopy:SECS,
    /// link-cut-postcopy:SECS, link-cut-recovery:SECS, kill-dest-qemu-precopy,
    /// kill-dest-qemu-postcopy, kill-source-qemu-postcopy,
    /// kill-{source,dest}-agent-{precopy,postcopy}[:SECS away] (an agent kill runs the demo
    /// through one agent process per host); each may end in @SECS, when in its phase it
    /// fires. Faults combine freely.
    #[arg(long = "fault", value_delimiter = ',')]
    faults: Vec<tern_scenario::faults::FaultPlan>,
    /// Lab name used for the demo's hosts.
    #[arg(long, default_value = "demo")]
    lab_name: String,
    /// Evacuate a host instead: 3 lab hosts, an agent process per host, a controller process,
    /// guests of different kinds on h1 (idle, converging, faster than the link, post-copy
    /// forbidden) emptied to --deadline (default 180 s) through the controller's API.
    #[arg(long)]
    evacuate: bool,
    /// With --evacuate: how many guests to boot on h1 (2–5).
    #[arg(long, default_value_t = 5, requires = "evacuate")]
    vms: usize,
    /// Encrypt the migration stream (QEMU TLS with lab certificates made for this run: a CA,
    /// one host certificate per lab host, the destination accepting only the source host).
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    out: OutputArgs,
}

#[cfg(test)]
impl DemoArgs {
    /// The faults asked for, as `--fault` spells them.
    pub fn fault_names(&self) -> Vec<String> {
        self.faults.iter().map(ToString::to_string).collect()
    }
}

fn secs(v: Option<f64>, flag: &str) -> Result<Option<Duration>, Failure> {
    match v {
        None => Ok(None),
        Some(s) if (0.0..86_400.0).contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(Failure::input(anyhow::anyhow!(
            "{flag} {s} is invalid: give seconds between 0 and 86400"
        ))),
    }
}

/// Runs the demo.
pub async fn run(a: DemoArgs) -> Result<(), Failure> {
    if a.evacuate {
        return crate::demo_evacuate::run(crate::demo_evacuate::EvacuateDemoArgs {
            lab_name: a.lab_name,
            link_rate: a.link_rate,
            deadline_s: a.deadline.unwrap_or(180),
            vms: a.vms,
            settle: a.settle,
            output: a.out.output,
        })
        .await;
    }
    require_root("tern demo")?;
    if !tern_policy::POLICY_NAMES.contains(&a.policy.as_str()) {
        return Err(Failure::input(anyhow::anyhow!(
            "unknown policy {:?}: valid policies are {}",
            a.policy,
            tern_policy::POLICY_NAMES.join(", ")
        )));
    }
    let catalog = tern_policy::SlaCatalog::builtin();
    catalog.get(&a.sla_class).map_err(Failure::input)?;
    let spec = ScenarioSpec {
        lab_name: a.lab_name.clone(),
        link_rate: Some(a.link_rate),
        memory_mib: a.memory,
        workload: WorkloadParams {
            working_set_mib: a.working_set,
            rate: a.dirty_rate,
            pattern: a.pattern,
            verify: true,
        },
        context: a.context,
        policy: a.policy.clone(),
        vm_post_copy: a.vm_post_copy,
        source_permits_post_copy: true,
        destination_permits_post_copy: a.dest_host_post_copy == HostPostCopy::Permit,
        vm_max_downtime_ms: a.max_downtime_ms,
        sla_class: a.sla_class.clone(),
        deadline_ms: a.deadline.map(|s| s * 1000),
        force_complete_after: secs(a.force_complete_after, "--force-complete-after")?,
        abort_after: secs(a.abort_after, "--abort-after")?,
        settle: Duration::from_secs(a.settle),
        host_memory_mib: 4096,
        probe_seconds: 0,
        faults: a.faults.clone(),
        recovery_window: None,
        migration_tls: a.tls,
    };
    if u64::from(a.working_set) + 64 > a.memory {
        return Err(Failure::input(anyhow::anyhow!(
            "--working-set {} MiB does not fit in --memory {} MiB: leave at least 64 MiB for the guest kernel (try --memory {})",
            a.working_set,
            a.memory,
            WorkloadParams {
                working_set_mib: a.working_set,
                ..WorkloadParams::default()
            }
            .recommended_memory_mib()
        )));
    }
    // A fault that kills an agent needs agent processes; every fault combines with every
    // other on that backend too.
    let backend = if a.faults.iter().any(|f| f.needs_agents()) {
        crate::demo_agents::backend()
    } else {
        tern_scenario::HopBackend::InProcess
    };
    if a.tls && matches!(backend, tern_scenario::HopBackend::AgentProcesses(_)) {
        return Err(Failure::input(anyhow::anyhow!(
            "--tls cannot be combined with a --fault that kills an agent yet: that demo runs \
             lab agents over plain loopback; run --tls with the other faults"
        )));
    }
    let text = a.out.output == OutputFormat::Text;
    let env = tokio::task::spawn_blocking(move || {
        LabEnvironment::prepare(|s| {
            if text {
                eprintln!("· {s}");
            }
        })
    })
    .await
    .map_err(|e| Failure::failed(anyhow::anyhow!("setup task failed: {e}")))?
    .map_err(Failure::environment)?;
    if text {
        eprintln!(
            "· QEMU {} · accelerator {} ({})",
            env.qemu.version, env.accelerator.accelerator, env.accelerator.reason
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let link = a.link_rate.bytes_per_sec();
    let ui = tokio::spawn(show_progress(rx, text, link));
    let result = tern_scenario::run_scenario_with(&env, &spec, &backend, Some(tx)).await;
    let _ = ui.await;
    let summary = result.map_err(|e| match e {
        tern_scenario::ScenarioError::Agent(_) | tern_scenario::ScenarioError::Unsupported(_) => {
            Failure::input(e)
        }
        other => Failure::failed(other),
    })?;
    match a.out.output {
        OutputFormat::Json => print_json(&summary)?,
        OutputFormat::Text => print_summary(&summary),
    }
    if summary.outcome == "completed" && summary.integrity_ok() {
        Ok(())
    } else if summary.outcome == "aborted" && summary.integrity_ok() && summary.source_running {
        // An abort that leaves the guest intact on the source is what was asked for.
        Ok(())
    } else {
        Err(Failure::failed(anyhow::anyhow!(
            "migration {}{}",
            summary.outcome,
            if summary.integrity_ok() {
                String::new()
            } else {
                " and the guest's integrity check failed".to_string()
            }
        )))
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

async fn show_progress(mut rx: mpsc::UnboundedReceiver<ScenarioProgress>, text: bool, link: u64) {
    let mut bar: Option<ProgressBar> = None;
    while let Some(p) = rx.recv().await {
        if !text {
            continue;
        }
        match p {
            ScenarioProgress::Step(s) => {
                if let Some(b) = bar.take() {
                    b.finish();
                }
                eprintln!("· {s}");
            }
            ScenarioProgress::Migration(m) => {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(100);
                    b.set_style(
                        ProgressStyle::with_template("  {prefix:>15} [{bar:30}] {pos:>3}% {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    b
                });
                let pct = (m.remaining_bytes.min(m.total_bytes) * 100)
                    .checked_div(m.total_bytes)
                    .map_or(0, |left| 100 - left);
                b.set_prefix(m.qemu_status.clone());
                b.set_position(pct);
                let eta = m
                    .eta_ms
                    .map(|e| format!("ETA {:.1} s", e as f64 / 1000.0))
                    .unwrap_or_else(|| "ETA —".into());
                b.set_message(format!(
                    "sent {:.0} MiB, left {:.0} MiB, dirty {:.0} MiB/s vs link {:.0} MiB/s, pass {}, {eta}",
                    mib(m.transferred_bytes),
                    mib(m.remaining_bytes),
                    mib(m.dirty_bytes_per_s),
                    mib(link),
                    m.pass
                ));
            }
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
}

fn print_summary(s: &MigrationSummary) {
    println!();
    println!("outcome              {}", s.outcome);
    println!(
        "guest location       {}",
        s.guest_location.as_deref().unwrap_or("none (lost)")
    );
    println!("source running       {}", s.source_running);
    println!("switched to postcopy {}", s.switched_to_postcopy);
    println!(
        "stream encrypted     {}",
        if s.stream_encrypted {
            "yes (TLS, lab certificates)"
        } else {
            "no"
        }
    );
    println!("total time           {:.1} s", s.total_time_s);
    println!(
        "blackout             {}",
        s.blackout_ms
            .map(|b| format!("{b:.0} ms (host-measured heartbeat gap)"))
            .unwrap_or_else(|| "— (no switchover)".into())
    );
    println!(
        "bytes sent           {:.1} MiB of {:.0} MiB RAM",
        mib(s.bytes_sent),
        mib(s.ram_bytes)
    );
    println!(
        "integrity            {} (corrupt pages {}, control mismatches {}, heartbeats {}, verify passes after {})",
        if s.integrity_ok() { "OK" } else { "FAILED" },
        s.corrupt_pages,
        s.control_mismatches,
        if s.heartbeat_continuous {
            "continuous"
        } else {
            "BROKEN"
        },
        s.verify_passes_after
    );
    println!(
        "accelerator          {} · QEMU {}",
        s.accelerator, s.qemu_version
    );
    println!("context / policy     {} / {}", s.context, s.policy);
    println!("capabilities         {}", s.capabilities.join(", "));
    println!("post-copy            {}", s.post_copy_verdict);
    for a in &s.actions {
        println!(
            "action @{:>6.1}s      {}: {}",
            a.at_ms as f64 / 1000.0,
            a.text(),
            a.reason
        );
    }
    for f in &s.faults_injected {
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let what =
            if f.fault.starts_with("kill-source-agent") || f.fault.starts_with("kill-dest-agent") {
                format!(
                    "agent back after {} ms, re-attached {} ms later; migration seen {} meanwhile",
                    ms(f.restored_at_ms
                        .zip(f.fired_at_ms)
                        .map(|(r, k)| r.saturating_sub(k))),
                    ms(f.resumed_after_restore_ms),
                    if f.states_while_away.is_empty() {
                        "in no state (nobody to ask)".to_string()
                    } else {
                        f.states_while_away
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" → ")
                    }
                )
            } else {
                format!(
                    "detected after {} ms, resumed {} ms after the link came back",
                    ms(f.detected_after_ms),
                    ms(f.resumed_after_restore_ms)
                )
            };
        println!(
            "fault                {} at {} ms: {what}{}",
            f.fault,
            ms(f.fired_at_ms),
            f.error
                .as_ref()
                .map(|e| format!(" (error: {e})"))
                .unwrap_or_default()
        );
    }
    if s.recoveries > 0 {
        println!("recoveries           {}", s.recoveries);
    }
    for g in &s.heartbeat_unrecorded {
        println!(
            "console unrecorded   heartbeat {} → {} ({:?}) while a killed agent was away: lines lost, not the guest's",
            g.previous, g.next, g.side
        );
    }
    if let Some(n) = s.running_copies {
        println!("running copies       {n}");
    }
    for r in &s.operator_results {
        println!("operator             {r}");
    }
    if let Some(e) = &s.error {
        println!("error                {e}");
    }
}
