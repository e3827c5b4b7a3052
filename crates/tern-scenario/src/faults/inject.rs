//! Carrying out [`FaultPlan`]s against a running hop, whichever backend runs it: the same
//! injector cuts links, kills QEMUs and kills (and restarts) agents for an in-process hop and
//! for one driven through agent processes, so every fault combines with every other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_agent::HostRuntime;
use tern_engine::{MigrationProgress, MigrationState};
use tern_lab::{FaultMode, Lab, Signal};
use tokio::sync::watch;

use super::{FaultAction, FaultHost, FaultPlan, FaultTrigger};
use crate::agents::AgentFleet;

/// The hosts a hop's faults act on. (Made once per hop and cloned once per fault: the size of
/// the in-process variant does not matter.)
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum FaultHosts {
    /// The hop runs in this process: the hosts' runtimes know their QEMUs; there is no agent
    /// to kill.
    InProcess {
        /// The source host.
        source: HostRuntime,
        /// The destination host.
        destination: HostRuntime,
    },
    /// The hop runs through agent processes.
    Agents(Arc<AgentFleet>),
}

impl std::fmt::Debug for FaultHosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InProcess { .. } => f.write_str("InProcess"),
            Self::Agents(fleet) => f.debug_tuple("Agents").field(fleet).finish(),
        }
    }
}

impl FaultHosts {
    /// The destination host's name (its link is the one cut).
    fn destination_name(&self) -> String {
        match self {
            Self::InProcess { destination, .. } => destination.identity().name.clone(),
            Self::Agents(f) => f.name(FaultHost::Destination).to_string(),
        }
    }

    async fn qemu_pid(&self, host: FaultHost, vm: &str) -> Result<u32, String> {
        match self {
            Self::InProcess {
                source,
                destination,
            } => {
                let side = if host == FaultHost::Source {
                    source
                } else {
                    destination
                };
                side.pid(vm).map_err(|e| e.to_string())
            }
            Self::Agents(f) => f.qemu_pid(host, vm).await,
        }
    }
}

/// How long after a cut link is restored a pause still counts as the detection of that cut.
const LATE_DETECTION: Duration = Duration::from_secs(3);

/// What an injected fault did, with times in ms since the scenario's migration started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The fault, as `--fault` spells it.
    pub fault: String,
    /// When it fired (ms since the migration started), `None` if its trigger never came.
    pub fired_at_ms: Option<u64>,
    /// When a cut link was restored.
    pub restored_at_ms: Option<u64>,
    /// From the cut to tern seeing the migration paused (`postcopy-paused`), ms (±250 ms,
    /// the engine's poll interval); for a short cut this can be after the link came back
    /// (up to 3 s after). `None`: never detected.
    pub detected_after_ms: Option<u64>,
    /// From the link's restoration to post-copy running again, ms (±250 ms).
    pub resumed_after_restore_ms: Option<u64>,
    /// Error while injecting, if any.
    pub error: Option<String>,
    /// For an agent kill: the states the migration was seen in (through the agent that stayed
    /// up) while the killed agent was away, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states_while_away: Vec<MigrationState>,
    /// For an agent kill: host `CLOCK_MONOTONIC` (ns) from the kill to the restarted agent
    /// answering. The agent records its guests' serial consoles, and console lines printed
    /// while no agent reads them are lost (`tern_qemu::SerialRecorder`): the heartbeat gap
    /// they leave is not the guest's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_unrecorded_ns: Option<(u64, u64)>,
}

impl FaultRecord {
    /// A fault that has not fired (yet).
    pub fn new(plan: &FaultPlan) -> Self {
        Self {
            fault: plan.to_string(),
            fired_at_ms: None,
            restored_at_ms: None,
            detected_after_ms: None,
            resumed_after_restore_ms: None,
            error: None,
            states_while_away: Vec::new(),
            console_unrecorded_ns: None,
        }
    }
}

/// Cuts currently holding each `(lab, host)` link down. Overlapping cuts (a cut during the
/// recovery from another) compose as their union: the link is cut by the first and restored
/// by the last, not by whichever ends first.
static ACTIVE_CUTS: std::sync::Mutex<BTreeMap<(String, String), u32>> =
    std::sync::Mutex::new(BTreeMap::new());

