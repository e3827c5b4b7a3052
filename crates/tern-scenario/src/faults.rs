//! Faults injected into a running scenario at a chosen migration phase, as one small language:
//! link cuts (several may overlap), QEMU processes and agent processes killed by PID.
//!
//! This module is the language (`--fault` forms, parsed once into [`FaultPlan`]s);
//! [`inject`] carries them out against either hop backend (in-process or agent processes).
//! The injector watches the migration's live progress, waits for its trigger (pre-copy for N
//! seconds, or post-copy started N seconds ago), acts, and records host-monotonic times so
//! the report can say how long detection and recovery took.

mod inject;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use inject::{FaultHosts, FaultRecord, collect, spawn_injectors};

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
    /// Kill a host's agent process (SIGKILL; its QEMU is untouched), keep it away for
    /// `away`, and start it again with its configuration: QEMU keeps migrating without it,
    /// and the restarted agent must re-attach to its QEMU and reconcile the migration. Needs
    /// real agent processes ([`FaultPlan::needs_agents`]): the hop runs through
    /// [`crate::HopBackend::AgentProcesses`], and an in-process hop refuses it.
    KillAgent {
        /// Whose agent.
        host: FaultHost,
        /// How long it stays dead before it is started again (zero: at once).
        away: Duration,
    },
}

/// One of the hop's two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultHost {
    /// The host the guest leaves.
    Source,
    /// The host the guest goes to.
    Destination,
}

impl FaultHost {
    /// How `--fault` names it (`source`, `dest`).
    fn word(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "dest",
        }
    }
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
            FaultAction::KillAgent { host, away } => {
                write!(f, "kill-{}-agent-{phase}", host.word())?;
                if !away.is_zero() {
                    write!(f, ":{}s", away.as_secs_f64())?;
                }
                Ok(())
            }
        }
    }
}

/// Valid `--fault` forms, for error messages.
pub const FAULT_FORMS: &str = "link-cut-precopy:SECS, link-cut-postcopy:SECS, \
link-cut-recovery:SECS, kill-dest-qemu-precopy, kill-dest-qemu-postcopy, kill-source-qemu-postcopy, \
kill-source-agent-precopy[:SECS], kill-source-agent-postcopy[:SECS], \
kill-dest-agent-precopy[:SECS], kill-dest-agent-postcopy[:SECS] (an agent's SECS: how long it \
stays dead; default 0, restarted at once), each optionally followed by @SECS (when in the phase \
it fires; default 1 s, at once in recovery); several faults separated by commas";

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

/// What a fault name leaves to its `:SECS` part.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// A link cut: `:SECS` is its duration, and required.
    LinkCut,
    /// A fixed action: no `:SECS`.
    Fixed(FaultAction),
    /// An agent kill: `:SECS` is how long the agent stays dead, optional.
    AgentKill(FaultHost),
}

/// What a fault name means: its shape and phase.
fn named(name: &str) -> Option<(Shape, FaultTrigger)> {
    let one = Duration::from_secs(1);
    let pre = FaultTrigger::Precopy { after: one };
    let post = FaultTrigger::Postcopy { after: one };
    Some(match name {
        "link-cut-precopy" => (Shape::LinkCut, pre),
        "link-cut-postcopy" => (Shape::LinkCut, post),
        "link-cut-recovery" => (
            Shape::LinkCut,
            FaultTrigger::Recovering {
                after: Duration::ZERO,
            },
        ),
        "kill-dest-qemu-precopy" => (Shape::Fixed(FaultAction::KillDestinationQemu), pre),
        "kill-dest-qemu-postcopy" => (Shape::Fixed(FaultAction::KillDestinationQemu), post),
        "kill-source-qemu-postcopy" => (Shape::Fixed(FaultAction::KillSourceQemu), post),
        "kill-source-agent-precopy" => (Shape::AgentKill(FaultHost::Source), pre),
        "kill-source-agent-postcopy" => (Shape::AgentKill(FaultHost::Source), post),
        "kill-dest-agent-precopy" => (Shape::AgentKill(FaultHost::Destination), pre),
        "kill-dest-agent-postcopy" => (Shape::AgentKill(FaultHost::Destination), post),
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
            (Shape::LinkCut, Some(a)) => FaultAction::LinkCut {
                duration: seconds(a, "link cut duration", true).map_err(fail)?,
            },
            (Shape::LinkCut, None) => {
                return Err(fail(format!(
                    "{name} needs the cut's duration: {name}:SECS"
                )));
            }
            (Shape::Fixed(_), Some(a)) => {
                return Err(fail(format!(
                    "{name} takes no duration (\":{a}\"); use @SECS for when it fires"
                )));
            }
            (Shape::Fixed(action), None) => action,
            (Shape::AgentKill(host), away) => FaultAction::KillAgent {
                host,
                away: match away {
                    Some(a) => seconds(a, "time the agent stays dead", false).map_err(fail)?,
                    None => Duration::ZERO,
                },
            },
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
        matches!(self.action, FaultAction::KillAgent { .. })
    }
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

    /// Agent kills name their host and phase, take an optional time away (`:SECS`) and
    /// `@SECS`, and are the only faults that need agent processes.
    #[test]
    fn agent_kills_name_host_phase_and_time_away() {
        let p: FaultPlan = "kill-dest-agent-precopy:8@2".parse().unwrap();
        assert_eq!(
            p.action,
            FaultAction::KillAgent {
                host: FaultHost::Destination,
                away: Duration::from_secs(8)
            }
        );
        assert_eq!(
            p.trigger,
            FaultTrigger::Precopy {
                after: Duration::from_secs(2)
            }
        );
        assert_eq!(p.to_string(), "kill-dest-agent-precopy:8s@2");
        assert!(p.needs_agents());
        let s: FaultPlan = "kill-source-agent-postcopy".parse().unwrap();
        assert_eq!(
            s.action,
            FaultAction::KillAgent {
                host: FaultHost::Source,
                away: Duration::ZERO
            }
        );
        assert_eq!(s.to_string(), "kill-source-agent-postcopy");
        for f in [
            "kill-source-agent-precopy",
            "kill-source-agent-postcopy:3",
            "kill-dest-agent-precopy@0.5",
            "kill-dest-agent-postcopy:0@4",
        ] {
            let p: FaultPlan = f.parse().unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(p.to_string().parse::<FaultPlan>().unwrap(), p, "{f}");
            assert!(p.needs_agents(), "{f}");
        }
        for f in ["link-cut-postcopy:3", "kill-dest-qemu-postcopy"] {
            assert!(!f.parse::<FaultPlan>().unwrap().needs_agents(), "{f}");
        }
        let e = "kill-dest-agent-postcopy:-2"
            .parse::<FaultPlan>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("out of range") && e.contains("kill-dest-agent-postcopy[:SECS]"),
            "{e}"
        );
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
