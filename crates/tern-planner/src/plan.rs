//! The plan the controller executes and shows: [`EvacuationPlan`].

use std::fmt;

use serde::{Deserialize, Serialize};
use tern_policy::MigrationContext;

use crate::duration::{PredictedEnding, min_bytes};
use crate::problem::{Assignment, PlacementRule, Problem, Refusal, refusals_for};
use crate::schedule::{Dispatch, Simulated, StartTrigger};

/// Which scheduler made a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    /// tern: balanced-ingress placement, link-saturating concurrency, best of several orders.
    Tern,
    /// One at a time per source, in listing order (Nova `host-evacuate-live` with the default
    /// `max_concurrent_live_migrations = 1`; CERN's serial drains).
    Serial,
    /// Everything at once, limited only by the hosts' own limits.
    AllAtOnce,
    /// KubeVirt drain: 2 outbound per node, 5 per cluster, listing order.
    KubeVirt,
    /// Proxmox `pvenode migrateall --maxworkers 4`.
    ProxmoxMaxWorkers,
    /// Longest processing time first with the hosts' outbound limits as machines (Glikson et al.).
    Lpt,
}

impl SchedulerKind {
    /// Every scheduler, tern first.
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Tern,
        SchedulerKind::Serial,
        SchedulerKind::AllAtOnce,
        SchedulerKind::KubeVirt,
        SchedulerKind::ProxmoxMaxWorkers,
        SchedulerKind::Lpt,
    ];
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchedulerKind::Tern => "tern",
            SchedulerKind::Serial => "serial (Nova/CERN)",
            SchedulerKind::AllAtOnce => "all-at-once",
            SchedulerKind::KubeVirt => "KubeVirt 2/node 5/cluster",
            SchedulerKind::ProxmoxMaxWorkers => "Proxmox maxworkers=4",
            SchedulerKind::Lpt => "LPT",
        })
    }
}

/// The priority order a plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrderKey {
    /// The operator's listing order.
    Listing,
    /// Longest predicted migration first (LPT): the long ones do not end up alone at the tail.
    LongestFirst,
    /// Highest ρ (dirty rate / link) first, then longest: dirty guests get the link while it is
    /// least shared.
    DirtiestFirst,
    /// Lowest ρ first, then longest: dirty guests run last, alone on the link.
    DirtiestLast,
}

/// Why a planned migration looks the way it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Reason {
    /// The destination whose ingress finishes its assigned bytes earliest (with this VM).
    LeastLoadedIngress {
        /// Seconds of ingress work assigned to the destination, this VM included.
        ingress_load_s: f64,
    },
    /// The VM may need post-copy to converge and the destination permits it.
    PostCopyDestination,
    /// The VM may need post-copy but no compatible destination permits it: it will throttle
    /// and, in a must-finish context, stop-and-copy (blackout over the SLA).
    NoPostCopyDestination,
    /// The VM's dirty rate was not measured; this default was assumed, bytes/s.
    DirtyRateAssumed {
        /// Assumed bytes/s.
        bytes_per_s: u64,
    },
    /// Placed where the most memory was free (baseline placement: Nova's RAM weigher).
    MostFreeMemory,
    /// A retry of a migration that failed before the switch.
    Retry {
        /// This attempt's number (2 = first retry).
        attempt: u32,
        /// Backoff before it, seconds.
        backoff_s: f64,
        /// It goes to the same destination as last time.
        same_destination: bool,
    },
    /// Already running when the plan was made; kept.
    AlreadyRunning,
}

