//! Lab lifecycle: build, persist, discover and tear down namespace-based hosts.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cmd::{self, in_netns, ip_in, netns_file, run};
use crate::error::LabError;
use crate::rate::LinkRate;
use crate::shaping;

/// Where lab state files live, one `<name>.json` per lab, so the `tern` CLI, agents and tests in
/// other processes can find a lab that someone else built. `/run` is a tmpfs: state never outlives
/// a reboot, and neither do network namespaces, so the two stay consistent.
pub const STATE_DIR: &str = "/run/tern/labs";
/// Every namespace of every lab starts with this, which is how `down_all` finds leftovers.
pub const NETNS_PREFIX: &str = "tern-";
/// Longest lab name: keeps namespace names short and readable in `ip netns list`.
pub const MAX_LAB_NAME_LEN: usize = 20;
/// Fewest hosts in a lab (a migration needs a source and a destination).
pub const MIN_HOSTS: usize = 2;
/// Most hosts in a lab (2 cores here; more hosts would only compete for them).
pub const MAX_HOSTS: usize = 8;
/// Name of the bridge in the switch namespace.
pub const BRIDGE: &str = "br0";
/// Name of each host's interface.
pub const HOST_IFACE: &str = "eth0";
/// Prefix length of the lab subnet 198.18.0.0/24 (RFC 2544 benchmarking range: never routed on
/// real networks, so lab traffic cannot leak anywhere even if a route were wrong).
pub const PREFIX_LEN: u8 = 24;
/// TCP settings of every lab host, so that a dead peer is noticed in seconds rather than
/// minutes (Linux defaults: 15 retransmissions ≈ 15 min for an established connection, 6 SYN
/// retries ≈ 2 min for a connect). A post-copy migration whose network fails must be paused
/// and recovered quickly: the guest on the destination stalls on every missing page
/// meanwhile. Real hosts should be tuned the same way on their migration network; QEMU's own
/// keep-alive defaults for migration sockets only arrived after 10.0.
pub const TCP_FAILURE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/tcp_retries2", "5"),
    ("net/ipv4/tcp_syn_retries", "2"),
    ("net/ipv4/tcp_keepalive_time", "5"),
    ("net/ipv4/tcp_keepalive_intvl", "1"),
    ("net/ipv4/tcp_keepalive_probes", "3"),
];

/// Applies [`TCP_FAILURE_SYSCTLS`] inside a namespace (these sysctls are per network
/// namespace).
fn tune_tcp_failure_detection(netns: &str) -> Result<(), LabError> {
    // /proc/sys/net shows the namespace of the process reading it, so a shell entered into
    // the namespace writes that namespace's values (no dependency on procps' sysctl).
    let script: String = TCP_FAILURE_SYSCTLS
        .iter()
        .map(|(key, value)| format!("echo {value} > /proc/sys/{key};"))
        .collect();
    crate::cmd::run("ip", &["netns", "exec", netns, "sh", "-c", &script])?;
    Ok(())
}

/// The lab subnet's first three octets.
const SUBNET_BASE: [u8; 3] = [198, 18, 0];
/// Version of the state file layout.
const STATE_FORMAT: u32 = 1;

/// What to build: `name` (namespaces are `tern-<name>-sw` and `tern-<name>-hN`), how many hosts,
/// and an optional rate limit (and delay, where the kernel has netem) on every host's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// Lab name: lowercase letters, digits and '-', at most [`MAX_LAB_NAME_LEN`] characters.
    pub name: String,
    /// Number of hosts, [`MIN_HOSTS`]..=[`MAX_HOSTS`].
    pub hosts: usize,
    /// Rate limit applied to every host link in both directions; `None` leaves links unshaped.
    pub link_rate: Option<LinkRate>,
    /// One-way delay added on every host link in both directions; needs the netem qdisc
    /// ([`netem_available`]), refused with a clear error where the kernel lacks it.
    pub link_delay: Option<Duration>,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            name: "tern".to_string(),
            hosts: 2,
            link_rate: None,
            link_delay: None,
        }
    }
}

/// How to cut a link ([`Lab::cut_link`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultMode {
    /// Silently drop every packet in both directions (a `blackhole` qdisc on both ends of the
    /// veth). Endpoints see no error, no RST, no carrier change: exactly a dead switch or a
    /// partitioned network, the case where QEMU's migration stalls until TCP gives up.
    Blackhole,
    /// Set the switch-side port administratively down: the host sees its carrier drop, like a
    /// pulled cable.
    LinkDown,
}

