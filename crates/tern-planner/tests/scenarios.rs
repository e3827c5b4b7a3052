//! Behaviour on hand-made fleets: unplaceable VMs, post-copy preference, balance skipping,
//! deadlines and suggestions, re-planning.

mod common;

use common::*;
use tern_planner::evaluate::evaluate;
use tern_planner::*;
use tern_policy::MigrationContext;

#[test]
fn a_vm_no_host_can_take_is_reported_with_every_hosts_reason() {
    let mut big = vm("big", "h0", 200, 0, "standard");
    big.required_features.insert("sev-snp".into());
    let mut req = request(
        MigrationContext::Evacuate,
        3,
        vec![big, vm("small", "h0", 2, 0, "standard")],
    );
    req.hosts[1].features.insert("sev-snp".into()); // has the feature, not the memory
    req.hosts[2].draining = true;
    req.hosts[3].qemu_version = QemuVersion::new(9, 2, 0);
    let plan = plan_evacuation(&req).unwrap();
    check_invariants(&req, &plan);
    assert_eq!(plan.migrations.len(), 1);
    let u = &plan.unplaceable[0];
    assert_eq!(
        (u.vm.as_str(), u.reason),
        ("big", UnplaceableReason::NoDestination)
    );
    let why = |h: &str| &u.refusals.iter().find(|r| r.host == h).unwrap().refusal;
    assert!(
        matches!(why("h1"), Refusal::NotEnoughMemory { .. }),
        "{u:?}"
    );
    assert_eq!(why("h2"), &Refusal::Draining);
    assert!(matches!(why("h3"), Refusal::OlderQemu { .. }));
    assert!(why("h1").to_string().contains("MiB free"));
}

#[test]
fn capacity_counts_vms_already_placed_by_the_plan() {
    // Three 60 GiB VMs, two hosts of 128 GiB: the third cannot fit anywhere after the others.
    let mut req = request(
        MigrationContext::Evacuate,
        2,
        (0..5)
            .map(|i| vm(&format!("v{i}"), "h0", 60, 0, "standard"))
            .collect(),
    );
    req.hosts[2].free_memory_bytes = 70 * GIB;
    let plan = plan_evacuation(&req).unwrap();
    check_invariants(&req, &plan);
    assert_eq!(plan.migrations.len(), 3);
    assert_eq!(plan.unplaceable.len(), 2);
    assert!(
        plan.unplaceable[0]
            .refusals
            .iter()
            .any(|r| matches!(r.refusal, Refusal::FullAfterPlacements { .. }))
    );
}

#[test]
fn a_vm_that_needs_post_copy_goes_where_post_copy_is_permitted() {
    // Dirties faster than the link: pre-copy cannot converge.
    let mut req = request(
        MigrationContext::Evacuate,
        2,
        vec![vm("hot", "h0", 8, 2_000_000_000, "standard")],
    );
    req.hosts[1].permit_post_copy = false;
    req.hosts[1].free_memory_bytes = 400 * GIB; // more attractive on memory alone
    let plan = plan_evacuation(&req).unwrap();
    let m = plan.migration("hot").unwrap();
    assert_eq!(m.destination, "h2");
    assert!(m.needs_post_copy && m.post_copy_permitted);
    assert!(m.reasons.contains(&Reason::PostCopyDestination));
    // With no post-copy anywhere it still moves (must finish), by stop-and-copy, and says so.
    req.hosts[2].permit_post_copy = false;
    let plan = plan_evacuation(&req).unwrap();
    let m = plan.migration("hot").unwrap();
    assert!(matches!(
        m.ending,
        duration::PredictedEnding::StopAndCopy { .. }
    ));
    assert!(m.reasons.contains(&Reason::NoPostCopyDestination));
}

#[test]
fn rebalance_skips_a_vm_that_would_break_its_sla() {
    let req = request(
        MigrationContext::Balance,
        2,
        vec![
            vm("lc-hot", "h0", 8, 2_000_000_000, "latency-critical"),
            vm("calm", "h0", 4, 1 << 20, "latency-critical"),
        ],
    );
    let plan = plan_evacuation(&req).unwrap();
    check_invariants(&req, &plan);
    assert!(plan.migration("calm").is_some());
    let u = plan.unplaceable.iter().find(|u| u.vm == "lc-hot").unwrap();
    assert_eq!(u.reason, UnplaceableReason::WouldBreakSla);
    // The same VM must move in an evacuation.
    let mut evac = req.clone();
    evac.context = MigrationContext::Evacuate;
    assert!(plan_evacuation(&evac).unwrap().unplaceable.is_empty());
}

