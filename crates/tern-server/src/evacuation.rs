//! Host evacuation: validation, the plan (through [`crate::planner`]), the records the runner
//! executes, and the operator's pause/resume/cancel.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::controller::{Controller, ControllerError};
use crate::model::{
    EvacuationPlan, EvacuationRecord, EvacuationState, HostPatch, HostState, MigrationContext,
    MigrationRecord, MigrationState, enum_str, new_id, now_ms,
};
use crate::planner::{PlanError, plan_evacuation};

/// A deadline as given: seconds, or a duration text (`30m`, `2h`, `90s`, `1d`, `900`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DeadlineSpec {
    /// Seconds.
    Seconds(i64),
    /// `30m`, `2h`, `90s`, `1d` or digits (seconds).
    Text(String),
}

/// Parses a deadline into seconds; `0`, negative values and anything but a number with an
/// optional unit `s`/`m`/`h`/`d` are refused, naming the value.
pub fn parse_deadline(d: &DeadlineSpec) -> Result<u64, ControllerError> {
    let bad = |v: &str| {
        ControllerError::Invalid(format!(
            "deadline {v:?} is invalid: give a positive duration up to 30d such as 30m, 2h, \
             90s or a number of seconds (900)"
        ))
    };
    let s = parse_deadline_inner(d, bad)?;
    if s > MAX_DEADLINE_S {
        let shown = match d {
            DeadlineSpec::Seconds(n) => n.to_string(),
            DeadlineSpec::Text(t) => t.clone(),
        };
        return Err(bad(&shown));
    }
    Ok(s)
}

/// The longest deadline accepted (30 days): an evacuation is an operation, not a schedule.
pub const MAX_DEADLINE_S: u64 = 30 * 86_400;

fn parse_deadline_inner(
    d: &DeadlineSpec,
    bad: impl Fn(&str) -> ControllerError,
) -> Result<u64, ControllerError> {
    match d {
        DeadlineSpec::Seconds(s) if *s > 0 => Ok(*s as u64),
        DeadlineSpec::Seconds(s) => Err(bad(&s.to_string())),
        DeadlineSpec::Text(t) => {
            let t = t.trim();
            let (num, mult) = match t.char_indices().last() {
                Some((i, 's')) => (&t[..i], 1),
                Some((i, 'm')) => (&t[..i], 60),
                Some((i, 'h')) => (&t[..i], 3600),
                Some((i, 'd')) => (&t[..i], 86_400),
                _ => (t, 1),
            };
            if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(t));
            }
            match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
                Some(n) if n > 0 => Ok(n),
                _ => Err(bad(t)),
            }
        }
    }
}

/// `POST /v1/hosts/{name}/evacuate` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvacuateRequest {
    /// When every VM must have left (default 1h).
    #[serde(default)]
    pub deadline: Option<DeadlineSpec>,
    /// Only plan: nothing is changed.
    #[serde(default)]
    pub dry_run: bool,
}

/// The answer to an evacuation request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvacuateResponse {
    /// The evacuation's id (absent for a dry run).
    pub id: Option<String>,
    /// Whether this was only a plan.
    pub dry_run: bool,
    /// The plan.
    pub plan: EvacuationPlan,
}

/// An evacuation with its migrations.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvacuationView {
    /// The evacuation.
    pub evacuation: EvacuationRecord,
    /// Its migrations in plan order (retries included as attempts).
    pub migrations: Vec<MigrationRecord>,
}

/// Default deadline when none is given (s).
pub const DEFAULT_DEADLINE_S: u64 = 3600;

