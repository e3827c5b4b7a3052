//! Per-run metrics, computed from what a session hop recorded (engine events, live progress,
//! host-timestamped serial logs). Pure functions: they are unit-tested on synthetic records.

use serde::{Deserialize, Serialize};
use tern_engine::{MigrationEventKind, MigrationProgress, MigrationState};
use tern_guest::{GuestLine, HostSerialLog, LineKind, parse_guest_line};
use tern_scenario::HopRecord;
use tern_scenario::faults::FaultRecord;

/// How a run ended, in the benchmark's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeClass {
    /// Completed in pre-copy (possibly with the guest paused at the end).
    Completed,
    /// Completed after switching to post-copy.
    PostCopy,
    /// Completed after a post-copy pause and recovery.
    Recovered,
    /// The policy (or QEMU) gave up; the guest stays on the source.
    Aborted,
    /// The run hit the benchmark's hard cap and was aborted by the harness: the policy
    /// would not have finished on its own.
    Timeout,
    /// The migration failed before the switch (guest on the source).
    Failed,
    /// The guest is gone.
    Lost,
    /// The harness could not run the hop at all.
    Error,
}

impl OutcomeClass {
    /// The label used in tables.
    pub fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::PostCopy => "post-copy",
            Self::Recovered => "recovered",
            Self::Aborted => "aborted",
            Self::Timeout => "timeout",
            Self::Failed => "failed",
            Self::Lost => "lost",
            Self::Error => "error",
        }
    }

    /// The guest arrived on the destination.
    pub fn arrived(self) -> bool {
        matches!(self, Self::Completed | Self::PostCopy | Self::Recovered)
    }
}

/// One point of the remaining-bytes series (for plots and ETA error).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Milliseconds since `migrate`.
    pub t_ms: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Bytes sent so far.
    pub transferred: u64,
    /// The engine's ETA at that time (ms), when it had one.
    pub eta_ms: Option<u64>,
}

/// Everything the benchmark reports about one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetrics {
    /// How it ended.
    pub outcome: OutcomeClass,
    /// Seconds from `migrate` to the terminal state.
    pub total_time_s: f64,
    /// `total_time_s` ÷ the physical bound RAM / link rate.
    pub time_vs_bound: f64,
    /// Seconds from the first stalled pass (remaining stopped shrinking) to the policy's first
    /// action after it; `None` when nothing stalled or the policy never acted.
    pub decision_time_s: Option<f64>,
    /// Seconds since `migrate` at which pre-copy first stalled.
    pub stall_at_s: Option<f64>,
    /// Blackout: the largest gap between consecutive heartbeats as timestamped on the host,
    /// over the whole run and the settle time after it (source during the migration, the
    /// switchover, destination afterwards), in ms. Throttling and post-copy faults count too.
    pub blackout_ms: Option<f64>,
    /// The gap across the switchover alone (source's last heartbeat → destination's first), ms.
    pub switchover_gap_ms: Option<f64>,
    /// Largest heartbeat gap on the destination after the switch (ms): post-copy fault stalls.
    pub max_dest_gap_ms: Option<f64>,
    /// Bytes sent ÷ guest RAM.
    pub bytes_vs_ram: f64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Seconds spent in post-copy (`None` when never switched).
    pub postcopy_s: Option<f64>,
    /// The guest's page writes/s in the 2.5 s before `migrate` (mean of its `STATUS wps=` lines).
    pub wps_before: Option<f64>,
    /// The guest's page writes/s while in post-copy (mean of the `STATUS` lines that cover it).
    pub wps_postcopy: Option<f64>,
    /// The guest's page writes/s during pre-copy (throttling shows here).
    pub wps_precopy: Option<f64>,
    /// Measured ρ: `wps_before` × 4 KiB ÷ link bytes/s.
    pub rho_measured: Option<f64>,
    /// ETA error at 25 / 50 / 75 % of the run, in percent of the real total time (positive:
    /// predicted later than it happened).
    pub eta_error_pct: [Option<f64>; 3],
    /// Completed passes.
    pub passes: u64,
    /// Guest integrity held (no corrupt page, no control mismatch, continuous heartbeats).
    pub integrity_ok: bool,
    /// Actions the policy took, `<at>s <action>: <reason>` (the harness's aborts excluded).
    pub actions: Vec<String>,
    /// Capabilities enabled.
    pub capabilities: Vec<String>,
    /// Engine error text, if any.
    pub error: Option<String>,
    /// Faults injected in this run, with detection and recovery times (empty without
    /// faults).
    #[serde(default)]
    pub faults: Vec<FaultRecord>,
    /// Post-copy recoveries the engine performed.
    #[serde(default)]
    pub recoveries: u32,
    /// CPU seconds the source QEMU spent outside its vCPUs during the run (the migration's
    /// own cost: stream, TLS, dirty tracking).
    #[serde(default)]
    pub source_cpu_s: Option<f64>,
    /// The same on the destination.
    #[serde(default)]
    pub destination_cpu_s: Option<f64>,
}