/// One migration of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedMigration {
    /// The VM.
    pub vm: String,
    /// Its current host.
    pub source: String,
    /// Where it goes.
    pub destination: String,
    /// Position in the start sequence (0 first).
    pub order: u32,
    /// What releases it: the controller starts it when this happens.
    pub trigger: StartTrigger,
    /// Predicted start, seconds from plan time (negative for one already running).
    pub predicted_start_s: f64,
    /// Predicted end (guest running on the destination), seconds from plan time.
    pub predicted_end_s: f64,
    /// Predicted bytes sent.
    pub predicted_bytes: u64,
    /// Bandwidth predicted at its start, bytes/s.
    pub predicted_rate_bytes_per_s: u64,
    /// How it is predicted to end.
    pub ending: PredictedEnding,
    /// Predicted to need post-copy (switches to it).
    pub needs_post_copy: bool,
    /// Post-copy is permitted on this source/destination pair for this VM.
    pub post_copy_permitted: bool,
    /// Why this destination, order and mode.
    pub reasons: Vec<Reason>,
}

/// Why a VM is not in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnplaceableReason {
    /// No host can take it (see the per-host refusals).
    NoDestination,
    /// Balance: every host that could take it would make the move break the VM's SLA; skipped.
    WouldBreakSla,
}

/// One host's refusal of an unplaceable VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRefusal {
    /// The host.
    pub host: String,
    /// Why it refused.
    pub refusal: Refusal,
}

/// A VM with no valid destination: never silently dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaceable {
    /// The VM.
    pub vm: String,
    /// Its host.
    pub source: String,
    /// Summary.
    pub reason: UnplaceableReason,
    /// Every other host of the fleet and why it refused.
    pub refusals: Vec<HostRefusal>,
}

/// Concurrency the plan uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concurrency {
    /// Cap on concurrent outgoing migrations per source (also bounded by each host's limit).
    pub per_source_cap: u32,
    /// Cap for the whole cluster, if any.
    pub cluster_cap: Option<u32>,
    /// More start only while the source's egress has room (tern).
    pub saturating: bool,
    /// VMs that converge only by throttling run alone on their source (tern).
    pub heavy_alone: bool,
    /// Highest concurrency per source the plan reaches.
    pub peak_per_source: u32,
}

/// Lower bounds on the makespan, seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LowerBound {
    /// Bound valid for every schedule and placement: the largest of each source's bytes ÷ its
    /// egress, all bytes ÷ the fleet's usable ingress, and each VM alone at its best rate.
    /// Bytes are RAM plus what a first pass at the best rate dirties (see
    /// [`crate::duration::min_bytes`]).
    pub any_schedule_s: f64,
    /// The source whose egress bounds it, and its bound.
    pub source_egress_s: Vec<(String, f64)>,
    /// The destination with the largest ingress bound under this plan's placement.
    pub destination_ingress: Option<(String, f64)>,
    /// Bound for this plan's placement (`any_schedule_s` and the destination bound).
    pub this_placement_s: f64,
}

/// Whether the deadline holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "verdict")]
pub enum DeadlineVerdict {
    /// No deadline was given.
    NoDeadline,
    /// Predicted to finish before it.
    Met {
        /// Seconds to spare.
        slack_s: f64,
    },
    /// Predicted to miss it (or finish within 10 % of it).
    AtRisk {
        /// Seconds predicted past the deadline (negative: inside the 10 % margin).
        over_by_s: f64,
    },
}

/// What would shorten the evacuation, each with the makespan the planner predicts for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Suggestion {
    /// Permit post-copy on these hosts (`tern host set HOST --post-copy permit`).
    PermitPostCopy {
        /// Hosts that deny it now.
        hosts: Vec<String>,
        /// Makespan predicted with it, s.
        predicted_makespan_s: f64,
    },
    /// Raise concurrency limits (`tern host set HOST --max-outbound N --max-inbound M`).
    RaiseConcurrency {
        /// Sources whose outbound limit would rise, and to what.
        outbound: Vec<(String, u32)>,
        /// Inbound limit every destination would get (+1).
        inbound_increase: u32,
        /// Makespan predicted with it, s.
        predicted_makespan_s: f64,
    },
    /// Orders tried; the best is used. Shown when the deadline is at risk, so the operator sees
    /// that reordering alone does not help.
    OrdersTried {
        /// Each order and its predicted makespan, s.
        tried: Vec<(OrderKey, f64)>,
    },
    /// More bandwidth is the only remedy: the lower bound itself exceeds the deadline.
    DeadlineBelowLowerBound {
        /// The bound, s.
        lower_bound_s: f64,
    },
}

