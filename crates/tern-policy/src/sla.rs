//! Why a migration happens ([`MigrationContext`]) and what the guest tolerates ([`SlaClass`]).
//!
//! No public manager varies its convergence policy by *why* a VM moves (manager-policies.md §0.6:
//! KubeVirt only changes queue priority, Nova's per-operation spec was never implemented). tern
//! does: an evacuation must finish, a balancing move may give up. The guest's tolerance comes from
//! an SLA class that VMs name, loaded from TOML so operators can define their own.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::limits::{QEMU_MAX_CPU_THROTTLE_PCT, QEMU_MAX_DOWNTIME_MS};

/// Why the migration was started. This decides what "failure" means.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MigrationContext {
    /// The source host must be emptied (hardware fault, imminent power loss). The migration must
    /// finish in bounded time: post-copy if permitted, else stop-and-copy; never an endless
    /// pre-copy and never an abort.
    Evacuate,
    /// Planned host maintenance: must finish by a deadline, and until the deadline presses it
    /// prefers the least guest impact (SLA-bounded downtime and throttle).
    Maintenance,
    /// Load balancing: optional. It may abort, and it never exceeds the SLA's downtime or
    /// degradation budget; post-copy only if the SLA tolerates degraded performance.
    Balance,
    /// An operator asked for it. Honours the SLA; gives up (abort) rather than break it once a
    /// generous time budget is spent.
    Manual,
}

impl MigrationContext {
    /// All contexts, in display order.
    pub const ALL: [MigrationContext; 4] = [
        MigrationContext::Evacuate,
        MigrationContext::Maintenance,
        MigrationContext::Balance,
        MigrationContext::Manual,
    ];

    /// The lowercase name used in TOML, JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationContext::Evacuate => "evacuate",
            MigrationContext::Maintenance => "maintenance",
            MigrationContext::Balance => "balance",
            MigrationContext::Manual => "manual",
        }
    }

    /// Whether the context requires the migration to complete (an abort is a failure).
    pub fn must_finish(self) -> bool {
        matches!(
            self,
            MigrationContext::Evacuate | MigrationContext::Maintenance
        )
    }
}

impl fmt::Display for MigrationContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A context name that is not one of `evacuate`, `maintenance`, `balance`, `manual`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown migration context {given:?}; valid contexts: evacuate, maintenance, balance, manual"
)]
pub struct UnknownContext {
    /// The value the user gave.
    pub given: String,
}

impl FromStr for MigrationContext {
    type Err = UnknownContext;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MigrationContext::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownContext {
                given: s.to_string(),
            })
    }
}

/// What a class of guests tolerates during a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaClass {
    /// Name VMs refer to, e.g. `latency-critical`.
    pub name: String,
    /// Longest acceptable blackout (vCPUs stopped) in milliseconds. Bounds QEMU's
    /// `downtime-limit` (which excludes device-state time, so policies subtract an overhead).
    pub max_downtime_ms: u64,
    /// Highest acceptable vCPU throttle (auto-converge `max-cpu-throttle`), 0–99 %.
    pub max_throttle_pct: u8,
    /// Whether the guest tolerates post-copy's degraded phase (page faults served over the
    /// network; a link failure then needs recovery or loses the VM).
    pub post_copy_acceptable: bool,
    /// Scheduling priority, higher first (used by evacuation ordering, not by the per-pass core).
    pub priority: u32,
}

impl SlaClass {
    /// A class with the given limits (validated by [`SlaCatalog`] when loaded from TOML).
    pub fn new(
        name: &str,
        max_downtime_ms: u64,
        max_throttle_pct: u8,
        post_copy_acceptable: bool,
        priority: u32,
    ) -> Self {
        SlaClass {
            name: name.to_string(),
            max_downtime_ms,
            max_throttle_pct,
            post_copy_acceptable,
            priority,
        }
    }
}

/// The set of SLA classes an operator defined, looked up by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaCatalog {
    classes: BTreeMap<String, SlaClass>,
}