impl RunMetrics {
    /// The slowest detection of a cut (cut → migration seen paused), ms.
    pub fn fault_detection_ms(&self) -> Option<u64> {
        self.faults.iter().filter_map(|f| f.detected_after_ms).max()
    }

    /// The slowest recovery (link restored → post-copy running again), ms.
    pub fn fault_resume_ms(&self) -> Option<u64> {
        self.faults
            .iter()
            .filter_map(|f| f.resumed_after_restore_ms)
            .max()
    }
}

/// The outcome class of a hop.
pub fn outcome_class(hop: &HopRecord) -> OutcomeClass {
    let s = &hop.summary;
    match s.outcome.as_str() {
        "lost" => OutcomeClass::Lost,
        "completed" => {
            let recovered = s.events.iter().any(|e| {
                matches!(&e.kind, MigrationEventKind::State { to, .. } if *to == MigrationState::Recovering)
            });
            if recovered {
                OutcomeClass::Recovered
            } else if s.switched_to_postcopy {
                OutcomeClass::PostCopy
            } else {
                OutcomeClass::Completed
            }
        }
        _ if hop.timed_out => OutcomeClass::Timeout,
        "aborted" => OutcomeClass::Aborted,
        _ => OutcomeClass::Failed,
    }
}

/// `(at_ms, remaining)` of every completed pass, from the engine's events.
fn passes(hop: &HopRecord) -> Vec<(u64, u64)> {
    hop.summary
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            MigrationEventKind::Pass {
                remaining_bytes, ..
            } => Some((e.at_ms, *remaining_bytes)),
            _ => None,
        })
        .collect()
}

/// The first pass at which `remaining` stopped shrinking (≥ the previous pass's). Two pass
/// boundaries less than 100 ms apart are QEMU's final synchronisations of a converging run,
/// not a stall, and are skipped.
pub fn stall_at_ms(pass_remaining: &[(u64, u64)]) -> Option<u64> {
    pass_remaining
        .windows(2)
        .find(|w| w[1].1 >= w[0].1 && w[1].0 >= w[0].0 + 100)
        .map(|w| w[1].0)
}

fn policy_actions(hop: &HopRecord) -> impl Iterator<Item = &tern_engine::TakenAction> {
    hop.summary
        .actions
        .iter()
        .filter(|a| !a.reason.starts_with("operator"))
}

/// STATUS lines of a log: (host ns, wps).
fn statuses(log: &HostSerialLog) -> Vec<(u64, u64)> {
    log.lines
        .iter()
        .filter(|l| l.kind == LineKind::Complete)
        .filter_map(|l| match parse_guest_line(&l.text) {
            GuestLine::Status(s) => Some((l.mono_ns, s.wps)),
            _ => None,
        })
        .collect()
}

/// Largest gap (ms) between consecutive complete heartbeat lines stamped in `[from_ns, to_ns]`.
pub fn max_heartbeat_gap_ms(log: &HostSerialLog, from_ns: u64, to_ns: u64) -> Option<f64> {
    let beats: Vec<u64> = log
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::Complete && l.mono_ns >= from_ns && l.mono_ns <= to_ns)
        .filter(|l| matches!(parse_guest_line(&l.text), GuestLine::Heartbeat { .. }))
        .map(|l| l.mono_ns)
        .collect();
    beats
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]) as f64 / 1e6)
        .reduce(f64::max)
}

