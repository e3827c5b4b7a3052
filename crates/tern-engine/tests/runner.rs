//! `MigrationRunner` against a scripted fake QEMU pair (tests/fake): every phase, operator
//! commands and faults, in tokio's paused time — a minute of migration runs in milliseconds,
//! no root, no QEMU.

mod fake;

use std::time::Duration;

use fake::{FakePair, Fault, When};
use tern_engine::{
    AdoptedMigration, MigrationReport, MigrationRunner, MigrationSetup, MigrationState,
    OperatorCommand, OperatorRequest,
};
use tern_policy::{
    Action, Decision, MigrationContext, MigrationPlan, MigrationPolicy, Observation, PlanInput,
    PostCopyPermission, QemuFeatures, SlaCatalog, VmLimits,
};
use tern_qmp::MigrationStatus;
use tokio::sync::{mpsc, oneshot};

const MIB: u64 = 1 << 20;
/// 100 Mbit/s.
const LINK: u64 = 12_500_000;

fn input(post_copy: PostCopyPermission) -> PlanInput {
    let sla = SlaCatalog::builtin()
        .get("standard")
        .expect("built-in class")
        .clone();
    let mut vm = VmLimits::new(256 * MIB);
    vm.post_copy = post_copy;
    let mut i = PlanInput::new(
        MigrationContext::Evacuate,
        sla,
        vm,
        QemuFeatures::qemu_10_tcg(),
    );
    i.link_bytes_per_s = Some(LINK);
    i
}

fn setup(post_copy: PostCopyPermission) -> MigrationSetup {
    MigrationSetup::new("m1", "tcp:198.18.0.2:49152", input(post_copy))
}

/// The `tern` policy's plan, with decisions scripted: switch to post-copy at a given pass.
struct SwitchAtPass {
    inner: Box<dyn MigrationPolicy>,
    pass: u64,
}

impl MigrationPolicy for SwitchAtPass {
    fn name(&self) -> &'static str {
        "switch-at-pass"
    }
    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        self.inner.plan(input)
    }
    fn decide(&mut self, _plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        match obs {
            Observation::PassCompleted(s) if s.pass >= self.pass => {
                vec![Decision::new(Action::SwitchToPostcopy, "scripted switch")]
            }
            _ => Vec::new(),
        }
    }
}

fn tern() -> Box<dyn MigrationPolicy + Send> {
    tern_policy::policy_by_name("tern").expect("tern policy")
}

fn switch_at(pass: u64) -> Box<dyn MigrationPolicy + Send> {
    Box::new(SwitchAtPass {
        inner: tern(),
        pass,
    })
}

/// A policy that never acts (operator commands drive the test).
struct Passive(Box<dyn MigrationPolicy>);

impl MigrationPolicy for Passive {
    fn name(&self) -> &'static str {
        "passive"
    }
    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        self.0.plan(input)
    }
    fn decide(&mut self, _plan: &MigrationPlan, _obs: &Observation) -> Vec<Decision> {
        Vec::new()
    }
}

fn passive() -> Box<dyn MigrationPolicy + Send> {
    Box::new(Passive(tern()))
}

async fn run(
    pair: &FakePair,
    policy: Box<dyn MigrationPolicy + Send>,
    setup: MigrationSetup,
) -> MigrationReport {
    let (_tx, rx) = mpsc::channel(1);
    within_an_hour(MigrationRunner::new(pair.source(), pair.destination(), policy, setup).run(rx))
        .await
}

/// A runner that never ends fails the test instead of hanging it (an hour of virtual time
/// passes in milliseconds).
async fn within_an_hour<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), f)
        .await
        .expect("the runner did not reach an end within an hour of migration time")
}

