//! Stall detection at pass boundaries, with a windowed minimum and a local-minimum switch point.
//!
//! Follows KubeVirt's VEP-248 stall detector (`kubevirt@d923fdb:pkg/virt-launcher/virtwrap/
//! stall-detector.go`, `checkStallCondition` L137, `initializeRelaxationState` L167, relaxation
//! L174, `decideAction` L259) and differs where its fixed constants misfit small/fast or
//! large/slow migrations:
//!
//! * **Window.** KubeVirt compares against the minimum remaining among records older than a fixed
//!   40 s. A 64 MiB working set on a 1 Gbit/s link makes ~20 passes in 40 s; a 1 GiB guest on
//!   50 Mbit/s makes less than one. We use `clamp(3 × median pass duration, 10 s, 40 s)`, so the
//!   window always spans about three passes but never exceeds KubeVirt's.
//! * **Margin.** Same 4 % (`StallMargin`).
//! * **Stall state.** KubeVirt latches the stall (`stallDetected`, L243–L250). We clear it when a
//!   pass falls below the window minimum: a ramping auto-converge throttle shrinks passes for
//!   real, and a latched stall would stop-and-copy a migration about to converge by itself.
//! * **Local minimum.** Same rule (`remaining ≤ best × 1.04`). KubeVirt relaxes `best` by popping a
//!   min-heap of the values seen since the stall (`relaxBestRemainingBytes` L174–L190), so each
//!   relaxation takes the next larger value and the target climbs towards where the pass size now
//!   is; its patience halves (40 s, 20 s, …). We do the same with passes instead of seconds
//!   (patience 3 passes, then halved, at least 1), for the same reason as the window.
//! * **Budget guard.** KubeVirt refuses to switch while the estimated switchover time exceeds the
//!   remaining time budget, which "usually can only be triggered by a sudden network drop". We test
//!   the network directly ([`link_degraded`]): a switch is held while the latest throughput is
//!   below half the smoothed throughput, and the policy separately checks the time budget.
//! * **Prediction.** The detector only reports; the tern policy also consults
//!   [`crate::ConvergenceModel`], which can declare non-convergence after two post-first-pass
//!   boundaries instead of waiting a whole window.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::observe::IterationSample;

/// Relative margin for "not lower than the old minimum" and "at the local minimum" (KubeVirt
/// `StallMargin` 4 %).
pub const STALL_MARGIN: f64 = 0.04;
/// Shortest comparison window, ms.
pub const MIN_WINDOW_MS: u64 = 10_000;
/// Longest comparison window, ms (KubeVirt `StallProgressTimeout` 40 s).
pub const MAX_WINDOW_MS: u64 = 40_000;
/// Window length in typical passes.
pub const WINDOW_PASSES: u64 = 3;
/// Passes to wait for the local minimum before the first relaxation; each relaxation halves it
/// (at least 1).
pub const PATIENCE_PASSES: u32 = 3;
/// Records kept.
const HISTORY: usize = 256;

/// What the detector concluded at a boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StallStatus {
    /// No new minimum below the windowed minimum (within the margin).
    pub stalled: bool,
    /// Remaining is within the margin of the best value since the stall: a good switch point.
    pub at_local_minimum: bool,
    /// Smallest remaining among records older than the window.
    pub window_min: Option<u64>,
    /// The local-minimum target.
    pub best: Option<u64>,
    /// The window used, ms.
    pub window_ms: u64,
    /// Remaining at this boundary.
    pub remaining: u64,
}

/// Tracks remaining bytes at pass boundaries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StallDetector {
    records: VecDeque<(u64, u64)>,
    stalled: bool,
    /// Remaining bytes seen since the stall, a min-heap in KubeVirt (`remainingBytesHistory`);
    /// a short vector here (one entry per pass), popped at its minimum.
    history: Vec<u64>,
    best: Option<u64>,
    misses: u32,
    patience: u32,
}

