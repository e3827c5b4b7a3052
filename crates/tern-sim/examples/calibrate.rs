//! Simulator vs lab: `cargo run --release -p tern-sim --example calibrate [-- RESULTS.json]`
//! (default `bench/results/quick-2026-11-27.json`) simulates every bench scenario × policy arm of
//! a `tern bench` result with the same guest, working set, write rate, pattern, link and time cap,
//! and prints a Markdown table: real vs simulated total time and outcome class.
//!
//! The only input read is the results file; the lab's physical constants are
//! `LabPhysics::default()` (what this comparison was tuned with). With `--write-traces DIR` it
//! also writes each bench scenario as a replayable `RunTrace` (`DIR/<set>-<scenario>.json`, the
//! first repeat of each policy as the real outcome; see the `replay` example).

use std::collections::BTreeMap;

use serde_json::Value;
use tern_sim::trace::RealOutcome;
use tern_sim::{
    LabPattern, LabPhysics, LabWorkload, RunTrace, SimConfig, SimOutcome, SimResult,
    scenario_from_lab, simulate_with,
};

fn class_of_real(outcome: &str) -> &'static str {
    match outcome {
        "completed" => "pre-copy",
        "post-copy" => "post-copy",
        "timeout" | "aborted" | "cancelled" => "aborted",
        _ => "failed",
    }
}

