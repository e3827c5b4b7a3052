//! Errors of the QMP client.

use std::path::PathBuf;
use std::time::Duration;

use crate::enums::MigrationStatus;

/// How much of an offending JSON text a [`QmpError::Decode`] keeps.
pub(crate) const MAX_JSON_IN_ERROR: usize = 512;

/// Everything that can go wrong talking QMP.
///
/// The engine needs to tell apart "QEMU refused this command" ([`QmpError::Command`], the
/// VM is still there) from "QEMU is gone" ([`QmpError::Closed`]), because the first is a
/// policy matter and the second ends the migration on that side.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The QMP socket could not be connected.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The socket did not accept a connection within the allowed time (QEMU did not start,
    /// or was started without `-qmp unix:<path>,server=on`).
    #[error("QMP socket {path} not ready after {waited:?}: {last_error}")]
    ConnectTimeout {
        /// Socket path.
        path: PathBuf,
        /// How long we tried.
        waited: Duration,
        /// The last connection error seen.
        last_error: std::io::Error,
    },

    /// QEMU answered a command with an error reply (`{"error": {"class", "desc"}}`).
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    Command {
        /// The command that was refused.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The connection closed (QEMU exited or crashed, or closed the monitor) before the reply
    /// came; every pending and later command fails with this.
    #[error("QMP connection closed: {reason}")]
    Closed {
        /// What was observed: end of stream, or the read error.
        reason: String,
    },

    /// An I/O error on an open connection.
    #[error("QMP I/O error while {context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },

    /// QEMU sent JSON we could not interpret as the expected reply.
    #[error("cannot decode {what}: {source}; JSON was: {json}")]
    Decode {
        /// What we tried to decode (e.g. the reply of `query-migrate`).
        what: String,
        /// The offending JSON, truncated to a few hundred bytes.
        json: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// QEMU broke the QMP protocol (e.g. no greeting).
    #[error("QMP protocol error: {0}")]
    Protocol(String),

    /// Arguments could not be encoded as JSON (a bug in the caller's types).
    #[error("cannot encode arguments of '{command}': {source}")]
    Encode {
        /// The command.
        command: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// A wait for a migration status ran out of time.
    #[error("timed out after {waited:?} waiting for migration status; last seen: {last_status}")]
    WaitTimeout {
        /// How long we waited.
        waited: Duration,
        /// The last status observed.
        last_status: MigrationStatus,
    },

    /// A wait for something other than a migration status ran out of time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        waited: Duration,
    },
}

impl QmpError {
    /// True if the error means the connection (and probably QEMU) is gone.
    pub fn is_closed(&self) -> bool {
        matches!(self, QmpError::Closed { .. })
    }

    /// The QMP error class if QEMU refused a command.
    pub fn command_class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    pub(crate) fn decode(what: impl Into<String>, json: &str, source: serde_json::Error) -> Self {
        QmpError::Decode {
            what: what.into(),
            json: truncate(json, MAX_JSON_IN_ERROR),
            source,
        }
    }
}

/// Truncates on a char boundary, marking the cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes total)", &text[..end], text.len())
}

/// Result alias for this crate.
pub type Result<T, E = QmpError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_short_text_and_cuts_long_on_char_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        let long = "é".repeat(600);
        let cut = truncate(&long, 11);
        assert!(cut.starts_with(&"é".repeat(5)));
        assert!(cut.ends_with("(1200 bytes total)"));
    }
}
