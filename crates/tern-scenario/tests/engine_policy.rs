//! The engine and the policy on real guests: converging, non-converging, post-copy forbidden
//! by the destination host or by the VM, operator force-complete and abort.

use std::sync::OnceLock;
use std::time::Duration;

use tern_engine::{MigrationEventKind, MigrationState};
use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_policy::MigrationContext;
use tern_qemu::PostCopyPermission;
use tern_scenario::{LabEnvironment, MigrationSummary, ScenarioSpec, run_scenario};

fn env() -> &'static LabEnvironment {
    static ENV: OnceLock<LabEnvironment> = OnceLock::new();
    ENV.get_or_init(|| {
        LabEnvironment::prepare(|s| eprintln!("setup: {s}")).expect("lab environment")
    })
}

fn run(spec: ScenarioSpec) -> MigrationSummary {
    let name = spec.lab_name.clone();
    let s = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(run_scenario(env(), &spec, None))
        .expect("scenario");
    eprintln!(
        "{name}: outcome={} postcopy={} paused={} total={:.1}s blackout={:?} passes={} corrupt={} continuous={} after={} src_running={} ops={:?}",
        s.outcome,
        s.switched_to_postcopy,
        s.paused_guest,
        s.total_time_s,
        s.blackout_ms,
        s.passes,
        s.corrupt_pages,
        s.heartbeat_continuous,
        s.verify_passes_after,
        s.source_running,
        s.operator_results
    );
    for a in &s.actions {
        eprintln!("  action @{} {}: {}", a.at_ms, a.text(), a.reason);
    }
    s
}

/// A guest that dirties its 64 MiB working set as fast as it can: far more than 100 Mbit/s.
fn dirtier(name: &str) -> ScenarioSpec {
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
        ..ScenarioSpec::default()
    }
}

fn switch_pass(s: &MigrationSummary) -> Option<u64> {
    // The pass count when the switch was decided: passes completed before the action.
    let at = s
        .actions
        .iter()
        .find(|a| a.action == tern_policy::ActionKind::SwitchToPostcopy)?
        .at_ms;
    s.events
        .iter()
        .filter(|e| e.at_ms <= at)
        .filter_map(|e| match e.kind {
            MigrationEventKind::Pass { pass, .. } => Some(pass - 1),
            _ => None,
        })
        .max()
}

#[test]
fn converging_guest_completes_in_precopy_within_its_downtime() {
    let s = run(ScenarioSpec {
        lab_name: "t-converge".into(),
        link_rate: Some("200mbit".parse().expect("rate")),
        memory_mib: 192,
        workload: WorkloadParams {
            working_set_mib: 32,
            rate: PageRate::PerSecond(500),
            pattern: WritePattern::Random,
            verify: true,
        },
        vm_max_downtime_ms: Some(500),
        ..ScenarioSpec::default()
    });
    assert_eq!(s.outcome, "completed");
    assert!(!s.switched_to_postcopy, "a converging guest never switches");
    assert!(s.integrity_ok());
    let blackout = s.blackout_ms.expect("switchover measured");
    assert!(
        blackout <= 500.0 + 100.0,
        "blackout {blackout:.0} ms > max downtime 500 + 100 ms"
    );
}

#[test]
fn non_converging_guest_switches_to_postcopy_within_three_passes() {
    let s = run(ScenarioSpec {
        context: MigrationContext::Balance,
        ..dirtier("t-nonconv")
    });
    assert_eq!(s.outcome, "completed");
    assert!(s.switched_to_postcopy);
    let passes = switch_pass(&s).expect("a switch decision after a pass");
    assert!(passes <= 3, "switched after {passes} completed passes");
    let why = &s
        .actions
        .iter()
        .find(|a| a.action == tern_policy::ActionKind::SwitchToPostcopy)
        .expect("switch")
        .reason;
    assert!(!why.is_empty(), "the event log says why it switched");
    assert!(s.integrity_ok());
}

