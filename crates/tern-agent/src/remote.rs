//! Talking to an agent over HTTP: [`AgentClient`] (every route of [`crate::http`]) and
//! [`RemoteDestination`], the engine's [`DestinationEndpoint`] for a destination QEMU owned by
//! another host's agent.
//!
//! The source agent drives a migration next to its own QEMU (so it survives an outage of
//! whatever sits above the agents) and reaches the destination QEMU only through the
//! destination agent's API, never through its QMP socket.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_engine::{DestinationEndpoint, EndpointFacts, EngineError, OperatorCommand};
use tern_qemu::VmSpec;
use tern_qmp::{MigrationCapabilityStatus, MigrationInfo, MigrationParameters, StatusInfo};

use crate::VmInfo;
use crate::api::{
    BandwidthRequest, ErrorBody, Health, HostFacts, IncomingReply, IncomingRequest, MigrationView,
    NoBody, OperatorReply, StartMigrationRequest,
};
use crate::store::MigrationRecord;

/// Why a call to an agent failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached (not running, wrong URL, timeout).
    #[error("agent {url} is unreachable: {reason}")]
    Unreachable {
        /// The agent's URL.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// The agent answered with an error status.
    #[error("{message}")]
    Api {
        /// HTTP status code.
        status: u16,
        /// The agent's explanation.
        message: String,
    },
    /// The agent's answer was not what the API describes.
    #[error("agent {url} sent an invalid answer: {reason}")]
    InvalidAnswer {
        /// The agent's URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one agent's API.
#[derive(Debug, Clone)]
pub struct AgentClient {
    base: String,
    http: reqwest::Client,
}

/// How long one API call may take (a VM start waits for QEMU's QMP socket).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl AgentClient {
    /// A client of the agent at `base_url` (`http://127.0.0.1:7701`).
    pub fn new(base_url: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            http,
        }
    }

    /// A client of the peer agent at `base_url`, as the agent configured with `tls` calls it:
    /// an `https://` peer with this host's own certificate (the peer's `/v1/incoming…`
    /// routes take host certificates only) and only the installation's CA as root; an
    /// `http://` peer (a lab agent) in plain HTTP.
    pub fn for_peer(
        base_url: &str,
        tls: Option<&tern_pki::TlsFiles>,
    ) -> Result<Self, crate::AgentError> {
        if !base_url.starts_with("https://") {
            return Ok(Self::new(base_url));
        }
        let Some(files) = tls else {
            return Err(crate::AgentError::Config(format!(
                "peer URL {base_url:?} is https:// but this agent has no [tls] section: add one \
                 (its host certificate authenticates this agent to the peer) or use http:// for a lab peer"
            )));
        };
        let http = tern_pki::reqwest_client_builder(files)
            .and_then(|b| {
                b.timeout(CALL_TIMEOUT)
                    .connect_timeout(Duration::from_secs(3))
                    .no_proxy()
                    .build()
                    .map_err(|e| tern_pki::PkiError::Tls(e.to_string()))
            })
            .map_err(|e| {
                crate::AgentError::Config(format!(
                    "cannot build the TLS client for peer {base_url}: {e}"
                ))
            })?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_string(),
            http,
        })
    }

    /// The agent's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| {
                    format!(
                        "agent {} answered {status}: {}",
                        self.base,
                        String::from_utf8_lossy(&bytes)
                    )
                });
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::InvalidAnswer {
            url: self.base.clone(),
            reason: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/healthz").await
    }
    /// `GET /v1/host`.
    pub async fn host(&self) -> Result<HostFacts, ClientError> {
        self.get("/v1/host").await
    }
    /// `GET /v1/vms`.
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.get("/v1/vms").await
    }
    /// `POST /v1/vms`.
    pub async fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo, ClientError> {
        self.post("/v1/vms", spec).await
    }
    /// `GET /v1/vms/{name}`.
    pub async fn show_vm(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.get(&format!("/v1/vms/{name}")).await
    }
    /// `DELETE /v1/vms/{name}`.
    pub async fn stop_vm(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.delete(&format!("/v1/vms/{name}")).await
    }
    /// `POST /v1/incoming`.
    pub async fn prepare_incoming(
        &self,
        req: &IncomingRequest,
    ) -> Result<IncomingReply, ClientError> {
        self.post("/v1/incoming", req).await
    }
    /// `POST /v1/incoming/{vm}/promote`.
    pub async fn promote_incoming(&self, vm: &str) -> Result<VmInfo, ClientError> {
        self.post(
            &format!("/v1/incoming/{vm}/promote"),
            &serde_json::json!({}),
        )
        .await
    }
    /// `DELETE /v1/incoming/{vm}`.
    pub async fn delete_incoming(&self, vm: &str) -> Result<serde_json::Value, ClientError> {
        self.delete(&format!("/v1/incoming/{vm}")).await
    }
    /// `GET /v1/audit?limit=N`: the newest `limit` audit records, oldest first (admins).
    pub async fn audit(&self, limit: u32) -> Result<Vec<crate::audit::AuditEntry>, ClientError> {
        self.get(&format!("/v1/audit?limit={limit}")).await
    }
    /// `POST /v1/migrations`.
    pub async fn start_migration(
        &self,
        req: &StartMigrationRequest,
    ) -> Result<MigrationRecord, ClientError> {
        self.post("/v1/migrations", req).await
    }
    /// `POST /v1/migrations/plan`.
    pub async fn plan_migration(
        &self,
        req: &crate::api::PlanRequest,
    ) -> Result<tern_policy::MigrationPlan, ClientError> {
        self.post("/v1/migrations/plan", req).await
    }
    /// `GET /v1/migrations`.
    pub async fn list_migrations(&self) -> Result<Vec<MigrationRecord>, ClientError> {
        self.get("/v1/migrations").await
    }
    /// `GET /v1/migrations/{id}?after=N` (events after sequence number N).
    pub async fn show_migration(&self, id: &str, after: u64) -> Result<MigrationView, ClientError> {
        self.get(&format!("/v1/migrations/{id}?after={after}"))
            .await
    }
    /// Sends an operator command to a running migration.
    pub async fn operator(
        &self,
        id: &str,
        command: OperatorCommand,
    ) -> Result<OperatorReply, ClientError> {
        match command {
            OperatorCommand::ForceComplete => {
                self.post(
                    &format!("/v1/migrations/{id}/force-complete"),
                    &serde_json::json!({}),
                )
                .await
            }
            OperatorCommand::Abort => {
                self.post(
                    &format!("/v1/migrations/{id}/abort"),
                    &serde_json::json!({}),
                )
                .await
            }
            OperatorCommand::SetBandwidth { bytes_per_s } => {
                self.post(
                    &format!("/v1/migrations/{id}/bandwidth"),
                    &BandwidthRequest { bytes_per_s },
                )
                .await
            }
        }
    }
    /// `GET /openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.get("/openapi.json").await
    }
}

