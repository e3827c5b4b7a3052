//! The migration model: event-driven, piecewise-constant rates, page-granular dirtying.
//!
//! Between events (pass end, poll tick, link change, workload phase change) the link rate and the
//! guest's write rate are constant, so bytes sent grow linearly and the guest's write streams
//! accrue writes; the dirty set is whatever pages those writes hit (`crate::memory`, driven by
//! the scenario's `crate::workload::Workload`), not a formula. What is modelled from QEMU:
//! * passes: the first visits every page, sending data pages whole and zero (never-touched)
//!   pages as markers; each next pass sends the pages written since the previous sync (the
//!   bitmap synced at the pass boundary, `dirty-sync-count` + 1), which costs time proportional
//!   to guest RAM (`SimConfig::sync_ms_per_gib`);
//! * completion check at each sync and whenever `downtime-limit` changes: `pending ≤ bandwidth ×
//!   downtime-limit` ⇒ stop-and-copy, blackout = pending / link + device-state overhead (through
//!   any outage that hits it);
//! * `max-bandwidth` and the hosts' migration bandwidth cap (the operator's, for every policy)
//!   cap the link;
//! * auto-converge (`ram.c::migration_trigger_throttle`): in a sync period ≥ 1 s, if bytes dirtied
//!   exceed 50 % of bytes sent, twice, throttle by `cpu-throttle-initial`, then +`increment` up to
//!   `max-cpu-throttle`; the write rate scales by `1 − throttle`;
//! * dirty-limit: the same trigger caps the write rate at `vcpu-dirty-limit × vCPUs`;
//! * XBZRLE: a re-sent page in the cache costs `1 − saving` of its size; the first re-send of
//!   a page misses the cache and goes whole (`crate::memory::GuestMemory::sync`);
//! * `remaining` and the completion test count dirty pages × page size, as QEMU does, while the
//!   time to send them counts wire bytes (zero pages as markers, XBZRLE deltas);
//! * post-copy: blackout = overhead + 20 ms (platform.md saw 44–94 ms gaps), then every page not
//!   yet valid on the destination is sent at link rate while the guest runs degraded;
//! * pause: the write rate drops to 0; blackout lasts until completion;
//! * outages: see [`OutageKind`].

use serde::{Deserialize, Serialize};
use tern_policy::{
    Action, Decision, IterationSample, MigrationContext, MigrationPlan, MigrationPolicy,
    Observation, Phase,
};

use crate::memory::{GuestMemory, PAGE_HEADER_BYTES, SyncFound, ZERO_PAGE_BYTES};
use crate::scenario::{OutageKind, Scenario};

/// Median relative ETA error over the estimates made from `share` of `total_ms` on (before the
/// finish): |estimate − total| ÷ total.
fn eta_error_from(etas: &[(u64, u64)], total_ms: u64, share: f64) -> Option<f64> {
    let from = (total_ms as f64 * share) as u64;
    let total = total_ms.max(1) as f64;
    let mut errors: Vec<f64> = etas
        .iter()
        .filter(|(at, _)| *at >= from && *at < total_ms)
        .map(|(_, finish)| (*finish as f64 - total).abs() / total)
        .collect();
    if errors.is_empty() {
        return None;
    }
    errors.sort_by(f64::total_cmp);
    Some(errors[errors.len() / 2])
}

/// Simulation settings (fields missing from a serialized config take their defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// Poll interval for `Tick` observations, ms (Nova polls every 500 ms).
    pub tick_ms: u64,
    /// Give up after this much simulated time, ms (an endless pre-copy).
    pub horizon_ms: u64,
    /// Extra blackout of a post-copy switch on top of the device-state overhead, ms.
    pub postcopy_switch_ms: u64,
    /// Time a recovery attempt takes once the link is back, ms (when attempts are made is
    /// decided by the engine's `PostcopySupervisor`).
    pub postcopy_recover_ms: u64,
    /// Dirty-bitmap sync time per GiB of guest RAM, ms: `migration_bitmap_sync` fetches and
    /// walks a bitmap as large as RAM while the migration thread sends nothing.
    pub sync_ms_per_gib: f64,
    /// Fixed part of every sync (iterating RAM blocks and memory listeners), ms.
    pub sync_fixed_ms: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            tick_ms: 500,
            horizon_ms: 3_600_000,
            postcopy_switch_ms: 20,
            postcopy_recover_ms: 100,
            sync_ms_per_gib: 2.0,
            sync_fixed_ms: 0.5,
        }
    }
}

