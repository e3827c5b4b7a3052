//! Simulator vs real lab runs, and the ETA's error, for three regimes: converging,
//! borderline (dirty rate ≈ link rate) and non-converging.
//!
//! Each scenario runs once in the lab under the `tern` policy; the same scenario (RAM,
//! working set, dirty rate, link rate; the non-zero share of RAM taken from the real first
//! pass) is then simulated. Printed as a Markdown table:
//! `cargo run -p tern-scenario --example sim_vs_real [-- OUT.md]` (root).

use std::time::Instant;

use tern_engine::MigrationEventKind;
use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_policy::{HostLimits, MigrationContext, PostCopyPermission, QemuFeatures, SlaCatalog};
use tern_scenario::{LabEnvironment, ScenarioProgress, ScenarioSpec, run_scenario};
use tern_sim::{DirtyPhase, Scenario};
use tokio::sync::mpsc;

const MIB: u64 = 1 << 20;
/// `tbf` carries ~95.6 % of the configured rate as TCP payload (measured in tern-lab).
const TBF_EFFICIENCY: f64 = 0.956;

struct Case {
    name: &'static str,
    link_mbit: u64,
    working_set_mib: u32,
    pages_per_s: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1);
    let env = tokio::task::spawn_blocking(|| LabEnvironment::prepare(|s| eprintln!("setup: {s}")))
        .await??;
    let cases = [
        // 2 000 pages/s ≈ 8 MB/s against 25 MB/s: ρ ≈ 0.3.
        Case {
            name: "converging",
            link_mbit: 200,
            working_set_mib: 32,
            pages_per_s: Some(2_000),
        },
        // 6 000 pages/s ≈ 24.6 MB/s against 23.9 MB/s of payload: ρ ≈ 1.
        Case {
            name: "borderline",
            link_mbit: 200,
            working_set_mib: 48,
            pages_per_s: Some(6_000),
        },
        Case {
            name: "non-converging",
            link_mbit: 100,
            working_set_mib: 64,
            pages_per_s: None,
        },
    ];
    let mut rows = Vec::new();
    for c in &cases {
        let spec = ScenarioSpec {
            lab_name: format!("svr-{}", &c.name.replace("-", "")[..5]),
            link_rate: Some(format!("{}mbit", c.link_mbit).parse()?),
            memory_mib: 192,
            workload: WorkloadParams {
                working_set_mib: c.working_set_mib,
                rate: c.pages_per_s.map_or(PageRate::Max, PageRate::PerSecond),
                pattern: WritePattern::Sequential,
                verify: true,
            },
            context: MigrationContext::Balance,
            ..ScenarioSpec::default()
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let series = tokio::spawn(async move {
            let mut v = Vec::new();
            while let Some(p) = rx.recv().await {
                if let ScenarioProgress::Migration(m) = p {
                    v.push((m.elapsed_ms, m.eta_ms, m.state));
                }
            }
            v
        });
        let real = run_scenario(&env, &spec, Some(tx)).await?;
        let series = series.await?;
        let _ = started;
        let total_ms = (real.total_time_s * 1000.0) as u64;
        // ETA error at 25/50/75 % of the real duration: |predicted finish − real finish| / total.
        let eta_err = |frac: f64| -> Option<f64> {
            let t = (total_ms as f64 * frac) as u64;
            let (at, eta, _) = series
                .iter()
                .rev()
                .find(|(at, eta, _)| *at <= t && eta.is_some())?;
            let predicted = at + eta.unwrap_or(0);
            Some((predicted as f64 - total_ms as f64).abs() / total_ms as f64 * 100.0)
        };
        // Calibrate the simulator's non-zero RAM from the real first pass, and a max-rate
        // writer's dirty rate from QEMU's measurement at the pass boundaries.
        let passes: Vec<(u64, u64)> = real
            .events
            .iter()
            .filter_map(|e| match e.kind {
                MigrationEventKind::Pass {
                    transferred_bytes,
                    dirty_bytes_per_s,
                    ..
                } => Some((transferred_bytes, dirty_bytes_per_s)),
                _ => None,
            })
            .collect();
        let ram = spec.memory_mib * MIB;
        let first_pass = passes.first().map_or(ram / 2, |p| p.0);
        let measured_dirty_pages = if passes.is_empty() {
            0.0
        } else {
            passes.iter().map(|p| p.1 as f64).sum::<f64>() / passes.len() as f64 / 4096.0
        };
        // QEMU's dirty-pages-rate counts distinct pages per sync period, so a max-rate writer
        // reads as "working set ÷ period"; the simulator wants the write rate itself (TCG
        // reaches ≈1 M page writes/s here, platform.md) and caps the dirty set at the WWS.
        let pages_per_s = c.pages_per_s.map_or(1_000_000.0, |p| p as f64);
        let sla = SlaCatalog::builtin().get("standard")?.clone();
        let scenario = Scenario {
            id: 0,
            context: spec.context,
            sla,
            ram_bytes: ram,
            nonzero_fraction: (first_pass as f64 / ram as f64).min(1.0),
            wws_bytes: u64::from(c.working_set_mib) * MIB,
            dirty_phases: vec![DirtyPhase {
                from_ms: 0,
                pages_per_s,
            }],
            page_size: 4096,
            vcpus: 1,
            link_bytes_per_s: (c.link_mbit as f64 * 1e6 / 8.0 * TBF_EFFICIENCY) as u64,
            outages: vec![],
            switchover_overhead_ms: 50,
            assumed_overhead_ms: 50,
            source: HostLimits::default(),
            destination: HostLimits::default(),
            vm_post_copy: PostCopyPermission::Allowed,
            features: QemuFeatures::qemu_10_tcg(),
            deadline_ms: None,
            xbzrle_saving: 0.0,
            probe_error: 0.0,
            workload: None,
        };
        let sim = tern_sim::simulate(&scenario, "tern")?;
        let err = (sim.total_ms as f64 - total_ms as f64) / total_ms as f64 * 100.0;
        let fmt = |v: Option<f64>| v.map_or("–".to_string(), |e| format!("{e:.0} %"));
        rows.push(format!(
            "| {} | {} Mbit/s | {} MiB | {} | {} | {:.1} s | {:.1} s | {:+.0} % | {} / {} | {} | {} | {} |",
            c.name,
            c.link_mbit,
            c.working_set_mib,
            c.pages_per_s.map_or(format!("max (≈{:.0}/s measured)", measured_dirty_pages), |p| p.to_string()),
            real.outcome,
            real.total_time_s,
            sim.total_ms as f64 / 1000.0,
            err,
            if real.switched_to_postcopy { "post-copy" } else { "pre-copy" },
            if sim.used_postcopy { "post-copy" } else { "pre-copy" },
            fmt(eta_err(0.25)),
            fmt(eta_err(0.50)),
            fmt(eta_err(0.75)),
        ));
        eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
    }
    let mut text = String::new();
    text.push_str(&format!(
        "# Simulator vs real lab runs (policy `tern`, context balance, 192 MiB guest, {} · QEMU {})\n\n",
        env.accelerator.accelerator, env.qemu.version
    ));
    text.push_str("| scenario | link | working set | page writes/s | real outcome | real total | sim total | sim error | finished by (real / sim) | ETA error @25 % | @50 % | @75 % |\n");
    text.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        text.push_str(&r);
        text.push('\n');
    }
    text.push_str("\nETA error = |predicted finish − real finish| ÷ real total time, using the ETA published at 25/50/75 % of the real duration.\n");
    match out {
        Some(p) => std::fs::write(p, &text)?,
        None => print!("{text}"),
    }
    Ok(())
}