/// Errors loading or querying an [`SlaCatalog`]. Each names the bad value and what is valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlaError {
    /// The text is not valid TOML or has a field of the wrong type.
    #[error("SLA catalog: invalid TOML at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// A field has a value outside its valid range.
    #[error(
        "SLA catalog: class {class:?} field {field} = {value} at line {line}, column {column} is invalid; valid: {valid}"
    )]
    OutOfRange {
        /// The class.
        class: String,
        /// The field name.
        field: &'static str,
        /// The bad value as written.
        value: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The valid range.
        valid: &'static str,
    },
    /// The catalog defines no class.
    #[error("SLA catalog defines no class; add at least one [class.<name>] table")]
    Empty,
    /// A VM refers to a class that does not exist.
    #[error("unknown SLA class {given:?}; defined classes: {known}")]
    UnknownClass {
        /// The name asked for.
        given: String,
        /// Comma-separated defined names.
        known: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    class: BTreeMap<String, ClassFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassFile {
    max_downtime_ms: toml::Spanned<i64>,
    max_throttle_pct: toml::Spanned<i64>,
    post_copy_acceptable: bool,
    #[serde(default)]
    priority: Option<toml::Spanned<i64>>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

impl SlaCatalog {
    /// The built-in classes, used when the operator supplies none:
    ///
    /// | class | max downtime | max throttle | post-copy | priority |
    /// |---|---|---|---|---|
    /// | latency-critical | 100 ms | 10 % | no | 100 |
    /// | standard | 300 ms (QEMU's default `downtime-limit`) | 50 % | yes | 50 |
    /// | batch | 2000 ms | 99 % (QEMU's `max-cpu-throttle`) | yes | 10 |
    pub fn builtin() -> Self {
        Self::from_toml(BUILTIN_TOML).unwrap_or_else(|_| SlaCatalog {
            classes: BTreeMap::new(),
        })
    }

    /// Parses a catalog such as
    /// ```toml
    /// [class.standard]
    /// max_downtime_ms = 300
    /// max_throttle_pct = 50
    /// post_copy_acceptable = true
    /// priority = 50
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, SlaError> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |span| line_col(text, span.start));
            SlaError::Syntax {
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        if file.class.is_empty() {
            return Err(SlaError::Empty);
        }
        let mut classes = BTreeMap::new();
        for (name, c) in file.class {
            let range = |field: &'static str,
                         v: &toml::Spanned<i64>,
                         lo: i64,
                         hi: i64,
                         valid: &'static str|
             -> Result<i64, SlaError> {
                let value = *v.get_ref();
                if value < lo || value > hi {
                    let (line, column) = line_col(text, v.span().start);
                    return Err(SlaError::OutOfRange {
                        class: name.clone(),
                        field,
                        value: value.to_string(),
                        line,
                        column,
                        valid,
                    });
                }
                Ok(value)
            };
            let downtime = range(
                "max_downtime_ms",
                &c.max_downtime_ms,
                1,
                QEMU_MAX_DOWNTIME_MS as i64,
                "1..=2000000 (QEMU's downtime-limit maximum is 2000 s)",
            )?;
            let throttle = range(
                "max_throttle_pct",
                &c.max_throttle_pct,
                0,
                i64::from(QEMU_MAX_CPU_THROTTLE_PCT),
                "0..=99 (QEMU's max-cpu-throttle maximum is 99 %)",
            )?;
            let priority = match &c.priority {
                Some(p) => range("priority", p, 0, i64::from(u32::MAX), "0..=4294967295")?,
                None => 0,
            };
            classes.insert(
                name.clone(),
                SlaClass {
                    name: name.clone(),
                    max_downtime_ms: downtime as u64,
                    max_throttle_pct: throttle as u8,
                    post_copy_acceptable: c.post_copy_acceptable,
                    priority: priority as u32,
                },
            );
        }
        Ok(SlaCatalog { classes })
    }

    /// The class a VM refers to by name.
    pub fn get(&self, name: &str) -> Result<&SlaClass, SlaError> {
        self.classes
            .get(name)
            .ok_or_else(|| SlaError::UnknownClass {
                given: name.to_string(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })
    }

    /// Class names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.classes.keys().map(String::as_str)
    }

    /// All classes in name order.
    pub fn classes(&self) -> impl Iterator<Item = &SlaClass> {
        self.classes.values()
    }
}

const BUILTIN_TOML: &str = r#"
[class.latency-critical]
max_downtime_ms = 100
max_throttle_pct = 10
post_copy_acceptable = false
priority = 100

[class.standard]
max_downtime_ms = 300
max_throttle_pct = 50
post_copy_acceptable = true
priority = 50

[class.batch]
max_downtime_ms = 2000
max_throttle_pct = 99
post_copy_acceptable = true
priority = 10
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trips_through_str_and_serde() {
        for c in MigrationContext::ALL {
            assert_eq!(c.to_string().parse::<MigrationContext>(), Ok(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{c}\""));
        }
        let err = "evacuation".parse::<MigrationContext>().unwrap_err();
        assert!(err.to_string().contains("\"evacuation\""));
        assert!(err.to_string().contains("maintenance"));
    }

    #[test]
    fn builtin_has_three_classes() {
        let cat = SlaCatalog::builtin();
        assert_eq!(
            cat.names().collect::<Vec<_>>(),
            vec!["batch", "latency-critical", "standard"]
        );
        let lc = cat.get("latency-critical").unwrap();
        assert_eq!(lc.max_downtime_ms, 100);
        assert!(!lc.post_copy_acceptable);
        assert_eq!(cat.get("standard").unwrap().max_downtime_ms, 300);
    }

    #[test]
    fn unknown_class_lists_known_ones() {
        let err = SlaCatalog::builtin().get("gold").unwrap_err().to_string();
        assert!(err.contains("\"gold\"") && err.contains("batch, latency-critical, standard"));
    }

    #[test]
    fn out_of_range_names_value_line_and_column() {
        let text = "[class.x]\nmax_downtime_ms = 300\nmax_throttle_pct = 150\npost_copy_acceptable = true\n";
        let err = SlaCatalog::from_toml(text).unwrap_err();
        match &err {
            SlaError::OutOfRange {
                field,
                value,
                line,
                column,
                ..
            } => {
                assert_eq!(*field, "max_throttle_pct");
                assert_eq!(value, "150");
                assert_eq!((*line, *column), (3, 20));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("0..=99"));
    }

    #[test]
    fn syntax_error_has_position() {
        let text = "[class.x]\nmax_downtime_ms = \"fast\"\nmax_throttle_pct = 1\npost_copy_acceptable = true\n";
        match SlaCatalog::from_toml(text).unwrap_err() {
            SlaError::Syntax { line, .. } => assert_eq!(line, 2),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            SlaCatalog::from_toml("[class]\n").unwrap_err(),
            SlaError::Empty
        );
    }
}
