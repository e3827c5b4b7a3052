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
default 1 s, at once in recovery); several faults separated by commas";

/// A `--fault` value that is not one of [`FAULT_FORMS`]: the value, what is wrong with it,
/// and the valid forms.
#[derive(Debug, thiserror::Error)]
#[error("invalid fault {given:?}: {reason}; valid forms are {FAULT_FORMS}")]
pub struct FaultParseError {
    given: String,
    reason: String,
}

/// The longest duration or delay a fault takes (one hour).
const MAX_FAULT_SECS: f64 = 3600.0;

/// What a fault name means: its action (a link cut's duration comes from `:SECS`) and phase.
fn named(name: &str) -> Option<(Option<FaultAction>, FaultTrigger)> {
    let one = Duration::from_secs(1);
    let cut = None;
    Some(match name {
        "link-cut-precopy" => (cut, FaultTrigger::Precopy { after: one }),
        "link-cut-postcopy" => (cut, FaultTrigger::Postcopy { after: one }),
        "link-cut-recovery" => (
            cut,
            FaultTrigger::Recovering {
                after: Duration::ZERO,
            },
        ),
        "kill-dest-qemu-precopy" => (
            Some(FaultAction::KillDestinationQemu),
            FaultTrigger::Precopy { after: one },
        ),
        "kill-dest-qemu-postcopy" => (
            Some(FaultAction::KillDestinationQemu),
            FaultTrigger::Postcopy { after: one },
        ),
        "kill-source-qemu-postcopy" => (
            Some(FaultAction::KillSourceQemu),
            FaultTrigger::Postcopy { after: one },
        ),
        "kill-source-agent-postcopy" => (
            Some(FaultAction::KillSourceAgent),
            FaultTrigger::Postcopy { after: one },
        ),
        _ => return None,
    })
}

/// Seconds (`10`, `10s`, `0.5`) within `range`, for the part of a fault called `what`.
fn seconds(text: &str, what: &str, positive: bool) -> Result<Duration, String> {
    let v: f64 = text
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{what} {text:?} is not a number of seconds"))?;
    let ok = if positive { v > 0.0 } else { v >= 0.0 };
    if !ok || v > MAX_FAULT_SECS || !v.is_finite() {
        let low = if positive { "more than 0" } else { "0" };
        return Err(format!(
            "{what} {text} s is out of range: give {low} to {MAX_FAULT_SECS} s"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

impl FromStr for FaultPlan {
    type Err = FaultParseError;
    /// `NAME[:SECS][@SECS]`: the fault, a link cut's duration, and when in its phase it fires.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| FaultParseError {
            given: s.to_string(),
            reason,
        };
        let (body, at) = match s.trim().split_once('@') {
            Some((b, a)) => (b, Some(a)),
            None => (s.trim(), None),
        };
        let (name, arg) = match body.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (body, None),
        };
        let (action, trigger) =
            named(name).ok_or_else(|| fail(format!("no fault is called {name:?}")))?;
        let action = match (action, arg) {
            (None, Some(a)) => FaultAction::LinkCut {
                duration: seconds(a, "link cut duration", true).map_err(fail)?,
            },
            (None, None) => {
                return Err(fail(format!(
                    "{name} needs the cut's duration: {name}:SECS"
                )));
            }
            (Some(_), Some(a)) => {
                return Err(fail(format!(
                    "{name} takes no duration (\":{a}\"); use @SECS for when it fires"
                )));
            }
            (Some(action), None) => action,
        };
        let trigger = match at {
            None => trigger,
            Some(a) => trigger.with_after(seconds(a, "delay", false).map_err(fail)?),
        };
        Ok(FaultPlan { trigger, action })
    }
}

/// Parses a comma-separated list of faults (`--fault a,b` is `--fault a --fault b`).
pub fn parse_fault_list(text: &str) -> Result<Vec<FaultPlan>, FaultParseError> {
    text.split(',')
        .filter(|f| !f.trim().is_empty())
        .map(str::parse)
        .collect()
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
    fn bad_forms_say_what_is_wrong_and_list_the_valid_ones() {
        for (f, why) in [
            ("link-cut-postcopy", "needs the cut's duration"),
            ("link-cut-postcopy:-1", "out of range"),
            ("link-cut-postcopy:0", "out of range"),
            ("link-cut-postcopy:7200", "out of range"),
            ("link-cut-postcopy:soon", "not a number"),
            ("kill-dest-qemu-precopy:3", "takes no duration"),
            ("link-cut-postcopy:5@soon", "not a number"),
            ("link-cut-postcopy:5@-1", "out of range"),
            ("kill-dest-qemu-precopy@", "not a number"),
            ("nuke", "no fault is called \"nuke\""),
            ("nuke@3", "no fault is called \"nuke\""),
            ("", "no fault is called"),
        ] {
            let e = f.parse::<FaultPlan>().unwrap_err().to_string();
            assert!(e.contains(&format!("{f:?}")), "{f}: {e}");
            assert!(e.contains(why), "{f}: {e}");
            assert!(e.contains("link-cut-postcopy:SECS"), "{f}: {e}");
        }
    }

    /// Every form takes @SECS, and prints back to what parses to the same plan.
    #[test]
    fn every_form_takes_at_secs_and_round_trips() {
        for f in [
            "link-cut-precopy:2@3",
            "link-cut-postcopy:10@2",
            "link-cut-recovery:3@1",
            "kill-dest-qemu-precopy@3",
            "kill-dest-qemu-postcopy@0.5",
            "kill-source-qemu-postcopy@2",
            "kill-source-agent-postcopy@4",
        ] {
            let p: FaultPlan = f.parse().unwrap_or_else(|e| panic!("{f}: {e}"));
            let at: f64 = f.rsplit('@').next().unwrap().parse().unwrap();
            assert_eq!(p.trigger.after(), Duration::from_secs_f64(at), "{f}");
            assert_eq!(p.to_string().parse::<FaultPlan>().unwrap(), p, "{f}");
        }
        let p: FaultPlan = "kill-dest-qemu-precopy@3".parse().unwrap();
        assert_eq!(p.action, FaultAction::KillDestinationQemu);
        assert_eq!(p.to_string(), "kill-dest-qemu-precopy@3");
        // @0 in pre-copy differs from the default (1 s) and is kept.
        let p: FaultPlan = "kill-dest-qemu-precopy@0".parse().unwrap();
        assert_eq!(p.trigger.after(), Duration::ZERO);
    }

    #[test]
    fn comma_lists_equal_repeated_faults() {
        let list = parse_fault_list("kill-source-agent-postcopy, link-cut-postcopy:10@2").unwrap();
        let each: Vec<FaultPlan> = ["kill-source-agent-postcopy", "link-cut-postcopy:10@2"]
            .iter()
            .map(|f| f.parse().unwrap())
            .collect();
        assert_eq!(list, each);
        assert!(parse_fault_list("").unwrap().is_empty());
        let e = parse_fault_list("link-cut-postcopy:10,bogus")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
