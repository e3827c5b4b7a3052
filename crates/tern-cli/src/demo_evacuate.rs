//! `tern demo --evacuate`: a host evacuation on three lab hosts through real agent and
//! controller processes (a thin wrapper over `tern_scenario::evacuation`): prints the
//! controller's plan and predicted makespan, runs it through the controller's API, verifies
//! every guest from its serial logs, prints actual vs predicted.

use std::time::Duration;

use tern_lab::LinkRate;
use tern_scenario::LabEnvironment;
use tern_scenario::evacuation::{
    ClusterSpec, EvacuationGuest, EvacuationProgress, EvacuationReport, EvacuationSpec,
    run_evacuation,
};
use tern_server::evacuation::EvacuationView;
use tern_server::model::{EvacuationPlan, PlanTrigger};
use tokio::sync::mpsc;

use crate::Failure;
use crate::output::{OutputFormat, print_json, require_root};

/// Guests the demo can boot on h1 (the demo set).
pub const MAX_VMS: usize = 5;

/// What `tern demo --evacuate` is asked for.
#[derive(Debug, Clone)]
pub struct EvacuateDemoArgs {
    /// Lab name.
    pub lab_name: String,
    /// Link rate of every lab host.
    pub link_rate: LinkRate,
    /// Deadline (s).
    pub deadline_s: u64,
    /// Guests to boot on h1 (2..=5).
    pub vms: usize,
    /// Seconds to watch the guests on their new hosts.
    pub settle: u64,
    /// Output format.
    pub output: OutputFormat,
}

/// The guests of a demo with `n` VMs: the CI set for 3 or fewer, the demo set cut to `n`
/// otherwise.
pub fn guests(n: usize) -> Result<Vec<EvacuationGuest>, Failure> {
    if !(2..=MAX_VMS).contains(&n) {
        return Err(Failure::input(anyhow::anyhow!(
            "--vms {n} is invalid: give 2 to {MAX_VMS} guests"
        )));
    }
    Ok(if n <= 3 {
        EvacuationGuest::ci_set().into_iter().take(n).collect()
    } else {
        EvacuationGuest::demo_set().into_iter().take(n).collect()
    })
}

/// Runs the evacuation demo.
pub async fn run(a: EvacuateDemoArgs) -> Result<(), Failure> {
    require_root("tern demo --evacuate")?;
    if a.deadline_s == 0 || a.deadline_s > 86_400 {
        return Err(Failure::input(anyhow::anyhow!(
            "--deadline {} is invalid: give seconds between 1 and 86400",
            a.deadline_s
        )));
    }
    let guests = guests(a.vms)?;
    let text = a.output == OutputFormat::Text;
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
    let tern_binary = std::env::current_exe()
        .map_err(|e| Failure::environment(anyhow::anyhow!("cannot find the tern binary: {e}")))?;
    let spec = EvacuationSpec {
        cluster: ClusterSpec {
            lab_name: a.lab_name.clone(),
            hosts: 3,
            link_rate: a.link_rate,
            host_memory_mib: 2048,
            tern_binary,
        },
        guests,
        deadline_s: a.deadline_s,
        settle: Duration::from_secs(a.settle),
        timeout: Duration::from_secs(a.deadline_s.saturating_mul(2).max(120)),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let ui = tokio::spawn(show_progress(rx, text));
    let result = run_evacuation(&env, spec, Some(tx)).await;
    let _ = ui.await;
    let report = result.map_err(|e| match e {
        tern_scenario::evacuation::EvacuationError::Invalid(_) => Failure::input(e),
        tern_scenario::evacuation::EvacuationError::Lab(_) => Failure::environment(e),
        other => Failure::failed(other),
    })?;
    match a.output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => print_report(&report),
    }
    if report.is_success() {
        Ok(())
    } else {
        Err(Failure::failed(anyhow::anyhow!(
            "evacuation {}{}{}",
            report.outcome,
            if report.deadline_met {
                ""
            } else {
                ", deadline missed"
            },
            if report.vms.iter().all(|v| v.is_intact()) {
                ""
            } else {
                ", a guest did not move intact"
            }
        )))
    }
}

async fn show_progress(mut rx: mpsc::UnboundedReceiver<EvacuationProgress>, text: bool) {
    let mut last_line = String::new();
    while let Some(p) = rx.recv().await {
        if !text {
            continue;
        }
        match p {
            EvacuationProgress::Step(s) => eprintln!("· {s}"),
            EvacuationProgress::Plan(plan) => print_plan(&plan),
            EvacuationProgress::Status(view) => {
                let line = status_line(&view);
                if line != last_line {
                    eprintln!("  {line}");
                    last_line = line;
                }
            }
        }
    }
}

