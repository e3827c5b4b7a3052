//! Post-copy under network failure: tern recovers instead of losing the guest.
//!
//! Real guests, real lab links cut with a blackhole qdisc (no RST, no carrier change: the
//! hardest case, where QEMU itself does not notice), integrity judged by the guest.

use std::sync::OnceLock;

use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_policy::MigrationContext;
use tern_scenario::faults::FaultPlan;
use tern_scenario::{LabEnvironment, MigrationSummary, ScenarioSpec, run_scenario};

fn env() -> &'static LabEnvironment {
    static ENV: OnceLock<LabEnvironment> = OnceLock::new();
    ENV.get_or_init(|| {
        LabEnvironment::prepare(|s| eprintln!("setup: {s}")).expect("lab environment")
    })
}

fn run(name: &str, faults: &[&str], link: &str) -> MigrationSummary {
    let spec = ScenarioSpec {
        lab_name: name.into(),
        link_rate: Some(link.parse().expect("rate")),
        memory_mib: 256,
        workload: WorkloadParams {
            working_set_mib: 96,
            rate: PageRate::Max,
            pattern: WritePattern::Sequential,
            verify: true,
        },
        context: MigrationContext::Evacuate,
        faults: faults
            .iter()
            .map(|f| f.parse::<FaultPlan>().expect("fault"))
            .collect(),
        ..ScenarioSpec::default()
    };
    let s = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(run_scenario(env(), &spec, None))
        .expect("scenario");
    eprintln!(
        "{name}: outcome={} recoveries={} recovery_s={:?} faults={:?} blackout={:?} max_dest_gap_ms={:.0} corrupt={} continuous={} total={:.1}s",
        s.outcome,
        s.recoveries,
        s.recovery_s,
        s.faults_injected,
        s.blackout_ms,
        s.max_dest_gap_ms,
        s.corrupt_pages,
        s.heartbeat_continuous,
        s.total_time_s
    );
    s
}

#[test]
fn link_cut_during_postcopy_is_recovered() {
    let s = run("t-pc-cut10", &["link-cut-postcopy:10"], "50mbit");
    assert!(s.switched_to_postcopy);
    assert_eq!(
        s.outcome,
        "completed",
        "{:?} {:?}",
        s.error,
        s.events.iter().rev().take(5).collect::<Vec<_>>()
    );
    assert!(s.recoveries >= 1, "recovered: {:?}", s.faults_injected);
    assert!(s.integrity_ok(), "guest intact on the destination");
    assert_eq!(s.guest_location.as_deref(), Some("h2"));
}
