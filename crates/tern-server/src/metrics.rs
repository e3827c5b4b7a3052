//! Prometheus metrics (`/metrics`), named as the ecosystem does: base units, counters ending
//! in `_total`, no unbounded labels (no migration ids; host names are bounded by the fleet).
//! Compare KubeVirt's `kubevirt_vmi_migration_*` and the libvirt exporter's
//! `libvirt_domain_job_info_*`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::MigrationState;

type Labels = Vec<(String, String)>;

/// The controller's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Migrations by controller state (`phase`).
    pub migrations: Family<Labels, Gauge>,
    /// Attempts started on agents.
    pub attempts: Counter,
    /// Migrations seen switching to post-copy.
    pub switches: Counter,
    /// Post-copy recoveries seen.
    pub recoveries: Counter,
    /// Migrations aborted (operator or cancelled evacuation).
    pub aborts: Counter,
    /// Retries after a failure before the switch.
    pub retries: Counter,
    /// Duration of finished migrations (first attempt to end).
    pub duration: Histogram,
    /// Predicted makespan of the last evacuation of each host.
    pub evacuation_predicted: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Actual makespan of the last finished evacuation of each host.
    pub evacuation_actual: Family<Labels, Gauge<f64, AtomicU64>>,
    /// HTTP requests by method and status.
    pub requests: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under `tern_controller_`.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("tern_controller");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            migrations: Family::default(),
            attempts: Counter::default(),
            switches: Counter::default(),
            recoveries: Counter::default(),
            aborts: Counter::default(),
            retries: Counter::default(),
            duration: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            evacuation_predicted: Family::default(),
            evacuation_actual: Family::default(),
            requests: Family::default(),
        };
        r.register("migrations", "Migrations by phase", m.migrations.clone());
        r.register(
            "migration_attempts",
            "Migration attempts started on agents",
            m.attempts.clone(),
        );
        r.register(
            "migration_switches_to_postcopy",
            "Switches to post-copy",
            m.switches.clone(),
        );
        r.register(
            "migration_postcopy_recoveries",
            "Post-copy recoveries",
            m.recoveries.clone(),
        );
        r.register("migration_aborts", "Migrations aborted", m.aborts.clone());
        r.register(
            "migration_retries",
            "Retries after a failure before the switch",
            m.retries.clone(),
        );
        r.register(
            "migration_duration_seconds",
            "Duration of finished migrations",
            m.duration.clone(),
        );
        r.register(
            "evacuation_predicted_makespan_seconds",
            "Predicted makespan of the host's last evacuation",
            m.evacuation_predicted.clone(),
        );
        r.register(
            "evacuation_actual_makespan_seconds",
            "Actual makespan of the host's last finished evacuation",
            m.evacuation_actual.clone(),
        );
        r.register(
            "http_requests",
            "API requests by method and status",
            m.requests.clone(),
        );
        for s in MigrationState::ALL {
            m.migrations
                .get_or_create(&vec![("phase".into(), s.as_str().into())])
                .set(0);
        }
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }

    /// Sets the per-phase gauge from counts.
    pub fn set_phases(&self, counts: &[(MigrationState, i64)]) {
        for s in MigrationState::ALL {
            let n = counts.iter().find(|(x, _)| *x == s).map_or(0, |(_, n)| *n);
            self.migrations
                .get_or_create(&vec![("phase".into(), s.as_str().into())])
                .set(n);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &r).is_err() {
            out.clear();
        }
        out
    }
}
