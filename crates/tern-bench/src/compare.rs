//! `tern bench compare OLD.json NEW.json`: per scenario and policy, which medians got worse.
//!
//! A change counts as a regression only when it is larger than the tolerance *and* outside the
//! old run's spread (min–max): TCG guests on shared cores vary by tens of percent run to run,
//! and a comparison that cried wolf at every run would be ignored.

use std::fmt::Write as _;

use crate::results::{ArmSummary, BenchResult, Spread};

/// Blackout changes smaller than this are not reported (heartbeats come every 10 ms and a TCG
/// vCPU on shared cores jitters by tens of ms).
pub const BLACKOUT_FLOOR_MS: f64 = 50.0;

/// One compared metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Scenario name.
    pub scenario: String,
    /// Arm label.
    pub arm: String,
    /// Metric name.
    pub metric: &'static str,
    /// Old value (median, or rate).
    pub old: f64,
    /// New value.
    pub new: f64,
    /// Worse beyond tolerance and spread.
    pub regression: bool,
    /// Better beyond tolerance and spread.
    pub improvement: bool,
}

/// The comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Every compared metric.
    pub changes: Vec<Change>,
    /// Notes (different machine, missing scenarios).
    pub notes: Vec<String>,
}

impl Comparison {
    /// Regressions only.
    pub fn regressions(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.regression)
    }
}

fn judge_lower_is_better(
    old: Option<Spread>,
    new: Option<Spread>,
    tol: f64,
) -> Option<(f64, f64, bool, bool)> {
    let (o, n) = (old?, new?);
    let worse = n.median > o.median * (1.0 + tol) && n.median > o.max;
    let better = n.median < o.median * (1.0 - tol) && n.median < o.min;
    Some((o.median, n.median, worse, better))
}

fn arrival_rate(a: &ArmSummary) -> f64 {
    if a.runs == 0 {
        0.0
    } else {
        a.arrived() as f64 / a.runs as f64
    }
}

/// Compares two results with a relative tolerance (0.2 = 20 %).
pub fn compare(old: &BenchResult, new: &BenchResult, tol: f64) -> Comparison {
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    if old.machine.accelerator != new.machine.accelerator
        || old.machine.qemu_version != new.machine.qemu_version
    {
        notes.push(format!(
            "different platform: old {} / QEMU {}, new {} / QEMU {}: times are not comparable, only ratios and outcomes",
            old.machine.accelerator,
            old.machine.qemu_version,
            new.machine.accelerator,
            new.machine.qemu_version
        ));
    }
    for ns in &new.scenarios {
        let Some(os) = old
            .scenarios
            .iter()
            .find(|s| s.scenario.name == ns.scenario.name)
        else {
            notes.push(format!("scenario {} is new", ns.scenario.name));
            continue;
        };
        let (a, b) = (&os.scenario, &ns.scenario);
        if (
            a.memory_mib,
            a.working_set_mib,
            a.dirty_pages_per_s,
            a.pattern,
            a.link,
            a.context,
            a.time_cap_s,
        ) != (
            b.memory_mib,
            b.working_set_mib,
            b.dirty_pages_per_s,
            b.pattern,
            b.link,
            b.context,
            b.time_cap_s,
        ) {
            notes.push(format!(
                "scenario {} is defined differently in the two results (guest, link, context or cap): compare with care",
                b.name
            ));
        }
        for na in &ns.arms {
            let Some(oa) = os.arm(&na.arm.label) else {
                notes.push(format!("{}: {} is new", ns.scenario.name, na.arm.label));
                continue;
            };
            let mut push = |metric: &'static str, v: Option<(f64, f64, bool, bool)>| {
                if let Some((old, new, regression, improvement)) = v {
                    changes.push(Change {
                        scenario: ns.scenario.name.clone(),
                        arm: na.arm.label.clone(),
                        metric,
                        old,
                        new,
                        regression,
                        improvement,
                    });
                }
            };
            let (ro, rn) = (arrival_rate(oa), arrival_rate(na));
            push("arrived", Some((ro, rn, rn < ro, rn > ro)));
            let (io, inew) = (oa.integrity_failures as f64, na.integrity_failures as f64);
            push("integrity failures", Some((io, inew, inew > io, inew < io)));
            push(
                "total time s",
                judge_lower_is_better(oa.total_time_s, na.total_time_s, tol),
            );
            push(
                "× bound",
                judge_lower_is_better(oa.time_vs_bound, na.time_vs_bound, tol),
            );
            // Blackout only means something when the guest moved (a timed-out run's largest
            // heartbeat gap is scheduling noise), and tens of ms are within TCG's jitter.
            if oa.arrived() == oa.runs && na.arrived() == na.runs {
                push(
                    "blackout ms",
                    judge_lower_is_better(oa.blackout_ms, na.blackout_ms, tol).map(
                        |(o, n, worse, better)| {
                            let big = (n - o).abs() > BLACKOUT_FLOOR_MS;
                            (o, n, worse && big, better && big)
                        },
                    ),
                );
            }
            push(
                "bytes ÷ RAM",
                judge_lower_is_better(oa.bytes_vs_ram, na.bytes_vs_ram, tol),
            );
        }
    }
    for os in &old.scenarios {
        if !new
            .scenarios
            .iter()
            .any(|s| s.scenario.name == os.scenario.name)
        {
            notes.push(format!(
                "scenario {} is missing from the new result",
                os.scenario.name
            ));
        }
    }
    Comparison { changes, notes }
}