/// Runs the migration and sends `command` once the runner reaches `when`.
async fn run_with_command(
    pair: &FakePair,
    policy: Box<dyn MigrationPolicy + Send>,
    setup: MigrationSetup,
    when: MigrationState,
    command: OperatorCommand,
) -> (MigrationReport, Result<String, String>) {
    let (tx, rx) = mpsc::channel(1);
    let runner = MigrationRunner::new(pair.source(), pair.destination(), policy, setup);
    let mut progress = runner.progress();
    let operator = async move {
        let _ = progress.wait_for(|p| p.state == Some(when)).await;
        let (reply, answer) = oneshot::channel();
        let _ = tx.send(OperatorRequest { command, reply }).await;
        let answer = answer
            .await
            .unwrap_or_else(|_| Err("no answer".to_string()));
        // Keep the channel open until the runner ends.
        (answer, tx)
    };
    let (report, (answer, _tx)) =
        within_an_hour(async { tokio::join!(runner.run(rx), operator) }).await;
    (report, answer)
}

fn states(r: &MigrationReport) -> Vec<MigrationState> {
    r.events
        .iter()
        .filter_map(|e| match e.kind {
            tern_engine::MigrationEventKind::State { to, .. } => Some(to),
            _ => None,
        })
        .collect()
}

/// No abort/cancel after the switch, ever.
fn assert_no_cancel_after_switch(pair: &FakePair) {
    if let Some(i) = pair.switch_call() {
        assert!(
            !pair.calls()[i..].iter().any(|c| c == "src:migrate_cancel"),
            "migrate_cancel after the switch: {:?}",
            pair.calls()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_converging_guest_completes_in_precopy() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * MIB);
    let r = run(&pair, tern(), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert!(!r.switched_to_postcopy);
    assert!(r.passes >= 2);
    assert_eq!(
        states(&r),
        vec![
            MigrationState::Preparing,
            MigrationState::Precopy,
            MigrationState::Completed
        ]
    );
    assert!(!pair.calls().iter().any(|c| c == "src:migrate_cancel"));
}

#[tokio::test(start_paused = true)]
async fn a_guest_dirtying_faster_than_the_link_is_switched_by_tern_and_completes() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    let r = run(&pair, tern(), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert!(r.switched_to_postcopy);
    assert!(r.actions.iter().any(|a| a.action == "switch-to-postcopy"));
    assert_no_cancel_after_switch(&pair);
}

#[tokio::test(start_paused = true)]
async fn a_scripted_switch_goes_through_postcopy_to_completed() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed);
    assert_eq!(
        states(&r),
        vec![
            MigrationState::Preparing,
            MigrationState::Precopy,
            MigrationState::Postcopy,
            MigrationState::Completed
        ]
    );
    assert_eq!(r.recoveries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_switch_the_plan_forbids_is_refused_by_the_runner() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 4);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Forbidden)).await;
    assert!(!r.switched_to_postcopy);
    assert!(pair.switch_call().is_none());
    assert!(r.events.iter().any(|e| matches!(&e.kind,
            tern_engine::MigrationEventKind::Note { text } if text.contains("refused a switch"))));
}

#[tokio::test(start_paused = true)]
async fn operator_abort_in_precopy_cancels_and_keeps_the_guest_on_the_source() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    let (r, answer) = run_with_command(
        &pair,
        passive(),
        setup(PostCopyPermission::Allowed),
        MigrationState::Precopy,
        OperatorCommand::Abort,
    )
    .await;
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(r.state, MigrationState::Aborted);
    assert!(pair.calls().iter().any(|c| c == "src:migrate_cancel"));
    assert!(pair.model().source_running);
}

#[tokio::test(start_paused = true)]
async fn operator_abort_after_the_switch_is_refused_and_the_migration_completes() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    let (r, answer) = run_with_command(
        &pair,
        switch_at(2),
        setup(PostCopyPermission::Allowed),
        MigrationState::Postcopy,
        OperatorCommand::Abort,
    )
    .await;
    let why = answer.expect_err("abort after the switch must be refused");
    assert!(why.contains("cannot abort"), "{why}");
    assert_eq!(r.state, MigrationState::Completed);
    assert_no_cancel_after_switch(&pair);
}

