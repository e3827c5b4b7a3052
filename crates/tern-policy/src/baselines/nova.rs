//! OpenStack Nova's libvirt driver, current (`nova`) and Newton–Rocky (`nova-2016`).

use crate::MigrationPolicy;
use crate::limits::UNLIMITED_BANDWIDTH;
use crate::observe::{Action, Decision, Observation, Phase, mib};
use crate::plan::{Capabilities, MigrationPlan, PlanInput, post_copy_permission};

use super::{finish_decisions, gib};

/// What Nova does when the completion timeout expires (`[libvirt]live_migration_timeout_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NovaTimeoutAction {
    /// `abort` (the default): `guest.abort_job()`.
    Abort,
    /// `force_complete`: post-copy if permitted, else pause (`live_migration_force_complete`).
    ForceComplete,
}

/// Nova's `[libvirt]` options that drive the monitor, with their defaults
/// (`nova@00a0304:nova/conf/libvirt.py` L312–L470).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NovaConfig {
    /// `live_migration_downtime`, ms (default 500).
    pub downtime_ms: u64,
    /// `live_migration_downtime_steps` (default 10).
    pub downtime_steps: u64,
    /// `live_migration_downtime_delay`, s per GiB (default 75).
    pub downtime_delay_s_per_gib: f64,
    /// `live_migration_completion_timeout`, s per GiB (default 800; 0 = off).
    pub completion_timeout_s_per_gib: f64,
    /// `live_migration_timeout_action` (default abort).
    pub timeout_action: NovaTimeoutAction,
    /// `live_migration_permit_auto_converge` (default False; ignored when post-copy is permitted).
    pub permit_auto_converge: bool,
    /// `live_migration_progress_timeout`, s (0 = off; it was 150 in Newton, then defaulted to 0 in
    /// Ocata by commit `679d78ab2b` and removed).
    pub progress_timeout_s: u64,
}

impl Default for NovaConfig {
    fn default() -> Self {
        NovaConfig {
            downtime_ms: 500,
            downtime_steps: 10,
            downtime_delay_s_per_gib: 75.0,
            completion_timeout_s_per_gib: 800.0,
            timeout_action: NovaTimeoutAction::Abort,
            permit_auto_converge: false,
            progress_timeout_s: 0,
        }
    }
}

/// Current Nova (`nova@00a0304`):
/// * flags: `VIR_MIGRATE_POSTCOPY` when the host permits post-copy
///   (`driver.py::_handle_live_migration_post_copy` L1485); auto-converge only if permitted and
///   post-copy is not (`_handle_live_migration_auto_converge` L1490); libvirt's unlimited bandwidth.
/// * `data_gb = max(RAM GiB, 2)` (`_live_migration_data_gb` L11576).
/// * downtime steps `(int(delay·i), int(base + offset·i))` for i = 0..=steps with
///   `base = downtime/steps`, `offset = (downtime − base)/steps`, `delay = int(75·data_gb)`
///   (`migration.py::downtime_steps` L871), applied by `update_downtime` (L695): the last step
///   whose time has passed.
/// * completion timeout `int(800·data_gb)` s (`should_trigger_timeout_action` L663), never in
///   post-copy; action abort by default, or force-complete: post-copy if enabled else pause
///   (`run_tasks` L792).
#[derive(Debug, Clone)]
pub struct NovaPolicy {
    config: NovaConfig,
    name: &'static str,
    state: NovaState,
}

#[derive(Debug, Clone, Default)]
struct NovaState {
    current_downtime: Option<u64>,
    switched: bool,
    paused: bool,
    done: bool,
    prev_remaining: Option<u64>,
    watermark: Option<u64>,
    progress_ms: u64,
}

impl NovaPolicy {
    /// Nova with `config`; named `nova`, or `nova-force-complete` when the timeout action is
    /// `force_complete`.
    pub fn new(config: NovaConfig) -> Self {
        NovaPolicy {
            config,
            name: match config.timeout_action {
                NovaTimeoutAction::Abort => "nova",
                NovaTimeoutAction::ForceComplete => "nova-force-complete",
            },
            state: NovaState::default(),
        }
    }