/// Mean `wps` of the STATUS lines stamped in `(from_ns, to_ns]`.
pub fn mean_wps(log: &HostSerialLog, from_ns: u64, to_ns: u64) -> Option<f64> {
    let v: Vec<f64> = statuses(log)
        .into_iter()
        .filter(|(ns, _)| *ns > from_ns && *ns <= to_ns)
        .map(|(_, w)| w as f64)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// ETA error (percent of the real total) at fractions 25/50/75 % of the run: the last
/// progress sample at or before `p·T` predicts completion at `t + eta`.
pub fn eta_errors(series: &[SeriesPoint], total_ms: u64) -> [Option<f64>; 3] {
    let mut out = [None; 3];
    if total_ms == 0 {
        return out;
    }
    for (i, p) in [0.25, 0.5, 0.75].iter().enumerate() {
        let t = (total_ms as f64 * p) as u64;
        out[i] = series
            .iter()
            .rev()
            .find(|s| s.t_ms <= t && s.t_ms > 0)
            .and_then(|s| {
                s.eta_ms.map(|eta| {
                    (s.t_ms as f64 + eta as f64 - total_ms as f64) / total_ms as f64 * 100.0
                })
            });
    }
    out
}

/// The remaining-bytes series of a run, downsampled to at most `max_points`.
pub fn series_of(progress: &[MigrationProgress], max_points: usize) -> Vec<SeriesPoint> {
    let all: Vec<SeriesPoint> = progress
        .iter()
        .filter(|p| p.total_bytes > 0)
        .map(|p| SeriesPoint {
            t_ms: p.elapsed_ms,
            remaining: p.remaining_bytes,
            transferred: p.transferred_bytes,
            eta_ms: p.eta_ms,
        })
        .collect();
    if all.len() <= max_points || max_points < 2 {
        return all;
    }
    let step = all.len() as f64 / max_points as f64;
    let mut out: Vec<SeriesPoint> = (0..max_points)
        .map(|i| all[(i as f64 * step) as usize])
        .collect();
    if let (Some(last), Some(end)) = (out.last_mut(), all.last()) {
        *last = *end;
    }
    out
}

/// Computes a run's metrics. `link_bytes_per_s` and `ram_bytes` define the physical bound.
pub fn compute(
    hop: &HopRecord,
    series: &[SeriesPoint],
    link_bytes_per_s: u64,
    ram_bytes: u64,
) -> RunMetrics {
    let s = &hop.summary;
    let outcome = outcome_class(hop);
    let total_ms = (s.total_time_s * 1000.0).round() as u64;
    let bound_s = ram_bytes as f64 / link_bytes_per_s.max(1) as f64;
    let stall = stall_at_ms(&passes(hop));
    let decision_time_s = stall.and_then(|st| {
        policy_actions(hop)
            .find(|a| a.at_ms >= st)
            .map(|a| (a.at_ms - st) as f64 / 1000.0)
    });
    let postcopy_at = s.events.iter().find_map(|e| match &e.kind {
        MigrationEventKind::State { to, .. } if *to == MigrationState::Postcopy => Some(e.at_ms),
        _ => None,
    });
    let start_ns = hop.mono_ns_at(0);
    // 2.5 s: long enough for two STATUS lines, short enough to stay clear of the previous
    // hop (the session settles a few seconds between hops; a post-copy arrival runs slowly
    // while its pages are still being faulted in).
    let wps_before = mean_wps(
        &hop.source_log,
        start_ns.saturating_sub(2_500_000_000),
        start_ns,
    );
    let precopy_end_ns = postcopy_at.map_or(hop.ended_mono_ns, |at| hop.mono_ns_at(at));
    // A STATUS line reports the second before it: those stamped ≥ 1 s after the start lie
    // wholly inside pre-copy.
    let wps_precopy = mean_wps(&hop.source_log, start_ns + 1_000_000_000, precopy_end_ns);
    let wps_postcopy = match (postcopy_at, &hop.destination_log) {
        (Some(at), Some(dst)) => {
            let from = hop.mono_ns_at(at);
            mean_wps(dst, from, hop.ended_mono_ns + 1_000_000_000)
        }
        _ => None,
    };
    let arrived = outcome.arrived();
    // After a cancel QEMU's final statistics (and the last progress value) can be empty; the
    // live series still has the largest values seen.
    let bytes_sent = hop
        .progress
        .iter()
        .map(|p| p.transferred_bytes)
        .fold(s.bytes_sent, u64::max);
    let passes = hop.progress.iter().map(|p| p.pass).fold(s.passes, u64::max);
    let source_gap = max_heartbeat_gap_ms(&hop.source_log, start_ns, hop.ended_mono_ns);
    let dest_gap = arrived.then_some(s.max_dest_gap_ms);
    let blackout_ms = [s.blackout_ms, source_gap, dest_gap]
        .into_iter()
        .flatten()
        .reduce(f64::max);
    RunMetrics {
        outcome,
        total_time_s: s.total_time_s,
        time_vs_bound: if bound_s > 0.0 {
            s.total_time_s / bound_s
        } else {
            0.0
        },
        decision_time_s,
        stall_at_s: stall.map(|m| m as f64 / 1000.0),
        blackout_ms,
        switchover_gap_ms: s.blackout_ms,
        max_dest_gap_ms: dest_gap,
        bytes_vs_ram: bytes_sent as f64 / ram_bytes.max(1) as f64,
        bytes_sent,
        faults: s.faults_injected.clone(),
        recoveries: s.recoveries,
        source_cpu_s: s.source_migration_cpu_s,
        destination_cpu_s: s.destination_migration_cpu_s,
        postcopy_s: postcopy_at.map(|at| total_ms.saturating_sub(at) as f64 / 1000.0),
        wps_before,
        wps_postcopy,
        wps_precopy,
        rho_measured: wps_before.map(|w| w * 4096.0 / link_bytes_per_s.max(1) as f64),
        eta_error_pct: if arrived {
            eta_errors(series, total_ms)
        } else {
            [None; 3]
        },
        passes,
        integrity_ok: s.integrity_ok(),
        actions: policy_actions(hop)
            .map(|a| format!("{:.1}s {}: {}", a.at_ms as f64 / 1000.0, a.action, a.reason))
            .collect(),
        capabilities: s.capabilities.clone(),
        error: s.error.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(t_ms: u64, remaining: u64, eta_ms: Option<u64>) -> SeriesPoint {
        SeriesPoint {
            t_ms,
            remaining,
            transferred: 0,
            eta_ms,
        }
    }

    #[test]
    fn stall_is_the_first_pass_that_did_not_shrink() {
        assert_eq!(
            stall_at_ms(&[(100, 50), (200, 30), (300, 31), (400, 10)]),
            Some(300)
        );
        assert_eq!(stall_at_ms(&[(100, 50), (200, 30), (300, 10)]), None);
        assert_eq!(stall_at_ms(&[(100, 50)]), None);
        assert_eq!(stall_at_ms(&[(100, 50), (200, 50)]), Some(200));
        assert_eq!(stall_at_ms(&[(100, 50), (150, 50)]), None);
    }

    #[test]
    fn eta_error_uses_the_last_sample_before_each_quarter() {
        // Total 4 s. At 1 s the ETA says 3 s more (exact), at 2 s it says 1 s more (25 % early),
        // at 3 s it has no ETA.
        let s = [
            pt(500, 10, Some(9_000)),
            pt(1000, 8, Some(3_000)),
            pt(2000, 4, Some(1_000)),
            pt(3000, 2, None),
        ];
        let e = eta_errors(&s, 4000);
        assert_eq!(e[0], Some(0.0));
        assert_eq!(e[1], Some(-25.0));
        assert_eq!(e[2], None);
        assert_eq!(eta_errors(&s, 0), [None; 3]);
    }

    #[test]
    fn mean_wps_takes_status_lines_in_the_window() {
        let log = HostSerialLog::parse(
            "1000 L STATUS seq=1 passes=0 writes=10 wps=100 corrupt=0 ctl_mismatch=0\n\
             2000 L STATUS seq=2 passes=0 writes=20 wps=300 corrupt=0 ctl_mismatch=0\n\
             2500 L HB 3 30\n\
             3000 L STATUS seq=3 passes=1 writes=30 wps=500 corrupt=0 ctl_mismatch=0\n",
        );
        assert_eq!(mean_wps(&log, 1000, 3000), Some(400.0));
        assert_eq!(mean_wps(&log, 0, 1000), Some(100.0));
        assert_eq!(mean_wps(&log, 3000, 9000), None);
    }

    #[test]
    fn heartbeat_gap_is_the_largest_in_the_window() {
        let log = HostSerialLog::parse(
            "10000000 L HB 1 10\n20000000 L HB 2 20\n270000000 L HB 3 30\n280000000 L HB 4 40\n900000000 L HB 5 50\n",
        );
        assert_eq!(max_heartbeat_gap_ms(&log, 0, 300_000_000), Some(250.0));
        assert_eq!(max_heartbeat_gap_ms(&log, 0, 1_000_000_000), Some(620.0));
        assert_eq!(max_heartbeat_gap_ms(&log, 0, 15_000_000), None);
    }

    #[test]
    fn series_downsampling_keeps_the_last_point() {
        let p: Vec<MigrationProgress> = (0..1000)
            .map(|i| MigrationProgress {
                elapsed_ms: i,
                remaining_bytes: 1000 - i,
                total_bytes: 1000,
                ..Default::default()
            })
            .collect();
        let s = series_of(&p, 100);
        assert_eq!(s.len(), 100);
        assert_eq!(s.last().map(|x| x.t_ms), Some(999));
        assert!(s.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
        assert_eq!(series_of(&p[..10], 100).len(), 10);
    }
}
