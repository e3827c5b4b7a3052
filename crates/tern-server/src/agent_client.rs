//! The one place the controller talks to host agents.
//!
//! Agents are found from configuration (`[agents]` in `server.toml`), never from what a
//! request or a heartbeat says. Only these agent routes are used: `POST /v1/migrations`
//! (start on the source agent), `GET /v1/migrations` and `GET /v1/migrations/{id}` (watch and
//! reconcile), `POST /v1/migrations/{id}/abort`, `.../force-complete` and `.../bandwidth` (an
//! operator's commands). The wire types here are deliberately minimal
//! (only the fields the controller reads or sends), so the agent's request types can change
//! (its `to_agent_url` disappears in favour of configured peers) without touching the runner:
//! adapting to a new agent API means editing this file only.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::MigrationContext;

/// The header carrying the leader's lease epoch to agents (the fencing token, issue 12);
/// the agent's `fencing` module refuses an epoch older than the newest it has seen.
pub const FENCING_HEADER: &str = "x-tern-fencing-epoch";

/// Why an agent call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentCallError {
    /// No agent is configured for the host.
    #[error("no agent configured for host {0:?} (add it to [agents] in server.toml)")]
    NoAgent(String),
    /// The agent could not be reached.
    #[error("agent of {host} at {url} unreachable: {message}")]
    Unreachable {
        /// Host.
        host: String,
        /// Agent URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The agent answered with an error.
    #[error("agent of {host} answered {status}: {message}")]
    Refused {
        /// Host.
        host: String,
        /// HTTP status.
        status: u16,
        /// The agent's error text.
        message: String,
    },
}

/// What the controller asks the source agent to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentStartRequest {
    /// The VM.
    pub vm: String,
    /// Destination host (the agent finds its peer from its own configuration).
    pub to_host: String,
    /// Why the VM moves.
    pub context: MigrationContext,
    /// Deadline for must-finish contexts (s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
}

/// An agent's migration, as far as the controller reads it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentMigration {
    /// The agent's migration id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Destination host.
    pub destination: String,
    /// The agent's state (`precopy`, `postcopy`, `recovering`, `completed`, `failed`, …).
    pub state: String,
    /// When the agent accepted it (ms since the epoch).
    pub created_ms: u64,
    /// Error text.
    #[serde(default)]
    pub error: Option<String>,
    /// Live progress while it runs (the agent's `progress`), for the web view's chart.
    #[serde(default)]
    pub progress: Option<crate::progress::ProgressFigures>,
    /// The agent's event log of the migration (decisions among them).
    #[serde(default)]
    pub events: Vec<AgentEvent>,
}

/// One entry of an agent migration's event log, as far as the controller reads it (the
/// policy's decisions: `event` = `decision`, with `action` and `reason`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentEvent {
    /// Position in the agent's log (1-based).
    pub seq: u64,
    /// What kind (`state`, `decision`, `pass`, `operator`, …).
    pub event: String,
    /// A decision's action (`switch-to-postcopy`, `set-downtime-limit`, …).
    #[serde(default)]
    pub action: Option<String>,
    /// A decision's (or state change's) reason.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The agent operations the controller needs.
#[async_trait]
pub trait AgentApi: Send + Sync {
    /// Starts a migration on `source`'s agent; `key` identifies this attempt.
    async fn start_migration(
        &self,
        source: &str,
        key: &str,
        req: &AgentStartRequest,
    ) -> Result<AgentMigration, AgentCallError>;
    /// One migration of `host`'s agent.
    async fn migration(&self, host: &str, id: &str) -> Result<AgentMigration, AgentCallError>;
    /// Every migration `host`'s agent ran as source.
    async fn migrations(&self, host: &str) -> Result<Vec<AgentMigration>, AgentCallError>;
    /// Aborts a migration (refused by the agent after the switch to post-copy).
    async fn abort(&self, host: &str, id: &str) -> Result<(), AgentCallError>;
    /// Asks the agent to finish a migration now (its policy's force-complete: post-copy where
    /// permitted, else a short pause of the guest). Clients that cannot say refuse it.
    async fn force_complete(&self, host: &str, _id: &str) -> Result<(), AgentCallError> {
        Err(AgentCallError::Refused {
            host: host.to_string(),
            status: 501,
            message: "this agent client cannot force completion".into(),
        })
    }
    /// Caps a migration's bandwidth (bytes/s). Clients that cannot say refuse it.
    async fn set_bandwidth(
        &self,
        host: &str,
        _id: &str,
        _bytes_per_s: u64,
    ) -> Result<(), AgentCallError> {
        Err(AgentCallError::Refused {
            host: host.to_string(),
            status: 501,
            message: "this agent client cannot change bandwidth".into(),
        })
    }
}

