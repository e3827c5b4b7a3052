//! Behaviour of each policy on hand-made observation sequences, and properties over random ones.

use proptest::prelude::*;
use tern_policy::baselines::{NovaConfig, NovaPolicy};
use tern_policy::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn input(context: MigrationContext, sla: &str, ram: u64) -> PlanInput {
    let sla = SlaCatalog::builtin().get(sla).unwrap().clone();
    let mut i = PlanInput::new(
        context,
        sla,
        VmLimits::new(ram),
        QemuFeatures::qemu_10_tcg(),
    );
    i.link_bytes_per_s = Some(12_500_000);
    i
}

fn sample(at_ms: u64, pass: u64, remaining: u64, bw: u64) -> IterationSample {
    IterationSample {
        at_ms,
        pass,
        transferred_bytes: 0,
        remaining_bytes: remaining,
        total_bytes: GIB,
        dirty_pages_rate: 0,
        page_size: 4096,
        throughput_bytes_per_s: bw,
        expected_downtime_ms: None,
        throttle_pct: None,
        phase: Phase::Precopy,
    }
}

fn pass(at_ms: u64, pass_no: u64, remaining: u64) -> Observation {
    Observation::PassCompleted(sample(at_ms, pass_no, remaining, 12_500_000))
}

fn tick(at_ms: u64, remaining: u64) -> Observation {
    Observation::Tick {
        at_ms,
        latest: Some(sample(at_ms, 2, remaining, 12_500_000)),
    }
}

fn actions(
    p: &mut dyn MigrationPolicy,
    plan: &MigrationPlan,
    obs: &[Observation],
) -> Vec<(u64, Action)> {
    obs.iter()
        .flat_map(|o| {
            p.decide(plan, o)
                .into_iter()
                .map(move |d| (o.at_ms(), d.action))
        })
        .filter(|(_, a)| *a != Action::Continue)
        .collect()
}

#[test]
fn nova_downtime_steps_match_the_worked_example() {
    // 8 GiB: delay 600 s, steps (0, 50), (600, 95), (1200, 140), …, (6000, 500).
    let nova = NovaPolicy::new(NovaConfig::default());
    let steps = nova.downtime_steps(8 * GIB);
    assert_eq!(steps.len(), 11);
    assert_eq!(steps[0], (0, 50));
    assert_eq!(steps[1], (600, 95));
    assert_eq!(steps[2], (1200, 140));
    assert_eq!(steps[10], (6000, 500));
}

#[test]
fn nova_aborts_at_800_s_per_gib_with_2_gib_minimum() {
    let inp = input(MigrationContext::Evacuate, "standard", GIB);
    let mut p = policy_by_name("nova").unwrap();
    let plan = p.plan(&inp);
    assert_eq!(plan.parameters.downtime_limit_ms, 50);
    let acts = actions(
        p.as_mut(),
        &plan,
        &[tick(1_599_000, 100 * MIB), tick(1_600_500, 100 * MIB)],
    );
    assert!(acts.contains(&(1_600_500, Action::Abort)), "{acts:?}");
    assert!(
        !acts
            .iter()
            .any(|(t, a)| *t == 1_599_000 && *a == Action::Abort)
    );
}

#[test]
fn nova_2016_switches_on_small_progress_between_polls() {
    let inp = input(MigrationContext::Balance, "standard", GIB);
    let mut p = policy_by_name("nova-2016").unwrap();
    let plan = p.plan(&inp);
    assert!(plan.capabilities.postcopy_ram);
    let acts = actions(
        p.as_mut(),
        &plan,
        &[tick(10_000, 500 * MIB), tick(10_500, 480 * MIB)],
    );
    assert_eq!(
        acts.last(),
        Some(&(10_500, Action::SwitchToPostcopy)),
        "{acts:?}"
    );
}

#[test]
fn kubevirt_legacy_switches_at_150_s_per_gb() {
    let inp = input(MigrationContext::Evacuate, "standard", GIB);
    let mut p = policy_by_name("kubevirt").unwrap();
    let plan = p.plan(&inp);
    // 1 GiB = 1.07 GB → 2 GB → 300 s.
    let mut obs = vec![];
    for i in 0..=31 {
        obs.push(tick(i * 10_000, 400 * MIB - i * MIB));
    }
    let acts = actions(p.as_mut(), &plan, &obs);
    assert_eq!(acts, vec![(310_000, Action::SwitchToPostcopy)]);
}

