//! `tern audit`: the agents' audit logs, merged in time order.
//!
//! Every mutating request an agent receives is recorded with the identity of the certificate
//! that made it (name, kind, role, serial) and how it ended, refused ones included
//! (`tern_agent::audit`). Reading the log needs an admin.

use clap::Args;
use serde::Serialize;
use tern_agent::audit::AuditEntry;

use crate::Failure;
use crate::output::{OutputArgs, OutputFormat, print_json};
use crate::vm::AgentTarget;

/// `tern audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The newest N records of each agent (1..=10000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// One record with the host whose agent kept it.
#[derive(Debug, Serialize)]
struct HostAuditEntry {
    host: String,
    #[serde(flatten)]
    entry: AuditEntry,
}

/// Runs `tern audit`.
pub async fn run(a: AuditArgs) -> Result<(), Failure> {
    let c = a.target.connect().await?;
    let mut all = Vec::new();
    for (host, agent) in c.agents() {
        let entries = agent
            .audit(a.limit)
            .await
            .map_err(|e| Failure::failed(anyhow::anyhow!("audit log of host {host}: {e}")))?;
        all.extend(entries.into_iter().map(|entry| HostAuditEntry {
            host: host.clone(),
            entry,
        }));
    }
    // RFC 3339 UTC timestamps of the same format sort as text.
    all.sort_by(|x, y| {
        (&x.entry.record.at, &x.host, x.entry.seq).cmp(&(&y.entry.record.at, &y.host, y.entry.seq))
    });
    match a.out.output {
        OutputFormat::Json => print_json(&all)?,
        OutputFormat::Text => {
            println!(
                "{:<25} {:<6} {:<20} {:<9} {:<7} {:<40} {:>6} {:<9} TARGET",
                "AT", "HOST", "IDENTITY", "ROLE", "METHOD", "PATH", "STATUS", "OUTCOME"
            );
            for e in &all {
                let r = &e.entry.record;
                let text = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                println!(
                    "{:<25} {:<6} {:<20} {:<9} {:<7} {:<40} {:>6} {:<9} {}",
                    r.at,
                    e.host,
                    text(r.identity.clone()),
                    text(r.role.map(|x| x.to_string())),
                    r.method,
                    r.path,
                    r.status,
                    serde_json::to_value(r.outcome)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    text(r.target.clone())
                );
            }
        }
    }
    Ok(())
}