/// Agents over HTTP, by host name.
#[derive(Debug, Clone)]
pub struct HttpAgents {
    urls: BTreeMap<String, String>,
    http: reqwest::Client,
    fencing: Option<crate::leader::Leadership>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl HttpAgents {
    /// Agents at the configured URLs, `https://` ones over mutual TLS with `client` (the
    /// controller's operator user certificate). An `https://` agent without client files is
    /// refused here, naming the host, rather than failing at every call.
    pub fn with_tls(
        urls: BTreeMap<String, String>,
        client: Option<&tern_pki::TlsFiles>,
    ) -> Result<Self, String> {
        let https: Vec<&String> = urls
            .iter()
            .filter(|(_, u)| u.starts_with("https://"))
            .map(|(h, _)| h)
            .collect();
        if https.is_empty() {
            return Ok(Self::new(urls));
        }
        let files = client.ok_or_else(|| {
            format!(
                "agents {https:?} are https:// but [tls] has no agent_client_user: issue one \
                 (tern pki issue user controller --role operator) and name it there"
            )
        })?;
        let http = tern_pki::reqwest_client_builder(files)
            .map_err(|e| format!("agent client certificate: {e}"))?
            .https_only(false)
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("agent TLS client: {e}"))?;
        Ok(Self {
            urls,
            http,
            fencing: None,
        })
    }

    /// Agents at the configured URLs (plain HTTP: loopback lab agents).
    pub fn new(urls: BTreeMap<String, String>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            urls,
            http,
            fencing: None,
        }
    }

    /// Mutating calls carry the leader's lease epoch ([`FENCING_HEADER`]) and are not sent
    /// at all when this controller is not (or no longer surely) the leader (issue 12).
    pub fn with_fencing(mut self, leadership: crate::leader::Leadership) -> Self {
        self.fencing = Some(leadership);
        self
    }

    fn fenced(
        &self,
        host: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, AgentCallError> {
        use crate::leader::Fencing;
        match self.fencing.as_ref().map(|l| l.fencing()) {
            None | Some(Fencing::Unfenced) => Ok(req),
            Some(Fencing::Epoch(epoch)) => Ok(req.header(FENCING_HEADER, epoch.to_string())),
            Some(Fencing::NotLeader(leader)) => Err(AgentCallError::Unreachable {
                host: host.to_string(),
                url: self.urls.get(host).cloned().unwrap_or_default(),
                message: format!("not sent: this controller is not the leader any more ({leader})"),
            }),
        }
    }

    fn url(&self, host: &str, path: &str) -> Result<String, AgentCallError> {
        self.urls
            .get(host)
            .map(|u| format!("{}{path}", u.trim_end_matches('/')))
            .ok_or_else(|| AgentCallError::NoAgent(host.to_string()))
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        host: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, AgentCallError> {
        let url = self.urls.get(host).cloned().unwrap_or_default();
        let unreachable = |message: String| AgentCallError::Unreachable {
            host: host.to_string(),
            url: url.clone(),
            message,
        };
        let resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| unreachable(e.to_string()))?;
        if status >= 400 {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            return Err(AgentCallError::Refused {
                host: host.to_string(),
                status,
                message,
            });
        }
        serde_json::from_str(&text).map_err(|e| AgentCallError::Refused {
            host: host.to_string(),
            status,
            message: format!("unreadable answer ({e}): {text}"),
        })
    }
}

