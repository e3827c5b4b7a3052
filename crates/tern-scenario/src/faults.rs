//! Faults injected into a running scenario at a chosen migration phase: link cuts (and two
//! in a row), and QEMU processes killed by PID.
//!
//! The injector watches the engine's live progress, waits for its trigger (pre-copy for N
//! seconds, or post-copy started N seconds ago), acts, and records host-monotonic times so
//! the report can say how long detection and recovery took.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_agent::HostRuntime;
use tern_engine::{MigrationProgress, MigrationState};
use tern_lab::{FaultMode, Lab, Signal};
use tokio::sync::watch;

/// When a fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultTrigger {
    /// This long after pre-copy started.
    Precopy {
        /// Delay after the migration entered pre-copy.
        after: Duration,
    },
    /// This long after the switch to post-copy.
    Postcopy {
        /// Delay after the migration entered post-copy.
        after: Duration,
    },
    /// This long after the first recovery attempt started (a cut during recovery itself).
    Recovering {
        /// Delay after the migration entered recovery.
        after: Duration,
    },
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultAction {
    /// Silently drop all traffic of the destination host's link for a while.
    LinkCut {
        /// How long the link stays cut.
        duration: Duration,
    },
    /// Kill the destination QEMU (SIGKILL).
    KillDestinationQemu,
    /// Kill the source QEMU (SIGKILL).
    KillSourceQemu,
    /// Kill the source host's agent process (SIGKILL) and start it again: QEMU keeps
    /// migrating without it, and the restarted agent must re-attach to its QEMU and see the
    /// migration through. Needs real agent processes, so only `tern demo` (which then runs
    /// the migration through agents) and the agent tests can inject it; an in-process
    /// scenario refuses it ([`FaultPlan::needs_agents`]).
    KillSourceAgent,
}

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FaultPlan {
    /// When.
    pub trigger: FaultTrigger,
    /// What.
    pub action: FaultAction,
}

impl FaultTrigger {
    /// How long into its phase the fault fires.
    pub fn after(&self) -> Duration {
        match *self {
            FaultTrigger::Precopy { after }
            | FaultTrigger::Postcopy { after }
            | FaultTrigger::Recovering { after } => after,
        }
    }

    /// The delay a `--fault` form without `@SECS` gets: one second into pre-copy or
    /// post-copy, at once in recovery.
    fn default_after(&self) -> Duration {
        match self {
            FaultTrigger::Recovering { .. } => Duration::ZERO,
            _ => Duration::from_secs(1),
        }
    }

    fn with_after(self, after: Duration) -> Self {
        match self {
            FaultTrigger::Precopy { .. } => FaultTrigger::Precopy { after },
            FaultTrigger::Postcopy { .. } => FaultTrigger::Postcopy { after },
            FaultTrigger::Recovering { .. } => FaultTrigger::Recovering { after },
        }
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.trigger {
            FaultTrigger::Precopy { .. } => "precopy",
            FaultTrigger::Postcopy { .. } => "postcopy",
            FaultTrigger::Recovering { .. } => "recovery",
        };
        self.fmt_action(f, phase)?;
        if self.trigger.after() != self.trigger.default_after() {
            write!(f, "@{}", self.trigger.after().as_secs_f64())?;
        }
        Ok(())
    }
}

impl FaultPlan {
    fn fmt_action(&self, f: &mut fmt::Formatter<'_>, phase: &str) -> fmt::Result {
        match self.action {
            FaultAction::LinkCut { duration } => {
                write!(f, "link-cut-{phase}:{}s", duration.as_secs_f64())
            }
            FaultAction::KillDestinationQemu => write!(f, "kill-dest-qemu-{phase}"),
            FaultAction::KillSourceQemu => write!(f, "kill-source-qemu-{phase}"),
            FaultAction::KillSourceAgent => write!(f, "kill-source-agent-{phase}"),
        }
    }
}

/// Valid `--fault` forms, for error messages.
pub const FAULT_FORMS: &str = "link-cut-precopy:SECS, link-cut-postcopy:SECS, \
link-cut-recovery:SECS, kill-dest-qemu-precopy, kill-dest-qemu-postcopy, kill-source-qemu-postcopy, \
kill-source-agent-postcopy, each optionally followed by @SECS (when in the phase it fires; \
default 1 s, at once in recovery)";

/// A `--fault` value that is not one of [`FAULT_FORMS`].
#[derive(Debug, thiserror::Error)]
#[error("unknown fault {0:?}: valid forms are {FAULT_FORMS}")]
pub struct FaultParseError(String);