#[test]
fn kubevirt_legacy_aborts_without_progress_for_150_s() {
    let inp = input(MigrationContext::Balance, "latency-critical", GIB);
    let mut p = policy_by_name("kubevirt").unwrap();
    let plan = p.plan(&inp);
    assert!(!plan.capabilities.postcopy_ram);
    let obs: Vec<_> = (0..20).map(|i| tick(i * 10_000, 300 * MIB)).collect();
    let acts = actions(p.as_mut(), &plan, &obs);
    assert_eq!(acts, vec![(160_000, Action::Abort)]);
}

#[test]
fn kubevirt_stall_waits_for_a_local_minimum_then_switches() {
    let inp = input(MigrationContext::Evacuate, "standard", GIB);
    let mut p = policy_by_name("kubevirt-stall").unwrap();
    let plan = p.plan(&inp);
    assert_eq!(plan.parameters.downtime_limit_ms, 300);
    let mut obs = vec![];
    let values = [200, 150, 160, 155, 170, 150, 180, 151];
    for (i, v) in values.iter().enumerate() {
        let t = i as u64 * 15_000 + 1000;
        obs.push(tick(t - 500, v * MIB));
        obs.push(pass(t, i as u64 + 2, v * MIB));
    }
    let acts = actions(p.as_mut(), &plan, &obs);
    assert_eq!(acts.len(), 1, "{acts:?}");
    assert_eq!(acts[0].1, Action::SwitchToPostcopy);
    // It switched at a value within 4 % of the best (150).
    let idx = (acts[0].0 - 1000) / 15_000;
    assert!(values[idx as usize] <= 156);
}

#[test]
fn ovirt_schedule_steps_then_postcopy_then_nothing() {
    let inp = input(MigrationContext::Maintenance, "standard", GIB);
    let mut p = policy_by_name("ovirt-postcopy").unwrap();
    let plan = p.plan(&inp);
    assert_eq!(plan.parameters.downtime_limit_ms, 100);
    assert!(plan.capabilities.auto_converge);
    let obs: Vec<_> = (0..8)
        .map(|i| Observation::Tick {
            at_ms: i * 10_000,
            latest: Some(sample(i * 10_000, i + 1, 300 * MIB, 12_500_000)),
        })
        .collect();
    let acts: Vec<Action> = actions(p.as_mut(), &plan, &obs)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        acts,
        vec![
            Action::SetDowntimeLimit { ms: 150 },
            Action::SetDowntimeLimit { ms: 200 },
            Action::SwitchToPostcopy
        ]
    );
}

/// Without post-copy oVirt runs the "Minimal downtime" schedule (up to 500 ms, then abort), the
/// policy an operator picks for such VMs. (Was 150 → 200 ms → abort, a schedule no shipped oVirt
/// policy has; see tests/baselines.rs for the vdsm lines.)
#[test]
fn ovirt_without_postcopy_ends_in_abort() {
    let inp = input(MigrationContext::Maintenance, "latency-critical", GIB);
    let mut p = policy_by_name("ovirt-postcopy").unwrap();
    let plan = p.plan(&inp);
    let obs: Vec<_> = (0..12)
        .map(|i| Observation::Tick {
            at_ms: i * 10_000,
            latest: Some(sample(i * 10_000, i + 1, 300 * MIB, 12_500_000)),
        })
        .collect();
    let acts: Vec<Action> = actions(p.as_mut(), &plan, &obs)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    assert_eq!(acts.last(), Some(&Action::Abort));
    assert!(acts.contains(&Action::SetDowntimeLimit { ms: 500 }));
    assert!(!acts.contains(&Action::SwitchToPostcopy));
}

#[test]
fn proxmox_doubles_after_more_than_five_rises_and_never_aborts() {
    let inp = input(MigrationContext::Balance, "standard", GIB);
    let mut p = policy_by_name("proxmox").unwrap();
    let plan = p.plan(&inp);
    assert!(plan.capabilities.auto_converge && plan.capabilities.xbzrle);
    assert!(!plan.capabilities.postcopy_ram);
    assert_eq!(plan.parameters.xbzrle_cache_bytes, Some(128 * MIB));
    // Proxmox counts only polls where `transferred` moved (QemuMigrate.pm L1515).
    let obs: Vec<_> = (0..40)
        .map(|i| {
            let mut s = sample(i * 1000, 2, 100 * MIB + i * MIB, 12_500_000);
            s.transferred_bytes = i * 12_500_000;
            Observation::Tick {
                at_ms: i * 1000,
                latest: Some(s),
            }
        })
        .collect();
    let acts: Vec<Action> = actions(p.as_mut(), &plan, &obs)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    assert_eq!(acts[0], Action::SetDowntimeLimit { ms: 200 });
    assert_eq!(acts[1], Action::SetDowntimeLimit { ms: 400 });
    assert!(!acts.contains(&Action::Abort));
}

