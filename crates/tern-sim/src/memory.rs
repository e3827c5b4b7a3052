//! Guest memory at page granularity: which pages hold data, which were written since the last
//! dirty-bitmap sync, and which the current pass sends.
//!
//! The three sets are bitmaps (one bit per page: a 16 GiB guest is 4 M pages, 512 KiB per map).
//! Writes are not applied one by one as they happen: the engine accrues each stream's write
//! count as time passes ([`GuestMemory::accrue`], a few floats per step) and the writes are laid
//! into the log when somebody looks — at a sync, a post-copy switch, a completion check. Between
//! two looks only the union of the writes matters, and that depends on the stream's cursor (for
//! a sweep) or on the page choices (random), never on a closed-form law. Cost per look:
//! O(pages hit) for few random writes, O(range ÷ 64) words otherwise.
//!
//! What is copied from QEMU:
//! * the migration bitmap starts all-ones: the first pass visits every page
//!   (`ram.c::ram_list_init_bitmaps`, `bitmap_set(block->bmap, 0, pages)`);
//! * a sync ORs the dirty log into the migration bitmap and clears the log
//!   (`ram.c::migration_bitmap_sync` → `ramblock_sync_dirty_bitmap`); a page written after it
//!   was sent in this pass, or before, is in the log and goes again next pass;
//! * a page that reads as all zeroes goes as a header and one byte (`ram.c::save_zero_page`,
//!   8-byte `save_page_header` + `qemu_put_byte(0)`), a normal page as header + 4 KiB;
//! * the sync walks a bitmap as large as RAM, so it costs time proportional to guest size.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::workload::{Workload, WritePattern};

/// Page header on the wire: the be64 offset|flags word of `ram.c::save_page_header`.
pub const PAGE_HEADER_BYTES: f64 = 8.0;
/// A zero page on the wire: header + the one fill byte (`ram.c::save_zero_page`).
pub const ZERO_PAGE_BYTES: f64 = PAGE_HEADER_BYTES + 1.0;

