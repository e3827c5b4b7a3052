//! The agent's configuration file (`/etc/tern/agent.toml` by default).
//!
//! ```toml
//! host = "h1"
//! listen = "127.0.0.1:7701"
//! netns = "tern-lab-h1"            # optional: run QEMU inside this network namespace
//! migration_address = "198.18.0.1" # where incoming migration streams arrive
//! memory_mib = 4096                # memory offered to guests
//! runtime_dir = "/run/tern/agent-h1"
//!
//! [migration]
//! permit_post_copy = true          # Nova's live_migration_permit_post_copy, per host
//! max_outbound = 2                 # concurrent outgoing migrations
//! max_inbound = 2                  # concurrent incoming migrations
//! bandwidth_mib_per_s = 0          # 0 = no cap
//! port_min = 49152                 # port range for incoming migration streams
//! port_max = 49215
//!
//! [peers]                          # other hosts' agents: migration destinations
//! h2 = "http://127.0.0.1:7702"
//! h3 = { url = "http://127.0.0.1:7703", link_bytes_per_s = 25000000 }
//! ```
//!
//! A commented sample is `docs/agent.toml`. Peers come only from here, never from a request:
//! an API client names a destination *host*, and the agent looks its URL up in `[peers]`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::AgentError;

/// Where the agent reads its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tern/agent.toml";

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The host's name as operators use it (`tern migrate vm --to h2`).
    pub host: String,
    /// HTTP listen address of the agent's API.
    pub listen: SocketAddr,
    /// Network namespace QEMU runs in, if any (lab hosts).
    #[serde(default)]
    pub netns: Option<String>,
    /// Address incoming migration streams are received on.
    pub migration_address: IpAddr,
    /// Memory offered to guests, in MiB.
    pub memory_mib: u64,
    /// Directory for QEMU sockets, serial logs and the agent's database.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// Migration limits and permissions of this host.
    #[serde(default)]
    pub migration: HostMigrationConfig,
    /// Other hosts' agents by host name (`h2 = "http://127.0.0.1:7702"` or
    /// `h2 = { url = "…", link_bytes_per_s = N }`): the only destinations a migration may
    /// name. A client never supplies a URL (that would let it make the agent connect anywhere).
    #[serde(default)]
    pub peers: BTreeMap<String, PeerConfig>,
    /// Directories guest kernels, initrds (and later disks) must lie in. A VM spec naming a
    /// file outside them (after resolving `..` and symlinks) is refused: QEMU runs as root
    /// and would otherwise read any file a client names.
    #[serde(default = "default_image_dirs")]
    pub image_dirs: Vec<PathBuf>,
    /// Where the accelerator probe's verdict is cached (reported in `GET /v1/host`).
    #[serde(default = "default_accelerator_cache")]
    pub accelerator_cache: PathBuf,
}

/// Another host's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PeerConfig {
    /// Just its URL.
    Url(String),
    /// Its URL and what is known of the link to it.
    Detailed {
        /// The agent's base URL (`http://127.0.0.1:7702`).
        url: String,
        /// Rate of the link between this host and the peer, in bytes/s (a shaped lab link);
        /// the policy's estimate uses it when the migration request gives none.
        #[serde(default)]
        link_bytes_per_s: Option<u64>,
    },
}

impl PeerConfig {
    /// The peer agent's base URL.
    pub fn url(&self) -> &str {
        match self {
            Self::Url(u) | Self::Detailed { url: u, .. } => u,
        }
    }

    /// The link rate to the peer, when configured.
    pub fn link_bytes_per_s(&self) -> Option<u64> {
        match self {
            Self::Url(_) => None,
            Self::Detailed {
                link_bytes_per_s, ..
            } => *link_bytes_per_s,
        }
    }
}

fn default_image_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from(DEFAULT_CACHE_DIR)]
}

fn default_accelerator_cache() -> PathBuf {
    Path::new(DEFAULT_CACHE_DIR).join("accelerator.json")
}

/// tern's cache directory (guest images, the accelerator verdict), as `tern guest build`
/// uses it by default.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/tern";

fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/tern/agent")
}

/// Per-host migration settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostMigrationConfig {
    /// Whether migrations into or out of this host may use post-copy. Nova keeps this switch
    /// in each compute host's `nova.conf` (`live_migration_permit_post_copy`); so do we, so
    /// that hosts with VFIO devices or without userfaultfd can opt out.
    #[serde(default = "yes")]
    pub permit_post_copy: bool,
    /// Concurrent outgoing migrations (Nova: 1, KubeVirt: 2 per node, vdsm: 2).
    #[serde(default = "two")]
    pub max_outbound: u32,
    /// Concurrent incoming migrations.
    #[serde(default = "two")]
    pub max_inbound: u32,
    /// Migration bandwidth cap in MiB/s; 0 means none.
    #[serde(default)]
    pub bandwidth_mib_per_s: u64,
    /// Lowest port for incoming migration streams.
    #[serde(default = "port_min")]
    pub port_min: u16,
    /// Highest port for incoming migration streams.
    #[serde(default = "port_max")]
    pub port_max: u16,
    /// How long tern keeps trying to recover a post-copy migration whose network failed,
    /// in seconds, before it declares it stranded (both QEMUs kept for the operator).
    #[serde(default = "recovery_window_s")]
    pub postcopy_recovery_window_s: u64,
}

fn recovery_window_s() -> u64 {
    600
}

fn yes() -> bool {
    true
}
fn two() -> u32 {
    2
}
fn port_min() -> u16 {
    49152
}
fn port_max() -> u16 {
    49215
}