#[test]
fn libvirt_switches_after_the_first_pass() {
    let inp = input(MigrationContext::Balance, "latency-critical", GIB);
    let mut p = policy_by_name("libvirt-postcopy-after-precopy").unwrap();
    let plan = p.plan(&inp);
    // libvirt knows no SLA: only host/VM/QEMU permissions gate it.
    assert!(plan.capabilities.postcopy_ram);
    let acts = actions(
        p.as_mut(),
        &plan,
        &[pass(80_000, 2, 100 * MIB), pass(90_000, 3, 90 * MIB)],
    );
    assert_eq!(acts, vec![(80_000, Action::SwitchToPostcopy)]);
}

#[test]
fn qemu_default_does_nothing() {
    let inp = input(MigrationContext::Balance, "standard", GIB);
    let mut p = policy_by_name("qemu-default").unwrap();
    let plan = p.plan(&inp);
    assert_eq!(plan.parameters.downtime_limit_ms, QEMU_DEFAULT_DOWNTIME_MS);
    assert_eq!(
        plan.parameters.max_bandwidth_bytes_per_s,
        QEMU_DEFAULT_MAX_BANDWIDTH
    );
    let obs: Vec<_> = (2..50).map(|i| pass(i * 1000, i, 100 * MIB)).collect();
    assert!(actions(p.as_mut(), &plan, &obs).is_empty());
}

/// A guest with a 64 MiB hot set on a 100 Mbit/s link: pre-copy settles at 64 MiB per pass,
/// which needs ≈5.4 s of downtime.
fn hot_set_passes(n: u64) -> Vec<Observation> {
    let mut obs = vec![pass(86_000, 2, 64 * MIB)];
    for i in 1..n {
        obs.push(pass(86_000 + i * 5_400, i + 2, 64 * MIB - (i % 3) * MIB));
    }
    obs
}

#[test]
fn tern_evacuate_switches_to_postcopy_on_a_hot_set() {
    let inp = input(MigrationContext::Evacuate, "standard", GIB);
    let mut p = policy_by_name("tern").unwrap();
    let plan = p.plan(&inp);
    assert!(plan.capabilities.postcopy_ram && plan.postcopy_recovery);
    let acts = actions(p.as_mut(), &plan, &hot_set_passes(8));
    assert_eq!(
        acts.iter()
            .filter(|(_, a)| *a == Action::SwitchToPostcopy)
            .count(),
        1,
        "{acts:?}"
    );
    let eta = p.eta().unwrap();
    assert_eq!(eta.mode, EtaMode::Postcopy);
}

#[test]
fn tern_evacuate_without_postcopy_stops_and_copies_when_the_deadline_presses() {
    let mut inp = input(MigrationContext::Evacuate, "standard", GIB);
    inp.destination.permit_post_copy = false;
    // Without throttling the only way out is a stop-and-copy.
    inp.source.permit_throttle = false;
    let mut p = policy_by_name("tern").unwrap();
    let plan = p.plan(&inp);
    assert!(!plan.capabilities.postcopy_ram);
    let deadline = plan.deadline_ms.expect("evacuate has a budget");
    let acts = actions(p.as_mut(), &plan, &hot_set_passes(40));
    // A stop beyond the SLA waits for the deadline (the workload may calm), not the first
    // local minimum: nothing but Continue until the last ~2 passes' worth before it.
    let first = acts.first().map(|(at, _)| *at).expect("an action");
    assert!(
        first + 20_000 >= deadline && first <= deadline,
        "stopped at {first} ms, deadline {deadline} ms"
    );
    assert!(
        acts.iter()
            .any(|(_, a)| matches!(a, Action::SetDowntimeLimit { ms } if *ms > 5000))
            || acts.iter().any(|(_, a)| *a == Action::PauseGuest),
        "{acts:?}"
    );
    assert!(
        !acts
            .iter()
            .any(|(_, a)| *a == Action::Abort || *a == Action::SwitchToPostcopy)
    );
}

