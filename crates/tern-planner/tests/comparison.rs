//! tern against today's schedulers on a fixed seeded set, judged by the independent evaluator.
//! The full table is `cargo run --release -p tern-planner --example compare`.

use tern_planner::baselines::plan_with;
use tern_planner::cases::comparison_case;
use tern_planner::evaluate::evaluate;
use tern_planner::*;

#[test]
fn tern_is_lowest_within_1_2_of_the_bound_and_predicts_within_15_percent() {
    let mut strictly_lower = 0;
    for seed in 1..=12 {
        let req = comparison_case(seed);
        let tern = plan_evacuation(&req).unwrap();
        let e = evaluate(&req, &tern).unwrap();
        assert!(e.unfinished.is_empty() && e.over_capacity.is_empty());
        let bound = tern.lower_bound.any_schedule_s;
        assert!(
            e.makespan_s <= 1.2 * bound,
            "seed {seed}: tern {} > 1.2 × bound {bound}",
            e.makespan_s
        );
        let err = (tern.predicted_makespan_s - e.makespan_s).abs() / e.makespan_s;
        assert!(err <= 0.15, "seed {seed}: prediction error {err}");
        let mut best = f64::INFINITY;
        for kind in &SchedulerKind::ALL[1..] {
            let plan = plan_with(*kind, &req).unwrap();
            let b = evaluate(&req, &plan).unwrap().makespan_s;
            // 0.1 %: when a baseline's schedule is already optimal (one stream saturates the
            // source), tern picks an equivalent one by its own prediction, which can land a few
            // hundredths of a percent away in the evaluator.
            assert!(
                e.makespan_s <= b * (1.0 + 1e-3),
                "seed {seed}: tern {} s slower than {kind} {b} s",
                e.makespan_s
            );
            best = best.min(b);
        }
        if e.makespan_s < best * (1.0 - 1e-6) {
            strictly_lower += 1;
        }
    }
    // Ties happen when serial is already optimal (one stream saturates the source); on most
    // cases tern is strictly faster.
    assert!(strictly_lower >= 6, "strictly lower on {strictly_lower}/12");
}

#[test]
fn serial_is_what_nova_does_and_kubevirt_caps_hold() {
    let req = comparison_case(2);
    let serial = plan_with(SchedulerKind::Serial, &req).unwrap();
    assert_eq!(serial.concurrency.peak_per_source, 1);
    let kv = plan_with(SchedulerKind::KubeVirt, &req).unwrap();
    assert!(kv.concurrency.peak_per_source <= 2);
    assert_eq!(kv.concurrency.cluster_cap, Some(5));
    // Serial of a 57-VM host is far slower than tern.
    let tern = plan_evacuation(&req).unwrap();
    assert!(tern.predicted_makespan_s < 0.6 * serial.predicted_makespan_s);
}
