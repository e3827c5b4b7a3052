//! Running a set: one session (one guest boot) per scenario, one hop per (repeat, arm).

use std::time::{Duration, Instant};

use tern_policy::MigrationContext;
use tern_qemu::PostCopyPermission;
use tern_scenario::{HopSpec, LabEnvironment, ScenarioSession, SessionSpec};

use crate::metrics::{self, OutcomeClass, RunMetrics};
use crate::results::{
    BenchResult, Machine, OverheadResult, RESULT_FORMAT, RunRecord, ScenarioResult,
};
use crate::set::{Scenario, ScenarioSet};

/// Points kept per remaining-bytes series.
const SERIES_POINTS: usize = 300;

/// Options of a run beyond the set itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Overrides every scenario's repeat count.
    pub repeat: Option<u32>,
    /// Lab name prefix (unique per concurrently running benchmark).
    pub lab_prefix: String,
    /// Print one line per run to stderr.
    pub verbose: bool,
    /// Encrypt every migration stream (QEMU TLS with lab certificates), to measure its cost.
    pub migration_tls: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            repeat: None,
            lab_prefix: "bench".into(),
            verbose: true,
            migration_tls: false,
        }
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Facts about this machine for the result file.
pub fn machine(env: &LabEnvironment) -> Machine {
    Machine {
        accelerator: env.accelerator.accelerator.to_string(),
        accelerator_reason: env.accelerator.reason.to_string(),
        qemu_version: env.qemu.version.to_string(),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        loadavg_at_start: read_trim("/proc/loadavg"),
        loadavg_at_end: String::new(),
        hostname: read_trim("/proc/sys/kernel/hostname"),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a UNIX time (civil-from-days, proleptic Gregorian).
pub fn utc_text(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let rem = unix_s % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn git_describe() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn session_spec(s: &Scenario, lab: &str, migration_tls: bool) -> SessionSpec {
    SessionSpec {
        lab_name: lab.to_string(),
        link_rate: Some(s.link),
        memory_mib: s.memory_mib,
        workload: s.workload(),
        vm_max_downtime_ms: None,
        sla_class: "standard".into(),
        host_memory_mib: 4096,
        settle: Duration::from_secs(s.settle_s),
        migration_tls,
    }
}

fn error_run(arm: &crate::set::Arm, repeat: u32, e: &str) -> RunRecord {
    RunRecord {
        arm: arm.label.clone(),
        policy: arm.policy.clone(),
        post_copy: arm.post_copy,
        repeat,
        direction: String::new(),
        metrics: RunMetrics {
            outcome: OutcomeClass::Error,
            total_time_s: 0.0,
            time_vs_bound: 0.0,
            decision_time_s: None,
            stall_at_s: None,
            blackout_ms: None,
            switchover_gap_ms: None,
            max_dest_gap_ms: None,
            bytes_vs_ram: 0.0,
            bytes_sent: 0,
            postcopy_s: None,
            wps_before: None,
            wps_postcopy: None,
            wps_precopy: None,
            rho_measured: None,
            eta_error_pct: [None; 3],
            passes: 0,
            integrity_ok: false,
            actions: Vec::new(),
            capabilities: Vec::new(),
            error: Some(e.to_string()),
            faults: Vec::new(),
            recoveries: 0,
            source_cpu_s: None,
            destination_cpu_s: None,
        },
        series: Vec::new(),
    }
}

/// Runs one scenario: boots its guest, runs every (repeat, arm) hop, aggregates.
pub async fn run_scenario(
    env: &LabEnvironment,
    s: &Scenario,
    lab: &str,
    verbose: bool,
    migration_tls: bool,
) -> ScenarioResult {
    let started = Instant::now();
    let mut result = ScenarioResult {
        scenario: s.clone(),
        bound_s: s.bound_s(),
        runs: Vec::new(),
        arms: Vec::new(),
        wall_s: 0.0,
        error: None,
    };
    let spec = session_spec(s, lab, migration_tls);
    let mut session: Option<ScenarioSession> = None;
    let link = s.link.bytes_per_sec();
    let ram = s.memory_mib * 1024 * 1024;
    'outer: for repeat in 0..s.repeat {
        // The guest alternates hosts hop by hop. With an even number of arms every arm would
        // always run in the same direction (h1→h2 or h2→h1), confounding arm and direction;
        // reversing the order on odd repeats gives each arm both directions.
        let mut arms: Vec<&crate::set::Arm> = s.arms.iter().collect();
        if repeat % 2 == 1 && arms.len() % 2 == 0 {
            arms.reverse();
        }
        for arm in arms {
            if session.is_none() {
                match ScenarioSession::start(env, &spec).await {
                    Ok(x) => session = Some(x),
                    Err(e) => {
                        result.error = Some(format!("guest boot failed: {e}"));
                        if verbose {
                            eprintln!("  {}: guest boot failed: {e}", s.name);
                        }
                        break 'outer;
                    }
                }
            }
            let Some(sess) = session.as_mut() else {
                break 'outer;
            };
            let hop = HopSpec {
                context: s.context,
                policy: arm.policy.clone(),
                post_copy: if arm.post_copy {
                    PostCopyPermission::Allowed
                } else {
                    PostCopyPermission::Forbidden
                },
                deadline_ms: match s.context {
                    MigrationContext::Evacuate | MigrationContext::Maintenance => {
                        s.deadline_s.map(|d| d * 1000)
                    }
                    _ => None,
                },
                probe_seconds: 0,
                time_cap: Some(crate::set::cap(s)),
                faults: s.faults.clone(),
            };
            let record = match sess.migrate_once(&hop, None).await {
                Ok(h) => {
                    let series = metrics::series_of(&h.progress, SERIES_POINTS);
                    let m = metrics::compute(&h, &series, link, ram);
                    RunRecord {
                        arm: arm.label.clone(),
                        policy: arm.policy.clone(),
                        post_copy: arm.post_copy,
                        repeat,
                        direction: format!("{}→{}", h.source_host, h.destination_host),
                        metrics: m,
                        series,
                    }
                }
                Err(e) => error_run(arm, repeat, &e.to_string()),
            };
            if verbose {
                let m = &record.metrics;
                eprintln!(
                    "  {:<18} {:<34} #{} {:<6} {:<9} {:>6.1}s blackout {:>7} bytes/RAM {:.2}{}{}",
                    s.name,
                    arm.label,
                    repeat + 1,
                    record.direction,
                    m.outcome.label(),
                    m.total_time_s,
                    m.blackout_ms.map_or("—".into(), |b| format!("{b:.0}ms")),
                    m.bytes_vs_ram,
                    if m.integrity_ok || m.outcome == OutcomeClass::Error {
                        ""
                    } else {
                        " INTEGRITY FAILED"
                    },
                    m.error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" ({e})"))
                );
            }
            let lost = matches!(
                record.metrics.outcome,
                OutcomeClass::Lost | OutcomeClass::Error
            ) || sess.location().is_none();
            result.runs.push(record);
            if lost {
                // Start over with a fresh guest for the remaining runs.
                if let Some(old) = session.take() {
                    old.finish().await;
                }
            }
        }
    }
    if let Some(sess) = session.take() {
        sess.finish().await;
    }
    result.aggregate();
    result.wall_s = started.elapsed().as_secs_f64();
    result
}

