//! The benchmark's result file (JSON): what ran where, every run's metrics and series, and
//! per-arm aggregates (median and spread). Runs are compared over time by `tern bench compare`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::metrics::{OutcomeClass, RunMetrics, SeriesPoint};
use crate::set::{Arm, Scenario};

/// Format version of the result file.
pub const RESULT_FORMAT: u32 = 1;

/// Where and how a benchmark ran. Under TCG absolute times are not comparable to KVM
/// hardware, so the accelerator and QEMU version travel with every result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// Why that accelerator (the probe's verdict).
    pub accelerator_reason: String,
    /// QEMU version.
    pub qemu_version: String,
    /// Host kernel release.
    pub kernel: String,
    /// CPUs available to this process.
    pub cpus: usize,
    /// `/proc/loadavg` when the run started (other work competes for the cores).
    pub loadavg_at_start: String,
    /// `/proc/loadavg` when the run ended.
    pub loadavg_at_end: String,
    /// Host name.
    pub hostname: String,
}

/// One run (one hop of a session).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The arm's label.
    pub arm: String,
    /// Policy name.
    pub policy: String,
    /// Post-copy permitted for the VM in this run.
    pub post_copy: bool,
    /// Repeat index (0-based).
    pub repeat: u32,
    /// `h1→h2` or `h2→h1`.
    pub direction: String,
    /// The metrics.
    pub metrics: RunMetrics,
    /// Remaining bytes over time (downsampled).
    pub series: Vec<SeriesPoint>,
}

/// Median and spread of one metric over an arm's repeats.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// How many runs had a value.
    pub n: usize,
}

impl Spread {
    /// Median/min/max of the values present; `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = Option<f64>>) -> Option<Self> {
        let mut v: Vec<f64> = values
            .into_iter()
            .flatten()
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// An arm's aggregate over its repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmSummary {
    /// The arm.
    pub arm: Arm,
    /// Runs.
    pub runs: usize,
    /// Outcome → count.
    pub outcomes: BTreeMap<String, usize>,
    /// Runs whose guest integrity failed.
    pub integrity_failures: usize,
    /// Total time (s), over every run (timeouts count with the cap).
    pub total_time_s: Option<Spread>,
    /// Total time ÷ bound.
    pub time_vs_bound: Option<Spread>,
    /// Decision time (s).
    pub decision_time_s: Option<Spread>,
    /// Blackout (ms): largest host-timestamped heartbeat gap.
    pub blackout_ms: Option<Spread>,
    /// Switchover gap alone (ms).
    pub switchover_gap_ms: Option<Spread>,
    /// Bytes ÷ RAM.
    pub bytes_vs_ram: Option<Spread>,
    /// Time in post-copy (s).
    pub postcopy_s: Option<Spread>,
    /// Guest writes/s before the migration.
    pub wps_before: Option<Spread>,
    /// Guest writes/s in pre-copy.
    pub wps_precopy: Option<Spread>,
    /// Guest writes/s in post-copy.
    pub wps_postcopy: Option<Spread>,
    /// Measured ρ.
    pub rho_measured: Option<Spread>,
    /// ETA error at 25/50/75 % (percent).
    pub eta_error_pct: [Option<Spread>; 3],
}

impl ArmSummary {
    /// Aggregates an arm's runs.
    pub fn of(arm: &Arm, runs: &[&RunRecord]) -> Self {
        let m = |f: fn(&RunMetrics) -> Option<f64>| Spread::of(runs.iter().map(|r| f(&r.metrics)));
        let mut outcomes = BTreeMap::new();
        for r in runs {
            *outcomes
                .entry(r.metrics.outcome.label().to_string())
                .or_insert(0) += 1;
        }
        Self {
            arm: arm.clone(),
            runs: runs.len(),
            outcomes,
            integrity_failures: runs
                .iter()
                .filter(|r| r.metrics.outcome != OutcomeClass::Error && !r.metrics.integrity_ok)
                .count(),
            total_time_s: m(|x| (x.outcome != OutcomeClass::Error).then_some(x.total_time_s)),
            time_vs_bound: m(|x| (x.outcome != OutcomeClass::Error).then_some(x.time_vs_bound)),
            decision_time_s: m(|x| x.decision_time_s),
            blackout_ms: m(|x| x.blackout_ms),
            switchover_gap_ms: m(|x| x.switchover_gap_ms),
            bytes_vs_ram: m(|x| (x.outcome != OutcomeClass::Error).then_some(x.bytes_vs_ram)),
            postcopy_s: m(|x| x.postcopy_s),
            wps_before: m(|x| x.wps_before),
            wps_precopy: m(|x| x.wps_precopy),
            wps_postcopy: m(|x| x.wps_postcopy),
            rho_measured: m(|x| x.rho_measured),
            eta_error_pct: [
                m(|x| x.eta_error_pct[0]),
                m(|x| x.eta_error_pct[1]),
                m(|x| x.eta_error_pct[2]),
            ],
        }
    }

