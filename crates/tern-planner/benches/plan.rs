//! Plan time (`cargo bench -p tern-planner`): tern's planner and the LPT baseline side by side on
//! 100 VMs over 50 hosts and 1,000 VMs over 500 hosts (criterion), then one timed run each of
//! issue 12's scale targets: a 100-VM host (< 1 s) and the drain of 100 hosts at once in a
//! 10,000-host fleet (< 10 s), with tern's predicted makespan against LPT's.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use tern_planner::baselines::plan_with;
use tern_planner::cases::{FleetShape, fleet};
use tern_planner::{EvacuationRequest, SchedulerKind, plan_evacuation};

fn shape(hosts: usize, sources: usize, vms_per_source: usize) -> EvacuationRequest {
    fleet(
        42,
        FleetShape {
            hosts,
            sources,
            vms_per_source,
        },
    )
}

fn bench_plans(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan");
    g.sample_size(10);
    for (label, req) in [
        ("100 VMs / 50 hosts", shape(50, 1, 100)),
        ("1000 VMs / 500 hosts", shape(500, 10, 100)),
    ] {
        g.bench_function(format!("tern {label}"), |b| {
            b.iter(|| black_box(plan_evacuation(&req)))
        });
        g.bench_function(format!("lpt {label}"), |b| {
            b.iter(|| black_box(plan_with(SchedulerKind::Lpt, &req)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_plans);

fn timed(label: &str, req: &EvacuationRequest, target_s: f64) {
    let t = Instant::now();
    let tern = plan_evacuation(req).expect("valid fleet");
    let tern_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let lpt = plan_with(SchedulerKind::Lpt, req).expect("valid fleet");
    let lpt_s = t.elapsed().as_secs_f64();
    println!(
        "| {label} | {} | {:.3} s | {:.3} s | {:.1}× | {:.0} s | {:.0} s | {:.3} | {:.0} s | {} |",
        req.vms.len(),
        tern_s,
        lpt_s,
        tern_s / lpt_s.max(1e-9),
        tern.predicted_makespan_s,
        lpt.predicted_makespan_s,
        tern.predicted_makespan_s / lpt.predicted_makespan_s,
        tern.lower_bound.any_schedule_s,
        if tern_s < target_s { "met" } else { "MISSED" },
    );
}

fn main() {
    benches();
    println!("\nscale targets (one run each; makespans are the planners' own predictions):\n");
    println!(
        "| case | VMs | tern plan time | LPT plan time | time ratio | tern makespan | LPT makespan | tern/LPT | lower bound | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    timed(
        "100-VM host, 50-host fleet (< 1 s)",
        &shape(50, 1, 100),
        1.0,
    );
    timed("1,000 VMs, 10 of 500 hosts", &shape(500, 10, 100), 10.0);
    timed(
        "drain 100 hosts of a 10,000-host fleet, 30 VMs each (< 10 s)",
        &shape(10_000, 100, 30),
        10.0,
    );
    timed(
        "drain 100 hosts of a 10,000-host fleet, 100 VMs each (< 10 s)",
        &shape(10_000, 100, 100),
        10.0,
    );
    Criterion::default().configure_from_args().final_summary();
}
