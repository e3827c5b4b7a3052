//! Hand-built traces: each test feeds a baseline the observations a real migration would produce
//! and checks that it decides what its upstream code decides at the same point. Each test names
//! the upstream file and line it checks (commits as in `shared/reference/manager-policies.md`:
//! kubevirt@d923fdb, vdsm@fd4b0df, ovirt-engine@0111fc6, qemu-server@e6352be, nova@00a0304).

use tern_policy::baselines::{KubevirtLegacyPolicy, KubevirtStallPolicy, ProxmoxPolicy};
use tern_policy::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn input(context: MigrationContext, sla: &str, ram: u64, link: u64) -> PlanInput {
    let sla = SlaCatalog::builtin().get(sla).unwrap().clone();
    let mut i = PlanInput::new(
        context,
        sla,
        VmLimits::new(ram),
        QemuFeatures::qemu_10_tcg(),
    );
    i.link_bytes_per_s = Some(link);
    i
}

fn sample(at_ms: u64, pass: u64, remaining: u64, bw: u64, transferred: u64) -> IterationSample {
    IterationSample {
        at_ms,
        pass,
        transferred_bytes: transferred,
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

fn tick(s: IterationSample) -> Observation {
    Observation::Tick {
        at_ms: s.at_ms,
        latest: Some(s),
    }
}

/// Runs `obs` through `p` (unguarded: the policy's own decisions) and returns the non-`Continue`
/// actions with their times.
fn run(
    p: &mut dyn MigrationPolicy,
    plan: &MigrationPlan,
    obs: &[Observation],
) -> Vec<(u64, Action)> {
    let mut out = vec![];
    for o in obs {
        for d in p.decide(plan, o) {
            if d.action != Action::Continue {
                out.push((o.at_ms(), d.action));
            }
            if d.action.is_terminal_choice() {
                return out;
            }
        }
    }
    out
}

// ------------------------------------------------------------------ KubeVirt legacy

/// A 16 GiB guest whose pre-copy never converges: a 236 s first pass, then 16 s passes of a 2 GiB
/// dirty set. KubeVirt polls every 400 ms (`monitorSleepPeriodMS`, live-migration-source.go L60).
fn sawtooth_16g(until_ms: u64) -> Vec<Observation> {
    let first_ms = 236_000;
    let pass_ms = 16_000;
    (1..=until_ms / 400)
        .map(|k| {
            let t = k * 400;
            let (pass, remaining) = if t < first_ms {
                (1, 16 * GIB - 16 * GIB / first_ms * t)
            } else {
                let into = (t - first_ms) % pass_ms;
                (
                    2 + (t - first_ms) / pass_ms,
                    2 * GIB - 2 * GIB / pass_ms * into + MIB,
                )
            };
            tick(sample(t, pass, remaining, 72_800_000, t * 72_800))
        })
        .collect()
}

/// live-migration-source.go L859–L862 (progress = below the previous poll) and L775–L776 (post-copy
/// at `acceptableCompletionTime`): a 16 GiB guest (17.2 GB → 18 GB × 150 s = 2 700 s) whose
/// sawtooth never reaches a new all-time low after the first pass is not aborted by the 150 s
/// progress timeout (the pre-2022 rule aborted it at ≈386 s); it switches to post-copy at the
/// first poll past 2 700 s.
#[test]
fn kubevirt_legacy_progress_is_below_previous_poll_and_switches_at_2700_s() {
    let inp = input(MigrationContext::Evacuate, "standard", 16 * GIB, 72_800_000);
    let mut p = KubevirtLegacyPolicy::new();
    let plan = p.plan(&inp);
    assert!(plan.may_switch_to_postcopy());
    let acts = run(&mut p, &plan, &sawtooth_16g(2_800_000));
    assert_eq!(acts, vec![(2_701_200, Action::SwitchToPostcopy)]);
}

/// live-migration-source.go L812–L821 (`dom.Suspend()`, `acceptableCompletionTime *= 2`) then L837
/// (abort past the doubled time): the SLA accepts disruption but the destination host does not
/// permit post-copy, so KubeVirt pauses the guest at the timeout and aborts if even the paused
/// migration has not finished by twice the time.
#[test]
fn kubevirt_legacy_suspends_when_disruption_is_allowed_without_postcopy() {
    let mut inp = input(MigrationContext::Evacuate, "standard", GIB, 12_500_000);
    inp.destination.permit_post_copy = false;
    let mut p = KubevirtLegacyPolicy::new();
    let plan = p.plan(&inp);
    assert!(!plan.may_switch_to_postcopy());
    // 1 GiB → 2 GB → 300 s. Remaining falls between polls (a sawtooth), so no progress timeout.
    let obs: Vec<_> = (1..=1600u64)
        .map(|k| {
            let t = k * 400;
            tick(sample(
                t,
                2 + k / 25,
                300 * MIB - (k % 25) * MIB,
                12_500_000,
                t,
            ))
        })
        .collect();
    let acts = run(&mut p, &plan, &obs);
    assert_eq!(acts, vec![(301_200, Action::PauseGuest)]);
    let rest = run(&mut p, &plan, &obs[753..]);
    assert_eq!(rest, vec![(601_200, Action::Abort)]);
}

/// live-migration-source.go L786–L806: with a VFIO device KubeVirt raises the downtime limit to
/// `min(2·acceptable s, 2000 s)` instead of suspending.
#[test]
fn kubevirt_legacy_vfio_raises_the_downtime_limit() {
    let mut inp = input(MigrationContext::Evacuate, "standard", GIB, 12_500_000);
    inp.vm.post_copy = PostCopyPermission::Forbidden;
    let mut p = KubevirtLegacyPolicy::new();
    let plan = p.plan(&inp);
    let obs: Vec<_> = (1..=760u64)
        .map(|k| {
            tick(sample(
                k * 400,
                2,
                300 * MIB - (k % 25) * MIB,
                12_500_000,
                k,
            ))
        })
        .collect();
    let acts = run(&mut p, &plan, &obs);
    assert_eq!(
        acts,
        vec![(301_200, Action::SetDowntimeLimit { ms: 600_000 })]
    );
}

/// live-migration-source.go L837: without `allowWorkloadDisruption` the completion timeout
/// aborts; L826: a link that stops moving aborts after `progressTimeout` (150 s) first.
#[test]
fn kubevirt_legacy_aborts_at_timeout_without_disruption_and_on_a_stuck_link() {
    let inp = input(
        MigrationContext::Balance,
        "latency-critical",
        GIB,
        12_500_000,
    );
    let mut p = KubevirtLegacyPolicy::new();
    let plan = p.plan(&inp);
    let obs: Vec<_> = (1..=800u64)
        .map(|k| {
            tick(sample(
                k * 400,
                2,
                300 * MIB - (k % 25) * MIB,
                12_500_000,
                k,
            ))
        })
        .collect();
    assert_eq!(run(&mut p, &plan, &obs), vec![(301_200, Action::Abort)]);

    let mut p = KubevirtLegacyPolicy::new();
    // Falling for 40 s, then stuck at 100 MiB: last progress at 40 s, abort past 190 s.
    let obs: Vec<_> = (1..=600u64)
        .map(|k| {
            let rem = if k <= 100 {
                300 * MIB - 2 * k * MIB
            } else {
                100 * MIB
            };
            tick(sample(k * 400, 2, rem, 0, 0))
        })
        .collect();
    assert_eq!(run(&mut p, &plan, &obs), vec![(191_200, Action::Abort)]);
}

// ------------------------------------------------------------------ KubeVirt stall detector

/// stall-detector.go L80–L90: the bandwidth EWMA starts at the first sample, then α = 0.4.
#[test]
fn kubevirt_stall_ewma_starts_at_the_first_sample() {
    let inp = input(MigrationContext::Evacuate, "standard", GIB, 125_000_000);
    let mut p = KubevirtStallPolicy::new();
    let plan = p.plan(&inp);
    p.decide(&plan, &tick(sample(400, 1, GIB, 100_000_000, 1)));
    assert_eq!(p.ewma_bandwidth(), 100_000_000.0);
    p.decide(&plan, &tick(sample(800, 1, GIB, 50_000_000, 2)));
    assert!((p.ewma_bandwidth() - 80_000_000.0).abs() < 1.0);
}

/// Passes of a creeping dirty set (850 → 960 MiB, +10 MiB per 10 s pass) on a 4 GiB guest
/// (5 GB → 750 s budget), 400 ms polls at 1 Gbit/s between boundaries.
fn creeping(until_ms: u64) -> Vec<Observation> {
    let mut obs = vec![];
    let first_ms = 34_000;
    let mut t = 0;
    while t < until_ms {
        t += 400;
        let boundary = t >= first_ms && (t - first_ms) % 10_000 == 0;
        let k = t.saturating_sub(first_ms) / 10_000;
        let rem = (850 + 10 * k).min(960) * MIB;
        let s = sample(t, 2 + k, rem, 125_000_000, t);
        obs.push(if boundary {
            Observation::PassCompleted(s)
        } else {
            tick(s)
        });
    }
    obs
}

/// stall-detector.go L137–L148 (stall test), L243–L250 (latched) and L174–L190 (relaxation pops
/// the heap): on a dirty set creeping 850 → 960 MiB the target climbs with each relaxation (40 s,
/// 20 s, 10 s, … patience) until a pass is within 4 % of it, and KubeVirt switches to post-copy
/// there (L298), long before the 750 s completion timeout. A target that never climbs (the minimum
/// since the stall, recomputed: tern's copy before this fix) stays at 850 MiB, which the creeping
/// set never comes within 4 % of again, and only switches at the timeout.
#[test]
fn kubevirt_stall_target_climbs_on_a_creeping_dirty_set() {
    let inp = input(MigrationContext::Evacuate, "standard", 4 * GIB, 125_000_000);
    let mut p = KubevirtStallPolicy::new();
    let plan = p.plan(&inp);
    let obs = creeping(800_000);
    let acts = run(&mut p, &plan, &obs);
    assert_eq!(acts.len(), 1, "{acts:?}");
    let (at, action) = acts[0];
    assert_eq!(action, Action::SwitchToPostcopy);
    // Stalled at 74 s (the 34 s record left the 40 s window; 890 ≥ 850 × 0.96), best 850 MiB;
    // at 114 s the patience ran out and the heap gave 900 MiB: 930 ≤ 900 × 1.04.
    assert_eq!(at, 114_000, "switch time");
    let best = p.best_remaining().unwrap();
    assert_eq!(
        best,
        900 * MIB,
        "target climbed from 850 MiB to the heap's next value"
    );
}

/// stall-detector.go L243–L250: once detected, the stall is never cleared, even by a pass that
/// dips below the out-of-window minimum.
#[test]
fn kubevirt_stall_stays_latched_after_a_dip() {
    let inp = input(
        MigrationContext::Balance,
        "latency-critical",
        4 * GIB,
        125_000_000,
    );
    let mut p = KubevirtStallPolicy::new();
    let plan = p.plan(&inp);
    let mut obs = creeping(95_000);
    for o in &obs {
        p.decide(&plan, o);
    }
    let before = p.best_remaining();
    assert!(before.is_some(), "stalled by 95 s");
    // A dip well below everything seen, then the creep again.
    obs = vec![Observation::PassCompleted(sample(
        104_000,
        9,
        400 * MIB,
        125_000_000,
        1,
    ))];
    for o in &obs {
        p.decide(&plan, o);
    }
    assert!(p.best_remaining().is_some(), "stall latched");
}

/// A stalled 300 MiB set on a 4 GiB guest, for the stop-and-copy branches.
fn stalled_set(rem: u64, bw: u64) -> Vec<Observation> {
    let mut obs = vec![];
    for k in 1..=40u64 {
        let t = k * 5_000;
        obs.push(tick(sample(t - 400, 2 + k, rem, bw, t)));
        obs.push(Observation::PassCompleted(sample(t, 2 + k, rem, bw, t)));
    }
    obs
}

/// stall-detector.go L302 + live-migration-source.go L654–L675 (`triggerConvergenceAction`): with `allowWorkloadDisruption`
/// and no post-copy (the destination host forbids it), the local minimum triggers a hard
/// stop-and-copy: downtime 2 000 000 ms. When QEMU has not completed it by the switchover
/// deadline 60 s later (live-migration-source.go L580–L632, `switchoverInitiated`), KubeVirt aborts.
#[test]
fn kubevirt_stall_hard_stop_and_copy_without_postcopy() {
    let mut inp = input(MigrationContext::Evacuate, "standard", 4 * GIB, 125_000_000);
    inp.destination.permit_post_copy = false;
    let mut p = KubevirtStallPolicy::new();
    let plan = p.plan(&inp);
    let acts = run(&mut p, &plan, &stalled_set(300 * MIB, 125_000_000));
    // Stalled at 45 s (the 5 s record is 40 s old); deadline 45 + 60 s; first poll past it 109.6 s.
    assert_eq!(
        acts,
        vec![
            (45_000, Action::SetDowntimeLimit { ms: 2_000_000 }),
            (109_600, Action::Abort)
        ]
    );
}

/// stall-detector.go L306–L313: without `allowWorkloadDisruption` a local minimum whose
/// estimated downtime is within 1.5 × maxDowntimeMs gets a soft stop-and-copy (downtime =
/// maxDowntimeMs); beyond that the migration is aborted.
#[test]
fn kubevirt_stall_soft_stop_and_copy_or_abort_without_disruption() {
    let inp = input(
        MigrationContext::Balance,
        "latency-critical",
        4 * GIB,
        125_000_000,
    );
    // 16 MiB at 125 MB/s ≈ 134 ms ≤ 1.5 × 100 ms.
    let mut p = KubevirtStallPolicy::new();
    let plan = p.plan(&inp);
    assert_eq!(plan.parameters.downtime_limit_ms, 100);
    let acts = run(&mut p, &plan, &stalled_set(16 * MIB, 125_000_000));
    assert_eq!(
        acts,
        vec![
            (45_000, Action::SetDowntimeLimit { ms: 100 }),
            (109_600, Action::Abort)
        ]
    );
    // 300 MiB ≈ 2.5 s > 150 ms: abort.
    let mut p = KubevirtStallPolicy::new();
    let acts = run(&mut p, &plan, &stalled_set(300 * MIB, 125_000_000));
    assert_eq!(acts, vec![(45_000, Action::Abort)]);
}

/// stall-detector.go L291–L295 (`canFinishByDeadline`, L195): at a local minimum, a switch is held when
/// `remaining / ewmaBps` exceeds `2 × acceptable − elapsed`; after a link drop the EWMA (zero
/// readings included) collapses, so the estimate explodes and KubeVirt waits. The drop ends, the
/// EWMA recovers, and the next local minimum switches.
#[test]
fn kubevirt_stall_budget_guard_holds_during_a_link_drop() {
    let inp = input(MigrationContext::Evacuate, "standard", 4 * GIB, 125_000_000);
    let mut p = KubevirtStallPolicy::new();
    let plan = p.plan(&inp);
    let mut obs = vec![];
    for k in 1..=40u64 {
        let t = k * 5_000;
        // The link is down from 25 s to 70 s: throughput 0 on the polls in between.
        let bw = |at: u64| {
            if (25_000..70_000).contains(&at) {
                0
            } else {
                125_000_000
            }
        };
        for j in 1..=10u64 {
            let at = t - 5_000 + j * 400;
            obs.push(tick(sample(at, 2 + k, 300 * MIB, bw(at), t + j)));
        }
        obs.push(Observation::PassCompleted(sample(
            t,
            2 + k,
            300 * MIB,
            bw(t),
            t,
        )));
    }
    let acts = run(&mut p, &plan, &obs);
    // Stalled from 45 s (the 5 s record aged out), but 20 s of zero readings have collapsed the
    // EWMA (×0.6 per poll), so 300 MiB would take far more than the 1 500 s budget: held until
    // the link is back. (After only a few seconds of outage the estimate still fits the large
    // budget and KubeVirt switches into the drop: the guard is indirect.)
    assert_eq!(acts.len(), 1, "{acts:?}");
    assert_eq!(acts[0].1, Action::SwitchToPostcopy);
    // The first boundary after polls on the restored link (70.4–74 s) switches.
    assert_eq!(acts[0].0, 75_000, "{acts:?}");
}

/// live-migration-source.go L580–L612 (`processCompletionTimeouts`): a migration that never
/// stalls (its passes keep shrinking slowly) is switched to post-copy at the completion timeout
/// (150 s × 5 GB = 750 s for 4 GiB) when `allowPostCopy`, without VFIO, and completable.
#[test]
fn kubevirt_stall_switches_at_the_completion_timeout_without_a_stall() {
    let inp = input(MigrationContext::Evacuate, "standard", 4 * GIB, 125_000_000);
    let mut p = KubevirtStallPolicy::new();
    let plan = p.plan(&inp);
    let mut obs = vec![];
    let mut rem = 3 * GIB;
    for k in 1..=80u64 {
        let t = k * 10_000;
        obs.push(tick(sample(t - 400, 1 + k, rem, 125_000_000, t)));
        obs.push(Observation::PassCompleted(sample(
            t,
            1 + k,
            rem,
            125_000_000,
            t,
        )));
        rem = rem * 9 / 10;
    }
    let acts = run(&mut p, &plan, &obs);
    assert_eq!(acts, vec![(759_600, Action::SwitchToPostcopy)]);
}

// ------------------------------------------------------------------ oVirt

fn vdsm_polls(n: u64, iterations_per_poll: u64) -> Vec<Observation> {
    // The engine ticks every second; vdsm looks every 10 s.
    (1..=n * 10)
        .map(|k| {
            let t = k * 1000;
            let pass = 1 + t / 10_000 * iterations_per_poll;
            tick(sample(t, pass, 300 * MIB, 6_250_000, t))
        })
        .collect()
}

/// vdsm `lib/vdsm/common/config.py.in` L83 (10 s monitor interval), `migration.py` L939 (the
/// loop waits before its first poll) and L956–L960 (the first poll's iteration is the base);
/// ovirt-engine `MigrateVmCommand.java` L518 (bandwidth = cluster limit ÷ maxMigrations 2).
#[test]
fn ovirt_first_poll_at_10_s_and_half_the_link() {
    let inp = input(MigrationContext::Maintenance, "standard", GIB, 12_500_000);
    let mut p = policy_by_name("ovirt-postcopy").unwrap();
    let plan = p.plan(&inp);
    assert_eq!(plan.parameters.max_bandwidth_bytes_per_s, 6_250_000);
    assert_eq!(plan.parameters.downtime_limit_ms, 100);
    assert!(plan.capabilities.auto_converge && plan.capabilities.postcopy_ram);
    // Iterations grow every second from the start; nothing is looked at before 10 s.
    let obs: Vec<_> = (1..=9u64)
        .map(|k| tick(sample(k * 1000, k + 1, 300 * MIB, 6_250_000, k)))
        .collect();
    assert!(run(p.as_mut(), &plan, &obs).is_empty());
}

/// vdsm `migration.py` L1011–L1026 (`_next_action`: head runs when `limit < current`, one per
/// poll) on the engine's "Post-copy migration" policy (`0000_config.sql` L837–L838): 150 ms at
/// current 2, 200 ms at 3, post-copy at 4; nothing after (L964).
#[test]
fn ovirt_postcopy_policy_schedule() {
    let inp = input(MigrationContext::Maintenance, "standard", GIB, 12_500_000);
    let mut p = policy_by_name("ovirt-postcopy").unwrap();
    let plan = p.plan(&inp);
    let acts = run(p.as_mut(), &plan, &vdsm_polls(8, 1));
    assert_eq!(
        acts,
        vec![
            (30_000, Action::SetDowntimeLimit { ms: 150 }),
            (40_000, Action::SetDowntimeLimit { ms: 200 }),
            (50_000, Action::SwitchToPostcopy),
        ]
    );
}

/// vdsm `migration.py` L1011–L1026 on the "Minimal downtime" policy (`0000_config.sql`
/// L837–L838): 150, 200, 300, 400 ms at currents 2–5, nothing at 6 (limit 6 is not < 6), 500 ms
/// at 7, abort at 8. `ovirt-postcopy` runs the same schedule for a VM that may not use post-copy.
#[test]
fn ovirt_minimal_downtime_schedule_steps_to_500_ms_then_aborts() {
    let expected = vec![
        (30_000, Action::SetDowntimeLimit { ms: 150 }),
        (40_000, Action::SetDowntimeLimit { ms: 200 }),
        (50_000, Action::SetDowntimeLimit { ms: 300 }),
        (60_000, Action::SetDowntimeLimit { ms: 400 }),
        (80_000, Action::SetDowntimeLimit { ms: 500 }),
        (90_000, Action::Abort),
    ];
    for (name, sla) in [
        ("ovirt-minimal-downtime", "standard"),
        ("ovirt-postcopy", "latency-critical"),
    ] {
        let inp = input(MigrationContext::Maintenance, sla, GIB, 12_500_000);
        let mut p = policy_by_name(name).unwrap();
        let plan = p.plan(&inp);
        assert!(!plan.capabilities.postcopy_ram, "{name}");
        let acts = run(p.as_mut(), &plan, &vdsm_polls(12, 1));
        assert_eq!(acts, expected, "{name}");
    }
}

// ------------------------------------------------------------------ Proxmox

/// qemu-server `QemuMigrate.pm` L1447 (`avglstat` = transferred ÷ polls) and L1525 (poll every
/// 100 ms once remaining < avglstat, for good): a 1 GiB guest at 100 MB/s sends ≈100 MB per 1 s
/// poll; once its dirty set (60 MiB) is below that, Proxmox looks ten times as often, so with
/// a sync every 300 ms the "remaining rose" count (L1563) passes 5 after 6 rises, ≈2 s later,
/// instead of after 6 one-second polls.
#[test]
fn proxmox_polls_every_100_ms_near_the_end_and_doubles_sooner() {
    let inp = input(MigrationContext::Balance, "standard", GIB, 100_000_000);
    let mut p = ProxmoxPolicy::new();
    let plan = p.plan(&inp);
    let mut obs = vec![];
    // First pass: 11 s of 100 MB/s, remaining falling.
    for k in 1..=110u64 {
        let t = k * 100;
        obs.push(tick(sample(
            t,
            1,
            GIB - k * 9 * MIB,
            100_000_000,
            t * 100_000,
        )));
    }
    // Then a 60 MiB set re-sent every 300 ms: remaining rises at each sync.
    for k in 1..=200u64 {
        let t = 11_000 + k * 100;
        let rem = 60 * MIB - (k % 3) * 20 * MIB;
        obs.push(tick(sample(t, 2 + k / 3, rem, 100_000_000, t * 100_000)));
    }
    let mut fast_at = None;
    let mut doubled_at = None;
    for o in &obs {
        for d in p.decide(&plan, o) {
            if d.reason.contains("polling every 100 ms") && fast_at.is_none() {
                fast_at = Some(o.at_ms());
            }
            if d.action == (Action::SetDowntimeLimit { ms: 200 }) && doubled_at.is_none() {
                doubled_at = Some(o.at_ms());
            }
        }
    }
    assert_eq!(fast_at, Some(11_000));
    assert_eq!(p.poll_period_ms(), 100);
    let doubled = doubled_at.expect("doubled");
    assert!(doubled <= 14_000, "doubled at {doubled} ms");
}

/// qemu-server `QemuMigrate.pm` L1515–L1518: polls where nothing was transferred (a stalled link)
/// do not count towards the doubling; L1563–L1571: rises do, and the downtime doubles after more
/// than 5; no abort ever.
#[test]
fn proxmox_counts_only_polls_with_transfer() {
    let inp = input(MigrationContext::Balance, "standard", GIB, 12_500_000);
    let mut p = ProxmoxPolicy::new();
    let plan = p.plan(&inp);
    let stalled: Vec<_> = (1..=20u64)
        .map(|k| tick(sample(k * 1000, 2, 100 * MIB + k * MIB, 0, 5)))
        .collect();
    assert!(run(&mut p, &plan, &stalled).is_empty());
    let moving: Vec<_> = (21..=40u64)
        .map(|k| {
            tick(sample(
                k * 1000,
                2,
                100 * MIB + k * MIB,
                12_500_000,
                k * 12_500_000,
            ))
        })
        .collect();
    let acts = run(&mut p, &plan, &moving);
    assert_eq!(acts[0].1, Action::SetDowntimeLimit { ms: 200 });
    assert!(!acts.iter().any(|(_, a)| *a == Action::Abort));
}

// ------------------------------------------------------------------ Nova

/// nova `migration.py::should_trigger_timeout_action` (L663) and `run_tasks` (L792) with
/// `live_migration_timeout_action = force_complete`: at 800 s × max(GiB, 2) Nova switches to
/// post-copy when the post-copy flag is set, else pauses the guest; with the default `abort` it
/// aborts.
#[test]
fn nova_timeout_action_abort_and_force_complete() {
    let obs = [
        tick(sample(1_600_000, 40, 100 * MIB, 12_500_000, 1)),
        tick(sample(1_600_500, 40, 100 * MIB, 12_500_000, 2)),
    ];
    let inp = input(MigrationContext::Evacuate, "standard", GIB, 12_500_000);
    let mut p = policy_by_name("nova").unwrap();
    let plan = p.plan(&inp);
    let acts = run(p.as_mut(), &plan, &obs);
    assert_eq!(acts.last(), Some(&(1_600_500, Action::Abort)));

    let mut p = policy_by_name("nova-force-complete").unwrap();
    let plan = p.plan(&inp);
    assert!(plan.capabilities.postcopy_ram);
    let acts = run(p.as_mut(), &plan, &obs);
    assert_eq!(acts.last(), Some(&(1_600_500, Action::SwitchToPostcopy)));

    let mut inp = inp;
    inp.source.permit_post_copy = false;
    let mut p = policy_by_name("nova-force-complete").unwrap();
    let plan = p.plan(&inp);
    let acts = run(p.as_mut(), &plan, &obs);
    assert_eq!(acts.last(), Some(&(1_600_500, Action::PauseGuest)));
}
