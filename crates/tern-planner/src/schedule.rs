//! Event-driven list scheduling over a fluid model of the links.
//!
//! Time advances from event to event (a migration ends, a retry's backoff expires). Between
//! events every running migration progresses at its max-min fair share of its source's egress
//! and destination's ingress (see `bandwidth.rs`). At each event, migrations start in priority
//! order while the source has an outbound slot (under the dispatch's cap and the host's
//! `max_outbound`), the destination an inbound slot, and, with the saturating start rule, the
//! source's egress still has room: a migration started on an already-full link only splits it,
//! which raises every running migration's ρ = dirty/bandwidth and makes each send more.
//!
//! A migration's bytes depend on its bandwidth (ρ). When its share changes, its remaining
//! bytes are rescaled by the new prediction at the new share, keeping its completed fraction.
//! The result records, for every start, which completion (or timer) released it: the controller
//! starts migrations on those triggers, so real durations that differ from the prediction shift
//! the schedule without ever exceeding its concurrency.

use serde::{Deserialize, Serialize};

use crate::bandwidth::{Flow, max_min_rates};
use crate::duration::{PredictedEnding, predict_from};
use crate::problem::Problem;

/// Share of a source's egress that must be free for the saturating rule to start another
/// migration there.
pub const SATURATION_SPARE: f64 = 0.1;

/// What releases a planned migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum StartTrigger {
    /// Start immediately.
    Now,
    /// Was already running when the plan was made.
    AlreadyRunning,
    /// Start when this VM's migration has ended (its slot and bandwidth are handed over).
    AfterMigrationOf {
        /// The VM whose migration releases this one.
        vm: String,
    },
    /// Start at this time (a retry's backoff).
    AtTime {
        /// Seconds from plan time.
        at_s: f64,
    },
}

/// How a scheduler dispatches (tern and the baselines differ only here and in placement).
#[derive(Debug, Clone)]
pub(crate) struct Dispatch {
    /// VM indices in priority order.
    pub order: Vec<usize>,
    /// Destination per VM (None: not scheduled).
    pub dest: Vec<Option<usize>>,
    /// Concurrent outgoing migrations per source (further capped by the host's `max_outbound`).
    pub per_source_cap: u32,
    /// Concurrent migrations in the whole cluster (KubeVirt `ParallelMigrationsPerCluster`).
    pub cluster_cap: Option<u32>,
    /// tern's rule: start another on a source only while its egress has room.
    pub saturate: bool,
    /// A VM that can only converge by throttling (no post-copy on its pair, ρ too high at a
    /// full stream) runs alone on its source: sharing the link would raise its ρ further and
    /// stretch it by more than the others gain.
    pub heavy_alone: bool,
}

/// Whether VM `v` going to `d` converges only with throttling or a stop-and-copy.
pub(crate) fn is_heavy(p: &Problem, v: usize, d: usize) -> bool {
    let pc = p.pair_post_copy(p.vms[v].src, d);
    !p.rule(v, d).post_copy
        && !matches!(
            p.vms[v].alone[usize::from(pc)].ending,
            PredictedEnding::Converges {
                throttle_pct: 0,
                ..
            }
        )
}

/// One simulated migration.
#[derive(Debug, Clone)]
pub(crate) struct SimMigration {
    pub dst: usize,
    pub start_s: f64,
    pub end_s: f64,
    pub trigger: StartTrigger,
    pub bytes: f64,
    pub ending: PredictedEnding,
    pub start_rate: f64,
}

/// Result of one simulation.
#[derive(Debug, Clone)]
pub(crate) struct Simulated {
    pub per_vm: Vec<Option<SimMigration>>,
    pub makespan_s: f64,
    /// Highest number of concurrent migrations per source seen.
    pub peak_concurrency: u32,
}

struct Run {
    vm: usize,
    src: usize,
    dst: usize,
    remaining: f64,
    total: f64,
    rate: f64,
    first_pass: f64,
    in_post_copy: bool,
}

