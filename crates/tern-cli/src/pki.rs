//! `tern pki`: the installation's certificate authority (init, issue, revoke, list).
//!
//! A thin wrapper over `tern-pki`. The CA key never leaves `--dir` (default
//! `/etc/tern/pki`, 0700); hosts and users get their own certificate and key plus the CA
//! certificate, copied from `DIR/issued/KIND/NAME/`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use tern_pki::{CertKind, IssuedCert, Pki, PkiError, Role, Validity};

use crate::Failure;
use crate::output::{OutputArgs, OutputFormat, print_json};

/// `tern pki [--dir D] ...`.
#[derive(Debug, Args)]
pub struct PkiArgs {
    /// The PKI directory (created 0700 by `init`; holds the CA key).
    #[arg(long, global = true, default_value = tern_pki::DEFAULT_PKI_DIR)]
    dir: PathBuf,
    #[command(subcommand)]
    command: PkiCommand,
}

/// `tern pki` subcommands.
#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the installation's CA (refuses to overwrite an existing one).
    Init,
    /// Issue a certificate (a new one for an existing name rotates it: both stay valid).
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Revoke a certificate by serial (as `tern pki list` prints it) or certificate file.
    Revoke {
        /// Hex serial (colons allowed) or path to a PEM certificate.
        serial_or_file: String,
    },
    /// Every issued certificate: kind, name, role, serial, expiry, revoked.
    List(OutputArgs),
}

#[derive(Debug, Subcommand)]
enum IssueCommand {
    /// A host (agent) certificate: TLS server and client; SAN = NAME plus every --ip.
    Host {
        /// Host name (a-z, 0-9, '-', '.'), also the DNS name peers use.
        name: String,
        /// An address peers connect to (repeat for several).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// A user certificate with a role.
    User {
        /// User name (a-z, 0-9, '-', '.').
        name: String,
        /// viewer (read), operator (migrate, abort, force-complete, bandwidth, evacuate) or
        /// admin (host settings, VM create/stop).
        #[arg(long)]
        role: Role,
        /// Validity in days.
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Maps library errors to exit codes: what the user typed is 2, a directory we may not
/// touch is 3, the rest 1.
fn failure(e: PkiError) -> Failure {
    match &e {
        PkiError::InvalidName { .. }
        | PkiError::UnknownRole(_)
        | PkiError::InvalidSerial(_)
        | PkiError::InvalidValidity
        | PkiError::AlreadyInitialized(_)
        | PkiError::NotInitialized(_) => Failure::input(e),
        PkiError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            Failure::environment(anyhow::Error::new(e).context("run as root or choose --dir"))
        }
        _ => Failure::failed(e),
    }
}

fn print_issued(pki: &Pki, c: &IssuedCert, out: &OutputArgs) -> Result<(), Failure> {
    let kind = c.identity.kind.as_str();
    let current = pki.dir().join("issued").join(kind).join(&c.identity.name);
    match out.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "identity": c.identity,
            "cert": c.cert_path,
            "key": c.key_path,
            "current_cert": current.join("cert.pem"),
            "current_key": current.join("key.pem"),
            "ca_cert": pki.ca_cert_path(),
        })),
        OutputFormat::Text => {
            println!(
                "issued {kind} certificate {:?} role {} serial {}",
                c.identity.name, c.identity.role, c.identity.serial
            );
            println!("  certificate  {}", c.cert_path.display());
            println!("  key (0600)   {}", c.key_path.display());
            println!("  current      {}/{{cert,key}}.pem", current.display());
            println!("  CA           {}", pki.ca_cert_path().display());
            Ok(())
        }
    }
}

/// Runs a `tern pki` command.
pub fn run(args: PkiArgs) -> Result<(), Failure> {
    let dir = args.dir.as_path();
    match args.command {
        PkiCommand::Init => {
            let pki = Pki::init(dir).map_err(failure)?;
            println!("created the tern CA in {} (0700)", pki.dir().display());
            println!(
                "  CA certificate {} (copy it to every host and user)",
                pki.ca_cert_path().display()
            );
            println!(
                "  CA key         {} (0600; never leaves this directory)",
                pki.dir().join("ca-key.pem").display()
            );
            Ok(())
        }
        PkiCommand::Issue(IssueCommand::Host {
            name,
            ips,
            days,
            out,
        }) => {
            let pki = Pki::open(dir).map_err(failure)?;
            let c = pki
                .issue_host(&name, &ips, Validity::days(days))
                .map_err(failure)?;
            print_issued(&pki, &c, &out)
        }
        PkiCommand::Issue(IssueCommand::User {
            name,
            role,
            days,
            out,
        }) => {
            let pki = Pki::open(dir).map_err(failure)?;
            let c = pki
                .issue_user(&name, role, Validity::days(days))
                .map_err(failure)?;
            print_issued(&pki, &c, &out)
        }
        PkiCommand::Revoke { serial_or_file } => {
            let pki = Pki::open(dir).map_err(failure)?;
            let serial = if Path::new(&serial_or_file).is_file() {
                pki.revoke_cert_file(Path::new(&serial_or_file))
            } else {
                pki.revoke(&serial_or_file)
            }
            .map_err(failure)?;
            let who = pki
                .list()
                .map_err(failure)?
                .into_iter()
                .find(|c| c.identity.serial == serial)
                .map(|c| format!(" ({} {:?})", c.identity.kind, c.identity.name))
                .unwrap_or_default();
            println!("revoked serial {serial}{who}");
            println!(
                "  servers reading {} refuse it at their next handshake; hosts with their own copy need the updated file",
                pki.deny_list_path().display()
            );
            Ok(())
        }
        PkiCommand::List(out) => {
            let pki = Pki::open(dir).map_err(failure)?;
            let certs = pki.list().map_err(failure)?;
            match out.output {
                OutputFormat::Json => print_json(&certs),
                OutputFormat::Text => {
                    println!(
                        "{:<5} {:<20} {:<9} {:<33} {:<21} STATE",
                        "KIND", "NAME", "ROLE", "SERIAL", "EXPIRES (UTC)"
                    );
                    for c in &certs {
                        let state = if c.revoked {
                            "revoked"
                        } else if c.expired {
                            "expired"
                        } else {
                            "valid"
                        };
                        let expires = time::OffsetDateTime::from_unix_timestamp(c.not_after_unix)
                            .ok()
                            .and_then(|t| {
                                t.format(time::macros::format_description!(
                                    "[year]-[month]-[day] [hour]:[minute]"
                                ))
                                .ok()
                            })
                            .unwrap_or_else(|| c.not_after_unix.to_string());
                        let kind = match c.identity.kind {
                            CertKind::Host => "host",
                            CertKind::User => "user",
                        };
                        println!(
                            "{kind:<5} {:<20} {:<9} {:<33} {expires:<21} {state}",
                            c.identity.name,
                            c.identity.role.as_str(),
                            c.identity.serial
                        );
                    }
                    Ok(())
                }
            }
        }
    }
}