fn cut_link_counted(lab: &Lab, host: &str) -> Result<(), tern_lab::LabError> {
    let mut cuts = ACTIVE_CUTS.lock().unwrap_or_else(|p| p.into_inner());
    let n = cuts
        .entry((lab.name().to_string(), host.to_string()))
        .or_insert(0);
    if *n == 0 {
        lab.cut_link(host, FaultMode::Blackhole)?;
    }
    *n += 1;
    Ok(())
}

fn restore_link_counted(lab: &Lab, host: &str) -> Result<(), tern_lab::LabError> {
    let mut cuts = ACTIVE_CUTS.lock().unwrap_or_else(|p| p.into_inner());
    let key = (lab.name().to_string(), host.to_string());
    let n = cuts.get(&key).copied().unwrap_or(0);
    if n <= 1 {
        cuts.remove(&key);
        lab.restore_link(host)
    } else {
        cuts.insert(key, n - 1);
        Ok(())
    }
}

fn in_phase(p: &MigrationProgress, t: &FaultTrigger) -> bool {
    match t {
        FaultTrigger::Precopy { .. } => p.state == Some(MigrationState::Precopy),
        FaultTrigger::Postcopy { .. } => p.state == Some(MigrationState::Postcopy),
        FaultTrigger::Recovering { .. } => p.state == Some(MigrationState::Recovering),
    }
}

/// Injectors for every plan, started now on the migration's progress; [`collect`] awaits
/// their records.
pub fn spawn_injectors(
    plans: Vec<FaultPlan>,
    lab: &Lab,
    hosts: &FaultHosts,
    vm: &str,
    progress: &watch::Receiver<MigrationProgress>,
    started: Instant,
) -> Vec<tokio::task::JoinHandle<FaultRecord>> {
    plans
        .into_iter()
        .map(|plan| {
            tokio::spawn(inject(
                plan,
                lab.clone(),
                hosts.clone(),
                vm.to_string(),
                progress.clone(),
                started,
            ))
        })
        .collect()
}

/// The records of [`spawn_injectors`]' injectors, once each has finished (a cut link is
/// always restored first).
pub async fn collect(injectors: Vec<tokio::task::JoinHandle<FaultRecord>>) -> Vec<FaultRecord> {
    let mut records = Vec::new();
    for i in injectors {
        if let Ok(r) = i.await {
            records.push(r);
        }
    }
    records
}

