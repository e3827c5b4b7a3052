//! Independent evaluation of a plan: a time-stepped simulation of every migration, pass by pass.
//!
//! It does not reuse any scheduler's prediction. It executes the plan as the controller would
//! (start each migration when its trigger fires, in plan order, only while the hosts' own
//! outbound/inbound limits allow) and simulates each migration's memory: bytes sent at the
//! max-min fair share of the links at that instant, pages dirtied continuously by the saturating
//! curve `D' = r(1 − D/W)` (integrated exactly over each step), the pass-boundary rule of `duration.rs` applied with the bandwidth
//! of that instant (the runtime policy every scheduler shares). The planner instead predicts
//! each migration in closed form at piecewise-constant rates; the difference between the two is
//! the prediction error the comparison reports.

use serde::{Deserialize, Serialize};

use crate::bandwidth::{Flow, max_min_rates};
use crate::duration::{ConvergenceRule, PassStep};
use crate::facts::{EvacuationRequest, POSTCOPY_RAM, RequestError};
use crate::plan::EvacuationPlan;
use crate::schedule::StartTrigger;

/// Largest step, per lower-bound duration. Steps end exactly at pass boundaries and migration
/// ends; between them rates are constant and dirtying is integrated exactly, so this only
/// bounds how long a step may be.
const STEPS_PER_BOUND: f64 = 4000.0;
/// Bytes left below which a pass or a migration counts as done (float noise).
const EPS_BYTES: f64 = 1e-3;
/// Hard stop: simulated time beyond this many lower bounds is reported as not finished.
const MAX_BOUNDS: f64 = 200.0;

/// One migration as the evaluator saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluatedMigration {
    /// The VM.
    pub vm: String,
    /// Start, s.
    pub start_s: f64,
    /// End, s (NaN when it never ended).
    pub end_s: f64,
    /// Bytes sent.
    pub bytes: f64,
    /// Switched to post-copy.
    pub post_copy: bool,
    /// Ended with a stop-and-copy over the SLA.
    pub stop_and_copy: bool,
    /// Gave up (optional context): the VM stayed.
    pub gave_up: bool,
}

/// The evaluation of one plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// When the last migration ended, s.
    pub makespan_s: f64,
    /// Per migration, in plan order.
    pub migrations: Vec<EvaluatedMigration>,
    /// Highest concurrent outgoing migrations seen on any host.
    pub peak_outbound: u32,
    /// Migrations that never started or never ended.
    pub unfinished: Vec<String>,
    /// Hosts whose placed memory exceeds their free memory.
    pub over_capacity: Vec<String>,
}

enum Phase {
    Waiting,
    PreCopy {
        pass: u32,
        pass_size: f64,
        left: f64,
        dirty: f64,
        throttle: u8,
    },
    Final {
        left: f64,
    },
    Done,
}

struct Live {
    src: usize,
    dst: usize,
    rule: ConvergenceRule,
    phase: Phase,
    out: EvaluatedMigration,
}