/// A difference between what the previous plan assumed and what was observed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Deviation {
    /// A VM dirties more (or less) than assumed.
    DirtyRate {
        /// The VM.
        vm: String,
        /// Assumed bytes/s.
        assumed: u64,
        /// Observed bytes/s.
        observed: u64,
    },
    /// A link is slower (or faster) than assumed.
    LinkRate {
        /// The host.
        host: String,
        /// Assumed egress bytes/s.
        assumed: u64,
        /// Observed bytes/s.
        observed: u64,
    },
    /// A destination went away; its VMs were re-targeted.
    DestinationGone {
        /// The host.
        host: String,
        /// VMs that had been planned there and were not yet running.
        retargeted: Vec<String>,
    },
    /// A migration failed before the switch (the guest is still on its source).
    FailedBeforeSwitch {
        /// The VM.
        vm: String,
        /// Its destination.
        destination: String,
        /// Attempts so far.
        attempts: u32,
        /// What the new plan does.
        action: RetryAction,
    },
    /// The predicted makespan moved.
    Makespan {
        /// Previous prediction (remaining from now), s.
        before_s: f64,
        /// New prediction, s.
        after_s: f64,
    },
}

/// What a re-plan does with a failed migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum RetryAction {
    /// Retry after a backoff, to the same destination or another.
    Retry {
        /// Backoff, s.
        backoff_s: f64,
        /// Same destination as before.
        same_destination: bool,
    },
    /// Optional context: not retried; the VM stays.
    NotRetried,
}

/// The plan for emptying hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvacuationPlan {
    /// Scheduler that made it.
    pub scheduler: SchedulerKind,
    /// Context of every migration.
    pub context: MigrationContext,
    /// Migrations in start order.
    pub migrations: Vec<PlannedMigration>,
    /// VMs that cannot be moved, with per-host reasons.
    pub unplaceable: Vec<Unplaceable>,
    /// Priority order used.
    pub order: OrderKey,
    /// How destinations were chosen.
    pub placement: PlacementRule,
    /// Concurrency used.
    pub concurrency: Concurrency,
    /// Predicted time until the last migration ends, s from plan time.
    pub predicted_makespan_s: f64,
    /// Lower bounds.
    pub lower_bound: LowerBound,
    /// Deadline verdict.
    pub deadline: DeadlineVerdict,
    /// What would help (filled when the deadline is at risk).
    pub suggestions: Vec<Suggestion>,
    /// What changed since the previous plan (filled by [`crate::replan`]).
    pub deviations: Vec<Deviation>,
}

impl EvacuationPlan {
    /// The planned migration of `vm`, if any.
    pub fn migration(&self, vm: &str) -> Option<&PlannedMigration> {
        self.migrations.iter().find(|m| m.vm == vm)
    }
}

