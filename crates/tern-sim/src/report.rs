//! Aggregation of outcomes per (policy, context) and the tern-vs-baseline comparison.

use std::cmp::Ordering;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tern_policy::MigrationContext;

use crate::engine::{SimOutcome, SimResult};

/// One row of the comparison: a policy in a context over the same scenarios as every other row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonRecord {
    /// Policy name.
    pub policy: String,
    /// Context.
    pub context: MigrationContext,
    /// Scenarios run.
    pub scenarios: usize,
    /// Share that completed (guest on the destination), %.
    pub completed_pct: f64,
    /// Median total time of completed runs, s.
    pub median_total_s: Option<f64>,
    /// 95th percentile total time of completed runs, s.
    pub p95_total_s: Option<f64>,
    /// Median blackout of completed runs, ms.
    pub median_downtime_ms: Option<f64>,
    /// 95th percentile blackout of completed runs, ms.
    pub p95_downtime_ms: Option<f64>,
    /// Runs that broke the SLA or the context's requirement.
    pub sla_violations: usize,
    /// Median of bytes sent ÷ RAM.
    pub median_bytes_over_ram: f64,
    /// Aborted runs.
    pub aborted: usize,
    /// Runs still in pre-copy at the horizon.
    pub timed_out: usize,
    /// Runs whose VM was lost in post-copy.
    pub vm_lost: usize,
    /// Runs that used post-copy.
    pub used_postcopy: usize,
    /// Mean time throttled, s.
    pub mean_throttled_s: f64,
    /// Mean time in post-copy, s.
    pub mean_postcopy_s: f64,
    /// For a baseline: scenarios where tern's outcome was better / worse / equivalent.
    pub tern_better: Option<usize>,
    /// See `tern_better`.
    pub tern_worse: Option<usize>,
    /// See `tern_better`.
    pub tern_same: Option<usize>,
    /// For a baseline: scenarios where each won an axis ([`Verdict::TradeOff`]).
    #[serde(default)]
    pub tern_tradeoff: Option<usize>,
    /// For a baseline: scenarios where tern impaired the guest less / more (see [`guest_impact_ms`]).
    pub tern_less_impact: Option<usize>,
    /// See `tern_less_impact`.
    pub tern_more_impact: Option<usize>,
}

/// Guest impairment of a run, ms: blackout + time in post-copy + time throttled × the highest
/// throttle. Crude, but it puts a 2 s blackout, 2 s of post-copy faults and 4 s at 50 % throttle
/// on one scale.
pub fn guest_impact_ms(o: &SimOutcome) -> f64 {
    o.downtime_ms.unwrap_or(0) as f64
        + o.postcopy_ms as f64
        + o.throttled_ms as f64 * f64::from(o.max_throttle_pct) / 100.0
}

/// Compares guest impact (`Less` = tern impaired the guest less), with a 10 % + 50 ms tolerance.
pub fn compare_impact(tern: &SimOutcome, other: &SimOutcome) -> Ordering {
    let (a, b) = (guest_impact_ms(tern), guest_impact_ms(other));
    if a + 50.0 < b * 0.9 {
        Ordering::Less
    } else if b + 50.0 < a * 0.9 {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[idx.min(sorted.len() - 1)])
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(Ordering::Equal));
    v
}

/// Outcome class for pairwise comparison, lower is better:
/// 0 completed within SLA; 1 aborted an optional move (balance/manual) within SLA;
/// 2 completed but broke the SLA; 3 failed a required move, timed out, or lost the VM.
fn class(o: &SimOutcome) -> u8 {
    match (o.result, o.sla_violation.is_some()) {
        (SimResult::Completed, false) => 0,
        (SimResult::Aborted, false) => 1,
        (SimResult::Completed, true) => 2,
        (SimResult::TimedOut, false) => 1,
        _ => 3,
    }
}

/// Noise band of total time: 10 % plus one poll tick (500 ms, the resolution at which every
/// policy observes the migration; a policy that acts one tick later is not slower in any sense
/// an operator could see).
const TIME_NOISE_SHARE: f64 = 0.10;
/// See [`TIME_NOISE_SHARE`], ms.
const TIME_NOISE_MS: f64 = 500.0;
/// Noise band of the blackout: 10 % plus 20 ms (QEMU's own switchover jitter is tens of ms).
const BLACKOUT_NOISE_SHARE: f64 = 0.10;
/// See [`BLACKOUT_NOISE_SHARE`], ms.
const BLACKOUT_NOISE_MS: f64 = 20.0;
/// Noise band of degraded running (post-copy time plus throttle-weighted time): 10 % plus one
/// poll tick.
const DEGRADED_NOISE_MS: f64 = 500.0;

