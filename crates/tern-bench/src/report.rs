//! The Markdown report of a result: one table per scenario (policies as rows), the post-copy
//! overhead, and an automatic list of where tern is worse than a baseline, with the data that
//! explains it.

use std::fmt::Write as _;

use crate::results::{ArmSummary, BenchResult, OverheadResult, ScenarioResult, Spread};

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
    out
}

/// The overhead section.
pub fn overhead_section(o: &OverheadResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Post-copy capability overhead ({})\n\n\
         Same guest, same session, runs alternating capability on / off; each \"on\" run is paired \
         with the \"off\" run right after it. Only pairs where both completed in pre-copy count \
         ({} pairs; {} \"on\" runs switched to post-copy and were excluded).\n",
        o.scenario, o.pairs, o.switched
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
}

fn explain(t: &ArmSummary, b: &ArmSummary) -> String {
    let mut why = Vec::new();
    let tp = t.postcopy_s.is_some();
    let bp = b.postcopy_s.is_some();
    if tp && !bp {
        why.push(format!(
            "tern switched to post-copy (median {:.1} s in post-copy) while {} finished in pre-copy",
            t.postcopy_s.map_or(0.0, |s| s.median),
            b.arm.label
        ));
    } else if !tp && bp {
        why.push(format!(
            "tern stayed in pre-copy while {} switched to post-copy (median {:.1} s in post-copy)",
            b.arm.label,
            b.postcopy_s.map_or(0.0, |s| s.median)
        ));
    }
    if let (Some(tw), Some(bw)) = (t.wps_precopy, b.wps_precopy) {
        if tw.median < 0.8 * bw.median {
            why.push(format!(
                "the guest wrote {:.0}/s under tern in pre-copy vs {:.0}/s under {} (throttled)",
                tw.median, bw.median, b.arm.label
            ));
        }
    }
    if why.is_empty() {
        why.push("same mechanism on both sides; the difference is within run-to-run noise of a TCG guest on 2 shared cores unless the ranges are disjoint".into());
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
                            "{name}: tern {:.2}{unit} vs {} {:.2}{unit} (+{:.0} %{}). Why: {}.",
                            tv.median,
                            b.arm.label,
                            bv.median,
                            (tv.median / bv.median.max(1e-9) - 1.0) * 100.0,
                            if clear {
                                ", ranges disjoint"
                            } else {
                                ", ranges overlap"
                            },
                            explain(t, b)
                        ),
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
         **ETA err** (predicted end − real end) ÷ real total at 25/50/75 % of the run, from the engine's live progress ETA (remaining ÷ (throughput − dirty rate), the number `tern demo` shows; not the policy's model). \
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
            "Automatic list: tern's median worse than the baseline's by more than 10 % (baselines that got the guest across in every run).\n"
        );
        for x in &f {
            let _ = writeln!(out, "- **{}** vs {} — {}", x.scenario, x.baseline, x.text);
        }
        out.push('\n');
    }
    out
}
