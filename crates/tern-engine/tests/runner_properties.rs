//! Properties of `MigrationRunner` over random fault schedules on the fake QEMU pair, in
//! paused time: after the switch nothing cancels, the end state says only what is known,
//! and `lost` needs a dead QEMU.

mod fake;

use std::time::Duration;

use fake::{FakePair, Fault, When};
use proptest::prelude::*;
use tern_engine::{MigrationRunner, MigrationSetup, MigrationState};
use tern_policy::{
    Action, Decision, MigrationContext, MigrationPlan, MigrationPolicy, Observation, PlanInput,
    QemuFeatures, SlaCatalog, VmLimits,
};
use tokio::sync::mpsc;

const MIB: u64 = 1 << 20;
const LINK: u64 = 12_500_000;

struct SwitchAtPass(Box<dyn MigrationPolicy>, u64);

impl MigrationPolicy for SwitchAtPass {
    fn name(&self) -> &'static str {
        "switch-at-pass"
    }
    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        self.0.plan(input)
    }
    fn decide(&mut self, _plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        match obs {
            Observation::PassCompleted(s) if s.pass >= self.1 => {
                vec![Decision::new(Action::SwitchToPostcopy, "scripted switch")]
            }
            _ => Vec::new(),
        }
    }
}

fn fault() -> impl Strategy<Value = (When, Fault)> {
    (
        prop_oneof![
            (0u64..30_000).prop_map(When::AfterStart),
            (0u64..60_000).prop_map(When::AfterSwitch),
        ],
        prop_oneof![
            4 => any::<bool>().prop_map(|noticed| Fault::CutLink { noticed }),
            4 => Just(Fault::RestoreLink),
            2 => Just(Fault::DestinationAgentDown),
            2 => Just(Fault::DestinationAgentUp),
            1 => Just(Fault::KillDestinationQemu),
            1 => Just(Fault::KillSourceQemu),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn after_the_switch_nothing_cancels_and_lost_needs_a_dead_qemu(
        switch_pass in 1u64..4,
        dirty_pct in 10u64..200,
        faults in proptest::collection::vec(fault(), 0..6),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let pair = FakePair::new(128 * MIB, LINK, LINK * dirty_pct / 100);
        for (when, f) in &faults {
            pair.at(*when, *f);
        }
        // Everything heals eventually (a silently dead link in pre-copy too: the fake has no TCP
        // timeout), except dead QEMUs.
        pair.at(When::AfterSwitch(70_000), Fault::RestoreLink)
            .at(When::AfterSwitch(70_000), Fault::DestinationAgentUp)
            .at(When::AfterStart(40_000), Fault::DestinationAgentUp)
            .at(When::AfterStart(40_000), Fault::RestoreLink);
        let killed = faults.iter().any(|(_, f)| {
            matches!(f, Fault::KillDestinationQemu | Fault::KillSourceQemu)
        });
        let sla = SlaCatalog::builtin().get("standard").expect("class").clone();
        let mut input = PlanInput::new(
            MigrationContext::Evacuate,
            sla,
            VmLimits::new(128 * MIB),
            QemuFeatures::qemu_10_tcg(),
        );
        input.link_bytes_per_s = Some(LINK);
        let mut setup = MigrationSetup::new("p", "tcp:198.18.0.2:1", input);
        setup.recovery_window = Duration::from_secs(120);
        let policy = Box::new(SwitchAtPass(
            tern_policy::policy_by_name("tern").expect("tern"),
            switch_pass,
        ));
        let (_tx, rx) = mpsc::channel(1);
        let runner = MigrationRunner::new(pair.source(), pair.destination(), policy, setup);
        let report = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(7200), runner.run(rx)).await
            })
            .expect("the runner ended");
        let calls = pair.calls();
        if let Some(i) = pair.switch_call() {
            prop_assert!(!calls[i..].iter().any(|c| c == "src:migrate_cancel"));
            prop_assert!(!calls[i..].iter().any(|c| c == "src:cont"), "source resumed after the switch");
        }
        if report.switched_to_postcopy {
            prop_assert!(matches!(
                report.state,
                MigrationState::Completed
                    | MigrationState::Lost
                    | MigrationState::Stranded
                    | MigrationState::Unknown
            ), "{:?}", report.state);
        }
        if report.state == MigrationState::Lost {
            prop_assert!(killed, "lost without a dead QEMU: {:#?}", report.events);
        }
        // A pre-copy that completed handed the guest over too (the source is `postmigrate`):
        // a destination QEMU that dies after that takes the guest with it.
        let handed_over = pair.model().source_postmigrate;
        if !report.switched_to_postcopy && !handed_over && report.state != MigrationState::Completed {
            // Before the switch the guest stays on the source: never lost or stranded.
            prop_assert!(matches!(
                report.state,
                MigrationState::Failed | MigrationState::Aborted | MigrationState::Unknown
            ), "{:?} {:#?}", report.state, report.events);
        }
        if let Some(i) = pair.switch_call() {
            // The switch was preceded by the destination answering.
            prop_assert_eq!(calls[i - 1].as_str(), "dst:query-migrate");
        }
        prop_assert!(report.state.is_terminal() || report.state == MigrationState::Unknown);
    }
}
