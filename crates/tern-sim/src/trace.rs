//! Lab runs as simulator input: a bench scenario's guest and link ([`LabWorkload`]) become a
//! [`Scenario`] ([`scenario_from_lab`]), and a recorded run ([`RunTrace`], JSON) is replayed under
//! any policy ([`replay`]).
//!
//! A lab guest runs `tern-load` (guest/tern-load.c): it fills a working set of `ws_mib` at boot,
//! then writes `rate` pages/s into it, sequentially (`seq`), at random pages (`random`), or
//! sequentially for 2 s then nothing for 2 s (`bursty`); it prints those parameters on its
//! `READY` line and the writes it actually managed per second on every `STATUS` line (`wps=`,
//! docs/CONVENTIONS.md). Those are the write process; the rest of the guest (kernel, initramfs,
//! page cache) is resident data that nobody writes during the migration, and every other page
//! has never been touched and goes as a zero-page marker. The physical constants of the lab
//! (shaper efficiency, the switchover's fixed cost, what the guest image keeps resident) are
//! [`LabPhysics`], calibrated against `bench/results/quick-*.json` by the `calibrate` example.

use serde::{Deserialize, Serialize};
use tern_policy::{
    HostLimits, MigrationContext, PostCopyPermission, QemuFeatures, SlaCatalog, policy_by_name,
};

use crate::engine::{SimConfig, SimOutcome, simulate_with};
use crate::scenario::{DirtyPhase, Scenario};
use crate::workload::{Burst, PageRange, Workload, WritePattern};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// `tern-load`'s `tern_pattern=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabPattern {
    /// Sequential sweep over the working set.
    #[serde(rename = "seq", alias = "Sequential", alias = "sequential")]
    Seq,
    /// Uniformly random pages of the working set.
    #[serde(rename = "random", alias = "Random")]
    Random,
    /// Sequential for 2 s, idle for 2 s (`BURST_ON_NS`/`BURST_OFF_NS` in tern-load.c).
    #[serde(rename = "bursty", alias = "Bursty")]
    Bursty,
}

/// A lab guest and link, as a bench scenario (`bench/scenarios/*.toml`) describes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabWorkload {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// `tern-load` working set, MiB.
    pub working_set_mib: u64,
    /// `tern_rate=`: page writes/s (`None` = `max`, as fast as the vCPU manages). Also read as
    /// `dirty_rate`, the bench TOML's name.
    #[serde(default, alias = "dirty_rate")]
    pub dirty_pages_per_s: Option<f64>,
    /// `tern_pattern=`.
    pub pattern: LabPattern,
    /// Link rate as the bench writes it (`tc` syntax: `300mbit`, `1gbit`, `500kbit`).
    pub link: String,
    /// Why the VM moves.
    #[serde(default = "default_context")]
    pub context: MigrationContext,
    /// Whether post-copy is allowed (the bench's `post_copy` arm flag).
    #[serde(default = "yes")]
    pub post_copy: bool,
}

fn default_context() -> MigrationContext {
    MigrationContext::Manual
}

fn yes() -> bool {
    true
}

/// Physical constants of the lab, the simulator's knobs for calibration (never tern's model).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabPhysics {
    /// Guest data outside the working set that the first pass sends (kernel, initramfs, page
    /// cache), MiB.
    pub resident_mib: f64,
    /// Share of the `tbf` rate a migration stream achieves.
    pub tbf_efficiency: f64,
    /// Page writes/s `tern-load tern_rate=max` reaches under TCG (sim-vs-real.md measured
    /// ≈2,562/s on a busy 2-core host; platform.md saw ≈1 M/s on an idle one).
    pub tcg_max_pages_per_s: f64,
    /// Device state and switchover work in every blackout, ms.
    pub switchover_overhead_ms: u64,
    /// Share of a re-sent `tern-load` page XBZRLE saves (it rewrites a page's pattern and
    /// generation, so deltas are small only where the pattern repeats).
    pub xbzrle_saving: f64,
}

impl Default for LabPhysics {
    /// The values the `calibrate` example settled on for the quick set (TCG, QEMU 10.0.2).
    fn default() -> Self {
        LabPhysics {
            resident_mib: 55.0,
            tbf_efficiency: 0.956,
            tcg_max_pages_per_s: 2562.0,
            switchover_overhead_ms: 90,
            xbzrle_saving: 0.6,
        }
    }
}

/// Errors turning lab input into a scenario.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A link rate that is not `<number><unit>`.
    #[error(
        "link rate {0:?}: expected a number and a unit: bit, kbit, mbit or gbit (e.g. 300mbit)"
    )]
    BadLink(String),
    /// A working set larger than the guest.
    #[error("working set {ws} MiB does not fit in a {mem} MiB guest")]
    WorkingSet {
        /// Working set, MiB.
        ws: u64,
        /// Guest RAM, MiB.
        mem: u64,
    },
    /// The built-in SLA catalog lacks the class the bench uses.
    #[error(transparent)]
    Sla(#[from] tern_policy::SlaError),
    /// An unknown policy.
    #[error(transparent)]
    UnknownPolicy(#[from] tern_policy::UnknownPolicy),
    /// A trace that is not valid JSON of this format.
    #[error("trace: {0}")]
    Json(#[from] serde_json::Error),
}

/// Bits/s of a `tc` rate (`300mbit`, `1gbit`, `64kbit`, `1000000bit`).
pub fn parse_link_bits_per_s(s: &str) -> Result<f64, TraceError> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("/s").trim_end_matches("ps");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| TraceError::BadLink(s.to_string()))?;
    let mult = match unit.trim() {
        "bit" | "" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(TraceError::BadLink(s.to_string())),
    };
    if v <= 0.0 {
        return Err(TraceError::BadLink(s.to_string()));
    }
    Ok(v * mult)
}

