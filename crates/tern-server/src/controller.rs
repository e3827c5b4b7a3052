//! The controller's operations behind the API: hosts, VMs, migrations (validation, placement,
//! records). Evacuations are in [`crate::evacuation`], the executor in [`crate::runner`].
//! Handlers in [`crate::api`] only translate HTTP to these calls.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent_client::AgentApi;
use crate::config::ServerConfig;
use crate::events::EventBus;
use crate::metrics::Metrics;
use crate::model::{
    Heartbeat, HostPatch, HostRecord, HostState, MigrationContext, MigrationEvent, MigrationRecord,
    MigrationState, VmRecord, new_id, now_ms,
};
use crate::placement::{Fleet, describe};
use crate::store::{ControllerStore, StoreError};

/// Errors of controller operations, with the HTTP status they map to.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Something named does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or a value is invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// Valid, but cannot be done; `details` says why per item (422).
    #[error("{message}")]
    Unprocessable {
        /// Summary.
        message: String,
        /// Per-item reasons.
        details: serde_json::Value,
    },
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `GET /v1/hosts` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostPage {
    /// Hosts, by name.
    pub hosts: Vec<HostRecord>,
    /// Token for the next page (`?after=`), absent on the last page.
    pub next_page: Option<String>,
}

/// `POST /v1/migrations` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    /// The VM.
    pub vm: String,
    /// Destination; absent: the controller chooses and says why.
    #[serde(default)]
    pub to: Option<String>,
    /// Why it moves.
    #[serde(default = "manual")]
    pub context: MigrationContext,
}

fn manual() -> MigrationContext {
    MigrationContext::Manual
}

/// `POST /v1/migrations` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigrationCreated {
    /// The migration (state `planned`: the runner starts it).
    pub migration: MigrationRecord,
    /// Why this destination.
    pub reason: String,
}

/// A migration with its history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MigrationView {
    /// The migration.
    pub migration: MigrationRecord,
    /// Its events, oldest first.
    pub events: Vec<MigrationEvent>,
    /// The source agent's last progress report, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::progress::ProgressFigures>,
}

/// Largest page of `GET /v1/hosts`.
pub const MAX_PAGE: u32 = 1000;

/// The controller: store, agents, configuration, metrics and event bus.
#[derive(Clone)]
pub struct Controller {
    /// Durable state.
    pub store: Arc<dyn ControllerStore>,
    /// The agents.
    pub agents: Arc<dyn AgentApi>,
    /// Whether this controller leads (always on SQLite; elected by a lease on PostgreSQL).
    pub leadership: crate::leader::Leadership,
    /// Configuration.
    pub config: Arc<ServerConfig>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// State changes for `/v1/events`.
    pub events: EventBus,
    /// Serialises writers of migrations and evacuations: the runner holds it for a tick, API
    /// calls that create or steer work hold it while they write, so a cancel cannot race a
    /// start of the same step. (Several controllers are serialised by the lease, issue 12.)
    pub work: Arc<tokio::sync::Mutex<()>>,
    /// Live progress of running migrations (memory only), for the web view.
    pub progress: crate::progress::ProgressLog,
    /// Which agent decisions are already in the migrations' histories.
    pub forwarded: crate::agent_reports::ForwardedDecisions,
}

/// Encodes a page token for the host after which the next page starts.
pub fn page_token(last: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("h:{last}"))
}

/// Decodes a page token.
pub fn parse_page_token(t: &str) -> Result<String, ControllerError> {
    URL_SAFE_NO_PAD
        .decode(t)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("h:").map(str::to_string))
        .ok_or_else(|| {
            ControllerError::Invalid(format!(
                "invalid page token {t:?} for after=: pass the next_page value of a previous \
                 answer, or omit after= for the first page"
            ))
        })
}

impl Controller {
    /// The host with its state as seen now (`unreachable` when the heartbeat is stale).
    pub fn effective(&self, mut h: HostRecord, now: u64) -> HostRecord {
        if now.saturating_sub(h.last_heartbeat_ms)
            > self.config.heartbeat_timeout_s.saturating_mul(1000)
        {
            h.state = HostState::Unreachable;
        }
        h
    }

    /// Every host as seen now, plus what unfinished migrations promise each destination.
    pub async fn fleet(&self) -> Result<Fleet, ControllerError> {
        let now = now_ms();
        let mut fleet = Fleet::default();
        for h in self.store.hosts().await? {
            let h = self.effective(h, now);
            fleet.hosts.insert(h.name.clone(), h);
        }
        // Only unfinished migrations promise anything: the VM table (100,000 rows at fleet
        // scale) is read only when there are some, and looked up by name once.
        let unfinished: Vec<MigrationRecord> = self
            .store
            .migrations(None)
            .await?
            .into_iter()
            .filter(|m| !m.state.is_terminal())
            .collect();
        if unfinished.is_empty() {
            return Ok(fleet);
        }
        let memory: std::collections::HashMap<String, u64> = self
            .store
            .vms(None)
            .await?
            .into_iter()
            .map(|v| (v.name, v.memory_mib))
            .collect();
        for m in unfinished {
            let mem = memory.get(&m.vm).copied().unwrap_or(0);
            if matches!(m.state, MigrationState::Planned) && m.evacuation_id.is_some() {
                // Planned evacuation steps promise memory but take no inbound slot yet.
                *fleet.reserved_mib.entry(m.destination.clone()).or_default() += mem;
            } else {
                fleet.reserve(&m.destination, mem);
            }
        }
        Ok(fleet)
    }

