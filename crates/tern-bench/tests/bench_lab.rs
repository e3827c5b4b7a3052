//! The harness itself, on the lab with a real guest: a tiny set (one idle-guest hop under
//! tern and one under a baseline) must produce a JSON result, a Markdown report and plots with
//! sane values. Runs as root in CI, in well under a minute.

use std::time::Duration;

use tern_bench::metrics::OutcomeClass;
use tern_bench::{BenchResult, RunOptions, ScenarioSet};

const TINY: &str = r#"
name = "ci-tiny"
description = "CI: one idle hop under tern and one under qemu-default"
repeat = 1
time_cap_s = 40
settle_s = 1
policies = ["tern", "qemu-default"]

[[scenario]]
name = "idle"
title = "idle guest"
memory_mib = 192
working_set_mib = 8
dirty_rate = 20
link = "1gbit"
"#;

/// Runs a set given as TOML text on labs named `tern-<prefix>-…`.
fn run_on_lab(set_toml: &str, prefix: &str) -> BenchResult {
    let set = ScenarioSet::parse(set_toml, prefix).expect("the set parses");
    let env = tern_scenario::LabEnvironment::prepare(|s| eprintln!("setup: {s}"))
        .expect("lab environment (run as root after ./x setup)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opts = RunOptions {
        repeat: None,
        lab_prefix: prefix.into(),
        verbose: true,
        migration_tls: false,
    };
    rt.block_on(tern_bench::run_set(&env, &set, &opts))
}

fn no_lab_left(prefix: &str) {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains(&format!("tern-{prefix}")),
        "the bench left namespaces behind:\n{text}"
    );
}

#[test]
fn tiny_set_produces_json_markdown_and_plots_with_sane_values() {
    let started = std::time::Instant::now();
    let result = run_on_lab(TINY, "tb-ci");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the tiny set took {:?}",
        started.elapsed()
    );
    no_lab_left("tb-ci");

    let s = &result.scenarios[0];
    assert_eq!(s.error, None);
    assert_eq!(s.runs.len(), 2, "{:?}", s.runs);
    assert_eq!(s.runs[0].direction, "h1→h2");
    assert_eq!(
        s.runs[1].direction, "h2→h1",
        "the guest goes back on the second hop"
    );
    for r in &s.runs {
        let m = &r.metrics;
        assert_eq!(m.outcome, OutcomeClass::Completed, "{}: {m:?}", r.arm);
        assert!(m.integrity_ok, "{}: {m:?}", r.arm);
        assert!(m.total_time_s > 0.0 && m.total_time_s < 40.0, "{m:?}");
        let b = m.blackout_ms.expect("a blackout was measured");
        assert!(b > 0.0 && b < 10_000.0, "blackout {b} ms");
        assert!(
            m.bytes_vs_ram > 0.01 && m.bytes_vs_ram < 2.0,
            "bytes ÷ RAM {}",
            m.bytes_vs_ram
        );
        assert!(m.time_vs_bound > 0.0);
        let w = m.wps_before.expect("writes/s before");
        assert!((5.0..60.0).contains(&w), "guest wrote {w}/s, asked 20/s");
        assert!(
            !r.series.is_empty(),
            "a remaining-bytes series was recorded"
        );
        assert_eq!(m.postcopy_s, None, "an idle guest converges in pre-copy");
    }
    assert!((s.bound_s - 192.0 * 1048576.0 / 125e6).abs() < 1e-6);

    let dir = tempfile::tempdir().expect("tempdir");
    let (json, md) = tern_bench::write_outputs(&result, dir.path(), "ci").expect("outputs");
    let back: BenchResult =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    assert_eq!(back.scenarios.len(), 1, "the JSON round-trips");
    assert_eq!(back.scenarios[0].runs.len(), 2);
    assert_eq!(
        back.scenarios[0].arms, result.scenarios[0].arms,
        "floats round-trip exactly (serde_json's float_roundtrip)"
    );
    let text = std::fs::read_to_string(&md).expect("md");
    assert!(text.contains("| **tern** | completed |"), "{text}");
    assert!(text.contains("| qemu-default | completed |"), "{text}");
    assert!(text.contains(&result.machine.qemu_version));
    for plot in ["idle-remaining.svg", "idle-blackout.svg", "idle-time.svg"] {
        let p = dir.path().join("ci-plots").join(plot);
        let svg = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(svg.contains("<svg") && svg.contains("tern"), "{plot}");
    }
    let cmp = tern_bench::compare::compare(&back, &result, 0.2);
    assert_eq!(
        cmp.regressions().count(),
        0,
        "a result does not regress against itself"
    );
}

const TINY_FAULT: &str = r#"
name = "ci-fault"
description = "CI: one post-copy hop under tern with a 4 s link cut"
repeat = 1
time_cap_s = 90
settle_s = 1
policies = ["tern"]

[[scenario]]
name = "cut"
title = "4 s cut 0.5 s into post-copy (longer than the 2 s stall detection)"
memory_mib = 192
working_set_mib = 64
dirty_rate = "max"
link = "100mbit"
context = "evacuate"
faults = ["link-cut-postcopy:4@0.5"]
"#;

/// A fault scenario through the harness: the cut is injected in the session's hop, tern
/// recovers, and the report carries detection, resume and the guest's longest stall.
#[test]
fn fault_scenario_records_detection_resume_and_stall() {
    let result = run_on_lab(TINY_FAULT, "tb-cif");
    no_lab_left("tb-cif");
    let s = &result.scenarios[0];
    assert_eq!(s.error, None);
    assert_eq!(s.runs.len(), 1, "{:?}", s.runs);
    let m = &s.runs[0].metrics;
    assert_eq!(m.outcome, OutcomeClass::Recovered, "{m:?}");
    assert!(m.recoveries >= 1, "{m:?}");
    assert!(m.integrity_ok, "{m:?}");
    assert_eq!(m.faults.len(), 1, "{m:?}");
    let f = &m.faults[0];
    assert_eq!(f.error, None);
    let detected = f.detected_after_ms.expect("the cut was detected");
    assert!(detected < 4_000, "detected after {detected} ms: {f:?}");
    assert!(m.fault_resume_ms().is_some(), "{f:?}");
    // The longest stall, switchover included: the cut comes 0.5 s after the switch, often
    // before the guest's first heartbeat on the destination.
    let stall = m.blackout_ms.expect("heartbeats");
    assert!(stall >= 2_000.0, "a 4 s cut stalls the guest: {stall} ms");
    let md = tern_bench::report::markdown(&result, None);
    assert!(md.contains("Faults injected in every run"), "{md}");
    assert!(md.contains("| recovered | "), "{md}");
}