#[test]
fn postcopy_forbidden_by_destination_host_never_switches() {
    let s = run(ScenarioSpec {
        destination_permits_post_copy: false,
        context: MigrationContext::Balance,
        ..dirtier("t-denyhost")
    });
    assert!(!s.switched_to_postcopy);
    assert!(
        s.post_copy_verdict.contains("destination"),
        "{}",
        s.post_copy_verdict
    );
    assert!(
        matches!(s.outcome.as_str(), "completed" | "aborted"),
        "{}",
        s.outcome
    );
    if s.outcome == "aborted" {
        assert!(s.source_running);
        assert_eq!(s.guest_location.as_deref(), Some("h1"));
    }
    assert_eq!(s.corrupt_pages, 0);
    assert!(s.integrity_ok());
}

#[test]
fn postcopy_forbidden_by_the_vm_never_switches() {
    let s = run(ScenarioSpec {
        vm_post_copy: PostCopyPermission::Forbidden,
        context: MigrationContext::Balance,
        ..dirtier("t-denyvm")
    });
    assert!(!s.switched_to_postcopy);
    assert!(
        s.post_copy_verdict.to_lowercase().contains("vm"),
        "{}",
        s.post_copy_verdict
    );
    assert!(
        matches!(s.outcome.as_str(), "completed" | "aborted"),
        "{}",
        s.outcome
    );
    if s.outcome == "aborted" {
        assert!(s.source_running);
    }
    assert_eq!(s.corrupt_pages, 0);
    assert!(s.integrity_ok());
}

#[test]
fn force_complete_switches_to_postcopy_when_allowed() {
    let s = run(ScenarioSpec {
        context: MigrationContext::Manual,
        deadline_ms: Some(600_000),
        force_complete_after: Some(Duration::from_secs(4)),
        ..dirtier("t-fc-post")
    });
    assert_eq!(s.outcome, "completed");
    assert!(s.switched_to_postcopy, "{:?}", s.operator_results);
    assert!(s.integrity_ok());
}

#[test]
fn force_complete_pauses_the_guest_when_postcopy_is_forbidden() {
    let s = run(ScenarioSpec {
        context: MigrationContext::Manual,
        vm_post_copy: PostCopyPermission::Forbidden,
        deadline_ms: Some(600_000),
        force_complete_after: Some(Duration::from_secs(4)),
        ..dirtier("t-fc-pause")
    });
    assert_eq!(s.outcome, "completed", "{:?}", s.error);
    assert!(!s.switched_to_postcopy);
    assert!(s.paused_guest, "{:?}", s.actions);
    assert!(s.events.iter().any(|e| matches!(&e.kind,
        MigrationEventKind::State { to, .. } if *to == MigrationState::GuestPaused)));
    // Resumed on the destination: heartbeats and verifier continue there.
    assert!(s.integrity_ok(), "{s:?}");
    assert!(s.verify_passes_after >= 1);
}

#[test]
fn abort_after_the_switch_is_refused() {
    let s = run(ScenarioSpec {
        link_rate: Some("50mbit".parse().expect("rate")),
        context: MigrationContext::Manual,
        deadline_ms: Some(600_000),
        force_complete_after: Some(Duration::from_secs(2)),
        abort_after: Some(Duration::from_secs(5)),
        ..dirtier("t-abort-post")
    });
    assert!(s.switched_to_postcopy);
    assert_eq!(s.outcome, "completed");
    let abort = s
        .operator_results
        .iter()
        .find(|r| r.starts_with("Abort"))
        .expect("abort answered");
    assert!(
        abort.contains("refused") && abort.contains("destination holds the only"),
        "{abort}"
    );
    assert!(s.integrity_ok());
}

#[test]
fn evacuate_finishes_by_stop_and_copy_when_the_destination_denies_postcopy() {
    let s = run(ScenarioSpec {
        context: MigrationContext::Evacuate,
        destination_permits_post_copy: false,
        ..dirtier("t-evac-deny")
    });
    assert_eq!(
        s.outcome, "completed",
        "evacuate must finish: {:?}",
        s.error
    );
    assert!(!s.switched_to_postcopy);
    assert!(
        s.paused_guest
            || s.actions
                .iter()
                .any(|a| a.action == tern_policy::ActionKind::SetDowntimeLimit),
        "finished by stop-and-copy (pause or a raised downtime): {:?}",
        s.actions
    );
    assert!(s.blackout_ms.is_some(), "the blackout is reported");
    assert!(s.integrity_ok(), "{s:?}");
}
