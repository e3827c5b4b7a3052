//! One agent per lab host, as background processes: `tern lab up --agents`,
//! `tern lab agents`, and their stop in `tern lab down`.
//!
//! Each agent runs in the root network namespace and listens on 127.0.0.1:<base+N> (the
//! control plane); its QEMUs run inside the lab host's namespace and receive migration
//! streams on the host's lab address (the data plane). The agents are found through
//! `/run/tern/agents/<lab>.json`.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_lab::Lab;
use tern_lab::agents::{LabAgent, LabAgents, lab_agents_dir};

use crate::Failure;

/// Settings shared by the agents of a lab.
#[derive(Debug, Clone)]
pub struct LabAgentSettings {
    /// Agent of host hN listens on 127.0.0.1:(port_base + N).
    pub port_base: u16,
    /// Memory each host offers to guests (MiB).
    pub memory_mib: u64,
    /// Hosts whose agent is configured with `permit_post_copy = false`.
    pub deny_post_copy_hosts: Vec<String>,
    /// Mutual TLS between the agents and with the CLI, and encrypted migration streams,
    /// with certificates made for the lab (`<lab agents dir>/tls`).
    pub tls: bool,
}

fn pid_alive(pid: u32) -> bool {
    tern_qemu::process::pid_alive(pid)
}

fn host_index(name: &str) -> Option<u16> {
    name.strip_prefix('h').and_then(|n| n.parse().ok())
}

/// Starts the agents of `lab` that are not running (idempotent: running agents are kept; an
/// agent that died is restarted with its configuration, re-attaching to its QEMUs).
pub fn ensure_agents(lab: &Lab, settings: LabAgentSettings) -> Result<LabAgents, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::environment(anyhow::anyhow!("cannot find the tern binary: {e}")))?;
    let mut agents = LabAgents::load(lab.name()).unwrap_or_else(|_| LabAgents {
        lab: lab.name().to_string(),
        ..LabAgents::default()
    });
    let dir = lab_agents_dir(lab.name());
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::environment(anyhow::anyhow!("creating {}: {e}", dir.display())))?;
    if settings.tls && agents.pki_dir.is_none() {
        agents.pki_dir = Some(lab_pki(lab, &dir)?);
    }
    let scheme = if agents.pki_dir.is_some() {
        "https"
    } else {
        "http"
    };
    for h in lab.hosts() {
        if let Some(a) = agents.agents.get(h.name())
            && pid_alive(a.pid)
        {
            continue;
        }
        let (config, log, url) = match agents.agents.get(h.name()) {
            Some(a) => (a.config.clone(), a.log.clone(), a.url.clone()),
            None => {
                let idx = host_index(h.name()).ok_or_else(|| {
                    Failure::failed(anyhow::anyhow!("unexpected lab host name {}", h.name()))
                })?;
                let port = settings.port_base.checked_add(idx).ok_or_else(|| {
                    Failure::input(anyhow::anyhow!(
                        "--agent-port-base {} + {idx} overflows the port range",
                        settings.port_base
                    ))
                })?;
                let config = dir.join(format!("{}.toml", h.name()));
                let text = agent_toml(lab, h, port, &settings, &dir, agents.pki_dir.as_deref())?;
                std::fs::write(&config, text).map_err(|e| {
                    Failure::environment(anyhow::anyhow!("writing {}: {e}", config.display()))
                })?;
                (
                    config,
                    dir.join(format!("{}.log", h.name())),
                    format!("{scheme}://127.0.0.1:{port}"),
                )
            }
        };
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if !port_free_within(port, Duration::from_secs(3)) {
            return Err(Failure::environment(anyhow::anyhow!(
                "port {port} on 127.0.0.1 (agent of {}) is taken by another process: \
                 choose another --agent-port-base",
                h.name()
            )));
        }
        let pid = spawn_agent(&exe, &config, &log)?;
        agents.agents.insert(
            h.name().to_string(),
            LabAgent {
                url: url.clone(),
                pid,
                config,
                log: log.clone(),
            },
        );
        agents.save().map_err(Failure::environment)?;
        wait_healthy(&url, pid, &log)?;
    }
    agents.save().map_err(Failure::environment)?;
    Ok(agents)
}

