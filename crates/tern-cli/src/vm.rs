//! `tern vm create|list|show|stop`: guests on the hosts' agents.

use clap::{Args, Subcommand};
use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_qemu::{PostCopyPermission, VmMigrationSettings, VmSpec};

use crate::Failure;
use crate::client::{AgentsClient, ClusterClient, PlacedVm};
use crate::output::{OutputArgs, OutputFormat, print_json};

/// Which agents to talk to: `--agent URL` (repeatable) or the agents of a lab.
#[derive(Debug, Clone, Args)]
pub struct AgentTarget {
    /// Agent base URL (e.g. http://127.0.0.1:7701); repeat for several hosts.
    #[arg(long = "agent", global = true)]
    pub agents: Vec<String>,
    /// Lab whose agents to use (started by `tern lab up --agents` or `tern lab agents`).
    #[arg(long, global = true, default_value = "tern")]
    pub lab: String,
}

impl AgentTarget {
    /// Connects to the agents.
    pub async fn connect(&self) -> Result<AgentsClient, Failure> {
        Ok(AgentsClient::connect(&self.agents, &self.lab).await?)
    }
}

/// `tern vm` subcommands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a guest (the tern-load test workload) on a host.
    Create(CreateArgs),
    /// List guests on every host (or one).
    List(ListArgs),
    /// Show one guest.
    Show(ShowArgs),
    /// Stop a guest (refused while it migrates).
    Stop(StopArgs),
}

