//! Host evacuation on real lab hosts: three `tern agent` processes, one `tern server`
//! controller process, TCG guests in lab namespaces, real TCP, real SQLite.
//!
//! - `tern demo --evacuate -o json` empties h1: every guest completed, 0 corrupt pages,
//!   0 control mismatches, heartbeats continuous, within the deadline;
//! - the controller SIGKILLed mid-evacuation and restarted: the evacuation completes, every
//!   VM's migration was started exactly once (the source agent's own list), and the gap is
//!   visible in the event history (a completion learned after the restart);
//! - a destination agent SIGKILLed mid-evacuation: its host goes unreachable, the plan
//!   adapts, and once the agent is back nothing is lost.
//!
//! Guests are emulated on a 2-core machine, so these tests take the file lock the agent tests
//! use (`/run/tern/agent-tests.lock`) and never boot guests concurrently with them. Every
//! process is killed by PID and every lab taken down on every path (`LabCluster`'s `Drop`).
//! Lab names start with `evac-`.

mod common;

use common::GuestLock;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_agent::AgentClient;
use tern_scenario::LabEnvironment;
use tern_scenario::evacuation::{
    ClusterSpec, EvacuationGuest, EvacuationReport, EvacuationSession, EvacuationSpec,
};
use tern_server::evacuation::EvacuationView;
use tern_server::model::MigrationState;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn environment() -> LabEnvironment {
    LabEnvironment::prepare(|s| eprintln!("· {s}")).expect("QEMU and the guest image (as root)")
}

fn spec(lab: &str, link: &str, deadline_s: u64) -> EvacuationSpec {
    EvacuationSpec {
        cluster: ClusterSpec {
            lab_name: lab.into(),
            hosts: 3,
            link_rate: link.parse().expect("rate"),
            host_memory_mib: 2048,
            tern_binary: PathBuf::from(TERN),
        },
        guests: EvacuationGuest::ci_set(),
        deadline_s,
        settle: Duration::from_secs(2),
        timeout: Duration::from_secs(240),
    }
}

fn no_lab_left(lab: &str) {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&format!("tern-{lab}-")),
        "lab {lab} leaked namespaces: {text}"
    );
}

fn assert_all_moved_intact(r: &EvacuationReport) {
    assert_eq!(r.outcome, "completed", "{r:#?}");
    assert!(r.deadline_met, "{r:#?}");
    for v in &r.vms {
        assert!(v.is_intact(), "{} did not move intact: {v:#?}", v.name);
        assert_eq!(v.corrupt_pages, 0, "{}", v.name);
        assert_eq!(v.control_mismatches, 0, "{}", v.name);
        assert!(v.heartbeat_continuous, "{}", v.name);
    }
}

