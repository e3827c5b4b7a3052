//! Scenario sets: the TOML files in `bench/scenarios/`, parsed and expanded into cells.
//!
//! A set lists scenarios; every scenario is one guest (booted once, migrated back and forth)
//! and a list of *arms* — the policies to compare, or, for an overhead scenario, the same
//! policy with the post-copy capability on and off. Any workload or link field may be a list,
//! in which case the scenario expands into the cartesian product (guest RAM × working set ×
//! dirty rate × pattern × link rate × context), one scenario per combination.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_guest::{PageRate, WorkloadParams, WritePattern};
use tern_lab::LinkRate;
use tern_policy::MigrationContext;
use tern_scenario::faults::{FaultAction, FaultPlan};

/// What is wrong with a scenario set. Every variant names the bad value and what is valid.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// The file could not be read.
    #[error("cannot read scenario set {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or a field of the wrong type.
    #[error("scenario set {origin} is invalid: {message}")]
    Parse {
        /// File name or built-in set name.
        origin: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range or unknown.
    #[error("scenario {scenario:?}: {message}")]
    Invalid {
        /// The scenario's name.
        scenario: String,
        /// What is wrong and what would be valid.
        message: String,
    },
}

/// A field that may be given once or as a list (a matrix dimension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value.
    One(T),
    /// Several values: the scenario expands over them.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    fn values(&self) -> Vec<T> {
        match self {
            Self::One(v) => vec![v.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

/// A number or `max`, as written in TOML (`dirty_rate = 3000` or `dirty_rate = "max"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RateText {
    /// Page writes per second.
    Number(u64),
    /// `"max"` or a number in quotes.
    Text(String),
}

/// A scenario as written in the set file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioEntry {
    /// Short name (file names and tables use it).
    pub name: String,
    /// What the scenario shows, one line.
    #[serde(default)]
    pub title: String,
    /// Guest RAM (MiB).
    pub memory_mib: OneOrMany<u64>,
    /// Working set the guest writes and verifies (MiB).
    pub working_set_mib: OneOrMany<u32>,
    /// Page writes per second, or `"max"`.
    pub dirty_rate: OneOrMany<RateText>,
    /// `seq`, `random` or `bursty` (2 s of writes at the rate, 2 s idle).
    #[serde(default = "default_pattern")]
    pub pattern: OneOrMany<String>,
    /// Link rate between the hosts (`100mbit`).
    pub link: OneOrMany<String>,
    /// Migration context.
    #[serde(default = "default_context")]
    pub context: OneOrMany<String>,
    /// Policies to compare (default: the set's). `"all"` means every policy.
    #[serde(default)]
    pub policies: Option<Vec<String>>,
    /// Measure the post-copy capability's overhead instead of comparing policies: each listed
    /// policy with the capability on (VM permits post-copy) and off (VM forbids it), run back
    /// to back.
    #[serde(default)]
    pub postcopy_overhead: bool,
    /// Repeats per arm (default: the set's).
    #[serde(default)]
    pub repeat: Option<u32>,
    /// Hard cap per run in seconds (default: the set's).
    #[serde(default)]
    pub time_cap_s: Option<u64>,
    /// Deadline handed to must-finish contexts, seconds.
    #[serde(default)]
    pub deadline_s: Option<u64>,
    /// Seconds between hops (default: the set's).
    #[serde(default)]
    pub settle_s: Option<u64>,
    /// Faults injected in every run, as `tern demo --fault` spells them
    /// (`["link-cut-postcopy:5@0.5", "link-cut-postcopy:5@8"]`: two cuts). Only link cuts:
    /// the guest stays booted across runs.
    #[serde(default)]
    pub faults: Vec<String>,
}

fn default_pattern() -> OneOrMany<String> {
    OneOrMany::One("seq".into())
}

fn default_context() -> OneOrMany<String> {
    OneOrMany::One("manual".into())
}