/// `tern vm create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name (a-z, 0-9, '-').
    name: String,
    /// Host to boot it on.
    #[arg(long)]
    host: String,
    /// Guest RAM: MiB (256) or with a unit (512M, 1G); default: what the working set needs.
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Working set the guest writes and verifies, in MiB.
    #[arg(long, default_value_t = 32)]
    working_set: u32,
    /// Page writes per second, or `max`.
    #[arg(long, default_value = "1000")]
    dirty_rate: PageRate,
    /// Write pattern: seq, random or bursty (2 s of writes at the rate, 2 s idle).
    #[arg(long, default_value = "seq")]
    pattern: WritePattern,
    /// The VM's post-copy permission (allowed or forbidden).
    #[arg(long, default_value = "allowed")]
    post_copy: PostCopyPermission,
    /// The VM's SLA class (latency-critical, standard, batch).
    #[arg(long, default_value = "standard")]
    sla_class: String,
    /// The VM's own downtime limit in ms.
    #[arg(long)]
    max_downtime_ms: Option<u64>,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `tern vm list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this host.
    #[arg(long)]
    host: Option<String>,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `tern vm show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// VM name.
    name: String,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `tern vm stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// VM name.
    name: String,
    #[command(flatten)]
    target: AgentTarget,
}

/// Runs a `tern vm` command.
pub async fn run(cmd: VmCommand) -> Result<(), Failure> {
    match cmd {
        VmCommand::Create(a) => create(a).await,
        VmCommand::List(a) => {
            let c = a.target.connect().await?;
            let vms = c.list_vms(a.host.as_deref()).await?;
            match a.out.output {
                OutputFormat::Json => print_json(&vms)?,
                OutputFormat::Text => {
                    println!(
                        "{:<16} {:<6} {:<9} {:<12} {:>8} {:>8}",
                        "NAME", "HOST", "ROLE", "STATE", "MEM MiB", "PID"
                    );
                    for p in &vms {
                        println!(
                            "{:<16} {:<6} {:<9} {:<12} {:>8} {:>8}",
                            p.vm.spec.name,
                            p.host,
                            role(&p.vm.role),
                            p.vm.run_state,
                            p.vm.spec.memory_mib,
                            p.vm.pid
                        );
                    }
                }
            }
            Ok(())
        }
        VmCommand::Show(a) => {
            let c = a.target.connect().await?;
            let p = c.find_vm(&a.name).await?;
            match a.out.output {
                OutputFormat::Json => print_json(&p)?,
                OutputFormat::Text => print_vm(&p),
            }
            Ok(())
        }
        VmCommand::Stop(a) => {
            let c = a.target.connect().await?;
            let host = c.stop_vm(&a.name).await?;
            println!("VM {} stopped on host {host}", a.name);
            Ok(())
        }
    }
}

fn role(r: &tern_agent::VmRole) -> &'static str {
    match r {
        tern_agent::VmRole::Running => "running",
        tern_agent::VmRole::Incoming => "incoming",
    }
}

fn print_vm(p: &PlacedVm) {
    println!("name        {}", p.vm.spec.name);
    println!("host        {}", p.host);
    println!("role        {}", role(&p.vm.role));
    println!("state       {}", p.vm.run_state);
    println!(
        "memory      {} MiB, {} vCPU(s)",
        p.vm.spec.memory_mib, p.vm.spec.vcpus
    );
    println!("accelerator {}", p.vm.spec.accelerator);
    println!(
        "migration   post-copy {:?}, SLA class {}, max downtime {}",
        p.vm.spec.migration.post_copy,
        p.vm.spec.migration.sla_class,
        p.vm.spec
            .migration
            .max_downtime_ms
            .map_or("from the SLA class".to_string(), |d| format!("{d} ms"))
    );
    println!("pid         {}", p.vm.pid);
    println!("serial log  {}", p.vm.serial_log.display());
}

async fn create(a: CreateArgs) -> Result<(), Failure> {
    let workload = WorkloadParams {
        working_set_mib: a.working_set,
        rate: a.dirty_rate,
        pattern: a.pattern,
        verify: true,
    };
    let needed = workload.recommended_memory_mib();
    let memory = a.memory.unwrap_or(needed);
    if memory < needed {
        return Err(Failure::input(anyhow::anyhow!(
            "--memory {memory} MiB is too small for --working-set {} MiB: give at least {needed} MiB",
            a.working_set
        )));
    }
    tern_policy::SlaCatalog::builtin()
        .get(&a.sla_class)
        .map_err(Failure::input)?;
    let c = a.target.connect().await?;
    // Fail on a bad host before building or probing anything.
    c.agent(&a.host)?;
    let text = a.out.output == OutputFormat::Text;
    let env = tokio::task::spawn_blocking(move || {
        tern_scenario::LabEnvironment::prepare(|s| {
            if text {
                eprintln!("· {s}");
            }
        })
    })
    .await
    .map_err(|e| Failure::failed(anyhow::anyhow!("setup task failed: {e}")))?
    .map_err(Failure::environment)?;
    let spec = VmSpec {
        name: a.name.clone(),
        memory_mib: memory,
        vcpus: a.vcpus,
        kernel: env.image.kernel.clone(),
        initrd: env.image.initrd.clone(),
        cmdline: env.image.cmdline(&workload),
        accelerator: env.accelerator.accelerator,
        devices: Default::default(),
        migration: VmMigrationSettings {
            post_copy: a.post_copy,
            max_downtime_ms: a.max_downtime_ms,
            sla_class: a.sla_class.clone(),
        },
    };
    spec.validate().map_err(Failure::input)?;
    let p = c.create_vm(&a.host, &spec).await?;
    match a.out.output {
        OutputFormat::Json => print_json(&p)?,
        OutputFormat::Text => println!(
            "VM {} booting on host {} (pid {}, {} MiB, {}); serial log {}",
            p.vm.spec.name,
            p.host,
            p.vm.pid,
            p.vm.spec.memory_mib,
            p.vm.spec.accelerator,
            p.vm.serial_log.display()
        ),
    }
    Ok(())
}

/// `--memory`: MiB or a size with a unit, within the agent's bounds.
fn parse_memory(s: &str) -> Result<u64, String> {
    tern_agent::bounds::parse_memory_mib(s).map_err(|e| e.to_string())
}
