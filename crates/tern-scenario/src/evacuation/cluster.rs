//! A lab cluster as an operator runs one: lab hosts (network namespaces, shaped links), one
//! `tern agent` process per host and one `tern server` (controller) process, wired together
//! by generated configuration files — the agents heartbeat to the controller with its token,
//! the controller calls the agents it was configured with.
//!
//! Processes are started from the `tern` binary given by the caller (the CLI passes its own
//! executable, tests `CARGO_BIN_EXE_tern`), so a test can SIGKILL and restart any of them and
//! see what a real crash does. Everything is removed on every path: [`LabCluster`]'s `Drop`
//! kills every process it started by PID, then the lab guard takes the namespaces (and the
//! QEMUs inside them) down, then the temporary directory (configurations, databases, serial
//! logs, 0700) goes.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_lab::{Lab, LabGuard, LabSpec, LinkRate};

use super::EvacuationError;

/// How long a started process may take to listen on its port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Seconds between an agent's heartbeats in the lab: short, so the controller sees a guest
/// on its new host (and a dead agent) within a second or two.
pub const LAB_HEARTBEAT_INTERVAL_S: u64 = 1;

/// The controller's heartbeat timeout in the lab (s): a killed agent's host is `unreachable`
/// after this long.
pub const LAB_HEARTBEAT_TIMEOUT_S: u64 = 5;

/// What the cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Lab name (namespaces `tern-<name>-hN`); unique per concurrently running cluster.
    pub lab_name: String,
    /// Number of lab hosts (h1…hN), at least 2.
    pub hosts: usize,
    /// Link rate of every host.
    pub link_rate: LinkRate,
    /// Memory each host offers to guests (MiB).
    pub host_memory_mib: u64,
    /// The `tern` binary whose `agent` and `server` subcommands are started.
    pub tern_binary: PathBuf,
}

/// One started process, killed by PID when dropped.
#[derive(Debug)]
struct ManagedProcess {
    child: Child,
}

impl ManagedProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap (no clean shutdown: what a crash or the OOM killer does).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One host's agent: where it listens and how it is started again.
#[derive(Debug)]
struct AgentSlot {
    url: String,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    process: Option<ManagedProcess>,
}

/// Lab hosts with their agents and a controller, all real processes.
#[derive(Debug)]
pub struct LabCluster {
    spec: ClusterSpec,
    // Drop order matters: processes first (fields drop in declaration order), then the lab
    // (kills the QEMUs in its namespaces), then the directory.
    controller: Option<ManagedProcess>,
    agents: BTreeMap<String, AgentSlot>,
    lab: Option<LabGuard>,
    controller_port: u16,
    controller_config: PathBuf,
    controller_log: PathBuf,
    token_file: PathBuf,
    dir: tempfile::TempDir,
}