    fn known_hosts(&self) -> String {
        let names: Vec<&str> = self.config.agents.keys().map(String::as_str).collect();
        if names.is_empty() {
            "none are configured".into()
        } else {
            names.join(", ")
        }
    }

    /// Records an agent's heartbeat.
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<HostRecord, ControllerError> {
        if !self.config.agents.contains_key(&hb.host) {
            return Err(ControllerError::Invalid(format!(
                "host {:?} is not one of the configured [agents] ({}): add it to server.toml",
                hb.host,
                self.known_hosts()
            )));
        }
        let now = now_ms();
        let before = self.store.host(&hb.host).await?;
        // Which guests the host runs: a change (a VM arrived or left) is an event too, so
        // watchers (the web view's host list) see a VM change host as soon as it is reported.
        let mut vms_before: Vec<String> = self
            .store
            .vms(Some(&hb.host))
            .await?
            .into_iter()
            .map(|v| v.name)
            .collect();
        vms_before.sort();
        let mut vms_now: Vec<String> = hb.vms.iter().map(|v| v.name.clone()).collect();
        vms_now.sort();
        self.store.record_heartbeat(&hb, now).await?;
        let after = self
            .store
            .host(&hb.host)
            .await?
            .ok_or_else(|| ControllerError::NotFound(format!("host {:?} vanished", hb.host)))?;
        let was = before.map(|b| self.effective(b, now).state);
        if was != Some(after.state) {
            self.events.publish(
                "host",
                &hb.host,
                after.state.as_str(),
                match was {
                    None => "registered".to_string(),
                    Some(s) => format!("heartbeat again (was {})", s.as_str()),
                },
            );
        } else if vms_before != vms_now {
            self.events.publish(
                "host",
                &hb.host,
                after.state.as_str(),
                format!("guests now: {}", vms_now.join(", ")),
            );
        }
        Ok(after)
    }

    /// A page of hosts.
    pub async fn hosts_page(
        &self,
        limit: Option<u32>,
        after: Option<&str>,
    ) -> Result<HostPage, ControllerError> {
        let limit = limit.unwrap_or(100);
        if limit == 0 || limit > MAX_PAGE {
            return Err(ControllerError::Invalid(format!(
                "limit={limit} is invalid: give 1 to {MAX_PAGE}"
            )));
        }
        let after = after.map(parse_page_token).transpose()?;
        let mut hosts = self
            .store
            .hosts_page(after.as_deref(), limit.saturating_add(1))
            .await?;
        let more = hosts.len() > limit as usize;
        hosts.truncate(limit as usize);
        let now = now_ms();
        let hosts: Vec<HostRecord> = hosts.into_iter().map(|h| self.effective(h, now)).collect();
        let next_page = more
            .then(|| hosts.last().map(|h| page_token(&h.name)))
            .flatten();
        Ok(HostPage { hosts, next_page })
    }

    /// One host.
    pub async fn host(&self, name: &str) -> Result<HostRecord, ControllerError> {
        let h = self.store.host(name).await?.ok_or_else(|| {
            ControllerError::NotFound(format!(
                "unknown host {name:?}: registered hosts send heartbeats; configured agents are {}",
                self.known_hosts()
            ))
        })?;
        Ok(self.effective(h, now_ms()))
    }

    /// Applies an operator's settings to a host.
    pub async fn patch_host(
        &self,
        name: &str,
        patch: HostPatch,
    ) -> Result<HostRecord, ControllerError> {
        for (field, v) in [
            ("max_outbound", patch.max_outbound),
            ("max_inbound", patch.max_inbound),
        ] {
            if v == Some(0) {
                return Err(ControllerError::Invalid(format!(
                    "{field} = 0 is invalid: give at least 1 (drain the host to stop placement)"
                )));
            }
        }
        self.host(name).await?;
        let h = self
            .store
            .patch_host(name, &patch)
            .await?
            .ok_or_else(|| ControllerError::NotFound(format!("unknown host {name:?}")))?;
        let h = self.effective(h, now_ms());
        self.events.publish(
            "host",
            name,
            h.state.as_str(),
            format!("settings {patch:?}"),
        );
        Ok(h)
    }

    /// VMs, of one host or all.
    pub async fn vms(&self, host: Option<&str>) -> Result<Vec<VmRecord>, ControllerError> {
        if let Some(h) = host {
            self.host(h).await?;
        }
        Ok(self.store.vms(host).await?)
    }