/// How a simulated migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SimResult {
    /// The guest runs on the destination.
    Completed,
    /// The policy aborted; the guest stays on the source.
    Aborted,
    /// Still migrating at the horizon (an endless pre-copy).
    TimedOut,
    /// Post-copy failed without recovery, or stayed paused beyond the recovery window: the
    /// guest stopped (restarted by the manager).
    VmLost,
}

/// The measured outcome of one simulated migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimOutcome {
    /// Scenario id.
    pub scenario_id: u64,
    /// Policy name.
    pub policy: String,
    /// Context.
    pub context: MigrationContext,
    /// How it ended.
    pub result: SimResult,
    /// Time from start to the end, ms.
    pub total_ms: u64,
    /// Blackout (vCPUs stopped), ms, when the guest moved.
    pub downtime_ms: Option<u64>,
    /// Bytes sent over the link.
    pub bytes_sent: u64,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// Time with the vCPUs throttled (auto-converge or dirty-limit), ms.
    pub throttled_ms: u64,
    /// Highest throttle applied, %.
    pub max_throttle_pct: u8,
    /// Time in post-copy (guest degraded), ms.
    pub postcopy_ms: u64,
    /// Pre-copy passes (final `dirty-sync-count`).
    pub passes: u64,
    /// Pre-copy restarts after a link-down.
    pub retries: u32,
    /// Whether a `SwitchToPostcopy` happened.
    pub used_postcopy: bool,
    /// Whether the guest was paused to finish.
    pub paused: bool,
    /// Decisions that changed something (not `Continue`).
    pub actions: u32,
    /// The first SLA or context requirement broken, if any.
    pub sla_violation: Option<String>,
    /// The policy's ETA error for a completed run: the median over every estimate made from 25 %
    /// of the run's total time on of |estimated finish − actual finish| ÷ total time. `None` when
    /// the run did not complete or the policy gave no estimate in that window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_error_from_25pct: Option<f64>,
}

impl SimOutcome {
    /// Whether the guest ended up on the destination.
    pub fn completed(&self) -> bool {
        self.result == SimResult::Completed
    }
}

/// One recorded decision (for traces).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// When, ms since the original start.
    pub at_ms: u64,
    /// What the policy decided.
    pub decision: Decision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Precopy,
    Paused,
    Postcopy,
}

struct Run<'a> {
    sc: &'a Scenario,
    cfg: SimConfig,
    plan: MigrationPlan,
    /// Absolute simulated time, seconds.
    t: f64,
    /// Start of the current attempt, seconds.
    attempt_start: f64,
    mode: Mode,
    pass: u64,
    pass_left: f64,
    /// The guest's pages and the writes into them.
    mem: GuestMemory,
    /// Wire bytes the current pass had to send when it started.
    pass_bytes: f64,
    /// Its pages × page size (QEMU's `remaining` at the start of the pass).
    pass_raw: f64,
    transferred: f64,
    transferred_attempt: f64,
    downtime_limit_ms: u64,
    max_bw: f64,
    throttle_initial: u8,
    throttle_inc: u8,
    throttle_max: u8,
    throttle: u8,
    dirty_limit_mb: Option<u64>,
    dirty_limit_active: bool,
    period_start: f64,
    period_dirty: f64,
    period_xfer: f64,
    high_cnt: u32,
    last_dirty_rate_pages: f64,
    next_tick: f64,
    pause_at: Option<f64>,
    pc_left: f64,
    out: SimOutcome,
    trace: Option<Vec<TraceEntry>>,
    finished: bool,
    /// (when, estimated finish) of every ETA the policy gave, ms.
    etas: Vec<(u64, u64)>,
}

const EPS: f64 = 1e-9;

