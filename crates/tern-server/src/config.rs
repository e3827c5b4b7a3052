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
    /// Listen address (loopback by default). A non-loopback address needs `[tls]`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Database: a file path (SQLite) or a `postgres://` URL.
    #[serde(default = "default_database")]
    pub database: String,
    /// The bearer token file, created (0600) at first start; used only without `[tls]`
    /// (the loopback lab mode).
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
    /// Mutual TLS with the installation's CA (`tern pki`). Without it the controller runs in
    /// the loopback-only bearer-token lab mode.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// Several controllers on one PostgreSQL (issue 12): this controller's id and lease
    /// timing. Used only with a `postgres://` database.
    #[serde(default)]
    pub ha: HaSection,
}

/// `[ha]` of `server.toml`: leader election among controllers sharing one PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// This controller's name in the lease (default: the machine's host name and the port).
    pub id: Option<String>,
    /// The URL clients should use for this controller, named by standbys when they refuse a
    /// write (default: from `listen`).
    pub advertise_url: Option<String>,
    /// How long a lease stays valid after it was written (ms).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_ms: u64,
    /// How often the leader renews and standbys try to take over (ms).
    #[serde(default = "default_lease_renew")]
    pub lease_renew_ms: u64,
    /// How long before its lease could expire the leader stops acting (ms): more than the
    /// clock skew between controllers.
    #[serde(default = "default_lease_margin")]
    pub lease_margin_ms: u64,
}

fn default_lease_ttl() -> u64 {
    crate::lease::LeaseSettings::default().ttl_ms
}
fn default_lease_renew() -> u64 {
    crate::lease::LeaseSettings::default().renew_every_ms
}
fn default_lease_margin() -> u64 {
    crate::lease::LeaseSettings::default().margin_ms
}

impl Default for HaSection {
    fn default() -> Self {
        Self {
            id: None,
            advertise_url: None,
            lease_ttl_ms: default_lease_ttl(),
            lease_renew_ms: default_lease_renew(),
            lease_margin_ms: default_lease_margin(),
        }
    }
}

impl HaSection {
    /// The lease timing.
    pub fn settings(&self) -> crate::lease::LeaseSettings {
        crate::lease::LeaseSettings {
            ttl_ms: self.lease_ttl_ms,
            renew_every_ms: self.lease_renew_ms,
            margin_ms: self.lease_margin_ms,
        }
    }
}

/// `[tls]` of `server.toml`: either a PKI directory made by `tern pki` (and the name of the
/// controller's host certificate in it), or explicit `cert`, `key` and `ca` paths.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// A `tern pki` directory: the CA, `issued/host/NAME/{cert,key}.pem` and `revoked.txt`.
    pub pki_dir: Option<PathBuf>,
    /// The controller's host certificate name in `pki_dir` (default `controller`).
    pub name: Option<String>,
    /// The controller's certificate (PEM), instead of `pki_dir`.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM, 0600), instead of `pki_dir`.
    pub key: Option<PathBuf>,
    /// The installation CA certificate clients must be issued by, instead of `pki_dir`.
    pub ca: Option<PathBuf>,
    /// The deny list of revoked serials (default: `pki_dir`/revoked.txt; none with explicit
    /// paths unless given).
    pub deny_list: Option<PathBuf>,
    /// With `pki_dir`: the user certificate (`issued/user/NAME`, role operator) the controller
    /// presents to `https://` agents, whose API gives starting and aborting migrations to
    /// operators (`tern pki issue user controller --role operator`). Without it `https://`
    /// agents are refused at start.
    #[serde(default)]
    pub agent_client_user: Option<String>,
}

impl TlsSection {
    /// The client files for calling `https://` agents (`agent_client_user` in `pki_dir`).
    pub fn agent_client_files(&self) -> Result<Option<tern_pki::TlsFiles>, String> {
        match (&self.agent_client_user, &self.pki_dir) {
            (None, _) => Ok(None),
            (Some(user), Some(dir)) => {
                let mut f = tern_pki::TlsFiles::in_pki_dir(dir, "user", user);
                f.deny_list = self.deny_list.clone().or(f.deny_list);
                Ok(Some(f))
            }
            (Some(user), None) => Err(format!(
                "[tls] agent_client_user = {user:?} needs pki_dir (the user certificate is \
                 issued/user/{user} in it)"
            )),
        }
    }

    /// The files to serve with, or why the section is incomplete.
    pub fn files(&self) -> Result<tern_pki::TlsFiles, String> {
        match (&self.pki_dir, &self.cert, &self.key, &self.ca) {
            (Some(dir), None, None, None) => {
                let name = self.name.as_deref().unwrap_or("controller");
                let mut f = tern_pki::TlsFiles::in_pki_dir(dir, "host", name);
                if let Some(d) = &self.deny_list {
                    f.deny_list = Some(d.clone());
                }
                Ok(f)
            }
            (None, Some(cert), Some(key), Some(ca)) => Ok(tern_pki::TlsFiles {
                ca_cert: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                deny_list: self.deny_list.clone(),
            }),
            _ => Err(format!(
                "[tls] needs either pki_dir (with an optional name) or all of cert, key and ca, \
                 not a mix; got pki_dir={:?} cert={:?} key={:?} ca={:?}",
                self.pki_dir, self.cert, self.key, self.ca
            )),
        }
    }
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
            tls: None,
            ha: HaSection::default(),
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
        c.ha.settings()
            .validate()
            .map_err(|message| ConfigError::Invalid {
                origin: origin.into(),
                message: format!("[ha]: {message}"),
            })?;
        if let Some(t) = &c.tls {
            t.files().map_err(|message| ConfigError::Invalid {
                origin: origin.into(),
                message,
            })?;
        }
        Ok(c)
    }

    /// Whether several controllers may share the database (PostgreSQL): then one leads at
    /// a time, elected by a lease.
    pub fn is_shared_database(&self) -> bool {
        self.database.starts_with("postgres://") || self.database.starts_with("postgresql://")
    }

    /// This controller's name in the lease: `[ha] id` (or host name:port) and its URL.
    pub fn lease_holder(&self, bound: SocketAddr) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let url = self
            .ha
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{bound}"));
        let id = self.ha.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "controller".into());
            format!("{host}:{}", bound.port())
        });
        format!("{id} {url}")
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
        let e = ServerConfig::from_toml("[tls]\ncert = \"/c\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("pki_dir"), "{e}");
        let c = ServerConfig::from_toml("[tls]\npki_dir = \"/p\"\n", "t").unwrap();
        let f = c.tls.unwrap().files().unwrap();
        assert_eq!(f.cert, PathBuf::from("/p/issued/host/controller/cert.pem"));
    }

    #[test]
    fn ha_lease_timing_is_checked_and_the_holder_names_id_and_url() {
        let e = ServerConfig::from_toml(
            "[ha]
lease_ttl_ms = 1000
",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("[ha]: lease_ttl_ms = 1000"), "{e}");
        let c = ServerConfig::from_toml(
            "database = \"postgres://tern@db/tern\"\n[ha]\nid = \"ctl-a\"\n",
            "t",
        )
        .unwrap();
        assert!(c.is_shared_database());
        let bound: SocketAddr = "127.0.0.1:7440".parse().unwrap();
        assert_eq!(c.lease_holder(bound), "ctl-a http://127.0.0.1:7440");
        assert!(!ServerConfig::default().is_shared_database());
    }
}
