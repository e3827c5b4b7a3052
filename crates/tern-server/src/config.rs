//! `server.toml`: where the controller listens, keeps its state and finds the agents.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors loading the configuration; each names the file and the bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is invalid (the message has line and column).
    #[error("{origin}: {message}")]
    Invalid {
        /// The file or `default`.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// The controller's configuration (see `docs/server.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address (loopback by default: put a TLS proxy in front until mTLS lands).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Database: a file path (SQLite) or a `postgres://` URL.
    #[serde(default = "default_database")]
    pub database: String,
    /// The bearer token file, created (0600) at first start.
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// A host without a heartbeat for this long is `unreachable` (s).
    #[serde(default = "default_timeout")]
    pub heartbeat_timeout_s: u64,
    /// How often the evacuation runner looks at running work (ms).
    #[serde(default = "default_tick")]
    pub runner_tick_ms: u64,
    /// Agents by host name: the only peers the controller talks to.
    #[serde(default)]
    pub agents: BTreeMap<String, String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7440))
}
fn default_database() -> String {
    "/var/lib/tern/controller.db".into()
}
fn default_token_file() -> PathBuf {
    PathBuf::from("/var/lib/tern/controller.token")
}
fn default_timeout() -> u64 {
    15
}
fn default_tick() -> u64 {
    500
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            database: default_database(),
            token_file: default_token_file(),
            heartbeat_timeout_s: default_timeout(),
            runner_tick_ms: default_tick(),
            agents: BTreeMap::new(),
        }
    }
}

impl ServerConfig {
    /// Parses `text` (from `origin`, for messages).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        if c.heartbeat_timeout_s == 0 || c.runner_tick_ms == 0 {
            return Err(ConfigError::Invalid {
                origin: origin.into(),
                message: "heartbeat_timeout_s and runner_tick_ms must be > 0".into(),
            });
        }
        for (host, url) in &c.agents {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    origin: origin.into(),
                    message: format!(
                        "agents.{host} = {url:?} is not a URL: give http://ADDRESS:PORT"
                    ),
                });
            }
        }
        Ok(c)
    }

    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_config_parses_and_bad_values_are_named() {
        let text = include_str!("../../../docs/server.toml");
        let c = ServerConfig::from_toml(text, "docs/server.toml").unwrap();
        assert!(c.listen.ip().is_loopback());
        let e = ServerConfig::from_toml("listen = \"127.0.0.1:1\"\nbogus = 1\n", "t").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = ServerConfig::from_toml("[agents]\nh1 = \"nope\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("agents.h1"), "{e}");
    }
}