/// Polls the evacuation until `pred` holds for its view.
async fn wait_view(
    s: &EvacuationSession,
    id: &str,
    what: &str,
    pred: impl Fn(&EvacuationView) -> bool,
) -> EvacuationView {
    let started = Instant::now();
    loop {
        if let Ok(v) = s.poll(id).await {
            if pred(&v) {
                return v;
            }
            assert!(
                !v.evacuation.state.is_terminal(),
                "evacuation ended before {what}: {v:#?}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn demo_evacuate_empties_h1_with_every_guest_intact() {
    let _lock = GuestLock::take();
    let lab = "evac-t1";
    let started = Instant::now();
    let out = Command::new(TERN)
        .args([
            "demo",
            "--evacuate",
            "--vms",
            "3",
            "--lab-name",
            lab,
            "--link-rate",
            "400mbit",
            "--deadline",
            "120",
            "-o",
            "json",
        ])
        .output()
        .expect("run tern demo --evacuate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "exit {:?}", out.status.code());
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON document on stdout");
    eprintln!(
        "took {:.0} s; {}",
        started.elapsed().as_secs_f64(),
        serde_json::to_string_pretty(&v).unwrap_or_default()
    );
    assert_eq!(v["outcome"], "completed");
    assert_eq!(v["deadline_met"], true);
    assert_eq!(v["deadline_s"], 120);
    let predicted = v["predicted_makespan_s"].as_f64().expect("predicted");
    let actual = v["actual_makespan_s"].as_f64().expect("actual");
    assert!(predicted > 0.0 && actual > 0.0 && actual <= 120.0);
    let vms = v["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 3);
    for vm in vms {
        assert_eq!(vm["from"], "h1", "{vm}");
        assert!(matches!(vm["to"].as_str(), Some("h2" | "h3")), "{vm}");
        assert_eq!(vm["outcome"], "completed", "{vm}");
        assert_eq!(vm["corrupt_pages"], 0, "{vm}");
        assert_eq!(vm["control_mismatches"], 0, "{vm}");
        assert_eq!(vm["heartbeat_continuous"], true, "{vm}");
        assert!(vm["switched_to_postcopy"].is_boolean(), "{vm}");
    }
    let by_name = |n: &str| vms.iter().find(|v| v["name"] == n).expect(n);
    // The guest whose owner forbids post-copy never switches.
    assert_eq!(by_name("vfio")["switched_to_postcopy"], false);
    no_lab_left(lab);
}

#[test]
fn controller_killed_mid_evacuation_and_restarted_completes_without_double_starts() {
    let _lock = GuestLock::take();
    let lab = "evac-t2";
    let env = environment();
    runtime().block_on(async {
        let mut s = EvacuationSession::start(&env, spec(lab, "400mbit", 180), None)
            .await
            .expect("cluster with guests on h1");
        let (id, plan) = s.begin().await.expect("evacuation starts");
        let running = wait_view(&s, &id, "a migration running", |v| {
            v.migrations
                .iter()
                .any(|m| m.state == MigrationState::Running)
        })
        .await;
        let victim = running
            .migrations
            .iter()
            .find(|m| m.state == MigrationState::Running)
            .cloned()
            .expect("running migration");
        let agent_id = victim.agent_migration_id.clone().expect("agent id");
        s.cluster_mut().kill_controller();
        let killed_ms = tern_server::model::now_ms();
        eprintln!("controller killed while {} ran", victim.vm);
        // While the controller is down, the agent finishes the migration on its own.
        let h1 = AgentClient::new(s.cluster().agent_url("h1").expect("h1"));
        let t = Instant::now();
        loop {
            let rec = h1.show_migration(&agent_id, u64::MAX).await.expect("agent");
            if rec.record.finished_ms.is_some() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "agent never finished");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Taken before the start: the restarted runner may reconcile before the call returns.
        let restarted_ms = tern_server::model::now_ms();
        s.cluster_mut().start_controller().expect("controller restarts");
        let view = s.wait_end(&id).await.expect("evacuation ends");
        tokio::time::sleep(s.spec().settle).await;
        let report = s.judge(&view, &plan).await.expect("verdicts");
        eprintln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        assert_all_moved_intact(&report);

        // No migration started twice: one attempt per VM, one agent migration per VM.
        let agent_migrations = h1.list_migrations().await.expect("h1 migrations");
        for g in &s.spec().guests {
            let n = agent_migrations.iter().filter(|m| m.vm == g.name).count();
            assert_eq!(n, 1, "{} was started {n} times on h1", g.name);
        }
        for m in &view.migrations {
            assert_eq!(m.attempts, 1, "{m:#?}");
        }
        // The gap is in the history: the victim's completion was recorded after the restart.
        let history = s.api().migration(&victim.id).await.expect("history");
        let completed_at = history
            .events
            .iter()
            .filter(|e| e.detail.contains("completed"))
            .map(|e| e.wall_ms)
            .max()
            .expect("a completion event");
        assert!(
            completed_at >= restarted_ms && restarted_ms > killed_ms,
            "completion recorded at {completed_at}, controller down {killed_ms}..{restarted_ms}: {:#?}",
            history.events
        );
        s.finish().await;
    });
    no_lab_left(lab);
}

#[test]
fn destination_agent_killed_mid_evacuation_the_plan_adapts_and_nothing_is_lost() {
    let _lock = GuestLock::take();
    let lab = "evac-t3";
    let env = environment();
    runtime().block_on(async {
        let mut s = EvacuationSession::start(&env, spec(lab, "300mbit", 180), None)
            .await
            .expect("cluster with guests on h1");
        let (id, plan) = s.begin().await.expect("evacuation starts");
        let v = wait_view(&s, &id, "a migration running", |v| {
            v.migrations
                .iter()
                .any(|m| m.state == MigrationState::Running)
        })
        .await;
        // The victim: a destination of VMs not started yet, not the destination of the one
        // in flight (killing that agent would also stop the recorder of the arriving guest's
        // serial console, which lives in the agent, so its log would have a hole).
        let busy: Vec<&str> = v
            .migrations
            .iter()
            .filter(|m| m.state != MigrationState::Planned)
            .map(|m| m.destination.as_str())
            .collect();
        let pending: Vec<&tern_server::model::MigrationRecord> = v
            .migrations
            .iter()
            .filter(|m| {
                m.state == MigrationState::Planned && !busy.contains(&m.destination.as_str())
            })
            .collect();
        let victim = pending
            .first()
            .map(|m| m.destination.clone())
            .unwrap_or_else(|| {
                panic!("no VM waits for a host other than the busy ones: {plan:#?}")
            });
        let moved_away: Vec<String> = pending
            .iter()
            .filter(|m| m.destination == victim)
            .map(|m| m.vm.clone())
            .collect();
        s.cluster_mut().kill_agent(&victim).expect("kill agent");
        eprintln!("killed the agent of {victim}, planned destination of {moved_away:?}");
        let view = s.wait_end(&id).await.expect("evacuation ends");
        tokio::time::sleep(s.spec().settle).await;
        let report = s.judge(&view, &plan).await.expect("verdicts");
        eprintln!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        assert_all_moved_intact(&report);
        for vm in &moved_away {
            let verdict = report.vms.iter().find(|v| &v.name == vm).expect("verdict");
            assert_ne!(
                verdict.to.as_deref(),
                Some(victim.as_str()),
                "{vm} went to the dead host"
            );
        }
        assert!(
            report.replans >= 1,
            "the controller did not re-plan after {victim} went away: {report:#?}"
        );
        s.finish().await;
    });
    no_lab_left(lab);
}
