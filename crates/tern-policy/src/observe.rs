//! What the core is told (observations) and what it answers (decisions).
//!
//! Time enters only here: every observation carries `at_ms`, milliseconds since the migration
//! started, taken by the caller. The core never reads a clock.

use serde::{Deserialize, Serialize};

/// Migration phase as reported by QEMU's `query-migrate` `status`, reduced to what policies need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// `setup`.
    Setup,
    /// `active`: pre-copy passes.
    Precopy,
    /// Pre-copy with the guest's vCPUs stopped by [`crate::Action::PauseGuest`].
    PausedPrecopy,
    /// `postcopy-active`: guest runs on the destination and faults missing pages.
    Postcopy,
    /// `postcopy-paused`: link failed in post-copy; needs recovery.
    PostcopyPaused,
    /// `device`/`completed` and later.
    Completed,
    /// `failed` or `cancelled`.
    Failed,
}

/// One `query-migrate` reading. At a pass boundary (`dirty-sync-count` just incremented),
/// `remaining_bytes` is the size of the freshly synced dirty set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IterationSample {
    /// Milliseconds since the migration started.
    pub at_ms: u64,
    /// QEMU `ram.dirty-sync-count`: 1 during the first pass, 2 after it, …
    pub pass: u64,
    /// `ram.transferred`, bytes sent so far.
    pub transferred_bytes: u64,
    /// `ram.remaining`, bytes still to send.
    pub remaining_bytes: u64,
    /// `ram.total`, guest RAM bytes.
    pub total_bytes: u64,
    /// `ram.dirty-pages-rate`: distinct pages found dirty per second over the last sync period.
    pub dirty_pages_rate: u64,
    /// `ram.page-size`.
    pub page_size: u64,
    /// Current throughput (`ram.mbps × 1e6 / 8`), bytes/s. 0 during a link outage.
    pub throughput_bytes_per_s: u64,
    /// QEMU's `expected-downtime`, if reported.
    pub expected_downtime_ms: Option<u64>,
    /// `cpu-throttle-percentage`, if throttling.
    pub throttle_pct: Option<u8>,
    /// Migration phase.
    pub phase: Phase,
}

impl IterationSample {
    /// Dirty rate in bytes per second.
    pub fn dirty_bytes_per_s(&self) -> f64 {
        self.dirty_pages_rate as f64 * self.page_size.max(1) as f64
    }
}

/// What the caller tells a policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Observation {
    /// A pre-copy pass finished: QEMU synced the dirty bitmap (`dirty-sync-count` grew; libvirt's
    /// `DomainEventMigrationIteration`). The sample is taken right after the sync.
    PassCompleted(IterationSample),
    /// A periodic poll between pass boundaries (Nova polls every 0.5 s, KubeVirt 0.4 s, Proxmox
    /// 1 s, vdsm 10 s). Time-based rules (deadlines, timeouts, outages) run here.
    Tick {
        /// Milliseconds since start.
        at_ms: u64,
        /// The latest `query-migrate` reading, if any.
        latest: Option<IterationSample>,
    },
}

impl Observation {
    /// Milliseconds since start.
    pub fn at_ms(&self) -> u64 {
        match self {
            Observation::PassCompleted(s) => s.at_ms,
            Observation::Tick { at_ms, .. } => *at_ms,
        }
    }

    /// The sample carried, if any.
    pub fn sample(&self) -> Option<&IterationSample> {
        match self {
            Observation::PassCompleted(s) => Some(s),
            Observation::Tick { latest, .. } => latest.as_ref(),
        }
    }
}

/// What a policy asks the engine to do. Each maps to one QMP step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Nothing to change.
    Continue,
    /// `migrate-set-parameters downtime-limit` (ms, clamped to QEMU's 1..=2 000 000).
    SetDowntimeLimit {
        /// New limit.
        ms: u64,
    },
    /// `migrate-set-parameters max-bandwidth`.
    SetBandwidth {
        /// Bytes per second.
        bytes_per_s: u64,
    },
    /// `migrate-set-parameters cpu-throttle-initial/-increment/max-cpu-throttle`. Only effective
    /// when the plan enabled the `auto-converge` capability (capabilities cannot change during a
    /// migration); raising `max_pct` lets QEMU throttle further when it next triggers.
    SetCpuThrottle {
        /// `cpu-throttle-initial`.
        initial_pct: u8,
        /// `cpu-throttle-increment`.
        increment_pct: u8,
        /// `max-cpu-throttle`.
        max_pct: u8,
    },
    /// `migrate-set-parameters vcpu-dirty-limit` (MB/s per vCPU; needs the `dirty-limit` capability).
    SetDirtyLimit {
        /// MB/s per vCPU.
        mb_per_s: u64,
    },
    /// `migrate-start-postcopy`: the guest moves to the destination now and faults the remaining
    /// pages over the network. Only when the plan's post-copy verdict allowed it.
    SwitchToPostcopy,
    /// Stop the guest's vCPUs (`stop`) so pre-copy finishes: the dirty rate drops to zero and the
    /// next pass completes; downtime is the time the rest takes to send. This is Nova's
    /// force-complete without post-copy (`migration.py::run_tasks`, `guest.pause()`) and
    /// KubeVirt's legacy `dom.Suspend()`. The engine resumes the guest on the destination.
    PauseGuest,
    /// `migrate_cancel`: the guest stays on the source. Refused by QEMU/libvirt in post-copy.
    Abort,
}

