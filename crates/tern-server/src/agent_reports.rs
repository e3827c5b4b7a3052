//! What a source agent reports about a running migration on each poll of the runner, beyond
//! its state: live progress (kept in memory for the web view's chart, published as `progress`
//! events) and its policy's decisions, each with its reason (appended once to the migration's
//! history as `decision` events, so operators see them as they happen in the web view and in
//! `GET /v1/migrations/{id}`).
//!
//! A decision is identified by the agent migration and the agent's event `seq`; the detail
//! starts with `[AGENT-MIGRATION-ID #SEQ]` so that, after a controller restart (memory empty), the last
//! forwarded one is found again in the stored history and nothing is recorded twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::agent_client::{AgentEvent, AgentMigration};
use crate::controller::{Controller, ControllerError};
use crate::model::{MigrationEvent, MigrationRecord, now_ms};

/// The last decision `seq` forwarded, per agent migration id.
#[derive(Debug, Clone, Default)]
pub struct ForwardedDecisions {
    inner: Arc<Mutex<HashMap<String, u64>>>,
}

/// The history detail of an agent decision.
pub fn decision_detail(agent_id: &str, e: &AgentEvent) -> String {
    format!(
        "[{agent_id} #{}] {}: {}",
        e.seq,
        e.action.as_deref().unwrap_or("decision"),
        e.reason.as_deref().unwrap_or("")
    )
}

/// The highest `seq` of `agent_id`'s decisions already in a stored history.
pub fn last_forwarded(agent_id: &str, history: &[MigrationEvent]) -> u64 {
    let prefix = format!("[{agent_id} #");
    history
        .iter()
        .filter(|e| e.kind == "decision")
        .filter_map(|e| e.detail.strip_prefix(&prefix))
        .filter_map(|rest| rest.split(']').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

impl Controller {
    /// Records the progress and the new decisions in `am`, the agent's view of `m`.
    pub async fn record_agent_report(
        &self,
        m: &MigrationRecord,
        am: &AgentMigration,
    ) -> Result<(), ControllerError> {
        if let Some(mut p) = am.progress.clone() {
            p.wall_ms = now_ms();
            let detail = format!(
                "{} remaining, dirty {} B/s",
                p.remaining_bytes, p.dirty_bytes_per_s
            );
            self.progress.record(&m.id, p);
            self.events
                .publish("progress", &m.id, m.state.as_str(), detail);
        }
        let decisions: Vec<&AgentEvent> =
            am.events.iter().filter(|e| e.event == "decision").collect();
        if decisions.is_empty() {
            return Ok(());
        }
        let known = self
            .forwarded
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&am.id)
            .copied();
        let before = match known {
            Some(s) => s,
            None => last_forwarded(&am.id, &self.store.events(&m.id).await?),
        };
        let mut last = before;
        for e in decisions.into_iter().filter(|e| e.seq > before) {
            self.note(m, "decision", &decision_detail(&am.id, e))
                .await?;
            last = last.max(e.seq);
        }
        self.forwarded
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(am.id.clone(), last);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_forwarded_decision_is_found_again_in_the_history() {
        let e = AgentEvent {
            seq: 7,
            event: "decision".into(),
            action: Some("switch-to-postcopy".into()),
            reason: Some("dirty 90 MB/s > link 60 MB/s: pass 3: no convergence".into()),
        };
        let detail = decision_detail("a1", &e);
        assert_eq!(
            detail,
            "[a1 #7] switch-to-postcopy: dirty 90 MB/s > link 60 MB/s: pass 3: no convergence"
        );
        let ev = |kind: &str, detail: &str| MigrationEvent {
            seq: 1,
            wall_ms: 0,
            kind: kind.into(),
            detail: detail.into(),
        };
        let history = [
            ev("decision", &detail),
            ev("decision", "[a1 #3] set-downtime-limit: 300 ms"),
            ev("decision", "[a2 #9] other attempt"),
            ev("note", "[a1 #99] not a decision"),
        ];
        assert_eq!(last_forwarded("a1", &history), 7);
        assert_eq!(last_forwarded("a2", &history), 9);
        assert_eq!(last_forwarded("a3", &history), 0);
    }
}
