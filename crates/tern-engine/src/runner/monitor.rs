//! The monitoring loop: polls and events from the source, samples for the policy before the
//! switch, the post-copy supervisor after it, and the policy's decisions executed in order.

use tern_policy::{
    Action, ActionKind, Decision, IterationSample, Observation, Phase, PostcopySupervisor,
};
use tern_qmp::{MigrationInfo, MigrationParameters, MigrationStatus, QmpEventKind};
use tokio::sync::mpsc;

use super::{MigrationRunner, OperatorRequest};
use crate::state::{MigrationEventKind, MigrationState};

impl MigrationRunner {
    pub(super) async fn monitor(&mut self, control: &mut mpsc::Receiver<OperatorRequest>) {
        let mut events = self.source.subscribe_events();
        let mut ticker = tokio::time::interval(self.setup.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pass = 0u64;
        let mut control_open = true;
        while !self.state.is_terminal() {
            let mut pass_event = false;
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) => match ev.kind {
                        QmpEventKind::MigrationPass { .. } => pass_event = true,
                        QmpEventKind::Migration { .. } | QmpEventKind::Stop | QmpEventKind::Resume => {}
                        _ => continue,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        // QMP connection gone: the source QEMU exited. Poll once more below,
                        // which fails and ends the migration.
                    }
                },
                _ = ticker.tick() => {}
                req = control.recv(), if control_open => match req {
                    Some(req) => { self.operator(req).await; continue; }
                    None => { control_open = false; continue; }
                },
            }
            let info = match self.source.migration_info().await {
                Ok(i) => i,
                Err(e) => {
                    self.source_unreachable(&e.to_string()).await;
                    continue;
                }
            };
            let status = info.status_or_none();
            let sample = self.sample_from(&info);
            self.publish_progress(&info, &sample);
            self.last_info = Some(info.clone());
            if self.handle_status(&status, &info).await {
                // Ended: terminal, or `unknown` after the destination stayed silent.
                break;
            }
            if self.state.is_after_switch() {
                self.supervise(&status, &sample).await;
                continue;
            }
            // dirty-sync-count is 1 during the first pass and grows by one at each boundary; the
            // MIGRATION_PASS event only makes us look sooner.
            let _ = pass_event;
            let obs = if sample.pass > last_pass.max(1) {
                last_pass = sample.pass;
                self.record(MigrationEventKind::Pass {
                    pass: sample.pass,
                    remaining_bytes: sample.remaining_bytes,
                    transferred_bytes: sample.transferred_bytes,
                    dirty_bytes_per_s: sample.dirty_bytes_per_s() as u64,
                    throughput_bytes_per_s: sample.throughput_bytes_per_s,
                    expected_downtime_ms: sample.expected_downtime_ms,
                    throttle_pct: sample.throttle_pct,
                });
                Observation::PassCompleted(sample)
            } else {
                Observation::Tick {
                    at_ms: sample.at_ms,
                    latest: Some(sample),
                }
            };
            if matches!(self.state, MigrationState::Precopy) {
                self.retry_deferred_switch().await;
                if self.state != MigrationState::Precopy {
                    continue;
                }
                let Some(plan) = self.plan.clone() else {
                    continue;
                };
                let decisions = self.policy.decide(&plan, &obs);
                for d in decisions {
                    self.execute(d, matches!(obs, Observation::PassCompleted(_)))
                        .await;
                    if self.state != MigrationState::Precopy {
                        break;
                    }
                }
            }
        }
    }

    fn sample_from(&self, info: &MigrationInfo) -> IterationSample {
        let ram = info.ram.clone().unwrap_or_default();
        let phase = match info.status_or_none() {
            MigrationStatus::Active if self.paused_guest => Phase::PausedPrecopy,
            MigrationStatus::Active | MigrationStatus::Device => Phase::Precopy,
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => Phase::Postcopy,
            MigrationStatus::PostcopyPaused => Phase::PostcopyPaused,
            MigrationStatus::Completed => Phase::Completed,
            MigrationStatus::Failed | MigrationStatus::Cancelled => Phase::Failed,
            _ => Phase::Setup,
        };
        IterationSample {
            at_ms: self.elapsed_ms(),
            pass: ram.dirty_sync_count.unwrap_or(0),
            transferred_bytes: ram.transferred.unwrap_or(0),
            remaining_bytes: ram.remaining.unwrap_or(0),
            total_bytes: ram.total.unwrap_or(0),
            dirty_pages_rate: ram.dirty_pages_rate.unwrap_or(0),
            page_size: ram.page_size.unwrap_or(4096),
            throughput_bytes_per_s: (ram.mbps.unwrap_or(0.0) * 1e6 / 8.0) as u64,
            expected_downtime_ms: info.expected_downtime,
            throttle_pct: info.cpu_throttle_percentage.map(|p| p.min(100) as u8),
            phase,
        }
    }

    fn publish_progress(&self, info: &MigrationInfo, s: &IterationSample) {
        // The policy's model predicts the finish when it has one (ours does; baselines
        // don't); otherwise a naive remaining / (throughput − dirty rate).
        let model_eta = self
            .policy
            .eta()
            .and_then(|e| e.finish_at_ms)
            .map(|f| f.saturating_sub(s.at_ms));
        let naive_eta = if s.throughput_bytes_per_s > 0 && s.remaining_bytes > 0 {
            let dirty = s.dirty_bytes_per_s() as u64;
            if matches!(s.phase, Phase::Postcopy) || dirty < s.throughput_bytes_per_s {
                let net = if matches!(s.phase, Phase::Postcopy) {
                    s.throughput_bytes_per_s
                } else {
                    s.throughput_bytes_per_s - dirty
                };
                Some(s.remaining_bytes.saturating_mul(1000) / net.max(1))
            } else {
                None
            }
        } else {
            None
        };
        let eta_ms = model_eta.or(naive_eta);
        let status = info.status_or_none();
        self.progress_tx.send_modify(|p| {
            p.qemu_status = status.as_str().to_string();
            p.elapsed_ms = s.at_ms;
            p.transferred_bytes = s.transferred_bytes;
            p.remaining_bytes = s.remaining_bytes;
            p.total_bytes = s.total_bytes;
            p.dirty_bytes_per_s = s.dirty_bytes_per_s() as u64;
            p.throughput_bytes_per_s = s.throughput_bytes_per_s;
            p.pass = s.pass;
            p.eta_ms = eta_ms;
        });
    }

    /// Reacts to QEMU's status. Returns true when QEMU's migration ended (the state is then
    /// terminal, or `unknown` when the destination could not be asked).
    async fn handle_status(&mut self, status: &MigrationStatus, info: &MigrationInfo) -> bool {
        // Any post-copy status means the switch happened, even if the poll missed
        // `postcopy-active` (the channel can break within one poll interval of the switch;
        // QEMU is then already `postcopy-paused` and must be recovered, not waited on).
        if status.is_postcopy()
            && matches!(
                self.state,
                MigrationState::Precopy | MigrationState::GuestPaused
            )
        {
            self.switched = true;
            self.supervisor = Some(PostcopySupervisor::new(self.setup.postcopy_timings()));
            self.transition(
                MigrationState::Postcopy,
                format!(
                    "QEMU reports {}: the guest now runs on the destination",
                    status.as_str()
                ),
            );
        }
        match status {
            MigrationStatus::PostcopyPaused
                if matches!(
                    self.state,
                    MigrationState::Postcopy | MigrationState::Recovering
                ) =>
            {
                let why = if self.state == MigrationState::Postcopy {
                    "the migration channel broke during post-copy; both QEMUs wait in \
                     postcopy-paused and the guest keeps running on the destination"
                } else {
                    "the recovery attempt failed; post-copy is paused again"
                };
                self.transition(MigrationState::PostcopyPaused, why);
            }
            MigrationStatus::Completed => {
                self.complete().await;
                return true;
            }
            MigrationStatus::Failed => {
                let why = info
                    .error_desc
                    .clone()
                    .unwrap_or_else(|| "QEMU reported failed".to_string());
                self.error = Some(why.clone());
                if self.state.is_after_switch() {
                    self.transition(
                        MigrationState::Lost,
                        format!("failed after the switch: {why}"),
                    );
                } else if let Some(why) = self.adoption_cancel.clone() {
                    self.resume_source_if_paused().await;
                    self.error = Some(why.clone());
                    self.transition(MigrationState::Failed, why);
                } else if self.abort_requested {
                    // `migrate_cancel` tears the socket down; QEMU may report that as
                    // `failed` ("Broken pipe") rather than `cancelled`. It was our abort.
                    self.resume_source_if_paused().await;
                    self.transition(
                        MigrationState::Aborted,
                        format!(
                            "aborted as requested; the guest keeps running on the source (QEMU: {why})"
                        ),
                    );
                } else {
                    self.resume_source_if_paused().await;
                    self.transition(
                        MigrationState::Failed,
                        format!(
                            "failed before the switch, the guest keeps running on the source: {why}"
                        ),
                    );
                }
                return true;
            }
            MigrationStatus::Cancelled if self.state.is_after_switch() => {
                let why = "QEMU reports the migration cancelled after the switch".to_string();
                self.error = Some(why.clone());
                self.transition(MigrationState::Lost, why);
                return true;
            }
            MigrationStatus::Cancelled => {
                self.resume_source_if_paused().await;
                if let Some(why) = self.adoption_cancel.clone() {
                    self.error = Some(why.clone());
                    self.transition(MigrationState::Failed, why);
                    return true;
                }
                self.transition(
                    MigrationState::Aborted,
                    "cancelled; the guest keeps running on the source",
                );
                return true;
            }
            _ => {}
        }
        false
    }

    /// Executes one policy decision. `log_continue` records `Continue` decisions (only those
    /// made at pass boundaries, to keep the log readable).
    pub(super) async fn execute(&mut self, d: Decision, log_continue: bool) {
        let Decision { action, reason } = d;
        let result = match action {
            Action::Continue => {
                if log_continue && !reason.is_empty() {
                    self.record(MigrationEventKind::Decision {
                        action: "continue".into(),
                        reason,
                    });
                }
                return;
            }
            Action::SetDowntimeLimit { ms } => {
                self.take_action(
                    ActionKind::SetDowntimeLimit,
                    Some(format!("{ms} ms")),
                    &reason,
                );
                self.source
                    .set_parameters(&MigrationParameters {
                        downtime_limit: Some(ms.clamp(1, 2_000_000)),
                        ..Default::default()
                    })
                    .await
            }
            Action::SetBandwidth { bytes_per_s } => {
                self.take_action(
                    ActionKind::SetBandwidth,
                    Some(format!("{bytes_per_s} B/s")),
                    &reason,
                );
                self.source
                    .set_parameters(&MigrationParameters {
                        max_bandwidth: Some(bytes_per_s),
                        ..Default::default()
                    })
                    .await
            }
            Action::SetCpuThrottle {
                initial_pct,
                increment_pct,
                max_pct,
            } => {
                self.take_action(
                    ActionKind::SetCpuThrottle,
                    Some(format!("{initial_pct}/{increment_pct}/{max_pct} %")),
                    &reason,
                );
                self.source
                    .set_parameters(&MigrationParameters {
                        cpu_throttle_initial: Some(initial_pct as u64),
                        cpu_throttle_increment: Some(increment_pct as u64),
                        max_cpu_throttle: Some(max_pct as u64),
                        ..Default::default()
                    })
                    .await
            }
            Action::SetDirtyLimit { mb_per_s } => {
                self.take_action(
                    ActionKind::SetDirtyLimit,
                    Some(format!("{mb_per_s} MB/s")),
                    &reason,
                );
                self.source.set_dirty_limit(mb_per_s).await
            }
            Action::SwitchToPostcopy => {
                let allowed = self
                    .plan
                    .as_ref()
                    .is_some_and(|p| p.may_switch_to_postcopy());
                if !allowed {
                    // Defence in depth: the policy core guarantees this never happens.
                    self.record(MigrationEventKind::Note {
                        text: format!(
                            "refused a switch to post-copy the plan does not permit ({reason})"
                        ),
                    });
                    return;
                }
                if let Err(why) = self.switch_to_postcopy(&reason).await
                    && !why.is_empty()
                {
                    self.note(why);
                }
                return;
            }
            Action::PauseGuest => {
                self.take_action(ActionKind::PauseGuest, None, &reason);
                let r = self.source.stop().await;
                if r.is_ok() {
                    self.paused_guest = true;
                    self.transition(MigrationState::GuestPaused, reason.clone());
                }
                r
            }
            Action::Abort => {
                self.take_action(ActionKind::Abort, None, &reason);
                let r = self.source.migrate_cancel().await;
                self.abort_requested |= r.is_ok();
                r
            }
        };
        if let Err(e) = result {
            self.note(format!("QMP refused the action: {e}"));
        }
    }
}
