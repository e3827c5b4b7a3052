//! The seam to the evacuation planner (pure: no I/O, no clock).
//!
//! The controller calls [`plan_evacuation`] through the [`EvacuationPlanner`] trait.
//! [`TernPlanner`] (the default) builds a `tern_planner::EvacuationRequest` from the fleet and
//! maps the planner's plan into the controller's (the planner's plan and request are kept whole
//! in [`EvacuationPlan::detail`] and [`EvacuationPlan::request`] for re-planning).
//! [`SerialPlanner`] is the baseline the tests compare against: what Nova's
//! `host-evacuate-live` and CERN do, one VM at a time, largest first, each to the destination
//! [`Fleet::choose`] picks with memory already promised to earlier VMs counted.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{
    EvacuationPlan, HostRecord, HostState, PlanTrigger, PlannedMigration, VmRecord,
};
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
    /// The planner refused the request itself (names the bad value).
    #[error("cannot plan: {0}")]
    Invalid(String),
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
                        end_s: t + d,
                        trigger: PlanTrigger::Now,
                        needs_post_copy: false,
                        post_copy_permitted: Fleet::post_copy_end_to_end(vm, input.host, &dest),
                        predicted_bytes: 0,
                        reasons: Vec::new(),
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
            lower_bound_s: 0.0,
            deadline_verdict: if t <= input.deadline_s as f64 {
                "met".into()
            } else {
                "at-risk".into()
            },
            deadline_slack_s: Some(input.deadline_s as f64 - t),
            suggestions: Vec::new(),
            deviations: Vec::new(),
            made_ms: 0,
            detail: None,
            request: None,
        })
    }
}

/// tern's planner (crate `tern-planner`): destinations by balanced ingress, concurrency that
/// keeps each source's egress busy under the per-host limits, predictions from the policy
/// core's convergence model, a deadline verdict and suggestions.
#[derive(Debug, Clone, Copy, Default)]
pub struct TernPlanner;

/// Bytes in a MiB.
const MIB: u64 = 1 << 20;

/// The planner's view of one host.
pub fn host_facts(fleet: &Fleet, h: &HostRecord) -> tern_planner::HostFacts {
    let (ma, mi, mc) = crate::placement::qemu_version(&h.facts.qemu_version);
    let v16 = |x: u32| u16::try_from(x).unwrap_or(u16::MAX);
    let link = h.facts.link_bytes_per_s.unwrap_or(DEFAULT_LINK_BYTES_PER_S);
    tern_planner::HostFacts {
        name: h.name.clone(),
        total_memory_bytes: h.facts.memory_mib.saturating_mul(MIB),
        free_memory_bytes: fleet.free_mib(h).saturating_mul(MIB),
        qemu_version: tern_planner::QemuVersion::new(v16(ma), v16(mi), v16(mc)),
        features: h.facts.migration_capabilities.iter().cloned().collect(),
        permit_post_copy: h.post_copy_permitted(),
        max_outbound: h.outbound_limit(),
        max_inbound: h.inbound_limit(),
        egress_bytes_per_s: link,
        ingress_bytes_per_s: link,
        draining: h.state == HostState::Draining,
        reachable: h.state != HostState::Unreachable,
    }
}

/// SLA class assumed for a class the controller's catalog does not know (agents may define
/// their own; the name is kept).
pub const FALLBACK_SLA_CLASS: &str = "standard";

/// The planner's view of one VM. A class the built-in catalog does not know (an agent's own)
/// is planned with [`FALLBACK_SLA_CLASS`]'s tolerances under its own name.
pub fn vm_facts(
    vm: &VmRecord,
    catalog: &tern_policy::SlaCatalog,
) -> Result<tern_planner::VmFacts, PlanError> {
    let sla = match catalog.get(&vm.sla_class) {
        Ok(c) => c.clone(),
        Err(_) => {
            let mut c = catalog
                .get(FALLBACK_SLA_CLASS)
                .map_err(|e| {
                    PlanError::Invalid(format!(
                        "VM {}: SLA class {:?} unknown and no fallback: {e}",
                        vm.name, vm.sla_class
                    ))
                })?
                .clone();
            c.name = vm.sla_class.clone();
            c
        }
    };
    Ok(tern_planner::VmFacts {
        name: vm.name.clone(),
        host: vm.host.clone(),
        memory_bytes: vm.memory_mib.saturating_mul(MIB),
        dirty_bytes_per_s: vm.dirty_bytes_per_s,
        working_set_bytes: None,
        sla,
        post_copy_allowed: vm.post_copy_allowed,
        required_features: Default::default(),
    })
}