/// Simulates `dispatch` on `p`.
pub(crate) fn simulate(p: &Problem, dispatch: &Dispatch) -> Simulated {
    let nh = p.req.hosts.len();
    let mut per_vm: Vec<Option<SimMigration>> = vec![None; p.vms.len()];
    let mut runs: Vec<Option<Run>> = Vec::new();
    let mut at_host: Vec<Vec<usize>> = vec![Vec::new(); nh];
    let mut outbound = vec![0u32; nh];
    let mut inbound = vec![0u32; nh];
    let mut running_total = 0u32;
    let mut peak = 0u32;
    // Pending VMs per source, in priority order.
    let mut pending: Vec<Vec<usize>> = vec![Vec::new(); nh];
    let in_flight: Vec<bool> = {
        let mut f = vec![false; p.vms.len()];
        for e in &p.in_flight {
            f[e.vm] = true;
        }
        f
    };
    for &v in &dispatch.order {
        if dispatch.dest[v].is_some() && !in_flight[v] {
            pending[p.vms[v].src].push(v);
        }
    }
    let sources: Vec<usize> = (0..nh).filter(|&h| !pending[h].is_empty()).collect();
    let heavy: Vec<bool> = (0..p.vms.len())
        .map(|v| dispatch.heavy_alone && dispatch.dest[v].is_some_and(|d| is_heavy(p, v, d)))
        .collect();
    let mut timers: Vec<f64> = p
        .vms
        .iter()
        .map(|v| v.not_before_s)
        .filter(|t| *t > 0.0)
        .collect();
    timers.sort_by(f64::total_cmp);
    timers.dedup();

    let start_run = |runs: &mut Vec<Option<Run>>,
                     at_host: &mut Vec<Vec<usize>>,
                     vm: usize,
                     dst: usize,
                     first_pass: f64,
                     in_post_copy: bool| {
        let src = p.vms[vm].src;
        let id = runs.len();
        runs.push(Some(Run {
            vm,
            src,
            dst,
            remaining: first_pass,
            total: 0.0,
            rate: 0.0,
            first_pass,
            in_post_copy,
        }));
        at_host[src].push(id);
        at_host[dst].push(id);
        id
    };
    let mut t = 0.0f64;
    // Live run ids (the slab keeps finished ones as None).
    let mut active: Vec<usize> = Vec::new();
    for e in &p.in_flight {
        active.push(start_run(
            &mut runs,
            &mut at_host,
            e.vm,
            e.dst,
            e.remaining,
            e.in_post_copy,
        ));
        let src = p.vms[e.vm].src;
        outbound[src] += 1;
        inbound[e.dst] += 1;
        running_total += 1;
        per_vm[e.vm] = Some(SimMigration {
            dst: e.dst,
            start_s: -e.elapsed_s,
            end_s: f64::NAN,
            trigger: StartTrigger::AlreadyRunning,
            bytes: 0.0,
            ending: PredictedEnding::Converges {
                passes: 0,
                throttle_pct: 0,
            },
            start_rate: 0.0,
        });
    }
    let mut dirty_hosts: Vec<usize> = p.in_flight.iter().map(|e| p.vms[e.vm].src).collect();
    refresh(p, &mut runs, &at_host, &mut dirty_hosts, &mut per_vm);
    let mut trigger = StartTrigger::Now;
    loop {
        // Start phase.
        for &s in &sources {
            let cap = dispatch
                .per_source_cap
                .min(p.req.hosts[s].max_outbound)
                .max(1);
            let mut i = 0;
            while i < pending[s].len() && outbound[s] < cap {
                if dispatch.cluster_cap.is_some_and(|c| running_total >= c) {
                    break;
                }
                if dispatch.heavy_alone
                    && outbound[s] > 0
                    && (at_host[s]
                        .iter()
                        .filter_map(|&id| runs[id].as_ref())
                        .any(|r| r.src == s && heavy[r.vm])
                        || heavy[pending[s][i]])
                {
                    break;
                }
                if dispatch.saturate && outbound[s] > 0 {
                    let used: f64 = at_host[s]
                        .iter()
                        .filter_map(|&id| runs[id].as_ref())
                        .filter(|r| r.src == s)
                        .map(|r| r.rate)
                        .sum();
                    if used >= (1.0 - SATURATION_SPARE) * p.egress[s] {
                        break;
                    }
                }
                let v = pending[s][i];
                let Some(d) = dispatch.dest[v] else {
                    i += 1;
                    continue;
                };
                if inbound[d] >= p.req.hosts[d].max_inbound || p.vms[v].not_before_s > t + 1e-9 {
                    i += 1;
                    continue;
                }
                pending[s].remove(i);
                active.push(start_run(
                    &mut runs,
                    &mut at_host,
                    v,
                    d,
                    p.vms[v].memory as f64,
                    false,
                ));
                outbound[s] += 1;
                inbound[d] += 1;
                running_total += 1;
                peak = peak.max(outbound[s]);
                per_vm[v] = Some(SimMigration {
                    dst: d,
                    start_s: t,
                    end_s: f64::NAN,
                    trigger: trigger.clone(),
                    bytes: 0.0,
                    ending: PredictedEnding::Converges {
                        passes: 0,
                        throttle_pct: 0,
                    },
                    start_rate: 0.0,
                });
                dirty_hosts.push(s);
                dirty_hosts.push(d);
                refresh(p, &mut runs, &at_host, &mut dirty_hosts, &mut per_vm);
            }
        }
        // Next event.
        let mut next = f64::INFINITY;
        for r in active.iter().filter_map(|&id| runs[id].as_ref()) {
            if r.rate > 0.0 {
                next = next.min(t + r.remaining / r.rate);
            }
        }
        let timer = timers.iter().copied().find(|&x| x > t + 1e-9);
        let timer_first = timer.is_some_and(|x| x < next);
        if next.is_infinite() && timer.is_none() {
            break;
        }
        let new_t = if timer_first {
            timer.unwrap_or(next)
        } else {
            next
        };
        let dt = new_t - t;
        t = new_t;
        let mut finished: Vec<usize> = Vec::new();
        for &id in &active {
            if let Some(r) = runs[id].as_mut() {
                r.remaining -= r.rate * dt;
                if r.remaining <= 1e-7 * r.total.max(1.0) {
                    finished.push(id);
                }
            }
        }
        trigger = if finished.is_empty() {
            StartTrigger::AtTime { at_s: t }
        } else {
            let first = finished
                .iter()
                .filter_map(|&id| runs[id].as_ref().map(|r| r.vm))
                .min()
                .unwrap_or(0);
            StartTrigger::AfterMigrationOf {
                vm: p.req.vms[first].name.clone(),
            }
        };
        for id in finished {
            if let Some(r) = runs[id].take() {
                active.retain(|&x| x != id);
                outbound[r.src] -= 1;
                inbound[r.dst] -= 1;
                running_total -= 1;
                at_host[r.src].retain(|&x| x != id);
                at_host[r.dst].retain(|&x| x != id);
                if let Some(m) = per_vm[r.vm].as_mut() {
                    m.end_s = t;
                }
                dirty_hosts.push(r.src);
                dirty_hosts.push(r.dst);
            }
        }
        refresh(p, &mut runs, &at_host, &mut dirty_hosts, &mut per_vm);
    }
    let makespan_s = per_vm
        .iter()
        .flatten()
        .map(|m| m.end_s)
        .filter(|e| e.is_finite())
        .fold(0.0, f64::max);
    Simulated {
        per_vm,
        makespan_s,
        peak_concurrency: peak,
    }
}

