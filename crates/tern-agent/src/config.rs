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
//! [peers]                          # optional: other hosts' agents
//! h2 = "http://127.0.0.1:7702"
//! ```

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
    /// Other hosts' agents by host name (`h2 = "http://127.0.0.1:7702"`), for resolving a
    /// migration's destination; lab hosts are also found through the lab's discovery file.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
}

fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/tern/agent")
}

/// Per-host migration settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