#[test]
fn a_deadline_at_risk_comes_with_suggestions_that_help() {
    let vms: Vec<VmFacts> = (0..8)
        .map(|i| vm(&format!("v{i}"), "h0", 16, 400 * MIB, "standard"))
        .collect();
    let mut req = request(MigrationContext::Maintenance, 4, vms);
    req.settings.stream_cap_bytes_per_s = Some(400_000_000);
    req.hosts[0].max_outbound = 1;
    req.hosts[0].egress_bytes_per_s = 3_125_000_000;
    for h in &mut req.hosts[1..] {
        h.permit_post_copy = false;
    }
    let relaxed = plan_evacuation(&req).unwrap();
    assert_eq!(relaxed.deadline, DeadlineVerdict::NoDeadline);
    req.deadline_s = Some(relaxed.predicted_makespan_s * 0.5);
    let plan = plan_evacuation(&req).unwrap();
    assert!(matches!(plan.deadline, DeadlineVerdict::AtRisk { over_by_s } if over_by_s > 0.0));
    let conc = plan
        .suggestions
        .iter()
        .find_map(|s| match s {
            Suggestion::RaiseConcurrency {
                predicted_makespan_s,
                ..
            } => Some(*predicted_makespan_s),
            _ => None,
        })
        .expect("more concurrency helps a stream-capped link");
    assert!(conc < plan.predicted_makespan_s);
    assert!(
        plan.suggestions
            .iter()
            .any(|s| matches!(s, Suggestion::PermitPostCopy { .. }))
    );
    assert!(
        plan.suggestions
            .iter()
            .any(|s| matches!(s, Suggestion::OrdersTried { .. }))
    );
    req.deadline_s = Some(relaxed.predicted_makespan_s * 2.0);
    assert!(matches!(
        plan_evacuation(&req).unwrap().deadline,
        DeadlineVerdict::Met { .. }
    ));
}

#[test]
fn bad_requests_name_the_bad_value() {
    let mut req = request(
        MigrationContext::Evacuate,
        1,
        vec![vm("a", "h0", 1, 0, "batch")],
    );
    req.deadline_s = Some(0.0);
    let e = plan_evacuation(&req).unwrap_err();
    assert!(e.to_string().contains("deadline 0"), "{e}");
    req.deadline_s = None;
    req.hosts_to_empty = vec!["nope".into()];
    assert_eq!(
        plan_evacuation(&req).unwrap_err(),
        RequestError::UnknownHost("nope".into())
    );
    req.hosts_to_empty = vec!["h0".into()];
    req.vms[0].host = "h1".into();
    assert!(
        plan_evacuation(&req)
            .unwrap_err()
            .to_string()
            .contains("\"h1\"")
    );
}

fn mixed() -> EvacuationRequest {
    let vms = vec![
        vm("a", "h0", 8, 10 * MIB, "standard"),
        vm("b", "h0", 16, 100 * MIB, "standard"),
        vm("c", "h0", 4, 0, "batch"),
        vm("d", "h0", 8, 300 * MIB, "standard"),
        vm("e", "h0", 2, MIB, "standard"),
    ];
    let mut req = request(MigrationContext::Evacuate, 3, vms);
    req.settings.stream_cap_bytes_per_s = Some(700_000_000);
    req
}

#[test]
fn replan_explains_a_dirtier_vm_and_a_slower_link() {
    let req = mixed();
    let plan = plan_evacuation(&req).unwrap();
    let progress = Progress {
        elapsed_s: 1.0,
        observed_dirty: vec![("b".into(), 600 * MIB)],
        observed_egress: vec![("h0".into(), 600_000_000)],
        ..Progress::default()
    };
    let r = replan(&req, &plan, &progress).unwrap();
    check_invariants(&r.request, &r.plan);
    assert!(r.plan.deviations.iter().any(
        |d| matches!(d, Deviation::DirtyRate { vm, observed, .. } if vm == "b" && *observed == 600 * MIB)
    ));
    assert!(
        r.plan
            .deviations
            .iter()
            .any(|d| matches!(d, Deviation::LinkRate { host, .. } if host == "h0"))
    );
    match r.plan.deviations.last() {
        Some(Deviation::Makespan { before_s, after_s }) => assert!(after_s > before_s),
        other => panic!("{other:?}"),
    }
}

