//! `tern sim`: a fast, deterministic model of QEMU live migration that runs any policy from
//! `tern-policy` against generated (or recorded) scenarios and compares them.
//!
//! * [`Scenario`] describes one migration (guest, workload, link, outages, permissions); it is
//!   serde-serializable so the lab can record a real run and replay it ([`simulate`]).
//! * The guest's memory is simulated page by page ([`memory`]): a [`Workload`] of write streams
//!   (sequential sweeps, uniform random, hot/cold regions, bursts, phases) dirties pages, and each
//!   pass sends what those writes hit — data pages whole or as XBZRLE deltas, never-touched
//!   pages as zero-page markers. The dirty set emerges from the writes; it is not the law
//!   tern's convergence model fits, so tern is not graded by its own assumptions.
//! * [`trace`] turns a bench scenario ([`LabWorkload`]: `tern-load`'s working set, rate,
//!   pattern, and the link) into a scenario and replays recorded lab runs ([`RunTrace`]) under
//!   every policy; `examples/calibrate.rs` compares them with the lab
//!   (`bench/results/sim-calibration.md`).
//! * [`generate_scenarios`] makes `n` scenarios from a seed (ChaCha8), the same for every policy.
//! * [`run`] implements the CLI (`tern sim --compare --scenarios N --seed S -o json`); it returns
//!   the text to print and does no I/O itself.

mod engine;
pub mod memory;
mod postcopy;
mod report;
mod scenario;
pub mod trace;
pub mod workload;

use std::str::FromStr;

pub use engine::{SimConfig, SimOutcome, SimResult, TraceEntry, judge, simulate, simulate_with};
pub use report::{
    ComparisonRecord, Verdict, aggregate, compare_impact, compare_outcomes, degraded_ms,
    guest_impact_ms, table, verdict,
};
pub use scenario::{DirtyPhase, Outage, OutageKind, Scenario, generate_scenarios};
pub use trace::{LabPattern, LabPhysics, LabWorkload, RunTrace, replay, scenario_from_lab};
pub use workload::{Burst, PageRange, Workload, WorkloadPhase, WritePattern, WriteStream};

use tern_policy::{MigrationContext, POLICY_NAMES, UnknownPolicy, policy_by_name};

/// Output format of `tern sim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned text table.
    #[default]
    Table,
    /// JSON array, one record per (policy, context).
    Json,
}

/// Flags of `tern sim`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SimArgs {
    /// Run every selected policy on the same scenarios and compare them (default: only the first
    /// selected policy, `tern` unless `--policy` is given).
    #[arg(long)]
    pub compare: bool,
    /// Number of generated scenarios (spread evenly over the four contexts).
    #[arg(long, default_value_t = 1000)]
    pub scenarios: usize,
    /// Seed of the scenario generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Policy to run (repeatable; default: all with --compare, else tern).
    #[arg(long = "policy", value_name = "NAME")]
    pub policies: Vec<String>,
    /// Only scenarios of this context (evacuate, maintenance, balance, manual).
    #[arg(long, value_parser = MigrationContext::from_str)]
    pub context: Option<MigrationContext>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

impl Default for SimArgs {
    fn default() -> Self {
        SimArgs {
            compare: false,
            scenarios: 1000,
            seed: 1,
            policies: vec![],
            context: None,
            output: OutputFormat::Table,
        }
    }
}

/// Errors of `tern sim`.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A `--policy` name is unknown.
    #[error(transparent)]
    UnknownPolicy(#[from] UnknownPolicy),
    /// `--scenarios 0`.
    #[error("--scenarios must be at least 1 (got 0)")]
    NoScenarios,
    /// JSON encoding failed.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs every policy in `policies` on every scenario, in parallel over the available cores;
/// `result[p][s]` is policy `p` on scenario `s`. Deterministic: threads only split the work.
pub fn run_matrix(
    scenarios: &[Scenario],
    policies: &[String],
) -> Result<Vec<Vec<SimOutcome>>, SimError> {
    for p in policies {
        policy_by_name(p)?;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let jobs: Vec<(usize, usize)> = (0..policies.len())
        .flat_map(|p| (0..scenarios.len()).map(move |s| (p, s)))
        .collect();
    let chunk = jobs.len().div_ceil(threads).max(1);
    let mut results: Vec<Vec<Option<SimOutcome>>> =
        vec![vec![None; scenarios.len()]; policies.len()];
    let parts: Vec<Vec<(usize, usize, SimOutcome)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&(p, s)| {
                            let name = policies[p].as_str();
                            let mut make = || {
                                policy_by_name(name).unwrap_or_else(|_| {
                                    Box::new(tern_policy::baselines::QemuDefaultPolicy)
                                })
                            };
                            let (o, _) = simulate_with(
                                &scenarios[s],
                                &mut make,
                                SimConfig::default(),
                                false,
                            );
                            (p, s, o)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    for part in parts {
        for (p, s, o) in part {
            results[p][s] = Some(o);
        }
    }
    Ok(results
        .into_iter()
        .map(|row| row.into_iter().flatten().collect())
        .collect())
}

/// `tern sim`: generates scenarios, runs the policies, and returns the table or JSON to print.
pub fn run(args: &SimArgs) -> Result<String, SimError> {
    if args.scenarios == 0 {
        return Err(SimError::NoScenarios);
    }
    let policies: Vec<String> = if !args.policies.is_empty() {
        let mut p = args.policies.clone();
        if !args.compare {
            p.truncate(1);
        }
        p
    } else if args.compare {
        POLICY_NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        vec![tern_policy::DEFAULT_POLICY.to_string()]
    };
    let mut scenarios = generate_scenarios(args.scenarios, args.seed);
    if let Some(c) = args.context {
        scenarios.retain(|s| s.context == c);
    }
    let outcomes = run_matrix(&scenarios, &policies)?;
    let records = aggregate(&policies, &outcomes);
    Ok(match args.output {
        OutputFormat::Table => table(&records, scenarios.len(), args.seed),
        OutputFormat::Json => serde_json::to_string_pretty(&records)? + "\n",
    })
}
