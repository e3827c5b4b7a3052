//! `cargo run --release -p tern-sim --example eta -- [seed] [n] [policy]`: the policy's ETA error
//! from 25 % of each completed run's time on (per scenario: the median over its estimates of
//! |estimate − actual finish| ÷ total time), summarised per context.

use tern_sim::{generate_scenarios, run_matrix};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seed = args.first().and_then(|s| s.parse().ok()).unwrap_or(1);
    let n = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let policy = args.get(2).cloned().unwrap_or_else(|| "tern".into());
    let scenarios = generate_scenarios(n, seed);
    let out = match run_matrix(&scenarios, std::slice::from_ref(&policy)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "{policy}: ETA error from 25 % of the run on, {n} scenarios, seed {seed}\n\
         {:<12} {:>9} {:>9} {:>8} {:>8} {:>8} {:>10}",
        "context", "completed", "with ETA", "median", "p90", "worst", "≤15 % share"
    );
    for ctx in tern_policy::MigrationContext::ALL {
        let mut e: Vec<f64> = out[0]
            .iter()
            .filter(|o| o.context == ctx && o.completed())
            .filter_map(|o| o.eta_error_from_25pct)
            .collect();
        let completed = out[0]
            .iter()
            .filter(|o| o.context == ctx && o.completed())
            .count();
        e.sort_by(f64::total_cmp);
        if e.is_empty() {
            continue;
        }
        let pct = |p: f64| e[((e.len() - 1) as f64 * p).round() as usize] * 100.0;
        let within = e.iter().filter(|v| **v <= 0.15).count();
        println!(
            "{:<12} {:>9} {:>9} {:>7.1}% {:>7.1}% {:>7.0}% {:>9.1}%",
            ctx.to_string(),
            completed,
            e.len(),
            pct(0.5),
            pct(0.9),
            pct(1.0),
            within as f64 * 100.0 / e.len() as f64
        );
    }
}