impl Default for HostMigrationConfig {
    fn default() -> Self {
        Self {
            permit_post_copy: true,
            max_outbound: 2,
            max_inbound: 2,
            bandwidth_mib_per_s: 0,
            port_min: port_min(),
            port_max: port_max(),
            postcopy_recovery_window_s: recovery_window_s(),
        }
    }
}

impl HostMigrationConfig {
    /// The host's bandwidth cap in bytes per second, if any.
    pub fn bandwidth_cap_bytes_per_s(&self) -> Option<u64> {
        (self.bandwidth_mib_per_s > 0).then(|| self.bandwidth_mib_per_s * 1024 * 1024)
    }

    fn validate(&self) -> Result<(), AgentError> {
        if self.port_min == 0 || self.port_min > self.port_max {
            return Err(AgentError::Config(format!(
                "migration port range {}..={} is invalid: port_min must be between 1 and port_max",
                self.port_min, self.port_max
            )));
        }
        if self.max_outbound == 0 || self.max_inbound == 0 {
            return Err(AgentError::Config(format!(
                "max_outbound = {} / max_inbound = {}: both must be at least 1",
                self.max_outbound, self.max_inbound
            )));
        }
        Ok(())
    }
}

impl AgentConfig {
    /// Parses a configuration, reporting the line and column of a syntax or type error.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, AgentError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| {
            let pos = e
                .span()
                .map(|s| line_col(text, s.start))
                .map(|(l, c)| format!(" at line {l}, column {c}"))
                .unwrap_or_default();
            AgentError::Config(format!(
                "invalid agent configuration {origin}{pos}: {}",
                e.message()
            ))
        })?;
        cfg.migration.validate()?;
        for (host, peer) in &cfg.peers {
            let url = peer.url();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(AgentError::Config(format!(
                    "{origin}: peer {host} = {url:?} is not an agent URL: use http://ADDRESS:PORT"
                )));
            }
        }
        if cfg.image_dirs.is_empty() {
            return Err(AgentError::Config(format!(
                "{origin}: image_dirs = [] allows no guest image: list the directories kernels \
                 and initrds may be read from (default [\"{DEFAULT_CACHE_DIR}\"])"
            )));
        }
        if cfg.memory_mib == 0 {
            return Err(AgentError::Config(format!(
                "{origin}: memory_mib = 0 is invalid: give the memory this host offers to guests"
            )));
        }
        Ok(cfg)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            AgentError::Config(format!(
                "cannot read agent configuration {}: {e} (write one or pass --config PATH)",
                path.display()
            ))
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host = "h1"
listen = "127.0.0.1:7701"
netns = "tern-lab-h1"
migration_address = "198.18.0.1"
memory_mib = 2048

[migration]
permit_post_copy = false
bandwidth_mib_per_s = 100
"#;

    #[test]
    fn parses_a_full_config_with_defaults() {
        let c = AgentConfig::from_toml(GOOD, "test").unwrap();
        assert_eq!(c.host, "h1");
        assert!(!c.migration.permit_post_copy);
        assert_eq!(c.migration.max_outbound, 2);
        assert_eq!(c.migration.bandwidth_cap_bytes_per_s(), Some(100 << 20));
        assert_eq!(c.runtime_dir, PathBuf::from("/run/tern/agent"));
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let bad = "host = \"h1\"\nlisten = 127.0.0.1:7701\n";
        let e = AgentConfig::from_toml(bad, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("column"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_with_position() {
        let bad = GOOD.replace("permit_post_copy", "permit_postcopy");
        let e = AgentConfig::from_toml(&bad, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("permit_postcopy"), "{e}");
        assert!(e.contains("line 9"), "{e}");
    }

    #[test]
    fn peers_take_a_url_or_a_table_with_the_link_rate() {
        let text = format!(
            "{GOOD}\n[peers]\nh2 = \"http://127.0.0.1:7702\"\n\
             h3 = {{ url = \"http://127.0.0.1:7703\", link_bytes_per_s = 25000000 }}\n"
        );
        let c = AgentConfig::from_toml(&text, "t").unwrap();
        assert_eq!(c.peers["h2"].url(), "http://127.0.0.1:7702");
        assert_eq!(c.peers["h2"].link_bytes_per_s(), None);
        assert_eq!(c.peers["h3"].link_bytes_per_s(), Some(25_000_000));
        let bad = format!("{GOOD}\n[peers]\nh2 = \"exec:id\"\n");
        let e = AgentConfig::from_toml(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("exec:id") && e.contains("http://"), "{e}");
    }

    /// The commented sample shipped in `docs/agent.toml` parses and says what it shows.
    #[test]
    fn the_sample_configuration_parses() {
        let text = include_str!("../../../docs/agent.toml");
        let c = AgentConfig::from_toml(text, "docs/agent.toml").unwrap();
        assert_eq!(c.host, "h1");
        assert!(c.peers.contains_key("h2"));
        assert_eq!(c.image_dirs, vec![PathBuf::from("/var/cache/tern")]);
        assert!(c.migration.permit_post_copy);
    }

    #[test]
    fn bad_values_are_explained() {
        let bad = GOOD.replace(
            "bandwidth_mib_per_s = 100",
            "port_min = 5000\nport_max = 4000",
        );
        let e = AgentConfig::from_toml(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("5000..=4000"), "{e}");
        let bad = GOOD.replace("memory_mib = 2048", "memory_mib = 0");
        assert!(
            AgentConfig::from_toml(&bad, "t")
                .unwrap_err()
                .to_string()
                .contains("memory_mib = 0")
        );
    }
}