#[test]
fn replan_retargets_away_from_a_gone_destination_and_keeps_running_ones() {
    let req = mixed();
    let plan = plan_evacuation(&req).unwrap();
    let first = &plan.migrations[0];
    let gone = plan
        .migrations
        .iter()
        .map(|m| m.destination.clone())
        .find(|d| d != &first.destination)
        .unwrap();
    let progress = Progress {
        elapsed_s: 2.0,
        in_flight: vec![InFlightMigration {
            vm: first.vm.clone(),
            destination: first.destination.clone(),
            remaining_bytes: 1 << 30,
            elapsed_s: 2.0,
            in_post_copy: false,
        }],
        hosts_gone: vec![gone.clone()],
        ..Progress::default()
    };
    let r = replan(&req, &plan, &progress).unwrap();
    check_invariants(&r.request, &r.plan);
    assert!(r.plan.migrations.iter().all(|m| m.destination != gone));
    let kept = r.plan.migration(&first.vm).unwrap();
    assert_eq!(kept.trigger, StartTrigger::AlreadyRunning);
    assert_eq!(kept.destination, first.destination);
    assert!(r.plan.deviations.iter().any(
        |d| matches!(d, Deviation::DestinationGone { host, retargeted } if *host == gone && !retargeted.is_empty())
    ));
    // The evaluator can run the re-plan, in-flight migration included.
    let e = evaluate(&r.request, &r.plan).unwrap();
    assert!(e.unfinished.is_empty());
}

#[test]
fn a_failed_migration_is_retried_with_backoff_then_elsewhere_in_must_finish_contexts() {
    let req = mixed();
    let plan = plan_evacuation(&req).unwrap();
    let m = plan.migration("b").unwrap().clone();
    let fail = |attempts| Progress {
        elapsed_s: 10.0,
        failed: vec![FailedAttempt {
            vm: "b".into(),
            destination: m.destination.clone(),
            attempts,
        }],
        ..Progress::default()
    };
    let r1 = replan(&req, &plan, &fail(1)).unwrap();
    let retry = r1.plan.migration("b").unwrap();
    assert!(retry.predicted_start_s >= 5.0 - 1e-9, "{retry:?}");
    assert!(
        matches!(retry.trigger, StartTrigger::AtTime { at_s } if at_s >= 5.0)
            || retry.predicted_start_s > 5.0
    );
    assert!(
        retry
            .reasons
            .iter()
            .any(|r| matches!(r, Reason::Retry { attempt: 2, .. }))
    );
    // Second failure on the same host: 10 s backoff and another destination.
    let r2 = replan(&r1.request, &r1.plan, &fail(2)).unwrap();
    let retry2 = r2.plan.migration("b").unwrap();
    assert_ne!(retry2.destination, m.destination);
    assert!(retry2.predicted_start_s >= 10.0 - 1e-9);
    assert!(r2.plan.deviations.iter().any(|d| matches!(
        d,
        Deviation::FailedBeforeSwitch { action: RetryAction::Retry { backoff_s, same_destination: false }, .. }
            if (*backoff_s - 10.0).abs() < 1e-9
    )));
    // Balance does not retry: the VM stays, and the deviation says so.
    let mut bal = req.clone();
    bal.context = MigrationContext::Balance;
    let bplan = plan_evacuation(&bal).unwrap();
    let r = replan(&bal, &bplan, &fail(1)).unwrap();
    assert!(r.plan.migration("b").is_none());
    assert!(r.plan.deviations.iter().any(|d| matches!(
        d,
        Deviation::FailedBeforeSwitch {
            action: RetryAction::NotRetried,
            ..
        }
    )));
}

#[test]
fn sla_priority_first_starts_latency_critical_guests_first() {
    let mut req = request(
        MigrationContext::Evacuate,
        2,
        vec![
            vm("batch-big", "h0", 32, 0, "batch"),
            vm("lc-small", "h0", 2, 0, "latency-critical"),
            vm("std", "h0", 8, 0, "standard"),
        ],
    );
    req.hosts[0].max_outbound = 1;
    let fastest = plan_evacuation(&req).unwrap();
    assert_eq!(
        fastest.migrations[0].vm, "batch-big",
        "longest first by default"
    );
    req.settings.sla_priority_first = true;
    let plan = plan_evacuation(&req).unwrap();
    let order: Vec<&str> = plan.migrations.iter().map(|m| m.vm.as_str()).collect();
    assert_eq!(order, ["lc-small", "std", "batch-big"]);
    check_invariants(&req, &plan);
}
