//! tern's evacuation planner: which VM goes where, in what order, how many at once, and when the
//! last one lands. Pure: no I/O, no clock, no async; the same request always gives the same plan.
//!
//! Nobody predicts an evacuation today: Nova loops over servers client-side
//! (`host-evacuate-live`, one outgoing migration per compute by default), KubeVirt drains with
//! fixed caps (2 outbound per node, 5 per cluster), Proxmox `migrateall --maxworkers N`, CERN
//! drains serially. Glikson et al. (IBM) show minimising the makespan under per-host limits is
//! NP-hard and bound list scheduling and LPT; mVM (Kherbache et al., BtrPlace) models each
//! migration's duration from its dirty rate and link share and reports schedules 28 % shorter
//! than parallelism-capped ones. tern's planner does what mVM does with a heuristic instead of a
//! solver: a duration model from tern-policy's convergence model (`duration.rs`), bandwidth
//! shared max-min between concurrent migrations (`bandwidth.rs`), and an event-driven list
//! scheduler (`schedule.rs`) that keeps each source's egress busy without splitting it further
//! than needed, trying several orders and concurrency caps and keeping the fastest.
//!
//! The controller's calls:
//! 1. build an [`EvacuationRequest`] from the fleet ([`HostFacts`]), the VMs ([`VmFacts`]) and
//!    the context; [`plan_evacuation`] → [`EvacuationPlan`]: show it (dry run) or run it:
//!    start each [`PlannedMigration`] when its [`StartTrigger`] fires (at once, after another
//!    VM's migration ends, or at a time), never more than the plan runs at once;
//! 2. as migrations progress, [`replan`] with a [`Progress`] (VMs done, in flight, failed,
//!    hosts gone, observed dirty rates and link rates) → a new plan whose
//!    [`EvacuationPlan::deviations`] say what changed and what tern does about it;
//! 3. [`EvacuationPlan::deadline`] and [`EvacuationPlan::suggestions`] tell the operator early
//!    when the deadline is at risk and what would help.
//!
//! ```
//! use tern_planner::*;
//! use tern_policy::{MigrationContext, SlaCatalog};
//!
//! let host = |name: &str, free_gib: u64| HostFacts {
//!     name: name.into(),
//!     total_memory_bytes: 256 << 30,
//!     free_memory_bytes: free_gib << 30,
//!     qemu_version: QemuVersion::new(10, 0, 0),
//!     features: [POSTCOPY_RAM.to_string()].into(),
//!     permit_post_copy: true,
//!     max_outbound: 2,
//!     max_inbound: 2,
//!     egress_bytes_per_s: 1_250_000_000, // 10 Gbit/s
//!     ingress_bytes_per_s: 1_250_000_000,
//!     draining: false,
//!     reachable: true,
//! };
//! let vm = |name: &str, gib: u64, dirty: Option<u64>| VmFacts {
//!     name: name.into(),
//!     host: "h1".into(),
//!     memory_bytes: gib << 30,
//!     dirty_bytes_per_s: dirty,
//!     working_set_bytes: None,
//!     sla: SlaCatalog::builtin().get("standard").unwrap().clone(),
//!     post_copy_allowed: true,
//!     required_features: Default::default(),
//! };
//! let mut req = EvacuationRequest::new(
//!     MigrationContext::Evacuate,
//!     vec![host("h1", 0), host("h2", 64), host("h3", 64)],
//!     vec!["h1".into()],
//!     vec![vm("db", 16, Some(200 << 20)), vm("web", 4, None), vm("idle", 8, Some(0))],
//! );
//! req.deadline_s = Some(600.0);
//! let plan = plan_evacuation(&req).unwrap();
//! assert_eq!(plan.migrations.len(), 3);
//! assert!(plan.predicted_makespan_s >= plan.lower_bound.any_schedule_s);
//! assert!(matches!(plan.deadline, DeadlineVerdict::Met { .. }));
//! // The first migrations start now; the others when a named migration ends.
//! assert_eq!(plan.migrations[0].trigger, StartTrigger::Now);
//! ```
//!
//! [`baselines`] implements today's schedulers over the same model and [`evaluate`] replays any
//! plan in an independent time-stepped simulation, so the comparison (`examples/compare.rs`)
//! does not trust any scheduler's own prediction. [`cases`] generates seeded fleets.

#![warn(missing_docs)]

mod bandwidth;
pub mod baselines;
pub mod cases;
pub mod duration;
pub mod evaluate;
mod facts;
mod plan;
mod problem;
mod replan;
mod schedule;

pub use facts::*;
pub use plan::*;
pub use problem::{PlacementRule, Refusal};
pub use replan::{FailedAttempt, Progress, Replanned, replan};
pub use schedule::StartTrigger;

use problem::{Problem, assign};
use schedule::{Dispatch, simulate};

/// Above this many VMs the planner tries fewer candidate schedules (plan time stays well under
/// a second per 1,000 VMs; issue 12's scale targets).
const LARGE_PLAN_VMS: usize = 2_000;
/// Above this many VMs the fixed-parallelism and run-alone variants are tried only at the hosts'
/// limit.
const MEDIUM_PLAN_VMS: usize = 300;

