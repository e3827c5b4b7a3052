//! The seam to the evacuation planner (pure: no I/O, no clock).
//!
//! The real planner (crate `tern-planner`: order, concurrency under per-host limits and link
//! bandwidth, predictions from the policy core's convergence model) is being written apart;
//! the controller only calls [`plan_evacuation`] through the [`EvacuationPlanner`] trait, so
//! swapping [`SerialPlanner`] for it is one line in [`default_planner`]. The serial planner is
//! what Nova's `host-evacuate-live` and CERN do: one VM at a time, largest first, each to the
//! destination [`Fleet::choose`] picks with memory already promised to earlier VMs counted.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{EvacuationPlan, HostRecord, PlannedMigration, VmRecord};
use crate::placement::{Fleet, Rejection};

/// Link rate assumed when neither host reports one (1 Gbit/s).
pub const DEFAULT_LINK_BYTES_PER_S: u64 = 125_000_000;

/// A VM no host can take, with every host's reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Unplaceable {
    /// The VM.
    pub vm: String,
    /// Why each host refused it.
    pub rejections: Vec<Rejection>,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// Some VMs have no valid destination.
    #[error("no valid destination for {} VM(s) of {host}", .vms.len())]
    NoDestination {
        /// The host being emptied.
        host: String,
        /// The VMs and their per-host reasons.
        vms: Vec<Unplaceable>,
    },
}

/// What a planner is given.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The fleet (hosts with effective state, in-flight promises).
    pub fleet: &'a Fleet,
    /// The host to empty.
    pub host: &'a HostRecord,
    /// Its VMs.
    pub vms: &'a [VmRecord],
    /// Seconds until the deadline.
    pub deadline_s: u64,
}

/// Makes evacuation plans.
pub trait EvacuationPlanner: Send + Sync {
    /// The planner's name (recorded in the plan).
    fn name(&self) -> &'static str;
    /// A plan for emptying `input.host`, or why there is none.
    fn plan(&self, input: PlanInput<'_>) -> Result<EvacuationPlan, PlanError>;
}

/// One VM at a time, largest first.
#[derive(Debug, Clone, Copy, Default)]
pub struct SerialPlanner;

/// Predicted duration (s) of moving `vm` over `link` bytes/s: pre-copy when the guest dirties
/// less than the link carries (geometric series of re-sent pages), else about one RAM's worth
/// with post-copy, or a throttled pre-copy (×3) when post-copy is not possible.
pub fn predict_duration_s(vm: &VmRecord, link: u64, post_copy: bool) -> f64 {
    let bytes = vm.memory_mib as f64 * 1024.0 * 1024.0;
    let link = link.max(1) as f64;
    let dirty = vm.dirty_bytes_per_s.unwrap_or(0) as f64;
    if dirty < 0.8 * link {
        bytes / (link - dirty)
    } else if post_copy {
        bytes / link * 1.1
    } else {
        bytes / link * 3.0
    }
}

impl EvacuationPlanner for SerialPlanner {
    fn name(&self) -> &'static str {
        "serial"
    }