/// A scenario set file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetFile {
    /// Set name (`quick`, `full`, …).
    pub name: String,
    /// What the set is for.
    #[serde(default)]
    pub description: String,
    /// Repeats per arm (the issue's default is 3).
    #[serde(default = "default_repeat")]
    pub repeat: u32,
    /// Hard cap per run (s): a run still going then is aborted and recorded as `timeout`.
    #[serde(default = "default_cap")]
    pub time_cap_s: u64,
    /// Seconds the guest runs between hops (and is watched after each).
    #[serde(default = "default_settle")]
    pub settle_s: u64,
    /// Policies compared in every scenario (`"all"` = every policy).
    #[serde(default = "default_policies")]
    pub policies: Vec<String>,
    /// The scenarios.
    #[serde(rename = "scenario")]
    pub scenarios: Vec<ScenarioEntry>,
}

fn default_repeat() -> u32 {
    3
}
fn default_cap() -> u64 {
    60
}
fn default_settle() -> u64 {
    2
}
fn default_policies() -> Vec<String> {
    vec!["all".into()]
}

/// One arm of a scenario: a policy, and whether post-copy is permitted for the VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Arm {
    /// Label in tables (`tern`, `tern (post-copy off)`).
    pub label: String,
    /// Policy name.
    pub policy: String,
    /// Whether the VM permits post-copy for this arm.
    pub post_copy: bool,
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// A fully expanded scenario: one guest, one link, a list of arms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Unique name (matrix cells get a suffix).
    pub name: String,
    /// What it shows.
    pub title: String,
    /// Guest RAM (MiB).
    pub memory_mib: u64,
    /// Working set (MiB).
    pub working_set_mib: u32,
    /// Page writes per second (`None` = as fast as the vCPU can).
    pub dirty_pages_per_s: Option<u64>,
    /// Write pattern.
    pub pattern: WritePattern,
    /// Link rate.
    pub link: LinkRate,
    /// Context.
    pub context: MigrationContext,
    /// The arms, in table order.
    pub arms: Vec<Arm>,
    /// Whether this is the post-copy overhead measurement.
    pub postcopy_overhead: bool,
    /// Repeats per arm.
    pub repeat: u32,
    /// Hard cap per run.
    pub time_cap_s: u64,
    /// Deadline (s) for must-finish contexts.
    pub deadline_s: Option<u64>,
    /// Seconds between hops.
    pub settle_s: u64,
    /// Faults injected in every run (link cuts).
    #[serde(default)]
    pub faults: Vec<FaultPlan>,
}

impl Scenario {
    /// The guest's workload.
    pub fn workload(&self) -> WorkloadParams {
        WorkloadParams {
            working_set_mib: self.working_set_mib,
            rate: self
                .dirty_pages_per_s
                .map_or(PageRate::Max, PageRate::PerSecond),
            pattern: self.pattern,
            verify: true,
        }
    }

    /// RAM ÷ link rate: no migration can move the guest's RAM faster (the physical bound the
    /// benchmark's time ratios are against).
    pub fn bound_s(&self) -> f64 {
        (self.memory_mib * 1024 * 1024) as f64 / self.link.bytes_per_sec() as f64
    }

    /// The nominal ρ: dirty bytes per second asked of the guest ÷ link bytes per second.
    /// `None` for `max` (the measured ρ is in each run's metrics).
    pub fn nominal_rho(&self) -> Option<f64> {
        self.dirty_pages_per_s
            .map(|p| (p * 4096) as f64 / self.link.bytes_per_sec() as f64)
    }

    /// Total runs.
    pub fn runs(&self) -> u64 {
        u64::from(self.repeat) * self.arms.len() as u64
    }
}

/// A parsed, expanded set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioSet {
    /// Set name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// The scenarios, expanded.
    pub scenarios: Vec<Scenario>,
}

/// The quick set shipped in the repository (also embedded, so the binary runs anywhere).
pub const QUICK_SET: &str = include_str!("../../../bench/scenarios/quick.toml");
/// The full matrix.
pub const FULL_SET: &str = include_str!("../../../bench/scenarios/full.toml");
/// The post-copy fault matrix (link cuts during post-copy and recovery, under tern).
pub const FAULTS_SET: &str = include_str!("../../../bench/scenarios/faults.toml");

