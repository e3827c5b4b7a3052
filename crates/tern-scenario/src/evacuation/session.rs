//! One lab evacuation, step by step: cluster up, guests booted on `h1`, the controller's plan,
//! the run through the controller's API, and every guest's verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tern_agent::{AgentClient, VmRole};
use tern_guest::HostSerialLog;
use tern_qemu::{VmMigrationSettings, VmSpec};
use tern_server::evacuation::EvacuationView;
use tern_server::model::{EvacuationPlan, HostState, MigrationRecord};
use tokio::sync::mpsc::UnboundedSender;

use super::{
    ControllerApi, ControllerCallError, EVACUATED_HOST, EvacuationError, EvacuationGuest,
    EvacuationProgress, EvacuationReport, EvacuationSpec, LabCluster, VmVerdict,
    prediction_error_pct,
};
use crate::LabEnvironment;

/// How long the guests may take to boot and finish a verify pass (several TCG guests boot
/// at once on two cores).
const GUESTS_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// How long the controller may take to see every host and guest in the heartbeats.
const CONTROLLER_SEES_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the evacuation is polled.
const POLL: Duration = Duration::from_millis(500);

/// A running lab cluster with guests on `h1`, ready to be evacuated.
#[derive(Debug)]
pub struct EvacuationSession {
    cluster: Option<LabCluster>,
    api: ControllerApi,
    spec: EvacuationSpec,
    /// Each guest's serial log on `h1` (written by `h1`'s agent; kept after the guest left).
    source_logs: BTreeMap<String, PathBuf>,
    progress: Option<UnboundedSender<EvacuationProgress>>,
}

impl EvacuationSession {
    /// Brings the cluster up, boots every guest on `h1` through its agent, waits for their
    /// verifiers' first pass and until the controller's heartbeats show every host `up` and
    /// every guest on `h1`.
    pub async fn start(
        env: &LabEnvironment,
        spec: EvacuationSpec,
        progress: Option<UnboundedSender<EvacuationProgress>>,
    ) -> Result<Self, EvacuationError> {
        validate(&spec)?;
        let step = |s: String| {
            if let Some(p) = &progress {
                let _ = p.send(EvacuationProgress::Step(s));
            }
        };
        step(format!(
            "lab up: {} hosts, link {}, one agent process per host, one controller process",
            spec.cluster.hosts, spec.cluster.link_rate
        ));
        let cluster_spec = spec.cluster.clone();
        let cluster = tokio::task::spawn_blocking(move || LabCluster::start(cluster_spec))
            .await
            .map_err(|e| EvacuationError::Io(format!("cluster start task failed: {e}")))??;
        let api = ControllerApi::new(&cluster.controller_url(), cluster.token()?);
        let mut session = Self {
            cluster: Some(cluster),
            api,
            spec,
            source_logs: BTreeMap::new(),
            progress,
        };
        session.boot_guests(env).await?;
        session.step(format!(
            "waiting for the controller to see {} hosts and {} guests on {EVACUATED_HOST}",
            session.spec.cluster.hosts,
            session.spec.guests.len()
        ));
        session.wait_controller_sees_guests().await?;
        Ok(session)
    }

    fn step(&self, s: String) {
        if let Some(p) = &self.progress {
            let _ = p.send(EvacuationProgress::Step(s));
        }
    }

    /// The cluster (processes, lab, URLs).
    pub fn cluster(&self) -> &LabCluster {
        self.cluster
            .as_ref()
            .unwrap_or_else(|| unreachable!("the cluster lives until finish"))
    }

    /// The cluster, to kill and restart its processes.
    pub fn cluster_mut(&mut self) -> &mut LabCluster {
        self.cluster
            .as_mut()
            .unwrap_or_else(|| unreachable!("the cluster lives until finish"))
    }

    /// The controller's API.
    pub fn api(&self) -> &ControllerApi {
        &self.api
    }

    /// The session's settings.
    pub fn spec(&self) -> &EvacuationSpec {
        &self.spec
    }

    fn agent(&self, host: &str) -> Result<AgentClient, EvacuationError> {
        Ok(AgentClient::new(self.cluster().agent_url(host)?))
    }

