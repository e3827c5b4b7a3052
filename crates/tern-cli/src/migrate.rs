//! `tern migrate VM --to HOST` and `tern migration list|show|watch|force-complete|abort|
//! set-bandwidth`: migrations run by the source host's agent.

use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tern_agent::api::{MigrationView, StartMigrationRequest};
use tern_agent::store::{MigrationRecord, StoredEvent};
use tern_engine::{MigrationEventKind, MigrationState, OperatorCommand};
use tern_lab::LinkRate;
use tern_policy::{MigrationContext, PolicyName};

use crate::Failure;
use crate::client::{ClusterClient, ClusterError};
use crate::output::{OutputArgs, OutputFormat, print_json};
use crate::vm::AgentTarget;

/// `tern migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM to move.
    vm: String,
    /// Destination host (required without a controller; with --server the controller
    /// chooses when it is absent and says why).
    #[arg(long)]
    to: Option<String>,
    /// Why it moves: evacuate, balance, maintenance or manual.
    #[arg(long, default_value = "manual")]
    context: MigrationContext,
    /// Policy deciding the migration (tern, or a baseline).
    #[arg(long, default_value = tern_policy::DEFAULT_POLICY)]
    policy: PolicyName,
    /// Deadline in seconds (maintenance/evacuate); > 0.
    #[arg(long, value_parser = parse_deadline)]
    deadline: Option<u64>,
    /// Follow the migration with a progress bar until it ends (exit 1 unless it completed).
    #[arg(long)]
    watch: bool,
    /// Print the policy's plan and pre-flight estimate without migrating.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: measure the guest's dirty rate for this many seconds first (0-10).
    #[arg(long, default_value_t = 2)]
    probe: u64,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    server: crate::server_client::ServerTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `tern migration` subcommands.
#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// Migrations on every host, newest first.
    List(ListArgs),
    /// One migration with its events.
    Show(IdArgs),
    /// Follow a migration until it ends (exit 1 unless it completed).
    Watch(IdArgs),
    /// Finish now: post-copy if permitted, else pause the guest until the copy finishes.
    ForceComplete(OpArgs),
    /// Cancel (refused once post-copy started: the destination holds the guest).
    Abort(OpArgs),
    /// Change the bandwidth cap mid-flight (e.g. 100mbit, 50mbps).
    SetBandwidth(BandwidthArgs),
}

/// `migration list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `migration show|watch`.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Migration ID (from `tern migration list`).
    id: String,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `migration force-complete|abort`.