/// The simulator scenario of a lab guest and link: `tern-load`'s working set right after the
/// resident data, written at its rate in its pattern; standard SLA; QEMU 10 under TCG.
pub fn scenario_from_lab(w: &LabWorkload, phys: &LabPhysics) -> Result<Scenario, TraceError> {
    if w.working_set_mib > w.memory_mib {
        return Err(TraceError::WorkingSet {
            ws: w.working_set_mib,
            mem: w.memory_mib,
        });
    }
    let link = parse_link_bits_per_s(&w.link)? / 8.0 * phys.tbf_efficiency;
    let ram_pages = w.memory_mib * MIB / PAGE;
    let ws_pages = w.working_set_mib * MIB / PAGE;
    let resident_pages =
        ((phys.resident_mib.max(0.0) * MIB as f64 / PAGE as f64) as u64).min(ram_pages - ws_pages);
    let rate = w.dirty_pages_per_s.unwrap_or(phys.tcg_max_pages_per_s);
    let mut workload = Workload::single(
        vec![PageRange {
            first: 0,
            pages: resident_pages + ws_pages,
        }],
        PageRange {
            first: resident_pages,
            pages: ws_pages,
        },
        match w.pattern {
            LabPattern::Random => WritePattern::Random,
            LabPattern::Seq | LabPattern::Bursty => WritePattern::Sequential,
        },
        rate,
        1,
    );
    if w.pattern == LabPattern::Bursty {
        workload.burst = Some(Burst {
            on_ms: 2000,
            off_ms: 2000,
        });
    }
    let ram_bytes = w.memory_mib * MIB;
    let mut features = QemuFeatures::qemu_10_tcg();
    features.postcopy_ram = w.post_copy;
    // The bench plans without a dirty-rate probe (tern-engine `RunnerSetup::probe_seconds` 0).
    features.calc_dirty_rate = false;
    let sla = SlaCatalog::builtin().get("standard")?.clone();
    Ok(Scenario {
        id: 0,
        context: w.context,
        sla,
        ram_bytes,
        nonzero_fraction: (resident_pages + ws_pages) as f64 / ram_pages.max(1) as f64,
        wws_bytes: ws_pages * PAGE,
        dirty_phases: vec![DirtyPhase {
            from_ms: 0,
            pages_per_s: rate,
        }],
        page_size: PAGE,
        vcpus: 1,
        link_bytes_per_s: link as u64,
        outages: vec![],
        switchover_overhead_ms: phys.switchover_overhead_ms,
        assumed_overhead_ms: 50,
        source: HostLimits::default(),
        destination: HostLimits::default(),
        vm_post_copy: PostCopyPermission::Allowed,
        features,
        deadline_ms: None,
        xbzrle_saving: phys.xbzrle_saving,
        probe_error: 0.0,
        workload: Some(workload),
    })
}

/// One pass as QEMU reported it (`query-migrate` at a `dirty-sync-count` change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassRecord {
    /// When, ms since the migration started.
    pub at_ms: u64,
    /// `ram.transferred`.
    pub transferred_bytes: u64,
    /// `ram.remaining`.
    pub remaining_bytes: u64,
    /// `ram.dirty-pages-rate`.
    pub dirty_pages_rate: u64,
}

/// How a real run ended, for comparison with its replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealOutcome {
    /// Policy.
    pub policy: String,
    /// `completed` (pre-copy), `post-copy`, `timeout`, `aborted`, `failed`.
    pub outcome: String,
    /// Total time, ms.
    pub total_ms: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Passes (`dirty-sync-count`).
    pub passes: u64,
}

/// A recorded lab run: enough to replay it in the simulator under every policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTrace {
    /// Format version (1).
    pub format: u32,
    /// Name (bench scenario).
    pub name: String,
    /// The guest and link.
    pub workload: LabWorkload,
    /// `wps=` from the guest's `STATUS` lines before the migration: the write rate `tern-load`
    /// actually achieved (replaces `max`, and a rate the vCPU could not reach).
    #[serde(default)]
    pub measured_pages_per_s: Option<f64>,
    /// The bench's time cap: a run still going is aborted by the harness (`timeout`), ms.
    #[serde(default)]
    pub time_cap_ms: Option<u64>,
    /// Lab constants (default: [`LabPhysics::default`]).
    #[serde(default)]
    pub physics: Option<LabPhysics>,
    /// Passes as QEMU reported them (for comparison; the replay derives its own).
    #[serde(default)]
    pub passes: Vec<PassRecord>,
    /// How the real runs ended.
    #[serde(default)]
    pub real: Vec<RealOutcome>,
}

