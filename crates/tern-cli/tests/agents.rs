//! The agents as an operator uses them: real `tern agent` processes (one per lab host), real
//! TCG/KVM guests in lab namespaces, real SQLite, driven through the `tern` CLI.
//!
//! - bad input is refused with a clear message and exit code 2, and changes nothing;
//! - an agent killed (SIGKILL) during pre-copy and restarted leaves the guest on exactly one
//!   host;
//! - a migration through the agents completes and its events can be read back.
//!
//! Guests are emulated on a 2-core machine, so tests that boot guests hold a file lock
//! (`/run/tern/agent-tests.lock`) and never run concurrently, even across test binaries.
//! Every agent is killed by PID and every lab taken down on every path (guards with `Drop`).

mod common;

use common::GuestLock;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_lab::agents::{LabAgents, lab_agents_dir};
use tern_lab::{Lab, LabGuard, LabSpec, LinkRate};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// A lab with one agent per host. Dropping it kills the agents by PID (read from the
/// discovery file, so restarted agents are covered), removes their files, and takes the lab
/// down (which kills the QEMUs inside its namespaces).
struct AgentLab {
    name: String,
    port_base: u16,
    lab: Option<LabGuard>,
}

impl AgentLab {
    fn up(name: &str, link: &str, memory_mib: u64) -> Self {
        // A leftover from a crashed run must not be reused.
        let _ = Lab::down(name);
        kill_agents(name);
        let guard = Lab::up_guarded(&LabSpec {
            name: name.into(),
            hosts: 2,
            link_rate: Some(link.parse::<LinkRate>().expect("rate")),
            link_delay: None,
        })
        .expect("lab up (run as root)");
        // Distinct ports per test and per run of the test binary.
        let salt: u32 = name.bytes().map(u32::from).sum::<u32>() % 5;
        // Below Linux's ephemeral range (32768+): a restarted agent must be able to bind its port
        // again, and no outgoing connection can take a port below that range.
        let port_base = (20000 + (std::process::id() % 600) * 20 + salt * 3) as u16;
        let me = Self {
            name: name.into(),
            port_base,
            lab: Some(guard),
        };
        me.start_agents(memory_mib);
        me
    }

    fn start_agents(&self, memory_mib: u64) {
        let out = tern(&[
            "-v",
            "lab",
            "agents",
            "--name",
            &self.name,
            "--agent-port-base",
            &self.port_base.to_string(),
            "--agent-memory-mib",
            &memory_mib.to_string(),
        ]);
        assert!(out.status.success(), "lab agents: {}", text(&out));
    }

    fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("lab")
    }

    fn agents(&self) -> LabAgents {
        LabAgents::load(&self.name).expect("discovery file")
    }

    fn agent_pid(&self, host: &str) -> u32 {
        self.agents().agents[host].pid
    }

    fn config_path(&self, host: &str) -> PathBuf {
        self.agents().agents[host].config.clone()
    }

    /// Runs `tern ARGS --lab NAME`.
    fn tern(&self, args: &[&str]) -> Output {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--lab", &self.name]);
        tern(&a)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.tern(&a);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&out)))
    }

    /// `(host, role, run_state, pid)` of every VM.
    fn vms(&self) -> Vec<(String, String, String, u64)> {
        self.json(&["vm", "list"])
            .as_array()
            .expect("array")
            .iter()
            .map(|v| {
                (
                    v["host"].as_str().unwrap_or_default().to_string(),
                    v["role"].as_str().unwrap_or_default().to_string(),
                    v["run_state"].as_str().unwrap_or_default().to_string(),
                    v["pid"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// QEMU processes inside a lab host's namespace (QEMU names itself `tern-<vm>`).
    fn qemus_on(&self, host: &str) -> Vec<u32> {
        self.lab()
            .host(host)
            .expect("host")
            .processes()
            .expect("processes")
            .into_iter()
            .filter(|p| p.comm.starts_with("tern-") || p.comm.starts_with("qemu"))
            .map(|p| p.pid)
            .collect()
    }
}

impl Drop for AgentLab {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(a) = LabAgents::load(&self.name)
        {
            for (host, ag) in &a.agents {
                let log = std::fs::read_to_string(&ag.log).unwrap_or_default();
                eprintln!("---- agent {host} log ----\n{log}");
            }
        }
        kill_agents(&self.name);
        drop(self.lab.take());
    }
}

fn kill_agents(lab: &str) {
    if let Ok(a) = LabAgents::load(lab) {
        for ag in a.agents.values() {
            if tern_qemu::process::pid_alive(ag.pid) {
                let _ = tern_lab::kill_process(ag.pid, tern_lab::Signal::SIGKILL);
                let t = Instant::now();
                while tern_qemu::process::pid_alive(ag.pid) && t.elapsed() < Duration::from_secs(3)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    LabAgents::remove(lab);
    let _ = std::fs::remove_dir_all(lab_agents_dir(lab));
}

/// Stops an agent with SIGTERM (as an init system would) and waits until it is gone.
fn stop_agent(pid: u32) {
    tern_lab::kill_process(pid, tern_lab::Signal::SIGTERM).expect("SIGTERM the agent");
    let t = Instant::now();
    while tern_qemu::process::pid_alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "agent {pid} still runs 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tern(args: &[&str]) -> Output {
    Command::new(TERN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tern")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn expect_code(o: &Output, code: i32, needle: &str) {
    let all = text(o);
    assert_eq!(o.status.code(), Some(code), "{all}");
    assert!(
        all.contains(needle),
        "expected {needle:?} in the output:\n{all}"
    );
}

/// Boots `name` on `host` and waits for its first verify pass.
fn boot(lab: &AgentLab, name: &str, host: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["vm", "create", name, "--host", host];
    args.extend(extra);
    let v = lab.json(&args);
    let log = PathBuf::from(v["serial_log"].as_str().expect("serial log"));
    tern_rt()
        .block_on(tern_scenario::wait_guest_ready(
            &log,
            1,
            Duration::from_secs(90),
        ))
        .expect("guest ready");
    log
}

fn tern_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `migration show ID` until `done(view)` holds or `timeout` passes.
fn wait_migration(
    lab: &AgentLab,
    id: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let out = lab.tern(&["migration", "show", id, "-o", "json"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).expect("json");
            if done(&v) {
                return v;
            }
        }
        assert!(
            t.elapsed() < timeout,
            "migration {id}: timeout; last: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn heartbeats(log: &PathBuf) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" L HB "))
        .count()
}

#[test]
fn invalid_agent_config_names_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("agent.toml");
    std::fs::write(
        &bad,
        "host = \"h1\"\nlisten = 127.0.0.1:7701\nmigration_address = \"198.18.0.1\"\n",
    )
    .expect("write");
    let out = tern(&["agent", "--config", bad.to_str().expect("utf8")]);
    expect_code(&out, 2, "line 2, column");
    std::fs::write(
        &bad,
        "host = \"h1\"\nlisten = \"127.0.0.1:7701\"\nmigration_address = \"198.18.0.1\"\n\
         memory_mib = 512\n\n[migration]\npermit_postcopy = true\n",
    )
    .expect("write");
    let out = tern(&["agent", "--config", bad.to_str().expect("utf8")]);
    expect_code(&out, 2, "line 7");
    expect_code(&out, 2, "permit_postcopy");
    let out = tern(&["agent", "--config", "/nonexistent/agent.toml"]);
    expect_code(&out, 2, "/nonexistent/agent.toml");
    // The agent never started: nothing listens, nothing was created.
    assert!(!dir.path().join("agent.db").exists());
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let _lock = GuestLock::take();
    let t0 = Instant::now();
    let lab = AgentLab::up("agbad", "20mbit", 1024);
    // Unknown host for a new VM (before any QEMU is started).
    expect_code(
        &lab.tern(&["vm", "create", "vm1", "--host", "h9"]),
        2,
        "unknown host \"h9\"",
    );
    boot(
        &lab,
        "vm1",
        "h1",
        &["--working-set", "16", "--dirty-rate", "2000"],
    );
    let before = lab.vms();
    assert_eq!(before.len(), 1, "{before:?}");

    // The fault tool refuses what it cannot do, and kills nothing.
    let fault = |args: &[&str]| {
        let mut a = vec!["lab", "fault"];
        a.extend_from_slice(args);
        a.extend(["--name", "agbad"]);
        tern(&a)
    };
    expect_code(
        &fault(&["h1", "--kill", "nonsense"]),
        2,
        "`agent` or `qemu:VM`",
    );
    expect_code(&fault(&["h9", "--kill", "agent"]), 2, "h9");
    expect_code(&fault(&["h1", "--kill", "qemu:ghost"]), 2, "ghost");
    expect_code(
        &fault(&["h1", "--kill", "agent", "--when", "postcopy"]),
        2,
        "--migration",
    );
    expect_code(
        &fault(&["h1", "--when", "postcopy", "--migration", "nope"]),
        2,
        "nope",
    );
    assert_eq!(lab.vms(), before, "a refused fault changed something");

    expect_code(
        &lab.tern(&["migrate", "ghost", "--to", "h2"]),
        2,
        "unknown VM \"ghost\"",
    );
    expect_code(
        &lab.tern(&["migrate", "vm1", "--to", "h9"]),
        2,
        "unknown host \"h9\"",
    );
    expect_code(
        &lab.tern(&["migrate", "vm1", "--to", "h1"]),
        2,
        "already runs on host h1",
    );
    expect_code(
        &lab.tern(&["migrate", "vm1", "--to", "h2", "--policy", "nope"]),
        2,
        "unknown policy \"nope\"",
    );
    expect_code(
        &lab.tern(&["migration", "show", "no-such-id"]),
        2,
        "no migration",
    );

    // A destination without enough memory: restart h2's agent offering 128 MiB.
    stop_agent(lab.agent_pid("h2"));
    let cfg = lab.config_path("h2");
    let orig = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, orig.replace("memory_mib = 1024", "memory_mib = 128")).expect("write");
    lab.start_agents(1024);
    expect_code(
        &lab.tern(&["migrate", "vm1", "--to", "h2"]),
        2,
        "has 128 MiB free",
    );

    // Nothing changed: the same VM on the same host, no migration, no QEMU on h2.
    assert_eq!(lab.vms(), before);
    assert_eq!(lab.json(&["migration", "list"]), Value::Array(vec![]));
    assert!(lab.qemus_on("h2").is_empty(), "a QEMU was started on h2");

    // Give h2 its memory back; start a migration that takes a while (20 Mbit/s link).
    stop_agent(lab.agent_pid("h2"));
    std::fs::write(&cfg, orig).expect("write");
    lab.start_agents(1024);
    let rec = lab.json(&["migrate", "vm1", "--to", "h2"]);
    let id = rec["id"].as_str().expect("id").to_string();
    expect_code(
        &lab.tern(&["migrate", "vm1", "--to", "h2"]),
        2,
        "already migrating",
    );
    expect_code(&lab.tern(&["vm", "stop", "vm1"]), 2, "is migrating");
    // Abort once the stream really flows (QEMU may report a cancel during its setup phase as
    // `failed` rather than `cancelled`).
    wait_migration(&lab, &id, Duration::from_secs(20), |v| {
        v["state"] == "precopy" && v["progress"]["transferred_bytes"].as_u64().unwrap_or(0) > 0
    });
    // Abort is accepted before the switch; the guest stays on h1 and h2's QEMU goes.
    let out = lab.tern(&["migration", "abort", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let v = wait_migration(&lab, &id, Duration::from_secs(30), |v| {
        v["finished_ms"].is_u64()
    });
    // QEMU sometimes reports a cancelled stream as `failed` ("Unable to write to socket:
    // Broken pipe" when the destination closes first); either way the abort was accepted and
    // the guest must stay on the source.
    let events = serde_json::to_string_pretty(&v["events"]).unwrap_or_default();
    assert!(
        v["state"] == "aborted"
            || (v["state"] == "failed" && events.contains("accepted: abort requested")),
        "{events}"
    );
    expect_code(&lab.tern(&["migration", "abort", &id]), 2, "already ended");
    let after = lab.vms();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        (after[0].0.as_str(), after[0].2.as_str()),
        ("h1", "running")
    );
    assert!(
        lab.qemus_on("h2").is_empty(),
        "h2 still runs a QEMU after abort"
    );
    eprintln!("bad input test took {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn agent_killed_during_precopy_leaves_the_guest_on_exactly_one_host() {
    let _lock = GuestLock::take();
    let t0 = Instant::now();
    let lab = AgentLab::up("agrst", "20mbit", 2048);
    // Dirtying far faster than 20 Mbit/s carries, post-copy forbidden: pre-copy cannot end by
    // itself while we kill the agent.
    let log = boot(
        &lab,
        "busy",
        "h1",
        &[
            "--working-set",
            "32",
            "--dirty-rate",
            "max",
            "--post-copy",
            "forbidden",
        ],
    );
    let source_qemu = lab.qemus_on("h1");
    assert_eq!(source_qemu.len(), 1);
    let rec = lab.json(&["migrate", "busy", "--to", "h2"]);
    let id = rec["id"].as_str().expect("id").to_string();
    // The operator's fault tool: kill -9 the source agent 2 s into pre-copy.
    let agent = lab.agent_pid("h1");
    let out = tern(&[
        "lab",
        "fault",
        "h1",
        "--kill",
        "agent",
        "--when",
        "precopy",
        "--migration",
        &id,
        "--after",
        "2",
        "--name",
        &lab.name,
    ]);
    expect_code(&out, 0, &format!("killed the agent of h1 (pid {agent}"));
    assert_eq!(lab.qemus_on("h2").len(), 1, "destination QEMU receiving");
    let t = Instant::now();
    while tern_qemu::process::pid_alive(agent) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The guest did not die with its agent.
    assert_eq!(
        lab.qemus_on("h1"),
        source_qemu,
        "source QEMU must survive the agent"
    );
    // The migration goes on without its agent for a moment (part of the scenario, not a
    // synchronisation).
    std::thread::sleep(Duration::from_secs(1));

    lab.start_agents(2048); // restarts only the dead agent, with the same configuration
    assert_ne!(lab.agent_pid("h1"), agent);
    let v = wait_migration(&lab, &id, Duration::from_secs(30), |v| {
        v["finished_ms"].is_u64()
    });
    let state = v["state"].as_str().expect("state").to_string();
    let vms = lab.vms();
    eprintln!("after restart: {state}, VMs {vms:?}");
    let events: Vec<String> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        events.iter().any(|e| e.contains("agent restarted")),
        "{events:#?}"
    );
    match state.as_str() {
        "failed" => {
            assert!(
                v["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("agent restarted during pre-copy"),
                "{v:#}"
            );
            assert_eq!(vms.len(), 1, "{vms:?}");
            assert_eq!((vms[0].0.as_str(), vms[0].2.as_str()), ("h1", "running"));
            assert_eq!(lab.qemus_on("h1"), source_qemu);
            assert!(
                lab.qemus_on("h2").is_empty(),
                "destination QEMU left behind"
            );
            // The guest keeps running on the source, and its console is recorded again.
            let hb = heartbeats(&log);
            let t = Instant::now();
            while heartbeats(&log) <= hb + 50 {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "no heartbeats after the restart"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        "completed" => {
            assert_eq!(vms.len(), 1, "{vms:?}");
            assert_eq!((vms[0].0.as_str(), vms[0].2.as_str()), ("h2", "running"));
            assert!(lab.qemus_on("h1").is_empty(), "source QEMU left behind");
        }
        other => panic!("unexpected end state {other}: {v:#}"),
    }
    // Operator commands on the settled migration are refused with the reason.
    expect_code(
        &lab.tern(&["migration", "force-complete", &id]),
        2,
        "already ended",
    );
    eprintln!("restart test took {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn migrate_with_watch_completes_and_events_are_kept() {
    let _lock = GuestLock::take();
    let t0 = Instant::now();
    let lab = AgentLab::up("agok", "200mbit", 2048);
    boot(
        &lab,
        "calm",
        "h1",
        &["--working-set", "16", "--dirty-rate", "500"],
    );
    let out = lab.tern(&[
        "migrate",
        "calm",
        "--to",
        "h2",
        "--context",
        "maintenance",
        "--watch",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("completed"), "{}", text(&out));
    let list = lab.json(&["migration", "list"]);
    let id = list[0]["id"].as_str().expect("id").to_string();
    let v = lab.json(&["migration", "show", &id]);
    assert_eq!(v["state"], "completed");
    assert_eq!(v["context"], "maintenance");
    let states: Vec<(String, String)> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["event"] == "state")
        .map(|e| {
            (
                e["from"].as_str().unwrap_or_default().to_string(),
                e["to"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states.last().map(|s| s.1.as_str()),
        Some("completed"),
        "{states:?}"
    );
    assert!(states.iter().any(|s| s.1 == "precopy"), "{states:?}");
    for e in v["events"].as_array().expect("events") {
        assert!(
            e["wall_ms"].as_u64().unwrap_or(0) > 1_600_000_000_000,
            "{e}"
        );
    }
    let vms = lab.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(
        (vms[0].0.as_str(), vms[0].1.as_str(), vms[0].2.as_str()),
        ("h2", "running", "running")
    );
    assert!(lab.qemus_on("h1").is_empty(), "source QEMU left behind");
    // The VM is now migrated back: the old destination is a source like any other.
    let out = lab.tern(&["migrate", "calm", "--to", "h1", "--watch", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let back: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(back["state"], "completed");
    assert_eq!(back["source"], "h2");
    eprintln!("happy path test took {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn operator_commands_bandwidth_force_complete_and_abort_after_the_switch() {
    let _lock = GuestLock::take();
    let t0 = Instant::now();
    let lab = AgentLab::up("agop", "50mbit", 2048);
    boot(
        &lab,
        "hot",
        "h1",
        &["--working-set", "32", "--dirty-rate", "max"],
    );
    let rec = lab.json(&["migrate", "hot", "--to", "h2"]);
    let id = rec["id"].as_str().expect("id").to_string();
    wait_migration(&lab, &id, Duration::from_secs(20), |v| {
        v["state"] != "pending" && v["state"] != "preparing"
    });
    let out = lab.tern(&["migration", "set-bandwidth", &id, "100mbit"]);
    assert!(out.status.success(), "{}", text(&out));
    expect_code(&lab.tern(&["migration", "set-bandwidth", &id, "0"]), 2, "0");
    let fc = lab.tern(&["migration", "force-complete", &id, "-o", "json"]);
    let fc_text = text(&fc);
    // Accepted (switching to post-copy), or refused because the policy already switched.
    assert!(
        fc.status.success() || fc_text.contains("force-complete applies during pre-copy"),
        "{fc_text}"
    );
    let v = wait_migration(&lab, &id, Duration::from_secs(30), |v| {
        v["state"] == "postcopy" || v["finished_ms"].is_u64()
    });
    if v["state"] == "postcopy" {
        // Nova's rule: once post-copy started, abort is refused with the reason.
        expect_code(&lab.tern(&["migration", "abort", &id]), 2, "cannot abort");
    }
    let v = wait_migration(&lab, &id, Duration::from_secs(60), |v| {
        v["finished_ms"].is_u64()
    });
    for e in v["events"].as_array().into_iter().flatten() {
        if e["event"] == "state" || e["event"] == "operator" {
            eprintln!("{:>7} ms {e}", e["at_ms"]);
        }
    }
    assert_eq!(v["state"], "completed", "{v:#}");
    let report = &v["report"];
    assert_eq!(report["switched_to_postcopy"], true, "{report:#}");
    let events = v["events"].to_string();
    assert!(
        events.contains("set-bandwidth"),
        "bandwidth change not recorded"
    );
    let vms = lab.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!((vms[0].0.as_str(), vms[0].2.as_str()), ("h2", "running"));
    assert!(lab.qemus_on("h1").is_empty(), "source QEMU left behind");
    eprintln!("operator test took {:.1} s", t0.elapsed().as_secs_f64());
}

/// Removes a demo's lab and agents if the demo process could not (it crashed or was killed).
struct DemoLabCleanup(&'static str);

impl Drop for DemoLabCleanup {
    fn drop(&mut self) {
        kill_agents(self.0);
        let _ = Lab::down(self.0);
    }
}

/// The source agent is killed (SIGKILL) one second into post-copy and restarted, through
/// `tern demo --fault kill-source-agent-postcopy` (real agent processes): QEMU keeps
/// migrating, the restarted agent re-attaches and sees the migration to completion, and the
/// guest's verifier finds nothing lost.
#[test]
fn agent_killed_during_postcopy_is_monitored_to_completion_after_restart() {
    let _lock = GuestLock::take();
    let t0 = Instant::now();
    const LAB: &str = "agdemo";
    let _cleanup = DemoLabCleanup(LAB);
    kill_agents(LAB);
    let _ = Lab::down(LAB);
    let out = tern(&[
        "demo",
        "--fault",
        "kill-source-agent-postcopy",
        "--lab-name",
        LAB,
        "--memory",
        "192",
        "--working-set",
        "32",
        "--settle",
        "2",
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out)));
    let events = v["events"].to_string();
    assert_eq!(v["outcome"], "completed", "{events}");
    assert_eq!(v["switched_to_postcopy"], true, "{events}");
    assert!(events.contains("agent restarted"), "{events}");
    // Exactly one host runs the guest: h2; the source QEMU is gone.
    assert_eq!(v["guest_location"], "h2");
    assert_eq!(v["source_running"], false);
    assert!(v["source_final_run_state"].is_null(), "{v}");
    // The guest's own verdict.
    assert_eq!(v["corrupt_pages"], 0);
    assert_eq!(v["control_mismatches"], 0);
    assert_eq!(v["heartbeat_continuous"], true, "{v}");
    assert!(v["verify_passes_after"].as_u64().unwrap_or(0) >= 1, "{v}");
    // The fault fired in post-copy and the agent came back and re-attached.
    let f = &v["faults_injected"][0];
    assert_eq!(f["fault"], "kill-source-agent-postcopy");
    assert!(f["error"].is_null(), "{f}");
    for k in ["fired_at_ms", "restored_at_ms", "resumed_after_restore_ms"] {
        assert!(f[k].is_u64(), "{k} missing: {f}");
    }
    // The restarted agent rebuilt the report from QEMU's final statistics.
    assert!(v["bytes_sent"].as_u64().unwrap_or(0) > 0, "{v}");
    // Nothing left behind by the demo.
    assert!(
        LabAgents::load(LAB).is_err(),
        "the demo left its agents' discovery file"
    );
    assert!(
        !Lab::list()
            .unwrap_or_default()
            .iter()
            .any(|l| l.name() == LAB),
        "the demo left its lab"
    );
    eprintln!(
        "post-copy agent-kill demo took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
