//! `tern`: the command-line entry point. Each subcommand is a thin wrapper over a library
//! crate; this file only parses arguments, prints, and maps errors to exit codes.
//!
//! Exit codes scripts can rely on: 0 success; 1 the operation ran and failed (a migration that
//! did not complete, integrity violated); 2 bad input (clap's own usage errors are 2 too);
//! 3 the environment is not ready (QEMU missing or too old, not root).

mod agent;
mod audit;
mod client;
mod demo;
mod demo_agents;
mod demo_evacuate;
mod fleet_sim;
mod guest;
mod ha_cluster;
mod host;
mod lab;
mod lab_agents;
mod migrate;
mod output;
mod pki;
mod server_client;
mod server_cmd;
mod vm;

use clap::{Parser, Subcommand};

/// tern: live migration of QEMU/KVM guests that finishes when it must and never loses a VM.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about, propagate_version = true)]
struct Cli {
    /// More logging (repeat for more); also honours RUST_LOG.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a live migration end to end on two lab hosts with a real guest, and judge it.
    Demo(demo::DemoArgs),
    /// Build the guest image (kernel + initramfs with tern-load).
    #[command(subcommand)]
    Guest(guest::GuestCommand),
    /// Lab hosts: network namespaces joined by a shaped link.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Check that this machine can run tern (QEMU version, accelerator, root).
    Check(output::OutputArgs),
    /// Simulate migrations: compare tern's policy with the baselines on generated scenarios.
    Sim(tern_sim::SimArgs),
    /// Benchmark tern against every baseline policy on real lab migrations.
    Bench(tern_bench::BenchArgs),
    /// Run the host agent (HTTP API; owns this host's QEMUs and outgoing migrations).
    Agent(agent::AgentArgs),
    /// Hosts as their agents report them.
    #[command(subcommand)]
    Host(host::HostCommand),
    /// Guests on the hosts' agents.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Live-migrate a VM to another host.
    Migrate(migrate::MigrateArgs),
    /// Inspect and steer migrations.
    #[command(subcommand)]
    Migration(migrate::MigrationCommand),
    /// The installation's certificate authority: init, issue host/user, revoke, list.
    Pki(pki::PkiArgs),
    /// Run the cluster controller (HTTP API over every agent; evacuations).
    Server(server_cmd::ServerArgs),
    /// Who did what: the agents' audit logs (every mutating request with its identity).
    Audit(audit::AuditArgs),
    /// Run a controller against N simulated hosts and M VMs and measure it (issue 12).
    FleetSim(fleet_sim::FleetSimArgs),
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    /// Process exit code.
    pub code: i32,
    /// What went wrong.
    pub error: anyhow::Error,
}

impl Failure {
    /// Bad input (exit code 2).
    pub fn input(e: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 2,
            error: e.into(),
        }
    }
    /// Environment not ready (exit code 3).
    pub fn environment(e: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 3,
            error: e.into(),
        }
    }
    /// The operation failed (exit code 1).
    pub fn failed(e: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 1,
            error: e.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self::failed(e)
    }
}

fn main() {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let env_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    // Logs read by a machine (a daemon under systemd, a file, a pipe) are one JSON object per
    // line; a person at a terminal gets the readable form.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(3);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(a) => demo::run(a).await,
            Command::Guest(c) => guest::run(c),
            Command::Lab(c) => lab::run(c).await,
            Command::Check(o) => output::check(o),
            Command::Bench(a) => match tern_bench::run(a).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(Failure {
                    code,
                    error: anyhow::anyhow!("benchmark finished with regressions or failures"),
                }),
                Err(e) => Err(Failure::failed(e)),
            },
            Command::Sim(a) => match tern_sim::run(&a) {
                Ok(text) => {
                    print!("{text}");
                    Ok(())
                }
                Err(e) => Err(Failure::input(e)),
            },
            Command::Agent(a) => agent::run(a).await,
            Command::Host(c) => host::run(c).await,
            Command::Vm(c) => vm::run(c).await,
            Command::Migrate(a) => migrate::migrate(a).await,
            Command::Migration(c) => migrate::run(c).await,
            Command::Pki(a) => pki::run(a),
            Command::Server(a) => server_cmd::run(a).await,
            Command::Audit(a) => audit::run(a).await,
            Command::FleetSim(a) => fleet_sim::run(a).await,
        }
    });
    if let Err(f) = result {
        eprintln!("error: {:#}", f.error);
        std::process::exit(f.code);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(std::iter::once("tern").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    /// Flags are parsed into typed values with the agent's own bounds: what the CLI accepts,
    /// the API accepts, and the other way round.
    #[test]
    fn flags_are_typed_and_bounded_like_the_api() {
        let Ok(Cli {
            command: Command::Demo(d),
            ..
        }) = parse(&[
            "demo",
            "--fault",
            "kill-source-agent-postcopy,link-cut-postcopy:10@2",
            "--fault",
            "kill-dest-qemu-precopy@3",
        ])
        else {
            panic!("demo flags refused");
        };
        assert_eq!(
            d.fault_names(),
            [
                "kill-source-agent-postcopy",
                "link-cut-postcopy:10s@2",
                "kill-dest-qemu-precopy@3"
            ]
        );
        let e = parse(&["demo", "--fault", "link-cut-postcopy:10,nuke"])
            .err()
            .unwrap();
        assert!(e.contains("nuke"), "{e}");

        assert!(parse(&["vm", "create", "web", "--host", "h1", "--memory", "1G"]).is_ok());
        let e = parse(&["vm", "create", "web", "--host", "h1", "--memory", "1X"])
            .err()
            .unwrap();
        assert!(e.contains("1X") && e.contains("512M"), "{e}");

        let e = parse(&["migrate", "web", "--to", "h2", "--deadline", "0"])
            .err()
            .unwrap();
        assert!(e.contains("deadline 0 s") && e.contains("> 0"), "{e}");
        let e = parse(&["migrate", "web", "--to", "h2", "--policy", "vmware"])
            .err()
            .unwrap();
        assert!(e.contains("vmware") && e.contains("nova-2016"), "{e}");
        let e = parse(&["migration", "set-bandwidth", "m1", "1bit"])
            .err()
            .unwrap();
        assert!(e.contains("1bit") && e.contains("8kbit"), "{e}");
        assert!(parse(&["migration", "set-bandwidth", "m1", "100mbit"]).is_ok());
    }
}
