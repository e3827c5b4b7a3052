//! The Markdown report of a result: one table per scenario (policies as rows), the post-copy
//! overhead, and an automatic list of where tern is worse than a baseline, with the data that
//! explains it.

use std::fmt::Write as _;

use crate::results::{ArmSummary, BenchResult, OverheadResult, RunRecord, ScenarioResult, Spread};

fn spread(s: Option<Spread>, digits: usize) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 || (s.max - s.min).abs() < f64::EPSILON => {
            format!("{:.*}", digits, s.median)
        }
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        ),
    }
}

fn median(s: Option<Spread>, digits: usize) -> String {
    s.map_or("—".into(), |s| format!("{:.*}", digits, s.median))
}

fn signed(s: Option<Spread>, digits: usize, unit: &str) -> String {
    match s {
        None => "—".into(),
        Some(s) => format!(
            "{:+.*}{unit} (range {:+.*} … {:+.*}, n={})",
            digits, s.median, digits, s.min, digits, s.max, s.n
        ),
    }
}

fn eta(a: &ArmSummary) -> String {
    if a.eta_error_pct.iter().all(Option::is_none) {
        return "—".into();
    }
    a.eta_error_pct
        .iter()
        .map(|e| e.map_or("—".into(), |s| format!("{:+.0}", s.median)))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn wps(a: &ArmSummary) -> String {
    let before = a.wps_before.map(|s| s.median);
    match (before, a.wps_postcopy.map(|s| s.median)) {
        (Some(b), Some(d)) => format!("{b:.0} → {d:.0}"),
        (Some(b), None) => format!("{b:.0}"),
        _ => "—".into(),
    }
}

/// The table of one scenario.
pub fn scenario_table(s: &ScenarioResult) -> String {
    let sc = &s.scenario;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### {} — {}\n",
        sc.name,
        if sc.title.is_empty() { "" } else { &sc.title }
    );
    let rho_m = Spread::of(s.arms.iter().map(|a| a.rho_measured.map(|x| x.median)));
    let _ = writeln!(
        out,
        "Guest {} MiB RAM, working set {} MiB, {} page writes/s ({}), link {}, context {}; \
         bound RAM ÷ link = **{:.2} s**; nominal ρ = {}, measured ρ (guest writes/s before the \
         migration × 4 KiB ÷ link) = {}. {} repeat(s) per row, cap {} s per run; scenario took {:.0} s.\n",
        sc.memory_mib,
        sc.working_set_mib,
        sc.dirty_pages_per_s.map_or("max".into(), |r| r.to_string()),
        sc.pattern,
        sc.link,
        sc.context,
        s.bound_s,
        sc.nominal_rho().map_or("?".into(), |r| format!("{r:.2}")),
        rho_m.map_or("—".into(), |r| format!("{:.2}", r.median)),
        sc.repeat,
        sc.time_cap_s,
        s.wall_s
    );
    if let Some(e) = &s.error {
        let _ = writeln!(out, "**The scenario stopped early:** {e}\n");
    }
    let _ = writeln!(
        out,
        "| policy | outcome | total s | × bound | decision s | blackout ms | bytes ÷ RAM | post-copy s | writes/s before → in post-copy | ETA err % @25/50/75 | integrity |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for a in &s.arms {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            if a.arm.policy == "tern" {
                format!("**{}**", a.arm.label)
            } else {
                a.arm.label.clone()
            },
            a.outcome_text(),
            spread(a.total_time_s, 1),
            median(a.time_vs_bound, 2),
            median(a.decision_time_s, 1),
            spread(a.blackout_ms, 0),
            spread(a.bytes_vs_ram, 2),
            median(a.postcopy_s, 1),
            wps(a),
            eta(a),
            if a.integrity_failures == 0 {
                "ok".to_string()
            } else {
                format!("**{} FAILED**", a.integrity_failures)
            }
        );
    }
    out.push('\n');
    if !sc.faults.is_empty() {
        out.push_str(&fault_table(s));
    }
    out
}