impl StallDetector {
    /// An empty detector.
    pub fn new() -> Self {
        Self::default()
    }

    fn window_ms(&self) -> u64 {
        let mut durations: Vec<u64> = self
            .records
            .iter()
            .zip(self.records.iter().skip(1))
            .map(|(a, b)| b.0.saturating_sub(a.0))
            .collect();
        if durations.is_empty() {
            return MIN_WINDOW_MS;
        }
        durations.sort_unstable();
        let median = durations[durations.len() / 2];
        (median * WINDOW_PASSES).clamp(MIN_WINDOW_MS, MAX_WINDOW_MS)
    }

    /// Feeds a pass-boundary sample (the first pass, `pass < 2`, is ignored: it sends all RAM and
    /// says nothing about convergence).
    pub fn observe(&mut self, s: &IterationSample) -> StallStatus {
        let remaining = s.remaining_bytes;
        if s.pass < 2 {
            return StallStatus {
                stalled: false,
                at_local_minimum: false,
                window_min: None,
                best: None,
                window_ms: MIN_WINDOW_MS,
                remaining,
            };
        }
        let window_ms = self.window_ms();
        let window_min = self
            .records
            .iter()
            .filter(|(at, _)| at.saturating_add(window_ms) <= s.at_ms)
            .map(|&(_, r)| r)
            .min();
        self.records.push_back((s.at_ms, remaining));
        if self.records.len() > HISTORY {
            self.records.pop_front();
        }
        let stalled =
            window_min.is_some_and(|m| remaining as f64 >= m as f64 * (1.0 - STALL_MARGIN));
        if !stalled {
            // Progress below the window minimum clears the stall (unlike KubeVirt, which latches
            // it): a ramping auto-converge throttle shrinks the passes for real, and a latched
            // stall would call a stop-and-copy at a local minimum of a migration that is about to
            // converge by itself (three such scenarios in the simulator).
            self.stalled = false;
            self.best = None;
            self.history.clear();
            self.misses = 0;
            return StallStatus {
                stalled,
                at_local_minimum: false,
                window_min,
                best: None,
                window_ms,
                remaining,
            };
        }
        if !self.stalled {
            // First stall: the target is the smallest value seen in the window and before it.
            self.stalled = true;
            self.best = self.records.iter().map(|&(_, r)| r).min();
            self.history.clear();
            self.misses = 0;
            self.patience = PATIENCE_PASSES;
        } else {
            self.history.push(remaining);
        }
        let mut best = self.best.unwrap_or(remaining);
        let mut at_min = remaining as f64 <= best as f64 * (1.0 + STALL_MARGIN);
        if !at_min {
            self.misses += 1;
            if self.misses >= self.patience {
                // Relax: the next larger value seen since the stall (KubeVirt pops its heap), so
                // the target climbs towards the pass size the workload now produces.
                let smallest = (0..self.history.len()).min_by_key(|&i| self.history[i]);
                if let Some(i) = smallest {
                    best = self.history.swap_remove(i);
                    self.best = Some(best);
                }
                self.misses = 0;
                self.patience = (self.patience / 2).max(1);
                at_min = remaining as f64 <= best as f64 * (1.0 + STALL_MARGIN);
            }
        }
        StallStatus {
            stalled: true,
            at_local_minimum: at_min,
            window_min,
            best: Some(best),
            window_ms,
            remaining,
        }
    }
}

