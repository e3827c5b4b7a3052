//! Convergence model and ETA.
//!
//! Pre-copy sends a pass of dirty pages, then the pages dirtied during that pass, and so on. If a
//! guest writes randomly over a writable working set of `W` bytes at a raw rate `r` (bytes of
//! page writes per second), the distinct bytes dirtied during an interval `T` are
//!
//! ```text
//! D(T) = W · (1 − exp(−r·T / W))          (saturates at W)
//! ```
//!
//! Pass k+1 has to send `D(R_k / b)` bytes, where `R_k` is pass k's size and `b` the link
//! throughput. QEMU completes when `R ≤ b · downtime-limit` (the threshold in
//! `migration.c::migration_iteration_run`). The model fits `W` and `r` to the `(T, D)` pairs seen
//! at pass boundaries (QEMU's `dirty-pages-rate` is `D/T`, already saturated, so a single pair
//! cannot tell a small hot working set from a large cool one; two pairs of different `T` can),
//! then iterates the recurrence to say whether, when and with how many bytes pre-copy
//! converges, and how long post-copy would take instead.
//!
//! Throughput and dirty rate are smoothed with an EWMA of weight 0.4 on the newest value, KubeVirt's
//! `EwmaAlpha` (`stall-detector.go::updateBandwidthEstimate`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::observe::IterationSample;
use crate::plan::PlanInput;

/// EWMA weight of the newest sample (KubeVirt `EwmaAlpha` = 0.4).
pub const EWMA_ALPHA: f64 = 0.4;
/// How many pass-boundary `(T, D)` pairs the fit uses: enough to see saturation, few enough to
/// follow a workload that changes.
pub const FIT_WINDOW: usize = 6;
/// A pass that shrinks by less than this factor counts as not progressing when predicting.
const PROGRESS_FACTOR: f64 = 0.98;
/// Passes the predictor iterates at most.
const MAX_PREDICTED_PASSES: u32 = 200;

/// What the model predicts for pre-copy from the last pass boundary under given limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Pre-copy reaches QEMU's completion threshold.
    pub converges: bool,
    /// Further passes until the final stop-and-copy (if it converges).
    pub passes: u32,
    /// Time from the last boundary to completion, ms (if it converges).
    pub eta_ms: Option<u64>,
    /// Bytes still to send until completion (if it converges), or over the predicted passes.
    pub bytes: u64,
    /// Predicted stop-and-copy blackout, ms, excluding device-state overhead (if it converges).
    pub downtime_ms: Option<u64>,
    /// Where the pass size settles when it does not converge (the fixed point of the recurrence).
    pub steady_remaining_bytes: u64,
    /// The `downtime-limit` that would let pre-copy complete at the steady pass size, ms.
    pub downtime_needed_ms: u64,
    /// Time to finish by switching to post-copy at the last boundary, ms.
    pub postcopy_ms: Option<u64>,
}

/// How the running migration is expected to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EtaMode {
    /// Pre-copy converges by itself.
    Precopy,
    /// The policy plans (or has started) post-copy.
    Postcopy,
    /// Stop-and-copy (pause or a raised downtime limit).
    StopAndCopy,
    /// Not predicted to finish under current limits.
    NotConverging,
}

/// ETA published for a running migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eta {
    /// When the estimate was made (ms since start).
    pub at_ms: u64,
    /// Estimated completion time (ms since start), if finishing is predicted.
    pub finish_at_ms: Option<u64>,
    /// Bytes still to send.
    pub remaining_bytes: u64,
    /// How it is expected to finish.
    pub mode: EtaMode,
}

/// Estimate made before the migration starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PreflightEstimate {
    /// Link throughput assumed, bytes/s (None when unknown: no estimate possible).
    pub link_bytes_per_s: Option<u64>,
    /// Dirty rate from the probe, bytes/s.
    pub dirty_bytes_per_s: Option<u64>,
    /// Duration of the first full pass, ms.
    pub first_pass_ms: Option<u64>,
    /// Whether pre-copy is expected to converge under the SLA's downtime.
    pub converges: bool,
    /// Expected total time with pre-copy alone, ms.
    pub precopy_total_ms: Option<u64>,
    /// Expected total time switching to post-copy after the first pass, ms.
    pub postcopy_total_ms: Option<u64>,
    /// Expected bytes sent with pre-copy (when it converges).
    pub bytes: Option<u64>,
}