#[tokio::test(start_paused = true)]
async fn force_complete_switches_to_postcopy_when_permitted() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    let (r, answer) = run_with_command(
        &pair,
        passive(),
        setup(PostCopyPermission::Allowed),
        MigrationState::Precopy,
        OperatorCommand::ForceComplete,
    )
    .await;
    assert_eq!(answer.as_deref(), Ok("switching to post-copy"));
    assert_eq!(r.state, MigrationState::Completed);
    assert!(r.switched_to_postcopy && !r.paused_guest);
}

#[tokio::test(start_paused = true)]
async fn force_complete_without_postcopy_pauses_the_guest_and_resumes_it_on_the_destination() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    let (r, answer) = run_with_command(
        &pair,
        passive(),
        setup(PostCopyPermission::Forbidden),
        MigrationState::Precopy,
        OperatorCommand::ForceComplete,
    )
    .await;
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert!(r.paused_guest && !r.switched_to_postcopy);
    assert!(pair.calls().iter().any(|c| c == "dst:cont"));
    assert_eq!(pair.model().dest_run, tern_qmp::RunState::Running);
}

#[tokio::test(start_paused = true)]
async fn a_noticed_link_cut_in_postcopy_is_recovered_and_completes() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.at(When::AfterSwitch(1_000), Fault::CutLink { noticed: true })
        .at(When::AfterSwitch(6_000), Fault::RestoreLink);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert_eq!(r.recoveries, 1);
    let s = states(&r);
    assert!(s.contains(&MigrationState::PostcopyPaused) && s.contains(&MigrationState::Recovering));
    // Attempts failed while the link was down, then one succeeded.
    let resumes = pair
        .calls()
        .iter()
        .filter(|c| *c == "src:migrate-resume")
        .count();
    assert!(resumes >= 2, "{resumes} attempts");
    assert_no_cancel_after_switch(&pair);
}

#[tokio::test(start_paused = true)]
async fn a_silent_blackhole_in_postcopy_is_paused_after_the_stall_timeout_then_recovered() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.at(When::AfterSwitch(1_000), Fault::CutLink { noticed: false })
        .at(When::AfterSwitch(8_000), Fault::RestoreLink);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert_eq!(r.recoveries, 1);
    let pause = r
        .events
        .iter()
        .find(|e| matches!(&e.kind,
            tern_engine::MigrationEventKind::Decision { action, .. } if action == "postcopy-pause-both"))
        .expect("a forced pause");
    let tern_engine::MigrationEventKind::Decision { reason, .. } = &pause.kind else {
        unreachable!()
    };
    assert!(reason.contains("no bytes sent"), "{reason}");
    assert!(pair.calls().iter().any(|c| c == "dst:migrate-pause"));
    assert_no_cancel_after_switch(&pair);
}

/// QEMU's destination pause lands asynchronously, and a second `migrate-pause` while the
/// first is landing crashes QEMU 10.0's destination (the fake does the same): the runner
/// waits for the first to land instead of pausing again, and the migration recovers.
#[tokio::test(start_paused = true)]
async fn a_destination_pause_that_lands_late_is_not_sent_twice() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.model().dest_pause_lag_calls = 3;
    pair.at(When::AfterSwitch(1_000), Fault::CutLink { noticed: false })
        .at(When::AfterSwitch(8_000), Fault::RestoreLink);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert!(
        pair.model().dest_qemu_alive,
        "the destination QEMU was crashed"
    );
    assert_eq!(r.recoveries, 1);
    let pauses = pair
        .calls()
        .iter()
        .filter(|c| *c == "dst:migrate-pause")
        .count();
    assert_eq!(pauses, 1, "{:?}", pair.calls());
    assert_no_cancel_after_switch(&pair);
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_recovery_window_strands_with_both_qemus_kept() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.at(When::AfterSwitch(1_000), Fault::CutLink { noticed: true });
    let mut s = setup(PostCopyPermission::Allowed);
    s.recovery_window = Duration::from_secs(20);
    let started = tokio::time::Instant::now();
    let r = run(&pair, switch_at(2), s).await;
    assert_eq!(r.state, MigrationState::Stranded, "{:#?}", r.events);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("recovery window 20 s")
    );
    assert!(
        pair.model().dest_qemu_alive && pair.model().source_alive,
        "nothing was killed"
    );
    assert_no_cancel_after_switch(&pair);
}

