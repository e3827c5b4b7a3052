//! `tern fleet-sim` as CI runs it: a tiny fleet (20 hosts, 200 VMs) on SQLite, so the
//! simulator and the figures it reports keep working; the 10,000-host run is a bench
//! (`bench/results/fleet-*.md`).

use std::process::Command;

use serde_json::Value;

#[test]
fn a_small_fleet_registers_heartbeats_plans_and_evacuates() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "fleet-sim",
            "--hosts",
            "20",
            "--vms",
            "200",
            "--evacuate-vms",
            "50",
            "--heartbeat-seconds",
            "1",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["database"], "sqlite");
    assert_eq!(r["row_counts"]["hosts"], 20);
    assert_eq!(r["row_counts"]["vms"], 200);
    assert!(r["heartbeats_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(
        r["host_page_latency"]["calls"], 1,
        "20 hosts fit one page: {r}"
    );
    assert_eq!(r["evacuate_dry_run_vms"], 50, "{r}");
    assert_eq!(r["drain_hosts"], 2, "{r}");
    assert!(r["drain_vms"].as_u64().unwrap() > 0, "{r}");
    let e = &r["evacuation"];
    assert_eq!(e["state"], "completed", "{r}");
    assert_eq!(
        e["migrations_started"], e["vms"],
        "each VM started once: {r}"
    );
    assert!(r["process_rss_mib"].as_f64().unwrap() > 1.0, "{r}");
}
