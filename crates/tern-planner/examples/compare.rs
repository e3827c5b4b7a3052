//! tern's planner against today's schedulers on seeded cases, judged by the independent
//! evaluator: `cargo run --release -p tern-planner --example compare [CASES]`.
//!
//! Prints a Markdown table: per case the lower bound, each scheduler's evaluated makespan as a
//! multiple of the bound, and tern's prediction error (predicted vs evaluated makespan).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tern_planner::baselines::plan_with;
use tern_planner::cases::comparison_case;
use tern_planner::evaluate::evaluate;
use tern_planner::{EvacuationPlan, EvacuationRequest, Progress, SchedulerKind, replan};

/// The same case with what the planner was not told: each VM's real dirty rate is 0.5–2× the
/// reported one and each link 0–15 % slower.
fn perturbed(req: &EvacuationRequest, seed: u64) -> EvacuationRequest {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xdead_beef);
    let mut truth = req.clone();
    for v in &mut truth.vms {
        let (d, _) = v.dirty_rate();
        v.dirty_bytes_per_s = Some((d * rng.gen_range(0.5..2.0)) as u64);
    }
    for h in &mut truth.hosts {
        let f = rng.gen_range(0.85..1.0);
        h.egress_bytes_per_s = (h.egress_bytes_per_s as f64 * f) as u64;
        h.ingress_bytes_per_s = (h.ingress_bytes_per_s as f64 * f) as u64;
    }
    truth
}

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
    println!(" tern pred. err | err, perturbed truth |");
    print!("|---|---|---|---|---|---|");
    for _ in kinds {
        print!("---|");
    }
    println!("---|");
    let mut lowest = 0;
    let mut tied = 0;
    let mut perturbed_errs = Vec::new();
    let mut replan_errs: Vec<f64> = Vec::new();
    let mut own_err = vec![0.0; kinds.len()];
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
        for (i, p) in plans.iter().enumerate() {
            own_err[i] += (p.predicted_makespan_s - evals[i]).abs() / evals[i];
        }
        let truth = perturbed(&req, seed);
        let actual = evaluate(&truth, &plans[0])
            .expect("plans evaluate")
            .makespan_s;
        let perr = (plans[0].predicted_makespan_s - actual).abs() / actual;
        perturbed_errs.push(perr);
        // The controller measures dirty rates and link throughput as the first migrations run
        // and re-plans; with those observations folded in, the prediction error of the re-plan:
        let progress = Progress {
            observed_dirty: truth
                .vms
                .iter()
                .filter_map(|v| Some((v.name.clone(), v.dirty_bytes_per_s?)))
                .collect(),
            observed_egress: truth
                .hosts
                .iter()
                .filter(|h| truth.hosts_to_empty.contains(&h.name))
                .map(|h| (h.name.clone(), h.egress_bytes_per_s))
                .collect(),
            ..Progress::default()
        };
        let re = replan(&req, &plans[0], &progress).expect("re-plan");
        let re_actual = evaluate(&truth, &re.plan)
            .expect("plans evaluate")
            .makespan_s;
        replan_errs.push((re.plan.predicted_makespan_s - re_actual).abs() / re_actual);
        println!(" {:.1} % | {:.1} % |", err * 100.0, perr * 100.0);
        let best_baseline = evals[1..].iter().copied().fold(f64::INFINITY, f64::min);
        if evals[0] < best_baseline * (1.0 - 1e-6) {
            lowest += 1;
        } else if evals[0] <= best_baseline * (1.0 + 1e-6) {
            tied += 1;
        } else {
            eprintln!(
                "seed {seed}: tern {:.3} s > best baseline {best_baseline:.3} s",
                evals[0]
            );
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
    print!("Mean |own prediction − evaluation| / evaluation:");
    for (i, k) in kinds.iter().enumerate() {
        print!(" {k} {:.1} %;", own_err[i] / cases as f64 * 100.0);
    }
    println!();
    let pmean = perturbed_errs.iter().sum::<f64>() / cases as f64;
    let pmax = perturbed_errs.iter().copied().fold(0.0, f64::max);
    println!(
        "tern prediction error against a perturbed truth (dirty rates ×0.5–2, links −0–15 %): \
         mean {:.1} %, worst {:.1} %",
        pmean * 100.0,
        pmax * 100.0
    );
    println!(
        "after re-planning with the measured dirty rates and source egress: mean {:.1} %, worst {:.1} %",
        replan_errs.iter().sum::<f64>() / cases as f64 * 100.0,
        replan_errs.iter().copied().fold(0.0, f64::max) * 100.0
    );
    println!(
        "tern strictly lowest on {lowest}/{cases} cases, tied with the best baseline (±0.0001 %) on {tied}; worst tern/bound {worst_ratio:.3}; \
         shorter than the best baseline of each case by {:.1} % on average (worst case {:.1} %); \
         prediction error mean {:.1} %, worst {:.1} %",
        mean_gain * 100.0,
        min_gain * 100.0,
        sum_err / cases as f64 * 100.0,
        worst_err * 100.0
    );
}