#[tokio::test(start_paused = true)]
async fn a_destination_qemu_that_dies_in_postcopy_is_lost() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.at(When::AfterSwitch(500), Fault::CutLink { noticed: true })
        .at(When::AfterSwitch(500), Fault::KillDestinationQemu);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Lost, "{:#?}", r.events);
    assert_no_cancel_after_switch(&pair);
}

#[tokio::test(start_paused = true)]
async fn a_source_qemu_that_dies_in_postcopy_is_lost_and_before_the_switch_failed() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.at(When::AfterSwitch(500), Fault::KillSourceQemu);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Lost);

    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    pair.at(When::AfterStart(3_000), Fault::KillSourceQemu);
    let r = run(&pair, passive(), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Failed);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_destination_agent_at_completion_is_unknown_not_lost_until_it_answers() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * MIB);
    pair.at(When::AtCompletion, Fault::DestinationAgentDown)
        .at(When::AfterStart(120_000), Fault::DestinationAgentUp);
    let r = run(&pair, tern(), setup(PostCopyPermission::Allowed)).await;
    let s = states(&r);
    assert!(s.contains(&MigrationState::Unknown), "{s:?}");
    assert!(!s.contains(&MigrationState::Lost));
    assert_eq!(r.state, MigrationState::Completed);
    assert_eq!(r.error, None);
}

#[tokio::test(start_paused = true)]
async fn a_destination_agent_away_for_longer_than_the_window_leaves_the_migration_unknown() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * MIB);
    pair.at(When::AtCompletion, Fault::DestinationAgentDown);
    let mut s = setup(PostCopyPermission::Allowed);
    s.recovery_window = Duration::from_secs(30);
    let r = run(&pair, tern(), s).await;
    assert_eq!(r.state, MigrationState::Unknown);
    assert!(pair.model().dest_qemu_alive);
}

#[tokio::test(start_paused = true)]
async fn no_switch_to_postcopy_while_the_destination_agent_does_not_answer() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    pair.at(When::AfterStart(1_000), Fault::DestinationAgentDown)
        .at(When::AfterStart(60_000), Fault::DestinationAgentUp);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    let calls = pair.calls();
    let switch = pair
        .switch_call()
        .expect("switched once the agent was back");
    // The gate asked the destination right before the switch, and it answered.
    assert_eq!(calls[switch - 1], "dst:query-migrate");
    assert!(
        r.events.iter().any(|e| matches!(&e.kind,
            tern_engine::MigrationEventKind::Note { text } if text.contains("no switch to post-copy"))),
        "the refusal is recorded"
    );
    let refused_at = r
        .events
        .iter()
        .find(|e| matches!(&e.kind,
            tern_engine::MigrationEventKind::Note { text } if text.contains("no switch to post-copy")))
        .map(|e| e.at_ms)
        .unwrap_or(0);
    assert!(refused_at < 60_000);
    assert_eq!(r.state, MigrationState::Completed);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_destination_agent_during_recovery_is_retried_not_lost() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.at(When::AfterSwitch(1_000), Fault::CutLink { noticed: true })
        .at(When::AfterSwitch(1_000), Fault::DestinationAgentDown)
        .at(When::AfterSwitch(10_000), Fault::RestoreLink)
        .at(When::AfterSwitch(15_000), Fault::DestinationAgentUp);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert!(!states(&r).contains(&MigrationState::Lost));
    assert_eq!(r.recoveries, 1);
}