/// Guest degradation short of a blackout, ms: time in post-copy (the guest runs, faulting on
/// missing pages) plus time throttled × the highest throttle.
pub fn degraded_ms(o: &SimOutcome) -> f64 {
    o.postcopy_ms as f64 + o.throttled_ms as f64 * f64::from(o.max_throttle_pct) / 100.0
}

/// `Less` when `a` is better than `b` beyond the noise band `share × max + abs`.
fn beyond_noise(a: f64, b: f64, share: f64, abs: f64) -> Ordering {
    let band = share * a.max(b) + abs;
    if a + band < b {
        Ordering::Less
    } else if b + band < a {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

/// How tern's outcome on one scenario stands against a baseline's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// tern is better: a better outcome class, or at least as good on every axis and better
    /// beyond noise on one.
    Better,
    /// tern is worse: the mirror of `Better`.
    Worse,
    /// Within noise on every axis.
    Same,
    /// Same outcome class, tern better on one axis and worse on another (e.g. slower with a
    /// smaller blackout): neither dominates; counted apart so it is visible, not hidden in `Same`.
    TradeOff,
}

/// The yardstick: how tern's outcome compares with a baseline's on the same scenario.
///
/// 1. **Outcome class** first ([`class`]: completed within the SLA < aborted an optional move or
///    still trying < completed but broke the SLA < failed a required move or lost the VM).
/// 2. Same class, both completed: three axes, each with a noise band: **total time** (10 % +
///    one 500 ms poll tick), **blackout** (10 % + 20 ms), **degraded running** (post-copy time +
///    throttled time × throttle, 10 % + 500 ms). tern is worse when it is worse beyond noise on
///    at least one axis and not better beyond noise on any (the baseline dominates); better in
///    the mirror case; a [`Verdict::TradeOff`] when each wins an axis.
/// 3. Same class, not both completed (both aborted, both lost): the same.
pub fn verdict(tern: &SimOutcome, other: &SimOutcome) -> Verdict {
    let (a, b) = (class(tern), class(other));
    if a != b {
        return if a < b {
            Verdict::Better
        } else {
            Verdict::Worse
        };
    }
    if !(tern.completed() && other.completed()) {
        return Verdict::Same;
    }
    let axes = [
        beyond_noise(
            tern.total_ms as f64,
            other.total_ms as f64,
            TIME_NOISE_SHARE,
            TIME_NOISE_MS,
        ),
        beyond_noise(
            tern.downtime_ms.unwrap_or(0) as f64,
            other.downtime_ms.unwrap_or(0) as f64,
            BLACKOUT_NOISE_SHARE,
            BLACKOUT_NOISE_MS,
        ),
        beyond_noise(
            degraded_ms(tern),
            degraded_ms(other),
            TIME_NOISE_SHARE,
            DEGRADED_NOISE_MS,
        ),
    ];
    let better = axes.contains(&Ordering::Less);
    let worse = axes.contains(&Ordering::Greater);
    match (better, worse) {
        (true, false) => Verdict::Better,
        (false, true) => Verdict::Worse,
        (true, true) => Verdict::TradeOff,
        (false, false) => Verdict::Same,
    }
}

/// [`verdict`] as an ordering (`Less` = tern better); a trade-off is `Equal`.
pub fn compare_outcomes(tern: &SimOutcome, other: &SimOutcome) -> Ordering {
    match verdict(tern, other) {
        Verdict::Better => Ordering::Less,
        Verdict::Worse => Ordering::Greater,
        Verdict::Same | Verdict::TradeOff => Ordering::Equal,
    }
}

/// Builds one record per (policy, context). `outcomes[p][s]` is policy `p` on scenario `s`;
/// `policies[0]` is compared against the others when it is `tern`.
pub fn aggregate(policies: &[String], outcomes: &[Vec<SimOutcome>]) -> Vec<ComparisonRecord> {
    let tern_idx = policies.iter().position(|p| p == "tern");
    let mut records = vec![];
    for (pi, name) in policies.iter().enumerate() {
        for ctx in MigrationContext::ALL {
            let rows: Vec<(usize, &SimOutcome)> = outcomes[pi]
                .iter()
                .enumerate()
                .filter(|(_, o)| o.context == ctx)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let completed: Vec<&SimOutcome> =
                rows.iter().map(|r| r.1).filter(|o| o.completed()).collect();
            let totals = sorted(
                completed
                    .iter()
                    .map(|o| o.total_ms as f64 / 1000.0)
                    .collect(),
            );
            let downs = sorted(
                completed
                    .iter()
                    .filter_map(|o| o.downtime_ms.map(|d| d as f64))
                    .collect(),
            );
            let bytes = sorted(
                rows.iter()
                    .map(|(_, o)| o.bytes_sent as f64 / o.ram_bytes.max(1) as f64)
                    .collect(),
            );
            let count = |f: &dyn Fn(&SimOutcome) -> bool| rows.iter().filter(|(_, o)| f(o)).count();
            let (mut better, mut worse, mut same, mut tradeoff) = (None, None, None, None);
            let (mut less, mut more) = (None, None);
            if let Some(ti) = tern_idx.filter(|&ti| ti != pi) {
                let (mut b, mut w, mut s, mut t, mut l, mut m) = (0, 0, 0, 0, 0, 0);
                for (si, o) in &rows {
                    match verdict(&outcomes[ti][*si], o) {
                        Verdict::Better => b += 1,
                        Verdict::Worse => w += 1,
                        Verdict::Same => s += 1,
                        Verdict::TradeOff => t += 1,
                    }
                    match compare_impact(&outcomes[ti][*si], o) {
                        Ordering::Less => l += 1,
                        Ordering::Greater => m += 1,
                        Ordering::Equal => {}
                    }
                }
                (better, worse, same, tradeoff) = (Some(b), Some(w), Some(s), Some(t));
                (less, more) = (Some(l), Some(m));
            }
            let round = |v: f64, d: i32| (v * 10f64.powi(d)).round() / 10f64.powi(d);
            records.push(ComparisonRecord {
                policy: name.clone(),
                context: ctx,
                scenarios: n,
                completed_pct: round(completed.len() as f64 * 100.0 / n as f64, 1),
                median_total_s: percentile(&totals, 0.5).map(|v| round(v, 1)),
                p95_total_s: percentile(&totals, 0.95).map(|v| round(v, 1)),
                median_downtime_ms: percentile(&downs, 0.5).map(|v| round(v, 0)),
                p95_downtime_ms: percentile(&downs, 0.95).map(|v| round(v, 0)),
                sla_violations: count(&|o| o.sla_violation.is_some()),
                median_bytes_over_ram: round(percentile(&bytes, 0.5).unwrap_or(0.0), 2),
                aborted: count(&|o| o.result == SimResult::Aborted),
                timed_out: count(&|o| o.result == SimResult::TimedOut),
                vm_lost: count(&|o| o.result == SimResult::VmLost),
                used_postcopy: count(&|o| o.used_postcopy),
                mean_throttled_s: round(
                    rows.iter().map(|(_, o)| o.throttled_ms as f64).sum::<f64>()
                        / n as f64
                        / 1000.0,
                    1,
                ),
                mean_postcopy_s: round(
                    rows.iter().map(|(_, o)| o.postcopy_ms as f64).sum::<f64>() / n as f64 / 1000.0,
                    1,
                ),
                tern_better: better,
                tern_worse: worse,
                tern_same: same,
                tern_tradeoff: tradeoff,
                tern_less_impact: less,
                tern_more_impact: more,
            });
        }
    }
    records
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v}"))
}

