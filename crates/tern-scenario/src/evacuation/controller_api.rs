//! The few controller routes a lab evacuation uses, over HTTP with the controller's bearer
//! token (loopback lab mode), decoded into `tern-server`'s own types so that a change of the
//! API breaks this at compile time rather than at run time.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_server::controller::{HostPage, MigrationView};
use tern_server::evacuation::{EvacuateRequest, EvacuateResponse, EvacuationView};
use tern_server::model::{HostRecord, VmRecord};

/// An answer of the controller that is not a success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerCallError {
    /// No answer (not running, restarting, timed out).
    #[error("controller {url} did not answer: {reason}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// What the client saw.
        reason: String,
    },
    /// An error status with the controller's error text.
    #[error("controller answered {status} to {url}: {message}")]
    Refused {
        /// The URL called.
        url: String,
        /// HTTP status.
        status: u16,
        /// The body (the controller's JSON error).
        message: String,
    },
    /// A success whose body is not what the API describes.
    #[error("controller sent an invalid answer to {url}: {reason}")]
    Invalid {
        /// The URL called.
        url: String,
        /// The decoding error.
        reason: String,
    },
}

/// A client of one controller.
#[derive(Debug, Clone)]
pub struct ControllerApi {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ControllerApi {
    /// A client of the controller at `base` (`http://127.0.0.1:PORT`) using `token`.
    pub fn new(base: &str, token: String) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    async fn decode<T: DeserializeOwned>(
        url: String,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ControllerCallError> {
        let resp = resp.map_err(|e| ControllerCallError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ControllerCallError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if !status.is_success() {
            return Err(ControllerCallError::Refused {
                url,
                status: status.as_u16(),
                message: text.chars().take(2000).collect(),
            });
        }
        serde_json::from_str(&text).map_err(|e| ControllerCallError::Invalid {
            url,
            reason: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ControllerCallError> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).bearer_auth(&self.token).send().await;
        Self::decode(url, resp).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ControllerCallError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await;
        Self::decode(url, resp).await
    }

    /// `GET /v1/hosts` (first page: a lab has a handful of hosts).
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ControllerCallError> {
        Ok(self.get::<HostPage>("/v1/hosts?limit=1000").await?.hosts)
    }

    /// `GET /v1/vms?host=`.
    pub async fn vms_on(&self, host: &str) -> Result<Vec<VmRecord>, ControllerCallError> {
        self.get(&format!("/v1/vms?host={host}")).await
    }

    /// `POST /v1/hosts/{host}/evacuate`.
    pub async fn evacuate(
        &self,
        host: &str,
        deadline_s: u64,
        dry_run: bool,
    ) -> Result<EvacuateResponse, ControllerCallError> {
        let req = EvacuateRequest {
            deadline: Some(tern_server::evacuation::DeadlineSpec::Seconds(
                i64::try_from(deadline_s).unwrap_or(i64::MAX),
            )),
            dry_run,
        };
        self.post(&format!("/v1/hosts/{host}/evacuate"), &req).await
    }

    /// `GET /v1/evacuations/{id}`.
    pub async fn evacuation(&self, id: &str) -> Result<EvacuationView, ControllerCallError> {
        self.get(&format!("/v1/evacuations/{id}")).await
    }

    /// `GET /v1/migrations/{id}` with its event history.
    pub async fn migration(&self, id: &str) -> Result<MigrationView, ControllerCallError> {
        self.get(&format!("/v1/migrations/{id}")).await
    }
}