impl LabCluster {
    /// Brings up the lab, starts the controller, then one agent per host (each configured
    /// with every other host as a peer, its link rate, and the controller to heartbeat to).
    pub fn start(spec: ClusterSpec) -> Result<Self, EvacuationError> {
        if spec.hosts < 2 {
            return Err(EvacuationError::Invalid(format!(
                "a cluster of {} host(s) cannot evacuate anything: give at least 2",
                spec.hosts
            )));
        }
        // A leftover of a crashed run with this name must not be reused.
        let _ = Lab::down(&spec.lab_name);
        let lab = Lab::up_guarded(&LabSpec {
            name: spec.lab_name.clone(),
            hosts: spec.hosts,
            link_rate: Some(spec.link_rate),
            link_delay: None,
        })?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-{}-", spec.lab_name))
            .tempdir()
            .map_err(|e| EvacuationError::Io(format!("temp dir: {e}")))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| EvacuationError::Io(format!("chmod 700 {}: {e}", dir.path().display())))?;
        let ports = free_ports(spec.hosts + 1)?;
        let controller_port = ports[0];
        let token_file = dir.path().join("controller.token");
        let mut agents = BTreeMap::new();
        for (i, h) in lab.hosts().iter().enumerate() {
            let port = ports[i + 1];
            agents.insert(
                h.name().to_string(),
                AgentSlot {
                    url: format!("http://127.0.0.1:{port}"),
                    port,
                    config: dir.path().join(format!("{}.toml", h.name())),
                    log: dir.path().join(format!("{}.log", h.name())),
                    process: None,
                },
            );
        }
        let controller_config = dir.path().join("server.toml");
        std::fs::write(
            &controller_config,
            server_toml(dir.path(), controller_port, &token_file, &agents),
        )
        .map_err(|e| {
            EvacuationError::Io(format!("writing {}: {e}", controller_config.display()))
        })?;
        let mut cluster = Self {
            controller_log: dir.path().join("controller.log"),
            spec,
            controller: None,
            agents,
            lab: Some(lab),
            controller_port,
            controller_config,
            token_file,
            dir,
        };
        cluster.start_controller()?;
        let names: Vec<String> = cluster.agents.keys().cloned().collect();
        for name in &names {
            let text = cluster.agent_toml(name)?;
            let path = cluster.agents[name].config.clone();
            std::fs::write(&path, text)
                .map_err(|e| EvacuationError::Io(format!("writing {}: {e}", path.display())))?;
        }
        for name in &names {
            cluster.start_agent(name)?;
        }
        Ok(cluster)
    }

    /// The lab (host names, namespaces, addresses).
    pub fn lab(&self) -> &Lab {
        self.lab
            .as_ref()
            .unwrap_or_else(|| unreachable!("the lab lives as long as the cluster"))
    }

    /// The cluster's specification.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The controller's base URL.
    pub fn controller_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.controller_port)
    }

    /// The controller's bearer token (created by the controller at its first start).
    pub fn token(&self) -> Result<String, EvacuationError> {
        std::fs::read_to_string(&self.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|e| EvacuationError::Io(format!("reading {}: {e}", self.token_file.display())))
    }

    /// The controller's token file (0600).
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// Base URL of `host`'s agent.
    pub fn agent_url(&self, host: &str) -> Result<&str, EvacuationError> {
        self.agents
            .get(host)
            .map(|a| a.url.as_str())
            .ok_or_else(|| self.unknown_host(host))
    }

    /// Host names, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    /// The directory holding configurations, logs and databases (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The controller's log file.
    pub fn controller_log(&self) -> &Path {
        &self.controller_log
    }

    /// PID of the running controller, if any.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(ManagedProcess::pid)
    }

    /// PID of `host`'s running agent, if any.
    pub fn agent_pid(&self, host: &str) -> Option<u32> {
        self.agents
            .get(host)
            .and_then(|a| a.process.as_ref())
            .map(ManagedProcess::pid)
    }

    /// SIGKILLs the controller (no clean shutdown).
    pub fn kill_controller(&mut self) {
        if let Some(mut p) = self.controller.take() {
            p.kill();
        }
    }

    /// Starts the controller (again): same configuration, same database, same token.
    pub fn start_controller(&mut self) -> Result<(), EvacuationError> {
        if self.controller.as_mut().is_some_and(ManagedProcess::alive) {
            return Ok(());
        }
        wait_port_free(self.controller_port)?;
        let process = spawn(
            &self.spec.tern_binary,
            &["server", "--config"],
            &self.controller_config,
            &self.controller_log,
        )?;
        let process = self.controller.insert(process);
        wait_listening(
            self.controller_port,
            process,
            &self.controller_log,
            "controller",
        )?;
        // The token file is written before the listener binds; check anyway.
        self.token()?;
        Ok(())
    }

    /// SIGKILLs `host`'s agent; its QEMUs keep running (they are not its children's group).
    pub fn kill_agent(&mut self, host: &str) -> Result<(), EvacuationError> {
        let slot = self
            .agents
            .get_mut(host)
            .ok_or_else(|| EvacuationError::Invalid(format!("no host {host:?} in the lab")))?;
        if let Some(mut p) = slot.process.take() {
            p.kill();
        }
        Ok(())
    }

    /// Starts `host`'s agent (again, re-attaching to its QEMUs from its runtime directory).
    pub fn start_agent(&mut self, host: &str) -> Result<(), EvacuationError> {
        let binary = self.spec.tern_binary.clone();
        let unknown = self.unknown_host(host);
        let slot = self.agents.get_mut(host).ok_or(unknown)?;
        if slot.process.as_mut().is_some_and(ManagedProcess::alive) {
            return Ok(());
        }
        wait_port_free(slot.port)?;
        let process = spawn(&binary, &["agent", "--config"], &slot.config, &slot.log)?;
        let process = slot.process.insert(process);
        wait_listening(slot.port, process, &slot.log, &format!("agent of {host}"))
    }

    fn unknown_host(&self, host: &str) -> EvacuationError {
        EvacuationError::Invalid(format!(
            "no host {host:?} in lab {}: hosts are {}",
            self.spec.lab_name,
            self.hosts().join(", ")
        ))
    }

    /// Host `name`'s agent configuration: its namespace and address, every other host as a
    /// peer with the shaped link rate, and the controller with its token.
    fn agent_toml(&self, name: &str) -> Result<String, EvacuationError> {
        let lab = self.lab();
        let h = lab
            .hosts()
            .iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| self.unknown_host(name))?;
        let slot = &self.agents[name];
        let cache = tern_guest::default_cache_dir();
        let rate = self.spec.link_rate.bytes_per_sec();
        let mut text = format!(
            "# written by tern-scenario's evacuation cluster for lab {lab}\n\
             host = \"{host}\"\n\
             listen = \"127.0.0.1:{port}\"\n\
             netns = \"{netns}\"\n\
             migration_address = \"{addr}\"\n\
             memory_mib = {mem}\n\
             runtime_dir = {rt:?}\n\
             image_dirs = [{cache:?}]\n\
             accelerator_cache = {accel:?}\n\n\
             [controller]\n\
             url = \"{ctl}\"\n\
             token_file = {token:?}\n\
             interval_s = {LAB_HEARTBEAT_INTERVAL_S}\n\n\
             [peers]\n",
            lab = lab.name(),
            host = name,
            port = slot.port,
            netns = h.netns(),
            addr = h.address(),
            mem = self.spec.host_memory_mib,
            rt = self.dir.path().join(name).display().to_string(),
            cache = cache.display().to_string(),
            accel = cache.join("accelerator.json").display().to_string(),
            ctl = self.controller_url(),
            token = self.token_file.display().to_string(),
        );
        for (peer, p) in self.agents.iter().filter(|(n, _)| n.as_str() != name) {
            text.push_str(&format!(
                "{peer} = {{ url = \"{}\", link_bytes_per_s = {rate} }}\n",
                p.url
            ));
        }
        // What is written must be what the agent reads.
        tern_agent::AgentConfig::from_toml(&text, "generated cluster agent configuration")
            .map_err(|e| EvacuationError::Invalid(e.to_string()))?;
        Ok(text)
    }
}

