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
//!
//! [controller]                     # optional: send heartbeats to `tern server`
//! url = "http://127.0.0.1:7700"    # http on loopback only (the token travels in clear)
//! token_file = "/etc/tern/controller.token"   # mode 0600
//! interval_s = 5                   # 1..=60
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
    /// The cluster controller this agent reports its heartbeat to, if any. Without it the
    /// agent still runs migrations on its own (`tern migrate` talks to it directly).
    #[serde(default)]
    pub controller: Option<ControllerConfig>,
    /// Mutual TLS for the agent's API (and its calls to peers). Without it the agent serves
    /// plain HTTP, which is accepted only on a loopback `listen` address (a lab): anyone who
    /// can reach an unauthenticated agent controls its QEMUs, which run as root.
    #[serde(default)]
    pub tls: Option<AgentTlsConfig>,
    /// Whether migration streams into and out of this host are encrypted (QEMU
    /// `tls-creds-x509` with this host's certificate). Default: `required` when `[tls]` is
    /// configured, `off` in a loopback lab without `[tls]` (see
    /// [`AgentConfig::migration_tls_mode`]).
    #[serde(default)]
    pub migration_tls: Option<MigrationTlsMode>,
}

/// Whether a host's migration streams are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationTlsMode {
    /// Every stream in and out is TLS, authenticated by host certificates of the
    /// installation's CA; the destination accepts only the source host the migration names.
    Required,
    /// Plain TCP: guest memory crosses the network readable by anyone on the path. Only for
    /// labs and measurements.
    Off,
}

impl std::fmt::Display for MigrationTlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Required => "required",
            Self::Off => "off",
        })
    }
}

/// Where and how often the agent sends its heartbeat (`POST /v1/agents/heartbeat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The controller's base URL: `https://` (mutual TLS with this agent's host certificate
    /// from its `[tls]` section; the controller accepts a host certificate's heartbeat for
    /// that host only), or `http://` on a loopback address with the bearer token (the lab
    /// mode: the token travels in clear, so it must not leave the machine).
    pub url: String,
    /// `http://` only: file holding the controller's bearer token (the controller's
    /// `token_file`), read once at start; refused when others may read it, as the controller
    /// refuses its own. Not used over `https://`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Seconds between heartbeats (1..=60). The controller marks a host unreachable when
    /// its heartbeat is older than its timeout, so keep this well below that.
    #[serde(default = "default_heartbeat_interval_s")]
    pub interval_s: u64,
}

/// Seconds between heartbeats unless configured.
pub const DEFAULT_HEARTBEAT_INTERVAL_S: u64 = 5;

/// The heartbeat intervals a configuration may give, in seconds.
pub const HEARTBEAT_INTERVAL_S: std::ops::RangeInclusive<u64> = 1..=60;

fn default_heartbeat_interval_s() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_S
}

impl ControllerConfig {
    fn validate(&self, origin: &str, has_tls: bool) -> Result<(), AgentError> {
        if !HEARTBEAT_INTERVAL_S.contains(&self.interval_s) {
            return Err(AgentError::Config(format!(
                "{origin}: [controller] interval_s = {} is out of range: give {}..={} seconds",
                self.interval_s,
                HEARTBEAT_INTERVAL_S.start(),
                HEARTBEAT_INTERVAL_S.end()
            )));
        }
        let url = reqwest::Url::parse(&self.url).map_err(|e| {
            AgentError::Config(format!(
                "{origin}: [controller] url = {:?} is not a URL ({e}): use http://127.0.0.1:PORT",
                self.url
            ))
        })?;
        match url.scheme() {
            "https" if has_tls => return Ok(()),
            "https" => {
                return Err(AgentError::Config(format!(
                    "{origin}: [controller] url = {:?} is https:// but this agent has no [tls] \
                     section: add one (its host certificate authenticates the heartbeat) or use \
                     http://127.0.0.1:PORT with token_file for a lab controller",
                    self.url
                )));
            }
            "http" => {}
            _ => {
                return Err(AgentError::Config(format!(
                    "{origin}: [controller] url = {:?}: give https://HOST:PORT (mutual TLS) or \
                     http:// on a loopback address (lab mode with token_file)",
                    self.url
                )));
            }
        }
        if self.token_file.is_none() {
            return Err(AgentError::Config(format!(
                "{origin}: [controller] url = {:?} is http:// and needs token_file (the \
                 controller's token, mode 0600)",
                self.url
            )));
        }
        let loopback = match url.host_str() {
            Some("localhost") => true,
            Some(h) => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|a| a.is_loopback()),
            None => false,
        };
        if !loopback {
            return Err(AgentError::Config(format!(
                "{origin}: [controller] url = {:?} is not on loopback: without TLS the token \
                 would travel in clear; use http://127.0.0.1:PORT (or [::1], localhost)",
                self.url
            )));
        }
        Ok(())
    }
}