#[test]
fn tern_balance_keeps_trying_until_its_budget_then_aborts_when_the_sla_cannot_be_met() {
    let mut inp = input(MigrationContext::Balance, "latency-critical", GIB);
    inp.source.permit_throttle = false;
    let mut p = policy_by_name("tern").unwrap();
    let plan = p.plan(&inp);
    assert!(!plan.capabilities.postcopy_ram);
    assert!(plan.parameters.downtime_limit_ms <= 50);
    let deadline = plan.deadline_ms.expect("balance has a budget");
    let acts = actions(p.as_mut(), &plan, &hot_set_passes(90));
    let abort_at = acts
        .iter()
        .find(|(_, a)| *a == Action::Abort)
        .map(|(at, _)| *at)
        .unwrap_or_else(|| panic!("no abort: {acts:?}"));
    assert!(
        abort_at >= deadline,
        "aborted at {abort_at} before the budget {deadline}"
    );
    for (_, a) in &acts {
        if let Action::SetDowntimeLimit { ms } = a {
            assert!(*ms <= 50, "balance raised downtime beyond the SLA: {ms}");
        }
    }
}

#[test]
fn tern_holds_a_switch_while_the_link_is_down() {
    let inp = input(MigrationContext::Evacuate, "standard", GIB);
    let mut p = policy_by_name("tern").unwrap();
    let plan = p.plan(&inp);
    let mut obs = hot_set_passes(1);
    let mut down = sample(86_000 + 5_400, 3, 63 * MIB, 0);
    down.throughput_bytes_per_s = 0;
    obs.push(Observation::PassCompleted(down));
    let decisions: Vec<Decision> = obs.iter().flat_map(|o| p.decide(&plan, o)).collect();
    let last = decisions.last().unwrap();
    assert_eq!(last.action, Action::Continue, "{decisions:?}");
    assert!(last.reason.contains("degraded"), "{}", last.reason);
}

#[test]
fn tern_converging_migration_only_continues() {
    let inp = input(MigrationContext::Balance, "standard", GIB);
    let mut p = policy_by_name("tern").unwrap();
    let plan = p.plan(&inp);
    let obs = [
        pass(86_000, 2, 64 * MIB),
        pass(91_000, 3, 6 * MIB),
        pass(91_500, 4, 600 * 1024),
    ];
    let ds: Vec<Decision> = obs.iter().flat_map(|o| p.decide(&plan, o)).collect();
    assert!(ds.iter().all(|d| d.action == Action::Continue), "{ds:?}");
    assert!(ds.last().unwrap().reason.contains("converges"));
    assert_eq!(p.eta().unwrap().mode, EtaMode::Precopy);
}

#[test]
fn guard_refuses_forbidden_postcopy_and_abort_after_switch() {
    struct Rogue;
    impl MigrationPolicy for Rogue {
        fn name(&self) -> &'static str {
            "rogue"
        }
        fn plan(&self, input: &PlanInput) -> MigrationPlan {
            let mut plan = MigrationPlan::qemu_defaults("rogue", input, post_copy_verdict(input));
            plan.capabilities.postcopy_ram = true;
            plan
        }
        fn decide(&mut self, _plan: &MigrationPlan, _obs: &Observation) -> Vec<Decision> {
            vec![
                Decision::new(Action::SwitchToPostcopy, "because 1"),
                Decision::new(Action::Abort, "because 2"),
                Decision::new(Action::SetDowntimeLimit { ms: 9_000_000 }, "because 3"),
            ]
        }
    }
    let inp = input(MigrationContext::Balance, "latency-critical", GIB);
    let mut g = PermissionGuard::new(Box::new(Rogue));
    let plan = g.plan(&inp);
    assert!(
        !plan.capabilities.postcopy_ram,
        "guard strips the capability"
    );
    let out = g.decide(&plan, &pass(1000, 2, MIB));
    assert_eq!(out[0].action, Action::Continue);
    assert!(out[0].reason.contains("refused SwitchToPostcopy"));
    assert_eq!(out[1].action, Action::Abort);
    assert_eq!(
        out[2].action,
        Action::SetDowntimeLimit {
            ms: QEMU_MAX_DOWNTIME_MS
        }
    );

    let inp = input(MigrationContext::Balance, "standard", GIB);
    let mut g = PermissionGuard::new(Box::new(Rogue));
    let plan = g.plan(&inp);
    let out = g.decide(&plan, &pass(1000, 2, MIB));
    assert_eq!(out[0].action, Action::SwitchToPostcopy);
    assert_eq!(
        out[1].action,
        Action::Continue,
        "abort refused after the switch"
    );
}

