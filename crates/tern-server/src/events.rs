//! Every state change, broadcast to `/v1/events` (server-sent events) subscribers.

use serde::Serialize;
use tokio::sync::broadcast;
use utoipa::ToSchema;

/// One state change.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ControllerEvent {
    /// What changed: `host`, `migration`, `evacuation`.
    pub kind: &'static str,
    /// Its name or id.
    pub id: String,
    /// The new state.
    pub state: String,
    /// What happened.
    pub detail: String,
    /// Wall-clock time (ms since the epoch).
    pub wall_ms: u64,
}

/// The broadcast channel (slow subscribers lose the oldest events and are told so).
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<ControllerEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus keeping the last 1024 events for slow subscribers.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
        }
    }

    /// Publishes an event (nobody listening is fine).
    pub fn publish(&self, kind: &'static str, id: &str, state: &str, detail: impl Into<String>) {
        let _ = self.tx.send(ControllerEvent {
            kind,
            id: id.to_string(),
            state: state.to_string(),
            detail: detail.into(),
            wall_ms: crate::model::now_ms(),
        });
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<ControllerEvent> {
        self.tx.subscribe()
    }
}
