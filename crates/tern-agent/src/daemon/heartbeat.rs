//! The agent's heartbeat to the cluster controller (`POST /v1/agents/heartbeat`).
//!
//! Every `[controller] interval_s` the agent reports its host's facts and the guests that run
//! here; the controller plans evacuations from these reports and marks a host whose heartbeat
//! is too old `unreachable`. The body types mirror `tern-server`'s `Heartbeat` field for field
//! (the agent does not depend on the controller, nor the controller on the agent; the JSON is
//! the contract, checked by `tern-server`'s `heartbeat_compat` test). A controller that does
//! not answer never stops the agent: migrations go on, the failure is logged once per change
//! of state (not every tick), and the next tick tries again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_qemu::{PostCopyPermission, VmSpec};

use crate::api::HostFacts;
use crate::config::ControllerConfig;
use crate::host::VmRole;

use super::{Agent, Inner};

/// How long one heartbeat may take before it counts as failed.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// The controller's route for heartbeats, below its base URL.
pub const HEARTBEAT_PATH: &str = "/v1/agents/heartbeat";

/// The body of `POST /v1/agents/heartbeat` (the controller's `Heartbeat`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// This host's name (one of the controller's configured agents).
    pub host: String,
    /// What the controller needs to know of the host.
    pub facts: HeartbeatFacts,
    /// The guests running here; not the incoming halves of migrations, which the source
    /// host still reports.
    pub vms: Vec<VmReport>,
}

/// The host facts of a heartbeat (the controller's `HostFacts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatFacts {
    /// Memory offered to guests (MiB).
    pub memory_mib: u64,
    /// Memory still free for guests (MiB).
    pub free_memory_mib: u64,
    /// QEMU version (`10.0.2`).
    pub qemu_version: String,
    /// Migration capabilities this QEMU supports, by their QAPI names.
    pub migration_capabilities: Vec<String>,
    /// Whether this host's configuration permits post-copy.
    pub permit_post_copy: bool,
    /// Migration link rate in bytes/s, when known.
    pub link_bytes_per_s: Option<u64>,
    /// The agent's limit of concurrent outgoing migrations.
    pub max_outbound: u32,
    /// The agent's limit of concurrent incoming migrations.
    pub max_inbound: u32,
    /// Migrations leaving the host now.
    pub outbound_migrations: u32,
    /// Migrations arriving now.
    pub inbound_migrations: u32,
}

/// One guest in a heartbeat (the controller's `VmReport`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    /// VM name.
    pub name: String,
    /// Guest memory (MiB).
    pub memory_mib: u64,
    /// SLA class from the VM's spec.
    pub sla_class: String,
    /// Whether the VM's spec lets tern switch it to post-copy.
    pub post_copy_allowed: bool,
    /// The last measured dirty rate (bytes/s), when the agent has one.
    pub dirty_bytes_per_s: Option<u64>,
}

/// Builds the heartbeat from the host's facts and its guests (pure). Only VMs with the
/// `running` role are reported: an incoming QEMU is the destination half of a migration the
/// source host still reports. `dirty_bytes_per_s` gives the rates measured so far by VM name;
/// a VM without one is reported with none (the controller's planner then assumes one).
pub fn heartbeat_body(
    facts: &HostFacts,
    vms: &[(VmSpec, VmRole)],
    dirty_bytes_per_s: &BTreeMap<String, u64>,
) -> Heartbeat {
    Heartbeat {
        host: facts.host.clone(),
        facts: HeartbeatFacts {
            memory_mib: facts.memory_mib,
            free_memory_mib: facts.free_memory_mib,
            qemu_version: facts.qemu_version.clone(),
            migration_capabilities: facts
                .migration_capabilities
                .iter()
                .map(|c| c.as_str().to_string())
                .collect(),
            permit_post_copy: facts.migration.permit_post_copy,
            link_bytes_per_s: None,
            max_outbound: facts.migration.max_outbound,
            max_inbound: facts.migration.max_inbound,
            outbound_migrations: facts.outbound_migrations,
            inbound_migrations: facts.inbound_migrations,
        },
        vms: vms
            .iter()
            .filter(|(_, role)| *role == VmRole::Running)
            .map(|(spec, _)| VmReport {
                name: spec.name.clone(),
                memory_mib: spec.memory_mib,
                sla_class: spec.migration.sla_class.clone(),
                post_copy_allowed: spec.migration.post_copy == PostCopyPermission::Allowed,
                dirty_bytes_per_s: dirty_bytes_per_s.get(&spec.name).copied(),
            })
            .collect(),
    }
}