impl FromStr for FaultPlan {
    type Err = FaultParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FaultParseError(s.to_string());
        let (body, at) = match s.split_once('@') {
            Some((b, a)) => (b, Some(a.trim_end_matches('s'))),
            None => (s, None),
        };
        let (name, arg) = match body.split_once(':') {
            Some((n, a)) => (n, Some(a.trim_end_matches('s'))),
            None => (s, None),
        };
        let secs = |a: Option<&str>| -> Result<Duration, FaultParseError> {
            let v: f64 = a.ok_or_else(bad)?.parse().map_err(|_| bad())?;
            if !(v > 0.0 && v <= 3600.0) {
                return Err(bad());
            }
            Ok(Duration::from_secs_f64(v))
        };
        // Faults fire one second into their phase unless the phase is recovery (at once).
        let one = Duration::from_secs(1);
        let plan = match name {
            "link-cut-precopy" => FaultPlan {
                trigger: FaultTrigger::Precopy { after: one },
                action: FaultAction::LinkCut {
                    duration: secs(arg)?,
                },
            },
            "link-cut-postcopy" => FaultPlan {
                trigger: FaultTrigger::Postcopy { after: one },
                action: FaultAction::LinkCut {
                    duration: secs(arg)?,
                },
            },
            "link-cut-recovery" => FaultPlan {
                trigger: FaultTrigger::Recovering {
                    after: Duration::ZERO,
                },
                action: FaultAction::LinkCut {
                    duration: secs(arg)?,
                },
            },
            "kill-dest-qemu-precopy" => FaultPlan {
                trigger: FaultTrigger::Precopy { after: one },
                action: FaultAction::KillDestinationQemu,
            },
            "kill-dest-qemu-postcopy" => FaultPlan {
                trigger: FaultTrigger::Postcopy { after: one },
                action: FaultAction::KillDestinationQemu,
            },
            "kill-source-qemu-postcopy" => FaultPlan {
                trigger: FaultTrigger::Postcopy { after: one },
                action: FaultAction::KillSourceQemu,
            },
            "kill-source-agent-postcopy" => FaultPlan {
                trigger: FaultTrigger::Postcopy { after: one },
                action: FaultAction::KillSourceAgent,
            },
            _ => return Err(bad()),
        };
        if arg.is_some() && !matches!(plan.action, FaultAction::LinkCut { .. }) {
            return Err(bad());
        }
        let plan = match at {
            None => plan,
            Some(a) => {
                let v: f64 = a.parse().map_err(|_| bad())?;
                if !(0.0..=3600.0).contains(&v) {
                    return Err(bad());
                }
                FaultPlan {
                    trigger: plan.trigger.with_after(Duration::from_secs_f64(v)),
                    ..plan
                }
            }
        };
        Ok(plan)
    }
}

impl FaultPlan {
    /// Whether the fault needs the migration to run in agent processes (it kills one).
    pub fn needs_agents(&self) -> bool {
        self.action == FaultAction::KillSourceAgent
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
    source: &HostRuntime,
    destination: &HostRuntime,
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
                source.clone(),
                destination.clone(),
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
pub async fn inject(
    plan: FaultPlan,
    lab: Lab,
    source: HostRuntime,
    destination: HostRuntime,
    vm: String,
    mut progress: watch::Receiver<MigrationProgress>,
    started: Instant,
) -> FaultRecord {
    let ms = |at: Instant| at.duration_since(started).as_millis() as u64;
    let mut rec = FaultRecord {
        fault: plan.to_string(),
        fired_at_ms: None,
        restored_at_ms: None,
        detected_after_ms: None,
        resumed_after_restore_ms: None,
        error: None,
    };
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
    let host = destination.identity().name.clone();
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
        FaultAction::KillSourceAgent => {
            rec.error = Some(
                "kill-source-agent needs agent processes; this scenario runs in-process \
                 (`tern demo` runs it through agents)"
                    .into(),
            );
        }
        FaultAction::KillDestinationQemu | FaultAction::KillSourceQemu => {
            let side = if plan.action == FaultAction::KillDestinationQemu {
                &destination
            } else {
                &source
            };
            match side.pid(&vm) {
                Ok(pid) => {
                    rec.fired_at_ms = Some(ms(Instant::now()));
                    if let Err(e) = tern_lab::kill_process(pid, Signal::SIGKILL) {
                        rec.error = Some(e.to_string());
                    }
                }
                Err(e) => rec.error = Some(e.to_string()),
            }
        }
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form() {
        for f in [
            "link-cut-precopy:2",
            "link-cut-postcopy:10s",
            "link-cut-recovery:3",
            "kill-dest-qemu-precopy",
            "kill-dest-qemu-postcopy",
            "kill-source-qemu-postcopy",
            "kill-source-agent-postcopy",
        ] {
            let p: FaultPlan = f.parse().unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(
                p.to_string()
                    .starts_with(f.split(':').next().unwrap_or_default())
            );
        }
        let p: FaultPlan = "link-cut-postcopy:10s".parse().unwrap();
        assert_eq!(
            p.action,
            FaultAction::LinkCut {
                duration: Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn at_sets_when_in_the_phase_and_round_trips() {
        let p: FaultPlan = "link-cut-postcopy:5@8".parse().unwrap();
        assert_eq!(
            p.trigger,
            FaultTrigger::Postcopy {
                after: Duration::from_secs(8)
            }
        );
        assert_eq!(p.to_string(), "link-cut-postcopy:5s@8");
        assert_eq!(p.to_string().parse::<FaultPlan>().unwrap(), p);
        let d: FaultPlan = "kill-dest-qemu-precopy".parse().unwrap();
        assert_eq!(d.trigger.after(), Duration::from_secs(1));
        assert_eq!(d.to_string(), "kill-dest-qemu-precopy");
        let r: FaultPlan = "link-cut-recovery:3@0.5".parse().unwrap();
        assert_eq!(r.trigger.after(), Duration::from_millis(500));
    }

    #[test]
    fn bad_forms_list_the_valid_ones() {
        for f in [
            "link-cut-postcopy",
            "link-cut-postcopy:-1",
            "kill-dest-qemu-precopy:3",
            "link-cut-postcopy:5@soon",
            "link-cut-postcopy:5@-1",
            "nuke",
        ] {
            let e = f.parse::<FaultPlan>().unwrap_err().to_string();
            assert!(e.contains(f) && e.contains("link-cut-postcopy:SECS"), "{e}");
        }
    }
}