/// The kind of an [`Action`] without its values: what the engine records as a taken action
/// (`"pause-guest"`, `"set-downtime-limit 300 ms"` starts with `set-downtime-limit`). Serde
/// names are the [`Action`] tags, so JSON that carries them does not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// [`Action::Continue`].
    Continue,
    /// [`Action::SetDowntimeLimit`].
    SetDowntimeLimit,
    /// [`Action::SetBandwidth`].
    SetBandwidth,
    /// [`Action::SetCpuThrottle`].
    SetCpuThrottle,
    /// [`Action::SetDirtyLimit`].
    SetDirtyLimit,
    /// [`Action::SwitchToPostcopy`].
    SwitchToPostcopy,
    /// [`Action::PauseGuest`].
    PauseGuest,
    /// [`Action::Abort`].
    Abort,
}

impl ActionKind {
    /// Every kind.
    pub const ALL: [ActionKind; 8] = [
        Self::Continue,
        Self::SetDowntimeLimit,
        Self::SetBandwidth,
        Self::SetCpuThrottle,
        Self::SetDirtyLimit,
        Self::SwitchToPostcopy,
        Self::PauseGuest,
        Self::Abort,
    ];

    /// Its name (`"pause-guest"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Continue => "continue",
            Self::SetDowntimeLimit => "set-downtime-limit",
            Self::SetBandwidth => "set-bandwidth",
            Self::SetCpuThrottle => "set-cpu-throttle",
            Self::SetDirtyLimit => "set-dirty-limit",
            Self::SwitchToPostcopy => "switch-to-postcopy",
            Self::PauseGuest => "pause-guest",
            Self::Abort => "abort",
        }
    }

    /// The kind of a recorded action text (`"set-bandwidth 1000 B/s"` → `SetBandwidth`): its
    /// first word. `None` for text that names no action.
    pub fn of_text(text: &str) -> Option<Self> {
        let word = text.split_whitespace().next()?;
        Self::ALL.into_iter().find(|k| k.as_str() == word)
    }
}

impl std::fmt::Display for ActionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Action {
    /// Its kind, without values.
    pub fn kind(&self) -> ActionKind {
        match self {
            Action::Continue => ActionKind::Continue,
            Action::SetDowntimeLimit { .. } => ActionKind::SetDowntimeLimit,
            Action::SetBandwidth { .. } => ActionKind::SetBandwidth,
            Action::SetCpuThrottle { .. } => ActionKind::SetCpuThrottle,
            Action::SetDirtyLimit { .. } => ActionKind::SetDirtyLimit,
            Action::SwitchToPostcopy => ActionKind::SwitchToPostcopy,
            Action::PauseGuest => ActionKind::PauseGuest,
            Action::Abort => ActionKind::Abort,
        }
    }

    /// Whether the action ends pre-copy (the migration cannot continue as before).
    pub fn is_terminal_choice(&self) -> bool {
        matches!(
            self,
            Action::SwitchToPostcopy | Action::PauseGuest | Action::Abort
        )
    }
}

/// An action and why. `reason` cites the numbers used, so a log reader can check the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// Why, with numbers.
    pub reason: String,
}

impl Decision {
    /// A decision.
    pub fn new(action: Action, reason: impl Into<String>) -> Self {
        Decision {
            action,
            reason: reason.into(),
        }
    }
    /// `Continue` with a reason.
    pub fn cont(reason: impl Into<String>) -> Self {
        Decision::new(Action::Continue, reason)
    }
}

/// Formats bytes as MiB with one decimal, for reasons.
pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// Formats a rate as Mbit/s, for reasons.
pub fn mbit(bytes_per_s: f64) -> String {
    format!("{:.0} Mbit/s", bytes_per_s * 8.0 / 1e6)
}

/// Formats milliseconds as seconds with one decimal, for reasons.
pub fn secs(ms: f64) -> String {
    format!("{:.1} s", ms / 1000.0)
}

#[cfg(test)]
mod action_kind_tests {
    use super::*;

    /// The kind's name is the action's serde tag, and recorded texts parse back to it.
    #[test]
    fn kinds_match_the_action_tags() {
        let actions = [
            Action::Continue,
            Action::SetDowntimeLimit { ms: 300 },
            Action::SetBandwidth { bytes_per_s: 1000 },
            Action::SetCpuThrottle {
                initial_pct: 20,
                increment_pct: 10,
                max_pct: 99,
            },
            Action::SetDirtyLimit { mb_per_s: 1 },
            Action::SwitchToPostcopy,
            Action::PauseGuest,
            Action::Abort,
        ];
        for a in actions {
            let tag = serde_json::to_value(a).unwrap()["action"].clone();
            assert_eq!(tag, serde_json::to_value(a.kind()).unwrap());
            assert_eq!(
                ActionKind::of_text(&format!("{} 300 ms", a.kind())),
                Some(a.kind())
            );
        }
        assert_eq!(
            ActionKind::of_text("pause-guest"),
            Some(ActionKind::PauseGuest)
        );
        assert_eq!(ActionKind::of_text("reboot"), None);
        assert_eq!(ActionKind::of_text(""), None);
    }
}
