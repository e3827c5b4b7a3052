//! Errors of the lab; every one a user can cause names the bad value and what would be valid.

use std::path::PathBuf;

use crate::rate::LinkRateError;

/// Everything that can go wrong building, driving or tearing down a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab name would not make a safe namespace name.
    #[error(
        "invalid lab name {name:?}: {reason}; use 1 to {max} lowercase letters, digits and '-' (not at either end), e.g. \"tern\" or \"mig-test-1\"",
        max = crate::lab::MAX_LAB_NAME_LEN
    )]
    InvalidName {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Host count outside what the lab supports.
    #[error(
        "invalid host count {hosts}: a lab has {min} to {max} hosts",
        min = crate::lab::MIN_HOSTS,
        max = crate::lab::MAX_HOSTS
    )]
    InvalidHostCount {
        /// The refused count.
        hosts: usize,
    },
    /// A link rate could not be parsed or is out of range.
    #[error(transparent)]
    InvalidLinkRate(#[from] LinkRateError),
    /// A fault mode name was not recognised.
    #[error("invalid fault mode {value:?}; valid modes: \"blackhole\", \"link-down\"")]
    InvalidFaultMode {
        /// The refused text.
        value: String,
    },
    /// A host name that is not part of this lab.
    #[error("lab {lab:?} has no host {host:?}; valid hosts: {}", valid.join(", "))]
    UnknownHost {
        /// Lab that was asked.
        lab: String,
        /// The refused host name.
        host: String,
        /// The lab's host names.
        valid: Vec<String>,
    },
    /// `Lab::up` found an existing lab (state file or namespaces) of that name.
    #[error(
        "lab {name:?} already exists ({evidence}); take it down first with `tern lab down {name}` (Lab::down) or pick another name"
    )]
    AlreadyExists {
        /// The lab name.
        name: String,
        /// What was found (state file path or namespace names).
        evidence: String,
    },
    /// No state file for that lab.
    #[error("no lab {name:?} (no state file {path}); existing labs: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    NotFound {
        /// The lab name.
        name: String,
        /// Where its state file would be.
        path: PathBuf,
        /// Names of labs that do exist.
        known: Vec<String>,
    },
    /// A delay was asked for but the kernel has no `netem` qdisc.
    #[error(
        "link delay {delay_ms} ms needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM is not set); only rate limits (tbf) and link cuts are available here"
    )]
    NetemUnavailable {
        /// The delay asked for, in milliseconds.
        delay_ms: u128,
    },
    /// The lab needs CAP_NET_ADMIN / CAP_SYS_ADMIN.
    #[error("network labs need root (CAP_NET_ADMIN and CAP_SYS_ADMIN); running as uid {uid}")]
    NotRoot {
        /// The effective uid we run as.
        uid: u32,
    },
    /// A program (`ip`, `tc`) could not be started.
    #[error("could not run `{command}`: {source} (is iproute2 installed?)")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A program (`ip`, `tc`) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Exit status text.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Reading or writing the state file failed.
    #[error("lab state file {path}: {message}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// Entering a namespace or signalling a process failed.
    #[error("{what}: {source}")]
    Sys {
        /// What we were doing.
        what: String,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
    /// A thread that entered a namespace panicked.
    #[error("thread inside namespace {netns} panicked")]
    NetnsThreadPanicked {
        /// The namespace.
        netns: String,
    },
}
