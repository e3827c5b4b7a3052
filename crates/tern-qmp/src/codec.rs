//! Pure parsing of QMP server messages (one JSON object per line).
//!
//! Kept free of I/O so that greeting/reply/event classification is unit-tested directly.

use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{QmpError, Result};
use crate::event::{QmpEvent, QmpEventKind, QmpTimestamp};
use crate::types::{QmpGreeting, VersionInfoWire};

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ServerMessage {
    /// The greeting (`{"QMP": …}`), only valid as the first line.
    Greeting(QmpGreeting),
    /// A command reply. `id` is `None` if QEMU could not read the id (parse errors).
    Reply { id: Option<Value>, outcome: Outcome },
    /// An asynchronous event.
    Event(QmpEvent),
}

/// Result part of a reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// `{"return": …}`
    Return(Value),
    /// `{"error": {"class", "desc"}}`
    Error { class: String, desc: String },
}

#[derive(Deserialize)]
struct GreetingWire {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: VersionInfoWire,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct ErrorWire {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

/// Classifies one line from the server. Errors only on text that is not a JSON object of a
/// known QMP message shape; unknown extra members are ignored.
pub(crate) fn parse_server_line(line: &str, received_at: Instant) -> Result<ServerMessage> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| QmpError::decode("a QMP message", line, e))?;
    let Value::Object(mut obj) = value else {
        return Err(QmpError::Protocol(format!(
            "QMP message is not a JSON object: {}",
            crate::error::truncate(line, crate::error::MAX_JSON_IN_ERROR)
        )));
    };
    if obj.contains_key("QMP") {
        let wire: GreetingWire = serde_json::from_value(Value::Object(obj))
            .map_err(|e| QmpError::decode("the QMP greeting", line, e))?;
        return Ok(ServerMessage::Greeting(QmpGreeting {
            version: wire.qmp.version.into(),
            capabilities: wire.qmp.capabilities,
        }));
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str).map(str::to_owned) {
        let timestamp = obj
            .remove("timestamp")
            .and_then(|t| serde_json::from_value::<QmpTimestamp>(t).ok())
            .unwrap_or_default();
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(ServerMessage::Event(QmpEvent {
            timestamp,
            received_at,
            kind: QmpEventKind::from_parts(&name, data),
        }));
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(ServerMessage::Reply {
            id,
            outcome: Outcome::Return(ret),
        });
    }
    if let Some(err) = obj.remove("error") {
        let wire: ErrorWire = serde_json::from_value(err)
            .map_err(|e| QmpError::decode("a QMP error reply", line, e))?;
        return Ok(ServerMessage::Reply {
            id,
            outcome: Outcome::Error {
                class: wire.class,
                desc: wire.desc,
            },
        });
    }
    Err(QmpError::Protocol(format!(
        "unrecognised QMP message (no QMP/event/return/error member): {}",
        crate::error::truncate(line, crate::error::MAX_JSON_IN_ERROR)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enums::MigrationStatus;
    use serde_json::json;

    fn parse(line: &str) -> Result<ServerMessage> {
        parse_server_line(line, Instant::now())
    }

    #[test]
    fn parses_qemu_10_greeting() {
        let line = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;
        let ServerMessage::Greeting(g) = parse(line).unwrap() else {
            panic!("not a greeting");
        };
        assert_eq!(
            (g.version.major, g.version.minor, g.version.micro),
            (10, 0, 2)
        );
        assert_eq!(g.version.package, "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1");
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn greeting_without_package_or_capabilities_still_parses() {
        let line =
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 9}}, "extra": 1}}"#;
        let ServerMessage::Greeting(g) = parse(line).unwrap() else {
            panic!("not a greeting");
        };
        assert_eq!(g.version.major, 9);
        assert!(g.version.package.is_empty());
        assert!(g.capabilities.is_empty());
    }

    #[test]
    fn parses_replies_with_and_without_id() {
        assert_eq!(
            parse(r#"{"return": {"status": "running", "running": true}, "id": 7}"#).unwrap(),
            ServerMessage::Reply {
                id: Some(json!(7)),
                outcome: Outcome::Return(json!({"status": "running", "running": true}))
            }
        );
        assert_eq!(
            parse(r#"{"return": {}}"#).unwrap(),
            ServerMessage::Reply {
                id: None,
                outcome: Outcome::Return(json!({}))
            }
        );
    }

    #[test]
    fn parses_error_reply() {
        assert_eq!(
            parse(r#"{"id": "x", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#)
                .unwrap(),
            ServerMessage::Reply {
                id: Some(json!("x")),
                outcome: Outcome::Error {
                    class: "CommandNotFound".into(),
                    desc: "The command nope has not been found".into()
                }
            }
        );
    }

    #[test]
    fn parses_event_with_timestamp() {
        let msg = parse(r#"{"timestamp": {"seconds": 1432121972, "microseconds": 744001}, "event": "MIGRATION", "data": {"status": "postcopy-recover-setup"}}"#).unwrap();
        let ServerMessage::Event(ev) = msg else {
            panic!("not an event")
        };
        assert_eq!(ev.timestamp.seconds, 1432121972);
        assert_eq!(ev.timestamp.microseconds, 744001);
        assert_eq!(
            ev.kind,
            QmpEventKind::Migration {
                status: MigrationStatus::PostcopyRecoverSetup
            }
        );
    }

    #[test]
    fn rejects_garbage_with_the_offending_text() {
        let err = parse("not json at all").unwrap_err();
        assert!(
            matches!(&err, QmpError::Decode { json, .. } if json == "not json at all"),
            "{err}"
        );
        let err = parse(r#"{"something": 1}"#).unwrap_err();
        assert!(matches!(err, QmpError::Protocol(ref m) if m.contains("something")));
        assert!(matches!(parse("[1,2]"), Err(QmpError::Protocol(_))));
    }
}