impl ScenarioSet {
    /// `quick`, `full`, `faults`, or a path to a TOML file.
    pub fn load(which: &str) -> Result<Self, SetError> {
        match which {
            "quick" => Self::parse(QUICK_SET, "quick"),
            "full" => Self::parse(FULL_SET, "full"),
            "faults" => Self::parse(FAULTS_SET, "faults"),
            path => {
                let text =
                    std::fs::read_to_string(Path::new(path)).map_err(|source| SetError::Read {
                        path: format!(
                            "{path} (valid: quick, full, faults, or a path to a .toml file)"
                        ),
                        source,
                    })?;
                Self::parse(&text, path)
            }
        }
    }

    /// Parses and expands a set.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SetError> {
        let file: SetFile = toml::from_str(text).map_err(|e| SetError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut scenarios = Vec::new();
        for entry in &file.scenarios {
            scenarios.extend(expand(&file, entry)?);
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &scenarios {
            if !seen.insert(s.name.clone()) {
                return Err(SetError::Invalid {
                    scenario: s.name.clone(),
                    message: "the name is used twice; scenario names must be unique".into(),
                });
            }
        }
        if scenarios.is_empty() {
            return Err(SetError::Parse {
                origin: origin.to_string(),
                message: "no [[scenario]] entries".into(),
            });
        }
        Ok(Self {
            name: file.name,
            description: file.description,
            scenarios,
        })
    }

    /// Keeps only the named scenarios and policies (empty filters keep everything).
    pub fn filter(&mut self, scenarios: &[String], policies: &[String]) {
        if !scenarios.is_empty() {
            self.scenarios.retain(|s| scenarios.contains(&s.name));
        }
        if !policies.is_empty() {
            for s in &mut self.scenarios {
                s.arms.retain(|a| policies.contains(&a.policy));
            }
            self.scenarios.retain(|s| !s.arms.is_empty());
        }
    }
}

fn invalid(scenario: &str, message: String) -> SetError {
    SetError::Invalid {
        scenario: scenario.to_string(),
        message,
    }
}

fn policies_of(entry: &ScenarioEntry, names: &[String]) -> Result<Vec<String>, SetError> {
    let mut out = Vec::new();
    for n in names {
        if n == "all" {
            out.extend(tern_policy::POLICY_NAMES.iter().map(|s| s.to_string()));
        } else if tern_policy::POLICY_NAMES.contains(&n.as_str()) {
            out.push(n.clone());
        } else {
            return Err(invalid(
                &entry.name,
                format!(
                    "unknown policy {n:?}: valid policies are all, {}",
                    tern_policy::POLICY_NAMES.join(", ")
                ),
            ));
        }
    }
    out.dedup();
    Ok(out)
}

fn expand(file: &SetFile, e: &ScenarioEntry) -> Result<Vec<Scenario>, SetError> {
    let policies = policies_of(e, e.policies.as_ref().unwrap_or(&file.policies))?;
    let arms: Vec<Arm> = if e.postcopy_overhead {
        policies
            .iter()
            .flat_map(|p| {
                [
                    Arm {
                        label: format!("{p} (post-copy capable)"),
                        policy: p.clone(),
                        post_copy: true,
                    },
                    Arm {
                        label: format!("{p} (post-copy off)"),
                        policy: p.clone(),
                        post_copy: false,
                    },
                ]
            })
            .collect()
    } else {
        policies
            .iter()
            .map(|p| Arm {
                label: p.clone(),
                policy: p.clone(),
                post_copy: true,
            })
            .collect()
    };
    let mut faults = Vec::new();
    for f in &e.faults {
        let plan: FaultPlan =
            f.parse()
                .map_err(|err: tern_scenario::faults::FaultParseError| {
                    invalid(&e.name, err.to_string())
                })?;
        if !matches!(plan.action, FaultAction::LinkCut { .. }) {
            return Err(invalid(
                &e.name,
                format!(
                    "fault {f:?}: a benchmark keeps its guest booted across runs, so only link cuts \
                     (link-cut-precopy:SECS, link-cut-postcopy:SECS, link-cut-recovery:SECS) can be injected"
                ),
            ));
        }
        faults.push(plan);
    }
    let mems = e.memory_mib.values();
    let wss = e.working_set_mib.values();
    let rates = e.dirty_rate.values();
    let patterns = e.pattern.values();
    let links = e.link.values();
    let contexts = e.context.values();
    let many = [
        mems.len(),
        wss.len(),
        rates.len(),
        patterns.len(),
        links.len(),
        contexts.len(),
    ]
    .iter()
    .any(|n| *n > 1);
    let mut out = Vec::new();
    for &mem in &mems {
        for &ws in &wss {
            for rate in &rates {
                for pat in &patterns {
                    for link in &links {
                        for ctx in &contexts {
                            let rate_v = match rate {
                                RateText::Number(0) => {
                                    return Err(invalid(
                                        &e.name,
                                        "dirty_rate 0 is invalid: give page writes per second (≥ 1) or \"max\"".into(),
                                    ));
                                }
                                RateText::Number(n) => Some(*n),
                                RateText::Text(t) => match t.parse::<PageRate>() {
                                    Ok(PageRate::Max) => None,
                                    Ok(PageRate::PerSecond(n)) => Some(n),
                                    Err(err) => return Err(invalid(&e.name, err.to_string())),
                                },
                            };
                            let pattern: WritePattern =
                                pat.parse().map_err(|err: tern_guest::ParamError| {
                                    invalid(&e.name, err.to_string())
                                })?;
                            let link_rate: LinkRate = link
                                .parse()
                                .map_err(|err| invalid(&e.name, format!("link {link:?}: {err}")))?;
                            let context: MigrationContext = ctx.parse().map_err(|_| {
                                invalid(
                                    &e.name,
                                    format!("context {ctx:?} is unknown: valid contexts are evacuate, maintenance, balance, manual"),
                                )
                            })?;
                            if u64::from(ws) + 64 > mem {
                                return Err(invalid(
                                    &e.name,
                                    format!(
                                        "working_set_mib {ws} does not fit in memory_mib {mem}: leave at least 64 MiB for the guest kernel"
                                    ),
                                ));
                            }
                            let name = if many {
                                format!(
                                    "{}-m{mem}-ws{ws}-r{}-{}-{}-{}",
                                    e.name,
                                    rate_v.map_or("max".into(), |r| r.to_string()),
                                    pattern,
                                    link_rate,
                                    context
                                )
                            } else {
                                e.name.clone()
                            };
                            out.push(Scenario {
                                name,
                                title: e.title.clone(),
                                memory_mib: mem,
                                working_set_mib: ws,
                                dirty_pages_per_s: rate_v,
                                pattern,
                                link: link_rate,
                                context,
                                arms: arms.clone(),
                                postcopy_overhead: e.postcopy_overhead,
                                repeat: e.repeat.unwrap_or(file.repeat).max(1),
                                time_cap_s: e.time_cap_s.unwrap_or(file.time_cap_s).max(1),
                                deadline_s: e.deadline_s,
                                settle_s: e.settle_s.unwrap_or(file.settle_s).max(1),
                                faults: faults.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The per-run cap as a duration.
pub fn cap(s: &Scenario) -> Duration {
    Duration::from_secs(s.time_cap_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_sets_parse_and_quick_covers_the_required_cells() {
        let q = ScenarioSet::load("quick").unwrap();
        let names: Vec<&str> = q.scenarios.iter().map(|s| s.name.as_str()).collect();
        for want in ["idle", "converging", "rho1", "rho3", "postcopy-overhead"] {
            assert!(names.contains(&want), "quick set lacks {want}: {names:?}");
        }
        let rho1 = q.scenarios.iter().find(|s| s.name == "rho1").unwrap();
        let r = rho1.nominal_rho().unwrap();
        assert!((0.8..1.25).contains(&r), "rho1 nominal ρ {r}");
        let rho3 = q.scenarios.iter().find(|s| s.name == "rho3").unwrap();
        let r = rho3.nominal_rho().unwrap();
        assert!((2.5..3.5).contains(&r), "rho3 nominal ρ {r}");
        assert_eq!(rho1.arms.len(), tern_policy::POLICY_NAMES.len());
        let o = q
            .scenarios
            .iter()
            .find(|s| s.name == "postcopy-overhead")
            .unwrap();
        assert_eq!(o.arms.len(), 4, "tern and nova, each on and off");
        assert!(o.arms[0].post_copy && !o.arms[1].post_copy);
        assert_eq!(o.arms[0].policy, o.arms[1].policy);
        assert!(
            o.nominal_rho().unwrap() < 0.5,
            "overhead guests must converge"
        );
        let f = ScenarioSet::load("full").unwrap();
        assert!(f.scenarios.len() > q.scenarios.len());
        let faults = ScenarioSet::load("faults").unwrap();
        assert!(faults.scenarios.iter().all(|s| !s.faults.is_empty()));
        let two = faults
            .scenarios
            .iter()
            .find(|s| s.name == "postcopy-two-cuts")
            .unwrap();
        assert_eq!(two.faults.len(), 2);
    }

    #[test]
    fn lists_expand_into_a_matrix_with_unique_names() {
        let text = r#"
name = "m"
repeat = 2
policies = ["tern", "nova"]
[[scenario]]
name = "x"
memory_mib = [192, 256]
working_set_mib = 16
dirty_rate = [100, "max"]
pattern = ["seq", "random"]
link = "100mbit"
"#;
        let s = ScenarioSet::parse(text, "t").unwrap();
        assert_eq!(s.scenarios.len(), 8);
        assert!(
            s.scenarios
                .iter()
                .all(|c| c.arms.len() == 2 && c.repeat == 2)
        );
        assert!(s.scenarios.iter().any(|c| c.dirty_pages_per_s.is_none()));
        assert!(
            s.scenarios[0]
                .name
                .starts_with("x-m192-ws16-r100-seq-100mbit")
        );
    }

    #[test]
    fn bad_values_name_the_value_and_what_is_valid() {
        let base = |extra: &str| {
            format!(
                "name = \"b\"\n[[scenario]]\nname = \"s\"\nmemory_mib = 192\nworking_set_mib = 16\nlink = \"100mbit\"\n{extra}\n"
            )
        };
        let e = ScenarioSet::parse(&base("dirty_rate = 10\npolicies = [\"vmware\"]"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vmware") && e.contains("kubevirt"), "{e}");
        let e = ScenarioSet::parse(&base("dirty_rate = \"fast\""), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fast") && e.contains("max"), "{e}");
        let e = ScenarioSet::parse(&base("dirty_rate = 10\npattern = \"zigzag\""), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("zigzag") && e.contains("bursty"), "{e}");
        let e = ScenarioSet::parse(
            &base("dirty_rate = 10\nfaults = [\"kill-dest-qemu-postcopy\"]"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("kill-dest-qemu-postcopy") && e.contains("link-cut-postcopy"),
            "{e}"
        );
        let e = ScenarioSet::parse(
            &base("dirty_rate = 10\nfaults = [\"link-cut-sideways:3\"]"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("link-cut-sideways") && e.contains("@SECS"),
            "{e}"
        );
        let e = ScenarioSet::parse(&base("dirty_rate = 10\ncontext = \"panic\""), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("panic") && e.contains("evacuate"), "{e}");
        let e = ScenarioSet::parse(&base("dirty_rate = 10\ncolour = 1"), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let e = ScenarioSet::load("/nonexistent.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent.toml") && e.contains("quick"),
            "{e}"
        );
    }

    #[test]
    fn filter_keeps_named_scenarios_and_policies() {
        let mut q = ScenarioSet::load("quick").unwrap();
        q.filter(&["idle".into()], &["tern".into(), "nova".into()]);
        assert_eq!(q.scenarios.len(), 1);
        assert_eq!(q.scenarios[0].arms.len(), 2);
    }
}