/// A fixed-size set of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    /// `len` pages, none set.
    pub fn new(len: u64) -> Bitmap {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the map has no pages at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets page `i` (ignored past the end).
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Whether page `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Sets pages `[start, end)` (clipped to the map).
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        if start >= end {
            return;
        }
        let (sw, ew) = ((start / 64) as usize, ((end - 1) / 64) as usize);
        let lo = !0u64 << (start % 64);
        let hi = !0u64 >> (63 - (end - 1) % 64);
        if sw == ew {
            self.words[sw] |= lo & hi;
            return;
        }
        self.words[sw] |= lo;
        for w in &mut self.words[sw + 1..ew] {
            *w = !0;
        }
        self.words[ew] |= hi;
    }

    /// Sets every page.
    pub fn fill(&mut self) {
        self.set_range(0, self.len);
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Pages set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Pages set in both.
    pub fn count_and(&self, other: &Bitmap) -> u64 {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum()
    }

    /// `self |= other`.
    pub fn or_assign(&mut self, other: &Bitmap) {
        self.words
            .iter_mut()
            .zip(&other.words)
            .for_each(|(a, b)| *a |= b);
    }

    /// Whether every page set here is set in `other`.
    pub fn is_subset(&self, other: &Bitmap) -> bool {
        self.words
            .iter()
            .zip(&other.words)
            .all(|(a, b)| a & !b == 0)
    }

    /// ORs into word `w` a random mask whose bits are each set with probability `p` (16-bit
    /// precision: AND/OR of random words along the binary expansion of `p`).
    fn or_random_word(&mut self, w: usize, p: f64, mask: u64, rng: &mut ChaCha8Rng) {
        let q = (p.clamp(0.0, 1.0) * 65536.0).round() as u32;
        if q == 0 {
            return;
        }
        let bits = if q >= 65536 {
            !0
        } else {
            let mut m = 0u64;
            // From the least significant bit of q up: m = bit ? m | r : m & r keeps
            // P(bit set) = q / 2^16 exactly.
            for k in 0..16 {
                let r: u64 = rng.r#gen();
                m = if q >> k & 1 == 1 { m | r } else { m & r };
            }
            m
        };
        self.words[w] |= bits & mask;
    }
}

/// Per-stream write state.
#[derive(Debug, Clone, Copy, Default)]
struct StreamState {
    /// Writes accrued and not yet laid into the log.
    pending: f64,
    /// Next page of a sequential sweep, relative to the range.
    cursor: u64,
}

/// What a sync found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncFound {
    /// Pages the new pass sends.
    pub pages: u64,
    /// Of them, pages holding data (the rest are zero pages).
    pub data_pages: u64,
    /// Of the data pages, those in the XBZRLE cache (sent as a delta).
    pub cached_pages: u64,
}

/// The guest's memory and the writes into it, for one migration.
#[derive(Debug, Clone)]
pub struct GuestMemory {
    workload: Workload,
    pages: u64,
    /// Pages that hold data (written at least once, or resident at start).
    touched: Bitmap,
    /// The dirty log: pages written since the last sync.
    log: Bitmap,
    /// The migration bitmap as it stood when the current pass started.
    pass: Bitmap,
    /// Pages in the XBZRLE cache.
    cache: Bitmap,
    /// Pages the cache holds at most (`xbzrle-cache-size` ÷ page size).
    cache_capacity: u64,
    /// `states[offsets[phase] + stream]`.
    states: Vec<StreamState>,
    offsets: Vec<usize>,
    rng: ChaCha8Rng,
    /// Total page writes so far (the guest's own counter, `tern-load`'s `writes=`).
    writes: f64,
}

impl GuestMemory {
    /// Memory of `pages` pages with `workload`'s resident pages holding data; the first pass
    /// covers every page.
    pub fn new(workload: &Workload, pages: u64) -> GuestMemory {
        let mut touched = Bitmap::new(pages);
        for r in &workload.resident {
            touched.set_range(r.first, r.end());
        }
        let mut offsets = Vec::with_capacity(workload.phases.len());
        let mut n = 0;
        for p in &workload.phases {
            offsets.push(n);
            n += p.streams.len();
        }
        let mut pass = Bitmap::new(pages);
        pass.fill();
        GuestMemory {
            workload: workload.clone(),
            pages,
            touched,
            log: Bitmap::new(pages),
            pass,
            cache: Bitmap::new(pages),
            cache_capacity: 0,
            states: vec![StreamState::default(); n],
            offsets,
            rng: ChaCha8Rng::seed_from_u64(workload.seed),
            writes: 0.0,
        }
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// Guest pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Unthrottled write rate at `t` seconds (page writes/s, ignoring bursts).
    pub fn nominal_pages_per_s(&self, t: f64) -> f64 {
        self.workload.nominal_pages_per_s(t * 1000.0)
    }

    /// The guest runs for `dt` seconds from `t` with its write rate scaled by `scale`
    /// (throttle, dirty limit; 0 when paused). The engine never lets a step cross a phase
    /// boundary; bursts are integrated exactly.
    pub fn accrue(&mut self, t: f64, dt: f64, scale: f64) {
        if dt <= 0.0 || scale <= 0.0 {
            return;
        }
        let on = self.workload.burst.map_or(dt, |b| b.on_time(t, dt));
        let ph = self.workload.phase_index_at(t * 1000.0);
        let Some(phase) = self.workload.phases.get(ph) else {
            return;
        };
        let base = self.offsets[ph];
        for (i, s) in phase.streams.iter().enumerate() {
            let k = s.pages_per_s.max(0.0) * on * scale;
            self.states[base + i].pending += k;
            self.writes += k;
        }
    }

    /// Lays every accrued write into the log (and marks the pages as holding data).
    pub fn materialize(&mut self) {
        for (ph, phase) in self.workload.phases.iter().enumerate() {
            for (i, s) in phase.streams.iter().enumerate() {
                let st = &mut self.states[self.offsets[ph] + i];
                let k = st.pending.floor();
                if k < 1.0 {
                    continue;
                }
                st.pending -= k;
                let n = s.range.pages.min(self.pages.saturating_sub(s.range.first));
                if n == 0 {
                    continue;
                }
                let first = s.range.first;
                match s.pattern {
                    WritePattern::Sequential => {
                        if k >= n as f64 {
                            self.log.set_range(first, first + n);
                            st.cursor = (st.cursor + (k as u64) % n) % n;
                        } else {
                            let k = k as u64;
                            let c = st.cursor;
                            let end = c + k;
                            self.log.set_range(first + c, first + end.min(n));
                            if end > n {
                                self.log.set_range(first, first + end - n);
                            }
                            st.cursor = end % n;
                        }
                    }
                    WritePattern::Random => {
                        if k <= (n / 8) as f64 {
                            for _ in 0..k as u64 {
                                let p = self.rng.gen_range(0..n);
                                self.log.set(first + p);
                            }
                        } else {
                            // Each page escapes all k writes with probability (1 − 1/n)^k:
                            // draw that per page, 64 pages per step.
                            let p = -((k * (-1.0 / n as f64).ln_1p()).exp_m1());
                            let (start, end) = (first, first + n);
                            let mut w = start / 64;
                            while w * 64 < end {
                                let lo = (w * 64).max(start);
                                let hi = ((w + 1) * 64).min(end);
                                let mask = if hi - lo == 64 {
                                    !0
                                } else {
                                    ((!0u64) >> (64 - (hi - lo))) << (lo % 64)
                                };
                                self.log.or_random_word(w as usize, p, mask, &mut self.rng);
                                w += 1;
                            }
                        }
                    }
                }
                // Written pages hold data from now on.
                let (sw, ew) = ((first / 64) as usize, (first + n).div_ceil(64) as usize);
                for w in sw..ew.min(self.log.words.len()) {
                    self.touched.words[w] |= self.log.words[w];
                }
            }
        }
    }

    /// Pages written since the last sync (after laying in the accrued writes).
    pub fn dirty_pages(&mut self) -> u64 {
        self.materialize();
        self.log.count()
    }

    /// Of the dirty pages, those holding data.
    pub fn dirty_data_pages(&mut self) -> u64 {
        self.materialize();
        self.log.count_and(&self.touched)
    }

    /// The dirty-bitmap sync at a pass boundary: the log becomes the next pass, the log is
    /// cleared. The previous pass must have been sent completely. With `xbzrle_cache_pages`
    /// set, data pages of the new pass already in the cache go as deltas and the others enter
    /// the cache as they are sent whole (`ram.c::save_xbzrle_page`: a cache miss inserts the
    /// page and sends it normally; QEMU starts caching only after the first round,
    /// `xbzrle_started`), until the cache is full.
    pub fn sync(&mut self, xbzrle_cache_pages: Option<u64>) -> SyncFound {
        self.materialize();
        std::mem::swap(&mut self.pass, &mut self.log);
        self.log.clear();
        let mut found = self.pass_pages();
        if let Some(cap) = xbzrle_cache_pages {
            self.cache_capacity = cap;
            let mut cached = 0;
            let mut held = self.cache.count();
            for w in 0..self.pass.words.len() {
                let data = self.pass.words[w] & self.touched.words[w];
                cached += u64::from((data & self.cache.words[w]).count_ones());
                let new = data & !self.cache.words[w];
                let n = u64::from(new.count_ones());
                if n > 0 && held + n <= self.cache_capacity {
                    self.cache.words[w] |= new;
                    held += n;
                }
            }
            found.cached_pages = cached;
        }
        found
    }

    /// The current pass as it started (no page of it in the XBZRLE cache counted).
    pub fn pass_pages(&self) -> SyncFound {
        SyncFound {
            pages: self.pass.count(),
            data_pages: self.pass.count_and(&self.touched),
            cached_pages: 0,
        }
    }

    /// A fresh migration of the same guest (the previous one failed): the first pass covers
    /// every page again; memory contents and the workload's progress carry over.
    pub fn restart(&mut self) {
        self.materialize();
        self.log.clear();
        self.cache.clear();
        self.pass.fill();
    }

    /// Pages the destination still lacks when post-copy starts with `sent_bytes` of the
    /// current pass on the wire: the unsent tail of the pass (QEMU sends a pass in address
    /// order, `ram.c::find_dirty_block`) and everything written since the last sync. Returns
    /// `(pages, data pages)`. `page_cost(data)` is what one page of the pass cost on the wire.
    pub fn postcopy_missing(
        &mut self,
        sent_bytes: f64,
        page_cost: impl Fn(bool) -> f64,
    ) -> SyncFound {
        self.materialize();
        let mut left = sent_bytes;
        let mut missing = self.log.clone();
        let data_cost = page_cost(true);
        let zero_cost = page_cost(false);
        for (w, &bits) in self.pass.words.iter().enumerate() {
            if left > 0.0 {
                let data = u64::from((bits & self.touched.words[w]).count_ones());
                let zero = u64::from(bits.count_ones()) - data;
                let cost = data as f64 * data_cost + zero as f64 * zero_cost;
                if cost <= left {
                    left -= cost;
                    continue;
                }
                left = 0.0;
            }
            missing.words[w] |= bits;
        }
        SyncFound {
            pages: missing.count(),
            data_pages: missing.count_and(&self.touched),
            cached_pages: 0,
        }
    }

    /// Pages holding data now.
    pub fn data_pages(&self) -> u64 {
        self.touched.count()
    }

    /// Whether every page ever written lies in the workload's streams or its resident set.
    pub fn log_within(&self, set: &Bitmap) -> bool {
        self.log.is_subset(set)
    }

    /// Total page writes so far.
    pub fn writes(&self) -> f64 {
        self.writes
    }
}

/// Distinct pages `workload` dirties in its first `secs` seconds from a clean log, unthrottled:
/// what QEMU's `calc-dirty-rate` (page sampling over a period) would see before the migration.
pub fn dirty_pages_in(workload: &Workload, pages: u64, secs: f64) -> u64 {
    let mut m = GuestMemory::new(workload, pages);
    // A different stream of random choices than the migration's own.
    m.rng = ChaCha8Rng::seed_from_u64(workload.seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut t = 0.0;
    while t < secs {
        let next = workload
            .next_phase_ms(t * 1000.0)
            .map_or(secs, |ms| (ms as f64 / 1000.0).min(secs));
        m.accrue(t, next - t, 1.0);
        t = next;
    }
    m.dirty_pages()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::PageRange;

    fn one(pattern: WritePattern, pages_per_s: f64) -> Workload {
        Workload::single(
            vec![PageRange {
                first: 0,
                pages: 1000,
            }],
            PageRange {
                first: 100,
                pages: 1000,
            },
            pattern,
            pages_per_s,
            7,
        )
    }

    #[test]
    fn bitmap_ranges_and_counts() {
        let mut b = Bitmap::new(200);
        b.set_range(3, 130);
        assert_eq!(b.count(), 127);
        assert!(b.get(3) && b.get(129) && !b.get(130) && !b.get(2));
        b.fill();
        assert_eq!(b.count(), 200);
        b.clear();
        b.set_range(64, 128);
        assert_eq!(b.count(), 64);
    }

    #[test]
    fn a_sweep_dirties_linearly_then_the_whole_range() {
        let mut m = GuestMemory::new(&one(WritePattern::Sequential, 100.0), 4096);
        m.sync(None);
        m.accrue(0.0, 2.5, 1.0);
        assert_eq!(m.sync(None).pages, 250);
        m.accrue(2.5, 5.0, 1.0);
        assert_eq!(m.sync(None).pages, 500);
        m.accrue(7.5, 100.0, 1.0);
        assert_eq!(m.sync(None).pages, 1000);
        // Throttled to half: half the pages.
        m.accrue(107.5, 2.0, 0.5);
        assert_eq!(m.sync(None).pages, 100);
    }

    #[test]
    fn random_writes_hit_fewer_distinct_pages_than_writes() {
        let mut m = GuestMemory::new(&one(WritePattern::Random, 1000.0), 4096);
        m.sync(None);
        m.accrue(0.0, 1.0, 1.0);
        let d = m.sync(None).pages;
        // 1000 writes over 1000 pages: about 632 distinct.
        assert!((560..700).contains(&d), "{d}");
        m.accrue(1.0, 0.05, 1.0);
        let d = m.sync(None).pages;
        assert!((40..=50).contains(&d), "{d}");
    }

    #[test]
    fn first_pass_is_all_pages_and_zero_pages_are_the_untouched_ones() {
        let mut m = GuestMemory::new(&one(WritePattern::Sequential, 0.0), 4096);
        let p = m.pass_pages();
        assert_eq!(p.pages, 4096);
        // Resident [0, 1000) plus the stream's range [100, 1100) once written: only resident
        // so far.
        assert_eq!(p.data_pages, 1000);
        assert_eq!(m.sync(None).pages, 0);
    }

    #[test]
    fn postcopy_missing_is_the_unsent_tail_plus_the_log() {
        let mut m = GuestMemory::new(&one(WritePattern::Sequential, 10.0), 4096);
        // Nothing sent: everything missing.
        assert_eq!(m.postcopy_missing(0.0, |_| 1.0).pages, 4096);
        // All sent, 10 pages written since.
        m.accrue(0.0, 1.0, 1.0);
        assert_eq!(m.postcopy_missing(1e12, |_| 1.0).pages, 10);
    }

    #[test]
    fn the_probe_sees_a_seconds_worth_of_distinct_pages() {
        assert_eq!(
            dirty_pages_in(&one(WritePattern::Sequential, 300.0), 4096, 1.0),
            300
        );
        assert_eq!(
            dirty_pages_in(&one(WritePattern::Sequential, 3000.0), 4096, 1.0),
            1000
        );
    }
}