/// Why a heartbeat could not be sent or the token not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The token file is missing, unreadable, readable by others or empty.
    #[error("controller token file {path}: {message}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the heartbeat's HTTP client: {0}")]
    Client(reqwest::Error),
    /// The mutual-TLS client for an `https://` controller could not be built.
    #[error("cannot reach controller {url} over mutual TLS: {message}")]
    Tls {
        /// The controller URL.
        url: String,
        /// What is missing or wrong.
        message: String,
    },
    /// The controller did not answer (refused, timed out, connection broken).
    #[error("controller {url} did not answer: {source}")]
    Unreachable {
        /// The heartbeat URL.
        url: String,
        /// What the client saw.
        source: reqwest::Error,
    },
    /// The controller answered with an error status.
    #[error("controller {url} refused the heartbeat: HTTP {status}: {body}")]
    Refused {
        /// The heartbeat URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The controller's error body (its JSON error names the reason).
        body: String,
    },
}

/// Reads the controller's bearer token. Like the controller, refuses a file others may read
/// (group or world bits set): the token is the controller's admin credential in lab mode.
pub fn read_token(path: &Path) -> Result<String, HeartbeatError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |message: String| HeartbeatError::Token {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| err(format!("{e} (give the controller's token_file, mode 0600)")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "mode {mode:o} lets others read it: chmod 600 it"
        )));
    }
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(err("is empty: copy the controller's token into it".into()));
    }
    Ok(token.to_string())
}

/// Whether the last heartbeat went through, so that only changes are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No heartbeat sent yet.
    Unknown,
    /// The last heartbeat was accepted.
    Up,
    /// The last heartbeat failed.
    Down,
}

/// Sends heartbeats to one controller; remembers the last outcome to log changes only.
#[derive(Debug)]
pub struct HeartbeatSender {
    client: reqwest::Client,
    url: String,
    /// The bearer token (loopback http); `None` over mutual TLS.
    token: Option<String>,
    state: LinkState,
    last_error: Option<String>,
}

impl HeartbeatSender {
    /// A sender to the controller at `base_url` (`http://127.0.0.1:7700`) with its token.
    pub fn new(base_url: &str, token: String) -> Result<Self, HeartbeatError> {
        let client = reqwest::Client::builder()
            .timeout(HEARTBEAT_TIMEOUT)
            .build()
            .map_err(HeartbeatError::Client)?;
        Ok(Self {
            client,
            url: format!("{}{HEARTBEAT_PATH}", base_url.trim_end_matches('/')),
            token: Some(token),
            state: LinkState::Unknown,
            last_error: None,
        })
    }

    /// A sender from the agent's `[controller]` section: over `https://` with the host's
    /// certificate (`tls`, the agent's `[tls]` files), else over loopback `http://` with the
    /// token file's bearer token.
    pub fn from_config(
        config: &ControllerConfig,
        tls: Option<&tern_pki::TlsFiles>,
    ) -> Result<Self, HeartbeatError> {
        if config.url.starts_with("https://") {
            let files = tls.ok_or_else(|| HeartbeatError::Tls {
                url: config.url.clone(),
                message: "no [tls] section: the host certificate authenticates the heartbeat"
                    .into(),
            })?;
            return Self::over_mtls(&config.url, files);
        }
        let path = config
            .token_file
            .as_deref()
            .ok_or_else(|| HeartbeatError::Token {
                path: PathBuf::new(),
                message: "no token_file given for an http:// controller".into(),
            })?;
        Self::new(&config.url, read_token(path)?)
    }

    /// A sender to an `https://` controller authenticated by this host's certificate (no
    /// token: the controller takes the host name from the certificate and accepts a
    /// heartbeat for that host only).
    pub fn over_mtls(base_url: &str, files: &tern_pki::TlsFiles) -> Result<Self, HeartbeatError> {
        let tls_err = |message: String| HeartbeatError::Tls {
            url: base_url.to_string(),
            message,
        };
        let client = tern_pki::reqwest_client_builder(files)
            .map_err(|e| tls_err(e.to_string()))?
            .timeout(HEARTBEAT_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| tls_err(e.to_string()))?;
        Ok(Self {
            client,
            url: format!("{}{HEARTBEAT_PATH}", base_url.trim_end_matches('/')),
            token: None,
            state: LinkState::Unknown,
            last_error: None,
        })
    }