/// The planner request for emptying `input.host`.
pub fn request(input: PlanInput<'_>) -> Result<tern_planner::EvacuationRequest, PlanError> {
    let catalog = tern_policy::SlaCatalog::builtin();
    let hosts = input
        .fleet
        .hosts
        .values()
        .map(|h| host_facts(input.fleet, h))
        .collect();
    let vms = input
        .vms
        .iter()
        .map(|v| vm_facts(v, &catalog))
        .collect::<Result<Vec<_>, _>>()?;
    let mut req = tern_planner::EvacuationRequest::new(
        tern_policy::MigrationContext::Evacuate,
        hosts,
        vec![input.host.name.clone()],
        vms,
    );
    req.deadline_s = Some(input.deadline_s as f64);
    Ok(req)
}

/// A reason in words.
pub fn describe_reason(r: &tern_planner::Reason) -> String {
    use tern_planner::Reason as R;
    match r {
        R::LeastLoadedIngress { ingress_load_s } => {
            format!("least loaded ingress ({ingress_load_s:.1} s of incoming work with this VM)")
        }
        R::PostCopyDestination => "may need post-copy; the destination permits it".into(),
        R::NoPostCopyDestination => {
            "may need post-copy but no destination permits it: throttled pre-copy".into()
        }
        R::DirtyRateAssumed { bytes_per_s } => {
            format!("dirty rate not measured; {bytes_per_s} bytes/s assumed")
        }
        R::MostFreeMemory => "most free memory".into(),
        R::Retry {
            attempt,
            backoff_s,
            same_destination,
        } => format!(
            "attempt {attempt} after {backoff_s:.1} s backoff{}",
            if *same_destination {
                ", same destination"
            } else {
                ", another destination"
            }
        ),
        R::AlreadyRunning => "already running".into(),
    }
}