const HEADER: [&str; 16] = [
    "policy",
    "done%",
    "med_s",
    "p95_s",
    "med_dt",
    "p95_dt",
    "viol",
    "B/RAM",
    "abrt",
    "tmout",
    "lost",
    "pcopy",
    "thr_s",
    "pc_s",
    "tern b/w/t/s",
    "impact -/+",
];

/// The human-readable table.
pub fn table(records: &[ComparisonRecord], scenarios: usize, seed: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "tern sim: {scenarios} scenarios, seed {seed} (same scenarios for every policy)"
    );
    for ctx in MigrationContext::ALL {
        let rows: Vec<&ComparisonRecord> = records.iter().filter(|r| r.context == ctx).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n== {ctx} ({} scenarios) ==", rows[0].scenarios);
        let h = HEADER;
        let _ = writeln!(
            s,
            "{:<31} {:>6} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6} {:>5} {:>5} {:>4} {:>5} {:>7} {:>7}  {:<15} {}",
            h[0],
            h[1],
            h[2],
            h[3],
            h[4],
            h[5],
            h[6],
            h[7],
            h[8],
            h[9],
            h[10],
            h[11],
            h[12],
            h[13],
            h[14],
            h[15]
        );
        for r in rows {
            let vs = match (r.tern_better, r.tern_worse, r.tern_same) {
                (Some(b), Some(w), Some(sm)) => {
                    format!("{b}/{w}/{}/{sm}", r.tern_tradeoff.unwrap_or(0))
                }
                _ => "-".into(),
            };
            let impact = match (r.tern_less_impact, r.tern_more_impact) {
                (Some(l), Some(m)) => format!("{l}/{m}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "{:<31} {:>6.1} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6.2} {:>5} {:>5} {:>4} {:>5} {:>7.1} {:>7.1}  {:<15} {}",
                r.policy,
                r.completed_pct,
                opt(r.median_total_s),
                opt(r.p95_total_s),
                opt(r.median_downtime_ms),
                opt(r.p95_downtime_ms),
                r.sla_violations,
                r.median_bytes_over_ram,
                r.aborted,
                r.timed_out,
                r.vm_lost,
                r.used_postcopy,
                r.mean_throttled_s,
                r.mean_postcopy_s,
                vs,
                impact
            );
        }
    }
    let _ = writeln!(
        s,
        "\ncolumns: done% completed; med_s/p95_s total time of completed runs; med_dt/p95_dt blackout ms; viol SLA or \
         context violations; B/RAM median bytes sent / RAM; abrt aborted; tmout still in pre-copy after the horizon; \
         lost VM lost in post-copy; pcopy runs using post-copy; thr_s/pc_s mean s throttled / in post-copy; \
         b/w/t/s: scenarios where tern's outcome is better/worse/a trade-off/the same as this policy's (outcome \
         class: ok < optional abort < SLA broken < failed; same class: worse = the baseline is at least as good on \
         total time (±10 % + 0.5 s), blackout (±10 % + 20 ms) and degraded running (post-copy + throttle, ±10 % + \
         0.5 s) and better on one; trade-off = each wins an axis); impact -/+: scenarios where tern impaired \
         the guest less/more (blackout + post-copy time + throttled time × throttle)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(result: SimResult, total_ms: u64, violation: bool) -> SimOutcome {
        SimOutcome {
            scenario_id: 0,
            policy: "x".into(),
            context: MigrationContext::Balance,
            result,
            total_ms,
            downtime_ms: Some(100),
            bytes_sent: 0,
            ram_bytes: 1,
            throttled_ms: 0,
            max_throttle_pct: 0,
            postcopy_ms: 0,
            passes: 1,
            retries: 0,
            used_postcopy: false,
            paused: false,
            actions: 0,
            sla_violation: violation.then(|| "v".into()),
            eta_error_from_25pct: None,
        }
    }

    #[test]
    fn ordering_prefers_clean_completion_then_speed() {
        use Ordering::*;
        let ok = o(SimResult::Completed, 10_000, false);
        let slow = o(SimResult::Completed, 20_000, false);
        let broke = o(SimResult::Completed, 5_000, true);
        let abort = o(SimResult::Aborted, 5_000, false);
        let lost = o(SimResult::VmLost, 5_000, true);
        assert_eq!(compare_outcomes(&ok, &slow), Less);
        assert_eq!(compare_outcomes(&slow, &ok), Greater);
        assert_eq!(compare_outcomes(&ok, &broke), Less);
        assert_eq!(compare_outcomes(&abort, &broke), Less);
        assert_eq!(compare_outcomes(&broke, &lost), Less);
        assert_eq!(compare_outcomes(&lost, &ok), Greater);
        assert_eq!(
            compare_outcomes(&ok, &o(SimResult::Completed, 10_500, false)),
            Equal
        );
    }

    #[test]
    fn percentiles() {
        let v = sorted(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(percentile(&v, 0.5), Some(3.0));
        assert_eq!(percentile(&v, 0.95), Some(5.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
