//! Debug aid: `cargo run --release -p tern-sim --example losses -- [seed] [n] [context]`
//! runs every policy once on the same scenarios and lists, per (context, baseline), the scenarios
//! where tern is worse and why (outcome class, total time, blackout), plus a tally per reason.

use std::collections::BTreeMap;

use tern_policy::POLICY_NAMES;
use tern_sim::{SimOutcome, Verdict, generate_scenarios, run_matrix, verdict};

fn why(t: &SimOutcome, b: &SimOutcome) -> &'static str {
    if t.result != b.result || t.sla_violation.is_some() != b.sla_violation.is_some() {
        "class"
    } else if t.total_ms as f64 * 0.9 > b.total_ms as f64 + 500.0 {
        "time"
    } else if t.downtime_ms.unwrap_or(0) as f64 * 0.9 > b.downtime_ms.unwrap_or(0) as f64 + 20.0 {
        "blackout"
    } else {
        "degraded"
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seed = args.first().and_then(|s| s.parse().ok()).unwrap_or(1);
    let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let ctx = args.get(2).cloned();
    let mut scenarios = generate_scenarios(n, seed);
    if let Some(c) = &ctx {
        scenarios.retain(|s| &s.context.to_string() == c);
    }
    let policies: Vec<String> = POLICY_NAMES.iter().map(|s| s.to_string()).collect();
    let out = run_matrix(&scenarios, &policies).expect("known policies");
    let mut tally: BTreeMap<(String, String, &str), usize> = BTreeMap::new();
    for (pi, name) in policies.iter().enumerate().skip(1) {
        for (si, sc) in scenarios.iter().enumerate() {
            let (t, b) = (&out[0][si], &out[pi][si]);
            if verdict(t, b) != Verdict::Worse {
                continue;
            }
            let w = why(t, b);
            *tally
                .entry((sc.context.to_string(), name.clone(), w))
                .or_default() += 1;
            println!(
                "{} #{} vs {name} [{w}] cap={} sla={} ram={}MiB wws={}MiB rate={:.0} link={:.0}Mbit pc={} rec={} out={} | tern {:?} {:.1}s dt={:?} pc={:.1}s thr={:.1}s viol={} | base {:?} {:.1}s dt={:?} pc={:.1}s thr={:.1}s viol={}",
                sc.context,
                sc.id,
                sc.host_bandwidth_cap().is_some(),
                sc.sla.name,
                sc.ram_bytes >> 20,
                sc.wws_bytes >> 20,
                sc.dirty_phases[0].pages_per_s,
                sc.link_bytes_per_s as f64 * 8e-6,
                sc.features.postcopy_ram
                    && sc.source.permit_post_copy
                    && sc.destination.permit_post_copy,
                sc.features.postcopy_recovery,
                sc.outages.len(),
                t.result,
                t.total_ms as f64 / 1000.0,
                t.downtime_ms,
                t.postcopy_ms as f64 / 1000.0,
                t.throttled_ms as f64 / 1000.0,
                t.sla_violation.is_some(),
                b.result,
                b.total_ms as f64 / 1000.0,
                b.downtime_ms,
                b.postcopy_ms as f64 / 1000.0,
                b.throttled_ms as f64 / 1000.0,
                b.sla_violation.is_some(),
            );
        }
    }
    println!("\ntally (context, baseline, reason): count");
    for ((c, b, w), k) in tally {
        println!("{c:<12} {b:<31} {w:<9} {k}");
    }
}