    /// The outcome of the last heartbeat.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Posts one heartbeat.
    pub async fn send(&self, body: &Heartbeat) -> Result<(), HeartbeatError> {
        let mut req = self.client.post(&self.url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        let resp = req
            .json(body)
            .send()
            .await
            .map_err(|source| HeartbeatError::Unreachable {
                url: self.url.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(HeartbeatError::Refused {
            url: self.url.clone(),
            status: status.as_u16(),
            body: body.chars().take(500).collect(),
        })
    }

    /// One tick: sends `body` and logs only a change (first success, failure, a different
    /// failure, recovery). Returns the new state; never fails.
    pub async fn tick(&mut self, body: &Heartbeat) -> LinkState {
        match self.send(body).await {
            Ok(()) => {
                if self.state != LinkState::Up {
                    tracing::info!(url = %self.url, "controller accepts this agent's heartbeat");
                }
                self.state = LinkState::Up;
                self.last_error = None;
            }
            Err(e) => {
                let text = e.to_string();
                if self.state != LinkState::Down || self.last_error.as_deref() != Some(&text) {
                    tracing::warn!(error = %text, "heartbeat to the controller failed; the agent keeps working and retries every interval");
                }
                self.state = LinkState::Down;
                self.last_error = Some(text);
            }
        }
        self.state
    }
}

impl Agent {
    /// The heartbeat this agent would send now.
    pub async fn heartbeat(&self) -> Heartbeat {
        self.heartbeat_with(&BTreeMap::new()).await
    }

    /// The heartbeat with the guests' measured dirty rates (bytes/s, by VM name).
    pub async fn heartbeat_with(&self, dirty_bytes_per_s: &BTreeMap<String, u64>) -> Heartbeat {
        let facts = self.facts().await;
        let h = &self.inner.host;
        let vms: Vec<(VmSpec, VmRole)> = h
            .names()
            .iter()
            .filter_map(|n| Some((h.spec(n).ok()?, h.role(n).ok()?)))
            .collect();
        let mut body = heartbeat_body(&facts, &vms, dirty_bytes_per_s);
        body.facts.link_bytes_per_s = host_link_bytes_per_s(self.inner.config.peers.values());
        body
    }
}

/// The host's migration link rate as far as its configuration knows it: the fastest link to
/// any peer (the host's egress carries at least that). `None` when no peer has a rate: the
/// controller's planner then assumes its default and says so. Without this the planner of a
/// shaped lab assumed 1 Gbit/s and predicted an evacuation several times too short.
pub fn host_link_bytes_per_s<'a>(
    peers: impl Iterator<Item = &'a crate::config::PeerConfig>,
) -> Option<u64> {
    peers.filter_map(|p| p.link_bytes_per_s()).max()
}

/// Sends a heartbeat every `interval` until the agent is gone. Holds the agent weakly so that
/// the task does not keep it alive.
/// Also starts the guests' dirty-rate sampler ([`super::dirty_rate`]), whose last
/// measurements every heartbeat carries.
pub(super) async fn run(agent: Weak<Inner>, mut sender: HeartbeatSender, interval: Duration) {
    let rates = super::dirty_rate::DirtyRates::default();
    let sampler = tokio::spawn(super::dirty_rate::sample(agent.clone(), rates.clone()));
    let _stop_sampler = AbortOnDrop(sampler);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = agent.upgrade() else {
            return;
        };
        let body = Agent { inner }
            .heartbeat_with(&super::dirty_rate::snapshot(&rates))
            .await;
        sender.tick(&body).await;
    }
}

/// Stops a task when the heartbeat loop ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostMigrationConfig;
    use tern_qmp::MigrationCapability;

    #[test]
    fn host_link_rate_is_the_fastest_configured_peer_link() {
        use crate::config::PeerConfig;
        let url = |u: &str| PeerConfig::Url(u.into());
        let rated = |r: u64| PeerConfig::Detailed {
            url: "http://127.0.0.1:1".into(),
            link_bytes_per_s: Some(r),
        };
        assert_eq!(host_link_bytes_per_s([url("http://a")].iter()), None);
        assert_eq!(host_link_bytes_per_s(std::iter::empty()), None);
        assert_eq!(
            host_link_bytes_per_s([rated(25_000_000), url("x"), rated(50_000_000)].iter()),
            Some(50_000_000)
        );
    }

