//! The guests' dirty rates for the heartbeat: each running guest that is not migrating is
//! measured in turn with QEMU's `calc-dirty-rate` (page-sampling, 1 s), and the last
//! measurement is reported to the controller, whose planner otherwise assumes a default rate
//! for every VM (an idle guest then looks as expensive to move as a busy one).
//!
//! A guest being migrated is never probed: KubeVirt #17504 warns that a dirty-rate probe
//! contends with an ongoing migration's dirty tracking. Its last rate from before the
//! migration stays in the report. A probe that fails (an old QEMU without the command, a guest
//! gone meanwhile) is skipped silently; the next round tries again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::host::VmRole;

use super::{Agent, Inner};

/// The last measured dirty rate of each guest (bytes/s), shared with the heartbeat.
pub(super) type DirtyRates = Arc<Mutex<BTreeMap<String, u64>>>;

/// Seconds of one `calc-dirty-rate` measurement.
const PROBE_S: u64 = 1;

/// Pause between two rounds over the guests.
const ROUND_PAUSE: Duration = Duration::from_secs(4);

/// Guests to measure now: running here and not migrating.
fn candidates(agent: &Agent) -> Vec<String> {
    let h = &agent.inner.host;
    h.names()
        .into_iter()
        .filter(|n| h.role(n).is_ok_and(|r| r == VmRole::Running))
        .filter(|n| agent.migration_of(n).is_none())
        .collect()
}

/// Measures every candidate guest in turn, forever, until the agent is gone.
pub(super) async fn sample(agent: Weak<Inner>, rates: DirtyRates) {
    loop {
        let Some(inner) = agent.upgrade() else {
            return;
        };
        let names = candidates(&Agent { inner });
        for name in &names {
            let Some(inner) = agent.upgrade() else {
                return;
            };
            let a = Agent { inner };
            // Checked again: a migration may have started since the round began.
            if a.migration_of(name).is_some() {
                continue;
            }
            let Ok(qmp) = a.inner.host.qmp(name) else {
                continue;
            };
            drop(a);
            let probe = tokio::time::timeout(
                Duration::from_secs(PROBE_S + 5),
                tern_engine::probe_dirty_rate(&qmp, PROBE_S),
            )
            .await;
            if let Ok(Ok(p)) = probe {
                lock(&rates).insert(name.clone(), p.dirty_bytes_per_s);
            }
        }
        if let Some(inner) = agent.upgrade() {
            let present: BTreeSet<String> = inner.host.names().into_iter().collect();
            lock(&rates).retain(|n, _| present.contains(n));
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

/// The rates as they are now.
pub(super) fn snapshot(rates: &DirtyRates) -> BTreeMap<String, u64> {
    lock(rates).clone()
}

fn lock(rates: &DirtyRates) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
    rates.lock().unwrap_or_else(|p| p.into_inner())
}