/// Runs a whole set and returns its result (nothing is written).
pub async fn run_set(env: &LabEnvironment, set: &ScenarioSet, opts: &RunOptions) -> BenchResult {
    let started = Instant::now();
    let started_utc = utc_text(now_unix());
    let mut machine = machine(env);
    let mut scenarios = Vec::new();
    let mut interrupted_at: Option<String> = None;
    let total_runs: u64 = set
        .scenarios
        .iter()
        .map(|s| u64::from(opts.repeat.unwrap_or(s.repeat).max(1)) * s.arms.len() as u64)
        .sum();
    if opts.verbose {
        eprintln!(
            "tern bench: set {} — {} scenarios, {} runs · QEMU {} · {} ({})",
            set.name,
            set.scenarios.len(),
            total_runs,
            machine.qemu_version,
            machine.accelerator,
            machine.accelerator_reason
        );
    }
    for (i, s) in set.scenarios.iter().enumerate() {
        let mut s = s.clone();
        if let Some(r) = opts.repeat {
            s.repeat = r.max(1);
        }
        if opts.verbose {
            eprintln!(
                "· scenario {} ({}/{}): {} MiB RAM, ws {} MiB, {} writes/s {}, link {}, ρ≈{}, {} × {} runs, cap {} s",
                s.name,
                i + 1,
                set.scenarios.len(),
                s.memory_mib,
                s.working_set_mib,
                s.dirty_pages_per_s.map_or("max".into(), |r| r.to_string()),
                s.pattern,
                s.link,
                s.nominal_rho().map_or("?".into(), |r| format!("{r:.2}")),
                s.arms.len(),
                s.repeat,
                s.time_cap_s
            );
        }
        let lab = format!("{}{}", opts.lab_prefix, i);
        // Ctrl-C or SIGTERM: dropping the scenario's future drops its session, which kills
        // the QEMUs and takes the lab down; the runs so far are still reported.
        tokio::select! {
            r = run_scenario(env, &s, &lab, opts.verbose, opts.migration_tls) => scenarios.push(r),
            _ = interrupted() => {
                eprintln!("interrupted: stopping after {} scenario(s); the lab is taken down", scenarios.len());
                interrupted_at = Some(s.name.clone());
                break;
            }
        }
    }
    machine.loadavg_at_end = read_trim("/proc/loadavg");
    let overhead = scenarios.iter().flat_map(OverheadResult::of).collect();
    BenchResult {
        format: RESULT_FORMAT,
        set: set.name.clone(),
        description: set.description.clone(),
        started_utc,
        wall_s: started.elapsed().as_secs_f64(),
        machine,
        git: git_describe(),
        scenarios,
        overhead,
        interrupted_at,
        migration_tls: opts.migration_tls,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text_formats_known_instants() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(1_795_651_200 + 3661), "2026-11-26T01:01:01Z");
    }
}