/// Replays `plan` for `req`.
pub fn evaluate(
    req: &EvacuationRequest,
    plan: &EvacuationPlan,
) -> Result<Evaluation, RequestError> {
    let host = |name: &str| req.hosts.iter().position(|h| h.name == name);
    let nh = req.hosts.len();
    let egress: Vec<f64> = req
        .hosts
        .iter()
        .map(|h| h.egress_bytes_per_s as f64)
        .collect();
    let ingress: Vec<f64> = req
        .hosts
        .iter()
        .map(|h| h.ingress_bytes_per_s as f64)
        .collect();
    let cap = req
        .settings
        .stream_cap_bytes_per_s
        .map_or(f64::INFINITY, |c| c.max(1) as f64);
    let mut live: Vec<Live> = Vec::new();
    let mut placed = vec![0u64; nh];
    for m in &plan.migrations {
        let vm = req.vms.iter().find(|v| v.name == m.vm).ok_or_else(|| {
            RequestError::UnknownInFlight {
                vm: m.vm.clone(),
                destination: m.destination.clone(),
            }
        })?;
        let (Some(src), Some(dst)) = (host(&m.source), host(&m.destination)) else {
            return Err(RequestError::UnknownHost(m.destination.clone()));
        };
        placed[dst] += vm.memory_bytes;
        let (s, d) = (&req.hosts[src], &req.hosts[dst]);
        let pair_pc = s.permit_post_copy
            && d.permit_post_copy
            && s.features.contains(POSTCOPY_RAM)
            && d.features.contains(POSTCOPY_RAM);
        live.push(Live {
            src,
            dst,
            rule: ConvergenceRule::new(vm, req.context, pair_pc),
            phase: Phase::Waiting,
            out: EvaluatedMigration {
                vm: m.vm.clone(),
                start_s: f64::NAN,
                end_s: f64::NAN,
                bytes: 0.0,
                post_copy: false,
                stop_and_copy: false,
                gave_up: false,
            },
        });
    }
    let over_capacity = (0..nh)
        .filter(|&d| placed[d] > req.hosts[d].free_memory_bytes)
        .map(|d| req.hosts[d].name.clone())
        .collect();
    let bound = plan
        .lower_bound
        .any_schedule_s
        .max(plan.predicted_makespan_s * 0.5);
    let dt = (bound / STEPS_PER_BOUND).max(1e-3);
    let horizon = bound.max(1.0) * MAX_BOUNDS;
    let mut outbound = vec![0u32; nh];
    let mut inbound = vec![0u32; nh];
    let mut peak = 0u32;
    let mut rates: Vec<f64> = vec![0.0; live.len()];
    let mut flows_changed = true;
    let mut t = 0.0f64;
    loop {
        // Starts, in plan order.
        for i in 0..live.len() {
            if !matches!(live[i].phase, Phase::Waiting) {
                continue;
            }
            let m = &plan.migrations[i];
            let ready = match &m.trigger {
                StartTrigger::Now => true,
                StartTrigger::AlreadyRunning => true,
                StartTrigger::AtTime { at_s } => t + 1e-9 >= *at_s,
                StartTrigger::AfterMigrationOf { vm } => live
                    .iter()
                    .find(|l| &l.out.vm == vm)
                    .is_none_or(|l| matches!(l.phase, Phase::Done)),
            };
            let (s, d) = (live[i].src, live[i].dst);
            if !ready
                || outbound[s] >= req.hosts[s].max_outbound
                || inbound[d] >= req.hosts[d].max_inbound
            {
                continue;
            }
            outbound[s] += 1;
            inbound[d] += 1;
            peak = peak.max(outbound[s]);
            let f = req.in_flight.iter().find(|f| f.vm == m.vm);
            let l = &mut live[i];
            l.out.start_s = match f {
                Some(f) => -f.elapsed_s,
                None => t,
            };
            l.phase = match f {
                Some(f) if f.in_post_copy => {
                    l.out.post_copy = true;
                    Phase::Final {
                        left: f.remaining_bytes as f64,
                    }
                }
                Some(f) => Phase::PreCopy {
                    pass: 1,
                    pass_size: f.remaining_bytes as f64,
                    left: f.remaining_bytes as f64,
                    dirty: 0.0,
                    throttle: 0,
                },
                None => Phase::PreCopy {
                    pass: 1,
                    pass_size: l.rule.ram,
                    left: l.rule.ram,
                    dirty: 0.0,
                    throttle: 0,
                },
            };
            flows_changed = true;
        }
        let running: Vec<usize> = (0..live.len())
            .filter(|&i| matches!(live[i].phase, Phase::PreCopy { .. } | Phase::Final { .. }))
            .collect();
        if running.is_empty() {
            break;
        }
        if t > horizon {
            break;
        }
        if flows_changed {
            let flows: Vec<Flow> = running
                .iter()
                .map(|&i| Flow {
                    src: live[i].src,
                    dst: live[i].dst,
                    cap,
                })
                .collect();
            let r = max_min_rates(&flows, &egress, &ingress);
            for (k, &i) in running.iter().enumerate() {
                rates[i] = r[k];
            }
            flows_changed = false;
        }
        // Step to the next pass boundary or end (exact), at most `dt`.
        let mut step = dt;
        for &i in &running {
            let left = match live[i].phase {
                Phase::PreCopy { left, .. } | Phase::Final { left } => left,
                _ => continue,
            };
            if rates[i] > 0.0 {
                step = step.min(left.max(0.0) / rates[i]);
            }
        }
        let step = step.max(1e-9);
        for &i in &running {
            let rate = rates[i];
            let sent = rate * step;
            let l = &mut live[i];
            l.out.bytes += sent;
            let mut ended = false;
            match &mut l.phase {
                Phase::PreCopy {
                    pass,
                    pass_size,
                    left,
                    dirty,
                    throttle,
                } => {
                    let r = l.rule.dirty_rate * (1.0 - f64::from(*throttle) / 100.0);
                    let w = l.rule.working_set;
                    *dirty = w - (w - *dirty) * (-r * step / w).exp();
                    *left -= sent;
                    if *left <= EPS_BYTES {
                        let next = *dirty;
                        match l
                            .rule
                            .at_pass_boundary(*pass, *pass_size, next, rate, *throttle)
                        {
                            PassStep::Continue => {}
                            PassStep::RaiseThrottle(p) => *throttle = p,
                            PassStep::FinalCopy => l.phase = Phase::Final { left: next },
                            PassStep::StopAndCopy => {
                                l.out.stop_and_copy = true;
                                l.phase = Phase::Final { left: next };
                            }
                            PassStep::SwitchToPostCopy => {
                                l.out.post_copy = true;
                                l.phase = Phase::Final { left: next };
                            }
                            PassStep::GiveUp => {
                                l.out.gave_up = true;
                                ended = true;
                            }
                        }
                        if let Phase::PreCopy {
                            pass,
                            pass_size,
                            left,
                            dirty,
                            ..
                        } = &mut l.phase
                        {
                            *pass += 1;
                            *pass_size = next;
                            *left = next;
                            *dirty = 0.0;
                        }
                    }
                }
                Phase::Final { left } => {
                    *left -= sent;
                    ended = *left <= EPS_BYTES;
                }
                Phase::Waiting | Phase::Done => {}
            }
            if let Phase::Final { left } = l.phase
                && left <= EPS_BYTES
            {
                ended = true;
            }
            if ended {
                l.out.end_s = t + step;
                l.phase = Phase::Done;
                outbound[l.src] -= 1;
                inbound[l.dst] -= 1;
                flows_changed = true;
            }
        }
        t += step;
    }
    let makespan_s = live
        .iter()
        .map(|l| l.out.end_s)
        .filter(|e| e.is_finite())
        .fold(0.0, f64::max);
    let unfinished = live
        .iter()
        .filter(|l| !l.out.end_s.is_finite())
        .map(|l| l.out.vm.clone())
        .collect();
    Ok(Evaluation {
        makespan_s,
        migrations: live.into_iter().map(|l| l.out).collect(),
        peak_outbound: peak,
        unfinished,
        over_capacity,
    })
}