impl<'a> Run<'a> {
    fn link_at(&self, t: f64) -> (f64, Option<OutageKind>) {
        let ms = t * 1000.0;
        for o in &self.sc.outages {
            if ms >= o.start_ms as f64 && ms < (o.start_ms + o.duration_ms) as f64 {
                return (0.0, Some(o.kind));
            }
        }
        (self.sc.link_bytes_per_s as f64, None)
    }

    /// The rate the migration gets at `t`: the link, capped by the policy's `max-bandwidth` and
    /// by the hosts' migration bandwidth cap. The hosts' cap is the operator's and applies to
    /// every policy alike: each manager has its knob for it (Nova `live_migration_bandwidth`,
    /// KubeVirt `bandwidthPerMigration`, Proxmox `bwlimit: migration=`, oVirt
    /// `migration_max_bandwidth`), so a baseline that does not set `max-bandwidth` itself still
    /// runs under the cap the operator configured for it.
    fn bw_at(&self, t: f64) -> f64 {
        let (l, _) = self.link_at(t);
        let host_cap = self
            .sc
            .host_bandwidth_cap()
            .map_or(f64::INFINITY, |c| c as f64);
        l.min(self.max_bw).min(host_cap)
    }

    fn next_link_change(&self, t: f64) -> f64 {
        let ms = t * 1000.0;
        let mut best = f64::INFINITY;
        for o in &self.sc.outages {
            for edge in [o.start_ms as f64, (o.start_ms + o.duration_ms) as f64] {
                if edge > ms + 1e-6 {
                    best = best.min(edge / 1000.0);
                }
            }
        }
        best
    }

    fn next_phase_change(&self, t: f64) -> f64 {
        self.mem
            .workload()
            .next_phase_ms(t * 1000.0)
            .map_or(f64::INFINITY, |ms| ms as f64 / 1000.0)
    }

    /// Wire bytes of a set of pages: data pages whole, or as an XBZRLE delta when the page is
    /// in the cache; zero pages as a marker.
    fn pages_cost(&self, p: SyncFound) -> f64 {
        let page = self.sc.page_size as f64;
        let delta = page * (1.0 - self.sc.xbzrle_saving.clamp(0.0, 1.0));
        let whole = p.data_pages.saturating_sub(p.cached_pages) as f64;
        whole * (page + PAGE_HEADER_BYTES)
            + p.cached_pages as f64 * (delta + PAGE_HEADER_BYTES)
            + p.pages.saturating_sub(p.data_pages) as f64 * ZERO_PAGE_BYTES
    }

    /// XBZRLE cache size in pages when the migration uses XBZRLE (QEMU's default
    /// `xbzrle-cache-size` is 64 MiB, migration/options.c `DEFAULT_MIGRATE_XBZRLE_CACHE_SIZE`).
    fn xbzrle_cache_pages(&self) -> Option<u64> {
        (self.plan.capabilities.xbzrle && self.sc.features.xbzrle)
            .then(|| (64u64 << 20) / self.sc.page_size.max(1))
    }