/// Per-run fault figures of a scenario with injected faults: when each fault fired, how long
/// tern took to see the migration paused, how long after the link came back post-copy ran
/// again, and the guest's longest stall (its longest heartbeat gap as timestamped on the host,
/// switchover included: a cut right after the switch stalls the guest before its first
/// heartbeat on the destination).
pub fn fault_table(s: &ScenarioResult) -> String {
    let mut out = String::new();
    let faults: Vec<String> = s.scenario.faults.iter().map(|f| f.to_string()).collect();
    let _ = writeln!(
        out,
        "Faults injected in every run: `{}`. Times in ms; detection is cut → migration seen \
         paused (±250 ms, the engine's poll), resume is link restored → post-copy running again.\n",
        faults.join("`, `")
    );
    let _ = writeln!(
        out,
        "| policy | run | outcome | recoveries | fault | fired at | detected after | resumed after restore | longest guest stall | integrity |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    let ms = |v: Option<u64>| v.map_or("—".to_string(), |v| v.to_string());
    for r in &s.runs {
        let m = &r.metrics;
        for (i, f) in m.faults.iter().enumerate() {
            let first = i == 0;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | `{}` | {} | {} | {} | {} | {} |",
                if first { r.arm.as_str() } else { "" },
                if first {
                    format!("#{} {}", r.repeat + 1, r.direction)
                } else {
                    String::new()
                },
                if first {
                    m.outcome.label().to_string()
                } else {
                    String::new()
                },
                if first {
                    m.recoveries.to_string()
                } else {
                    String::new()
                },
                f.fault,
                ms(f.fired_at_ms),
                ms(f.detected_after_ms),
                ms(f.resumed_after_restore_ms),
                if first {
                    m.blackout_ms.map_or("—".to_string(), |g| format!("{g:.0}"))
                } else {
                    String::new()
                },
                if !first {
                    String::new()
                } else if m.integrity_ok {
                    "ok".to_string()
                } else {
                    "**FAILED**".to_string()
                },
            );
        }
    }
    out.push('\n');
    out
}

/// The overhead section.
pub fn overhead_section(o: &OverheadResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Post-copy capability overhead: {} ({})\n\n\
         Same guest, same session, {} with the VM permitting post-copy (capabilities: {}) and \
         forbidding it (capabilities: {}), run back to back in both directions; each \"on\" run is \
         paired with its \"off\" neighbour. Only pairs where both completed in pre-copy count \
         ({} pairs; {} \"on\" runs switched to post-copy and were excluded).\n",
        o.policy,
        o.scenario,
        o.policy,
        if o.capabilities_on.is_empty() {
            "none".to_string()
        } else {
            o.capabilities_on.join(", ")
        },
        if o.capabilities_off.is_empty() {
            "none".to_string()
        } else {
            o.capabilities_off.join(", ")
        },
        o.pairs,
        o.switched
    );
    let _ = writeln!(
        out,
        "| metric | capability on | capability off | on − off (median, range) | relative |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| total time s | {} | {} | {} | {} |",
        spread(o.total_time_s.0, 2),
        spread(o.total_time_s.1, 2),
        signed(o.total_time_delta_s, 2, " s"),
        signed(o.total_time_delta_pct, 1, " %")
    );
    let _ = writeln!(
        out,
        "| bytes ÷ RAM | {} | {} | {} | {} |",
        spread(o.bytes_vs_ram.0, 3),
        spread(o.bytes_vs_ram.1, 3),
        signed(o.bytes_delta_mib, 2, " MiB"),
        signed(o.bytes_delta_pct, 1, " %")
    );
    let _ = writeln!(
        out,
        "| blackout ms | {} | {} | {} | |",
        spread(o.blackout_ms.0, 0),
        spread(o.blackout_ms.1, 0),
        signed(o.blackout_delta_ms, 0, " ms")
    );
    out.push('\n');
    out
}

/// One place where tern did worse than a baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Scenario.
    pub scenario: String,
    /// Baseline that did better.
    pub baseline: String,
    /// Metric.
    pub metric: &'static str,
    /// The sentence.
    pub text: String,
    /// tern's and the baseline's min–max ranges do not overlap.
    pub disjoint: bool,
}

