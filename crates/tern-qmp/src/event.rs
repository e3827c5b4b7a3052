//! Asynchronous QMP events.

use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use crate::enums::{MigrationStatus, ShutdownCause};

/// QEMU's event timestamp (host wall clock, `gettimeofday`).
///
/// Wall clock, so not suitable for measuring short intervals; use
/// [`QmpEvent::received_at`] (host monotonic) for that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct QmpTimestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl QmpTimestamp {
    /// Microseconds since the Unix epoch.
    pub fn as_micros(&self) -> i64 {
        self.seconds
            .saturating_mul(1_000_000)
            .saturating_add(self.microseconds)
    }
}

/// An event as received, with QEMU's timestamp and the host monotonic arrival time.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// QEMU's timestamp.
    pub timestamp: QmpTimestamp,
    /// When the reader task parsed the line (host `CLOCK_MONOTONIC` via `Instant`), for
    /// timing comparisons with tern's serial log.
    pub received_at: Instant,
    /// What happened.
    pub kind: QmpEventKind,
}

/// The events tern interprets; everything else is [`QmpEventKind::Other`].
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEventKind {
    /// `MIGRATION`: status change (only with the `events` capability on).
    Migration {
        /// New status.
        status: MigrationStatus,
    },
    /// `MIGRATION_PASS`: the source starts a new dirty-bitmap pass (only with `events`).
    MigrationPass {
        /// Pass number, starting at 1.
        pass: u64,
    },
    /// `STOP`: the VM stopped (e.g. stop-and-copy begins on the source).
    Stop,
    /// `RESUME`: the VM resumed (e.g. the destination starts running).
    Resume,
    /// `SHUTDOWN`: QEMU is about to exit (unless `-no-shutdown`).
    Shutdown {
        /// True if the guest asked for it.
        guest: Option<bool>,
        /// Why.
        reason: Option<ShutdownCause>,
    },
    /// Any other event, or a known one whose data did not have the expected shape.
    Other {
        /// Event name, e.g. `RESET`.
        name: String,
        /// Event data (`null` if absent).
        data: Value,
    },
}

impl QmpEventKind {
    /// QEMU's event name.
    pub fn name(&self) -> &str {
        match self {
            QmpEventKind::Migration { .. } => "MIGRATION",
            QmpEventKind::MigrationPass { .. } => "MIGRATION_PASS",
            QmpEventKind::Stop => "STOP",
            QmpEventKind::Resume => "RESUME",
            QmpEventKind::Shutdown { .. } => "SHUTDOWN",
            QmpEventKind::Other { name, .. } => name,
        }
    }

    /// Interprets a named event; never fails (falls back to `Other`).
    pub fn from_parts(name: &str, data: Value) -> Self {
        #[derive(Deserialize)]
        struct MigrationData {
            status: MigrationStatus,
        }
        #[derive(Deserialize)]
        struct PassData {
            pass: u64,
        }
        #[derive(Deserialize, Default)]
        struct ShutdownData {
            guest: Option<bool>,
            reason: Option<ShutdownCause>,
        }
        let parsed = match name {
            "MIGRATION" => serde_json::from_value::<MigrationData>(data.clone())
                .ok()
                .map(|d| QmpEventKind::Migration { status: d.status }),
            "MIGRATION_PASS" => serde_json::from_value::<PassData>(data.clone())
                .ok()
                .map(|d| QmpEventKind::MigrationPass { pass: d.pass }),
            "STOP" => Some(QmpEventKind::Stop),
            "RESUME" => Some(QmpEventKind::Resume),
            "SHUTDOWN" => {
                let d = if data.is_null() {
                    Some(ShutdownData::default())
                } else {
                    serde_json::from_value::<ShutdownData>(data.clone()).ok()
                };
                d.map(|d| QmpEventKind::Shutdown {
                    guest: d.guest,
                    reason: d.reason,
                })
            }
            _ => None,
        };
        parsed.unwrap_or_else(|| QmpEventKind::Other {
            name: name.to_owned(),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_events_are_typed() {
        assert_eq!(
            QmpEventKind::from_parts("MIGRATION", json!({"status": "device"})),
            QmpEventKind::Migration {
                status: MigrationStatus::Device
            }
        );
        assert_eq!(
            QmpEventKind::from_parts("MIGRATION_PASS", json!({"pass": 3})),
            QmpEventKind::MigrationPass { pass: 3 }
        );
        assert_eq!(
            QmpEventKind::from_parts("STOP", Value::Null),
            QmpEventKind::Stop
        );
        assert_eq!(
            QmpEventKind::from_parts(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"})
            ),
            QmpEventKind::Shutdown {
                guest: Some(false),
                reason: Some(ShutdownCause::HostQmpQuit)
            }
        );
    }

    #[test]
    fn unknown_or_malformed_events_fall_back_to_other() {
        let kind = QmpEventKind::from_parts("RESET", json!({"guest": true}));
        assert_eq!(kind.name(), "RESET");
        assert!(matches!(kind, QmpEventKind::Other { ref data, .. } if data["guest"] == true));
        let malformed = QmpEventKind::from_parts("MIGRATION_PASS", json!({"pass": "x"}));
        assert!(matches!(malformed, QmpEventKind::Other { .. }));
        assert_eq!(
            QmpEventKind::from_parts("MIGRATION", json!({"status": "brand-new"})),
            QmpEventKind::Migration {
                status: MigrationStatus::Unknown("brand-new".into())
            }
        );
    }

    #[test]
    fn timestamp_in_micros() {
        let t = QmpTimestamp {
            seconds: 2,
            microseconds: 5,
        };
        assert_eq!(t.as_micros(), 2_000_005);
    }
}
