//! Re-planning mid-way: the previous request and plan, plus what was observed since.
//!
//! Nova, KubeVirt and Proxmox never re-plan an evacuation: a failed migration is reported and
//! the operator runs the command again. tern folds observations back into the request (a VM
//! dirtying more than assumed, a slower link, a destination gone, a migration that failed before
//! the switch) and plans the rest again, saying what deviated. In a must-finish context a failed
//! migration is retried with exponential backoff, first on the same destination (a transient
//! network drop), then elsewhere.

use serde::{Deserialize, Serialize};

use crate::facts::{EvacuationRequest, InFlightMigration, RequestError, RetryState};
use crate::plan::{Deviation, EvacuationPlan, RetryAction};
use crate::plan_evacuation;

/// Backoff never exceeds this, seconds.
pub const MAX_BACKOFF_S: f64 = 300.0;
/// Observed rates within this fraction of the assumption are not reported as deviations.
pub const DEVIATION_TOLERANCE: f64 = 0.2;

/// A migration that failed before the switch: the guest is still on its source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedAttempt {
    /// The VM.
    pub vm: String,
    /// Destination of the failed attempt.
    pub destination: String,
    /// Attempts so far, this one included.
    pub attempts: u32,
}

/// What happened since the previous plan was made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Seconds since the previous plan was made.
    pub elapsed_s: f64,
    /// VMs now running on their destination.
    pub completed: Vec<String>,
    /// Migrations running now (replaces the previous request's list).
    pub in_flight: Vec<InFlightMigration>,
    /// Migrations that failed before the switch.
    pub failed: Vec<FailedAttempt>,
    /// Hosts gone (agent unreachable, host down).
    pub hosts_gone: Vec<String>,
    /// Dirty rates measured during migration, bytes/s per VM.
    pub observed_dirty: Vec<(String, u64)>,
    /// Egress throughput measured per source host, bytes/s.
    pub observed_egress: Vec<(String, u64)>,
}

/// A new plan and the request it was made from (keep it for the next re-plan).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replanned {
    /// The request with the observations folded in.
    pub request: EvacuationRequest,
    /// The new plan; `deviations` says what changed.
    pub plan: EvacuationPlan,
}

fn differs(assumed: f64, observed: f64) -> bool {
    (observed - assumed).abs() > DEVIATION_TOLERANCE * assumed.max(1.0)
}

/// Plans the rest of an evacuation from `previous_request` (what `previous` was made from) and
/// `progress`.
pub fn replan(
    previous_request: &EvacuationRequest,
    previous: &EvacuationPlan,
    progress: &Progress,
) -> Result<Replanned, RequestError> {
    let mut req = previous_request.clone();
    let mut deviations = Vec::new();
    // Completed VMs leave the request; their memory is now used on their destination.
    for vm in &progress.completed {
        if let Some(pos) = req.vms.iter().position(|v| &v.name == vm) {
            let v = req.vms.remove(pos);
            let dest = previous.migration(vm).map(|m| m.destination.clone());
            if let Some(h) = req
                .hosts
                .iter_mut()
                .find(|h| Some(&h.name) == dest.as_ref())
            {
                h.free_memory_bytes = h.free_memory_bytes.saturating_sub(v.memory_bytes);
            }
        }
    }
    for gone in &progress.hosts_gone {
        if let Some(h) = req.hosts.iter_mut().find(|h| &h.name == gone) {
            h.reachable = false;
        }
        let retargeted: Vec<String> = previous
            .migrations
            .iter()
            .filter(|m| &m.destination == gone && !progress.completed.contains(&m.vm))
            .filter(|m| !progress.in_flight.iter().any(|f| f.vm == m.vm))
            .map(|m| m.vm.clone())
            .collect();
        deviations.push(Deviation::DestinationGone {
            host: gone.clone(),
            retargeted,
        });
    }
    for (vm, observed) in &progress.observed_dirty {
        if let Some(v) = req.vms.iter_mut().find(|v| &v.name == vm) {
            let (assumed, _) = v.dirty_rate();
            if differs(assumed, *observed as f64) {
                deviations.push(Deviation::DirtyRate {
                    vm: vm.clone(),
                    assumed: assumed as u64,
                    observed: *observed,
                });
            }
            v.dirty_bytes_per_s = Some(*observed);
        }
    }
    for (host, observed) in &progress.observed_egress {
        if let Some(h) = req.hosts.iter_mut().find(|h| &h.name == host) {
            if differs(h.egress_bytes_per_s as f64, *observed as f64) {
                deviations.push(Deviation::LinkRate {
                    host: host.clone(),
                    assumed: h.egress_bytes_per_s,
                    observed: *observed,
                });
            }
            h.egress_bytes_per_s = (*observed).max(1);
        }
    }
    // In-flight migrations whose destination is gone failed before the switch (pre-copy) and
    // are retried like any failure; post-copy ones cannot be retried and stay listed as running
    // for the controller's recovery.
    let mut failed = progress.failed.clone();
    req.in_flight = Vec::new();
    for f in &progress.in_flight {
        if progress.hosts_gone.contains(&f.destination) && !f.in_post_copy {
            let attempts = previous_request
                .retries
                .iter()
                .find(|r| r.vm == f.vm)
                .map_or(1, |r| r.attempts + 1);
            failed.push(FailedAttempt {
                vm: f.vm.clone(),
                destination: f.destination.clone(),
                attempts,
            });
        } else {
            req.in_flight.push(f.clone());
        }
    }
    req.retries.retain(|r| !progress.completed.contains(&r.vm));
    for r in &mut req.retries {
        r.not_before_s = (r.not_before_s - progress.elapsed_s).max(0.0);
    }
    for f in &failed {
        if req.context.must_finish() {
            let backoff = (req.settings.retry_backoff_base_s
                * 2f64.powi(f.attempts.saturating_sub(1).min(16) as i32))
            .min(MAX_BACKOFF_S);
            req.retries.retain(|r| r.vm != f.vm);
            req.retries.push(RetryState {
                vm: f.vm.clone(),
                attempts: f.attempts,
                last_destination: f.destination.clone(),
                not_before_s: backoff,
            });
            deviations.push(Deviation::FailedBeforeSwitch {
                vm: f.vm.clone(),
                destination: f.destination.clone(),
                attempts: f.attempts,
                action: RetryAction::Retry {
                    backoff_s: backoff,
                    same_destination: false,
                },
            });
        } else {
            req.vms.retain(|v| v.name != f.vm);
            deviations.push(Deviation::FailedBeforeSwitch {
                vm: f.vm.clone(),
                destination: f.destination.clone(),
                attempts: f.attempts,
                action: RetryAction::NotRetried,
            });
        }
    }
    req.deadline_s = previous_request
        .deadline_s
        .map(|d| (d - progress.elapsed_s).max(1e-3));
    let mut plan = plan_evacuation(&req)?;
    deviations.push(Deviation::Makespan {
        before_s: (previous.predicted_makespan_s - progress.elapsed_s).max(0.0),
        after_s: plan.predicted_makespan_s,
    });
    for d in &mut deviations {
        if let Deviation::FailedBeforeSwitch {
            vm,
            destination,
            action: RetryAction::Retry {
                same_destination, ..
            },
            ..
        } = d
        {
            *same_destination = plan
                .migration(vm)
                .is_some_and(|m| &m.destination == destination);
        }
    }
    plan.deviations = deviations;
    Ok(Replanned { request: req, plan })
}