async fn adopt(pair: &FakePair, adopted: AdoptedMigration) -> MigrationReport {
    let (_tx, rx) = mpsc::channel(1);
    let runner = MigrationRunner::new(
        pair.source(),
        pair.destination(),
        passive(),
        setup(PostCopyPermission::Allowed),
    )
    .adopt(adopted, rx);
    within_an_hour(runner).await
}

#[tokio::test(start_paused = true)]
async fn adopting_a_precopy_cancels_it_and_keeps_the_guest_on_the_source() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * LINK);
    pair.put_in(MigrationStatus::Active);
    pair.model().source_running = false; // paused by force-complete before the restart
    let r = adopt(
        &pair,
        AdoptedMigration {
            state: MigrationState::Precopy,
            elapsed_ms: 5_000,
            recoveries: 0,
        },
    )
    .await;
    assert_eq!(r.state, MigrationState::Failed, "{:#?}", r.events);
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("agent restarted during pre-copy")
    );
    assert!(pair.calls().iter().any(|c| c == "src:migrate_cancel"));
    assert!(pair.model().source_running, "the paused guest was resumed");
    assert!(r.events.iter().all(|e| e.at_ms >= 5_000));
}

#[tokio::test(start_paused = true)]
async fn adopting_a_paused_postcopy_recovers_it_and_completes() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.put_in(MigrationStatus::PostcopyPaused);
    let r = adopt(
        &pair,
        AdoptedMigration {
            state: MigrationState::Postcopy,
            elapsed_ms: 9_000,
            recoveries: 1,
        },
    )
    .await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert_eq!(r.recoveries, 2);
    assert!(r.switched_to_postcopy);
    assert!(!pair.calls().iter().any(|c| c == "src:migrate_cancel"));
}

#[tokio::test(start_paused = true)]
async fn adopting_a_postcopy_then_cutting_the_link_recovers() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    pair.put_in(MigrationStatus::PostcopyActive);
    pair.at(When::AfterSwitch(2_000), Fault::CutLink { noticed: false })
        .at(When::AfterSwitch(10_000), Fault::RestoreLink);
    let r = adopt(
        &pair,
        AdoptedMigration {
            state: MigrationState::Postcopy,
            elapsed_ms: 0,
            recoveries: 0,
        },
    )
    .await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert_eq!(r.recoveries, 1);
}

#[tokio::test(start_paused = true)]
async fn adopting_a_completed_migration_completes_it() {
    let pair = FakePair::new(256 * MIB, LINK, 0);
    pair.put_in(MigrationStatus::Completed);
    let r = adopt(
        &pair,
        AdoptedMigration {
            state: MigrationState::Postcopy,
            elapsed_ms: 0,
            recoveries: 0,
        },
    )
    .await;
    assert_eq!(r.state, MigrationState::Completed);
}

#[tokio::test(start_paused = true)]
async fn adopting_a_failed_precopy_keeps_the_guest_on_the_source() {
    let pair = FakePair::new(256 * MIB, LINK, 0);
    pair.put_in(MigrationStatus::Failed);
    let r = adopt(
        &pair,
        AdoptedMigration {
            state: MigrationState::Precopy,
            elapsed_ms: 0,
            recoveries: 0,
        },
    )
    .await;
    assert_eq!(r.state, MigrationState::Failed);
}