    /// `[libvirt]live_migration_timeout_action = force_complete`, everything else default: what
    /// operators draining hosts set (bigstack-oss/cubecos #1031; Nova's release note
    /// `live-migration-force-after-timeout-54f2a4b631d295bb.yaml`). At the completion timeout
    /// `driver.py::_live_migration_monitor` (L11618) calls `live_migration_force_complete`
    /// (L11875), which queues a task that `migration.py::run_tasks` (L792) runs at the next
    /// 0.5 s poll (modelled at the same poll): post-copy when the post-copy flag is set, else
    /// pause the guest.
    pub fn force_complete() -> Self {
        Self::new(NovaConfig {
            timeout_action: NovaTimeoutAction::ForceComplete,
            ..NovaConfig::default()
        })
    }

    fn data_gb(input: &PlanInput) -> f64 {
        gib(input.vm.ram_bytes).max(2.0)
    }

    /// `downtime_steps`: (seconds after start, downtime ms).
    pub fn downtime_steps(&self, ram_bytes: u64) -> Vec<(u64, u64)> {
        let data_gb = gib(ram_bytes).max(2.0);
        let c = &self.config;
        let steps = c.downtime_steps.max(3);
        let downtime = c.downtime_ms.max(100) as f64;
        let delay = (c.downtime_delay_s_per_gib.max(3.0) * data_gb) as u64;
        let base = downtime / steps as f64;
        let offset = (downtime - base) / steps as f64;
        (0..=steps)
            .map(|i| (delay * i, (base + offset * i as f64) as u64))
            .collect()
    }

    fn timeout_s(&self, input: &PlanInput) -> u64 {
        (self.config.completion_timeout_s_per_gib * Self::data_gb(input)) as u64
    }

    fn decide_common(
        &mut self,
        plan: &MigrationPlan,
        obs: &Observation,
        out: &mut Vec<Decision>,
    ) -> bool {
        let at = obs.at_ms();
        let elapsed_s = at as f64 / 1000.0;
        if obs.sample().is_some_and(|s| s.phase == Phase::Postcopy) {
            self.state.switched = true;
        }
        if self.state.done || self.state.switched {
            return true;
        }
        let timeout = self.timeout_s(&plan.input);
        if timeout > 0 && elapsed_s > timeout as f64 && !self.state.paused {
            let why = format!(
                "completion timeout: {elapsed_s:.0} s > {timeout} s (= {} s/GiB × max(RAM {:.2} GiB, 2))",
                self.config.completion_timeout_s_per_gib,
                gib(plan.input.vm.ram_bytes)
            );
            match self.config.timeout_action {
                NovaTimeoutAction::Abort => {
                    self.state.done = true;
                    out.push(Decision::new(
                        Action::Abort,
                        format!("{why}; timeout_action=abort"),
                    ));
                }
                NovaTimeoutAction::ForceComplete => {
                    if plan.capabilities.postcopy_ram {
                        self.state.switched = true;
                        out.push(Decision::new(
                            Action::SwitchToPostcopy,
                            format!("{why}; force_complete with post-copy"),
                        ));
                    } else {
                        self.state.paused = true;
                        out.push(Decision::new(
                            Action::PauseGuest,
                            format!("{why}; force_complete without post-copy: pause"),
                        ));
                    }
                }
            }
            return true;
        }
        if let Some(s) = obs.sample().filter(|_| self.config.progress_timeout_s > 0) {
            if self.state.watermark.is_none_or(|w| s.remaining_bytes < w) {
                self.state.watermark = Some(s.remaining_bytes);
                self.state.progress_ms = at;
            } else if at.saturating_sub(self.state.progress_ms)
                > self.config.progress_timeout_s * 1000
            {
                self.state.done = true;
                out.push(Decision::new(
                    Action::Abort,
                    format!(
                        "progress timeout: remaining has not fallen below {} for {} s > {} s",
                        mib(self.state.watermark.unwrap_or(0) as f64),
                        at.saturating_sub(self.state.progress_ms) / 1000,
                        self.config.progress_timeout_s
                    ),
                ));
                return true;
            }
        }
        // update_downtime: the last step whose time has passed.
        let steps = self.downtime_steps(plan.input.vm.ram_bytes);
        let due = steps
            .iter()
            .rev()
            .find(|(t, _)| elapsed_s > *t as f64)
            .copied();
        if let Some((t, ms)) = due.filter(|&(_, ms)| self.state.current_downtime != Some(ms)) {
            self.state.current_downtime = Some(ms);
            out.push(Decision::new(
                Action::SetDowntimeLimit { ms },
                format!(
                    "downtime step: {elapsed_s:.0} s > {t} s ⇒ {ms} ms (steps of {} s)",
                    steps[1].0
                ),
            ));
        }
        false
    }
}