    async fn boot_guests(&mut self, env: &LabEnvironment) -> Result<(), EvacuationError> {
        let h1 = self.agent(EVACUATED_HOST)?;
        for g in self.spec.guests.clone() {
            self.step(format!(
                "boot {} on {EVACUATED_HOST} ({}: {} MiB, working set {} MiB, {} page writes/s, post-copy {}, SLA {})",
                g.name,
                g.kind.as_str(),
                g.memory_mib,
                g.workload.working_set_mib,
                g.workload.rate,
                g.post_copy,
                g.sla_class
            ));
            let info = h1
                .create_vm(&guest_vm_spec(env, &g))
                .await
                .map_err(|source| EvacuationError::Agent {
                    host: EVACUATED_HOST.into(),
                    source,
                })?;
            self.source_logs.insert(g.name.clone(), info.serial_log);
        }
        // They boot concurrently; waiting for each in turn costs no more than the slowest.
        for (name, log) in &self.source_logs {
            crate::wait_guest_ready(log, 1, GUESTS_READY_TIMEOUT)
                .await
                .map_err(|e| EvacuationError::Timeout(format!("guest {name}: {e}")))?;
        }
        Ok(())
    }

    async fn wait_controller_sees_guests(&self) -> Result<(), EvacuationError> {
        let started = Instant::now();
        let want: BTreeSet<&str> = self.spec.guests.iter().map(|g| g.name.as_str()).collect();
        loop {
            let last = match (
                self.api.hosts().await,
                self.api.vms_on(EVACUATED_HOST).await,
            ) {
                (Ok(hosts), Ok(vms)) => {
                    let up = hosts.iter().filter(|h| h.state == HostState::Up).count();
                    let seen: BTreeSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
                    if up == self.spec.cluster.hosts && want.is_subset(&seen) {
                        return Ok(());
                    }
                    format!(
                        "{up} of {} hosts up, guests seen on {EVACUATED_HOST}: {seen:?}",
                        self.spec.cluster.hosts
                    )
                }
                (Err(e), _) | (_, Err(e)) => e.to_string(),
            };
            if started.elapsed() > CONTROLLER_SEES_TIMEOUT {
                return Err(EvacuationError::Timeout(format!(
                    "the controller did not see every host and guest within {} s: {last}",
                    CONTROLLER_SEES_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The controller's plan for emptying `h1` (a dry run: nothing changes).
    pub async fn plan(&self) -> Result<EvacuationPlan, EvacuationError> {
        let r = self
            .api
            .evacuate(EVACUATED_HOST, self.spec.deadline_s, true)
            .await?;
        Ok(r.plan)
    }

    /// Starts the evacuation of `h1`; returns its id and the plan it started with.
    pub async fn begin(&self) -> Result<(String, EvacuationPlan), EvacuationError> {
        let r = self
            .api
            .evacuate(EVACUATED_HOST, self.spec.deadline_s, false)
            .await?;
        let id = r.id.ok_or_else(|| {
            EvacuationError::Io("the controller started an evacuation without an id".into())
        })?;
        Ok((id, r.plan))
    }

    /// The evacuation as the controller shows it now.
    pub async fn poll(&self, id: &str) -> Result<EvacuationView, ControllerCallError> {
        self.api.evacuation(id).await
    }

    /// Polls until the evacuation ends (completed, failed or cancelled), tolerating a
    /// controller that does not answer for a while (it may be restarting); reports each view.
    pub async fn wait_end(&self, id: &str) -> Result<EvacuationView, EvacuationError> {
        let started = Instant::now();
        loop {
            match self.poll(id).await {
                Ok(view) => {
                    let done = view.evacuation.state.is_terminal();
                    if let Some(p) = &self.progress {
                        let _ = p.send(EvacuationProgress::Status(Box::new(view.clone())));
                    }
                    if done {
                        return Ok(view);
                    }
                }
                Err(ControllerCallError::Unreachable { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            if started.elapsed() > self.spec.timeout {
                return Err(EvacuationError::Timeout(format!(
                    "evacuation {id} did not end within {} s",
                    self.spec.timeout.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Judges every guest of the ended evacuation `view` against `plan` (the plan it started
    /// with): where it runs, its migration's outcome, and its serial logs.
    pub async fn judge(
        &self,
        view: &EvacuationView,
        plan: &EvacuationPlan,
    ) -> Result<EvacuationReport, EvacuationError> {
        let mut vms = Vec::new();
        let mut replans = BTreeSet::new();
        for g in &self.spec.guests {
            let record = last_record(&view.migrations, &g.name);
            if let Some(r) = record
                && let Ok(full) = self.api.migration(&r.id).await
            {
                for e in full.events.iter().filter(|e| e.kind == "replan") {
                    replans.insert(e.detail.clone());
                }
            }
            vms.push(self.verdict(g, record, plan).await?);
        }
        let e = &view.evacuation;
        let outcome = tern_server::model::enum_str(&e.state);
        let deadline_met = outcome == "completed"
            && e.actual_makespan_s
                .is_some_and(|a| a <= self.spec.deadline_s as f64);
        Ok(EvacuationReport {
            outcome,
            evacuation_id: e.id.clone(),
            host: e.host.clone(),
            predicted_makespan_s: e.predicted_makespan_s,
            actual_makespan_s: e.actual_makespan_s,
            prediction_error_pct: prediction_error_pct(e.predicted_makespan_s, e.actual_makespan_s),
            lower_bound_s: plan.lower_bound_s,
            deadline_s: self.spec.deadline_s,
            deadline_met,
            link_rate: self.spec.cluster.link_rate.to_string(),
            replans: u32::try_from(replans.len()).unwrap_or(u32::MAX),
            vms,
            error: e.error.clone(),
        })
    }

    /// Where guest `name` runs now: the host whose agent shows it running (not an incoming
    /// half), another host than `h1` first. With its serial log there.
    async fn locate(&self, name: &str) -> Option<(String, PathBuf)> {
        let mut found = None;
        for host in self.cluster().hosts() {
            let Ok(agent) = self.agent(&host) else {
                continue;
            };
            if let Ok(info) = agent.show_vm(name).await
                && info.role == VmRole::Running
                && info.run_state.is_running()
            {
                if host != EVACUATED_HOST {
                    return Some((host, info.serial_log));
                }
                found = Some((host, info.serial_log));
            }
        }
        found
    }

    async fn verdict(
        &self,
        g: &EvacuationGuest,
        record: Option<&MigrationRecord>,
        plan: &EvacuationPlan,
    ) -> Result<VmVerdict, EvacuationError> {
        let src_path = self.source_logs.get(&g.name).ok_or_else(|| {
            EvacuationError::Io(format!("no serial log recorded for guest {}", g.name))
        })?;
        let src = HostSerialLog::read(src_path)?;
        let location = self.locate(&g.name).await;
        let mut v = VmVerdict {
            name: g.name.clone(),
            kind: g.kind,
            from: EVACUATED_HOST.into(),
            to: location.as_ref().map(|(h, _)| h.clone()),
            outcome: record.map_or_else(
                || "not-planned".to_string(),
                |r| r.state.as_str().to_string(),
            ),
            switched_to_postcopy: record.is_some_and(|r| r.switched_to_postcopy),
            corrupt_pages: 0,
            control_mismatches: 0,
            heartbeat_continuous: false,
            heartbeat_anomalies: Vec::new(),
            blackout_ms: None,
            verify_passes_after: 0,
            attempts: record.map_or(0, |r| r.attempts),
            predicted_duration_s: plan
                .migrations
                .iter()
                .find(|m| m.vm == g.name)
                .map(|m| m.duration_s),
            actual_duration_s: record
                .and_then(|r| Some(r.ended_ms?.saturating_sub(r.started_ms?) as f64 / 1000.0)),
            error: record.and_then(|r| r.error.clone()),
        };
        match location {
            Some((host, dst_path)) if host != EVACUATED_HOST => {
                let dst = HostSerialLog::read(&dst_path)?;
                let i = tern_guest::analyze_migration(&src, &dst);
                v.corrupt_pages = i.corrupt_pages;
                v.control_mismatches = i.control_mismatches;
                v.heartbeat_continuous = i.heartbeat_continuous;
                v.heartbeat_anomalies = i.sequence_anomalies.clone();
                v.blackout_ms = i.blackout_ms;
                v.verify_passes_after = i.verify_passes_after;
            }
            _ => {
                let h = tern_guest::analyze_boot(&src);
                v.corrupt_pages = h.corrupt_pages;
                v.control_mismatches = h.control_mismatches;
                v.heartbeat_continuous = h.sequence_anomalies.is_empty() && h.heartbeats > 0;
                v.heartbeat_anomalies = h.sequence_anomalies.clone();
            }
        }
        Ok(v)
    }

    /// Stops every process and takes the lab down (blocking work, off the async threads).
    pub async fn finish(mut self) {
        if let Some(cluster) = self.cluster.take() {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }
}

/// The last migration record of `vm` (a VM re-targeted by a re-plan may have several).
fn last_record<'a>(records: &'a [MigrationRecord], vm: &str) -> Option<&'a MigrationRecord> {
    records
        .iter()
        .filter(|r| r.vm == vm)
        .max_by_key(|r| (r.created_ms, r.attempts))
}

fn validate(spec: &EvacuationSpec) -> Result<(), EvacuationError> {
    if spec.guests.is_empty() {
        return Err(EvacuationError::Invalid(
            "an evacuation needs at least one guest on h1".into(),
        ));
    }
    if spec.deadline_s == 0 {
        return Err(EvacuationError::Invalid(
            "deadline 0 s is invalid: give a positive number of seconds".into(),
        ));
    }
    let names: BTreeSet<&str> = spec.guests.iter().map(|g| g.name.as_str()).collect();
    if names.len() != spec.guests.len() {
        return Err(EvacuationError::Invalid(
            "guest names must be unique in the cluster".into(),
        ));
    }
    let total: u64 = spec.guests.iter().map(|g| g.memory_mib).sum();
    if total > spec.cluster.host_memory_mib {
        return Err(EvacuationError::Invalid(format!(
            "the guests need {total} MiB but each host offers {} MiB: raise the host memory or \
             boot fewer guests",
            spec.cluster.host_memory_mib
        )));
    }
    Ok(())
}

/// The VM spec of one guest: the environment's image running the guest's workload.
fn guest_vm_spec(env: &LabEnvironment, g: &EvacuationGuest) -> VmSpec {
    VmSpec {
        name: g.name.clone(),
        memory_mib: g.memory_mib,
        vcpus: 1,
        kernel: env.image.kernel.clone(),
        initrd: env.image.initrd.clone(),
        cmdline: env.image.cmdline(&g.workload),
        accelerator: env.accelerator.accelerator,
        devices: Default::default(),
        migration: VmMigrationSettings {
            post_copy: g.post_copy,
            max_downtime_ms: None,
            sla_class: g.sla_class.clone(),
        },
    }
}

/// The whole lab evacuation: cluster up, guests booted on `h1`, the plan (reported before
/// anything starts), the run through the controller, a settle time on the new hosts, every
/// guest judged, everything stopped.
pub async fn run_evacuation(
    env: &LabEnvironment,
    spec: EvacuationSpec,
    progress: Option<UnboundedSender<EvacuationProgress>>,
) -> Result<EvacuationReport, EvacuationError> {
    let session = EvacuationSession::start(env, spec, progress.clone()).await?;
    let result = drive(&session, progress.as_ref()).await;
    session.finish().await;
    result
}

async fn drive(
    session: &EvacuationSession,
    progress: Option<&UnboundedSender<EvacuationProgress>>,
) -> Result<EvacuationReport, EvacuationError> {
    let send = |p: EvacuationProgress| {
        if let Some(tx) = progress {
            let _ = tx.send(p);
        }
    };
    let dry = session.plan().await?;
    send(EvacuationProgress::Plan(Box::new(dry)));
    let (id, plan) = session.begin().await?;
    session.step(format!(
        "evacuation {id} started: predicted makespan {:.1} s, deadline {} s",
        plan.predicted_makespan_s,
        session.spec().deadline_s
    ));
    let view = session.wait_end(&id).await?;
    let settle = session.spec().settle;
    session.step(format!(
        "evacuation {}; watching the guests for {} s",
        tern_server::model::enum_str(&view.evacuation.state),
        settle.as_secs()
    ));
    tokio::time::sleep(settle).await;
    session.judge(&view, &plan).await
}