    fn plan(&self, input: PlanInput<'_>) -> Result<EvacuationPlan, PlanError> {
        let mut fleet = input.fleet.clone();
        let mut vms: Vec<&VmRecord> = input.vms.iter().collect();
        vms.sort_by(|a, b| b.memory_mib.cmp(&a.memory_mib).then(a.name.cmp(&b.name)));
        let mut out = Vec::new();
        let mut failed = Vec::new();
        let mut t = 0.0;
        for vm in vms {
            match fleet.choose(vm, input.host, &[]) {
                Ok(c) => {
                    let Some(dest) = fleet.hosts.get(&c.host).cloned() else {
                        continue;
                    };
                    let link = input
                        .host
                        .facts
                        .link_bytes_per_s
                        .unwrap_or(DEFAULT_LINK_BYTES_PER_S)
                        .min(dest.facts.link_bytes_per_s.unwrap_or(u64::MAX));
                    let d = predict_duration_s(
                        vm,
                        link,
                        Fleet::post_copy_end_to_end(vm, input.host, &dest),
                    );
                    // Serial: the memory stays promised, the inbound slot is free again.
                    *fleet.reserved_mib.entry(c.host.clone()).or_default() += vm.memory_mib;
                    out.push(PlannedMigration {
                        vm: vm.name.clone(),
                        destination: c.host,
                        reason: c.reason,
                        start_s: t,
                        duration_s: d,
                    });
                    t += d;
                }
                Err(rejections) => failed.push(Unplaceable {
                    vm: vm.name.clone(),
                    rejections,
                }),
            }
        }
        if !failed.is_empty() {
            return Err(PlanError::NoDestination {
                host: input.host.name.clone(),
                vms: failed,
            });
        }
        Ok(EvacuationPlan {
            host: input.host.name.clone(),
            planner: self.name().into(),
            migrations: out,
            concurrency: 1,
            predicted_makespan_s: t,
            deadline_s: input.deadline_s,
            fits_deadline: t <= input.deadline_s as f64,
        })
    }
}

/// The planner the controller uses (the serial one until `tern-planner` lands).
pub fn default_planner() -> Box<dyn EvacuationPlanner> {
    Box::new(SerialPlanner)
}

/// Plans the evacuation of `host` with the default planner.
pub fn plan_evacuation(
    fleet: &Fleet,
    host: &HostRecord,
    vms: &[VmRecord],
    deadline_s: u64,
) -> Result<EvacuationPlan, PlanError> {
    default_planner().plan(PlanInput {
        fleet,
        host,
        vms,
        deadline_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::{host, vm};

    fn fleet(hosts: Vec<HostRecord>) -> Fleet {
        Fleet {
            hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
            ..Fleet::default()
        }
    }

    #[test]
    fn serial_plan_places_every_vm_once_within_capacity() {
        let f = fleet(vec![
            host("h1", 0, "10.0.0"),
            host("h2", 1024, "10.0.0"),
            host("h3", 1024, "10.0.0"),
        ]);
        let vms = [vm("a", "h1", 512), vm("b", "h1", 768), vm("c", "h1", 512)];
        let p = plan_evacuation(&f, &f.hosts["h1"], &vms, 3600).unwrap();
        assert_eq!(p.migrations.len(), 3);
        let mut names: Vec<_> = p.migrations.iter().map(|m| m.vm.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(p.migrations[0].vm, "b", "largest first");
        for h in ["h2", "h3"] {
            let used: u64 = p
                .migrations
                .iter()
                .filter(|m| m.destination == h)
                .map(|m| vms.iter().find(|v| v.name == m.vm).unwrap().memory_mib)
                .sum();
            assert!(used <= 1024, "{h} over capacity: {used}");
        }
        let sum: f64 = p.migrations.iter().map(|m| m.duration_s).sum();
        assert!((p.predicted_makespan_s - sum).abs() < 1e-9);
        assert!(p.fits_deadline);
    }

    #[test]
    fn unplaceable_vms_come_back_with_reasons() {
        let f = fleet(vec![host("h1", 0, "10.0.0"), host("h2", 256, "10.0.0")]);
        let e = plan_evacuation(&f, &f.hosts["h1"], &[vm("big", "h1", 512)], 60).unwrap_err();
        let PlanError::NoDestination { vms, .. } = e;
        assert_eq!(vms[0].vm, "big");
        assert!(vms[0].rejections[0].why.contains("256 MiB free"));
    }

    #[test]
    fn predictions_grow_with_the_dirty_rate() {
        let mut v = vm("a", "h1", 1024);
        let idle = predict_duration_s(&v, 125_000_000, true);
        v.dirty_bytes_per_s = Some(50_000_000);
        let busy = predict_duration_s(&v, 125_000_000, true);
        assert!(busy > idle);
        v.dirty_bytes_per_s = Some(200_000_000);
        assert!(
            predict_duration_s(&v, 125_000_000, false) > predict_duration_s(&v, 125_000_000, true)
        );
    }
}
