//! `tern bench`: runs a scenario matrix of real migrations on the lab (real QEMU guests
//! running `tern-load`, shaped links), under tern and every baseline policy, and reports
//! per-policy medians and spread as JSON, Markdown and SVG plots.
//!
//! Why a benchmark of its own rather than the simulator (`tern-sim`): the simulator shows
//! what the policies *decide*; only real guests show what QEMU then does (zero pages, dirty
//! tracking under TCG, post-copy faults, the blackout users see). Under TCG absolute times
//! are not comparable with KVM hardware, so every claim is a ratio against a baseline measured
//! in the same run and against the physical bound RAM ÷ link rate.
//!
//! Each scenario boots one guest and migrates it back and forth (one hop per run, see
//! [`tern_scenario::ScenarioSession`]); every run has a hard cap, after which the harness
//! aborts it and records `timeout`: policies that never give up on a guest that out-dirties
//! the link would otherwise run forever.

pub mod compare;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod results;
pub mod run;
pub mod set;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};

pub use results::BenchResult;
pub use run::{RunOptions, run_set};
pub use set::{Scenario, ScenarioSet};

/// `tern bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Run a scenario set on the lab (root; boots real guests) and write JSON, Markdown and plots.
    Run(RunArgs),
    /// Compare two result files and list regressions (exit 1 when there are any).
    Compare(CompareArgs),
    /// Re-render the Markdown report and plots of a result file.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// `quick` (< 10 min on 2 cores), `full` (hours), `faults` (post-copy link cuts, ~6 min),
    /// or a path to a scenario TOML file.
    #[arg(long, default_value = "quick")]
    set: String,
    /// Repeats per (scenario, policy), overriding the set's.
    #[arg(long)]
    repeat: Option<u32>,
    /// Directory for `<set>-<date>.json`, `.md` and `<set>-<date>-plots/`.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Only these scenarios (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Only these policies (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    policy: Vec<String>,
    /// File stem instead of `<set>-<date>`.
    #[arg(long)]
    name: Option<String>,
    /// Lab name prefix (change it to run two benchmarks at once).
    #[arg(long, default_value = "bench")]
    lab_prefix: String,
    /// Encrypt every migration stream (QEMU TLS, lab certificates): run once with and once
    /// without to measure what TLS costs.
    #[arg(long)]
    tls: bool,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The older result.
    old: PathBuf,
    /// The newer result.
    new: PathBuf,
    /// Relative change that counts (0.2 = 20 %), on top of falling outside the old spread.
    #[arg(long, default_value_t = 0.2)]
    tolerance: f64,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// The result file.
    json: PathBuf,
}

/// Writes `<stem>.json`, `<stem>.md` and `<stem>-plots/*.svg` into `dir`; returns the paths
/// of the JSON and Markdown files. A `<stem>.notes.md` beside them (a hand-written analysis)
/// is appended to the report.
pub fn write_outputs(
    r: &BenchResult,
    dir: &Path,
    stem: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join(format!("{stem}.json"));
    let md = dir.join(format!("{stem}.md"));
    let plots = format!("{stem}-plots");
    std::fs::write(&json, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let plot_ok = match plot::draw_all(r, &dir.join(&plots)) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("warning: plots not drawn: {e}");
            false
        }
    };
    let mut text = report::markdown(r, plot_ok.then_some(plots.as_str()));
    // A hand-written analysis kept next to the result survives re-rendering.
    let notes = dir.join(format!("{stem}.notes.md"));
    if let Ok(n) = std::fs::read_to_string(&notes) {
        text.push_str(&format!(
            "## Analysis\n\n(hand-written, from `{stem}.notes.md`)\n\n{}\n",
            n.trim()
        ));
    }
    std::fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
    Ok((json, md))
}

fn read_result(path: &Path) -> anyhow::Result<BenchResult> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read result file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a tern bench result (JSON written by `tern bench run`)",
            path.display()
        )
    })
}

/// Runs `tern bench`; returns the process exit code (0 ok; 1 regressions found or a run's
/// guest integrity failed; 2 bad input).
pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    match args.command {
        BenchCommand::Run(a) => {
            let mut set = match ScenarioSet::load(&a.set) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            };
            for p in &a.policy {
                if !tern_policy::POLICY_NAMES.contains(&p.as_str()) {
                    eprintln!(
                        "error: unknown policy {p:?}: valid policies are {}",
                        tern_policy::POLICY_NAMES.join(", ")
                    );
                    return Ok(2);
                }
            }
            for n in &a.scenario {
                if !set.scenarios.iter().any(|s| &s.name == n) {
                    let names: Vec<&str> = set.scenarios.iter().map(|s| s.name.as_str()).collect();
                    eprintln!(
                        "error: unknown scenario {n:?} in set {}: valid scenarios are {}",
                        set.name,
                        names.join(", ")
                    );
                    return Ok(2);
                }
            }
            set.filter(&a.scenario, &a.policy);
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!(
                    "error: tern bench run needs root (network namespaces, tc): run it with sudo"
                );
                return Ok(2);
            }
            let env = tokio::task::spawn_blocking(|| {
                tern_scenario::LabEnvironment::prepare(|s| eprintln!("· {s}"))
            })
            .await
            .context("setup task failed")?
            .context("preparing the lab environment (QEMU, guest image, accelerator)")?;
            let opts = RunOptions {
                repeat: a.repeat,
                lab_prefix: a.lab_prefix.clone(),
                verbose: true,
                migration_tls: a.tls,
            };
            let result = run_set(&env, &set, &opts).await;
            let stem = a
                .name
                .clone()
                .unwrap_or_else(|| format!("{}-{}", set.name, &result.started_utc[..10]));
            let (json, md) = write_outputs(&result, &a.out, &stem)?;
            eprintln!(
                "wrote {} and {} ({:.0} s)",
                json.display(),
                md.display(),
                result.wall_s
            );
            let bad = result
                .scenarios
                .iter()
                .flat_map(|s| &s.arms)
                .any(|a| a.integrity_failures > 0 || a.outcomes.contains_key("lost"));
            Ok(if bad { 1 } else { 0 })
        }
        BenchCommand::Compare(a) => {
            let old = read_result(&a.old)?;
            let new = read_result(&a.new)?;
            if !(0.0..10.0).contains(&a.tolerance) {
                eprintln!(
                    "error: --tolerance {} is invalid: give a fraction such as 0.2 (20 %)",
                    a.tolerance
                );
                return Ok(2);
            }
            let c = compare::compare(&old, &new, a.tolerance);
            print!("{}", compare::render(&c));
            Ok(if c.regressions().next().is_some() {
                1
            } else {
                0
            })
        }
        BenchCommand::Report(a) => {
            let r = read_result(&a.json)?;
            let dir = a.json.parent().unwrap_or(Path::new("."));
            let stem = a
                .json
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "result".into());
            let (_, md) = write_outputs(&r, dir, &stem)?;
            eprintln!("wrote {}", md.display());
            Ok(0)
        }
    }
}