/// The network guard: the latest reading's throughput is below half the smoothed throughput (or
/// zero). Switching to post-copy now would leave the guest faulting pages over a dead link, and
/// a stop-and-copy would stretch the blackout; both wait for the link.
pub fn link_degraded(latest_bytes_per_s: u64, smoothed_bytes_per_s: Option<f64>) -> bool {
    match smoothed_bytes_per_s {
        Some(s) if s > 0.0 => (latest_bytes_per_s as f64) < 0.5 * s,
        _ => latest_bytes_per_s == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Phase;

    fn s(at_ms: u64, pass: u64, remaining: u64) -> IterationSample {
        IterationSample {
            at_ms,
            pass,
            transferred_bytes: 0,
            remaining_bytes: remaining,
            total_bytes: 1 << 30,
            dirty_pages_rate: 0,
            page_size: 4096,
            throughput_bytes_per_s: 1,
            expected_downtime_ms: None,
            throttle_pct: None,
            phase: Phase::Precopy,
        }
    }

    #[test]
    fn shrinking_passes_are_not_a_stall() {
        let mut d = StallDetector::new();
        let mut r = 1u64 << 30;
        for i in 0..20 {
            let st = d.observe(&s(i * 5000, i + 2, r));
            assert!(!st.stalled, "pass {i}");
            r = r * 8 / 10;
        }
    }

    #[test]
    fn oscillating_remaining_stalls_and_finds_the_minimum() {
        let mut d = StallDetector::new();
        let values = [100u64, 80, 90, 85, 95, 82, 100, 81, 97, 80];
        let mut saw_stall = false;
        let mut switch_points = vec![];
        for (i, v) in values.iter().enumerate() {
            let st = d.observe(&s(i as u64 * 5000, i as u64 + 2, v << 20));
            saw_stall |= st.stalled;
            if st.stalled && st.at_local_minimum {
                switch_points.push(*v);
            }
        }
        assert!(saw_stall);
        assert!(!switch_points.is_empty());
        assert!(switch_points.iter().all(|v| *v <= 83), "{switch_points:?}");
    }

    /// A creeping pass size (KubeVirt's relaxation pops the heap, `stall-detector.go` L174–L190):
    /// the target climbs from the pre-stall minimum through the values seen since, until a pass
    /// is within 4 % of it. Recomputing "the minimum since the stall" would keep the target at the
    /// first stalled value, which the creep never comes back to.
    #[test]
    fn target_climbs_on_a_creeping_set() {
        let mut d = StallDetector::new();
        let mut hit = None;
        let mut bests = vec![];
        for i in 0..40u64 {
            let v = (100 + 3 * i).min(160);
            let st = d.observe(&s(i * 5000, i + 2, v << 20));
            if st.stalled {
                bests.push(st.best.unwrap() >> 20);
            }
            if st.stalled && st.at_local_minimum {
                hit = Some(v);
                break;
            }
        }
        let v = hit.expect("reaches a local minimum");
        assert!(v > 110, "switch point {v} MiB");
        assert!(bests.windows(2).all(|w| w[1] >= w[0]), "{bests:?}");
        assert!(bests.last() > bests.first(), "{bests:?}");
    }

    /// Unlike KubeVirt's latched `stallDetected` (L243–L250), real progress below the window
    /// minimum clears the stall and its target.
    #[test]
    fn progress_clears_the_stall() {
        let mut d = StallDetector::new();
        for i in 0..10u64 {
            d.observe(&s(i * 5000, i + 2, 100 << 20));
        }
        let st = d.observe(&s(50_000, 12, 40 << 20));
        assert!(!st.stalled);
        assert_eq!(st.best, None);
    }

    #[test]
    fn window_adapts_to_pass_length() {
        let mut d = StallDetector::new();
        for i in 0..5 {
            d.observe(&s(i * 500, i + 2, 10 << 20));
        }
        assert_eq!(d.window_ms(), MIN_WINDOW_MS);
        let mut d = StallDetector::new();
        for i in 0..5 {
            d.observe(&s(i * 60_000, i + 2, 10 << 20));
        }
        assert_eq!(d.window_ms(), MAX_WINDOW_MS);
    }

    #[test]
    fn link_guard() {
        assert!(link_degraded(0, None));
        assert!(!link_degraded(10, None));
        assert!(link_degraded(40, Some(100.0)));
        assert!(!link_degraded(60, Some(100.0)));
    }
}