/// The destination QEMU of a migration, reached through its agent's `/v1/incoming/{vm}/…`
/// routes.
#[derive(Debug, Clone)]
pub struct RemoteDestination {
    client: AgentClient,
    vm: String,
}

impl RemoteDestination {
    /// The incoming VM `vm` on the agent at `base_url`.
    pub fn new(base_url: &str, vm: &str) -> Self {
        Self {
            client: AgentClient::new(base_url),
            vm: vm.to_string(),
        }
    }

    /// The incoming VM `vm` on the agent `client` talks to (see [`AgentClient::for_peer`]).
    pub fn with_client(client: AgentClient, vm: &str) -> Self {
        Self {
            client,
            vm: vm.to_string(),
        }
    }

    fn path(&self, what: &str) -> String {
        format!("/v1/incoming/{}/{what}", self.vm)
    }
}

/// An agent that did not answer says nothing about its QEMU ([`EngineError::PeerUnreachable`]);
/// one that answered with an error does.
fn remote(e: ClientError) -> EngineError {
    match e {
        ClientError::Unreachable { .. } => EngineError::PeerUnreachable(e.to_string()),
        other => EngineError::Remote(other.to_string()),
    }
}

#[async_trait]
impl DestinationEndpoint for RemoteDestination {
    async fn facts(&self) -> Result<EndpointFacts, EngineError> {
        self.client.get(&self.path("facts")).await.map_err(remote)
    }
    async fn set_capabilities(
        &self,
        caps: &[MigrationCapabilityStatus],
    ) -> Result<(), EngineError> {
        let _: serde_json::Value = self
            .client
            .post(&self.path("capabilities"), caps)
            .await
            .map_err(remote)?;
        Ok(())
    }
    async fn set_parameters(&self, params: &MigrationParameters) -> Result<(), EngineError> {
        let _: serde_json::Value = self
            .client
            .post(&self.path("parameters"), params)
            .await
            .map_err(remote)?;
        Ok(())
    }
    /// The destination agent listens on the URI it reserved when it prepared the incoming
    /// QEMU (the same one it returned then, which the runner was built with): `uri` is not sent.
    async fn migrate_incoming(&self, _uri: &str) -> Result<(), EngineError> {
        let _: serde_json::Value = self
            .client
            .post(&self.path("start"), &NoBody {})
            .await
            .map_err(remote)?;
        Ok(())
    }
    async fn run_state(&self) -> Result<StatusInfo, EngineError> {
        self.client.get(&self.path("status")).await.map_err(remote)
    }
    async fn migration_info(&self) -> Result<MigrationInfo, EngineError> {
        self.client
            .get(&self.path("migration"))
            .await
            .map_err(remote)
    }
    async fn cont(&self) -> Result<(), EngineError> {
        let _: serde_json::Value = self
            .client
            .post(&self.path("cont"), &serde_json::json!({}))
            .await
            .map_err(remote)?;
        Ok(())
    }
    /// As [`Self::migrate_incoming`]: the destination agent recovers on its own URI.
    async fn migrate_recover(&self, _uri: &str) -> Result<(), EngineError> {
        let _: serde_json::Value = self
            .client
            .post(&self.path("recover"), &NoBody {})
            .await
            .map_err(remote)?;
        Ok(())
    }
    async fn migrate_pause(&self) -> Result<(), EngineError> {
        let _: serde_json::Value = self
            .client
            .post(&self.path("pause"), &serde_json::json!({}))
            .await
            .map_err(remote)?;
        Ok(())
    }
}