/// The dry-run goes through the same path from QEMUs to a plan input as the real run, so the
/// plan it shows is the plan the runner executes.
#[tokio::test(start_paused = true)]
async fn the_dry_run_plan_equals_the_plan_that_runs() {
    use tern_engine::{DestinationEndpoint, QemuPlanInput, plan_input_from_qemus};
    for post_copy in [PostCopyPermission::Allowed, PostCopyPermission::Forbidden] {
        let pair = FakePair::new(256 * MIB, LINK, 2 * MIB);
        let destination = DestinationEndpoint::facts(pair.destination().as_ref())
            .await
            .expect("facts");
        let QemuPlanInput {
            input, refusals, ..
        } = plan_input_from_qemus(&pair.source(), destination, input(post_copy))
            .await
            .expect("plan input");
        let mut dry_plan = tern().plan(&input);
        dry_plan.reasons.extend(refusals);
        let r = run(&pair, tern(), setup(post_copy)).await;
        assert_eq!(r.plan.as_ref(), Some(&dry_plan));
    }
}

/// A paused guest is refused post-copy by the gates, with the reason in the plan.
#[tokio::test(start_paused = true)]
async fn a_paused_guest_is_planned_without_postcopy_and_says_why() {
    let pair = FakePair::new(256 * MIB, LINK, 2 * MIB);
    pair.model().source_running = false;
    let r = run(&pair, switch_at(1), setup(PostCopyPermission::Allowed)).await;
    let plan = r.plan.expect("a plan");
    assert!(!plan.may_switch_to_postcopy());
    assert!(
        plan.reasons
            .iter()
            .any(|r| r.contains("the guest is paused"))
    );
    assert!(pair.switch_call().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_recovery_attempt_hanging_in_a_dead_network_is_paused_and_retried() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    // Packets vanish: the attempt hangs in postcopy-recover-setup (SYN retries).
    pair.at(When::AfterSwitch(1_000), Fault::CutLink { noticed: false })
        .at(When::AfterSwitch(40_000), Fault::RestoreLink);
    let r = run(&pair, switch_at(2), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    let stuck: Vec<u64> = r
        .events
        .iter()
        .filter(|e| {
            matches!(&e.kind,
            tern_engine::MigrationEventKind::Decision { action, .. }
                if action == "postcopy-pause-stuck-attempt")
        })
        .map(|e| e.at_ms)
        .collect();
    assert!(stuck.len() >= 2, "{stuck:?}");
    assert!(stuck.windows(2).all(|w| w[1] - w[0] >= 10_000), "{stuck:?}");
    assert_eq!(r.recoveries, 1);
    assert_no_cancel_after_switch(&pair);
}

#[tokio::test(start_paused = true)]
async fn set_bandwidth_is_applied_in_postcopy_and_refused_after_the_end() {
    let pair = FakePair::new(256 * MIB, LINK, LINK / 2);
    let (r, answer) = run_with_command(
        &pair,
        switch_at(2),
        setup(PostCopyPermission::Allowed),
        MigrationState::Postcopy,
        OperatorCommand::SetBandwidth {
            bytes_per_s: 50_000_000,
        },
    )
    .await;
    assert_eq!(answer.as_deref(), Ok("bandwidth set to 50000000 B/s"));
    assert_eq!(r.state, MigrationState::Completed);
    let switch = pair.switch_call().expect("switched");
    assert!(
        pair.calls()[switch..]
            .iter()
            .any(|c| c == "src:migrate-set-parameters")
    );
}

/// Found by `runner_properties`: the link breaks within one poll of the switch, so no poll
/// ever sees `postcopy-active`; the runner must still know it switched and recover.
#[tokio::test(start_paused = true)]
async fn a_cut_right_at_the_switch_is_recognised_as_postcopy_and_recovered() {
    let pair = FakePair::new(128 * MIB, LINK, LINK / 10);
    pair.at(When::AfterSwitch(0), Fault::CutLink { noticed: true })
        .at(When::AfterSwitch(5_000), Fault::RestoreLink);
    let r = run(&pair, switch_at(1), setup(PostCopyPermission::Allowed)).await;
    assert_eq!(r.state, MigrationState::Completed, "{:#?}", r.events);
    assert!(r.switched_to_postcopy);
    assert_eq!(r.recoveries, 1);
    assert_no_cancel_after_switch(&pair);
}