/// Fits `D(T) = W(1 − e^{−rT/W})` to pass-boundary samples and predicts pre- and post-copy.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvergenceModel {
    ram_bytes: f64,
    bandwidth: Option<f64>,
    dirty_rate: Option<f64>,
    /// (interval seconds, distinct bytes dirtied, throttle fraction during the interval)
    points: VecDeque<(f64, f64, f64)>,
    fit: Option<(f64, f64)>,
    last_boundary: Option<IterationSample>,
    last_sample: Option<IterationSample>,
    boundaries: u64,
}

impl ConvergenceModel {
    /// A model for a guest of `ram_bytes`.
    pub fn new(ram_bytes: u64) -> Self {
        ConvergenceModel {
            ram_bytes: ram_bytes.max(1) as f64,
            bandwidth: None,
            dirty_rate: None,
            points: VecDeque::new(),
            fit: None,
            last_boundary: None,
            last_sample: None,
            boundaries: 0,
        }
    }

    /// A model primed from the plan input: the link rate as the first bandwidth estimate and the
    /// dirty-rate probe as the first `(T, D)` pair.
    pub fn from_input(input: &PlanInput) -> Self {
        let mut m = ConvergenceModel::new(input.vm.ram_bytes);
        if let Some(link) = input.link_bytes_per_s {
            let cap = input.host_bandwidth_cap().unwrap_or(u64::MAX);
            m.bandwidth = Some(link.min(cap) as f64);
        }
        if let Some(p) = input.probe {
            let t = (p.period_ms.max(1) as f64) / 1000.0;
            let d = p.dirty_bytes_per_s as f64 * t;
            m.dirty_rate = Some(p.dirty_bytes_per_s as f64);
            if d > 0.0 {
                m.points.push_back((t, d, 0.0));
                m.refit();
            }
        }
        m
    }

    /// Feeds a `query-migrate` reading taken between boundaries (updates the throughput EWMA).
    pub fn observe_tick(&mut self, s: &IterationSample) {
        self.update_bandwidth(s);
        self.last_sample = Some(*s);
    }

    /// Feeds a pass-boundary sample.
    pub fn observe_pass(&mut self, s: &IterationSample) {
        self.update_bandwidth(s);
        let rate = s.dirty_bytes_per_s();
        if s.pass >= 2 && rate > 0.0 {
            self.dirty_rate = Some(match self.dirty_rate {
                Some(old) => EWMA_ALPHA * rate + (1.0 - EWMA_ALPHA) * old,
                None => rate,
            });
        }
        let prev = self
            .last_boundary
            .filter(|p| s.at_ms > p.at_ms && s.pass > p.pass);
        if let Some(prev) = prev {
            let t = (s.at_ms - prev.at_ms) as f64 / 1000.0;
            let d = s.remaining_bytes as f64;
            let throttle = f64::from(s.throttle_pct.unwrap_or(0)) / 100.0;
            if d > 0.0 {
                self.points.push_back((t, d, throttle));
                while self.points.len() > FIT_WINDOW {
                    self.points.pop_front();
                }
                self.refit();
            }
        }
        self.last_boundary = Some(*s);
        self.last_sample = Some(*s);
        self.boundaries += 1;
    }

    fn update_bandwidth(&mut self, s: &IterationSample) {
        let tp = s.throughput_bytes_per_s as f64;
        if tp > 0.0 {
            self.bandwidth = Some(match self.bandwidth {
                Some(old) => EWMA_ALPHA * tp + (1.0 - EWMA_ALPHA) * old,
                None => tp,
            });
        }
    }

