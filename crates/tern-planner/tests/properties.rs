//! Property tests of the planner's invariants on generated fleets.

mod common;

use proptest::prelude::*;
use tern_planner::cases::{FleetShape, fleet};
use tern_planner::evaluate::evaluate;
use tern_planner::*;
use tern_policy::MigrationContext;

fn arb_request() -> impl Strategy<Value = EvacuationRequest> {
    (
        any::<u64>(),
        3usize..16,
        1usize..3,
        1usize..25,
        prop_oneof![
            Just(MigrationContext::Evacuate),
            Just(MigrationContext::Maintenance),
            Just(MigrationContext::Balance)
        ],
        proptest::collection::vec(0u8..6, 16),
        proptest::option::of(10.0f64..2000.0),
        0.2f64..1.5,
    )
        .prop_map(
            |(seed, hosts, sources, per_source, context, flags, deadline, mem_scale)| {
                let mut req = fleet(
                    seed,
                    FleetShape {
                        hosts,
                        sources,
                        vms_per_source: per_source,
                    },
                );
                req.context = context;
                req.deadline_s = deadline;
                let n_sources = req.hosts_to_empty.len();
                for (i, h) in req.hosts.iter_mut().enumerate().skip(n_sources) {
                    match flags[i % flags.len()] {
                        0 => h.draining = true,
                        1 => h.reachable = false,
                        2 => h.permit_post_copy = false,
                        _ => {}
                    }
                    // Tight memory sometimes: some VMs must be reported unplaceable.
                    h.free_memory_bytes = (h.free_memory_bytes as f64 * mem_scale) as u64;
                }
                req
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn plans_keep_every_invariant(req in arb_request()) {
        let plan = plan_evacuation(&req).unwrap();
        common::check_invariants(&req, &plan);
        // The independent evaluator agrees the plan respects the hosts.
        let e = evaluate(&req, &plan).unwrap();
        prop_assert!(e.over_capacity.is_empty(), "{:?}", e.over_capacity);
        prop_assert!(e.unfinished.is_empty(), "{:?}", e.unfinished);
        prop_assert!(e.makespan_s >= plan.lower_bound.any_schedule_s * (1.0 - 1e-9));
    }

    #[test]
    fn planning_is_deterministic(req in arb_request()) {
        let a = plan_evacuation(&req).unwrap();
        let b = plan_evacuation(&req.clone()).unwrap();
        prop_assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        prop_assert_eq!(a, b);
    }

    #[test]
    fn baselines_keep_the_same_invariants(req in arb_request()) {
        for kind in SchedulerKind::ALL {
            let plan = baselines::plan_with(kind, &req).unwrap();
            common::check_invariants(&req, &plan);
        }
    }

    #[test]
    fn replanning_keeps_every_invariant(
        req in arb_request(),
        done in 0usize..5,
        fail_first_running in any::<bool>(),
        kill_a_destination in any::<bool>(),
    ) {
        let plan = plan_evacuation(&req).unwrap();
        let mut progress = Progress { elapsed_s: 3.0, ..Progress::default() };
        let mut ms = plan.migrations.iter();
        progress.completed = ms.by_ref().take(done).map(|m| m.vm.clone()).collect();
        if let Some(m) = ms.next() {
            if fail_first_running {
                progress.failed.push(FailedAttempt {
                    vm: m.vm.clone(),
                    destination: m.destination.clone(),
                    attempts: 1,
                });
            } else {
                progress.in_flight.push(InFlightMigration {
                    vm: m.vm.clone(),
                    destination: m.destination.clone(),
                    remaining_bytes: 1 << 28,
                    elapsed_s: 3.0,
                    in_post_copy: false,
                });
            }
        }
        if kill_a_destination && let Some(m) = ms.next() {
            progress.hosts_gone.push(m.destination.clone());
        }
        let r = replan(&req, &plan, &progress).unwrap();
        common::check_invariants(&r.request, &r.plan);
        for vm in &progress.completed {
            prop_assert!(r.plan.migration(vm).is_none());
        }
        for gone in &progress.hosts_gone {
            prop_assert!(r
                .plan
                .migrations
                .iter()
                .all(|m| &m.destination != gone || m.trigger == StartTrigger::AlreadyRunning));
        }
        let explained = r
            .plan
            .deviations
            .iter()
            .any(|d| matches!(d, Deviation::Makespan { .. }));
        prop_assert!(explained, "the new makespan is explained");
    }
}