/// Plans the evacuation of `req.hosts_to_empty`.
///
/// Destinations: largest VMs first, each to the compatible host (memory counting this plan's
/// other placements, QEMU not older, required features, not draining/unreachable) whose ingress
/// would finish its assigned bytes earliest, preferring post-copy-capable hosts for VMs that may
/// need post-copy. Schedule: for each order ([`OrderKey`]) and each per-source cap up to the
/// hosts' `max_outbound`, the saturating list scheduler is simulated; the plan with the lowest
/// predicted makespan wins (ties: the earlier candidate, so the result is deterministic).
pub fn plan_evacuation(req: &EvacuationRequest) -> Result<EvacuationPlan, RequestError> {
    let p = Problem::new(req)?;
    let mut plan = plan_problem(&p, true);
    if matches!(plan.deadline, DeadlineVerdict::AtRisk { .. }) {
        plan.suggestions = suggestions(req, &p, &plan);
    }
    Ok(plan)
}

/// All candidates tried and the best plan.
fn plan_problem(p: &Problem, keep_tried: bool) -> EvacuationPlan {
    let skip = vec![false; p.vms.len()];
    let large = p.vms.len() > LARGE_PLAN_VMS;
    let mut placements = vec![(
        PlacementRule::BalancedIngress,
        assign(p, PlacementRule::BalancedIngress, &skip),
    )];
    if !large {
        placements.push((
            PlacementRule::MostFreeMemory,
            assign(p, PlacementRule::MostFreeMemory, &skip),
        ));
    }
    let max_cap = p
        .req
        .hosts
        .iter()
        .enumerate()
        .filter(|(i, _)| p.is_source[*i])
        .map(|(_, h)| h.max_outbound)
        .max()
        .unwrap_or(1)
        .max(1);
    let orders: &[OrderKey] = if large {
        &[OrderKey::LongestFirst]
    } else {
        &[
            OrderKey::LongestFirst,
            OrderKey::DirtiestFirst,
            OrderKey::DirtiestLast,
            OrderKey::Listing,
        ]
    };
    // (cap, saturating): every cap with and without the saturating rule, so tern never settles
    // for less than a fixed-parallelism scheduler (serial, KubeVirt, Proxmox, all-at-once, LPT)
    // would get with the same model. Large plans try the hosts' limit and 2.
    let cap_values: Vec<u32> = if large {
        let mut c = vec![max_cap, 2.min(max_cap)];
        c.dedup();
        c
    } else {
        (1..=max_cap.min(8)).rev().collect()
    };
    let mut caps: Vec<(u32, bool, bool)> = cap_values.iter().map(|&c| (c, true, false)).collect();
    caps.extend(
        cap_values
            .iter()
            .filter(|&&c| c > 1)
            .map(|&c| (c, false, false)),
    );
    if large {
        caps.retain(|&(c, saturate, _)| saturate || c == max_cap);
    } else if p.vms.len() > MEDIUM_PLAN_VMS {
        caps.retain(|&(c, saturate, _)| saturate || c == max_cap);
        if max_cap > 1 {
            caps.push((max_cap, true, true));
        }
    } else {
        // The same, with heavy (throttle-only) VMs running alone on their source.
        let with_heavy: Vec<_> = caps
            .iter()
            .filter(|c| c.0 > 1)
            .map(|&(c, s, _)| (c, s, true))
            .collect();
        caps.extend(with_heavy);
    }
    let mut best: Option<(EvacuationPlan, f64)> = None;
    let mut tried: Vec<(OrderKey, f64)> = Vec::new();
    for &order in orders {
        let mut best_for_order = f64::INFINITY;
        for (placement, assignment) in &placements {
            let priority = priority_order(p, order, &assignment.dest);
            for &(cap, saturate, heavy_alone) in &caps {
                let dispatch = Dispatch {
                    order: priority.clone(),
                    dest: assignment.dest.clone(),
                    per_source_cap: cap,
                    cluster_cap: None,
                    saturate,
                    heavy_alone,
                };
                let sim = simulate(p, &dispatch);
                best_for_order = best_for_order.min(sim.makespan_s);
                // Fewer VMs left unplaced first, then the makespan; a candidate must beat the
                // best by a hair to replace it (stable under float noise, deterministic).
                let placed = sim.per_vm.iter().filter(|m| m.is_some()).count();
                let better = best.as_ref().is_none_or(|(b, m)| {
                    let b_placed = b.migrations.len();
                    placed > b_placed || (placed == b_placed && sim.makespan_s < m * (1.0 - 1e-9))
                });
                if better {
                    let plan = build_plan(
                        p,
                        SchedulerKind::Tern,
                        order,
                        assignment,
                        &dispatch,
                        &sim,
                        *placement == PlacementRule::BalancedIngress,
                    );
                    best = Some((plan, sim.makespan_s));
                }
            }
        }
        tried.push((order, best_for_order));
    }
    let (mut plan, _) = best.unwrap_or_else(|| unreachable_plan(p));
    if keep_tried && matches!(plan.deadline, DeadlineVerdict::AtRisk { .. }) {
        plan.suggestions.push(Suggestion::OrdersTried { tried });
    }
    plan
}