/// Placement-independent lower bound, and per-source figures.
/// Only VMs with `planned[v]` count (a VM nobody can place adds no work to any schedule).
/// Sources send at most `min(egress, max_outbound × min(stream cap, fastest ingress))`,
/// destinations receive at most
/// [`Problem::dest_rate`].
pub(crate) fn lower_bound_any(p: &Problem, planned: &[bool]) -> (f64, Vec<(String, f64)>) {
    let nh = p.req.hosts.len();
    // A host older than every source can take nothing (migration goes to same or newer QEMU).
    let oldest_source = (0..nh)
        .filter(|&s| p.is_source[s])
        .map(|s| p.req.hosts[s].qemu_version)
        .min();
    let open_ingress: Vec<f64> = (0..nh)
        .filter(|&d| {
            let h = &p.req.hosts[d];
            !p.is_source[d]
                && h.reachable
                && !h.draining
                && h.max_inbound > 0
                && oldest_source.is_none_or(|q| h.qemu_version >= q)
        })
        .map(|d| p.dest_rate(d))
        .collect();
    let max_ingress = open_ingress.iter().copied().fold(0.0, f64::max);
    let total_ingress: f64 = open_ingress.iter().sum();
    let mut per_source = vec![0.0f64; nh];
    let mut per_vm_bound = 0.0f64;
    let in_flight: Vec<Option<f64>> = {
        let mut f = vec![None; p.vms.len()];
        for e in &p.in_flight {
            f[e.vm] = Some(e.remaining);
        }
        f
    };
    for (v, vm) in p.vms.iter().enumerate() {
        if !planned[v] {
            continue;
        }
        let bw = p.egress[vm.src].min(p.stream_cap).min(max_ingress).max(1.0);
        let bytes = in_flight[v].unwrap_or_else(|| min_bytes(&vm.rule[0], bw));
        per_source[vm.src] += bytes;
        per_vm_bound = per_vm_bound.max(vm.not_before_s + bytes / bw);
    }
    let total: f64 = per_source.iter().sum();
    let mut sources = Vec::new();
    let mut bound = per_vm_bound;
    for (s, &bytes) in per_source.iter().enumerate() {
        if p.is_source[s] {
            // Each of its at most `max_outbound` streams is capped by the stream cap and by the
            // fastest destination's ingress.
            let out = f64::from(p.req.hosts[s].max_outbound.max(1))
                * p.stream_cap.min(max_ingress).max(1.0);
            let b = bytes / p.egress[s].min(out).max(1.0);
            sources.push((p.req.hosts[s].name.clone(), b));
            bound = bound.max(b);
        }
    }
    if total_ingress > 0.0 {
        bound = bound.max(total / total_ingress);
    }
    (bound, sources)
}