    /// One VM.
    pub async fn vm(&self, name: &str) -> Result<VmRecord, ControllerError> {
        let all = self.store.vms(None).await?;
        let names: Vec<&str> = all.iter().take(20).map(|v| v.name.as_str()).collect();
        all.iter().find(|v| v.name == name).cloned().ok_or_else(|| {
            ControllerError::NotFound(format!(
                "unknown VM {name:?}: known VMs include {}",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            ))
        })
    }

    /// Accepts a migration: validates it, chooses the destination when none is given, and
    /// records it `planned` (the runner starts it).
    pub async fn create_migration(
        &self,
        req: MigrationRequest,
    ) -> Result<MigrationCreated, ControllerError> {
        let _work = self.work.lock().await;
        let vm = self.vm(&req.vm).await?;
        let fleet = self.fleet().await?;
        let source = fleet
            .hosts
            .get(&vm.host)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("host {:?} unknown", vm.host)))?;
        if source.state == HostState::Unreachable {
            return Err(ControllerError::Conflict(format!(
                "VM {:?} is on {}, which is unreachable: its agent must answer before it can move",
                vm.name, source.name
            )));
        }
        let busy = self.store.migrations(None).await?;
        if let Some(m) = busy
            .iter()
            .find(|m| m.vm == vm.name && !m.state.is_terminal())
        {
            return Err(ControllerError::Conflict(format!(
                "VM {:?} already has migration {} ({}): wait for it or abort it",
                vm.name,
                m.id,
                m.state.as_str()
            )));
        }
        let (destination, reason) = match &req.to {
            Some(to) => {
                let dest = fleet.hosts.get(to).ok_or_else(|| {
                    ControllerError::NotFound(format!(
                        "unknown destination host {to:?}: hosts are {}",
                        fleet.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                if let Some(why) = fleet.reject(&vm, &source, dest, true) {
                    return Err(ControllerError::Unprocessable {
                        message: format!("host {to} cannot take VM {:?}: {why}", vm.name),
                        details: serde_json::json!([{"host": to, "why": why}]),
                    });
                }
                (to.clone(), format!("{to}: chosen by the operator"))
            }
            None => match fleet.choose(&vm, &source, &[]) {
                Ok(c) => (c.host, c.reason),
                Err(rej) => {
                    return Err(ControllerError::Unprocessable {
                        message: format!(
                            "no valid destination for VM {:?}: {}",
                            vm.name,
                            describe(&rej)
                        ),
                        details: serde_json::to_value(&rej).unwrap_or_default(),
                    });
                }
            },
        };
        let now = now_ms();
        let m = MigrationRecord {
            id: new_id("mig"),
            vm: vm.name.clone(),
            source: source.name.clone(),
            destination,
            context: req.context,
            state: MigrationState::Planned,
            attempts: 0,
            evacuation_id: None,
            plan_index: None,
            reason: reason.clone(),
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
        self.note(&m, "state", &format!("planned: {reason}"))
            .await?;
        Ok(MigrationCreated {
            migration: m,
            reason,
        })
    }

    /// Appends an event to `m`'s history and broadcasts it.
    pub async fn note(
        &self,
        m: &MigrationRecord,
        kind: &str,
        detail: &str,
    ) -> Result<(), ControllerError> {
        self.store.add_event(&m.id, kind, detail, now_ms()).await?;
        self.events
            .publish("migration", &m.id, m.state.as_str(), detail);
        Ok(())
    }

    /// Shows `unknown` for unfinished migrations whose source is unreachable.
    async fn overlay(
        &self,
        mut ms: Vec<MigrationRecord>,
    ) -> Result<Vec<MigrationRecord>, ControllerError> {
        let now = now_ms();
        let hosts = self.store.hosts().await?;
        for m in &mut ms {
            let unreachable = hosts
                .iter()
                .find(|h| h.name == m.source)
                .is_some_and(|h| self.effective(h.clone(), now).state == HostState::Unreachable);
            if unreachable && matches!(m.state, MigrationState::Starting | MigrationState::Running)
            {
                m.state = MigrationState::Unknown;
            }
        }
        Ok(ms)
    }

    /// Every migration, newest first.
    pub async fn migrations(&self) -> Result<Vec<MigrationRecord>, ControllerError> {
        let ms = self.store.migrations(None).await?;
        self.overlay(ms).await
    }

    /// One migration with its events.
    pub async fn migration(&self, id: &str) -> Result<MigrationView, ControllerError> {
        let m = self.store.migration(id).await?.ok_or_else(|| {
            ControllerError::NotFound(format!(
                "unknown migration {id:?}: list them with GET /v1/migrations"
            ))
        })?;
        let events = self.store.events(id).await?;
        let migration = self.overlay(vec![m]).await?.remove(0);
        let progress = self.progress.last(id);
        Ok(MigrationView {
            migration,
            events,
            progress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_named() {
        assert_eq!(parse_page_token(&page_token("h7")).unwrap(), "h7");
        let e = parse_page_token("not a token!").unwrap_err().to_string();
        assert!(e.contains("\"not a token!\""), "{e}");
        let e = parse_page_token(&URL_SAFE_NO_PAD.encode("x:h1")).unwrap_err();
        assert!(e.to_string().contains("invalid page token"));
    }
}
