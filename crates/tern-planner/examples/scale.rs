//! One timed plan of a large drain: `cargo run --release -p tern-planner --example scale [HOSTS SOURCES VMS_PER_SOURCE]`.
use std::time::Instant;
use tern_planner::cases::{FleetShape, fleet};
use tern_planner::{SchedulerKind, baselines::plan_with};
fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let shape = FleetShape {
        hosts: *a.first().unwrap_or(&10_000),
        sources: *a.get(1).unwrap_or(&100),
        vms_per_source: *a.get(2).unwrap_or(&100),
    };
    let req = fleet(42, shape);
    for kind in [SchedulerKind::Lpt, SchedulerKind::Tern] {
        let t = Instant::now();
        let plan = plan_with(kind, &req).expect("valid fleet");
        println!(
            "{kind}: {} VMs planned in {:.3} s, predicted makespan {:.0} s (bound {:.0} s), {} unplaceable",
            plan.migrations.len(),
            t.elapsed().as_secs_f64(),
            plan.predicted_makespan_s,
            plan.lower_bound.any_schedule_s,
            plan.unplaceable.len()
        );
    }
}