/// Recomputes the rates of the flows connected (through shared hosts) to `dirty` hosts, and
/// rescales their remaining bytes to the prediction at the new rate.
fn refresh(
    p: &Problem,
    runs: &mut [Option<Run>],
    at_host: &[Vec<usize>],
    dirty: &mut Vec<usize>,
    per_vm: &mut [Option<SimMigration>],
) {
    if dirty.is_empty() {
        return;
    }
    let mut comp: Vec<usize> = Vec::new();
    let mut hosts_seen: Vec<usize> = Vec::new();
    let mut stack = std::mem::take(dirty);
    while let Some(h) = stack.pop() {
        if hosts_seen.contains(&h) {
            continue;
        }
        hosts_seen.push(h);
        for &id in &at_host[h] {
            if !comp.contains(&id)
                && let Some(r) = &runs[id]
            {
                comp.push(id);
                stack.push(r.src);
                stack.push(r.dst);
            }
        }
    }
    comp.sort_unstable();
    let flows: Vec<Flow> = comp
        .iter()
        .filter_map(|&id| runs[id].as_ref())
        .map(|r| Flow {
            src: r.src,
            dst: r.dst,
            cap: p.stream_cap,
        })
        .collect();
    let rates = max_min_rates(&flows, &p.egress, &p.ingress);
    for (&id, &rate) in comp.iter().zip(&rates) {
        let Some(r) = runs[id].as_mut() else { continue };
        if (rate - r.rate).abs() <= 1e-9 * rate.max(1.0) && r.total > 0.0 {
            continue;
        }
        let rule = p.rule(r.vm, r.dst);
        let (total, ending) = if r.in_post_copy {
            (
                r.first_pass,
                PredictedEnding::PostCopy {
                    passes: 0,
                    post_copy_s: r.first_pass / rate.max(1.0),
                },
            )
        } else {
            let pred = predict_from(rule, r.first_pass, rate);
            (pred.bytes, pred.ending)
        };
        if r.total > 0.0 {
            r.remaining *= total / r.total;
        } else {
            r.remaining = total;
        }
        r.total = total;
        r.rate = rate;
        if let Some(m) = per_vm[r.vm].as_mut() {
            if m.start_rate == 0.0 {
                m.start_rate = rate;
            }
            m.bytes = total;
            m.ending = ending;
        }
    }
}
