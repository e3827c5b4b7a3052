//! The fault matrix: network cuts and killed QEMUs at every phase, on real guests.
//!
//! Links are cut with a blackhole qdisc (no RST, no carrier change: the hardest case, where
//! QEMU itself does not notice); integrity is judged by the guest's own verifier.

use std::sync::OnceLock;
use std::time::Duration;

use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_policy::MigrationContext;
use tern_scenario::faults::{FaultAction, FaultPlan, FaultTrigger};
use tern_scenario::{LabEnvironment, MigrationSummary, ScenarioSpec, run_scenario};

fn env() -> &'static LabEnvironment {
    static ENV: OnceLock<LabEnvironment> = OnceLock::new();
    ENV.get_or_init(|| {
        LabEnvironment::prepare(|s| eprintln!("setup: {s}")).expect("lab environment")
    })
}

fn cut(trigger: FaultTrigger, secs: u64) -> FaultPlan {
    FaultPlan {
        trigger,
        action: FaultAction::LinkCut {
            duration: Duration::from_secs(secs),
        },
    }
}

fn postcopy(after_s: f64) -> FaultTrigger {
    FaultTrigger::Postcopy {
        after: Duration::from_secs_f64(after_s),
    }
}

fn precopy(after_s: f64) -> FaultTrigger {
    FaultTrigger::Precopy {
        after: Duration::from_secs_f64(after_s),
    }
}

/// A guest dirtying 64 MiB as fast as it can over 100 Mbit/s, evacuated: it switches to
/// post-copy after the first pass, and post-copy then has ~5 s of pages to fetch.
fn spec(name: &str, faults: Vec<FaultPlan>) -> ScenarioSpec {
    ScenarioSpec {
        lab_name: name.into(),
        link_rate: Some("100mbit".parse().expect("rate")),
        memory_mib: 192,
        workload: WorkloadParams {
            working_set_mib: 64,
            rate: PageRate::Max,
            pattern: WritePattern::Sequential,
            verify: true,
        },
        context: MigrationContext::Evacuate,
        faults,
        ..ScenarioSpec::default()
    }
}

fn run(spec: ScenarioSpec) -> MigrationSummary {
    let name = spec.lab_name.clone();
    let s = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(run_scenario(env(), &spec, None))
        .expect("scenario");
    eprintln!(
        "{name}: outcome={} postcopy={} recoveries={} recovery_s={:?} blackout={:?} max_dest_gap_ms={:.0} corrupt={} ctl={} continuous={} after={} src_running={} total={:.1}s",
        s.outcome,
        s.switched_to_postcopy,
        s.recoveries,
        s.recovery_s,
        s.blackout_ms,
        s.max_dest_gap_ms,
        s.corrupt_pages,
        s.control_mismatches,
        s.heartbeat_continuous,
        s.verify_passes_after,
        s.source_running,
        s.total_time_s
    );
    for f in &s.faults_injected {
        eprintln!("  fault {f:?}");
    }
    s
}

fn assert_recovered(s: &MigrationSummary, cuts: u32) {
    assert!(s.switched_to_postcopy);
    assert_eq!(s.outcome, "completed", "{:?}", s.error);
    assert!(
        s.recoveries >= 1,
        "at least one recovery: {:?}",
        s.faults_injected
    );
    assert!(
        s.faults_injected
            .iter()
            .filter(|f| f.fired_at_ms.is_some())
            .count() as u32
            >= cuts
    );
    assert_eq!(s.corrupt_pages, 0);
    assert_eq!(s.control_mismatches, 0);
    assert!(
        s.heartbeat_continuous,
        "heartbeats continue on the destination: {:?}",
        s.heartbeat_anomalies
    );
    assert!(s.verify_passes_after >= 1);
    assert_eq!(s.guest_location.as_deref(), Some("h2"));
}

fn assert_source_kept(s: &MigrationSummary) {
    assert!(
        matches!(s.outcome.as_str(), "failed" | "aborted" | "completed"),
        "{}",
        s.outcome
    );
    if s.outcome != "completed" {
        assert!(s.source_running, "the guest keeps running on the source");
        assert_eq!(s.guest_location.as_deref(), Some("h1"));
        assert!(!s.destination_vm_present, "the destination was cleaned up");
    }
    assert_eq!(s.corrupt_pages, 0);
    assert_eq!(s.control_mismatches, 0);
    assert!(s.heartbeat_continuous, "{:?}", s.heartbeat_anomalies);
}