    pub(crate) fn facts() -> HostFacts {
        HostFacts {
            host: "h1".into(),
            migration_address: "198.18.0.1".parse().unwrap(),
            netns: None,
            memory_mib: 4096,
            committed_memory_mib: 1536,
            free_memory_mib: 2560,
            machine_available_mib: 8000,
            qemu_version: "10.0.2".into(),
            qemu_path: "/usr/bin/qemu-system-x86_64".into(),
            migration_capabilities: [
                MigrationCapability::from_wire("postcopy-ram"),
                MigrationCapability::from_wire("multifd"),
            ]
            .into_iter()
            .collect(),
            qemu_commands: vec![],
            accelerator: "tcg".into(),
            kvm_device: false,
            migration: HostMigrationConfig {
                permit_post_copy: false,
                max_outbound: 3,
                max_inbound: 1,
                ..HostMigrationConfig::default()
            },
            outbound_migrations: 1,
            inbound_migrations: 1,
        }
    }

    fn spec(name: &str, memory_mib: u64, sla: &str, post_copy: &str) -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "memory_mib": memory_mib, "vcpus": 1,
            "kernel": "/k", "initrd": "/i", "cmdline": "", "accelerator": "tcg",
            "migration": { "sla_class": sla, "post_copy": post_copy },
        }))
        .unwrap()
    }

    #[test]
    fn the_body_reports_running_vms_from_their_specs_and_the_host_limits() {
        let vms = vec![
            (spec("web", 1024, "gold", "allowed"), VmRole::Running),
            (spec("db", 512, "bronze", "forbidden"), VmRole::Running),
            (spec("arriving", 256, "gold", "allowed"), VmRole::Incoming),
        ];
        let dirty = BTreeMap::from([("web".to_string(), 5_000_000)]);
        let hb = heartbeat_body(&facts(), &vms, &dirty);
        assert_eq!(hb.host, "h1");
        assert_eq!(hb.facts.memory_mib, 4096);
        assert_eq!(hb.facts.free_memory_mib, 2560);
        assert_eq!(hb.facts.qemu_version, "10.0.2");
        let mut caps = hb.facts.migration_capabilities.clone();
        caps.sort();
        assert_eq!(caps, vec!["multifd", "postcopy-ram"]);
        assert!(!hb.facts.permit_post_copy);
        assert_eq!((hb.facts.max_outbound, hb.facts.max_inbound), (3, 1));
        assert_eq!(
            (hb.facts.outbound_migrations, hb.facts.inbound_migrations),
            (1, 1)
        );
        assert_eq!(
            hb.vms,
            vec![
                VmReport {
                    name: "web".into(),
                    memory_mib: 1024,
                    sla_class: "gold".into(),
                    post_copy_allowed: true,
                    dirty_bytes_per_s: Some(5_000_000),
                },
                VmReport {
                    name: "db".into(),
                    memory_mib: 512,
                    sla_class: "bronze".into(),
                    post_copy_allowed: false,
                    dirty_bytes_per_s: None,
                },
            ]
        );
    }

    #[test]
    fn token_files_others_can_read_or_empty_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret-token-value\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&path).unwrap_err().to_string();
        assert!(e.contains("644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "s3cret-token-value");
        std::fs::write(&path, "  \n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("empty"));
        let missing = dir.path().join("none");
        assert!(
            read_token(&missing)
                .unwrap_err()
                .to_string()
                .contains("none")
        );
    }

    #[tokio::test]
    async fn an_absent_controller_is_a_down_link_not_an_error() {
        // A port nobody listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = HeartbeatSender::new(&format!("http://127.0.0.1:{port}/"), "t".into()).unwrap();
        assert_eq!(s.state(), LinkState::Unknown);
        let body = heartbeat_body(&facts(), &[], &BTreeMap::new());
        assert_eq!(s.tick(&body).await, LinkState::Down);
        assert_eq!(s.tick(&body).await, LinkState::Down);
        assert!(matches!(
            s.send(&body).await,
            Err(HeartbeatError::Unreachable { .. })
        ));
    }
}
