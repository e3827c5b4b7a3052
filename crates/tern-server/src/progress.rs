//! Live progress of running migrations, as their source agents report it on each poll of the
//! runner: kept in memory only (a window of samples per migration, for the web view's
//! remaining-bytes chart and `GET /v1/migrations/{id}`), never in the store — a restarted
//! controller simply starts a new window. Pure data with a lock; no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::web::svg::RemainingSample;

/// Samples kept per migration (at the runner's tick, minutes of history).
pub const WINDOW: usize = 600;

/// The figures of one progress report (the agent's `progress`, the engine's
/// `MigrationProgress`, reduced to what operators read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProgressFigures {
    /// Wall-clock time of the report (ms since the epoch), set by the controller.
    #[serde(default)]
    pub wall_ms: u64,
    /// QEMU's migration status (`active`, `postcopy-active`, …).
    #[serde(default)]
    pub qemu_status: String,
    /// Bytes still to send.
    #[serde(default)]
    pub remaining_bytes: u64,
    /// Bytes sent.
    #[serde(default)]
    pub transferred_bytes: u64,
    /// Guest RAM bytes.
    #[serde(default)]
    pub total_bytes: u64,
    /// Dirty rate (bytes/s).
    #[serde(default)]
    pub dirty_bytes_per_s: u64,
    /// Throughput (bytes/s).
    #[serde(default)]
    pub throughput_bytes_per_s: u64,
    /// Predicted ms until completion, when the agent's model can tell.
    #[serde(default)]
    pub eta_ms: Option<u64>,
}

/// Every running migration's window of progress reports.
#[derive(Debug, Clone, Default)]
pub struct ProgressLog {
    inner: Arc<Mutex<HashMap<String, VecDeque<ProgressFigures>>>>,
}

impl ProgressLog {
    /// Records a report of migration `id` (the oldest beyond [`WINDOW`] is dropped).
    pub fn record(&self, id: &str, figures: ProgressFigures) {
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let w = all.entry(id.to_string()).or_default();
        if w.len() == WINDOW {
            w.pop_front();
        }
        w.push_back(figures);
    }

    /// Forgets a finished migration.
    pub fn forget(&self, id: &str) {
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(id);
    }

    /// The last report of `id`.
    pub fn last(&self, id: &str) -> Option<ProgressFigures> {
        let all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        all.get(id).and_then(|w| w.back().cloned())
    }

    /// Remaining bytes over time of `id`, oldest first.
    pub fn remaining(&self, id: &str) -> Vec<RemainingSample> {
        let all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        all.get(id)
            .map(|w| {
                w.iter()
                    .map(|f| RemainingSample {
                        wall_ms: f.wall_ms,
                        remaining_bytes: f.remaining_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: u64, r: u64) -> ProgressFigures {
        ProgressFigures {
            wall_ms: t,
            qemu_status: "active".into(),
            remaining_bytes: r,
            transferred_bytes: 0,
            total_bytes: 0,
            dirty_bytes_per_s: 0,
            throughput_bytes_per_s: 0,
            eta_ms: None,
        }
    }

    #[test]
    fn the_window_keeps_the_newest_reports_in_order_and_forgets_on_request() {
        let log = ProgressLog::default();
        for t in 0..(WINDOW as u64 + 5) {
            log.record("m1", at(t, 1000 - t));
        }
        let r = log.remaining("m1");
        assert_eq!(r.len(), WINDOW);
        assert_eq!(r[0].wall_ms, 5);
        assert_eq!(log.last("m1").unwrap().wall_ms, WINDOW as u64 + 4);
        assert!(log.remaining("other").is_empty());
        log.forget("m1");
        assert!(log.last("m1").is_none());
    }
}
