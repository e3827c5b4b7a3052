//! The schedulers operators use today, over the same duration and bandwidth model as tern, so a
//! comparison measures scheduling and placement, not modelling.
//!
//! All place like Nova's RAM weigher / Kubernetes' least-allocated scoring (in listing order,
//! the compatible host with the most free memory) and honour the hosts' own outbound/inbound
//! limits (an agent refuses more); they differ in order and concurrency:
//!
//! | scheduler | order | concurrency per source | cluster |
//! |---|---|---|---|
//! | serial | listing | 1 (Nova `max_concurrent_live_migrations` default; CERN) | – |
//! | all-at-once | listing | host `max_outbound` | – |
//! | KubeVirt | listing | 2 (`ParallelOutboundMigrationsPerNode`) | 5 (`ParallelMigrationsPerCluster`) |
//! | Proxmox | listing | 4 (`migrateall --maxworkers 4`) | – |
//! | LPT | longest first | host `max_outbound` (Glikson et al.'s machines) | – |

use crate::facts::{EvacuationRequest, RequestError};
use crate::plan::{EvacuationPlan, OrderKey, SchedulerKind, build_plan};
use crate::priority_order;
use crate::problem::{PlacementRule, Problem, assign};
use crate::schedule::{Dispatch, simulate};

/// KubeVirt `ParallelOutboundMigrationsPerNode` default.
pub const KUBEVIRT_PER_NODE: u32 = 2;
/// KubeVirt `ParallelMigrationsPerCluster` default.
pub const KUBEVIRT_PER_CLUSTER: u32 = 5;
/// Proxmox `maxworkers` used in the comparison (the datacenter `max_workers` default is 4).
pub const PROXMOX_MAX_WORKERS: u32 = 4;

/// Plans `req` with `kind`. `SchedulerKind::Tern` is [`crate::plan_evacuation`].
pub fn plan_with(
    kind: SchedulerKind,
    req: &EvacuationRequest,
) -> Result<EvacuationPlan, RequestError> {
    if kind == SchedulerKind::Tern {
        return crate::plan_evacuation(req);
    }
    let p = Problem::new(req)?;
    let skip = vec![false; p.vms.len()];
    let assignment = assign(&p, PlacementRule::MostFreeMemory, &skip);
    let (order, per_source_cap, cluster_cap) = match kind {
        SchedulerKind::Serial => (OrderKey::Listing, 1, None),
        SchedulerKind::AllAtOnce => (OrderKey::Listing, u32::MAX, None),
        SchedulerKind::KubeVirt => (
            OrderKey::Listing,
            KUBEVIRT_PER_NODE,
            Some(KUBEVIRT_PER_CLUSTER),
        ),
        SchedulerKind::ProxmoxMaxWorkers => (OrderKey::Listing, PROXMOX_MAX_WORKERS, None),
        SchedulerKind::Lpt | SchedulerKind::Tern => (OrderKey::LongestFirst, u32::MAX, None),
    };
    let dispatch = Dispatch {
        order: priority_order(&p, order, &assignment.dest),
        dest: assignment.dest.clone(),
        per_source_cap,
        cluster_cap,
        saturate: false,
        heavy_alone: false,
    };
    let sim = simulate(&p, &dispatch);
    Ok(build_plan(
        &p,
        kind,
        order,
        &assignment,
        &dispatch,
        &sim,
        false,
    ))
}
