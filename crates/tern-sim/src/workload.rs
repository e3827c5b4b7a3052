//! The guest's write process: what the simulated guest writes, where, and when.
//!
//! This is deliberately *not* the law tern's `ConvergenceModel` fits (`W − (W − D)·e^{−rΔt/W}`).
//! A [`Workload`] is a list of write streams — each a page range written sequentially (a cursor
//! sweeping the range and wrapping, what `tern-load tern_pattern=seq` does) or at uniformly
//! random pages (`tern_pattern=random`) at its own rate — grouped into phases that change over
//! time, optionally switched on and off in bursts (`tern_pattern=bursty`: 2 s on, 2 s off).
//! Hot and cold regions are two streams of different per-page rates. The dirty set at a sync is
//! whatever pages these writes hit since the previous sync ([`crate::memory::GuestMemory`]), so
//! a sequential sweep dirties `min(r·Δt, W)` pages (linear, then the whole set at once), a
//! hot/cold mix saturates on two time scales, and bursts make the per-pass dirty count swing.

use serde::{Deserialize, Serialize};

/// In what order a stream picks the page it writes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WritePattern {
    /// A cursor sweeps the range page by page and wraps (`tern-load` `seq`, `mig_mon -p
    /// sequential`): within one sweep no page is written twice.
    #[serde(alias = "seq")]
    Sequential,
    /// Every write hits a uniformly random page of the range (`tern-load` `random`): pages are
    /// re-written before the range is covered, so fewer distinct pages per write.
    Random,
}

/// A half-open range of guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRange {
    /// First page (index into guest RAM).
    pub first: u64,
    /// Number of pages.
    pub pages: u64,
}

impl PageRange {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first.saturating_add(self.pages)
    }
}

/// One source of page writes: a range, an order, and a rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WriteStream {
    /// The pages this stream writes.
    pub range: PageRange,
    /// Which page comes next.
    pub pattern: WritePattern,
    /// Page writes per second while running unthrottled (several writes to one page between
    /// two syncs dirty it once).
    pub pages_per_s: f64,
}

/// The streams that run from `from_ms` on (until the next phase).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadPhase {
    /// Start, ms since the migration started (the first phase starts at 0).
    pub from_ms: u64,
    /// What runs in this phase.
    pub streams: Vec<WriteStream>,
}

/// On/off modulation of every stream (`tern-load tern_pattern=bursty` writes for 2 s, then
/// nothing for 2 s, by the guest's clock, which throttling does not slow down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Burst {
    /// Writing, ms.
    pub on_ms: u64,
    /// Idle, ms.
    pub off_ms: u64,
}

impl Burst {
    /// Seconds of "on" time within `[t, t + dt)` (seconds since start; cycles start "on" at 0).
    pub fn on_time(&self, t: f64, dt: f64) -> f64 {
        let on = self.on_ms as f64 / 1000.0;
        let period = on + self.off_ms as f64 / 1000.0;
        if period <= 0.0 || on >= period {
            return dt;
        }
        // ∫ on-indicator = F(t + dt) − F(t), F(x) = cycles·on + min(x mod period, on).
        let f = |x: f64| (x / period).floor() * on + (x.rem_euclid(period)).min(on);
        (f(t + dt) - f(t)).max(0.0)
    }
}

/// What the guest does to its memory during the migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Pages holding data when the migration starts (kernel, page cache, the workload's own
    /// buffers). Every other page has never been touched: it is zero, and QEMU sends it as a
    /// zero-page marker (`ram.c::save_zero_page`) instead of 4 KiB.
    pub resident: Vec<PageRange>,
    /// Phases in time order; the first starts at 0.
    pub phases: Vec<WorkloadPhase>,
    /// Optional on/off modulation of every phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<Burst>,
    /// Seed of the random page choices (the same seed, the same dirty sets).
    pub seed: u64,
}