fn unreachable_plan(p: &Problem) -> (EvacuationPlan, f64) {
    // Only reached with no orders or caps, which plan_problem never builds; kept total.
    let skip = vec![true; p.vms.len()];
    let assignment = assign(p, PlacementRule::BalancedIngress, &skip);
    let dispatch = Dispatch {
        order: Vec::new(),
        dest: assignment.dest.clone(),
        per_source_cap: 1,
        cluster_cap: None,
        saturate: true,
        heavy_alone: false,
    };
    let sim = simulate(p, &dispatch);
    (
        build_plan(
            p,
            SchedulerKind::Tern,
            OrderKey::LongestFirst,
            &assignment,
            &dispatch,
            &sim,
            true,
        ),
        0.0,
    )
}

/// VM indices in `order` (deterministic tie-break: listing index), higher SLA priority first
/// when [`PlannerSettings::sla_priority_first`] is set.
pub(crate) fn priority_order(p: &Problem, order: OrderKey, dest: &[Option<usize>]) -> Vec<usize> {
    let mut ordered = priority_order_by_key(p, order, dest, (0..p.vms.len()).collect());
    if p.req.settings.sla_priority_first {
        // Stable: keeps the key's order within a class.
        ordered.sort_by_key(|&v| std::cmp::Reverse(p.req.vms[v].sla.priority));
    }
    ordered
}

fn priority_order_by_key(
    p: &Problem,
    order: OrderKey,
    dest: &[Option<usize>],
    mut idx: Vec<usize>,
) -> Vec<usize> {
    let dur = |v: usize| -> f64 {
        let d = dest[v].unwrap_or(p.vms[v].src);
        let pc = usize::from(p.pair_post_copy(p.vms[v].src, d));
        p.vms[v].alone[pc].duration_s
    };
    let rho = |v: usize| -> f64 {
        let bw = p.egress[p.vms[v].src].min(p.stream_cap).max(1.0);
        p.vms[v].rule[0].dirty_rate / bw
    };
    match order {
        OrderKey::Listing => {}
        OrderKey::LongestFirst => {
            idx.sort_by(|&a, &b| dur(b).total_cmp(&dur(a)).then(a.cmp(&b)));
        }
        OrderKey::DirtiestFirst => idx.sort_by(|&a, &b| {
            rho(b)
                .total_cmp(&rho(a))
                .then(dur(b).total_cmp(&dur(a)))
                .then(a.cmp(&b))
        }),
        OrderKey::DirtiestLast => idx.sort_by(|&a, &b| {
            rho(a)
                .total_cmp(&rho(b))
                .then(dur(b).total_cmp(&dur(a)))
                .then(a.cmp(&b))
        }),
    }
    idx
}

/// What-if plans for a deadline at risk.
fn suggestions(req: &EvacuationRequest, p: &Problem, plan: &EvacuationPlan) -> Vec<Suggestion> {
    let mut out = plan.suggestions.clone();
    if let Some(d) = req.deadline_s
        && plan.lower_bound.any_schedule_s > d
    {
        out.push(Suggestion::DeadlineBelowLowerBound {
            lower_bound_s: plan.lower_bound.any_schedule_s,
        });
    }
    // More post-copy: permit it on every host that denies it.
    let denying: Vec<String> = req
        .hosts
        .iter()
        .filter(|h| !h.permit_post_copy && h.reachable && !h.draining)
        .map(|h| h.name.clone())
        .collect();
    if !denying.is_empty() {
        let mut what_if = req.clone();
        for h in &mut what_if.hosts {
            h.permit_post_copy = h.permit_post_copy || (h.reachable && !h.draining);
        }
        if let Ok(q) = Problem::new(&what_if) {
            let m = plan_problem(&q, false).predicted_makespan_s;
            if m < plan.predicted_makespan_s * 0.99 {
                out.push(Suggestion::PermitPostCopy {
                    hosts: denying,
                    predicted_makespan_s: m,
                });
            }
        }
    }
    // More concurrency: +2 outbound on the sources, +1 inbound everywhere.
    let mut what_if = req.clone();
    let mut outbound = Vec::new();
    for (i, h) in what_if.hosts.iter_mut().enumerate() {
        if p.is_source[i] {
            h.max_outbound += 2;
            outbound.push((h.name.clone(), h.max_outbound));
        } else if h.max_inbound > 0 {
            h.max_inbound += 1;
        }
    }
    if let Ok(q) = Problem::new(&what_if) {
        let m = plan_problem(&q, false).predicted_makespan_s;
        if m < plan.predicted_makespan_s * 0.99 {
            out.push(Suggestion::RaiseConcurrency {
                outbound,
                inbound_increase: 1,
                predicted_makespan_s: m,
            });
        }
    }
    out
}