    /// Runs that reached the destination.
    pub fn arrived(&self) -> usize {
        ["completed", "post-copy", "recovered"]
            .iter()
            .map(|k| self.outcomes.get(*k).copied().unwrap_or(0))
            .sum()
    }

    /// `completed ×2, timeout ×1`.
    pub fn outcome_text(&self) -> String {
        self.outcomes
            .iter()
            .map(|(k, n)| {
                if *n == self.runs {
                    k.clone()
                } else {
                    format!("{k} ×{n}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One scenario's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The scenario as run.
    pub scenario: Scenario,
    /// Physical bound RAM ÷ link rate (s).
    pub bound_s: f64,
    /// Every run in the order it ran.
    pub runs: Vec<RunRecord>,
    /// Per-arm aggregates in table order.
    pub arms: Vec<ArmSummary>,
    /// Seconds the scenario took (boot included).
    pub wall_s: f64,
    /// Why the scenario could not run (or stopped early), if it did.
    pub error: Option<String>,
}

impl ScenarioResult {
    /// Recomputes `arms` from `runs`.
    pub fn aggregate(&mut self) {
        self.arms = self
            .scenario
            .arms
            .iter()
            .map(|a| {
                let runs: Vec<&RunRecord> = self.runs.iter().filter(|r| r.arm == a.label).collect();
                ArmSummary::of(a, &runs)
            })
            .collect();
    }

    /// The aggregate of the arm labelled `label`.
    pub fn arm(&self, label: &str) -> Option<&ArmSummary> {
        self.arms.iter().find(|a| a.arm.label == label)
    }
}

/// The post-copy-capability overhead: capability on (never switched) minus off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverheadResult {
    /// Scenario it was measured in.
    pub scenario: String,
    /// The policy whose plan was run with the capability on and off.
    #[serde(default)]
    pub policy: String,
    /// Capabilities enabled with post-copy permitted (first such run).
    #[serde(default)]
    pub capabilities_on: Vec<String>,
    /// Capabilities enabled with post-copy forbidden (first such run).
    #[serde(default)]
    pub capabilities_off: Vec<String>,
    /// Pairs (on, off) that both completed in pre-copy.
    pub pairs: usize,
    /// Runs with the capability on that switched anyway (excluded).
    pub switched: usize,
    /// On − off total time (s), per pair: median and spread.
    pub total_time_delta_s: Option<Spread>,
    /// (on − off) ÷ off total time, percent.
    pub total_time_delta_pct: Option<Spread>,
    /// On − off bytes sent (MiB).
    pub bytes_delta_mib: Option<Spread>,
    /// (on − off) ÷ off bytes, percent.
    pub bytes_delta_pct: Option<Spread>,
    /// On − off blackout (ms).
    pub blackout_delta_ms: Option<Spread>,
    /// Medians of each side for context: (on, off).
    pub total_time_s: (Option<Spread>, Option<Spread>),
    /// Bytes ÷ RAM medians (on, off).
    pub bytes_vs_ram: (Option<Spread>, Option<Spread>),
    /// Blackout medians (on, off).
    pub blackout_ms: (Option<Spread>, Option<Spread>),
}

impl OverheadResult {
    /// Pairs the n-th "on" run with the n-th "off" run (they ran back to back, in both
    /// directions: the harness reverses the arm order on odd repeats) and takes
    /// differences; runs that switched to post-copy or did not complete are left out.
    pub fn of(s: &ScenarioResult) -> Vec<Self> {
        if !s.scenario.postcopy_overhead {
            return Vec::new();
        }
        let mut policies: Vec<&str> = s.scenario.arms.iter().map(|a| a.policy.as_str()).collect();
        policies.dedup();
        policies
            .into_iter()
            .map(|p| Self::of_policy(s, p))
            .collect()
    }

    fn of_policy(s: &ScenarioResult, policy: &str) -> Self {
        let ok = |r: &&RunRecord| r.metrics.outcome == OutcomeClass::Completed;
        let on: Vec<&RunRecord> = s
            .runs
            .iter()
            .filter(|r| r.policy == policy && r.post_copy)
            .collect();
        let off: Vec<&RunRecord> = s
            .runs
            .iter()
            .filter(|r| r.policy == policy && !r.post_copy)
            .collect();
        let switched = on
            .iter()
            .filter(|r| r.metrics.outcome == OutcomeClass::PostCopy)
            .count();
        let pairs: Vec<(&RunRecord, &RunRecord)> = on
            .iter()
            .zip(off.iter())
            .filter(|(a, b)| ok(a) && ok(b))
            .map(|(a, b)| (*a, *b))
            .collect();
        let d = |f: fn(&RunMetrics) -> Option<f64>| {
            Spread::of(
                pairs
                    .iter()
                    .map(|(a, b)| Some(f(&a.metrics)? - f(&b.metrics)?)),
            )
        };
        let pct = |f: fn(&RunMetrics) -> Option<f64>| {
            Spread::of(pairs.iter().map(|(a, b)| {
                let (x, y) = (f(&a.metrics)?, f(&b.metrics)?);
                (y > 0.0).then(|| (x - y) / y * 100.0)
            }))
        };
        let side = |rs: &[&RunRecord], f: fn(&RunMetrics) -> Option<f64>| {
            Spread::of(rs.iter().filter(|r| ok(r)).map(|r| f(&r.metrics)))
        };
        Self {
            scenario: s.scenario.name.clone(),
            policy: policy.to_string(),
            capabilities_on: on
                .first()
                .map(|r| r.metrics.capabilities.clone())
                .unwrap_or_default(),
            capabilities_off: off
                .first()
                .map(|r| r.metrics.capabilities.clone())
                .unwrap_or_default(),
            pairs: pairs.len(),
            switched,
            total_time_delta_s: d(|m| Some(m.total_time_s)),
            total_time_delta_pct: pct(|m| Some(m.total_time_s)),
            bytes_delta_mib: d(|m| Some(m.bytes_sent as f64 / 1048576.0)),
            bytes_delta_pct: pct(|m| Some(m.bytes_sent as f64)),
            blackout_delta_ms: d(|m| m.blackout_ms),
            total_time_s: (
                side(&on, |m| Some(m.total_time_s)),
                side(&off, |m| Some(m.total_time_s)),
            ),
            bytes_vs_ram: (
                side(&on, |m| Some(m.bytes_vs_ram)),
                side(&off, |m| Some(m.bytes_vs_ram)),
            ),
            blackout_ms: (side(&on, |m| m.blackout_ms), side(&off, |m| m.blackout_ms)),
        }
    }
}

/// A whole benchmark run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// [`RESULT_FORMAT`].
    pub format: u32,
    /// Set name.
    pub set: String,
    /// Set description.
    pub description: String,
    /// UTC start, RFC 3339.
    pub started_utc: String,
    /// Wall time of the whole run (s).
    pub wall_s: f64,
    /// Where it ran.
    pub machine: Machine,
    /// `git describe --always --dirty` of the tree, when known.
    pub git: Option<String>,
    /// Per scenario.
    pub scenarios: Vec<ScenarioResult>,
    /// The post-copy-capability overhead, per overhead scenario.
    pub overhead: Vec<OverheadResult>,
    /// The scenario during which the run was interrupted (Ctrl-C), if it was.
    #[serde(default)]
    pub interrupted_at: Option<String>,
    /// Whether every migration stream was TLS (`tern bench run --tls`).
    #[serde(default)]
    pub migration_tls: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_min_max_of_present_values() {
        let s = Spread::of([Some(3.0), None, Some(1.0), Some(2.0)]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of([Some(1.0), Some(4.0)]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of([None, Some(f64::NAN)]).is_none());
    }
}
