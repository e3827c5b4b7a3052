//! tern's planner against today's schedulers on seeded cases, judged by the independent
//! evaluator: `cargo run --release -p tern-planner --example compare [CASES]`.
//!
//! Prints a Markdown table: per case the lower bound, each scheduler's evaluated makespan as a
//! multiple of the bound, and tern's prediction error (predicted vs evaluated makespan).

use tern_planner::baselines::plan_with;
use tern_planner::cases::comparison_case;
use tern_planner::evaluate::evaluate;
use tern_planner::{EvacuationPlan, SchedulerKind};

fn main() {
    let cases: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let kinds = SchedulerKind::ALL;
    print!("| seed | hosts | VMs | GiB | bound s |");
    for k in kinds {
        print!(" {k} |");
    }
    println!(" tern pred. err |");
    print!("|---|---|---|---|---|");
    for _ in kinds {
        print!("---|");
    }
    println!("---|");
    let mut lowest = 0;
    let mut worst_ratio: f64 = 0.0;
    let mut worst_err: f64 = 0.0;
    let mut sum_err = 0.0;
    let mut gain_vs_best = Vec::new();
    let mut sums = vec![0.0; kinds.len()];
    for seed in 1..=cases {
        let req = comparison_case(seed);
        let gib: u64 = req.vms.iter().map(|v| v.memory_bytes).sum::<u64>() >> 30;
        let plans: Vec<EvacuationPlan> = kinds
            .iter()
            .map(|&k| plan_with(k, &req).expect("generated cases are valid"))
            .collect();
        let bound = plans[0].lower_bound.any_schedule_s;
        let evals: Vec<f64> = plans
            .iter()
            .map(|p| evaluate(&req, p).expect("plans evaluate").makespan_s)
            .collect();
        print!(
            "| {seed} | {} | {} | {gib} | {bound:.0} |",
            req.hosts.len(),
            req.vms.len()
        );
        for (i, e) in evals.iter().enumerate() {
            sums[i] += e / bound;
            print!(" {:.0} s ({:.2}×) |", e, e / bound);
        }
        let err = (plans[0].predicted_makespan_s - evals[0]).abs() / evals[0];
        println!(" {:.1} % |", err * 100.0);
        let best_baseline = evals[1..].iter().copied().fold(f64::INFINITY, f64::min);
        if evals[0] <= best_baseline {
            lowest += 1;
        }
        gain_vs_best.push(1.0 - evals[0] / best_baseline);
        worst_ratio = worst_ratio.max(evals[0] / bound);
        worst_err = worst_err.max(err);
        sum_err += err;
    }
    println!();
    print!("Mean makespan / lower bound:");
    for (i, k) in kinds.iter().enumerate() {
        print!(" {k} {:.3};", sums[i] / cases as f64);
    }
    println!();
    let mean_gain = gain_vs_best.iter().sum::<f64>() / cases as f64;
    let min_gain = gain_vs_best.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "tern lowest on {lowest}/{cases} cases; worst tern/bound {worst_ratio:.3}; \
         shorter than the best baseline of each case by {:.1} % on average (worst case {:.1} %); \
         prediction error mean {:.1} %, worst {:.1} %",
        mean_gain * 100.0,
        min_gain * 100.0,
        sum_err / cases as f64 * 100.0,
        worst_err * 100.0
    );
}