#[derive(Debug, Args)]
pub struct OpArgs {
    /// Migration ID.
    id: String,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `migration set-bandwidth`.
#[derive(Debug, Args)]
pub struct BandwidthArgs {
    /// Migration ID.
    id: String,
    /// New cap, e.g. 100mbit, 50mbps (bytes), 1gbit (8kbit to 400gbit).
    #[arg(value_parser = parse_bandwidth)]
    rate: LinkRate,
    #[command(flatten)]
    target: AgentTarget,
    #[command(flatten)]
    out: OutputArgs,
}

/// `--deadline`: the agent's bounds, checked before any request is sent.
fn parse_deadline(s: &str) -> Result<u64, String> {
    let v: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    tern_agent::bounds::check_deadline_s(v).map_err(|e| e.to_string())
}

/// A bandwidth within the agent's bounds (the same check the API makes).
fn parse_bandwidth(s: &str) -> Result<LinkRate, String> {
    let r: LinkRate = s
        .parse()
        .map_err(|e: tern_lab::LinkRateError| e.to_string())?;
    tern_agent::bounds::check_bandwidth("bandwidth", r.bytes_per_sec())
        .map_err(|e| e.to_string())?;
    Ok(r)
}

/// `tern migrate`.
pub async fn migrate(a: MigrateArgs) -> Result<(), Failure> {
    if a.server.url().is_some() {
        let ctx = a.context.to_string();
        return crate::server_client::migrate(
            &a.server,
            &a.vm,
            a.to.as_deref(),
            &ctx,
            a.watch,
            &a.out,
        )
        .await;
    }
    let to = a.to.clone().ok_or_else(|| {
        Failure::input(anyhow::anyhow!(
            "--to HOST is required when talking to agents directly (with --server URL the \
             controller chooses the destination)"
        ))
    })?;
    if a.probe > 10 {
        return Err(Failure::input(anyhow::anyhow!(
            "--probe {} is invalid: give 0 to 10 seconds",
            a.probe
        )));
    }
    let c = a.target.connect().await?;
    let req = StartMigrationRequest {
        vm: a.vm.clone(),
        to_host: to,
        context: a.context,
        policy: a.policy,
        deadline_s: a.deadline,
        link_bytes_per_s: None,
    };
    if a.dry_run {
        let plan = c.plan_migration(req, a.probe).await?;
        match a.out.output {
            OutputFormat::Json => print_json(&plan)?,
            OutputFormat::Text => print_plan(&a, &plan),
        }
        return Ok(());
    }
    let rec = c.start_migration(req).await?;
    if a.watch {
        return watch(&c, &rec.id, a.out.output).await;
    }
    match a.out.output {
        OutputFormat::Json => print_json(&rec)?,
        OutputFormat::Text => println!(
            "migration {} started: {} from {} to {} (follow it with `tern migration watch {}`)",
            rec.id, rec.vm, rec.source, rec.destination, rec.id
        ),
    }
    Ok(())
}

fn ms(v: Option<u64>) -> String {
    v.map_or("unknown".to_string(), |v| {
        format!("{:.1} s", v as f64 / 1000.0)
    })
}

fn print_plan(a: &MigrateArgs, p: &tern_policy::MigrationPlan) {
    let c = &p.capabilities;
    let caps: Vec<&str> = [
        ("postcopy-ram", c.postcopy_ram),
        ("postcopy-preempt", c.postcopy_preempt),
        ("auto-converge", c.auto_converge),
        ("dirty-limit", c.dirty_limit),
        ("multifd", c.multifd),
        ("xbzrle", c.xbzrle),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| n)
    .collect();
    let e = &p.estimate;
    println!(
        "dry run: {} → {} (context {}, policy {}); nothing was started",
        a.vm,
        a.to.as_deref().unwrap_or("?"),
        a.context,
        p.policy
    );
    println!(
        "post-copy     {} ({})",
        if p.post_copy.allowed {
            "permitted"
        } else {
            "not permitted"
        },
        p.post_copy.reason
    );
    println!(
        "capabilities  {}",
        if caps.is_empty() {
            "none".to_string()
        } else {
            caps.join(", ")
        }
    );
    println!(
        "parameters    downtime-limit {} ms, max-bandwidth {}",
        p.parameters.downtime_limit_ms,
        if p.parameters.max_bandwidth_bytes_per_s == 0 {
            "unlimited".to_string()
        } else {
            format!("{:.1} MiB/s", mib(p.parameters.max_bandwidth_bytes_per_s))
        }
    );
    println!("deadline      {}", ms(p.deadline_ms));
    println!(
        "estimate      link {}, dirty {}, first pass {}, pre-copy {} ({}), post-copy {}",
        e.link_bytes_per_s
            .map_or("unknown".into(), |l| format!("{:.1} MiB/s", mib(l))),
        e.dirty_bytes_per_s
            .map_or("unknown".into(), |d| format!("{:.1} MiB/s", mib(d))),
        ms(e.first_pass_ms),
        ms(e.precopy_total_ms),
        if e.converges {
            "converges"
        } else {
            "does not converge"
        },
        ms(e.postcopy_total_ms)
    );
    for r in &p.reasons {
        println!("reason        {r}");
    }
}

/// Runs a `tern migration` command.
pub async fn run(cmd: MigrationCommand) -> Result<(), Failure> {
    match cmd {
        MigrationCommand::List(a) => {
            let c = a.target.connect().await?;
            let list = c.list_migrations().await?;
            match a.out.output {
                OutputFormat::Json => print_json(&list)?,
                OutputFormat::Text => {
                    println!(
                        "{:<28} {:<12} {:<6} {:<6} {:<16} {:<12} {:>8}",
                        "ID", "VM", "FROM", "TO", "STATE", "CONTEXT", "TIME s"
                    );
                    for m in &list {
                        println!(
                            "{:<28} {:<12} {:<6} {:<6} {:<16} {:<12} {:>8.1}",
                            m.id,
                            m.vm,
                            m.source,
                            m.destination,
                            m.state.to_string(),
                            m.context,
                            duration_s(m)
                        );
                    }
                }
            }
            Ok(())
        }
        MigrationCommand::Show(a) => {
            let c = a.target.connect().await?;
            let v = c.migration(&a.id, 0).await?;
            match a.out.output {
                OutputFormat::Json => print_json(&v)?,
                OutputFormat::Text => print_view(&v),
            }
            Ok(())
        }
        MigrationCommand::Watch(a) => {
            let c = a.target.connect().await?;
            watch(&c, &a.id, a.out.output).await
        }
        MigrationCommand::ForceComplete(a) => {
            operator(a.target, &a.id, OperatorCommand::ForceComplete, a.out).await
        }
        MigrationCommand::Abort(a) => {
            operator(a.target, &a.id, OperatorCommand::Abort, a.out).await
        }
        MigrationCommand::SetBandwidth(a) => {
            operator(
                a.target,
                &a.id,
                OperatorCommand::SetBandwidth {
                    bytes_per_s: a.rate.bytes_per_sec(),
                },
                a.out,
            )
            .await
        }
    }
}

async fn operator(
    target: AgentTarget,
    id: &str,
    command: OperatorCommand,
    out: OutputArgs,
) -> Result<(), Failure> {
    let c = target.connect().await?;
    let reply = c.operator(id, command).await.map_err(|e| match e {
        // A refused command (e.g. abort after the switch) is bad input for this state.
        ClusterError::BadInput(m) => Failure::input(anyhow::anyhow!("refused: {m}")),
        other => other.into(),
    })?;
    match out.output {
        OutputFormat::Json => print_json(&reply)?,
        OutputFormat::Text => println!("{}", reply.result),
    }
    Ok(())
}

fn duration_s(m: &MigrationRecord) -> f64 {
    let end = m.finished_ms.unwrap_or(m.updated_ms);
    end.saturating_sub(m.created_ms) as f64 / 1000.0
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn event_line(e: &StoredEvent) -> String {
    let t = e.event.at_ms as f64 / 1000.0;
    match &e.event.kind {
        MigrationEventKind::State { from, to, reason } => {
            format!("{t:>7.1}s  state     {from} → {to}: {reason}")
        }
        MigrationEventKind::Decision { action, reason } => {
            format!("{t:>7.1}s  decision  {action}: {reason}")
        }
        MigrationEventKind::Pass {
            pass,
            remaining_bytes,
            dirty_bytes_per_s,
            throughput_bytes_per_s,
            ..
        } => format!(
            "{t:>7.1}s  pass {pass:<4} left {:.1} MiB, dirty {:.1} MiB/s, throughput {:.1} MiB/s",
            mib(*remaining_bytes),
            mib(*dirty_bytes_per_s),
            mib(*throughput_bytes_per_s)
        ),
        MigrationEventKind::Operator { command, result } => {
            format!("{t:>7.1}s  operator  {command}: {result}")
        }
        MigrationEventKind::Note { text } => format!("{t:>7.1}s  note      {text}"),
        #[allow(unreachable_patterns)]
        other => format!("{t:>7.1}s  {other:?}"),
    }
}

fn print_view(v: &MigrationView) {
    let m = &v.record;
    println!("id           {}", m.id);
    println!("vm           {}", m.vm);
    println!("from → to    {} → {}", m.source, m.destination);
    println!("state        {}", m.state);
    println!("context      {} (policy {})", m.context, m.policy);
    println!(
        "stream       {}",
        if m.stream_encrypted {
            "encrypted (TLS, host certificates)"
        } else {
            "NOT encrypted (migration_tls = off)"
        }
    );
    println!("duration     {:.1} s", duration_s(m));
    if let Some(e) = &m.error {
        println!("error        {e}");
    }
    if let Some(r) = &m.report {
        println!(
            "sent         {:.1} MiB of {:.0} MiB RAM in {} pass(es); post-copy {}; paused {}",
            mib(r.bytes_sent),
            mib(r.ram_bytes),
            r.passes,
            r.switched_to_postcopy,
            r.paused_guest
        );
    }
    if let Some(p) = &v.progress {
        println!(
            "progress     {} · {:.0} MiB left of {:.0} MiB",
            p.qemu_status,
            mib(p.remaining_bytes),
            mib(p.total_bytes)
        );
    }
    println!("events:");
    for e in &v.events {
        println!("  {}", event_line(e));
    }
}

/// Follows a migration until it reaches a terminal state; exit 1 unless it completed.
async fn watch(c: &dyn ClusterClient, id: &str, out: OutputFormat) -> Result<(), Failure> {
    let text = out == OutputFormat::Text;
    let bar = if text {
        let b = ProgressBar::new(100);
        b.set_style(
            ProgressStyle::with_template("  {prefix:>15} [{bar:30}] {pos:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let mut after = 0u64;
    let mut unreachable_since: Option<std::time::Instant> = None;
    let last = loop {
        let v = match c.migration(id, after).await {
            Ok(v) => {
                unreachable_since = None;
                v
            }
            Err(ClusterError::Unreachable(e)) => {
                // The source agent may be restarting; it settles the migration when back.
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(60) {
                    return Err(Failure::environment(anyhow::anyhow!(
                        "lost contact with the source agent for 60 s: {e}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for e in &v.events {
            after = after.max(e.seq);
            if let Some(b) = &bar
                && matches!(
                    e.event.kind,
                    MigrationEventKind::State { .. }
                        | MigrationEventKind::Decision { .. }
                        | MigrationEventKind::Operator { .. }
                )
            {
                if b.is_hidden() {
                    // Not a terminal (a script, a log): plain lines on stderr.
                    eprintln!("{}", event_line(e));
                } else {
                    b.println(event_line(e));
                }
            }
        }
        if let (Some(b), Some(p)) = (&bar, &v.progress) {
            let pct = (p.remaining_bytes.min(p.total_bytes) * 100)
                .checked_div(p.total_bytes)
                .map_or(0, |left| 100 - left);
            b.set_prefix(
                p.state
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| p.qemu_status.clone()),
            );
            b.set_position(pct);
            let link = v
                .record
                .link_bytes_per_s
                .map(|l| format!("{:.1} MiB/s", mib(l)))
                .unwrap_or_else(|| "unknown".into());
            let eta = p
                .eta_ms
                .map(|e| format!("ETA {:.1} s", e as f64 / 1000.0))
                .unwrap_or_else(|| "ETA —".into());
            b.set_message(format!(
                "left {:.0} MiB, dirty {:.1} MiB/s vs link {link} (throughput {:.1} MiB/s), pass {}, {eta}",
                mib(p.remaining_bytes),
                mib(p.dirty_bytes_per_s),
                mib(p.throughput_bytes_per_s),
                p.pass
            ));
        }
        if v.record.finished_ms.is_some() {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let full = c.migration(id, 0).await.unwrap_or(last);
    match out {
        OutputFormat::Json => print_json(&full)?,
        OutputFormat::Text => {
            println!(
                "migration {} {} after {:.1} s{}",
                full.record.id,
                full.record.state,
                duration_s(&full.record),
                full.record
                    .error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if full.record.state == MigrationState::Completed {
        Ok(())
    } else {
        Err(Failure::failed(anyhow::anyhow!(
            "migration {} ended {}, not completed",
            full.record.id,
            full.record.state
        )))
    }
}
