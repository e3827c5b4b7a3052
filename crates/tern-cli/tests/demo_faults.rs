//! Agent kills combined with other faults, through `tern demo` as an operator runs it: real
//! `tern agent` processes (one per lab host), real guests under TCG/KVM in lab namespaces.
//!
//! - the source agent killed in post-copy, and the link cut after it is back: the restarted
//!   agent adopts the migration, sees the stall, pauses and recovers it, and it completes;
//! - the destination agent killed (its QEMU untouched) during pre-copy and, in another run,
//!   during post-copy: no switch to post-copy while it is away, `unknown` (never `lost`)
//!   while where the guest runs cannot be asked, `completed` once it is back, and exactly one
//!   running copy of the guest with its integrity verified.
//!
//! Guests are emulated on a 2-core machine, so these tests hold the same file lock as
//! `tests/agents.rs` (`/run/tern/agent-tests.lock`) and never run concurrently with them.
//! The demo removes its agents and lab itself; a guard removes them if it crashed.

mod common;

use common::GuestLock;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use serde_json::Value;
use tern_lab::Lab;
use tern_lab::agents::LabAgents;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// Kills a demo's agents by PID and takes its lab down if the demo process could not.
struct DemoLabCleanup(&'static str);

impl DemoLabCleanup {
    fn new(lab: &'static str) -> Self {
        let c = Self(lab);
        c.clean();
        c
    }

    fn clean(&self) {
        if let Ok(agents) = LabAgents::load(self.0) {
            for a in agents.agents.values() {
                if tern_qemu::process::pid_alive(a.pid) {
                    let _ = tern_lab::kill_process(a.pid, tern_lab::Signal::SIGKILL);
                }
            }
            LabAgents::remove(self.0);
        }
        let _ = Lab::down(self.0);
    }
}

impl Drop for DemoLabCleanup {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Runs `tern demo` on lab `lab` with a small guest and `faults`; returns its JSON summary
/// (whatever the exit code: the caller judges it).
fn demo(lab: &str, faults: &str, extra: &[&str]) -> (Output, Value) {
    let mut args = vec![
        "demo",
        "--fault",
        faults,
        "--lab-name",
        lab,
        "--memory",
        "192",
        "--working-set",
        "64",
        "--settle",
        "2",
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(TERN)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run tern demo");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tern demo printed no JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

/// The guest ran through intact and only on `h2`, and the demo left nothing behind.
fn assert_one_intact_copy_on_h2(lab: &str, v: &Value) {
    let events = v["events"].to_string();
    assert_eq!(v["outcome"], "completed", "{events}");
    assert_eq!(v["guest_location"], "h2", "{v}");
    assert_eq!(v["source_running"], false, "{v}");
    assert!(
        v["source_final_run_state"].is_null(),
        "stale source QEMU: {v}"
    );
    assert_eq!(v["running_copies"], 1, "{v}");
    assert_eq!(v["corrupt_pages"], 0, "{v}");
    assert_eq!(v["control_mismatches"], 0, "{v}");
    assert_eq!(v["heartbeat_continuous"], true, "{v}");
    assert!(v["verify_passes_after"].as_u64().unwrap_or(0) >= 1, "{v}");
    assert!(
        !events.contains("\"lost\""),
        "the migration was called lost: {events}"
    );
    assert!(LabAgents::load(lab).is_err(), "the demo left its agents");
    assert!(
        !Lab::list()
            .unwrap_or_default()
            .iter()
            .any(|l| l.name() == lab),
        "the demo left its lab"
    );
}

fn fault<'a>(v: &'a Value, name_prefix: &str) -> &'a Value {
    v["faults_injected"]
        .as_array()
        .and_then(|fs| {
            fs.iter().find(|f| {
                f["fault"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
            })
        })
        .unwrap_or_else(|| panic!("no {name_prefix} fault recorded: {v}"))
}

/// `tern demo --fault kill-source-agent-postcopy --fault link-cut-postcopy:…`: the agent
/// dies in post-copy, the link is cut once it is back; the restarted agent's runner detects
/// the stall, pauses both sides and recovers, and the migration completes.
#[test]
fn source_agent_killed_in_postcopy_then_link_cut_is_recovered_and_completes() {
    let _lock = GuestLock::take();
    const LAB: &str = "struct-akcut";
    let _cleanup = DemoLabCleanup::new(LAB);
    let t0 = Instant::now();
    let (out, v) = demo(
        LAB,
        "kill-source-agent-postcopy@0.5,link-cut-postcopy:4@1.5",
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_intact_copy_on_h2(LAB, &v);
    let events = v["events"].to_string();
    assert!(events.contains("agent restarted"), "{events}");
    assert!(v["recoveries"].as_u64().unwrap_or(0) >= 1, "{events}");
    let kill = fault(&v, "kill-source-agent-postcopy");
    let cut = fault(&v, "link-cut-postcopy");
    for f in [kill, cut] {
        assert!(f["error"].is_null(), "{f}");
    }
    let back = kill["restored_at_ms"].as_u64().expect("agent restarted");
    let cut_at = cut["fired_at_ms"].as_u64().expect("link cut fired");
    assert!(
        cut_at >= back,
        "the cut came before the agent was back: {kill} {cut}"
    );
    assert!(
        cut["detected_after_ms"].is_u64(),
        "cut never detected: {cut}"
    );
    assert!(
        cut["resumed_after_restore_ms"].is_u64(),
        "never resumed: {cut}"
    );
    eprintln!(
        "agent kill + link cut: {:.1} s total, migration {} s, recovery {} s, blackout {} ms",
        t0.elapsed().as_secs_f64(),
        v["total_time_s"],
        v["recovery_s"],
        v["blackout_ms"]
    );
}

/// The states the migration was seen in while the destination agent was away.
fn states_while_away(f: &Value) -> Vec<String> {
    f["states_while_away"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The destination agent is SIGKILLed 3 s into pre-copy and kept away 8 s — over the point
/// where this guest (it out-dirties the link) is switched to post-copy: tern does not switch
/// while the agent is away (recovery would be impossible), switches once it is back, and the
/// guest ends on exactly one host, intact.
#[test]
fn destination_agent_killed_in_precopy_blocks_the_switch_and_never_splits_the_guest() {
    let _lock = GuestLock::take();
    const LAB: &str = "struct-dapre";
    let _cleanup = DemoLabCleanup::new(LAB);
    let t0 = Instant::now();
    let (out, v) = demo(LAB, "kill-dest-agent-precopy:8@3", &[]);
    let kill = fault(&v, "kill-dest-agent-precopy");
    assert!(kill["error"].is_null(), "{kill}");
    let away = states_while_away(kill);
    assert!(!away.is_empty(), "{kill}");
    for s in &away {
        assert!(
            !["postcopy", "postcopy-paused", "recovering", "lost"].contains(&s.as_str()),
            "switched to post-copy (or lost) while the destination agent was away: {away:?}"
        );
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_intact_copy_on_h2(LAB, &v);
    let refused = v["events"].as_array().map_or(0, |es| {
        es.iter()
            .filter(|e| e.to_string().contains("no switch to post-copy"))
            .count()
    });
    eprintln!(
        "destination agent killed in pre-copy: {:.1} s total, states while away {away:?}, \
         switches refused while away {refused}, migration {} s",
        t0.elapsed().as_secs_f64(),
        v["total_time_s"]
    );
}

/// The destination agent is SIGKILLed half a second into post-copy and kept away 5 s: the
/// source sees QEMU complete but cannot ask where the guest runs, so the migration is
/// `unknown` (not `lost`); once the agent is back it ends `completed`, the destination
/// promotes the guest and the stale source QEMU is removed.
#[test]
fn destination_agent_killed_in_postcopy_is_unknown_then_completed_never_lost() {
    let _lock = GuestLock::take();
    const LAB: &str = "struct-dapost";
    let _cleanup = DemoLabCleanup::new(LAB);
    let t0 = Instant::now();
    let (out, v) = demo(LAB, "kill-dest-agent-postcopy:5@0.5", &[]);
    let kill = fault(&v, "kill-dest-agent-postcopy");
    assert!(kill["error"].is_null(), "{kill}");
    let away = states_while_away(kill);
    assert!(
        away.iter().any(|s| s == "unknown"),
        "the migration was not unknown while the destination agent was away: {away:?}"
    );
    assert!(!away.iter().any(|s| s == "lost"), "{away:?}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_intact_copy_on_h2(LAB, &v);
    eprintln!(
        "destination agent killed in post-copy: {:.1} s total, states while away {away:?}, \
         migration {} s, console lines unrecorded {}",
        t0.elapsed().as_secs_f64(),
        v["total_time_s"],
        v["heartbeat_unrecorded"]
    );
}