#[async_trait]
impl AgentApi for HttpAgents {
    async fn start_migration(
        &self,
        source: &str,
        key: &str,
        req: &AgentStartRequest,
    ) -> Result<AgentMigration, AgentCallError> {
        let url = self.url(source, "/v1/migrations")?;
        let req = self.http.post(url).header("Idempotency-Key", key).json(req);
        self.send(source, self.fenced(source, req)?).await
    }

    async fn migration(&self, host: &str, id: &str) -> Result<AgentMigration, AgentCallError> {
        let url = self.url(host, &format!("/v1/migrations/{id}"))?;
        self.send(host, self.http.get(url)).await
    }

    async fn migrations(&self, host: &str) -> Result<Vec<AgentMigration>, AgentCallError> {
        let url = self.url(host, "/v1/migrations")?;
        self.send(host, self.http.get(url)).await
    }

    async fn abort(&self, host: &str, id: &str) -> Result<(), AgentCallError> {
        let url = self.url(host, &format!("/v1/migrations/{id}/abort"))?;
        self.send::<serde_json::Value>(host, self.fenced(host, self.http.post(url))?)
            .await
            .map(|_| ())
    }

    async fn force_complete(&self, host: &str, id: &str) -> Result<(), AgentCallError> {
        let url = self.url(host, &format!("/v1/migrations/{id}/force-complete"))?;
        self.send::<serde_json::Value>(host, self.http.post(url))
            .await
            .map(|_| ())
    }

    async fn set_bandwidth(
        &self,
        host: &str,
        id: &str,
        bytes_per_s: u64,
    ) -> Result<(), AgentCallError> {
        let url = self.url(host, &format!("/v1/migrations/{id}/bandwidth"))?;
        let body = serde_json::json!({ "bytes_per_s": bytes_per_s });
        self.send::<serde_json::Value>(host, self.http.post(url).json(&body))
            .await
            .map(|_| ())
    }
}

/// What an agent's migration state means for the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentOutcome {
    /// Still moving (`pending`, `precopy`, …).
    Running {
        /// In post-copy (the switch happened).
        switched: bool,
        /// Recovering a broken post-copy.
        recovering: bool,
    },
    /// The guest runs on the destination.
    Completed,
    /// Ended before the switch: the guest is still on the source.
    FailedBeforeSwitch {
        /// An operator aborted it.
        aborted: bool,
    },
    /// Ended after the switch without completing (`lost`, `stranded`).
    Lost,
}

/// Interprets an agent state name (the engine's `MigrationState`).
pub fn outcome_of(state: &str) -> AgentOutcome {
    match state {
        "completed" => AgentOutcome::Completed,
        "failed" => AgentOutcome::FailedBeforeSwitch { aborted: false },
        "aborted" | "cancelled" => AgentOutcome::FailedBeforeSwitch { aborted: true },
        "lost" | "stranded" => AgentOutcome::Lost,
        s => AgentOutcome::Running {
            switched: s.starts_with("postcopy") || s == "recovering",
            recovering: s == "recovering",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_states_map_to_controller_outcomes() {
        assert_eq!(outcome_of("completed"), AgentOutcome::Completed);
        assert_eq!(
            outcome_of("failed"),
            AgentOutcome::FailedBeforeSwitch { aborted: false }
        );
        assert_eq!(
            outcome_of("aborted"),
            AgentOutcome::FailedBeforeSwitch { aborted: true }
        );
        assert_eq!(outcome_of("lost"), AgentOutcome::Lost);
        assert_eq!(outcome_of("stranded"), AgentOutcome::Lost);
        for (s, switched, recovering) in [
            ("pending", false, false),
            ("precopy", false, false),
            ("guest-paused", false, false),
            ("postcopy", true, false),
            ("postcopy-paused", true, false),
            ("recovering", true, true),
        ] {
            assert_eq!(
                outcome_of(s),
                AgentOutcome::Running {
                    switched,
                    recovering
                },
                "{s}"
            );
        }
    }

    #[test]
    fn the_start_request_carries_no_peer_address() {
        let req = AgentStartRequest {
            vm: "web".into(),
            to_host: "h2".into(),
            context: MigrationContext::Evacuate,
            deadline_s: None,
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"vm": "web", "to_host": "h2", "context": "evacuate"})
        );
    }
}