#[test]
fn preflight_reports_postcopy_and_precopy_times() {
    let mut inp = input(MigrationContext::Maintenance, "standard", GIB);
    inp.probe = Some(DirtyRateProbe {
        period_ms: 1000,
        dirty_bytes_per_s: 64 * MIB,
    });
    let e = preflight_estimate(&inp);
    assert_eq!(e.first_pass_ms, Some(85_900));
    assert!(
        !e.converges,
        "64 MiB/s dirtying on 12.5 MB/s cannot converge"
    );
    assert!(e.postcopy_total_ms.unwrap() > 85_900);
    let plan = policy_by_name("tern").unwrap().plan(&inp);
    assert_eq!(plan.estimate, e);
}

// ---------------------------------------------------------------- properties

fn arb_input() -> impl Strategy<Value = PlanInput> {
    (
        0usize..4,
        0usize..3,
        (27u32..33).prop_map(|e| 1u64 << e),
        any::<[bool; 12]>(),
        proptest::option::of(1_000_000u64..200_000_000),
        proptest::option::of(1u64..500),
    )
        .prop_map(|(ctx, sla, ram, b, link, probe_mib)| {
            let classes: Vec<SlaClass> = SlaCatalog::builtin().classes().cloned().collect();
            let mut i = PlanInput::new(
                MigrationContext::ALL[ctx],
                classes[sla].clone(),
                VmLimits::new(ram),
                QemuFeatures {
                    postcopy_ram: b[0],
                    postcopy_preempt: b[1],
                    postcopy_recovery: b[2],
                    auto_converge: b[3],
                    dirty_limit: b[4],
                    multifd: b[5],
                    multifd_with_postcopy: b[6],
                    xbzrle: b[7],
                    calc_dirty_rate: true,
                },
            );
            i.source.permit_post_copy = b[8];
            i.destination.permit_post_copy = b[9];
            i.vm.post_copy = if b[10] {
                PostCopyPermission::Allowed
            } else {
                PostCopyPermission::Forbidden
            };
            i.source.permit_throttle = b[11];
            i.link_bytes_per_s = link;
            i.probe = probe_mib.map(|m| DirtyRateProbe {
                period_ms: 1000,
                dirty_bytes_per_s: m * MIB,
            });
            i.deadline_ms = (ram > GIB).then_some(600_000);
            i
        })
}

