//! `tern lab up|down|status|fault`: lab hosts for trying migrations on one machine.

use std::time::Duration;

use clap::{Args, Subcommand};
use tern_lab::{FaultMode, Lab, LabSpec, LinkRate};

use crate::Failure;
use crate::output::{OutputArgs, OutputFormat, print_json, require_root};

/// Lab commands.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create N hosts (network namespaces) joined by a switch, with shaped links.
    Up(UpArgs),
    /// Remove a lab and everything in it (works after a crash too).
    Down(DownArgs),
    /// Show labs, hosts, addresses, link rates and states, and processes per host.
    Status(StatusArgs),
    /// Cut a host's link (for a duration, or until `--restore`).
    Fault(FaultArgs),
    /// Start (or restart) one agent per lab host, as background processes.
    Agents(AgentsArgs),
}

/// Where the agents of a lab listen and what their hosts offer.
#[derive(Debug, Clone, Args)]
pub struct AgentOpts {
    /// The agent of host hN listens on 127.0.0.1:(BASE + N).
    #[arg(long, default_value_t = 7700)]
    agent_port_base: u16,
    /// Memory each host's agent offers to guests, in MiB.
    #[arg(long, default_value_t = 4096)]
    agent_memory_mib: u64,
    /// Serve the agents with mutual TLS and encrypt migration streams, with lab certificates
    /// made for this lab (a CA, one host certificate per host, an admin `lab-admin` the CLI
    /// uses). Without it the agents speak plain HTTP on loopback with no authentication.
    #[arg(long)]
    tls: bool,
}

impl AgentOpts {
    fn settings(&self) -> crate::lab_agents::LabAgentSettings {
        crate::lab_agents::LabAgentSettings {
            port_base: self.agent_port_base,
            memory_mib: self.agent_memory_mib,
            deny_post_copy_hosts: Vec::new(),
            tls: self.tls,
        }
    }
}

/// `lab agents`.
#[derive(Debug, Args)]
pub struct AgentsArgs {
    /// Lab name.
    #[arg(long, default_value = "tern")]
    name: String,
    #[command(flatten)]
    opts: AgentOpts,
}

/// `lab up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of hosts (2 to 8).
    #[arg(long, default_value_t = 2)]
    hosts: usize,
    /// Rate of every host link, e.g. 1gbit, 300mbit, 100mbps (bytes); default unshaped.
    #[arg(long)]
    link_rate: Option<LinkRate>,
    /// Lab name (namespaces are tern-NAME-hN).
    #[arg(long, default_value = "tern")]
    name: String,
    /// Also start one agent per host (`tern lab agents`).
    #[arg(long)]
    agents: bool,
    #[command(flatten)]
    agent_opts: AgentOpts,
    #[command(flatten)]
    out: OutputArgs,
}

/// `lab down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Lab name.
    #[arg(long, default_value = "tern", conflicts_with = "all")]
    name: String,
    /// Remove every tern lab on this machine.
    #[arg(long)]
    all: bool,
}

/// `lab status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    out: OutputArgs,
}

/// `lab fault`.
#[derive(Debug, Args)]
pub struct FaultArgs {
    /// Host whose link to cut, or whose process to kill (h1, h2, …).
    host: String,
    /// blackhole (silently drop everything) or link-down (carrier loss).
    #[arg(long, default_value = "blackhole")]
    mode: FaultMode,
    /// Restore after this many seconds; without it the link stays cut until --restore.
    #[arg(long)]
    duration: Option<f64>,
    /// Restore the host's link now.
    #[arg(long)]
    restore: bool,
    /// Instead of cutting the link, kill (SIGKILL, by PID) a process of the host:
    /// `agent` (the host's agent) or `qemu:VM` (the QEMU of VM on this host). Needs the lab's
    /// agents (`tern lab up --agents`).
    #[arg(long)]
    kill: Option<KillTarget>,
    /// Wait until migration `--migration ID` is in this phase (precopy, postcopy,
    /// postcopy-paused, recovering) before acting.
    #[arg(long, requires = "migration")]
    when: Option<FaultPhase>,
    /// The migration `--when` watches (through the lab's agents).
    #[arg(long, requires = "when")]
    migration: Option<String>,
    /// With `--when`: act this many seconds into the phase.
    #[arg(long, requires = "when", default_value_t = 0.0)]
    after: f64,
    /// Lab name.
    #[arg(long, default_value = "tern")]
    name: String,
}