fn class_of_sim(o: &SimOutcome) -> &'static str {
    match o.result {
        SimResult::Completed if o.used_postcopy => "post-copy",
        SimResult::Completed => "pre-copy",
        SimResult::Aborted | SimResult::TimedOut => "aborted",
        SimResult::VmLost => "failed",
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Arm {
    policy: String,
    post_copy: bool,
    totals: Vec<f64>,
    passes: Vec<f64>,
    bytes: Vec<f64>,
    blackouts: Vec<f64>,
    classes: Vec<&'static str>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let traces_dir = args
        .iter()
        .position(|a| a == "--write-traces")
        .and_then(|i| args.get(i + 1).cloned());
    let path = args
        .iter()
        .find(|a| a.ends_with(".json"))
        .cloned()
        .unwrap_or_else(|| "bench/results/quick-2026-11-27.json".into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: reading {path}: {e}");
            std::process::exit(2);
        }
    };
    let doc: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {path}: {e}");
            std::process::exit(2);
        }
    };
    let phys = LabPhysics::default();
    println!("# Simulator calibration against the lab ({path})\n");
    println!(
        "Regenerate: `cargo run --release -q -p tern-sim --example calibrate -- {path} > bench/results/sim-calibration.md`\n"
    );
    println!(
        "Lab constants (`LabPhysics::default()`): resident data outside the working set {} MiB, \
         tbf efficiency {}, switchover overhead {} ms, XBZRLE saving on tern-load pages {}; \
         simulator sync cost {} ms + {} ms/GiB. Real = median of the repeats; outcome class: \
         pre-copy / post-copy / aborted (the harness's time cap or the policy).\n",
        phys.resident_mib,
        phys.tbf_efficiency,
        phys.switchover_overhead_ms,
        phys.xbzrle_saving,
        SimConfig::default().sync_fixed_ms,
        SimConfig::default().sync_ms_per_gib,
    );
    println!(
        "| scenario | policy | real total | sim total | error | real class | sim class | match | passes real / sim | MB real / sim | blackout ms real / sim |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut rows, mut within, mut matched) = (0, 0, 0);
    let mut worst: Vec<(f64, String)> = vec![];
    for s in doc["scenarios"].as_array().into_iter().flatten() {
        let spec = &s["scenario"];
        let name = spec["name"].as_str().unwrap_or("?").to_string();
        let pattern = match spec["pattern"].as_str().unwrap_or("Sequential") {
            "Random" | "random" => LabPattern::Random,
            "Bursty" | "bursty" => LabPattern::Bursty,
            _ => LabPattern::Seq,
        };
        let context = spec["context"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .unwrap_or(tern_policy::MigrationContext::Manual);
        let cap_ms = spec["time_cap_s"].as_f64().map(|s| (s * 1000.0) as u64);
        let mut arms: BTreeMap<String, Arm> = BTreeMap::new();
        let mut order = vec![];
        let mut real: Vec<RealOutcome> = vec![];
        let mut wps: Vec<f64> = vec![];
        for r in s["runs"].as_array().into_iter().flatten() {
            let label = r["arm"].as_str().unwrap_or("?").to_string();
            let m = &r["metrics"];
            let arm = arms.entry(label.clone()).or_insert_with(|| {
                order.push(label.clone());
                Arm {
                    policy: r["policy"].as_str().unwrap_or("tern").to_string(),
                    post_copy: r["post_copy"].as_bool().unwrap_or(true),
                    totals: vec![],
                    passes: vec![],
                    bytes: vec![],
                    blackouts: vec![],
                    classes: vec![],
                }
            });
            if r["repeat"].as_u64() == Some(0) && r["post_copy"].as_bool() != Some(false) {
                real.push(RealOutcome {
                    policy: arm.policy.clone(),
                    outcome: m["outcome"].as_str().unwrap_or("?").to_string(),
                    total_ms: (m["total_time_s"].as_f64().unwrap_or(0.0) * 1000.0) as u64,
                    bytes_sent: m["bytes_sent"].as_u64().unwrap_or(0),
                    passes: m["passes"].as_u64().unwrap_or(0),
                });
            }
            if let Some(w) = m["wps_before"].as_f64() {
                wps.push(w);
            }
            arm.totals
                .push(m["total_time_s"].as_f64().unwrap_or(f64::NAN));
            if let Some(b) = m["blackout_ms"]
                .as_f64()
                .filter(|_| m["outcome"] != "timeout")
            {
                arm.blackouts.push(b);
            }
            arm.passes.push(m["passes"].as_f64().unwrap_or(f64::NAN));
            arm.bytes.push(m["bytes_sent"].as_f64().unwrap_or(f64::NAN));
            arm.classes
                .push(class_of_real(m["outcome"].as_str().unwrap_or("?")));
        }
        if let Some(dir) = &traces_dir {
            let trace = RunTrace {
                format: 1,
                name: name.clone(),
                workload: LabWorkload {
                    memory_mib: spec["memory_mib"].as_u64().unwrap_or(192),
                    working_set_mib: spec["working_set_mib"].as_u64().unwrap_or(0),
                    dirty_pages_per_s: spec["dirty_pages_per_s"].as_f64(),
                    pattern,
                    link: spec["link"].as_str().unwrap_or("300mbit").to_string(),
                    context,
                    post_copy: true,
                },
                // The guest's own counter (median over the runs), for reference; `scenario()`
                // replays it instead of the configured rate.
                measured_pages_per_s: Some(median(wps.clone())).filter(|m| m.is_finite()),
                time_cap_ms: cap_ms,
                physics: None,
                passes: vec![],
                real: real.clone(),
            };
            let set = doc["set"].as_str().unwrap_or("bench");
            let file = format!("{dir}/{set}-{name}.json");
            let written = serde_json::to_string_pretty(&trace)
                .map_err(|e| e.to_string())
                .and_then(|t| std::fs::write(&file, t + "\n").map_err(|e| e.to_string()));
            if let Err(e) = written {
                eprintln!("error: writing {file}: {e}");
                std::process::exit(2);
            }
            eprintln!("wrote {file}");
        }
        for label in order {
            let arm = &arms[&label];
            let lab = LabWorkload {
                memory_mib: spec["memory_mib"].as_u64().unwrap_or(192),
                working_set_mib: spec["working_set_mib"].as_u64().unwrap_or(0),
                dirty_pages_per_s: spec["dirty_pages_per_s"].as_f64(),
                pattern,
                link: spec["link"].as_str().unwrap_or("300mbit").to_string(),
                context,
                post_copy: arm.post_copy,
            };
            let sc = match scenario_from_lab(&lab, &phys) {
                Ok(sc) => sc,
                Err(e) => {
                    eprintln!("error: scenario {name}: {e}");
                    std::process::exit(2);
                }
            };
            let mut cfg = SimConfig::default();
            if let Some(c) = cap_ms {
                cfg.horizon_ms = c;
            }
            let policy = arm.policy.clone();
            if let Err(e) = tern_policy::policy_by_name(&policy) {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
            let mut make = || {
                tern_policy::policy_by_name(&policy)
                    .unwrap_or_else(|_| Box::new(tern_policy::baselines::QemuDefaultPolicy))
            };
            let (o, _) = simulate_with(&sc, &mut make, cfg, false);
            let real_t = median(arm.totals.clone());
            let sim_t = o.total_ms as f64 / 1000.0;
            let err = (sim_t - real_t) / real_t * 100.0;
            // The class most repeats ended in.
            let real_class = {
                let mut c: Vec<&str> = arm.classes.clone();
                c.sort();
                let mut best = (0, "?");
                for k in &c {
                    let n = c.iter().filter(|x| *x == k).count();
                    if n > best.0 {
                        best = (n, k);
                    }
                }
                best.1
            };
            let sim_class = class_of_sim(&o);
            rows += 1;
            if err.abs() <= 10.0 {
                within += 1;
            }
            let ok = real_class == sim_class;
            if ok {
                matched += 1;
            }
            worst.push((err.abs(), format!("{name}/{label} {err:+.0} %")));
            println!(
                "| {name} | {label} | {real_t:.2} s | {sim_t:.2} s | {err:+.0} % | {real_class} | {sim_class} | {} | {:.0} / {} | {:.0} / {:.0} | {} / {} |",
                if ok { "yes" } else { "**no**" },
                median(arm.passes.clone()),
                o.passes,
                median(arm.bytes.clone()) / 1e6,
                o.bytes_sent as f64 / 1e6,
                if arm.blackouts.is_empty() {
                    "–".to_string()
                } else {
                    format!("{:.0}", median(arm.blackouts.clone()))
                },
                o.downtime_ms.map_or("–".to_string(), |d| d.to_string()),
            );
        }
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "\n**{within} of {rows}** rows within ±10 % total time; **{matched} of {rows}** in the same outcome class."
    );
    let misses: Vec<&str> = worst
        .iter()
        .filter(|w| w.0 > 10.0)
        .map(|w| w.1.as_str())
        .collect();
    if !misses.is_empty() {
        println!("\nOutside ±10 %: {}.", misses.join(", "));
    }
}
