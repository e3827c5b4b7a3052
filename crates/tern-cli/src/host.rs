//! `tern host`: facts of every host (from the agents, or from the controller with
//! `--server`), and through the controller `show`, `set` and `evacuate`.

use clap::{Args, Subcommand};

use crate::Failure;
use crate::client::ClusterClient;
use crate::output::{OutputArgs, OutputFormat, print_json};
use crate::vm::AgentTarget;

/// `tern host` subcommands.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Memory, QEMU version and migration capabilities, accelerator and limits of each host.
    List(ListArgs),
    /// One host as the controller knows it (needs --server or TERN_SERVER).
    Show(crate::server_client::ShowArgs),
    /// Post-copy permit/deny, outbound/inbound concurrency, drain (through the controller).
    Set(crate::server_client::SetArgs),
    /// Empty a host before a deadline, with a plan and a predicted makespan (controller).
    Evacuate(crate::server_client::EvacuateArgs),
}

/// `tern host list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    server: crate::server_client::ServerTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// Runs a `tern host` command.
pub async fn run(cmd: HostCommand) -> Result<(), Failure> {
    match cmd {
        HostCommand::Show(a) => crate::server_client::show_host(a).await,
        HostCommand::Set(a) => crate::server_client::set_host(a).await,
        HostCommand::Evacuate(a) => crate::server_client::evacuate(a).await,
        HostCommand::List(a) if a.server.url().is_some() => {
            crate::server_client::list_hosts(&a.server, &a.out).await
        }
        HostCommand::List(a) => {
            let c = a.target.connect().await?;
            let hosts = c.hosts().await?;
            match a.out.output {
                OutputFormat::Json => print_json(&hosts)?,
                OutputFormat::Text => {
                    for h in &hosts {
                        println!(
                            "{:<4} {} · memory {}/{} MiB free · QEMU {} · {} · post-copy {} · \
                             out/in {}/{} (max {}/{}) · migration address {}",
                            h.host,
                            h.netns.as_deref().unwrap_or("-"),
                            h.free_memory_mib,
                            h.memory_mib,
                            h.qemu_version,
                            h.accelerator,
                            if h.migration.permit_post_copy {
                                "permitted"
                            } else {
                                "denied"
                            },
                            h.outbound_migrations,
                            h.inbound_migrations,
                            h.migration.max_outbound,
                            h.migration.max_inbound,
                            h.migration_address
                        );
                        println!(
                            "     capabilities: {}",
                            h.migration_capabilities
                                .iter()
                                .map(|c| c.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                }
            }
            Ok(())
        }
    }
}