/// A process `tern lab fault --kill` kills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillTarget {
    /// The host's agent.
    Agent,
    /// The QEMU running this VM on the host.
    Qemu(String),
}

impl std::str::FromStr for KillTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "agent" => Ok(Self::Agent),
            Some(("qemu", vm)) if !vm.is_empty() => Ok(Self::Qemu(vm.to_string())),
            _ => Err(format!(
                "unknown process {s:?}: valid are `agent` or `qemu:VM` (e.g. qemu:web)"
            )),
        }
    }
}

/// A migration phase `tern lab fault --when` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultPhase {
    /// Pre-copy passes are running.
    Precopy,
    /// The guest runs on the destination, pages still arrive.
    Postcopy,
    /// Post-copy paused by a broken channel.
    PostcopyPaused,
    /// tern is re-establishing a paused post-copy.
    Recovering,
}

impl FaultPhase {
    fn state(self) -> tern_engine::MigrationState {
        use tern_engine::MigrationState as S;
        match self {
            Self::Precopy => S::Precopy,
            Self::Postcopy => S::Postcopy,
            Self::PostcopyPaused => S::PostcopyPaused,
            Self::Recovering => S::Recovering,
        }
    }
}

/// Waits until migration `id` is in `phase` (polling the lab's agents every 200 ms), then
/// `after` more. Fails, injecting nothing, when the migration ends first.
async fn wait_for_phase(lab: &str, id: &str, phase: FaultPhase, after: f64) -> Result<(), Failure> {
    use crate::client::ClusterClient;
    if !(0.0..86_400.0).contains(&after) {
        return Err(Failure::input(anyhow::anyhow!(
            "--after {after} is invalid: give seconds between 0 and 86400"
        )));
    }
    let client = crate::client::AgentsClient::connect(&[], lab).await?;
    let want = phase.state();
    eprintln!("waiting for migration {id} to be in {want} …");
    loop {
        let view = client.migration(id, u64::MAX).await?;
        let state = view.record.state;
        if state == want {
            break;
        }
        if state.is_terminal() {
            return Err(Failure::failed(anyhow::anyhow!(
                "migration {id} ended ({state}) before it was in {want}: nothing injected"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs_f64(after)).await;
    Ok(())
}

/// `lab fault`: cut or restore a link, or kill a process, at once or at a migration phase.
async fn fault(a: FaultArgs) -> Result<(), Failure> {
    let lab = Lab::load(&a.name).map_err(Failure::input)?;
    lab.host(&a.host).map_err(Failure::input)?;
    if a.restore && (a.kill.is_some() || a.when.is_some() || a.duration.is_some()) {
        return Err(Failure::input(anyhow::anyhow!(
            "--restore restores the link now: it takes no --kill, --when or --duration"
        )));
    }
    if a.kill.is_some() && a.duration.is_some() {
        return Err(Failure::input(anyhow::anyhow!(
            "--duration applies to link cuts, not to --kill"
        )));
    }
    if let (Some(phase), Some(id)) = (a.when, &a.migration) {
        wait_for_phase(&a.name, id, phase, a.after).await?;
    }
    match &a.kill {
        Some(target) => {
            let (what, pid) = match target {
                KillTarget::Agent => {
                    let agents =
                        tern_lab::agents::LabAgents::load(&a.name).map_err(Failure::environment)?;
                    let agent = agents.agents.get(&a.host).ok_or_else(|| {
                        Failure::input(anyhow::anyhow!(
                            "lab {} has no agent for {} (start them with `tern lab agents --name {}`)",
                            a.name,
                            a.host,
                            a.name
                        ))
                    })?;
                    (format!("the agent of {}", a.host), agent.pid)
                }
                KillTarget::Qemu(vm) => {
                    let client = crate::client::AgentsClient::connect(&[], &a.name).await?;
                    let info = client
                        .agent(&a.host)?
                        .show_vm(vm)
                        .await
                        .map_err(crate::client::ClusterError::from)?;
                    (format!("the QEMU of {vm} on {}", a.host), info.pid)
                }
            };
            tern_lab::kill_process(pid, tern_lab::Signal::SIGKILL).map_err(Failure::failed)?;
            println!("{}: killed {what} (pid {pid}, SIGKILL)", a.host);
            if *target == KillTarget::Agent {
                println!(
                    "restart it with `tern lab agents --name {}` (it re-attaches to its QEMUs)",
                    a.name
                );
            }
        }
        None if a.restore => {
            lab.restore_link(&a.host).map_err(Failure::input)?;
            println!("{}: link restored", a.host);
        }
        None => match a.duration {
            Some(secs) => {
                if !(secs > 0.0 && secs < 86_400.0) {
                    return Err(Failure::input(anyhow::anyhow!(
                        "--duration {secs} is invalid: give seconds between 0 and 86400"
                    )));
                }
                println!("{}: link cut ({}) for {secs} s", a.host, a.mode);
                lab.cut_link(&a.host, a.mode).map_err(Failure::input)?;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                lab.restore_link(&a.host).map_err(Failure::input)?;
                println!("{}: link restored", a.host);
            }
            None => {
                lab.cut_link(&a.host, a.mode).map_err(Failure::input)?;
                println!(
                    "{}: link cut ({}); restore with `tern lab fault {} --restore`",
                    a.host, a.mode, a.host
                );
            }
        },
    }
    Ok(())
}

/// Runs a lab command.
pub async fn run(cmd: LabCommand) -> Result<(), Failure> {
    require_root("tern lab")?;
    match cmd {
        LabCommand::Up(a) => {
            let lab = Lab::up(&LabSpec {
                name: a.name,
                hosts: a.hosts,
                link_rate: a.link_rate,
                link_delay: None,
            })
            .map_err(Failure::input)?;
            let status = lab.status()?;
            let agents = if a.agents {
                Some(crate::lab_agents::ensure_agents(
                    &lab,
                    a.agent_opts.settings(),
                )?)
            } else {
                None
            };
            match a.out.output {
                OutputFormat::Json => match &agents {
                    Some(ag) => print_json(&serde_json::json!({"lab": status, "agents": ag}))?,
                    None => print_json(&status)?,
                },
                OutputFormat::Text => {
                    print!("{status}");
                    if let Some(ag) = &agents {
                        crate::lab_agents::print_agents(ag);
                    }
                }
            }
        }
        LabCommand::Down(a) => {
            let reports = if a.all {
                for l in Lab::list().unwrap_or_default() {
                    crate::lab_agents::stop_agents(l.name());
                }
                tern_lab::down_all()?
            } else {
                let stopped = crate::lab_agents::stop_agents(&a.name);
                if !stopped.is_empty() {
                    println!("lab {}: stopped {} agent(s)", a.name, stopped.len());
                }
                vec![Lab::down(&a.name).map_err(Failure::input)?]
            };
            for r in reports {
                println!(
                    "lab {}: removed {} namespace(s), stopped {} process(es)",
                    r.name,
                    r.namespaces_removed.len(),
                    r.processes_killed.len()
                );
            }
        }
        LabCommand::Status(a) => {
            let labs = Lab::list()?;
            let mut statuses = Vec::new();
            for l in &labs {
                statuses.push(l.status()?);
            }
            match a.out.output {
                OutputFormat::Json => print_json(&statuses)?,
                OutputFormat::Text => {
                    if statuses.is_empty() {
                        println!("no lab is up (create one with `tern lab up`)");
                    }
                    for s in statuses {
                        print!("{s}");
                    }
                }
            }
        }
        LabCommand::Agents(a) => {
            let lab = Lab::load(&a.name).map_err(Failure::input)?;
            let agents = crate::lab_agents::ensure_agents(&lab, a.opts.settings())?;
            crate::lab_agents::print_agents(&agents);
        }
        LabCommand::Fault(a) => fault(a).await?,
    }
    Ok(())
}