#[test]
fn link_cut_during_precopy_2s_rides_it_out_or_fails_cleanly() {
    let s = run(ScenarioSpec {
        context: MigrationContext::Manual,
        deadline_ms: Some(600_000),
        ..spec("t-pre-cut2", vec![cut(precopy(2.0), 2)])
    });
    assert!(!s.switched_to_postcopy || s.outcome == "completed");
    assert_source_kept(&s);
}

#[test]
fn link_cut_during_precopy_30s_fails_cleanly_with_the_source_running() {
    let s = run(ScenarioSpec {
        context: MigrationContext::Manual,
        deadline_ms: Some(600_000),
        ..spec("t-pre-cut30", vec![cut(precopy(2.0), 30)])
    });
    assert_source_kept(&s);
}

#[test]
fn destination_qemu_killed_during_precopy_leaves_the_source_running() {
    let s = run(ScenarioSpec {
        context: MigrationContext::Manual,
        deadline_ms: Some(600_000),
        ..spec(
            "t-pre-kill",
            vec![FaultPlan {
                trigger: precopy(2.0),
                action: FaultAction::KillDestinationQemu,
            }],
        )
    });
    assert_eq!(s.outcome, "failed");
    assert_source_kept(&s);
}

#[test]
fn link_cut_during_postcopy_2s_is_recovered() {
    let s = run(spec("t-pc-cut2", vec![cut(postcopy(0.5), 2)]));
    // A 2 s cut may end before the 2 s stall timeout: riding it out is fine too.
    assert_eq!(s.outcome, "completed");
    assert_eq!(s.corrupt_pages, 0);
    assert!(s.heartbeat_continuous && s.verify_passes_after >= 1);
}

#[test]
fn link_cut_during_postcopy_10s_is_recovered() {
    let s = run(spec("t-pc-cut10", vec![cut(postcopy(0.5), 10)]));
    assert_recovered(&s, 1);
}

#[test]
fn link_cut_during_postcopy_30s_is_recovered() {
    let s = run(spec("t-pc-cut30", vec![cut(postcopy(0.5), 30)]));
    assert_recovered(&s, 1);
}

#[test]
fn two_link_cuts_in_a_row_are_both_recovered() {
    let s = run(spec(
        "t-pc-twice",
        vec![cut(postcopy(0.5), 5), cut(postcopy(8.0), 5)],
    ));
    assert_recovered(&s, 2);
    assert!(s.recoveries >= 2, "two recoveries: {}", s.recoveries);
}

#[test]
fn link_cut_during_recovery_itself_is_retried() {
    let s = run(spec(
        "t-pc-inrecov",
        vec![
            cut(postcopy(0.5), 6),
            cut(
                FaultTrigger::Recovering {
                    after: Duration::ZERO,
                },
                6,
            ),
        ],
    ));
    assert_recovered(&s, 1);
}

#[test]
fn recovery_window_exceeded_strands_the_migration_for_the_operator() {
    let s = run(ScenarioSpec {
        recovery_window: Some(Duration::from_secs(6)),
        ..spec("t-pc-strand", vec![cut(postcopy(0.5), 25)])
    });
    assert_eq!(s.outcome, "stranded", "{:?}", s.error);
    assert!(s.guest_location.is_none());
    assert!(
        s.destination_vm_present,
        "the destination QEMU is kept for the operator"
    );
    let why = s.events.iter().rev().find_map(|e| match &e.kind {
        tern_engine::MigrationEventKind::State { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    let why = why.expect("a final transition");
    assert!(
        why.contains("migrate-recover") && why.contains("resume=true"),
        "{why}"
    );
}

/// What cannot be recovered: the destination QEMU dies in post-copy. The migration ends
/// `lost` (not `failed`: the source no longer holds a runnable guest), both sides are left for
/// the operator, and the error says which QEMU died and how.
#[test]
fn destination_qemu_killed_during_postcopy_is_reported_lost_with_how_it_died() {
    let s = run(spec(
        "t-pc-kill",
        vec![FaultPlan {
            trigger: postcopy(0.5),
            action: FaultAction::KillDestinationQemu,
        }],
    ));
    assert_eq!(s.outcome, "lost", "{:?}", s.error);
    assert!(s.switched_to_postcopy);
    assert!(s.guest_location.is_none(), "{:?}", s.guest_location);
    let error = s.error.clone().unwrap_or_default();
    assert!(
        error.contains("destination h2") && error.contains("exited") && error.contains("SIGKILL"),
        "{error}"
    );
}