/// The configuration of lab host `h`'s agent: everything it needs to know about the lab —
/// its namespace, its peers (the other hosts' agents, with the shaped link rate between
/// them) and where guest images are — so the agent itself knows nothing of labs.
fn agent_toml(
    lab: &Lab,
    h: &tern_lab::LabHost,
    port: u16,
    settings: &LabAgentSettings,
    dir: &Path,
    pki_dir: Option<&Path>,
) -> Result<String, Failure> {
    let cache = tern_guest::default_cache_dir();
    let mut text = format!(
        "# written by `tern lab agents` for lab {lab}\n\
         host = \"{host}\"\n\
         listen = \"127.0.0.1:{port}\"\n\
         netns = \"{netns}\"\n\
         migration_address = \"{addr}\"\n\
         memory_mib = {mem}\n\
         runtime_dir = {rt:?}\n\
         image_dirs = [{cache:?}]\n\
         accelerator_cache = {accel:?}\n",
        lab = lab.name(),
        host = h.name(),
        netns = h.netns(),
        addr = h.address(),
        mem = settings.memory_mib,
        rt = dir.join(h.name()).display().to_string(),
        cache = cache.display().to_string(),
        accel = cache.join("accelerator.json").display().to_string(),
    );
    if settings.deny_post_copy_hosts.iter().any(|d| d == h.name()) {
        text.push_str("\n[migration]\npermit_post_copy = false\n");
    }
    if let Some(pki) = pki_dir {
        // migration_tls defaults to required with [tls]: streams are encrypted too.
        text.push_str(&format!(
            "\n[tls]\npki_dir = {:?}\n",
            pki.display().to_string()
        ));
    }
    let scheme = if pki_dir.is_some() { "https" } else { "http" };
    text.push_str("\n[peers]\n");
    for peer in lab.hosts().iter().filter(|p| p.name() != h.name()) {
        let idx = host_index(peer.name()).ok_or_else(|| {
            Failure::failed(anyhow::anyhow!("unexpected lab host name {}", peer.name()))
        })?;
        let url = format!(
            "{scheme}://127.0.0.1:{}",
            settings.port_base.saturating_add(idx)
        );
        let rate = match (h.link_rate(), peer.link_rate()) {
            (Some(a), Some(b)) => Some(a.bytes_per_sec().min(b.bytes_per_sec())),
            (Some(r), None) | (None, Some(r)) => Some(r.bytes_per_sec()),
            (None, None) => None,
        };
        match rate {
            Some(r) => text.push_str(&format!(
                "{} = {{ url = \"{url}\", link_bytes_per_s = {r} }}\n",
                peer.name()
            )),
            None => text.push_str(&format!("{} = \"{url}\"\n", peer.name())),
        }
    }
    // What is written must be what the agent reads.
    tern_agent::AgentConfig::from_toml(&text, "generated lab agent configuration")
        .map_err(|e| Failure::failed(anyhow::anyhow!("{e}")))?;
    Ok(text)
}

/// Makes the lab's CA in `dir/tls` (0700): a host certificate per lab host, valid for its
/// name, its lab address and 127.0.0.1 (where its agent listens), and the `lab-admin` user
/// the CLI connects with. Returns the PKI directory.
fn lab_pki(lab: &Lab, dir: &Path) -> Result<std::path::PathBuf, Failure> {
    let hosts: Vec<(&str, Vec<std::net::IpAddr>)> = lab
        .hosts()
        .iter()
        .map(|h| {
            (
                h.name(),
                vec![h.address().into(), std::net::Ipv4Addr::LOCALHOST.into()],
            )
        })
        .collect();
    let tls_dir = dir.join("tls");
    let pki = tern_pki::provision_lab(&tls_dir, &hosts).map_err(|e| {
        Failure::environment(anyhow::anyhow!(
            "making lab certificates in {}: {e}",
            tls_dir.display()
        ))
    })?;
    Ok(pki.dir)
}

/// Whether 127.0.0.1:`port` can be bound, retrying for `patience`. An agent just killed can
/// look dead (its main thread is a zombie) while its other threads are still exiting and the
/// listening socket is still open: the port frees itself a few milliseconds later.
fn port_free_within(port: u16, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_agent(exe: &Path, config: &Path, log: &Path) -> Result<u32, Failure> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Failure::environment(anyhow::anyhow!("opening {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| Failure::environment(anyhow::anyhow!("{e}")))?;
    let child = Command::new(exe)
        .arg("agent")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group: a Ctrl-C of the CLI must not reach the agent.
        .process_group(0)
        .spawn()
        .map_err(|e| Failure::environment(anyhow::anyhow!("starting the agent: {e}")))?;
    let pid = child.id();
    // Not waited for: the agent outlives this CLI (init reaps it).
    std::mem::forget(child);
    Ok(pid)
}

fn wait_healthy(url: &str, pid: u32, log: &Path) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .to_string();
    loop {
        if std::net::TcpStream::connect_timeout(
            &addr
                .parse()
                .map_err(|e| Failure::failed(anyhow::anyhow!("bad agent address {addr}: {e}")))?,
            Duration::from_millis(200),
        )
        .is_ok()
        {
            return Ok(());
        }
        if !pid_alive(pid) || Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            return Err(Failure::environment(anyhow::anyhow!(
                "the agent (pid {pid}) did not start listening on {url}; its log {} ends with: {}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the agents of lab `lab` (SIGTERM, then SIGKILL) and removes their files. Their QEMUs
/// are left to `Lab::down`, which kills every process in the lab's namespaces.
pub fn stop_agents(lab: &str) -> Vec<u32> {
    let mut stopped = Vec::new();
    if let Ok(agents) = LabAgents::load(lab) {
        for a in agents.agents.values() {
            if !pid_alive(a.pid) {
                continue;
            }
            let _ = tern_lab::kill_process(a.pid, tern_lab::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while pid_alive(a.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(a.pid) {
                let _ = tern_lab::kill_process(a.pid, tern_lab::Signal::SIGKILL);
            }
            stopped.push(a.pid);
        }
    }
    LabAgents::remove(lab);
    let _ = std::fs::remove_dir_all(lab_agents_dir(lab));
    stopped
}

/// Prints the agents of a lab, and whether they authenticate anyone.
pub fn print_agents(agents: &LabAgents) {
    match &agents.pki_dir {
        Some(dir) => println!(
            "agents serve mutual TLS with lab certificates ({}; the CLI uses user lab-admin); \
             migration streams are encrypted",
            dir.display()
        ),
        None => println!(
            "agents serve PLAIN HTTP on loopback without authentication (lab mode; every \
             request acts as admin) and migration streams are not encrypted; use --tls for \
             mutual TLS"
        ),
    }
    for (host, a) in &agents.agents {
        println!(
            "agent {host:<4} {} (pid {}, log {})",
            a.url,
            a.pid,
            a.log.display()
        );
    }
}