impl RunTrace {
    /// Parses a JSON trace.
    pub fn from_json(text: &str) -> Result<RunTrace, TraceError> {
        Ok(serde_json::from_str(text)?)
    }

    /// The scenario to replay: the lab workload, at the measured write rate when recorded.
    pub fn scenario(&self) -> Result<Scenario, TraceError> {
        let mut w = self.workload.clone();
        if let Some(m) = self.measured_pages_per_s.filter(|m| *m > 0.0) {
            w.dirty_pages_per_s = Some(m);
        }
        scenario_from_lab(&w, &self.physics.unwrap_or_default())
    }

    /// Simulation settings: the harness's time cap as the horizon.
    pub fn sim_config(&self) -> SimConfig {
        let mut c = SimConfig::default();
        if let Some(cap) = self.time_cap_ms {
            c.horizon_ms = cap;
        }
        c
    }
}

/// Replays `trace` under each of `policies` (e.g. `tern_policy::POLICY_NAMES`).
pub fn replay(trace: &RunTrace, policies: &[&str]) -> Result<Vec<SimOutcome>, TraceError> {
    let sc = trace.scenario()?;
    let cfg = trace.sim_config();
    policies
        .iter()
        .map(|&name| {
            policy_by_name(name)?;
            let mut make = || {
                policy_by_name(name)
                    .unwrap_or_else(|_| Box::new(tern_policy::baselines::QemuDefaultPolicy))
            };
            Ok(simulate_with(&sc, &mut make, cfg, false).0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SimResult;

    fn quick(ws: u64, rate: f64) -> LabWorkload {
        LabWorkload {
            memory_mib: 192,
            working_set_mib: ws,
            dirty_pages_per_s: Some(rate),
            pattern: LabPattern::Seq,
            link: "300mbit".into(),
            context: MigrationContext::Manual,
            post_copy: true,
        }
    }

    #[test]
    fn the_quick_sets_scenarios_read_as_lab_workloads() {
        #[derive(Deserialize)]
        struct Set {
            scenario: Vec<LabWorkload>,
        }
        let text = include_str!("../../../bench/scenarios/quick.toml");
        let set: Set = toml::from_str(text).unwrap();
        assert_eq!(set.scenario.len(), 5);
        let rho3 = &set.scenario[3];
        assert_eq!(rho3.working_set_mib, 48);
        assert_eq!(rho3.dirty_pages_per_s, Some(27000.0));
        assert_eq!(rho3.pattern, LabPattern::Seq);
        for w in &set.scenario {
            let sc = scenario_from_lab(w, &LabPhysics::default()).unwrap();
            assert_eq!(sc.link_bytes_per_s, (300e6 / 8.0 * 0.956) as u64);
        }
    }

    #[test]
    fn link_rates_parse_and_bad_ones_are_named() {
        assert_eq!(parse_link_bits_per_s("300mbit").unwrap(), 300e6);
        assert_eq!(parse_link_bits_per_s("1gbit").unwrap(), 1e9);
        assert_eq!(parse_link_bits_per_s("1.5Gbit").unwrap(), 1.5e9);
        let e = parse_link_bits_per_s("fast").unwrap_err().to_string();
        assert!(e.contains("\"fast\"") && e.contains("mbit"), "{e}");
    }

    #[test]
    fn a_bench_scenario_becomes_a_tern_load_workload() {
        let sc = scenario_from_lab(&quick(32, 3000.0), &LabPhysics::default()).unwrap();
        let w = sc.workload.as_ref().unwrap();
        assert_eq!(w.working_set_pages(), 32 * 256);
        assert_eq!(w.phases[0].streams[0].pattern, WritePattern::Sequential);
        assert_eq!(w.phases[0].streams[0].pages_per_s, 3000.0);
        assert_eq!(sc.ram_bytes, 192 * MIB);
        assert_eq!(sc.link_bytes_per_s, (300e6 / 8.0 * 0.956) as u64);
        let e = scenario_from_lab(&quick(300, 1.0), &LabPhysics::default()).unwrap_err();
        assert!(e.to_string().contains("300 MiB"));
    }

    #[test]
    fn a_trace_replays_under_every_policy() {
        // 60 s, not the lab's 10 s cap: oVirt's baselines poll first at 10 s and use half the
        // link (vdsm), so on this trace they finish after 10 s; every policy must finish.
        let json = r#"{"format":1,"name":"converging",
            "workload":{"memory_mib":192,"working_set_mib":32,"dirty_pages_per_s":3000,
                        "pattern":"Sequential","link":"300mbit","context":"manual"},
            "time_cap_ms":60000}"#;
        let t = RunTrace::from_json(json).unwrap();
        let out = replay(&t, tern_policy::POLICY_NAMES).unwrap();
        assert_eq!(out.len(), tern_policy::POLICY_NAMES.len());
        assert!(
            out.iter().all(|o| o.result == SimResult::Completed),
            "{out:?}"
        );
        assert!(replay(&t, &["nope"]).is_err());
    }
}