    /// Smoothed link throughput, bytes/s (ignores zero readings so an outage does not erase it).
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth
    }

    /// Smoothed QEMU dirty rate (distinct bytes per second of sync period).
    pub fn dirty_rate(&self) -> Option<f64> {
        self.dirty_rate
    }

    /// Fitted writable working set and raw (unthrottled) write rate, bytes and bytes/s.
    pub fn working_set(&self) -> Option<(f64, f64)> {
        self.fit
    }

    /// Pass-boundary samples seen.
    pub fn boundaries(&self) -> u64 {
        self.boundaries
    }

    /// The last pass-boundary sample.
    pub fn last_boundary(&self) -> Option<&IterationSample> {
        self.last_boundary.as_ref()
    }

    /// The latest sample of any kind.
    pub fn last_sample(&self) -> Option<&IterationSample> {
        self.last_sample.as_ref()
    }

    /// Distinct bytes dirtied in `t` seconds at throttle fraction `throttle`, per the fit.
    pub fn dirtied_in(&self, t: f64, throttle: f64) -> f64 {
        match self.fit {
            Some((w, r)) => dirty_curve(w, r * (1.0 - throttle).max(0.0), t),
            None => self.dirty_rate.unwrap_or(0.0) * (1.0 - throttle).max(0.0) * t,
        }
    }

    fn refit(&mut self) {
        let max_d = self.points.iter().map(|p| p.1).fold(0.0, f64::max);
        if max_d <= 0.0 {
            return;
        }
        let lo = max_d * 1.0001;
        let hi = self.ram_bytes.max(lo * 1.0001);
        // Error of candidate W, in log-D space: each point implies its own unthrottled rate r;
        // try each as the common r and keep the one that predicts all points best. (Comparing the
        // implied rates instead fails on saturated points, where any large r fits.) One point
        // fits any W: prefer the largest (least saturated, i.e. most pessimistic about
        // convergence after a long first pass).
        // Candidate rates come from the newest point and the shortest and longest intervals:
        // enough to pin a saturating curve, at half the cost of trying every point.
        let newest = self.points.len() - 1;
        let by_t = |pick_max: bool| {
            (0..self.points.len())
                .reduce(|a, b| {
                    let (ta, tb) = (self.points[a].0, self.points[b].0);
                    if (tb > ta) == pick_max { b } else { a }
                })
                .unwrap_or(newest)
        };
        let mut candidates = vec![newest, by_t(false), by_t(true)];
        candidates.sort_unstable();
        candidates.dedup();
        let eval = |w: f64| -> (f64, f64) {
            let mut best = (f64::INFINITY, 0.0);
            for &(t0, d0, th0) in candidates.iter().map(|&i| &self.points[i]) {
                let r = rate_for(w, d0, t0) / (1.0 - th0).max(0.01);
                let err: f64 = self
                    .points
                    .iter()
                    .map(|&(t, d, th)| {
                        let predicted = dirty_curve(w, r * (1.0 - th).max(0.0), t).max(1.0);
                        (predicted.ln() - d.max(1.0).ln()).powi(2)
                    })
                    .sum();
                if err < best.0 {
                    best = (err, r);
                }
            }
            best
        };
        if self.points.len() < 2 {
            let (_, r) = eval(hi);
            self.fit = Some((hi, r));
            return;
        }
        // Golden-section search on ln W.
        let (mut a, mut b) = (lo.ln(), hi.ln());
        let g = 0.618_033_988_75;
        let mut c = b - g * (b - a);
        let mut d = a + g * (b - a);
        let mut fc = eval(c.exp()).0;
        let mut fd = eval(d.exp()).0;
        for _ in 0..20 {
            if fc <= fd {
                b = d;
                d = c;
                fd = fc;
                c = b - g * (b - a);
                fc = eval(c.exp()).0;
            } else {
                a = c;
                c = d;
                fc = fd;
                d = a + g * (b - a);
                fd = eval(d.exp()).0;
            }
        }
        let w = ((a + b) / 2.0).exp();
        // Prefer the largest W among nearly equally good fits (points all unsaturated).
        let (e_hi, r_hi) = eval(hi);
        let (e_w, r_w) = eval(w);
        self.fit = Some(if e_hi <= e_w + 1e-3 {
            (hi, r_hi)
        } else {
            (w, r_w)
        });
    }

    /// Predicts pre-copy from the last boundary under `downtime_limit_ms` and vCPU throttle
    /// `throttle_pct`. `None` until a bandwidth estimate and a boundary (or the probe) exist.
    pub fn predict(&self, downtime_limit_ms: u64, throttle_pct: u8) -> Option<Prediction> {
        let bw = self.bandwidth?;
        if bw <= 0.0 {
            return None;
        }
        let remaining = self.last_boundary.map(|s| s.remaining_bytes as f64)?;
        Some(self.predict_from(remaining, bw, downtime_limit_ms, throttle_pct))
    }

    /// Predicts pre-copy starting from a pass of `remaining` bytes at throughput `bw`.
    pub fn predict_from(
        &self,
        remaining: f64,
        bw: f64,
        downtime_limit_ms: u64,
        throttle_pct: u8,
    ) -> Prediction {
        let throttle = f64::from(throttle_pct.min(99)) / 100.0;
        let threshold = bw * downtime_limit_ms as f64 / 1000.0;
        let mut r = remaining.max(0.0);
        let mut t = 0.0;
        let mut bytes = 0.0;
        let postcopy_ms = Some(secs_to_ms(r / bw));
        for pass in 0..MAX_PREDICTED_PASSES {
            if r <= threshold {
                let down = r / bw;
                return Prediction {
                    converges: true,
                    passes: pass,
                    eta_ms: Some(secs_to_ms(t + down)),
                    bytes: (bytes + r) as u64,
                    downtime_ms: Some(secs_to_ms(down)),
                    steady_remaining_bytes: r as u64,
                    downtime_needed_ms: secs_to_ms(down),
                    postcopy_ms,
                };
            }
            let dt = r / bw;
            let next = self.dirtied_in(dt, throttle);
            t += dt;
            bytes += r;
            if next >= r * PROGRESS_FACTOR {
                let steady = next.max(r);
                return Prediction {
                    converges: false,
                    passes: pass + 1,
                    eta_ms: None,
                    bytes: bytes as u64,
                    downtime_ms: None,
                    steady_remaining_bytes: steady as u64,
                    downtime_needed_ms: secs_to_ms(steady / bw),
                    postcopy_ms,
                };
            }
            r = next;
        }
        Prediction {
            converges: false,
            passes: MAX_PREDICTED_PASSES,
            eta_ms: None,
            bytes: bytes as u64,
            downtime_ms: None,
            steady_remaining_bytes: r as u64,
            downtime_needed_ms: secs_to_ms(r / bw),
            postcopy_ms,
        }
    }

    /// The ETA for a running migration at `now_ms`, given the current limits.
    pub fn eta(&self, now_ms: u64, downtime_limit_ms: u64, throttle_pct: u8) -> Option<Eta> {
        let boundary = self.last_boundary?;
        let p = self.predict(downtime_limit_ms, throttle_pct)?;
        let remaining = self
            .last_sample
            .map_or(boundary.remaining_bytes, |s| s.remaining_bytes);
        Some(Eta {
            at_ms: now_ms,
            finish_at_ms: p.eta_ms.map(|e| (boundary.at_ms + e).max(now_ms)),
            remaining_bytes: remaining,
            mode: if p.converges {
                EtaMode::Precopy
            } else {
                EtaMode::NotConverging
            },
        })
    }
}

