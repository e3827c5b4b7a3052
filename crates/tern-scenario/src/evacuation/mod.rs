//! A host evacuation on real lab hosts, through the controller: the building block of
//! `tern demo --evacuate`, of the evacuation lab tests and of the web view's browser test.
//!
//! [`LabCluster`] brings up lab hosts with one `tern agent` process each and a `tern server`
//! controller process; [`EvacuationSession`] boots guests of different kinds on `h1` through
//! its agent, waits until the controller has seen every host and guest in the heartbeats,
//! asks the controller for the plan (a dry run) and runs it through the controller's API,
//! then judges every guest from its host-timestamped serial logs exactly as the one-VM demo
//! does (corrupt pages, control mismatches, heartbeat continuity). [`run_evacuation`] does
//! all of it in one call; tests that kill a process mid-evacuation drive the session step by
//! step ([`EvacuationSession::poll`], [`EvacuationSession::cluster_mut`]).
//!
//! Nothing here decides anything about the evacuation: the controller plans and runs it;
//! this module only starts processes, places guests, watches the API and reads the logs.

pub mod cluster;
pub mod controller_api;
mod session;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_qemu::PostCopyPermission;
use tern_server::evacuation::EvacuationView;
use tern_server::model::EvacuationPlan;

pub use cluster::{ClusterSpec, LabCluster};
pub use controller_api::{ControllerApi, ControllerCallError};
pub use session::{EvacuationSession, run_evacuation};

/// Why a lab evacuation could not be run or judged.
#[derive(Debug, thiserror::Error)]
pub enum EvacuationError {
    /// The lab could not be set up.
    #[error(transparent)]
    Lab(#[from] tern_lab::LabError),
    /// Guest boot.
    #[error(transparent)]
    Scenario(#[from] crate::ScenarioError),
    /// A guest's serial log could not be read.
    #[error(transparent)]
    Guest(#[from] tern_guest::GuestError),
    /// The controller refused or did not answer.
    #[error(transparent)]
    Controller(#[from] ControllerCallError),
    /// An agent refused or did not answer.
    #[error("agent of {host}: {source}")]
    Agent {
        /// The host.
        host: String,
        /// What the agent said.
        source: tern_agent::ClientError,
    },
    /// Bad settings (names the value and what is valid).
    #[error("{0}")]
    Invalid(String),
    /// Local files, ports, processes.
    #[error("{0}")]
    Io(String),
    /// Something did not happen in time (names what and how long was waited).
    #[error("{0}")]
    Timeout(String),
}

/// What a guest of the evacuation does, so that the plan meets every kind of VM an operator
/// has: the planner must place and order them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestKind {
    /// Barely writes: one pre-copy pass moves it.
    Idle,
    /// Writes well below the link rate: pre-copy converges in a few passes.
    Converging,
    /// Writes faster than the link carries: needs post-copy (or throttling) to finish.
    FasterThanLink,
    /// Converging, but its owner forbids post-copy (a VFIO device, say): pre-copy only.
    NoPostCopy,
}

impl GuestKind {
    /// The kind's name as JSON spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Converging => "converging",
            Self::FasterThanLink => "faster-than-link",
            Self::NoPostCopy => "no-post-copy",
        }
    }
}

/// One guest to boot on the evacuated host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvacuationGuest {
    /// VM name (unique in the cluster).
    pub name: String,
    /// What it does.
    pub kind: GuestKind,
    /// Guest RAM (MiB).
    pub memory_mib: u64,
    /// Its `tern-load` workload.
    pub workload: WorkloadParams,
    /// Whether tern may switch it to post-copy.
    pub post_copy: PostCopyPermission,
    /// SLA class (`latency-critical`, `standard`, `batch`).
    pub sla_class: String,
}

impl EvacuationGuest {
    /// A guest of `kind` named `name`, sized for a short lab run (160–192 MiB).
    pub fn of_kind(name: &str, kind: GuestKind) -> Self {
        let (memory_mib, working_set_mib, rate, post_copy, sla) = match kind {
            GuestKind::Idle => (
                160,
                8,
                PageRate::PerSecond(20),
                PostCopyPermission::Allowed,
                "batch",
            ),
            GuestKind::Converging => (
                192,
                32,
                PageRate::PerSecond(1_500),
                PostCopyPermission::Allowed,
                "standard",
            ),
            GuestKind::FasterThanLink => (
                192,
                64,
                PageRate::Max,
                PostCopyPermission::Allowed,
                "standard",
            ),
            GuestKind::NoPostCopy => (
                192,
                24,
                PageRate::PerSecond(1_000),
                PostCopyPermission::Forbidden,
                "standard",
            ),
        };
        Self {
            name: name.to_string(),
            kind,
            memory_mib,
            workload: WorkloadParams {
                working_set_mib,
                rate,
                pattern: WritePattern::Sequential,
                verify: true,
            },
            post_copy,
            sla_class: sla.to_string(),
        }
    }