/// A suggestion in words.
pub fn describe_suggestion(s: &tern_planner::Suggestion) -> String {
    use tern_planner::Suggestion as S;
    match s {
        S::PermitPostCopy {
            hosts,
            predicted_makespan_s,
        } => format!(
            "permit post-copy on {} (tern host set HOST --post-copy permit): predicted              {predicted_makespan_s:.1} s",
            hosts.join(", ")
        ),
        S::RaiseConcurrency {
            outbound,
            inbound_increase,
            predicted_makespan_s,
        } => format!(
            "raise concurrency (outbound {}; inbound +{inbound_increase}): predicted              {predicted_makespan_s:.1} s",
            outbound
                .iter()
                .map(|(h, n)| format!("{h}={n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        S::OrdersTried { tried } => format!(
            "orders tried: {}",
            tried
                .iter()
                .map(|(o, t)| format!("{o:?} {t:.1} s"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        S::DeadlineBelowLowerBound { lower_bound_s } => format!(
            "no schedule can meet the deadline: the lower bound is {lower_bound_s:.1} s; only \
             more bandwidth helps"
        ),
    }
}

/// A deviation in words.
pub fn describe_deviation(d: &tern_planner::Deviation) -> String {
    use tern_planner::Deviation as D;
    match d {
        D::DirtyRate {
            vm,
            assumed,
            observed,
        } => format!("{vm} dirties {observed} bytes/s, {assumed} assumed"),
        D::LinkRate {
            host,
            assumed,
            observed,
        } => format!("{host} sends {observed} bytes/s, {assumed} assumed"),
        D::DestinationGone { host, retargeted } => format!(
            "destination {host} gone; re-targeted: {}",
            if retargeted.is_empty() {
                "none".to_string()
            } else {
                retargeted.join(", ")
            }
        ),
        D::FailedBeforeSwitch {
            vm,
            destination,
            attempts,
            action,
        } => format!(
            "{vm} failed before the switch to {destination} (attempt {attempts}); {}",
            match action {
                tern_planner::RetryAction::Retry {
                    backoff_s,
                    same_destination,
                } => format!(
                    "retry in {backoff_s:.1} s to {} destination",
                    if *same_destination {
                        "the same"
                    } else {
                        "another"
                    }
                ),
                tern_planner::RetryAction::NotRetried => "not retried".into(),
            }
        ),
        D::Makespan { before_s, after_s } => {
            format!("predicted makespan {before_s:.1} s -> {after_s:.1} s")
        }
    }
}

/// The controller's plan from the planner's (the planner's plan and request kept whole).
pub fn to_controller_plan(
    host: &str,
    deadline_s: u64,
    req: &tern_planner::EvacuationRequest,
    p: &tern_planner::EvacuationPlan,
) -> Result<EvacuationPlan, PlanError> {
    if !p.unplaceable.is_empty() {
        return Err(PlanError::NoDestination {
            host: host.to_string(),
            vms: p
                .unplaceable
                .iter()
                .map(|u| Unplaceable {
                    vm: u.vm.clone(),
                    rejections: u
                        .refusals
                        .iter()
                        .map(|r| Rejection {
                            host: r.host.clone(),
                            why: r.refusal.to_string(),
                        })
                        .collect(),
                })
                .collect(),
        });
    }
    let migrations = p
        .migrations
        .iter()
        .map(|m| {
            let reasons: Vec<String> = m.reasons.iter().map(describe_reason).collect();
            PlannedMigration {
                vm: m.vm.clone(),
                destination: m.destination.clone(),
                reason: if reasons.is_empty() {
                    format!("{} can take it", m.destination)
                } else {
                    reasons.join("; ")
                },
                start_s: m.predicted_start_s,
                duration_s: (m.predicted_end_s - m.predicted_start_s).max(0.0),
                end_s: m.predicted_end_s,
                trigger: match &m.trigger {
                    tern_planner::StartTrigger::Now => PlanTrigger::Now,
                    tern_planner::StartTrigger::AlreadyRunning => PlanTrigger::AlreadyRunning,
                    tern_planner::StartTrigger::AfterMigrationOf { vm } => {
                        PlanTrigger::AfterMigrationOf { vm: vm.clone() }
                    }
                    tern_planner::StartTrigger::AtTime { at_s } => {
                        PlanTrigger::AtTime { at_s: *at_s }
                    }
                },
                needs_post_copy: m.needs_post_copy,
                post_copy_permitted: m.post_copy_permitted,
                predicted_bytes: m.predicted_bytes,
                reasons,
            }
        })
        .collect();
    let (verdict, slack) = match p.deadline {
        tern_planner::DeadlineVerdict::NoDeadline => ("no-deadline", None),
        tern_planner::DeadlineVerdict::Met { slack_s } => ("met", Some(slack_s)),
        tern_planner::DeadlineVerdict::AtRisk { over_by_s } => ("at-risk", Some(-over_by_s)),
    };
    let json = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|e| PlanError::Invalid(format!("plan not serialisable: {e}")))
    };
    Ok(EvacuationPlan {
        host: host.to_string(),
        planner: format!("tern-planner ({})", p.scheduler),
        migrations,
        concurrency: p.concurrency.per_source_cap.max(1),
        predicted_makespan_s: p.predicted_makespan_s,
        deadline_s,
        fits_deadline: matches!(p.deadline, tern_planner::DeadlineVerdict::Met { .. }),
        lower_bound_s: p.lower_bound.any_schedule_s,
        deadline_verdict: verdict.into(),
        deadline_slack_s: slack,
        suggestions: p.suggestions.iter().map(describe_suggestion).collect(),
        deviations: p.deviations.iter().map(describe_deviation).collect(),
        made_ms: 0,
        detail: Some(json(serde_json::to_value(p))?),
        request: Some(json(serde_json::to_value(req))?),
    })
}

impl EvacuationPlanner for TernPlanner {
    fn name(&self) -> &'static str {
        "tern-planner"
    }

    fn plan(&self, input: PlanInput<'_>) -> Result<EvacuationPlan, PlanError> {
        let req = request(input)?;
        let p =
            tern_planner::plan_evacuation(&req).map_err(|e| PlanError::Invalid(e.to_string()))?;
        to_controller_plan(&input.host.name, input.deadline_s, &req, &p)
    }
}

/// The planner the controller uses.
pub fn default_planner() -> Box<dyn EvacuationPlanner> {
    Box::new(TernPlanner)
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
        let p = SerialPlanner
            .plan(PlanInput {
                fleet: &f,
                host: &f.hosts["h1"],
                vms: &vms,
                deadline_s: 3600,
            })
            .unwrap();
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
        let PlanError::NoDestination { vms, .. } = e else {
            panic!("{e}");
        };
        assert_eq!(vms[0].vm, "big");
        let h2 = vms[0].rejections.iter().find(|r| r.host == "h2").unwrap();
        assert!(h2.why.contains("256 MiB free"), "{}", h2.why);
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

    #[test]
    fn tern_planner_plans_every_vm_with_triggers_and_bounds() {
        let f = fleet(vec![
            host("h1", 0, "10.0.0"),
            host("h2", 2048, "10.0.0"),
            host("h3", 2048, "10.0.0"),
            host("h4", 2048, "10.0.0"),
        ]);
        let mut vms = vec![
            vm("a", "h1", 1024),
            vm("b", "h1", 768),
            vm("c", "h1", 512),
            vm("d", "h1", 256),
            vm("e", "h1", 256),
        ];
        vms[0].dirty_bytes_per_s = Some(100_000_000);
        vms[1].post_copy_allowed = false;
        let p = plan_evacuation(&f, &f.hosts["h1"], &vms, 3600).unwrap();
        assert_eq!(p.planner, "tern-planner (tern)");
        assert_eq!(p.migrations.len(), 5);
        assert!(p.predicted_makespan_s >= p.lower_bound_s - 1e-9);
        assert!(p.lower_bound_s > 0.0);
        assert!(p.fits_deadline);
        assert_eq!(p.deadline_verdict, "met");
        assert_eq!(p.migrations[0].trigger, PlanTrigger::Now);
        // With two outgoing slots the rest wait for a named migration (or a time).
        assert!(
            p.migrations
                .iter()
                .any(|m| matches!(m.trigger, PlanTrigger::AfterMigrationOf { .. }))
        );
        for m in &p.migrations {
            assert_ne!(m.destination, "h1");
            assert!(m.end_s >= m.start_s);
            assert!((m.duration_s - (m.end_s - m.start_s)).abs() < 1e-9);
        }
        assert!(
            !p.migrations
                .iter()
                .find(|m| m.vm == "b")
                .unwrap()
                .post_copy_permitted
        );
        let req: tern_planner::EvacuationRequest =
            serde_json::from_value(p.request.clone().unwrap()).unwrap();
        assert_eq!(req.vms.len(), 5);
        // "silver" is not a built-in class: planned with standard's tolerances, name kept.
        assert_eq!(req.vms[0].sla.name, "silver");
        assert!(p.detail.is_some());
    }

    #[test]
    fn a_deadline_below_the_prediction_is_at_risk_with_suggestions() {
        let f = fleet(vec![host("h1", 0, "10.0.0"), host("h2", 65536, "10.0.0")]);
        let vms = [vm("a", "h1", 8192), vm("b", "h1", 8192)];
        let p = plan_evacuation(&f, &f.hosts["h1"], &vms, 5).unwrap();
        assert!(!p.fits_deadline);
        assert_eq!(p.deadline_verdict, "at-risk");
        assert!(p.deadline_slack_s.unwrap() < 0.0);
        assert!(!p.suggestions.is_empty());
    }
}