/// The plan as a table, on stderr (stdout carries the final report).
fn print_plan(plan: &EvacuationPlan) {
    eprintln!(
        "· plan ({} planner): {} VMs, concurrency {}, predicted makespan {:.1} s (lower bound {:.1} s), deadline {} s: {}",
        plan.planner,
        plan.migrations.len(),
        plan.concurrency,
        plan.predicted_makespan_s,
        plan.lower_bound_s,
        plan.deadline_s,
        plan.deadline_verdict
    );
    eprintln!(
        "  {:<8} {:<5} {:>8} {:>8} {:<10} {:<22} reason",
        "VM", "to", "start s", "dur s", "post-copy", "starts"
    );
    for m in &plan.migrations {
        let trigger = match &m.trigger {
            PlanTrigger::Now => "now".to_string(),
            PlanTrigger::AlreadyRunning => "already running".to_string(),
            PlanTrigger::AfterMigrationOf { vm } => format!("after {vm}"),
            PlanTrigger::AtTime { at_s } => format!("at {at_s:.1} s"),
        };
        let pc = match (m.needs_post_copy, m.post_copy_permitted) {
            (true, true) => "needed",
            (true, false) => "needed/no",
            (false, true) => "permitted",
            (false, false) => "forbidden",
        };
        eprintln!(
            "  {:<8} {:<5} {:>8.1} {:>8.1} {:<10} {:<22} {}",
            m.vm, m.destination, m.start_s, m.duration_s, pc, trigger, m.reason
        );
    }
    for s in &plan.suggestions {
        eprintln!("  suggestion: {s}");
    }
}

/// One line per change: every VM's state, and elapsed vs predicted.
fn status_line(view: &EvacuationView) -> String {
    let e = &view.evacuation;
    let elapsed = (tern_server::model::now_ms().saturating_sub(e.created_ms)) as f64 / 1000.0;
    let vms: Vec<String> = view
        .migrations
        .iter()
        .map(|m| {
            format!(
                "{}→{} {}{}",
                m.vm,
                m.destination,
                m.state.as_str(),
                if m.switched_to_postcopy { " (pc)" } else { "" }
            )
        })
        .collect();
    format!(
        "[{:>5.0} s of predicted {:.0} s] {} · {}",
        elapsed.floor(),
        e.plan.predicted_makespan_s,
        tern_server::model::enum_str(&e.state),
        vms.join(", ")
    )
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"))
}

fn print_report(r: &EvacuationReport) {
    println!();
    println!(
        "evacuation {} of {}: {}",
        r.evacuation_id, r.host, r.outcome
    );
    println!(
        "makespan   predicted {:.1} s, actual {} s (error {}), lower bound {:.1} s",
        r.predicted_makespan_s,
        opt_s(r.actual_makespan_s),
        r.prediction_error_pct
            .map_or_else(|| "—".to_string(), |p| format!("{p:+.0} %")),
        r.lower_bound_s
    );
    println!(
        "deadline   {} s: {} · link {} · re-plans {}",
        r.deadline_s,
        if r.deadline_met { "met" } else { "MISSED" },
        r.link_rate,
        r.replans
    );
    println!(
        "{:<8} {:<16} {:<5} {:<10} {:>6} {:>7} {:>7} {:>9} {:>5} integrity",
        "VM", "kind", "to", "outcome", "pc", "pred s", "act s", "blackout", "tries"
    );
    for v in &r.vms {
        println!(
            "{:<8} {:<16} {:<5} {:<10} {:>6} {:>7} {:>7} {:>9} {:>5} {} (corrupt {}, ctl {}, heartbeats {})",
            v.name,
            v.kind.as_str(),
            v.to.as_deref().unwrap_or("—"),
            v.outcome,
            if v.switched_to_postcopy { "yes" } else { "no" },
            opt_s(v.predicted_duration_s),
            opt_s(v.actual_duration_s),
            v.blackout_ms
                .map_or_else(|| "—".to_string(), |b| format!("{b:.0} ms")),
            v.attempts,
            if v.is_intact() { "OK" } else { "FAILED" },
            v.corrupt_pages,
            v.control_mismatches,
            if v.heartbeat_continuous {
                "continuous"
            } else {
                "BROKEN"
            }
        );
    }
    if let Some(e) = &r.error {
        println!("error      {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_count_is_checked_and_picks_the_sets() {
        assert!(guests(1).is_err());
        assert!(guests(6).is_err());
        assert_eq!(guests(3).unwrap().len(), 3);
        let five = guests(5).unwrap();
        assert_eq!(five.len(), 5);
        assert!(
            five.iter()
                .any(|g| g.post_copy == tern_qemu::PostCopyPermission::Forbidden)
        );
    }
}