fn arb_observations() -> impl Strategy<Value = Vec<Observation>> {
    proptest::collection::vec(
        (
            any::<bool>(),
            0u64..4000,
            0u64..(512 * MIB),
            0u64..200_000_000,
            0u8..3,
        ),
        1..60,
    )
    .prop_map(|steps| {
        let mut t = 0;
        let mut pass_no = 1;
        steps
            .into_iter()
            .map(|(is_pass, dt, rem, bw, throttle)| {
                t += dt;
                let mut s = sample(t, pass_no, rem, bw);
                s.dirty_pages_rate = rem / 4096 / 2;
                s.throttle_pct = (throttle > 0).then_some(throttle * 20);
                if is_pass {
                    pass_no += 1;
                    s.pass = pass_no;
                    Observation::PassCompleted(s)
                } else {
                    Observation::Tick {
                        at_ms: t,
                        latest: Some(s),
                    }
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// No policy — even without the guard — asks for post-copy the plan does not permit, enables
    /// `postcopy-ram` without permission, or answers a pass without a reason citing numbers.
    #[test]
    fn policies_respect_permissions_and_explain(inp in arb_input(), obs in arb_observations()) {
        let hard = post_copy_permission(&inp).allowed;
        for name in POLICY_NAMES {
            let mut p = unguarded_policy_by_name(name).unwrap();
            let plan = p.plan(&inp);
            prop_assert!(!plan.capabilities.postcopy_ram || hard, "{name} enabled postcopy-ram without permission");
            prop_assert!(!plan.capabilities.postcopy_ram || plan.post_copy.allowed, "{name}");
            prop_assert!(!(plan.capabilities.dirty_limit && plan.capabilities.auto_converge), "{name}");
            prop_assert!(plan.parameters.downtime_limit_ms >= 1 && plan.parameters.downtime_limit_ms <= QEMU_MAX_DOWNTIME_MS);
            for o in &obs {
                let ds = p.decide(&plan, o);
                if matches!(o, Observation::PassCompleted(_)) {
                    prop_assert!(!ds.is_empty(), "{name} gave no decision at a pass");
                }
                for d in ds {
                    prop_assert!(d.reason.chars().any(|c| c.is_ascii_digit()), "{name}: reason without numbers: {}", d.reason);
                    if d.action == Action::SwitchToPostcopy {
                        prop_assert!(plan.may_switch_to_postcopy(), "{name} switched without permission: {}", d.reason);
                    }
                    if let Action::SetDowntimeLimit { ms } = d.action {
                        prop_assert!((1..=QEMU_MAX_DOWNTIME_MS).contains(&ms), "{name}: {ms}");
                    }
                }
            }
        }
    }

    /// The same inputs give the same plan and decisions.
    #[test]
    fn policies_are_deterministic(inp in arb_input(), obs in arb_observations()) {
        for name in POLICY_NAMES {
            let run = || {
                let mut p = policy_by_name(name).unwrap();
                let plan = p.plan(&inp);
                let ds: Vec<Decision> = obs.iter().flat_map(|o| p.decide(&plan, o)).collect();
                (plan, ds, p.eta())
            };
            prop_assert_eq!(run(), run());
        }
    }

    /// tern in balance never sets a downtime limit above the SLA minus the switchover overhead,
    /// never pauses the guest, and never throttles beyond the SLA.
    #[test]
    fn tern_balance_stays_within_the_sla(mut inp in arb_input(), obs in arb_observations()) {
        inp.context = MigrationContext::Balance;
        let mut p = policy_by_name("tern").unwrap();
        let plan = p.plan(&inp);
        let ceiling = inp.max_downtime_ms() - inp.switchover_overhead_ms;
        prop_assert!(plan.parameters.downtime_limit_ms <= ceiling);
        prop_assert!(!plan.capabilities.auto_converge || plan.parameters.max_cpu_throttle_pct <= inp.sla.max_throttle_pct.max(1));
        for o in &obs {
            for d in p.decide(&plan, o) {
                match d.action {
                    Action::SetDowntimeLimit { ms } => prop_assert!(ms <= ceiling, "{ms} > {ceiling}: {}", d.reason),
                    Action::PauseGuest => prop_assert!(false, "balance paused: {}", d.reason),
                    Action::SetCpuThrottle { max_pct, .. } => prop_assert!(max_pct <= inp.sla.max_throttle_pct),
                    Action::SwitchToPostcopy => prop_assert!(inp.sla.post_copy_acceptable),
                    _ => {}
                }
            }
        }
    }

    /// tern never aborts a migration that must finish.
    #[test]
    fn tern_never_aborts_evacuations_or_maintenance(mut inp in arb_input(), obs in arb_observations(), ctx in 0usize..2) {
        inp.context = MigrationContext::ALL[ctx];
        let mut p = policy_by_name("tern").unwrap();
        let plan = p.plan(&inp);
        for o in &obs {
            for d in p.decide(&plan, o) {
                prop_assert!(d.action != Action::Abort, "{}", d.reason);
            }
        }
    }
}

#[test]
fn tern_without_recovery_support_arms_postcopy_only_for_a_short_tail() {
    let mut i = input(MigrationContext::Evacuate, "standard", 1 << 30);
    i.features.postcopy_recovery = false;
    let plan = policy_by_name("tern").expect("tern").plan(&i);
    // Armed (the capability is harmless until the switch) but with no recovery, and the plan
    // says the switch is bounded to a short tail over a healthy link.
    assert!(plan.may_switch_to_postcopy());
    assert!(!plan.postcopy_recovery);
    assert!(
        plan.post_copy.reason.contains("recovery") && plan.post_copy.reason.contains("tail"),
        "{}",
        plan.post_copy.reason
    );
    i.features.postcopy_recovery = true;
    let plan = policy_by_name("tern").expect("tern").plan(&i);
    assert!(plan.may_switch_to_postcopy() && plan.postcopy_recovery);
}