impl fmt::Display for FaultMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultMode::Blackhole => "blackhole",
            FaultMode::LinkDown => "link-down",
        })
    }
}

impl FromStr for FaultMode {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "blackhole" | "drop" => Ok(FaultMode::Blackhole),
            "link-down" | "linkdown" | "down" => Ok(FaultMode::LinkDown),
            _ => Err(LabError::InvalidFaultMode {
                value: s.to_string(),
            }),
        }
    }
}

/// Whether a host's link passes traffic, as observed from the kernel (not from the state file), so
/// a cut made by another process shows up too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "mode")]
pub enum LinkState {
    /// Traffic flows (subject to the rate limit).
    Up,
    /// The link is cut.
    Cut(FaultMode),
}

impl fmt::Display for LinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkState::Up => f.write_str("up"),
            LinkState::Cut(mode) => write!(f, "cut ({mode})"),
        }
    }
}

/// One lab host: a network namespace with `eth0` wired to a port of the lab switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabHost {
    name: String,
    netns: String,
    switch_netns: String,
    switch_port: String,
    address: Ipv4Addr,
    link_rate: Option<LinkRate>,
    #[serde(default)]
    link_delay_us: Option<u64>,
}

impl LabHost {
    /// Host name within the lab: `h1`, `h2`, …
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Network namespace name (`tern-<lab>-hN`), as `ip netns` knows it.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Path of the namespace file (`/run/netns/tern-<lab>-hN`), for `setns(2)` or tools that take
    /// a namespace path.
    pub fn netns_path(&self) -> PathBuf {
        netns_file(&self.netns)
    }

    /// The host's IPv4 address on the lab subnet (198.18.0.N for host hN).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The address with its prefix, e.g. `198.18.0.1/24`.
    pub fn address_cidr(&self) -> String {
        format!("{}/{}", self.address, PREFIX_LEN)
    }

    /// Rate limit currently configured on this host's link (both directions).
    pub fn link_rate(&self) -> Option<LinkRate> {
        self.link_rate
    }

    /// Delay currently configured on this host's link (only where netem exists).
    pub fn link_delay(&self) -> Option<Duration> {
        self.link_delay_us.map(Duration::from_micros)
    }

    /// Name of this host's port on the lab switch (`pN`, in the switch namespace).
    pub fn switch_port(&self) -> &str {
        &self.switch_port
    }

    /// A [`Command`] that runs `program` inside this host's namespace (`ip netns exec <ns>
    /// program`). `ip netns exec` execs the program in place, so the child's PID is the program's
    /// PID and killing it by PID works. QEMU, agents and test helpers are started through this.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Runs `f` on a fresh thread inside this host's namespace and returns its result. Sockets
    /// created in `f` live in the host's namespace and can be used from any thread afterwards,
    /// which is how in-process tests and helpers talk "from" a lab host without a child process.
    pub fn run_in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        in_netns(&self.netns, f)
    }

    /// Processes whose network namespace is this host's.
    pub fn processes(&self) -> Result<Vec<NetnsProcess>, LabError> {
        netns_processes(&self.netns)
    }
}

/// A process found inside a lab namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsProcess {
    /// Process ID.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub comm: String,
}

/// Live status of one host, for `tern lab status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Host name (`h1`…).
    pub name: String,
    /// Namespace name.
    pub netns: String,
    /// Address with prefix.
    pub address: String,
    /// Configured rate limit.
    pub link_rate: Option<LinkRate>,
    /// Configured delay in microseconds (netem only).
    pub link_delay_us: Option<u64>,
    /// Observed link state.
    pub link: LinkState,
    /// Processes inside the host's namespace.
    pub processes: Vec<NetnsProcess>,
}

/// Live status of a lab, for `tern lab status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabStatus {
    /// Lab name.
    pub name: String,
    /// The switch namespace.
    pub switch_netns: String,
    /// One entry per host, in host order.
    pub hosts: Vec<HostStatus>,
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "lab {} (switch {})", self.name, self.switch_netns)?;
        let w = self.hosts.iter().map(|h| h.netns.len()).max().unwrap_or(5);
        writeln!(
            f,
            "{:<4} {:<18} {:<w$} {:<10} {:<16} processes",
            "host", "address", "netns", "rate", "link"
        )?;
        for h in &self.hosts {
            let rate = h
                .link_rate
                .map(|r| r.to_string())
                .unwrap_or_else(|| "unshaped".to_string());
            let procs = if h.processes.is_empty() {
                "-".to_string()
            } else {
                h.processes
                    .iter()
                    .map(|p| format!("{}({})", p.comm, p.pid))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            writeln!(
                f,
                "{:<4} {:<18} {:<w$} {:<10} {:<16} {}",
                h.name,
                h.address,
                h.netns,
                rate,
                h.link.to_string(),
                procs
            )?;
        }
        Ok(())
    }
}