/// The `[tls]` section: where the host's certificate, key and the installation's CA are.
///
/// Either `pki_dir` (a directory `tern pki` manages; the certificate is the one issued to
/// `name`, by default this agent's `host`) or all of `cert`, `key` and `ca` (files copied to
/// the host by other means), never a mix: a half-specified section would silently pick files
/// from two places.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTlsConfig {
    /// A `tern pki` directory (`/etc/tern/pki`).
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// The host certificate's name in `pki_dir` (default: the agent's `host`).
    #[serde(default)]
    pub name: Option<String>,
    /// The host certificate (PEM), when not using `pki_dir`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM, mode 0600).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The installation's CA certificate (PEM): the only issuer clients may present.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The deny list of revoked serials (reloaded when it changes); with `pki_dir` it is the
    /// directory's `revoked.txt`.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

impl AgentTlsConfig {
    /// The files to serve and call peers with, for the agent of host `host`.
    pub fn files(&self, host: &str) -> Result<tern_pki::TlsFiles, AgentError> {
        match (&self.pki_dir, &self.cert, &self.key, &self.ca) {
            (Some(dir), None, None, None) => {
                let name = self.name.as_deref().unwrap_or(host);
                let mut files = tern_pki::TlsFiles::in_pki_dir(dir, "host", name);
                if let Some(revoked) = &self.revoked {
                    files.deny_list = Some(revoked.clone());
                }
                Ok(files)
            }
            (None, Some(cert), Some(key), Some(ca)) if self.name.is_none() => {
                Ok(tern_pki::TlsFiles {
                    ca_cert: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    deny_list: self.revoked.clone(),
                })
            }
            _ => Err(AgentError::Config(format!(
                "[tls] {self:?} is incomplete or mixed: give either pki_dir (and optionally \
                 name, default the agent's host) or all of cert, key and ca"
            ))),
        }
    }
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
    /// The effective migration TLS mode: as configured, else `required` with `[tls]` and
    /// `off` without (a loopback lab: [`AgentConfig::from_toml`] refuses anything else
    /// without `[tls]`).
    pub fn migration_tls_mode(&self) -> MigrationTlsMode {
        self.migration_tls.unwrap_or(if self.tls.is_some() {
            MigrationTlsMode::Required
        } else {
            MigrationTlsMode::Off
        })
    }

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
        if let Some(c) = &cfg.controller {
            c.validate(origin, cfg.tls.is_some())?;
        }
        match &cfg.tls {
            Some(tls) => {
                tls.files(&cfg.host)
                    .map_err(|e| AgentError::Config(format!("{origin}: {e}")))?;
            }
            None if !cfg.listen.ip().is_loopback() => {
                return Err(AgentError::Config(format!(
                    "{origin}: listen = \"{}\" is not a loopback address and there is no [tls] \
                     section: an agent without TLS would give anyone who reaches it control of \
                     its VMs; add [tls] (pki_dir = \"/etc/tern/pki\", see docs/agent.toml) or \
                     listen on 127.0.0.1 for a lab",
                    cfg.listen
                )));
            }
            None => {}
        }
        if cfg.migration_tls == Some(MigrationTlsMode::Required) && cfg.tls.is_none() {
            return Err(AgentError::Config(format!(
                "{origin}: migration_tls = \"required\" but there is no [tls] section: QEMU \
                 needs this host's certificate to encrypt migration streams; add [tls] \
                 (pki_dir = \"/etc/tern/pki\", made by `tern pki init` and `tern pki issue host \
                 {}`) or set migration_tls = \"off\" for a lab",
                cfg.host
            )));
        }
        for (host, peer) in &cfg.peers {
            let url = peer.url();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(AgentError::Config(format!(
                    "{origin}: peer {host} = {url:?} is not an agent URL: use http://ADDRESS:PORT"
                )));
            }
            if url.starts_with("https://") && cfg.tls.is_none() {
                return Err(AgentError::Config(format!(
                    "{origin}: peer {host} = {url:?} is https:// but there is no [tls] section: \
                     add [tls] (this host's certificate authenticates it to the peer) or use \
                     http:// for a lab peer"
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
        let ctl = c.controller.expect("the sample shows [controller]");
        assert_eq!(ctl.url, "http://127.0.0.1:7700");
        assert_eq!(ctl.interval_s, 5);
        assert_eq!(
            ctl.token_file,
            Some(PathBuf::from("/etc/tern/controller.token"))
        );
    }

    fn with_controller(table: &str) -> Result<AgentConfig, AgentError> {
        AgentConfig::from_toml(&format!("{GOOD}\n[controller]\n{table}\n"), "t")
    }

    #[test]
    fn controller_is_optional_and_defaults_its_interval() {
        assert_eq!(AgentConfig::from_toml(GOOD, "t").unwrap().controller, None);
        let c = with_controller("url = \"http://127.0.0.1:7700\"\ntoken_file = \"/t\"")
            .unwrap()
            .controller
            .unwrap();
        assert_eq!(c.interval_s, DEFAULT_HEARTBEAT_INTERVAL_S);
        for url in ["http://[::1]:7700", "http://localhost:7700/"] {
            let t = format!("url = \"{url}\"\ntoken_file = \"/t\"\ninterval_s = 60");
            assert!(with_controller(&t).is_ok(), "{url}");
        }
    }

    #[test]
    fn controller_urls_other_than_loopback_http_are_refused() {
        for (url, says) in [
            ("https://127.0.0.1:7700", "has no [tls] section"),
            ("ftp://127.0.0.1:7700", "give https://"),
            ("http://192.0.2.1:7700", "not on loopback"),
            ("http://controller.example:7700", "not on loopback"),
            ("127.0.0.1:7700", "is not a URL"),
            ("not a url", "is not a URL"),
        ] {
            let e = with_controller(&format!("url = \"{url}\"\ntoken_file = \"/t\""))
                .unwrap_err()
                .to_string();
            assert!(e.contains(url) && e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn heartbeat_intervals_outside_1_to_60_are_refused() {
        for bad in [0, 61] {
            let e = with_controller(&format!(
                "url = \"http://127.0.0.1:7700\"\ntoken_file = \"/t\"\ninterval_s = {bad}"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("interval_s = {bad}")) && e.contains("1..=60"),
                "{e}"
            );
        }
    }

    /// The issue's first exploit: `listen = "0.0.0.0:…"` without TLS used to be accepted.
    #[test]
    fn non_loopback_listen_without_tls_is_refused() {
        let open = GOOD.replace("127.0.0.1:7701", "0.0.0.0:7701");
        let e = AgentConfig::from_toml(&open, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("0.0.0.0:7701") && e.contains("[tls]"), "{e}");
        let with_tls = open.replace(
            "[migration]",
            "[tls]\npki_dir = \"/etc/tern/pki\"\n\n[migration]",
        );
        let c = AgentConfig::from_toml(&with_tls, "agent.toml").unwrap();
        let files = c.tls.as_ref().unwrap().files(&c.host).unwrap();
        assert_eq!(
            files.cert,
            PathBuf::from("/etc/tern/pki/issued/host/h1/cert.pem")
        );
        let ipv6 = GOOD.replace("127.0.0.1:7701", "[::]:7701");
        assert!(AgentConfig::from_toml(&ipv6, "t").is_err());
        let loopback6 = GOOD.replace("127.0.0.1:7701", "[::1]:7701");
        assert!(
            AgentConfig::from_toml(&loopback6, "t")
                .unwrap()
                .tls
                .is_none()
        );
    }

    #[test]
    fn tls_takes_a_pki_dir_or_explicit_files_never_a_mix() {
        let explicit = GOOD.replace(
            "[migration]",
            "[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\nca = \"/ca.pem\"\n\n[migration]",
        );
        let c = AgentConfig::from_toml(&explicit, "t").unwrap();
        let files = c.tls.as_ref().unwrap().files("h1").unwrap();
        assert_eq!(files.ca_cert, PathBuf::from("/ca.pem"));
        assert_eq!(files.deny_list, None);
        let mixed = GOOD.replace(
            "[migration]",
            "[tls]\npki_dir = \"/p\"\ncert = \"/c.pem\"\n\n[migration]",
        );
        let e = AgentConfig::from_toml(&mixed, "t").unwrap_err().to_string();
        assert!(
            e.contains("pki_dir") && e.contains("cert, key and ca"),
            "{e}"
        );
        let missing_key = GOOD.replace(
            "[migration]",
            "[tls]\ncert = \"/c.pem\"\nca = \"/ca.pem\"\n\n[migration]",
        );
        assert!(AgentConfig::from_toml(&missing_key, "t").is_err());
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

    #[test]
    fn migration_tls_is_required_with_tls_off_in_a_lab_and_required_needs_certificates() {
        let lab = AgentConfig::from_toml(GOOD, "t").unwrap();
        assert_eq!(lab.migration_tls_mode(), MigrationTlsMode::Off);
        let with_tls = GOOD.replace(
            "[migration]",
            "[tls]\npki_dir = \"/etc/tern/pki\"\n\n[migration]",
        );
        let c = AgentConfig::from_toml(&with_tls, "t").unwrap();
        assert_eq!(c.migration_tls_mode(), MigrationTlsMode::Required);
        let off = with_tls.replace(
            "memory_mib = 2048",
            "memory_mib = 2048\nmigration_tls = \"off\"",
        );
        let c = AgentConfig::from_toml(&off, "t").unwrap();
        assert_eq!(c.migration_tls_mode(), MigrationTlsMode::Off);
        let required_without_certs = GOOD.replace(
            "memory_mib = 2048",
            "memory_mib = 2048\nmigration_tls = \"required\"",
        );
        let e = AgentConfig::from_toml(&required_without_certs, "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("migration_tls = \"required\"") && e.contains("[tls]"),
            "{e}"
        );
        let bad = GOOD.replace(
            "memory_mib = 2048",
            "memory_mib = 2048\nmigration_tls = \"maybe\"",
        );
        let e = AgentConfig::from_toml(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("maybe") || e.contains("required"), "{e}");
    }
}