/// Text form: regressions, improvements, notes.
pub fn render(c: &Comparison) -> String {
    let mut out = String::new();
    for n in &c.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let row = |out: &mut String, x: &Change, tag: &str| {
        let rel = if x.old.abs() > 1e-12 {
            format!("{:+.0} %", (x.new / x.old - 1.0) * 100.0)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{tag:<11} {:<20} {:<32} {:<20} {:>10.3} → {:<10.3} {rel}",
            x.scenario, x.arm, x.metric, x.old, x.new
        );
    };
    let regs: Vec<&Change> = c.regressions().collect();
    let imps: Vec<&Change> = c.changes.iter().filter(|x| x.improvement).collect();
    for x in &regs {
        row(&mut out, x, "REGRESSION");
    }
    for x in &imps {
        row(&mut out, x, "improved");
    }
    let _ = writeln!(
        out,
        "{} metrics compared: {} regressions, {} improvements, {} unchanged (within tolerance or spread)",
        c.changes.len(),
        regs.len(),
        imps.len(),
        c.changes.len() - regs.len() - imps.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worse_counts_only_beyond_tolerance_and_spread() {
        let s = |m, lo, hi| {
            Some(Spread {
                median: m,
                min: lo,
                max: hi,
                n: 3,
            })
        };
        // 50 % worse and above the old max: regression.
        assert_eq!(
            judge_lower_is_better(s(2.0, 1.8, 2.2), s(3.0, 2.9, 3.1), 0.2),
            Some((2.0, 3.0, true, false))
        );
        // 30 % worse but inside the old spread: not a regression.
        assert_eq!(
            judge_lower_is_better(s(2.0, 1.0, 3.0), s(2.6, 2.5, 2.7), 0.2).map(|v| v.2),
            Some(false)
        );
        // 10 % worse: within tolerance.
        assert_eq!(
            judge_lower_is_better(s(2.0, 2.0, 2.0), s(2.2, 2.2, 2.2), 0.2).map(|v| v.2),
            Some(false)
        );
        // Better beyond both: improvement.
        assert_eq!(
            judge_lower_is_better(s(2.0, 1.9, 2.1), s(1.0, 1.0, 1.0), 0.2).map(|v| v.3),
            Some(true)
        );
        assert_eq!(judge_lower_is_better(None, s(1.0, 1.0, 1.0), 0.2), None);
    }
}