impl Workload {
    /// Index of the phase running at `t_ms`.
    pub fn phase_index_at(&self, t_ms: f64) -> usize {
        self.phases
            .iter()
            .rposition(|p| p.from_ms as f64 <= t_ms + 1e-6)
            .unwrap_or(0)
    }

    /// Total unthrottled write rate (page writes/s) of the phase running at `t_ms`, ignoring
    /// bursts (the rate while "on").
    pub fn nominal_pages_per_s(&self, t_ms: f64) -> f64 {
        self.phases
            .get(self.phase_index_at(t_ms))
            .map_or(0.0, |p| p.streams.iter().map(|s| s.pages_per_s).sum())
    }

    /// Start of the next phase after `t_ms`, ms (`None` if none).
    pub fn next_phase_ms(&self, t_ms: f64) -> Option<u64> {
        self.phases
            .iter()
            .map(|p| p.from_ms)
            .find(|&f| f as f64 > t_ms + 1e-6)
    }

    /// Distinct pages any stream of any phase can write (the writable working set).
    pub fn working_set_pages(&self) -> u64 {
        let mut ranges: Vec<PageRange> = self
            .phases
            .iter()
            .flat_map(|p| p.streams.iter().map(|s| s.range))
            .collect();
        union_pages(&mut ranges)
    }

    /// Distinct resident pages.
    pub fn resident_pages(&self) -> u64 {
        let mut r = self.resident.clone();
        union_pages(&mut r)
    }

    /// A single stream over `[first, first + pages)` with `pattern` at `pages_per_s`, resident
    /// as given: the shape of one `tern-load` process.
    pub fn single(
        resident: Vec<PageRange>,
        range: PageRange,
        pattern: WritePattern,
        pages_per_s: f64,
        seed: u64,
    ) -> Workload {
        Workload {
            resident,
            phases: vec![WorkloadPhase {
                from_ms: 0,
                streams: vec![WriteStream {
                    range,
                    pattern,
                    pages_per_s,
                }],
            }],
            burst: None,
            seed,
        }
    }
}

fn union_pages(ranges: &mut [PageRange]) -> u64 {
    ranges.sort_by_key(|r| r.first);
    let mut total = 0;
    let mut covered_to = 0u64;
    for r in ranges.iter() {
        let start = r.first.max(covered_to);
        if r.end() > start {
            total += r.end() - start;
            covered_to = r.end();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_on_time_integrates_the_square_wave() {
        let b = Burst {
            on_ms: 2000,
            off_ms: 2000,
        };
        assert!((b.on_time(0.0, 4.0) - 2.0).abs() < 1e-9);
        assert!((b.on_time(1.0, 2.0) - 1.0).abs() < 1e-9);
        assert!((b.on_time(2.0, 2.0)).abs() < 1e-9);
        assert!((b.on_time(3.0, 10.0) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn working_set_is_the_union_of_stream_ranges() {
        let mut w = Workload::single(
            vec![],
            PageRange {
                first: 10,
                pages: 100,
            },
            WritePattern::Random,
            5.0,
            1,
        );
        w.phases.push(WorkloadPhase {
            from_ms: 1000,
            streams: vec![WriteStream {
                range: PageRange {
                    first: 50,
                    pages: 100,
                },
                pattern: WritePattern::Sequential,
                pages_per_s: 1.0,
            }],
        });
        assert_eq!(w.working_set_pages(), 140);
        assert_eq!(w.phase_index_at(999.0), 0);
        assert_eq!(w.phase_index_at(1000.0), 1);
        assert_eq!(w.next_phase_ms(0.0), Some(1000));
        assert_eq!(w.nominal_pages_per_s(2000.0), 1.0);
        let json = serde_json::to_string(&w).unwrap();
        assert!(json.contains("\"sequential\""));
        let back: Workload = serde_json::from_str(&json.replace("sequential", "seq")).unwrap();
        assert_eq!(back, w);
    }
}