/// Runs one fault plan to completion (or until the migration ends without its trigger).
async fn inject(
    plan: FaultPlan,
    lab: Lab,
    hosts: FaultHosts,
    vm: String,
    mut progress: watch::Receiver<MigrationProgress>,
    started: Instant,
) -> FaultRecord {
    let ms = |at: Instant| at.duration_since(started).as_millis() as u64;
    let mut rec = FaultRecord::new(&plan);
    // Wait for the phase.
    loop {
        {
            let p = progress.borrow();
            if in_phase(&p, &plan.trigger) {
                break;
            }
            if p.state.is_some_and(|s| s.is_terminal()) {
                return rec;
            }
        }
        if progress.changed().await.is_err() {
            return rec;
        }
    }
    tokio::time::sleep(plan.trigger.after()).await;
    if progress.borrow().state.is_some_and(|s| s.is_terminal()) {
        return rec;
    }
    let host = hosts.destination_name();
    match plan.action {
        FaultAction::LinkCut { duration } => {
            let l = lab.clone();
            let h = host.clone();
            let cut = tokio::task::spawn_blocking(move || cut_link_counted(&l, &h)).await;
            rec.fired_at_ms = Some(ms(Instant::now()));
            if let Ok(Err(e)) = cut {
                rec.error = Some(e.to_string());
                return rec;
            }
            let cut_at = Instant::now();
            let restore_at = cut_at + duration;
            let paused = |p: &MigrationProgress| {
                matches!(
                    p.state,
                    Some(MigrationState::PostcopyPaused | MigrationState::Recovering)
                )
            };
            while Instant::now() < restore_at {
                if rec.detected_after_ms.is_none() && paused(&progress.borrow()) {
                    rec.detected_after_ms = Some(cut_at.elapsed().as_millis() as u64);
                }
                let left = restore_at.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, progress.changed())
                    .await
                    .is_ok_and(|r| r.is_err())
                {
                    tokio::time::sleep(restore_at.saturating_duration_since(Instant::now())).await;
                }
            }
            let l = lab.clone();
            let r = tokio::task::spawn_blocking(move || restore_link_counted(&l, &host)).await;
            let restored = Instant::now();
            rec.restored_at_ms = Some(ms(restored));
            if let Ok(Err(e)) = r {
                rec.error = Some(e.to_string());
            }
            if rec.detected_after_ms.is_none() && !paused(&progress.borrow()) {
                // A cut shorter than detection (2 s without bytes) can still be detected just
                // after the link is back, before TCP's own retransmission gets bytes flowing:
                // the engine then pauses and recovers anyway. Count it.
                let late = tokio::time::timeout(LATE_DETECTION, async {
                    loop {
                        if paused(&progress.borrow()) {
                            return true;
                        }
                        if progress.changed().await.is_err() {
                            return false;
                        }
                    }
                })
                .await;
                if late == Ok(true) {
                    rec.detected_after_ms = Some(cut_at.elapsed().as_millis() as u64);
                }
            }
            if rec.detected_after_ms.is_some() || paused(&progress.borrow()) {
                // Wait for post-copy to run again (or the migration to end).
                loop {
                    let state = progress.borrow().state;
                    if matches!(
                        state,
                        Some(MigrationState::Postcopy | MigrationState::Completed)
                    ) {
                        rec.resumed_after_restore_ms = Some(restored.elapsed().as_millis() as u64);
                        break;
                    }
                    if state.is_some_and(|s| s.is_terminal()) || progress.changed().await.is_err() {
                        break;
                    }
                }
            }
        }
        FaultAction::KillAgent { host, away } => match &hosts {
            FaultHosts::Agents(fleet) => {
                kill_agent(fleet, host, away, &mut rec, &mut progress, started).await;
            }
            FaultHosts::InProcess { .. } => {
                rec.error = Some(format!(
                    "{plan} needs agent processes; this hop runs in-process"
                ));
            }
        },
        FaultAction::KillDestinationQemu | FaultAction::KillSourceQemu => {
            let side = if plan.action == FaultAction::KillDestinationQemu {
                FaultHost::Destination
            } else {
                FaultHost::Source
            };
            match hosts.qemu_pid(side, &vm).await {
                Ok(pid) => {
                    rec.fired_at_ms = Some(ms(Instant::now()));
                    if let Err(e) = tern_lab::kill_process(pid, Signal::SIGKILL) {
                        rec.error = Some(e.to_string());
                    }
                }
                Err(e) => rec.error = Some(e),
            }
        }
    }
    rec
}

/// Kills a side's agent (SIGKILL; its QEMU keeps running), keeps it away for `away` while
/// noting the states the migration is seen in, starts it again and waits until it answers.
async fn kill_agent(
    fleet: &AgentFleet,
    host: FaultHost,
    away: Duration,
    rec: &mut FaultRecord,
    progress: &mut watch::Receiver<MigrationProgress>,
    started: Instant,
) {
    let ms = |at: Instant| at.duration_since(started).as_millis() as u64;
    let killed_at = Instant::now();
    let killed_ns = tern_qemu::host_monotonic_ns();
    rec.fired_at_ms = Some(ms(killed_at));
    if let Err(e) = fleet.kill(host).await {
        rec.error = Some(e);
        return;
    }
    let back_at = killed_at + away;
    loop {
        if let Some(s) = progress.borrow_and_update().state
            && rec.states_while_away.last() != Some(&s)
        {
            rec.states_while_away.push(s);
        }
        let left = back_at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if tokio::time::timeout(left, progress.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            // The hop's progress ended (the migration finished while the agent was away).
            tokio::time::sleep(back_at.saturating_duration_since(Instant::now())).await;
        }
    }
    if let Err(e) = fleet.ensure().await {
        rec.error = Some(format!("restarting the {} agent: {e}", fleet.name(host)));
        return;
    }
    let restarted = Instant::now();
    rec.restored_at_ms = Some(ms(restarted));
    match fleet.wait_answering(host).await {
        Ok(()) => rec.resumed_after_restore_ms = Some(restarted.elapsed().as_millis() as u64),
        Err(e) => rec.error = Some(e),
    }
    rec.console_unrecorded_ns = Some((killed_ns, tern_qemu::host_monotonic_ns()));
}