/// `D(T) = W(1 − e^{−rT/W})`.
fn dirty_curve(w: f64, r: f64, t: f64) -> f64 {
    if w <= 0.0 || r <= 0.0 || t <= 0.0 {
        return 0.0;
    }
    w * (1.0 - (-r * t / w).exp())
}

/// The raw rate `r` for which `D(t) = d` on a working set `w`.
fn rate_for(w: f64, d: f64, t: f64) -> f64 {
    let frac = (d / w).clamp(1e-12, 0.999_999);
    (-(w / t.max(1e-6)) * (1.0 - frac).ln()).max(1e-9)
}

fn secs_to_ms(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        (s * 1000.0).ceil() as u64
    } else {
        0
    }
}

/// Pre-flight estimate from the plan input: link rate (capped by hosts), RAM and the dirty-rate
/// probe. Assumes every page is non-zero (an upper bound: zero pages cost almost nothing) and
/// judges convergence against the SLA's downtime minus the switchover overhead.
pub fn preflight_estimate(input: &PlanInput) -> PreflightEstimate {
    let model = ConvergenceModel::from_input(input);
    let Some(bw) = model.bandwidth.filter(|b| *b > 0.0) else {
        return PreflightEstimate {
            link_bytes_per_s: None,
            dirty_bytes_per_s: input.probe.map(|p| p.dirty_bytes_per_s),
            first_pass_ms: None,
            converges: false,
            precopy_total_ms: None,
            postcopy_total_ms: None,
            bytes: None,
        };
    };
    let ram = input.vm.ram_bytes as f64;
    let first = ram / bw;
    let after_first = model.dirtied_in(first, 0.0);
    let budget = input
        .max_downtime_ms()
        .saturating_sub(input.switchover_overhead_ms)
        .max(1);
    let p = model.predict_from(after_first, bw, budget, 0);
    let first_ms = secs_to_ms(first);
    PreflightEstimate {
        link_bytes_per_s: Some(bw as u64),
        dirty_bytes_per_s: input.probe.map(|p| p.dirty_bytes_per_s),
        first_pass_ms: Some(first_ms),
        converges: p.converges,
        precopy_total_ms: p
            .eta_ms
            .map(|e| first_ms + e + input.switchover_overhead_ms),
        postcopy_total_ms: Some(
            first_ms + secs_to_ms(after_first / bw) + input.switchover_overhead_ms,
        ),
        bytes: p.converges.then_some(ram as u64 + p.bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::Phase;

    const MIB: f64 = 1024.0 * 1024.0;

    fn boundary(at_ms: u64, pass: u64, remaining: f64, bw: f64) -> IterationSample {
        IterationSample {
            at_ms,
            pass,
            transferred_bytes: 0,
            remaining_bytes: remaining as u64,
            total_bytes: (1024.0 * MIB) as u64,
            dirty_pages_rate: 0,
            page_size: 4096,
            throughput_bytes_per_s: bw as u64,
            expected_downtime_ms: None,
            throttle_pct: None,
            phase: Phase::Precopy,
        }
    }

    /// Feeds the model the passes a guest with working set `w` and raw rate `r` would produce.
    fn feed(m: &mut ConvergenceModel, w: f64, r: f64, bw: f64, passes: u64) -> f64 {
        let mut t_ms = 0u64;
        let mut pass_bytes = 1024.0 * MIB;
        for pass in 1..=passes {
            let dt = pass_bytes / bw;
            t_ms += (dt * 1000.0) as u64;
            pass_bytes = dirty_curve(w, r, dt);
            m.observe_pass(&boundary(t_ms, pass + 1, pass_bytes, bw));
        }
        pass_bytes
    }

    #[test]
    fn recovers_a_saturated_working_set() {
        let bw = 12.5e6; // 100 Mbit/s
        let (w, r) = (64.0 * MIB, 400.0 * MIB);
        let mut m = ConvergenceModel::new((1024.0 * MIB) as u64);
        m.observe_pass(&boundary(0, 1, 1024.0 * MIB, bw));
        feed(&mut m, w, r, bw, 4);
        let (fw, _) = m.working_set().unwrap();
        assert!((fw / w - 1.0).abs() < 0.05, "fitted W {fw} vs {w}");
        let p = m.predict(300, 0).unwrap();
        assert!(!p.converges, "64 MiB hot set cannot fit 300 ms × 12.5 MB/s");
        assert!(p.downtime_needed_ms > 4000 && p.downtime_needed_ms < 6000);
        let p = m.predict(6000, 0).unwrap();
        assert!(p.converges);
    }

    #[test]
    fn slow_writer_converges_and_eta_is_positive() {
        let bw = 125e6;
        let (w, r) = (512.0 * MIB, 20.0 * MIB);
        let mut m = ConvergenceModel::new((1024.0 * MIB) as u64);
        m.observe_pass(&boundary(0, 1, 1024.0 * MIB, bw));
        feed(&mut m, w, r, bw, 2);
        let p = m.predict(300, 0).unwrap();
        assert!(p.converges, "{p:?}");
        assert!(p.eta_ms.unwrap() < 2000);
        let eta = m.eta(100_000, 300, 0).unwrap();
        assert_eq!(eta.mode, EtaMode::Precopy);
        assert!(eta.finish_at_ms.unwrap() >= 100_000);
    }

    #[test]
    fn throttle_helps_prediction() {
        let bw = 12.5e6;
        let mut m = ConvergenceModel::new((1024.0 * MIB) as u64);
        m.observe_pass(&boundary(0, 1, 1024.0 * MIB, bw));
        feed(&mut m, 256.0 * MIB, 30.0 * MIB, bw, 3);
        let free = m.predict(300, 0).unwrap();
        let throttled = m.predict(300, 99).unwrap();
        assert!(!free.converges);
        assert!(throttled.converges, "{throttled:?}");
    }

    #[test]
    fn preflight_without_link_is_unknown_and_with_link_is_sane() {
        use crate::{MigrationContext, QemuFeatures, SlaCatalog, VmLimits};
        let sla = SlaCatalog::builtin().get("standard").unwrap().clone();
        let mut input = PlanInput::new(
            MigrationContext::Balance,
            sla,
            VmLimits::new(1 << 30),
            QemuFeatures::qemu_10_tcg(),
        );
        assert!(preflight_estimate(&input).first_pass_ms.is_none());
        input.link_bytes_per_s = Some(125_000_000);
        input.probe = Some(crate::DirtyRateProbe {
            period_ms: 1000,
            dirty_bytes_per_s: 1 << 20,
        });
        let e = preflight_estimate(&input);
        assert_eq!(e.first_pass_ms, Some(8590));
        assert!(e.converges);
        assert!(e.precopy_total_ms.unwrap() > 8590);
    }
}