    /// What QEMU reports as `remaining`: dirty pages × page size, zero pages included
    /// (`ram.c::ram_bytes_remaining`), whatever they cost on the wire.
    fn remaining_raw(&self) -> f64 {
        if self.pass_bytes > 0.0 {
            self.pass_raw * (self.pass_left / self.pass_bytes).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// The guest runs `dt` seconds while the migration thread sends nothing (a bitmap sync).
    fn stall(&mut self, dt: f64) {
        if dt > 0.0 {
            let scale = self.write_scale();
            self.mem.accrue(self.t, dt, scale);
            self.t += dt;
        }
    }

    /// Effective ÷ nominal write rate now.
    fn write_scale(&self) -> f64 {
        let raw = self.mem.nominal_pages_per_s(self.t);
        if raw > 0.0 {
            self.write_rate() / raw
        } else {
            0.0
        }
    }

    /// Effective raw write rate (pages/s) now.
    fn write_rate(&self) -> f64 {
        if self.mode == Mode::Paused {
            return 0.0;
        }
        let raw = self.mem.nominal_pages_per_s(self.t);
        let mut r = raw * (1.0 - f64::from(self.throttle) / 100.0);
        if let Some(mb) = self.dirty_limit_mb.filter(|_| self.dirty_limit_active) {
            let cap = mb as f64 * 1e6 * f64::from(self.sc.vcpus.max(1)) / self.sc.page_size as f64;
            r = r.min(cap);
        }
        r
    }

    fn degraded_pct(&self) -> u8 {
        let raw = self.mem.nominal_pages_per_s(self.t);
        if raw <= 0.0 || self.mode == Mode::Paused {
            // A paused guest counts as downtime, not as throttled.
            return self.throttle;
        }
        let eff = self.write_rate();
        let by_rate = ((1.0 - eff / raw) * 100.0).round().clamp(0.0, 99.0) as u8;
        by_rate.max(self.throttle)
    }

    fn rel_ms(&self) -> u64 {
        ((self.t - self.attempt_start) * 1000.0).round().max(0.0) as u64
    }

    fn sample(&self) -> IterationSample {
        let b = self.bw_at(self.t);
        let remaining = match self.mode {
            Mode::Postcopy => self.pc_left,
            _ => self.remaining_raw(),
        };
        IterationSample {
            at_ms: self.rel_ms(),
            pass: self.pass,
            transferred_bytes: self.transferred_attempt as u64,
            remaining_bytes: remaining.max(0.0) as u64,
            total_bytes: self.sc.ram_bytes,
            dirty_pages_rate: self.last_dirty_rate_pages as u64,
            page_size: self.sc.page_size,
            throughput_bytes_per_s: b as u64,
            expected_downtime_ms: (b > 0.0).then(|| (remaining / b * 1000.0) as u64),
            throttle_pct: (self.throttle > 0).then_some(self.throttle),
            phase: match self.mode {
                Mode::Precopy => Phase::Precopy,
                Mode::Paused => Phase::PausedPrecopy,
                Mode::Postcopy => Phase::Postcopy,
            },
        }
    }

    /// Time to push `bytes` through the link starting now, honouring outages (seconds).
    fn send_time(&self, bytes: f64) -> f64 {
        let mut left = bytes;
        let mut t = self.t;
        for _ in 0..64 {
            if left <= EPS {
                break;
            }
            let b = self.bw_at(t);
            let next = self.next_link_change(t);
            if b <= 0.0 {
                if next.is_infinite() {
                    return f64::INFINITY;
                }
                t = next;
                continue;
            }
            let need = left / b;
            if t + need <= next {
                t += need;
                left = 0.0;
            } else {
                left -= b * (next - t);
                t = next;
            }
        }
        t - self.t
    }

    fn complete_stop_and_copy(&mut self, pending: f64) {
        let send = self.send_time(pending);
        let blackout_start = self.pause_at.unwrap_or(self.t);
        self.transferred += pending;
        self.t += send;
        let overhead = self.sc.switchover_overhead_ms as f64 / 1000.0;
        self.t += overhead;
        let downtime = self.t - blackout_start;
        self.out.downtime_ms = Some((downtime * 1000.0).round() as u64);
        self.out.result = SimResult::Completed;
        // The final sync of stop-and-copy (`ram.c::ram_save_complete`) counts in
        // `dirty-sync-count`.
        self.pass += 1;
        self.finished = true;
    }

    /// QEMU's completion test with the exact pending size (after a downtime change or a sync):
    /// `remaining` (pages × page size, `raw`) against bandwidth × downtime-limit
    /// (`migration.c::migration_iteration_run`); the stop then sends `wire` bytes.
    fn completion_check(&mut self, wire: f64, raw: f64) -> bool {
        let b = self.bw_at(self.t);
        if b <= 0.0 {
            return false;
        }
        let threshold = b * self.downtime_limit_ms as f64 / 1000.0;
        if raw <= threshold || wire <= EPS {
            self.complete_stop_and_copy(wire);
            return true;
        }
        false
    }

    /// Advances by `dt` seconds with constant rates.
    fn advance(&mut self, dt: f64) {
        if dt <= 0.0 {
            return;
        }
        let b = self.bw_at(self.t);
        let deg = self.degraded_pct();
        if deg > 0 && self.mode != Mode::Postcopy {
            self.out.throttled_ms += (dt * 1000.0) as u64;
            self.out.max_throttle_pct = self.out.max_throttle_pct.max(deg);
        }
        match self.mode {
            Mode::Precopy | Mode::Paused => {
                let sent = (b * dt).min(self.pass_left.max(0.0));
                self.pass_left -= sent;
                self.transferred += sent;
                self.transferred_attempt += sent;
                self.period_xfer += sent;
                let scale = self.write_scale();
                self.mem.accrue(self.t, dt, scale);
            }
            Mode::Postcopy => {
                let sent = (b * dt).min(self.pc_left);
                self.pc_left -= sent;
                self.transferred += sent;
                self.transferred_attempt += sent;
                self.out.postcopy_ms += (dt * 1000.0) as u64;
            }
        }
        self.t += dt;
    }

    fn sync(&mut self) {
        let found = self.mem.sync(self.xbzrle_cache_pages());
        // QEMU's dirty-pages-rate counts pages, whatever they cost on the wire.
        self.period_dirty += found.pages as f64 * self.sc.page_size as f64;
        self.pass += 1;
        self.pass_left = self.pages_cost(found);
        self.pass_bytes = self.pass_left;
        self.pass_raw = found.pages as f64 * self.sc.page_size as f64;
        let gib = self.sc.ram_bytes as f64 / (1u64 << 30) as f64;
        self.stall((self.cfg.sync_fixed_ms + self.cfg.sync_ms_per_gib * gib) / 1000.0);
        let period = self.t - self.period_start;
        if period >= 1.0 {
            self.last_dirty_rate_pages = self.period_dirty / self.sc.page_size as f64 / period;
            let high = self.period_dirty > self.period_xfer * 0.5;
            if high {
                self.high_cnt += 1;
                if self.high_cnt >= 2 {
                    self.high_cnt = 0;
                    if self.plan.capabilities.auto_converge {
                        self.throttle = if self.throttle == 0 {
                            self.throttle_initial.min(99)
                        } else {
                            (self.throttle + self.throttle_inc)
                                .min(self.throttle_max)
                                .max(self.throttle)
                        };
                    } else if self.plan.capabilities.dirty_limit {
                        self.dirty_limit_active = true;
                    }
                }
            }
            self.period_start = self.t;
            self.period_dirty = 0.0;
            self.period_xfer = 0.0;
        }
    }

    fn apply(&mut self, policy: &mut dyn MigrationPolicy, obs: Observation) {
        let decisions = policy.decide(&self.plan, &obs);
        if let Some(finish) = policy.eta().and_then(|e| e.finish_at_ms) {
            self.etas.push(((self.t * 1000.0) as u64, finish));
        }
        for d in decisions {
            if self.finished {
                break;
            }
            if let Some(tr) = self.trace.as_mut() {
                tr.push(TraceEntry {
                    at_ms: (self.t * 1000.0) as u64,
                    decision: d.clone(),
                });
            }
            if d.action != Action::Continue {
                self.out.actions += 1;
            }
            match d.action {
                Action::Continue => {}
                Action::SetDowntimeLimit { ms } => {
                    self.downtime_limit_ms = ms.clamp(1, 2_000_000);
                    if self.mode != Mode::Postcopy {
                        let dirty = SyncFound {
                            pages: self.mem.dirty_pages(),
                            data_pages: self.mem.dirty_data_pages(),
                            cached_pages: 0,
                        };
                        let wire = self.pass_left + self.pages_cost(dirty);
                        let raw = self.remaining_raw() + (dirty.pages * self.sc.page_size) as f64;
                        self.completion_check(wire, raw);
                    }
                }
                Action::SetBandwidth { bytes_per_s } => self.max_bw = bytes_per_s.max(1) as f64,
                Action::SetCpuThrottle {
                    initial_pct,
                    increment_pct,
                    max_pct,
                } => {
                    self.throttle_initial = initial_pct;
                    self.throttle_inc = increment_pct;
                    self.throttle_max = max_pct.min(99);
                }
                Action::SetDirtyLimit { mb_per_s } => self.dirty_limit_mb = Some(mb_per_s),
                Action::SwitchToPostcopy => {
                    // QEMU refuses without the capability set before `migrate`.
                    if self.plan.capabilities.postcopy_ram && self.mode != Mode::Postcopy {
                        self.start_postcopy();
                    }
                }
                Action::PauseGuest => {
                    if self.mode == Mode::Precopy {
                        self.mode = Mode::Paused;
                        self.pause_at = Some(self.t);
                        self.out.paused = true;
                        // Nothing new gets dirty: the next sync completes.
                    }
                }
                Action::Abort => {
                    if self.mode != Mode::Postcopy {
                        self.out.result = SimResult::Aborted;
                        self.finished = true;
                    }
                }
            }
        }
    }

    fn start_postcopy(&mut self) {
        self.out.used_postcopy = true;
        let blackout =
            (self.sc.switchover_overhead_ms + self.cfg.postcopy_switch_ms) as f64 / 1000.0;
        let blackout_start = self.pause_at.unwrap_or(self.t);
        self.t += blackout;
        self.out.downtime_ms = Some(((self.t - blackout_start) * 1000.0).round() as u64);
        // Post-copy sends what the destination lacks, whole (no XBZRLE after the switch).
        let sent = (self.pass_bytes - self.pass_left).max(0.0);
        // Wire cost of the pass's data pages on average (some went as XBZRLE deltas).
        let p = self.mem.pass_pages();
        let zero_cost = ZERO_PAGE_BYTES;
        let data_cost = if p.data_pages > 0 {
            ((self.pass_bytes - (p.pages - p.data_pages) as f64 * zero_cost) / p.data_pages as f64)
                .max(0.0)
        } else {
            0.0
        };
        let missing = self
            .mem
            .postcopy_missing(sent, |data| if data { data_cost } else { zero_cost });
        // The switch's final sync (`ram.c::ram_postcopy_send_discard_bitmap`).
        self.pass += 1;
        self.pc_left = self.pages_cost(missing);
        self.pass_left = 0.0;
        self.throttle = 0;
        self.dirty_limit_active = false;
        self.mode = Mode::Postcopy;
    }

    fn restart_attempt(&mut self, resume_at: f64) {
        self.out.retries += 1;
        self.t = resume_at;
        self.attempt_start = resume_at;
        self.mode = Mode::Precopy;
        self.pass = 1;
        self.mem.restart();
        self.pass_left = self.pages_cost(self.mem.pass_pages());
        self.pass_bytes = self.pass_left;
        self.pass_raw = self.mem.pass_pages().pages as f64 * self.sc.page_size as f64;
        self.transferred_attempt = 0.0;
        self.throttle = 0;
        self.dirty_limit_active = false;
        self.period_start = resume_at;
        self.period_dirty = 0.0;
        self.period_xfer = 0.0;
        self.high_cnt = 0;
        self.pause_at = None;
        self.next_tick = resume_at + self.cfg.tick_ms as f64 / 1000.0;
    }
}

/// Simulates `scenario` under the policy made by `make_policy` (called again for a fresh
/// policy when a link-down forces the engine to restart the migration).
pub fn simulate_with(
    scenario: &Scenario,
    make_policy: &mut dyn FnMut() -> Box<dyn MigrationPolicy>,
    cfg: SimConfig,
    trace: bool,
) -> (SimOutcome, Vec<TraceEntry>) {
    let mut policy = make_policy();
    let input = scenario.plan_input();
    let plan = policy.plan(&input);
    let p = plan.parameters;
    let mem = GuestMemory::new(
        &scenario.effective_workload(),
        scenario.ram_bytes / scenario.page_size.max(1),
    );
    let mut run = Run {
        sc: scenario,
        cfg,
        t: 0.0,
        attempt_start: 0.0,
        mode: Mode::Precopy,
        pass: 1,
        pass_left: 0.0,
        mem,
        pass_bytes: 0.0,
        pass_raw: 0.0,
        transferred: 0.0,
        transferred_attempt: 0.0,
        downtime_limit_ms: p.downtime_limit_ms,
        max_bw: p.max_bandwidth_bytes_per_s.max(1) as f64,
        throttle_initial: p.cpu_throttle_initial_pct,
        throttle_inc: p.cpu_throttle_increment_pct,
        throttle_max: p.max_cpu_throttle_pct,
        throttle: 0,
        dirty_limit_mb: p.vcpu_dirty_limit_mb_per_s.or(Some(1)),
        dirty_limit_active: false,
        period_start: 0.0,
        period_dirty: 0.0,
        period_xfer: 0.0,
        high_cnt: 0,
        last_dirty_rate_pages: 0.0,
        next_tick: cfg.tick_ms as f64 / 1000.0,
        pause_at: None,
        pc_left: 0.0,
        out: SimOutcome {
            scenario_id: scenario.id,
            policy: policy.name().to_string(),
            context: scenario.context,
            result: SimResult::TimedOut,
            total_ms: 0,
            downtime_ms: None,
            bytes_sent: 0,
            ram_bytes: scenario.ram_bytes,
            throttled_ms: 0,
            max_throttle_pct: 0,
            postcopy_ms: 0,
            passes: 1,
            retries: 0,
            used_postcopy: false,
            paused: false,
            actions: 0,
            sla_violation: None,
            eta_error_from_25pct: None,
        },
        plan,
        trace: trace.then(Vec::new),
        finished: false,
        etas: vec![],
    };
    run.pass_left = run.pages_cost(run.mem.pass_pages());
    run.pass_bytes = run.pass_left;
    run.pass_raw = run.mem.pass_pages().pages as f64 * scenario.page_size as f64;
    let horizon = cfg.horizon_ms as f64 / 1000.0;
    let tick = cfg.tick_ms.max(1) as f64 / 1000.0;
    let mut steps = 0u64;
    while !run.finished && run.t < horizon && steps < 5_000_000 {
        steps += 1;
        let (b, outage) = run.link_at(run.t);
        // Link-down handling.
        if outage == Some(OutageKind::LinkDown) {
            let back = run.next_link_change(run.t);
            match run.mode {
                Mode::Postcopy => {
                    // The engine's own supervisor decides when recovery is attempted and
                    // when to give up (stranded counts as lost here: the guest stops).
                    let resumed = run.plan.postcopy_recovery.then(|| {
                        crate::postcopy::recovery_after_link_down(
                            (run.t * 1000.0) as u64,
                            (back * 1000.0).ceil() as u64,
                            cfg.postcopy_recover_ms,
                            crate::postcopy::PostcopyTimings::default(),
                        )
                    });
                    if let Some(Some(resume_ms)) = resumed {
                        let resume = resume_ms as f64 / 1000.0;
                        run.out.postcopy_ms += ((resume - run.t) * 1000.0) as u64;
                        run.t = resume;
                        continue;
                    }
                    run.out.result = SimResult::VmLost;
                    run.finished = true;
                    break;
                }
                Mode::Precopy | Mode::Paused => {
                    // The socket errors; the guest (resumed if paused) stays on the source and
                    // the engine retries from scratch with a fresh policy when the link is back.
                    let elapsed_ms = (back * 1000.0) as u64;
                    policy = make_policy();
                    let mut input = scenario.plan_input();
                    input.deadline_ms = input
                        .deadline_ms
                        .map(|d| d.saturating_sub(elapsed_ms).max(1));
                    run.plan = policy.plan(&input);
                    let p = run.plan.parameters;
                    run.downtime_limit_ms = p.downtime_limit_ms;
                    run.max_bw = p.max_bandwidth_bytes_per_s.max(1) as f64;
                    run.throttle_initial = p.cpu_throttle_initial_pct;
                    run.throttle_inc = p.cpu_throttle_increment_pct;
                    run.throttle_max = p.max_cpu_throttle_pct;
                    run.restart_attempt(back);
                    continue;
                }
            }
        }
        let next_change = run
            .next_link_change(run.t)
            .min(run.next_phase_change(run.t));
        let to_tick = (run.next_tick - run.t).max(0.0);
        match run.mode {
            Mode::Precopy | Mode::Paused => {
                let to_pass_end = if b > 0.0 {
                    run.pass_left.max(0.0) / b
                } else {
                    f64::INFINITY
                };
                let dt = to_pass_end
                    .min(to_tick)
                    .min(next_change - run.t)
                    .min(horizon - run.t);
                run.advance(dt.max(0.0));
                if run.pass_left <= 1.0 && to_pass_end <= dt + EPS {
                    run.sync();
                    let (wire, raw) = (run.pass_left, run.remaining_raw());
                    if run.completion_check(wire, raw) {
                        break;
                    }
                    let s = run.sample();
                    run.apply(policy.as_mut(), Observation::PassCompleted(s));
                    if run.finished {
                        break;
                    }
                }
            }
            Mode::Postcopy => {
                let to_done = if b > 0.0 {
                    run.pc_left / b
                } else {
                    f64::INFINITY
                };
                let dt = to_done
                    .min(to_tick)
                    .min(next_change - run.t)
                    .min(horizon - run.t);
                run.advance(dt.max(0.0));
                if run.pc_left <= 1.0 {
                    run.out.result = SimResult::Completed;
                    run.finished = true;
                    break;
                }
            }
        }
        if run.t + EPS >= run.next_tick {
            run.next_tick += tick;
            let s = run.sample();
            run.apply(
                policy.as_mut(),
                Observation::Tick {
                    at_ms: s.at_ms,
                    latest: Some(s),
                },
            );
        }
    }
    run.out.total_ms = (run.t.min(horizon.max(run.t)) * 1000.0).round() as u64;
    run.out.bytes_sent = run.transferred as u64;
    run.out.passes = run.pass;
    run.out.sla_violation = judge(scenario, &run.out);
    if run.out.completed() {
        run.out.eta_error_from_25pct = eta_error_from(&run.etas, run.out.total_ms, 0.25);
    }
    let trace = run.trace.take().unwrap_or_default();
    (run.out, trace)
}

/// Simulates `scenario` under the named policy with default settings.
pub fn simulate(
    scenario: &Scenario,
    policy: &str,
) -> Result<SimOutcome, tern_policy::UnknownPolicy> {
    tern_policy::policy_by_name(policy)?;
    let mut make = || tern_policy::policy_by_name(policy).unwrap_or_else(|_| unreachable_policy());
    Ok(simulate_with(scenario, &mut make, SimConfig::default(), false).0)
}

fn unreachable_policy() -> Box<dyn MigrationPolicy> {
    Box::new(tern_policy::baselines::QemuDefaultPolicy)
}

/// Which SLA or context requirement the outcome broke, if any.
pub fn judge(sc: &Scenario, o: &SimOutcome) -> Option<String> {
    let sla = &sc.sla;
    match o.result {
        SimResult::VmLost => return Some("VM lost: post-copy failed without recovery".into()),
        SimResult::TimedOut if sc.context.must_finish() => {
            return Some(format!("{}: still in pre-copy at the horizon", sc.context));
        }
        SimResult::Aborted if sc.context.must_finish() => {
            return Some(format!("{}: aborted, but the VM had to move", sc.context));
        }
        _ => {}
    }
    if let Some(d) = sc
        .deadline_ms
        .filter(|d| sc.context.must_finish() && o.total_ms > *d)
    {
        return Some(format!(
            "{}: finished at {} ms after the deadline {d} ms",
            sc.context, o.total_ms
        ));
    }
    if let Some(dt) = o
        .downtime_ms
        .filter(|dt| o.completed() && *dt > sla.max_downtime_ms)
    {
        return Some(format!("downtime {dt} ms > SLA {} ms", sla.max_downtime_ms));
    }
    if o.max_throttle_pct > sla.max_throttle_pct {
        return Some(format!(
            "throttle {} % > SLA {} %",
            o.max_throttle_pct, sla.max_throttle_pct
        ));
    }
    if o.used_postcopy && !sla.post_copy_acceptable {
        return Some(format!(
            "post-copy used but SLA {:?} does not accept it",
            sla.name
        ));
    }
    None
}
