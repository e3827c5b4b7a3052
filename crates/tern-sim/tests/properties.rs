//! Properties of tern (and every baseline) in the simulator.

use proptest::prelude::*;
use tern_policy::{
    Action, HostLimits, MigrationContext, POLICY_NAMES, PostCopyPermission, QemuFeatures,
    SlaCatalog, SlaClass, policy_by_name, post_copy_permission, unguarded_policy_by_name,
};
use tern_sim::{
    DirtyPhase, Outage, OutageKind, OutputFormat, Scenario, SimArgs, SimConfig, SimResult,
    generate_scenarios, run, simulate, simulate_with,
};

const MIB: u64 = 1 << 20;

/// Any guest, workload and link in the lab's range (and beyond: up to 1.5 M pages/s), with
/// blackhole outages (`links_down` adds link-down outages too).
fn arb_scenario(
    context: MigrationContext,
    outages: bool,
    links_down: bool,
) -> impl Strategy<Value = Scenario> {
    (
        (7u32..13).prop_map(|e| (1u64 << e) * MIB),
        0.01f64..1.0,
        prop_oneof![Just(0.0), 1.0f64..1_500_000.0],
        6.25e6f64..1.25e8,
        0usize..3,
        any::<[bool; 12]>(),
        proptest::collection::vec((1_000u64..200_000, 500u64..30_000, any::<bool>()), 0..3),
        (15u64..=50, 0.3f64..1.0, proptest::option::of(0.1f64..3.0)),
    )
        .prop_map(
            move |(ram, wws_frac, rate, link, sla, b, outs, (overhead, nonzero, phase2))| {
                let classes: Vec<SlaClass> = SlaCatalog::builtin().classes().cloned().collect();
                let mut phases = vec![DirtyPhase {
                    from_ms: 0,
                    pages_per_s: rate,
                }];
                if let Some(f) = phase2 {
                    phases.push(DirtyPhase {
                        from_ms: 30_000,
                        pages_per_s: rate * f,
                    });
                }
                Scenario {
                    id: 0,
                    context,
                    sla: classes[sla].clone(),
                    ram_bytes: ram,
                    nonzero_fraction: nonzero,
                    wws_bytes: ((ram as f64 * wws_frac) as u64).max(MIB),
                    dirty_phases: phases,
                    page_size: 4096,
                    vcpus: 2,
                    link_bytes_per_s: link as u64,
                    outages: if outages {
                        let mut t = 0;
                        outs.into_iter()
                            .map(|(gap, dur, down)| {
                                t += gap;
                                let o = Outage {
                                    start_ms: t,
                                    duration_ms: dur,
                                    kind: if down && links_down {
                                        OutageKind::LinkDown
                                    } else {
                                        OutageKind::Blackhole
                                    },
                                };
                                t += dur;
                                o
                            })
                            .collect()
                    } else {
                        vec![]
                    },
                    switchover_overhead_ms: overhead,
                    assumed_overhead_ms: 50,
                    source: HostLimits {
                        permit_post_copy: b[0],
                        permit_throttle: b[1],
                        bandwidth_cap_bytes_per_s: None,
                    },
                    destination: HostLimits {
                        permit_post_copy: b[2],
                        permit_throttle: true,
                        bandwidth_cap_bytes_per_s: None,
                    },
                    vm_post_copy: if b[3] {
                        PostCopyPermission::Allowed
                    } else {
                        PostCopyPermission::Forbidden
                    },
                    features: QemuFeatures {
                        postcopy_ram: b[4],
                        postcopy_preempt: b[5],
                        postcopy_recovery: b[6],
                        auto_converge: b[7],
                        dirty_limit: b[8],
                        multifd: b[9],
                        multifd_with_postcopy: b[10],
                        xbzrle: b[11],
                        calc_dirty_rate: true,
                    },
                    deadline_ms: None,
                    xbzrle_saving: 0.1,
                    probe_error: 0.0,
                    workload: None,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// An evacuation under tern always completes — whatever the dirty rate, link rate, working
    /// set, permissions and (blackhole) outages — because pause (stop-and-copy) is always
    /// available when post-copy is not. Never an endless pre-copy, never an abort.
    #[test]
    fn tern_evacuation_always_completes(sc in arb_scenario(MigrationContext::Evacuate, true, false)) {
        let o = simulate(&sc, "tern").unwrap();
        prop_assert_eq!(o.result, SimResult::Completed, "{:?}", o);
    }

    /// Link-down outages too: pre-copy restarts, post-copy recovers when armed. Only a post-copy
    /// without recovery support can lose the VM.
    #[test]
    fn tern_evacuation_completes_unless_postcopy_cannot_recover(sc in arb_scenario(MigrationContext::Evacuate, true, true)) {
        let o = simulate(&sc, "tern").unwrap();
        if o.result != SimResult::Completed {
            prop_assert_eq!(o.result, SimResult::VmLost);
            prop_assert!(o.used_postcopy && !sc.features.postcopy_recovery);
        }
    }

    /// Balance never exceeds the SLA's downtime or throttle, and uses post-copy only when the SLA
    /// accepts it (without outages, which no policy can foresee, and with the real switchover
    /// overhead within what the planner was told).
    #[test]
    fn tern_balance_never_exceeds_the_sla(sc in arb_scenario(MigrationContext::Balance, false, false)) {
        let o = simulate(&sc, "tern").unwrap();
        if let Some(dt) = o.downtime_ms.filter(|_| o.completed()) {
            prop_assert!(dt <= sc.sla.max_downtime_ms, "downtime {} > {}: {:?}", dt, sc.sla.max_downtime_ms, o);
        }
        prop_assert!(o.max_throttle_pct <= sc.sla.max_throttle_pct, "{:?}", o);
        prop_assert!(!o.used_postcopy || sc.sla.post_copy_acceptable);
        prop_assert!(!o.paused);
        prop_assert!(o.sla_violation.is_none(), "{:?}", o.sla_violation);
    }

    /// No policy, even unguarded, switches to post-copy when hosts, VM or QEMU forbid it.
    #[test]
    fn no_policy_switches_without_permission(sc in arb_scenario(MigrationContext::Evacuate, true, false)) {
        let permitted = post_copy_permission(&sc.plan_input()).allowed;
        for name in POLICY_NAMES {
            let mut make = || unguarded_policy_by_name(name).unwrap();
            let (o, trace) = simulate_with(&sc, &mut make, SimConfig::default(), true);
            let switched = trace.iter().any(|t| t.decision.action == Action::SwitchToPostcopy);
            prop_assert!(permitted || !switched, "{} switched without permission", name);
            prop_assert!(permitted || !o.used_postcopy);
        }
    }

    /// The simulator and the policies are deterministic.
    #[test]
    fn simulation_is_deterministic(sc in arb_scenario(MigrationContext::Maintenance, true, true)) {
        for name in ["tern", "kubevirt-stall", "nova-2016"] {
            let mut make = || policy_by_name(name).unwrap();
            let a = simulate_with(&sc, &mut make, SimConfig::default(), true);
            let b = simulate_with(&sc, &mut make, SimConfig::default(), true);
            prop_assert_eq!(a, b);
        }
    }
}

#[test]
fn qemu_model_converges_idle_and_not_hot_guests() {
    let base = &generate_scenarios(1, 3)[0];
    let mut idle = base.clone();
    // Described by the legacy fields: uniform random writes over `wws_bytes`.
    idle.workload = None;
    idle.dirty_phases = vec![DirtyPhase {
        from_ms: 0,
        pages_per_s: 0.0,
    }];
    idle.outages.clear();
    let o = simulate(&idle, "qemu-default").unwrap();
    assert_eq!(o.result, SimResult::Completed);
    assert_eq!(
        o.passes, 3,
        "one pass of RAM, an empty dirty set, the final sync (dirty-sync-count as in the lab)"
    );
    assert!(o.downtime_ms.unwrap() <= 300 + idle.switchover_overhead_ms);
    // First pass sends the non-zero RAM at the link rate.
    let expect =
        idle.ram_bytes as f64 * idle.nonzero_fraction / idle.link_bytes_per_s.min(128 << 20) as f64;
    assert!(
        (o.total_ms as f64 / 1000.0 - expect).abs() < 1.0,
        "{} vs {expect}",
        o.total_ms
    );

    let mut hot = idle.clone();
    hot.source.permit_post_copy = true;
    hot.destination.permit_post_copy = true;
    hot.vm_post_copy = PostCopyPermission::Allowed;
    hot.features.postcopy_ram = true;
    hot.wws_bytes = 256 * MIB;
    hot.ram_bytes = 1024 * MIB;
    hot.link_bytes_per_s = 12_500_000;
    hot.dirty_phases = vec![DirtyPhase {
        from_ms: 0,
        pages_per_s: 500_000.0,
    }];
    let o = simulate(&hot, "qemu-default").unwrap();
    assert_eq!(
        o.result,
        SimResult::TimedOut,
        "256 MiB hot set over 100 Mbit/s never converges"
    );
    let o = simulate(&hot, "libvirt-postcopy-after-precopy").unwrap();
    assert_eq!(o.result, SimResult::Completed);
    assert!(o.used_postcopy && o.postcopy_ms > 15_000, "{o:?}");
}

#[test]
fn link_down_in_postcopy_without_recovery_loses_the_vm() {
    let mut sc = generate_scenarios(1, 3)[0].clone();
    sc.context = MigrationContext::Evacuate;
    sc.workload = None;
    sc.ram_bytes = 1024 * MIB;
    sc.wws_bytes = 256 * MIB;
    sc.link_bytes_per_s = 12_500_000;
    sc.nonzero_fraction = 1.0;
    sc.dirty_phases = vec![DirtyPhase {
        from_ms: 0,
        pages_per_s: 500_000.0,
    }];
    sc.source.permit_post_copy = true;
    sc.destination.permit_post_copy = true;
    sc.vm_post_copy = PostCopyPermission::Allowed;
    sc.features.postcopy_ram = true;
    sc.sla = SlaCatalog::builtin().get("standard").unwrap().clone();
    // libvirt switches after the first pass (~86 s); cut the link during post-copy.
    sc.outages = vec![Outage {
        start_ms: 95_000,
        duration_ms: 5_000,
        kind: OutageKind::LinkDown,
    }];
    sc.features.postcopy_recovery = false;
    assert_eq!(
        simulate(&sc, "libvirt-postcopy-after-precopy")
            .unwrap()
            .result,
        SimResult::VmLost
    );
    sc.features.postcopy_recovery = true;
    // Baselines never arm recovery; tern does.
    assert_eq!(
        simulate(&sc, "libvirt-postcopy-after-precopy")
            .unwrap()
            .result,
        SimResult::VmLost
    );
    let o = simulate(&sc, "tern").unwrap();
    assert_eq!(o.result, SimResult::Completed, "{o:?}");
}

#[test]
fn run_prints_table_and_json_for_all_policies() {
    let args = SimArgs {
        compare: true,
        scenarios: 40,
        seed: 5,
        ..SimArgs::default()
    };
    let text = run(&args).unwrap();
    for name in POLICY_NAMES {
        assert!(text.contains(name), "{name} missing");
    }
    let json = run(&SimArgs {
        output: OutputFormat::Json,
        ..args.clone()
    })
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let records = v.as_array().unwrap();
    assert_eq!(records.len(), POLICY_NAMES.len() * 4);
    for r in records {
        for key in [
            "policy",
            "context",
            "scenarios",
            "completed_pct",
            "median_total_s",
            "p95_total_s",
            "median_downtime_ms",
            "sla_violations",
            "median_bytes_over_ram",
        ] {
            assert!(r.get(key).is_some(), "missing {key}");
        }
        assert_eq!(r["scenarios"], 10);
    }
    assert!(
        run(&SimArgs {
            scenarios: 0,
            ..SimArgs::default()
        })
        .is_err()
    );
    let err = run(&SimArgs {
        policies: vec!["vmware".into()],
        ..SimArgs::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("kubevirt-stall"));
}

/// The acceptance check: over 1000 generated scenarios tern completes every evacuation and
/// maintenance, and never breaks a balance SLA. (Release mode runs this in ~1 s; in debug it
/// takes longer, so it runs on a quarter of the scenarios.)
#[test]
fn tern_completes_every_generated_evacuation() {
    let n = if cfg!(debug_assertions) { 250 } else { 1000 };
    let scenarios = generate_scenarios(n, 1);
    for sc in &scenarios {
        let o = simulate(sc, "tern").unwrap();
        match sc.context {
            MigrationContext::Evacuate => {
                assert_eq!(o.result, SimResult::Completed, "scenario {}: {o:?}", sc.id)
            }
            MigrationContext::Balance => {
                assert!(o.sla_violation.is_none(), "scenario {}: {o:?}", sc.id)
            }
            _ => {}
        }
    }
}

#[test]
fn clap_args_parse() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }
    let cli = Cli::parse_from([
        "tern-sim",
        "--compare",
        "--scenarios",
        "10",
        "--seed",
        "3",
        "--policy",
        "tern",
        "--policy",
        "nova",
        "-o",
        "json",
        "--context",
        "balance",
    ]);
    assert!(cli.sim.compare);
    assert_eq!(cli.sim.scenarios, 10);
    assert_eq!(cli.sim.policies, vec!["tern", "nova"]);
    assert_eq!(cli.sim.output, OutputFormat::Json);
    assert_eq!(cli.sim.context, Some(MigrationContext::Balance));
    let d = Cli::parse_from(["tern-sim"]).sim;
    assert_eq!((d.scenarios, d.seed, d.compare), (1000, 1, false));
    assert!(Cli::try_parse_from(["tern-sim", "--context", "evacuation"]).is_err());
}