/// Median over an arm's runs of a per-run value.
fn arm_median(
    s: &ScenarioResult,
    label: &str,
    f: impl Fn(&RunRecord) -> Option<f64>,
) -> Option<f64> {
    Spread::of(s.runs.iter().filter(|r| r.arm == label).map(f)).map(|x| x.median)
}

/// A data-driven explanation of why tern did worse than `b` (switch times, passes, throttling).
fn explain(s: &ScenarioResult, t: &ArmSummary, b: &ArmSummary) -> String {
    let switch_at = |r: &RunRecord| Some(r.metrics.total_time_s - r.metrics.postcopy_s?);
    let passes = |r: &RunRecord| Some(r.metrics.passes as f64);
    let (tl, bl) = (t.arm.label.as_str(), b.arm.label.as_str());
    let (ts, bs) = (arm_median(s, tl, switch_at), arm_median(s, bl, switch_at));
    let (tp, bp) = (arm_median(s, tl, passes), arm_median(s, bl, passes));
    let mut why = Vec::new();
    match (ts, bs) {
        (Some(ts), Some(bs)) => why.push(format!(
            "both switched to post-copy, tern at {ts:.1} s after {} passes, {bl} at {bs:.1} s after {} passes: \
             the later switch costs the extra pre-copy passes in time and bytes",
            tp.map_or("?".into(), |p| format!("{p:.0}")),
            bp.map_or("?".into(), |p| format!("{p:.0}"))
        )),
        (Some(ts), None) => why.push(format!(
            "tern switched to post-copy at {ts:.1} s ({:.1} s in post-copy) while {bl} finished in pre-copy",
            t.postcopy_s.map_or(0.0, |x| x.median)
        )),
        (None, Some(bs)) => why.push(format!(
            "tern stayed in pre-copy ({} passes) while {bl} switched to post-copy at {bs:.1} s after its first pass",
            tp.map_or("?".into(), |p| format!("{p:.0}"))
        )),
        (None, None) => why.push(format!(
            "both finished in pre-copy, tern after {} passes, {bl} after {}",
            tp.map_or("?".into(), |p| format!("{p:.0}")),
            bp.map_or("?".into(), |p| format!("{p:.0}"))
        )),
    }
    if let (Some(tw), Some(bw)) = (t.wps_precopy, b.wps_precopy) {
        if tw.median < 0.8 * bw.median {
            why.push(format!(
                "the guest wrote {:.0}/s under tern in pre-copy vs {:.0}/s under {bl} (throttled)",
                tw.median, bw.median
            ));
        }
    }
    why.join("; ")
}