/// Builds the plan from a simulation.
pub(crate) fn build_plan(
    p: &Problem,
    scheduler: SchedulerKind,
    order: OrderKey,
    assignment: &Assignment,
    dispatch: &Dispatch,
    sim: &Simulated,
    placement_reasons: bool,
) -> EvacuationPlan {
    let mut migrations = Vec::new();
    let mut unplaceable = Vec::new();
    let mut ingress_load = vec![0.0f64; p.req.hosts.len()];
    for m in sim.per_vm.iter().flatten() {
        ingress_load[m.dst] += m.bytes / p.dest_rate(m.dst);
    }
    for (v, vm) in p.vms.iter().enumerate() {
        let facts = &p.req.vms[v];
        let Some(m) = &sim.per_vm[v] else {
            let refusals = refusals_for(p, v, &assignment.reserved);
            let sla_only = refusals.iter().any(|(_, r)| *r == Refusal::WouldBreakSla);
            unplaceable.push(Unplaceable {
                vm: facts.name.clone(),
                source: p.req.hosts[vm.src].name.clone(),
                reason: if sla_only {
                    UnplaceableReason::WouldBreakSla
                } else {
                    UnplaceableReason::NoDestination
                },
                refusals: refusals
                    .into_iter()
                    .map(|(d, refusal)| HostRefusal {
                        host: p.req.hosts[d].name.clone(),
                        refusal,
                    })
                    .collect(),
            });
            continue;
        };
        let pc = p.pair_post_copy(vm.src, m.dst) && p.rule(v, m.dst).post_copy;
        let mut reasons = Vec::new();
        if m.trigger == StartTrigger::AlreadyRunning {
            reasons.push(Reason::AlreadyRunning);
        } else if placement_reasons {
            reasons.push(Reason::LeastLoadedIngress {
                ingress_load_s: ingress_load[m.dst],
            });
        } else {
            reasons.push(Reason::MostFreeMemory);
        }
        if vm.needs_post_copy() {
            reasons.push(if pc {
                Reason::PostCopyDestination
            } else {
                Reason::NoPostCopyDestination
            });
        }
        if vm.dirty_assumed {
            reasons.push(Reason::DirtyRateAssumed {
                bytes_per_s: crate::facts::DEFAULT_DIRTY_BYTES_PER_S,
            });
        }
        if let Some(r) = p.req.retries.iter().find(|r| r.vm == facts.name) {
            reasons.push(Reason::Retry {
                attempt: r.attempts + 1,
                backoff_s: r.not_before_s,
                same_destination: p.req.hosts[m.dst].name == r.last_destination,
            });
        }
        migrations.push(PlannedMigration {
            vm: facts.name.clone(),
            source: p.req.hosts[vm.src].name.clone(),
            destination: p.req.hosts[m.dst].name.clone(),
            order: 0,
            trigger: m.trigger.clone(),
            predicted_start_s: m.start_s,
            predicted_end_s: m.end_s,
            predicted_bytes: m.bytes as u64,
            predicted_rate_bytes_per_s: m.start_rate as u64,
            ending: m.ending,
            needs_post_copy: m.ending.uses_post_copy(),
            post_copy_permitted: pc,
            reasons,
        });
    }
    migrations.sort_by(|a, b| {
        a.predicted_start_s
            .total_cmp(&b.predicted_start_s)
            .then(a.vm.cmp(&b.vm))
    });
    for (i, m) in migrations.iter_mut().enumerate() {
        m.order = i as u32;
    }
    let planned: Vec<bool> = sim.per_vm.iter().map(Option::is_some).collect();
    let (any, sources) = lower_bound_any(p, &planned);
    let mut dest_bytes = vec![0.0f64; p.req.hosts.len()];
    for (v, m) in sim.per_vm.iter().enumerate() {
        if let Some(m) = m {
            let bw = p.best_bw(p.vms[v].src, m.dst);
            dest_bytes[m.dst] += min_bytes(&p.vms[v].rule[0], bw);
        }
    }
    let destination_ingress = dest_bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b > 0.0)
        .map(|(d, b)| (p.req.hosts[d].name.clone(), b / p.dest_rate(d)))
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
    let this_placement_s = destination_ingress.as_ref().map_or(any, |d| d.1.max(any));
    let makespan = sim.makespan_s;
    EvacuationPlan {
        scheduler,
        context: p.req.context,
        migrations,
        unplaceable,
        order,
        placement: if placement_reasons {
            PlacementRule::BalancedIngress
        } else {
            PlacementRule::MostFreeMemory
        },
        concurrency: Concurrency {
            per_source_cap: dispatch.per_source_cap,
            cluster_cap: dispatch.cluster_cap,
            saturating: dispatch.saturate,
            heavy_alone: dispatch.heavy_alone,
            peak_per_source: sim.peak_concurrency,
        },
        predicted_makespan_s: makespan,
        lower_bound: LowerBound {
            any_schedule_s: any,
            source_egress_s: sources,
            destination_ingress,
            this_placement_s,
        },
        deadline: deadline_verdict(p.req.deadline_s, makespan),
        suggestions: Vec::new(),
        deviations: Vec::new(),
    }
}

/// At risk when predicted past the deadline or within 10 % of it (predictions err ≤ 15 %).
pub(crate) fn deadline_verdict(deadline: Option<f64>, makespan: f64) -> DeadlineVerdict {
    match deadline {
        None => DeadlineVerdict::NoDeadline,
        Some(d) if makespan <= 0.9 * d => DeadlineVerdict::Met {
            slack_s: d - makespan,
        },
        Some(d) => DeadlineVerdict::AtRisk {
            over_by_s: makespan - d,
        },
    }
}