/// What [`Lab::down`] removed, so a CLI can say what it did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownReport {
    /// Lab name.
    pub name: String,
    /// Namespaces deleted.
    pub namespaces_removed: Vec<String>,
    /// Processes that had to be signalled (found inside lab namespaces).
    pub processes_killed: Vec<NetnsProcess>,
    /// Whether a state file was removed.
    pub state_file_removed: bool,
}

/// A running lab: a switch namespace with a bridge and N host namespaces wired to it.
///
/// The value is a snapshot of the state file; several processes may hold a `Lab` for the same lab
/// (the kernel objects are the truth, the file is how they are found).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lab {
    format: u32,
    name: String,
    switch_netns: String,
    bridge: String,
    hosts: Vec<LabHost>,
}

/// Checks a lab name; the error names the value and the rule.
pub fn validate_lab_name(name: &str) -> Result<(), LabError> {
    let bad = |reason: &str| {
        Err(LabError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_LAB_NAME_LEN {
        return bad(&format!("{} characters is too long", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return bad(&format!("character {c:?} is not allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    Ok(())
}

/// Switch namespace name of lab `name`.
pub fn switch_netns_name(name: &str) -> String {
    format!("{NETNS_PREFIX}{name}-sw")
}

/// Host namespace name of host `index` (1-based) of lab `name`.
pub fn host_netns_name(name: &str, index: usize) -> String {
    format!("{NETNS_PREFIX}{name}-h{index}")
}

/// The lab a namespace belongs to, if it is one of ours (`tern-<lab>-sw` or `tern-<lab>-h<N>`).
/// The suffix never contains '-', so the lab name is found unambiguously even when one lab name
/// is a prefix of another ("a" vs "a-b").
pub fn lab_of_netns(netns: &str) -> Option<&str> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    let (lab, suffix) = rest.rsplit_once('-')?;
    let ours = suffix == "sw"
        || suffix
            .strip_prefix('h')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    (ours && validate_lab_name(lab).is_ok()).then_some(lab)
}

/// State file path of lab `name`.
pub fn state_path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

/// Named network namespaces that exist now (entries of `/run/netns`).
fn existing_netns() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn require_root() -> Result<(), LabError> {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot { uid: uid.as_raw() })
    }
}

/// Exclusive lock over lab creation and teardown, across threads and processes (`flock(2)` on
/// `/run/tern/labs/.lock`, released when dropped or when the holder dies). It makes "check that the
/// name is free, then build" atomic, so two processes racing to build the same lab cannot end with
/// one tearing down the other's half-built namespaces; it also serialises the first `ip netns add`
/// on a machine, which turns `/run/netns` into a shared mount and can stack mounts when raced.
struct LabsLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl LabsLock {
    fn acquire() -> Result<LabsLock, LabError> {
        let path = Path::new(STATE_DIR).join(".lock");
        let err = |message: String| LabError::State {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(STATE_DIR).map_err(|e| err(format!("create {STATE_DIR}: {e}")))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| err(format!("open lock file: {e}")))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, source)| LabError::Sys {
                what: format!("lock {}", path.display()),
                source,
            },
        )?;
        Ok(LabsLock { _lock: lock })
    }
}

fn netns_add(name: &str) -> Result<(), LabError> {
    run("ip", &["netns", "add", name]).map(|_| ())
}

fn netns_del(name: &str) -> Result<(), LabError> {
    run("ip", &["netns", "del", name]).map(|_| ())
}

impl Lab {
    /// Builds the lab described by `spec` and records it in [`STATE_DIR`].
    ///
    /// Refuses to touch an existing lab of the same name (state file or namespaces): use
    /// [`Lab::down`] first. If any step fails, whatever was already built is torn down again before
    /// the error is returned. Nothing is created in the root namespace: veth pairs are created with
    /// both ends placed directly in the switch and host namespaces.
    pub fn up(spec: &LabSpec) -> Result<Lab, LabError> {
        require_root()?;
        validate_lab_name(&spec.name)?;
        if !(MIN_HOSTS..=MAX_HOSTS).contains(&spec.hosts) {
            return Err(LabError::InvalidHostCount { hosts: spec.hosts });
        }
        if let Some(delay) = spec.link_delay {
            shaping::require_netem(delay)?;
        }
        let name = &spec.name;
        let _lock = LabsLock::acquire()?;
        let path = state_path(name);
        let leftovers: Vec<String> = existing_netns()
            .into_iter()
            .filter(|ns| lab_of_netns(ns) == Some(name.as_str()))
            .collect();
        if path.exists() {
            if leftovers.is_empty() {
                // A state file with none of its namespaces is what a process killed between
                // `lab down`'s namespace removal and its file removal (or a host reboot, which
                // empties the namespaces but not always /run) leaves: nothing of the lab
                // exists any more, so the file describes nothing. Under the labs lock no
                // other `up` can be creating it.
                tracing::warn!(lab = %name, file = %path.display(),
                    "removing a stale lab state file: none of its namespaces exist");
                std::fs::remove_file(&path).map_err(|e| LabError::State {
                    path: path.clone(),
                    message: format!("removing the stale state file: {e}"),
                })?;
            } else {
                return Err(LabError::AlreadyExists {
                    name: name.clone(),
                    evidence: format!("state file {}", path.display()),
                });
            }
        }
        if !leftovers.is_empty() {
            return Err(LabError::AlreadyExists {
                name: name.clone(),
                evidence: format!("namespaces {}", leftovers.join(", ")),
            });
        }

        let switch_netns = switch_netns_name(name);
        let hosts: Vec<LabHost> = (1..=spec.hosts)
            .map(|i| LabHost {
                name: format!("h{i}"),
                netns: host_netns_name(name, i),
                switch_netns: switch_netns.clone(),
                switch_port: format!("p{i}"),
                address: Ipv4Addr::new(SUBNET_BASE[0], SUBNET_BASE[1], SUBNET_BASE[2], i as u8),
                link_rate: spec.link_rate,
                link_delay_us: spec.link_delay.map(|d| d.as_micros() as u64),
            })
            .collect();
        let lab = Lab {
            format: STATE_FORMAT,
            name: name.clone(),
            switch_netns,
            bridge: BRIDGE.to_string(),
            hosts,
        };
        let started = Instant::now();
        if let Err(e) = lab.build() {
            if let Err(cleanup) = down_locked(name) {
                tracing::warn!(lab = %name, error = %cleanup, "cleanup after failed lab up");
            }
            return Err(e);
        }
        tracing::info!(lab = %name, hosts = spec.hosts, elapsed_ms = started.elapsed().as_millis() as u64, "lab up");
        Ok(lab)
    }

    /// Like [`Lab::up`], but returns a [`LabGuard`] that takes the lab down when dropped.
    pub fn up_guarded(spec: &LabSpec) -> Result<LabGuard, LabError> {
        Lab::up(spec).map(Lab::into_guard)
    }

    /// Wraps this lab in a guard that takes it down on drop (including during a panic).
    pub fn into_guard(self) -> LabGuard {
        LabGuard { lab: Some(self) }
    }

    fn build(&self) -> Result<(), LabError> {
        let sw = self.switch_netns.as_str();
        netns_add(sw)?;
        ip_in(sw, &["link", "set", "dev", "lo", "up"])?;
        ip_in(
            sw,
            &[
                "link",
                "add",
                "name",
                BRIDGE,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        )?;
        ip_in(sw, &["link", "set", "dev", BRIDGE, "up"])?;
        for host in &self.hosts {
            netns_add(&host.netns)?;
            ip_in(&host.netns, &["link", "set", "dev", "lo", "up"])?;
            tune_tcp_failure_detection(&host.netns)?;
            ip_in(
                sw,
                &[
                    "link",
                    "add",
                    "name",
                    &host.switch_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    HOST_IFACE,
                    "netns",
                    &host.netns,
                ],
            )?;
            ip_in(
                sw,
                &["link", "set", "dev", &host.switch_port, "master", BRIDGE],
            )?;
            ip_in(sw, &["link", "set", "dev", &host.switch_port, "up"])?;
            ip_in(
                &host.netns,
                &["addr", "add", &host.address_cidr(), "dev", HOST_IFACE],
            )?;
            ip_in(&host.netns, &["link", "set", "dev", HOST_IFACE, "up"])?;
            self.apply_link_config(host)?;
        }
        self.save()
    }

    /// Applies the host's configured rate/delay to both ends of its link.
    fn apply_link_config(&self, host: &LabHost) -> Result<(), LabError> {
        let delay = host.link_delay();
        shaping::apply(&host.netns, HOST_IFACE, host.link_rate, delay)?;
        shaping::apply(&self.switch_netns, &host.switch_port, host.link_rate, delay)
    }

    /// Writes the state file atomically (temp file + rename), so readers never see half a file.
    fn save(&self) -> Result<(), LabError> {
        let path = state_path(&self.name);
        let err = |message: String| LabError::State {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(STATE_DIR).map_err(|e| err(format!("create {STATE_DIR}: {e}")))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        std::fs::write(&tmp, json + "\n")
            .map_err(|e| err(format!("write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(format!("rename into place: {e}")))
    }

    /// Loads lab `name` from its state file (built by this or another process).
    pub fn load(name: &str) -> Result<Lab, LabError> {
        validate_lab_name(name)?;
        let path = state_path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LabError::NotFound {
                    name: name.to_string(),
                    path,
                    known: Lab::list()?.into_iter().map(|l| l.name).collect(),
                });
            }
            Err(e) => {
                return Err(LabError::State {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let lab: Lab = serde_json::from_str(&text).map_err(|e| LabError::State {
            path: path.clone(),
            message: format!("not a lab state file: {e}"),
        })?;
        if lab.format != STATE_FORMAT || lab.name != name {
            return Err(LabError::State {
                path,
                message: format!(
                    "holds lab {:?} in format {}, expected lab {name:?} in format {STATE_FORMAT}; remove it with `tern lab down {name}`",
                    lab.name, lab.format
                ),
            });
        }
        Ok(lab)
    }

    /// Every lab with a state file, sorted by name. Unreadable state files are skipped with a
    /// warning (they are still removed by [`Lab::down`] / [`down_all`]).
    pub fn list() -> Result<Vec<Lab>, LabError> {
        let mut labs = Vec::new();
        for name in state_file_names() {
            match Lab::load(&name) {
                Ok(lab) => labs.push(lab),
                Err(e) => tracing::warn!(lab = %name, error = %e, "skipping unreadable lab state"),
            }
        }
        labs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(labs)
    }

    /// Names of labs that have namespaces but no state file (left by a crash).
    pub fn orphaned_names() -> Vec<String> {
        let with_state: BTreeSet<String> = state_file_names().into_iter().collect();
        let names: BTreeSet<String> = existing_netns()
            .iter()
            .filter_map(|ns| lab_of_netns(ns))
            .filter(|lab| !with_state.contains(*lab))
            .map(str::to_string)
            .collect();
        names.into_iter().collect()
    }

    /// Lab name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The switch namespace (`tern-<lab>-sw`), holding bridge [`BRIDGE`].
    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    /// All hosts, in order h1, h2, …
    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }

    /// The state file of this lab.
    pub fn state_path(&self) -> PathBuf {
        state_path(&self.name)
    }

    /// Host `name` (`"h1"`…); the error lists the valid host names.
    pub fn host(&self, name: &str) -> Result<&LabHost, LabError> {
        self.host_index(name).map(|i| &self.hosts[i])
    }

    fn host_index(&self, name: &str) -> Result<usize, LabError> {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .ok_or_else(|| LabError::UnknownHost {
                lab: self.name.clone(),
                host: name.to_string(),
                valid: self.hosts.iter().map(|h| h.name.clone()).collect(),
            })
    }

    /// Changes (or with `None` removes) the rate limit on `host`'s link, live, in both directions,
    /// and records it in the state file. If the link is currently blackholed the new rate is
    /// recorded and takes effect on [`Lab::restore_link`], so the cut is not silently lifted.
    pub fn set_link_rate(&mut self, host: &str, rate: Option<LinkRate>) -> Result<(), LabError> {
        let i = self.host_index(host)?;
        self.hosts[i].link_rate = rate;
        self.reapply_unless_blackholed(i)?;
        self.save()
    }

    /// Changes (or removes) the delay on `host`'s link; needs netem (see [`netem_available`]).
    pub fn set_link_delay(&mut self, host: &str, delay: Option<Duration>) -> Result<(), LabError> {
        let i = self.host_index(host)?;
        if let Some(d) = delay {
            shaping::require_netem(d)?;
        }
        self.hosts[i].link_delay_us = delay.map(|d| d.as_micros() as u64);
        self.reapply_unless_blackholed(i)?;
        self.save()
    }

    fn reapply_unless_blackholed(&self, i: usize) -> Result<(), LabError> {
        let host = &self.hosts[i];
        if self.link_state_of(host)? != LinkState::Cut(FaultMode::Blackhole) {
            self.apply_link_config(host)?;
        }
        Ok(())
    }

    /// Cuts `host`'s link (see [`FaultMode`]). Idempotent; undo with [`Lab::restore_link`].
    pub fn cut_link(&self, host: &str, mode: FaultMode) -> Result<(), LabError> {
        let host = self.host(host)?;
        match mode {
            FaultMode::Blackhole => {
                shaping::blackhole(&host.netns, HOST_IFACE)?;
                shaping::blackhole(&self.switch_netns, &host.switch_port)?;
            }
            FaultMode::LinkDown => {
                ip_in(
                    &self.switch_netns,
                    &["link", "set", "dev", &host.switch_port, "down"],
                )?;
            }
        }
        tracing::info!(lab = %self.name, host = %host.name, %mode, "link cut");
        Ok(())
    }

    /// Undoes any cut on `host`'s link (both modes) and re-applies its rate limit. Idempotent.
    pub fn restore_link(&self, host: &str) -> Result<(), LabError> {
        let host = self.host(host)?;
        ip_in(
            &self.switch_netns,
            &["link", "set", "dev", &host.switch_port, "up"],
        )?;
        self.apply_link_config(host)?;
        tracing::info!(lab = %self.name, host = %host.name, "link restored");
        Ok(())
    }

    /// Cuts `host`'s link, waits `duration`, restores it (blocking). The link is restored even
    /// if the cut partly failed.
    pub fn fault_for(
        &self,
        host: &str,
        mode: FaultMode,
        duration: Duration,
    ) -> Result<(), LabError> {
        let cut = self.cut_link(host, mode);
        if cut.is_ok() {
            std::thread::sleep(duration);
        }
        let restored = self.restore_link(host);
        cut.and(restored)
    }

    /// Observed state of `host`'s link.
    pub fn link_state(&self, host: &str) -> Result<LinkState, LabError> {
        self.link_state_of(self.host(host)?)
    }

    fn link_state_of(&self, host: &LabHost) -> Result<LinkState, LabError> {
        let port_up = link_admin_up(&self.switch_netns, &host.switch_port)?;
        if !port_up {
            return Ok(LinkState::Cut(FaultMode::LinkDown));
        }
        let host_side = shaping::root_qdisc_kind(&host.netns, HOST_IFACE)?;
        let switch_side = shaping::root_qdisc_kind(&self.switch_netns, &host.switch_port)?;
        if host_side == "blackhole" || switch_side == "blackhole" {
            return Ok(LinkState::Cut(FaultMode::Blackhole));
        }
        Ok(LinkState::Up)
    }

    /// Live status: hosts, addresses, configured rates, observed link state and the processes in
    /// each namespace.
    pub fn status(&self) -> Result<LabStatus, LabError> {
        let mut hosts = Vec::with_capacity(self.hosts.len());
        for h in &self.hosts {
            hosts.push(HostStatus {
                name: h.name.clone(),
                netns: h.netns.clone(),
                address: h.address_cidr(),
                link_rate: h.link_rate,
                link_delay_us: h.link_delay_us,
                link: self.link_state_of(h)?,
                processes: netns_processes(&h.netns)?,
            });
        }
        Ok(LabStatus {
            name: self.name.clone(),
            switch_netns: self.switch_netns.clone(),
            hosts,
        })
    }

    /// Tears lab `name` down: kills every process inside its namespaces (SIGTERM, a short grace,
    /// then SIGKILL), deletes the namespaces (which destroys the veths and the bridge) and removes
    /// the state file. Works from the state file, from leftover namespaces alone (after a crash),
    /// or both; idempotent (a lab that does not exist is a successful no-op).
    pub fn down(name: &str) -> Result<DownReport, LabError> {
        validate_lab_name(name)?;
        require_root()?;
        let _lock = LabsLock::acquire()?;
        down_locked(name)
    }
}

/// [`Lab::down`] for a caller that holds the [`LabsLock`].
fn down_locked(name: &str) -> Result<DownReport, LabError> {
    let mut namespaces: BTreeSet<String> = existing_netns()
        .into_iter()
        .filter(|ns| lab_of_netns(ns) == Some(name))
        .collect();
    if let Ok(text) = std::fs::read_to_string(state_path(name))
        && let Ok(lab) = serde_json::from_str::<Lab>(&text)
    {
        let existing: BTreeSet<String> = existing_netns().into_iter().collect();
        for ns in std::iter::once(lab.switch_netns).chain(lab.hosts.into_iter().map(|h| h.netns)) {
            if lab_of_netns(&ns) == Some(name) && existing.contains(&ns) {
                namespaces.insert(ns);
            }
        }
    }
    let mut report = DownReport {
        name: name.to_string(),
        ..DownReport::default()
    };
    // Hosts first, the switch last: a host's processes may still be talking through it.
    let mut ordered: Vec<String> = namespaces.into_iter().collect();
    ordered.sort_by_key(|ns| ns.ends_with("-sw"));
    let mut first_error = None;
    for ns in &ordered {
        match kill_netns_processes(ns, Duration::from_millis(500)) {
            Ok(mut killed) => report.processes_killed.append(&mut killed),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        match netns_del(ns) {
            Ok(()) => report.namespaces_removed.push(ns.clone()),
            Err(e) => {
                if netns_file(ns).exists() {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    match std::fs::remove_file(state_path(name)) {
        Ok(()) => report.state_file_removed = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            first_error.get_or_insert(LabError::State {
                path: state_path(name),
                message: format!("remove: {e}"),
            });
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            tracing::info!(lab = %name, namespaces = report.namespaces_removed.len(), "lab down");
            Ok(report)
        }
    }
}

/// Takes down every tern lab: those with state files and those only leftover namespaces show.
pub fn down_all() -> Result<Vec<DownReport>, LabError> {
    require_root()?;
    let mut names: BTreeSet<String> = state_file_names()
        .into_iter()
        .filter(|n| validate_lab_name(n).is_ok())
        .collect();
    names.extend(
        existing_netns()
            .iter()
            .filter_map(|ns| lab_of_netns(ns))
            .map(str::to_string),
    );
    let mut reports = Vec::new();
    let mut first_error = None;
    for name in names {
        match Lab::down(&name) {
            Ok(r) => reports.push(r),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

fn state_file_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(STATE_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether `dev` in `netns` is administratively up (the `UP` flag, not carrier).
fn link_admin_up(netns: &str, dev: &str) -> Result<bool, LabError> {
    let out = ip_in(netns, &["-o", "link", "show", "dev", dev])?;
    let flags = out
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags)
        .unwrap_or("");
    Ok(flags.split(',').any(|f| f == "UP"))
}

/// Processes whose network namespace is `netns` (what `ip netns pids` prints), found by comparing
/// `/proc/<pid>/ns/net` with the namespace file. Zombies have no namespace and are not listed.
pub(crate) fn netns_processes(netns: &str) -> Result<Vec<NetnsProcess>, LabError> {
    let target = match std::fs::metadata(netns_file(netns)) {
        Ok(m) => (m.dev(), m.ino()),
        Err(_) => return Ok(Vec::new()),
    };
    let mut found = Vec::new();
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Ok(found);
    };
    for entry in proc_dir.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(m) = std::fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if (m.dev(), m.ino()) == target {
            found.push(NetnsProcess {
                pid,
                comm: process_comm(pid).unwrap_or_default(),
            });
        }
    }
    found.sort_by_key(|p| p.pid);
    Ok(found)
}

fn process_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// Whether `pid` has exited (gone, or a zombie waiting to be reaped by its parent).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|state| state == 'Z' || state == 'X'),
    }
}

/// SIGTERM everything in `netns`, wait up to `grace`, SIGKILL what is left. Never signals this
/// process itself. Repeats a few rounds in case processes fork while dying.
fn kill_netns_processes(netns: &str, grace: Duration) -> Result<Vec<NetnsProcess>, LabError> {
    let me = std::process::id();
    let mut killed = Vec::new();
    for _round in 0..5 {
        let procs: Vec<NetnsProcess> = netns_processes(netns)?
            .into_iter()
            .filter(|p| p.pid != me)
            .collect();
        if procs.is_empty() {
            return Ok(killed);
        }
        for p in &procs {
            let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !procs.iter().all(|p| process_gone(p.pid)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in procs.iter().filter(|p| !process_gone(p.pid)) {
            tracing::warn!(netns, pid = p.pid, comm = %p.comm, "did not exit on SIGTERM; SIGKILL");
            let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !procs.iter().all(|p| process_gone(p.pid)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in procs {
            if !killed.iter().any(|k: &NetnsProcess| k.pid == p.pid) {
                killed.push(p);
            }
        }
    }
    Ok(killed)
}

/// Sends `signal` to process `pid`; the error names the process (PID and command name) so a test
/// log says which of several processes could not be signalled.
pub fn kill_process(pid: u32, signal: Signal) -> Result<(), LabError> {
    let comm = process_comm(pid).unwrap_or_else(|| "?".to_string());
    let raw = i32::try_from(pid).map_err(|_| LabError::Sys {
        what: format!("send {signal} to pid {pid}: not a valid PID"),
        source: nix::Error::EINVAL,
    })?;
    if raw <= 0 {
        return Err(LabError::Sys {
            what: format!("send {signal} to pid {pid}: not a valid PID"),
            source: nix::Error::EINVAL,
        });
    }
    kill(Pid::from_raw(raw), signal).map_err(|source| LabError::Sys {
        what: format!("send {signal} to pid {pid} ({comm})"),
        source,
    })
}

/// Owns a lab and takes it down when dropped, also while unwinding from a panic, so tests never
/// leak namespaces. Derefs to [`Lab`].
#[derive(Debug)]
pub struct LabGuard {
    lab: Option<Lab>,
}

impl LabGuard {
    /// Disarms the guard, handing back the lab (which then stays up).
    pub fn into_inner(mut self) -> Lab {
        self.lab
            .take()
            .unwrap_or_else(|| unreachable!("guard holds a lab until dropped"))
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.lab
            .as_ref()
            .unwrap_or_else(|| unreachable!("guard holds a lab until dropped"))
    }
}

impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        self.lab
            .as_mut()
            .unwrap_or_else(|| unreachable!("guard holds a lab until dropped"))
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take()
            && let Err(e) = Lab::down(&lab.name)
        {
            tracing::warn!(lab = %lab.name, error = %e, "LabGuard: lab down failed");
            eprintln!("tern-lab: taking down lab {:?} failed: {e}", lab.name);
        }
    }
}

/// Whether this kernel has the netem qdisc (delay, loss). Probed once per process by adding netem
/// to `lo` inside a throwaway namespace that disappears with the probing thread.
pub fn netem_available() -> bool {
    static CACHE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CACHE.get_or_init(|| {
        cmd::in_throwaway_netns(|| {
            Command::new("tc")
                .args(["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_of_netns_matches_only_our_namespaces() {
        assert_eq!(lab_of_netns("tern-x-sw"), Some("x"));
        assert_eq!(lab_of_netns("tern-x-h1"), Some("x"));
        assert_eq!(lab_of_netns("tern-x-h12"), Some("x"));
        assert_eq!(lab_of_netns("tern-x-h1-sw"), Some("x-h1"));
        assert_eq!(lab_of_netns("tern-x-h1-h2"), Some("x-h1"));
        assert_eq!(lab_of_netns("tern-a-b-h3"), Some("a-b"));
        for not_ours in [
            "tern-x",
            "tern-x-h",
            "tern-x-hx",
            "tern-x-sw2",
            "ternx-y-h1",
            "foo-x-h1",
            "tern--h1",
            "tern-X-h1",
            "tern-x-",
        ] {
            assert_eq!(lab_of_netns(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn names_follow_the_layout() {
        assert_eq!(switch_netns_name("tern"), "tern-tern-sw");
        assert_eq!(host_netns_name("tern", 3), "tern-tern-h3");
        for i in 1..=MAX_HOSTS {
            assert_eq!(lab_of_netns(&host_netns_name("a-b", i)), Some("a-b"));
        }
        assert_eq!(state_path("x"), PathBuf::from("/run/tern/labs/x.json"));
    }

    #[test]
    fn lab_name_rules() {
        for ok in ["tern", "a", "mig-test-1", "0", "abcdefghij0123456789"] {
            assert!(validate_lab_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a_b",
            "a.b",
            "a b",
            "-a",
            "a-",
            "abcdefghij0123456789x",
            "ä",
        ] {
            let e = validate_lab_name(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn fault_mode_text() {
        for m in [FaultMode::Blackhole, FaultMode::LinkDown] {
            assert_eq!(m.to_string().parse::<FaultMode>().unwrap(), m);
        }
        assert_eq!("down".parse::<FaultMode>().unwrap(), FaultMode::LinkDown);
        assert_eq!(
            serde_json::to_string(&LinkState::Cut(FaultMode::LinkDown)).unwrap(),
            r#"{"state":"cut","mode":"link-down"}"#
        );
    }
}