/// Where tern's median is worse than a baseline's by more than 10 % (and the baseline got the
/// guest across in every run).
pub fn findings(r: &BenchResult) -> Vec<Finding> {
    let mut out = Vec::new();
    for s in r.scenarios.iter().filter(|s| !s.scenario.postcopy_overhead) {
        let Some(t) = s.arm("tern") else { continue };
        for b in s.arms.iter().filter(|a| a.arm.policy != "tern") {
            if b.runs == 0 {
                continue;
            }
            let b_all = b.arrived() == b.runs;
            if t.arrived() < t.runs && b_all {
                out.push(Finding {
                    scenario: s.scenario.name.clone(),
                    baseline: b.arm.label.clone(),
                    metric: "outcome",
                    text: format!(
                        "tern: {} vs {}: {}",
                        t.outcome_text(),
                        b.arm.label,
                        b.outcome_text()
                    ),
                    disjoint: true,
                });
                continue;
            }
            if !b_all || t.arrived() == 0 {
                continue;
            }
            let metrics: [(&'static str, Option<Spread>, Option<Spread>, &str); 3] = [
                ("total time", t.total_time_s, b.total_time_s, "s"),
                ("blackout", t.blackout_ms, b.blackout_ms, "ms"),
                ("bytes ÷ RAM", t.bytes_vs_ram, b.bytes_vs_ram, ""),
            ];
            for (name, tv, bv, unit) in metrics {
                let (Some(tv), Some(bv)) = (tv, bv) else {
                    continue;
                };
                if tv.median > bv.median * 1.10 && tv.median - bv.median > 1e-9 {
                    let clear = tv.min > bv.max;
                    out.push(Finding {
                        scenario: s.scenario.name.clone(),
                        baseline: b.arm.label.clone(),
                        metric: name,
                        text: format!(
                            "{name}: tern {:.2}{unit} vs {:.2}{unit} (+{:.0} %). Why: {}.",
                            tv.median,
                            bv.median,
                            (tv.median / bv.median.max(1e-9) - 1.0) * 100.0,
                            explain(s, t, b)
                        ),
                        disjoint: clear,
                    });
                }
            }
        }
    }
    out
}

/// The whole report.
pub fn markdown(r: &BenchResult, plot_dir: Option<&str>) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(out, "# tern bench — set `{}`\n", r.set);
    if !r.description.is_empty() {
        let _ = writeln!(out, "{}\n", r.description);
    }
    let runs: usize = r.scenarios.iter().map(|s| s.runs.len()).sum();
    let _ = writeln!(
        out,
        "- started {} · wall time **{:.0} s** ({:.1} min) for {} runs in {} scenarios\n\
         - accelerator **{}** ({}) · QEMU **{}** · kernel {} · {} CPUs · {}\n\
         - load average at start `{}`, at end `{}` (other work shares these cores)\n\
         - migration streams {}\n\
         - tree {}\n",
        r.started_utc,
        r.wall_s,
        r.wall_s / 60.0,
        runs,
        r.scenarios.len(),
        m.accelerator,
        m.accelerator_reason,
        m.qemu_version,
        m.kernel,
        m.cpus,
        m.hostname,
        m.loadavg_at_start,
        m.loadavg_at_end,
        if r.migration_tls {
            "**TLS** (QEMU tls-creds-x509, lab certificates)"
        } else {
            "plain TCP"
        },
        r.git.as_deref().unwrap_or("unknown")
    );
    if let Some(at) = &r.interrupted_at {
        let _ = writeln!(
            out,
            "**Interrupted during scenario {at}: the results are partial.**\n"
        );
    }
    let _ = writeln!(
        out,
        "Columns: **outcome** completed (pre-copy) / post-copy / recovered / aborted (by the policy) / \
         timeout (hit the cap, aborted by the harness: the policy would not have finished) / failed / lost. \
         **total s** median (min–max) from `migrate` to the end; **× bound** total ÷ (RAM ÷ link rate) — below 1 is \
         possible because QEMU sends never-touched pages as zero-page markers. **decision s** from the first pass whose \
         remaining bytes did not shrink to the policy's first action after it. **blackout** the largest gap between \
         guest heartbeats as timestamped on the host (switchover, throttling and post-copy faults included). \
         **writes/s** the guest's own page-write rate in the 2.5 s before `migrate` → while in post-copy. \
         **ETA err** (predicted end − real end) ÷ real total at 25/50/75 % of the run, from the engine's live progress ETA, the number `tern demo` shows: the policy's convergence model where it has one (tern), else remaining ÷ (throughput − dirty rate) (the baselines). \
         Under TCG absolute times are not comparable to KVM hardware: compare rows within a table and against the bound.\n"
    );
    if let Some(dir) = plot_dir {
        let _ = writeln!(
            out,
            "Plots per scenario in `{dir}/`: `<scenario>-remaining.svg` (remaining bytes over time), \
             `<scenario>-blackout.svg`, `<scenario>-time.svg` (total time vs bound).\n"
        );
    }
    let _ = writeln!(out, "## Scenarios\n");
    for s in &r.scenarios {
        out.push_str(&scenario_table(s));
        if let Some(dir) = plot_dir {
            if !s.runs.is_empty() {
                let n = &s.scenario.name;
                let _ = writeln!(
                    out,
                    "![remaining]({dir}/{n}-remaining.svg)\n![blackout]({dir}/{n}-blackout.svg)\n![time]({dir}/{n}-time.svg)\n"
                );
            }
        }
    }
    if !r.overhead.is_empty() {
        let _ = writeln!(out, "## The post-copy-capable overhead\n");
        for o in &r.overhead {
            out.push_str(&overhead_section(o));
        }
    }
    let f = findings(r);
    let _ = writeln!(out, "## Where tern is worse than a baseline\n");
    if f.is_empty() {
        let _ = writeln!(
            out,
            "Nowhere by more than 10 % on median total time, blackout or bytes, among baselines that got the guest across in every run.\n"
        );
    } else {
        let _ = writeln!(
            out,
            "Automatic list: tern's median worse than the baseline's by more than 10 % (baselines that got the guest across in every run), with tern's and the baseline's min–max ranges disjoint.\n"
        );
        for x in f.iter().filter(|x| x.disjoint) {
            let _ = writeln!(out, "- **{}** vs {} — {}", x.scenario, x.baseline, x.text);
        }
        let noise: Vec<&Finding> = f.iter().filter(|x| !x.disjoint).collect();
        if !noise.is_empty() {
            let _ = writeln!(
                out,
                "\nWorse by median but within the run-to-run spread (min–max ranges overlap; may be noise):\n"
            );
            for x in noise {
                let _ = writeln!(out, "- {} vs {} — {}", x.scenario, x.baseline, x.text);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{OutcomeClass, RunMetrics};
    use crate::results::{Machine, OverheadResult, RESULT_FORMAT};
    use crate::set::ScenarioSet;

    fn run(
        arm: &str,
        post_copy: bool,
        total: f64,
        postcopy_s: Option<f64>,
        bytes: f64,
    ) -> RunRecord {
        RunRecord {
            arm: arm.into(),
            policy: arm.split(' ').next().unwrap_or(arm).into(),
            post_copy,
            repeat: 0,
            direction: "h1→h2".into(),
            metrics: RunMetrics {
                outcome: if postcopy_s.is_some() {
                    OutcomeClass::PostCopy
                } else {
                    OutcomeClass::Completed
                },
                total_time_s: total,
                time_vs_bound: total / 5.0,
                decision_time_s: None,
                stall_at_s: None,
                blackout_ms: Some(100.0),
                switchover_gap_ms: Some(100.0),
                max_dest_gap_ms: Some(20.0),
                bytes_vs_ram: bytes,
                bytes_sent: (bytes * 192.0 * 1048576.0) as u64,
                postcopy_s,
                wps_before: Some(1000.0),
                wps_postcopy: postcopy_s.map(|_| 400.0),
                wps_precopy: Some(1000.0),
                rho_measured: Some(0.3),
                eta_error_pct: [None, Some(10.0), None],
                passes: if postcopy_s.is_some() { 5 } else { 3 },
                integrity_ok: true,
                actions: Vec::new(),
                capabilities: Vec::new(),
                error: None,
                faults: Vec::new(),
                recoveries: 0,
                source_cpu_s: None,
                destination_cpu_s: None,
            },
            series: Vec::new(),
        }
    }

    fn result() -> BenchResult {
        let set = ScenarioSet::load("quick").unwrap();
        let mut rho1 = set
            .scenarios
            .iter()
            .find(|s| s.name == "rho1")
            .unwrap()
            .clone();
        rho1.arms
            .retain(|a| a.policy == "tern" || a.policy == "nova-2016");
        let mut s = ScenarioResult {
            bound_s: rho1.bound_s(),
            scenario: rho1,
            runs: vec![
                run("tern", true, 10.0, Some(2.0), 1.3),
                run("tern", true, 10.5, Some(2.0), 1.3),
                run("nova-2016", true, 6.0, Some(2.0), 0.8),
                run("nova-2016", true, 6.5, Some(2.0), 0.8),
            ],
            arms: Vec::new(),
            wall_s: 60.0,
            error: None,
        };
        s.aggregate();
        let mut o = set
            .scenarios
            .iter()
            .find(|s| s.postcopy_overhead)
            .unwrap()
            .clone();
        o.repeat = 2;
        let mut os = ScenarioResult {
            bound_s: o.bound_s(),
            scenario: o,
            runs: vec![
                run("tern (post-copy capable)", true, 6.2, None, 0.71),
                run("tern (post-copy off)", false, 6.0, None, 0.70),
                run("tern (post-copy capable)", true, 6.1, None, 0.70),
                run("tern (post-copy off)", false, 6.0, None, 0.70),
            ],
            arms: Vec::new(),
            wall_s: 30.0,
            error: None,
        };
        os.aggregate();
        let overhead = OverheadResult::of(&os);
        BenchResult {
            format: RESULT_FORMAT,
            set: "t".into(),
            description: String::new(),
            started_utc: "2026-11-27T00:00:00Z".into(),
            wall_s: 90.0,
            machine: Machine {
                accelerator: "tcg".into(),
                qemu_version: "10.0.2".into(),
                ..Machine::default()
            },
            git: None,
            scenarios: vec![s, os],
            overhead,
            interrupted_at: None,
            migration_tls: false,
        }
    }

    #[test]
    fn report_has_a_table_per_scenario_the_overhead_and_where_tern_is_worse() {
        let r = result();
        let md = markdown(&r, Some("plots"));
        assert!(md.contains("### rho1"), "{md}");
        assert!(
            md.contains("| **tern** | post-copy | 10.2 (10.0–10.5) |"),
            "{md}"
        );
        assert!(
            md.contains("| nova-2016 | post-copy | 6.2 (6.0–6.5) |"),
            "{md}"
        );
        assert!(md.contains("![remaining](plots/rho1-remaining.svg)"));
        assert!(md.contains("QEMU **10.0.2**") && md.contains("**tcg**"));
        // Overhead: on − off per pair = +0.2 s and +0.1 s → median +0.15 s.
        assert!(md.contains("+0.15 s (range +0.10 … +0.20, n=2)"), "{md}");
        let f = findings(&r);
        let total = f
            .iter()
            .find(|x| x.scenario == "rho1" && x.metric == "total time")
            .expect("tern's longer total time is reported");
        assert!(total.disjoint);
        assert!(
            total.text.contains("tern at 8.2 s after 5 passes"),
            "{}",
            total.text
        );
        assert!(f.iter().any(|x| x.metric == "bytes ÷ RAM"));
        assert!(
            !f.iter().any(|x| x.metric == "blackout"),
            "equal blackouts are not findings"
        );
        assert!(md.contains("## Where tern is worse than a baseline"));
        assert!(
            !md.contains("Faults injected"),
            "no fault table without faults"
        );
    }

    #[test]
    fn scenarios_with_faults_get_a_fault_table_per_run() {
        let mut r = result();
        let s = &mut r.scenarios[0];
        s.scenario.faults = vec!["link-cut-postcopy:10@0.5".parse().unwrap()];
        s.runs.truncate(1);
        s.runs[0].metrics.outcome = OutcomeClass::Recovered;
        s.runs[0].metrics.recoveries = 1;
        s.runs[0].metrics.blackout_ms = Some(12345.0);
        s.runs[0].metrics.faults = vec![tern_scenario::faults::FaultRecord {
            fault: "link-cut-postcopy:10s@0.5".into(),
            fired_at_ms: Some(9100),
            restored_at_ms: Some(19100),
            detected_after_ms: Some(2250),
            resumed_after_restore_ms: Some(480),
            error: None,
        }];
        s.aggregate();
        let md = scenario_table(&r.scenarios[0]);
        assert!(
            md.contains("Faults injected in every run: `link-cut-postcopy:10s@0.5`"),
            "{md}"
        );
        assert!(
            md.contains(
                "| tern | #1 h1→h2 | recovered | 1 | `link-cut-postcopy:10s@0.5` | 9100 | 2250 | 480 | 12345 | ok |"
            ),
            "{md}"
        );
    }
}