    /// The demo's five guests: idle, two converging, faster than the link, post-copy
    /// forbidden.
    pub fn demo_set() -> Vec<Self> {
        vec![
            Self::of_kind("idle", GuestKind::Idle),
            Self::of_kind("web", GuestKind::Converging),
            Self::of_kind("db", GuestKind::FasterThanLink),
            Self::of_kind("vfio", GuestKind::NoPostCopy),
            Self::of_kind("cache", GuestKind::Converging),
        ]
    }

    /// The CI case's three guests (short on 2 cores): idle, faster than the link, post-copy
    /// forbidden.
    pub fn ci_set() -> Vec<Self> {
        vec![
            Self::of_kind("idle", GuestKind::Idle),
            Self::of_kind("db", GuestKind::FasterThanLink),
            Self::of_kind("vfio", GuestKind::NoPostCopy),
        ]
    }
}

/// Everything a lab evacuation needs.
#[derive(Debug, Clone)]
pub struct EvacuationSpec {
    /// The cluster (lab name, hosts, link, `tern` binary).
    pub cluster: ClusterSpec,
    /// Guests booted on `h1`, the host evacuated.
    pub guests: Vec<EvacuationGuest>,
    /// The evacuation's deadline (s).
    pub deadline_s: u64,
    /// How long to watch the guests on their new hosts before judging them.
    pub settle: Duration,
    /// How long to wait for the evacuation to end (beyond the deadline: the controller
    /// reports a missed deadline itself).
    pub timeout: Duration,
}

/// The host every lab evacuation empties.
pub const EVACUATED_HOST: &str = "h1";

/// What the caller is told while the evacuation runs.
#[derive(Debug, Clone)]
pub enum EvacuationProgress {
    /// A step, for operators.
    Step(String),
    /// The plan, before anything starts (the controller's dry run).
    Plan(Box<EvacuationPlan>),
    /// The evacuation as the controller shows it now.
    Status(Box<EvacuationView>),
}

/// One VM's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmVerdict {
    /// VM name.
    pub name: String,
    /// What the guest does.
    pub kind: GuestKind,
    /// The evacuated host.
    pub from: String,
    /// Where the guest runs at the end (`None`: nowhere it could be found).
    pub to: Option<String>,
    /// The controller's final state of its migration (`completed`, `failed`, …).
    pub outcome: String,
    /// Whether the agent reported a switch to post-copy.
    pub switched_to_postcopy: bool,
    /// Corrupt pages the guest's verifier found (both logs).
    pub corrupt_pages: u64,
    /// Control-state mismatches (both logs).
    pub control_mismatches: u64,
    /// Heartbeat sequence without gaps or repeats across the move.
    pub heartbeat_continuous: bool,
    /// Where the sequence broke, if it did (side, previous and next sequence number).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heartbeat_anomalies: Vec<tern_guest::SequenceAnomaly>,
    /// Guest blackout (ms): the host-time gap between the source's last and the
    /// destination's first heartbeat.
    pub blackout_ms: Option<f64>,
    /// Verifier passes completed on the destination.
    pub verify_passes_after: u64,
    /// Attempts the controller made (more than one: retried).
    pub attempts: u32,
    /// The plan's predicted duration for this VM (s).
    pub predicted_duration_s: Option<f64>,
    /// Measured from the controller's record: first start to end (s).
    pub actual_duration_s: Option<f64>,
    /// The controller's last error for it.
    pub error: Option<String>,
}

impl VmVerdict {
    /// Moved, intact and continuous.
    pub fn is_intact(&self) -> bool {
        self.outcome == "completed"
            && self.to.as_deref().is_some_and(|t| t != self.from)
            && self.corrupt_pages == 0
            && self.control_mismatches == 0
            && self.heartbeat_continuous
    }
}