impl Drop for LabCluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.controller.take() {
            c.kill();
        }
        for slot in self.agents.values_mut() {
            if let Some(mut p) = slot.process.take() {
                p.kill();
            }
        }
        crate::keep_logs_for_post_mortem(self.dir.path(), &self.spec.lab_name);
        // The lab guard drops next (namespaces and their QEMUs), then the directory.
        self.lab.take();
    }
}

/// The controller's configuration: loopback lab mode with a token, SQLite in the cluster's
/// directory, the agents by host name, a short heartbeat timeout and runner tick.
fn server_toml(
    dir: &Path,
    port: u16,
    token_file: &Path,
    agents: &BTreeMap<String, AgentSlot>,
) -> String {
    let mut text = format!(
        "# written by tern-scenario's evacuation cluster\n\
         listen = \"127.0.0.1:{port}\"\n\
         database = {db:?}\n\
         token_file = {token:?}\n\
         heartbeat_timeout_s = {LAB_HEARTBEAT_TIMEOUT_S}\n\
         runner_tick_ms = 250\n\n\
         [agents]\n",
        db = dir
            .join("controller")
            .join("controller.db")
            .display()
            .to_string(),
        token = token_file.display().to_string(),
    );
    for (name, a) in agents {
        text.push_str(&format!("{name} = \"{}\"\n", a.url));
    }
    text
}

/// `n` consecutive free ports on 127.0.0.1 below Linux's ephemeral range (32768–60999), where
/// no outgoing connection can hold a port when a killed process is started again on it. The
/// search starts at an offset from the PID, so concurrent runs rarely race for the same ports.
fn free_ports(n: usize) -> Result<Vec<u16>, EvacuationError> {
    let n16 = u16::try_from(n).unwrap_or(u16::MAX).max(1);
    let start = 17_000 + (std::process::id() % 1_400) as u16 * 10;
    let candidates = (start..32_000).chain(17_000..start).step_by(10);
    for base in candidates {
        let ports: Vec<u16> = (0..n16).map(|i| base + i).collect();
        if ports
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            return Ok(ports);
        }
    }
    Err(EvacuationError::Io(format!(
        "no {n} consecutive free TCP ports on 127.0.0.1 between 17000 and 32000"
    )))
}

/// Waits until 127.0.0.1:`port` can be bound: a just-killed process's socket may linger a
/// few milliseconds while its threads exit.
fn wait_port_free(port: u16) -> Result<(), EvacuationError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpListener::bind(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(EvacuationError::Io(format!(
                "port {port} on 127.0.0.1 is still taken by another process"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn spawn(
    binary: &Path,
    args: &[&str],
    config: &Path,
    log: &Path,
) -> Result<ManagedProcess, EvacuationError> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| EvacuationError::Io(format!("opening {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| EvacuationError::Io(format!("{e}")))?;
    let child = Command::new(binary)
        .args(args)
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C of the caller reaches it only through our Drop.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            EvacuationError::Io(format!(
                "starting {} {}: {e}",
                binary.display(),
                args.join(" ")
            ))
        })?;
    Ok(ManagedProcess { child })
}

fn wait_listening(
    port: u16,
    process: &mut ManagedProcess,
    log: &Path,
    what: &str,
) -> Result<(), EvacuationError> {
    let pid = process.pid();
    let deadline = Instant::now() + START_TIMEOUT;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if !process.alive() || Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            return Err(EvacuationError::Io(format!(
                "the {what} (pid {pid}) did not start listening on {addr}; its log {} ends with: {}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