impl Controller {
    /// Plans (and unless `dry_run`, starts) the evacuation of `host`.
    pub async fn evacuate(
        &self,
        host: &str,
        req: EvacuateRequest,
    ) -> Result<EvacuateResponse, ControllerError> {
        let deadline_s = match &req.deadline {
            Some(d) => parse_deadline(d)?,
            None => DEFAULT_DEADLINE_S,
        };
        let _work = self.work.lock().await;
        let h = self.host(host).await?;
        if h.state == HostState::Unreachable {
            return Err(ControllerError::Conflict(format!(
                "host {host} is unreachable: its agent must answer before its VMs can move"
            )));
        }
        let active: Vec<EvacuationRecord> = self
            .store
            .evacuations()
            .await?
            .into_iter()
            .filter(|e| !e.state.is_terminal())
            .collect();
        if let Some(e) = active.iter().find(|e| e.host == host) {
            return Err(ControllerError::Conflict(format!(
                "host {host} is already being evacuated by {} ({}): pause, resume or cancel it",
                e.id,
                enum_str(&e.state)
            )));
        }
        for e in &active {
            let ms = self.store.migrations(Some(&e.id)).await?;
            if ms
                .iter()
                .any(|m| m.destination == host && !m.state.is_terminal())
            {
                return Err(ControllerError::Conflict(format!(
                    "host {host} is a destination of running evacuation {} (of {}): wait for it \
                     or cancel it first",
                    e.id, e.host
                )));
            }
        }
        let vms = self.store.vms(Some(host)).await?;
        let busy: Vec<String> = self
            .store
            .migrations(None)
            .await?
            .into_iter()
            .filter(|m| !m.state.is_terminal() && vms.iter().any(|v| v.name == m.vm))
            .map(|m| format!("{} ({} {})", m.vm, m.id, m.state.as_str()))
            .collect();
        if !busy.is_empty() {
            return Err(ControllerError::Conflict(format!(
                "VMs of {host} are already migrating: {}; wait for them or abort them first",
                busy.join(", ")
            )));
        }
        let fleet = self.fleet().await?;
        let mut plan = plan_evacuation(&fleet, &h, &vms, deadline_s).map_err(|e| match e {
            PlanError::NoDestination { host, vms } => ControllerError::Unprocessable {
                message: format!(
                    "no valid destination for {}: {}",
                    vms.iter()
                        .map(|v| v.vm.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    vms.iter()
                        .map(|v| format!(
                            "{}: [{}]",
                            v.vm,
                            crate::placement::describe(&v.rejections)
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                details: serde_json::json!({"host": host, "vms": vms}),
            },
            PlanError::Invalid(m) => ControllerError::Invalid(m),
        })?;
        plan.made_ms = now_ms();
        if req.dry_run {
            return Ok(EvacuateResponse {
                id: None,
                dry_run: true,
                plan,
            });
        }
        let id = self.start_evacuation(host, deadline_s, &plan).await?;
        Ok(EvacuateResponse {
            id: Some(id),
            dry_run: false,
            plan,
        })
    }

    async fn start_evacuation(
        &self,
        host: &str,
        deadline_s: u64,
        plan: &EvacuationPlan,
    ) -> Result<String, ControllerError> {
        let now = now_ms();
        let id = new_id("evac");
        self.store
            .patch_host(
                host,
                &HostPatch {
                    drain: Some(true),
                    ..HostPatch::default()
                },
            )
            .await?;
        self.events.publish(
            "host",
            host,
            HostState::Draining.as_str(),
            format!("evacuation {id}"),
        );
        let rec = EvacuationRecord {
            id: id.clone(),
            host: host.to_string(),
            state: EvacuationState::Running,
            deadline_ms: now + deadline_s * 1000,
            plan: plan.clone(),
            predicted_makespan_s: plan.predicted_makespan_s,
            actual_makespan_s: None,
            created_ms: now,
            ended_ms: None,
            error: None,
            updated_ms: now,
        };
        for (i, p) in plan.migrations.iter().enumerate() {
            let m = MigrationRecord {
                id: new_id("mig"),
                vm: p.vm.clone(),
                source: host.to_string(),
                destination: p.destination.clone(),
                context: MigrationContext::Evacuate,
                state: MigrationState::Planned,
                attempts: 0,
                evacuation_id: Some(id.clone()),
                plan_index: Some(i as u32),
                reason: p.reason.clone(),
                idempotency_key: None,
                agent_migration_id: None,
                error: None,
                created_ms: now,
                started_ms: None,
                ended_ms: None,
                next_attempt_ms: None,
                updated_ms: now,
                switched_to_postcopy: false,
            };
            self.store.put_migration(&m).await?;
            self.note(&m, "state", &format!("planned by {id}: {}", p.reason))
                .await?;
        }
        // The evacuation is written last: the runner only sees it with every step recorded.
        self.store.put_evacuation(&rec).await?;
        self.metrics
            .evacuation_predicted
            .get_or_create(&vec![("host".into(), host.into())])
            .set(plan.predicted_makespan_s);
        self.events.publish(
            "evacuation",
            &id,
            "running",
            format!(
                "{} VM(s), predicted {:.1} s, deadline {deadline_s} s",
                plan.migrations.len(),
                plan.predicted_makespan_s
            ),
        );
        Ok(id)
    }

    /// One evacuation with its migrations.
    pub async fn evacuation(&self, id: &str) -> Result<EvacuationView, ControllerError> {
        let evacuation = self.store.evacuation(id).await?.ok_or_else(|| {
            ControllerError::NotFound(format!(
                "unknown evacuation {id:?}: list them with GET /v1/evacuations"
            ))
        })?;
        let migrations = self.store.migrations(Some(id)).await?;
        Ok(EvacuationView {
            evacuation,
            migrations,
        })
    }

    /// Every evacuation, newest first.
    pub async fn evacuations(&self) -> Result<Vec<EvacuationRecord>, ControllerError> {
        Ok(self.store.evacuations().await?)
    }

    /// Pauses (no new migration starts), resumes, or cancels an evacuation.
    pub async fn steer_evacuation(
        &self,
        id: &str,
        to: EvacuationState,
    ) -> Result<EvacuationView, ControllerError> {
        let _work = self.work.lock().await;
        let mut v = self.evacuation(id).await?;
        let from = v.evacuation.state;
        let ok = match to {
            EvacuationState::Paused => from == EvacuationState::Running,
            EvacuationState::Running => from == EvacuationState::Paused,
            EvacuationState::Cancelled => !from.is_terminal(),
            _ => false,
        };
        if !ok {
            return Err(ControllerError::Conflict(format!(
                "evacuation {id} is {}: cannot go to {} (pause a running one, resume a paused \
                 one, cancel an unfinished one)",
                enum_str(&from),
                enum_str(&to)
            )));
        }
        let now = now_ms();
        v.evacuation.state = to;
        v.evacuation.updated_ms = now;
        if to == EvacuationState::Cancelled {
            v.evacuation.ended_ms = Some(now);
            self.cancel_steps(&mut v.migrations).await?;
        }
        self.store.put_evacuation(&v.evacuation).await?;
        self.events
            .publish("evacuation", id, &enum_str(&to), "operator");
        Ok(v)
    }

    /// Cancelling: steps not started are aborted; running ones are asked to abort (the agent
    /// refuses after the switch to post-copy: those finish, and the runner records it).
    async fn cancel_steps(&self, steps: &mut [MigrationRecord]) -> Result<(), ControllerError> {
        let now = now_ms();
        for m in steps.iter_mut().filter(|m| !m.state.is_terminal()) {
            match (m.state, m.agent_migration_id.clone()) {
                (MigrationState::Planned, _) => {
                    m.state = MigrationState::Aborted;
                    m.ended_ms = Some(now);
                    m.updated_ms = now;
                    m.error = Some("evacuation cancelled before it started".into());
                    self.store.put_migration(m).await?;
                    self.metrics.aborts.inc();
                    self.note(m, "state", "aborted: evacuation cancelled")
                        .await?;
                }
                (_, Some(agent_id)) => {
                    let r = self.agents.abort(&m.source, &agent_id).await;
                    let detail = match r {
                        Ok(()) => "abort requested: evacuation cancelled".to_string(),
                        Err(e) => format!("abort refused, it will finish: {e}"),
                    };
                    self.note(m, "operator", &detail).await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_parse_units_and_refuse_bad_values_by_name() {
        let t = |s: &str| parse_deadline(&DeadlineSpec::Text(s.into()));
        assert_eq!(t("30m").unwrap(), 1800);
        assert_eq!(t("2h").unwrap(), 7200);
        assert_eq!(t("90s").unwrap(), 90);
        assert_eq!(t("900").unwrap(), 900);
        assert_eq!(parse_deadline(&DeadlineSpec::Seconds(60)).unwrap(), 60);
        for bad in ["0", "-5m", "tomorrow", "", "5x", "m", "0h"] {
            let e = t(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(parse_deadline(&DeadlineSpec::Seconds(-300)).is_err());
        assert!(parse_deadline(&DeadlineSpec::Seconds(0)).is_err());
        assert!(parse_deadline(&DeadlineSpec::Seconds(i64::MAX)).is_err());
        assert!(t("99999999999999999d").is_err());
        assert_eq!(t("30d").unwrap(), MAX_DEADLINE_S);
        assert!(t("31d").unwrap_err().to_string().contains("\"31d\""));
    }
}