/// The whole evacuation's verdict (`tern demo --evacuate -o json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvacuationReport {
    /// The controller's final evacuation state (`completed`, `failed`, `cancelled`).
    pub outcome: String,
    /// The controller's evacuation id.
    pub evacuation_id: String,
    /// The host emptied.
    pub host: String,
    /// The plan's predicted makespan (s).
    pub predicted_makespan_s: f64,
    /// The measured makespan (s), as the controller recorded it.
    pub actual_makespan_s: Option<f64>,
    /// (actual − predicted) / predicted, percent.
    pub prediction_error_pct: Option<f64>,
    /// The plan's lower bound (bytes to move over the source's egress, s).
    pub lower_bound_s: f64,
    /// The deadline (s).
    pub deadline_s: u64,
    /// Whether the evacuation completed within the deadline.
    pub deadline_met: bool,
    /// Link rate of every lab host.
    pub link_rate: String,
    /// Re-plans the controller made while running.
    pub replans: u32,
    /// One verdict per VM, in the plan's order.
    pub vms: Vec<VmVerdict>,
    /// The controller's error, if the evacuation failed.
    pub error: Option<String>,
}

impl EvacuationReport {
    /// Every VM moved intact and the evacuation completed within its deadline.
    pub fn is_success(&self) -> bool {
        self.outcome == "completed"
            && self.deadline_met
            && !self.vms.is_empty()
            && self.vms.iter().all(VmVerdict::is_intact)
    }
}

/// (actual − predicted) / predicted in percent, when both are known and the prediction is
/// positive.
pub fn prediction_error_pct(predicted_s: f64, actual_s: Option<f64>) -> Option<f64> {
    let actual = actual_s?;
    (predicted_s > 0.0).then(|| (actual - predicted_s) / predicted_s * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_sets_cover_every_kind_and_fit_small_lab_guests() {
        let demo = EvacuationGuest::demo_set();
        for kind in [
            GuestKind::Idle,
            GuestKind::Converging,
            GuestKind::FasterThanLink,
            GuestKind::NoPostCopy,
        ] {
            assert!(demo.iter().any(|g| g.kind == kind), "{kind:?} missing");
        }
        for g in demo.iter().chain(EvacuationGuest::ci_set().iter()) {
            assert!((128..=192).contains(&g.memory_mib), "{}", g.name);
            assert!(u64::from(g.workload.working_set_mib) + 96 <= g.memory_mib);
            assert_eq!(
                g.post_copy == PostCopyPermission::Forbidden,
                g.kind == GuestKind::NoPostCopy
            );
        }
        let names: std::collections::BTreeSet<_> = demo.iter().map(|g| &g.name).collect();
        assert_eq!(names.len(), demo.len(), "names are unique");
        assert_eq!(EvacuationGuest::ci_set().len(), 3);
    }

    #[test]
    fn prediction_error_is_relative_to_the_prediction() {
        assert_eq!(prediction_error_pct(10.0, Some(12.0)), Some(20.0));
        assert_eq!(prediction_error_pct(10.0, Some(8.0)), Some(-20.0));
        assert_eq!(prediction_error_pct(0.0, Some(8.0)), None);
        assert_eq!(prediction_error_pct(10.0, None), None);
    }

    #[test]
    fn a_vm_left_on_its_source_or_damaged_is_not_intact() {
        let v = VmVerdict {
            name: "web".into(),
            kind: GuestKind::Converging,
            from: "h1".into(),
            to: Some("h2".into()),
            outcome: "completed".into(),
            switched_to_postcopy: false,
            corrupt_pages: 0,
            control_mismatches: 0,
            heartbeat_continuous: true,
            heartbeat_anomalies: Vec::new(),
            blackout_ms: Some(120.0),
            verify_passes_after: 2,
            attempts: 1,
            predicted_duration_s: Some(5.0),
            actual_duration_s: Some(6.0),
            error: None,
        };
        assert!(v.is_intact());
        assert!(
            !VmVerdict {
                to: Some("h1".into()),
                ..v.clone()
            }
            .is_intact()
        );
        assert!(
            !VmVerdict {
                corrupt_pages: 1,
                ..v.clone()
            }
            .is_intact()
        );
        assert!(
            !VmVerdict {
                heartbeat_continuous: false,
                ..v.clone()
            }
            .is_intact()
        );
        assert!(
            !VmVerdict {
                outcome: "failed".into(),
                ..v
            }
            .is_intact()
        );
    }
}
