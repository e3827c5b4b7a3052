//! Replays a recorded lab run under every policy:
//! `cargo run --release -q -p tern-sim --example replay -- bench/traces/quick-rho1.json`.
//!
//! The trace (`tern_sim::RunTrace`, JSON) carries the guest's write process as `tern-load`
//! reported it, the link, the harness's time cap and how the real runs ended; the replay prints
//! each policy's simulated outcome next to the real one where the trace has it.

use tern_sim::{RunTrace, SimResult, replay};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: replay TRACE.json");
        std::process::exit(2);
    };
    let trace = match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| RunTrace::from_json(&t).map_err(|e| e.to_string()))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {path}: {e}");
            std::process::exit(2);
        }
    };
    let outcomes = match replay(&trace, tern_policy::POLICY_NAMES) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {path}: {e}");
            std::process::exit(2);
        }
    };
    println!("replay of {} ({path})\n", trace.name);
    println!("| policy | sim result | sim total | passes | MB sent | blackout | real |");
    println!("|---|---|---|---|---|---|---|");
    for o in outcomes {
        let real =
            trace
                .real
                .iter()
                .find(|r| r.policy == o.policy)
                .map_or("–".to_string(), |r| {
                    format!(
                        "{} {:.2} s, {} passes",
                        r.outcome,
                        r.total_ms as f64 / 1000.0,
                        r.passes
                    )
                });
        let result = match o.result {
            SimResult::Completed if o.used_postcopy => "post-copy",
            SimResult::Completed => "completed",
            SimResult::Aborted => "aborted",
            SimResult::TimedOut => "timeout",
            SimResult::VmLost => "vm lost",
        };
        println!(
            "| {} | {result} | {:.2} s | {} | {:.0} | {} | {real} |",
            o.policy,
            o.total_ms as f64 / 1000.0,
            o.passes,
            o.bytes_sent as f64 / 1e6,
            o.downtime_ms.map_or("–".into(), |d| format!("{d} ms")),
        );
    }
}