impl MigrationPolicy for NovaPolicy {
    fn name(&self) -> &'static str {
        self.name
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let verdict = post_copy_permission(input);
        let mut plan = MigrationPlan::qemu_defaults(self.name, input, verdict.clone());
        let post = verdict.allowed;
        plan.capabilities = Capabilities {
            postcopy_ram: post,
            auto_converge: self.config.permit_auto_converge
                && !post
                && input.features.auto_converge,
            ..Capabilities::default()
        };
        let steps = self.downtime_steps(input.vm.ram_bytes);
        plan.parameters.downtime_limit_ms = steps[0].1;
        plan.parameters.max_bandwidth_bytes_per_s =
            input.host_bandwidth_cap().unwrap_or(UNLIMITED_BANDWIDTH);
        let timeout = self.timeout_s(input);
        plan.deadline_ms = None;
        plan.reasons = vec![
            format!("post-copy flag: {} ({})", post, verdict.reason),
            format!("downtime steps {:?} (s, ms)", steps),
            format!(
                "completion timeout {timeout} s, action {:?}",
                self.config.timeout_action
            ),
        ];
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        self.decide_common(plan, obs, &mut out);
        finish_decisions(obs, out, "nova: no timeout or downtime step due")
    }
}

/// Nova Newton–Rocky (2016–2018) with automatic post-copy (commit `1651850f6f`, function
/// `migration.py::should_switch_to_postcopy`, removed by `4c3698c0b6` in Stein 19.0.0): on every
/// monitor poll, after the first memory iteration (`memory_iteration > 1`), switch to post-copy
/// when `round((previous − current)·100 / previous) < 10`, where `previous` is the *previous
/// poll's* remaining (0.5 s earlier, hence the saw-tooth misfires of LP#1644248). Newton also had
/// `live_migration_progress_timeout` = 150 s (abort when remaining has not reached a new low).
/// Everything else as [`NovaPolicy`].
#[derive(Debug, Clone)]
pub struct Nova2016Policy {
    inner: NovaPolicy,
}

impl Nova2016Policy {
    /// Newton defaults.
    pub fn new() -> Self {
        let mut inner = NovaPolicy::new(NovaConfig {
            progress_timeout_s: 150,
            ..NovaConfig::default()
        });
        inner.name = "nova-2016";
        Nova2016Policy { inner }
    }
}

impl Default for Nova2016Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl MigrationPolicy for Nova2016Policy {
    fn name(&self) -> &'static str {
        "nova-2016"
    }

    fn plan(&self, input: &PlanInput) -> MigrationPlan {
        let mut plan = self.inner.plan(input);
        plan.reasons
            .push("auto post-copy: <10 % progress between polls after iteration 1".into());
        plan
    }

    fn decide(&mut self, plan: &MigrationPlan, obs: &Observation) -> Vec<Decision> {
        let mut out = vec![];
        let stop = self.inner.decide_common(plan, obs, &mut out);
        let sample = obs
            .sample()
            .filter(|_| !stop && plan.capabilities.postcopy_ram);
        if let Some(s) = sample {
            let cur = s.remaining_bytes;
            let prev = self
                .inner
                .state
                .prev_remaining
                .filter(|p| *p > 0 && s.pass > 1);
            if let Some(prev) = prev {
                let progress = ((prev as f64 - cur as f64) * 100.0 / prev as f64).round();
                if progress < 10.0 {
                    self.inner.state.switched = true;
                    out.push(Decision::new(
                        Action::SwitchToPostcopy,
                        format!(
                            "iteration {} > 1 and progress {progress:.0} % < 10 % ({} → {})",
                            s.pass,
                            mib(prev as f64),
                            mib(cur as f64)
                        ),
                    ));
                }
            }
            self.inner.state.prev_remaining = Some(cur);
        }
        finish_decisions(obs, out, "nova-2016: progress ≥ 10 % or first iteration")
    }
}
