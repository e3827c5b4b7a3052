//! Where the agents of a lab are found: `/run/tern/agents/<lab>.json`, written by
//! `tern lab up --agents` / `tern lab agents` and read by the CLI. (The agents themselves know
//! nothing of labs: each gets a configuration file listing its peers.)
//!
//! It lives beside, not inside, the lab's own state directory (`/run/tern/labs`), whose every
//! `*.json` file is taken for a lab.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LabError;

/// Directory of the discovery files.
pub const AGENTS_DIR: &str = "/run/tern/agents";

/// One lab host's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabAgent {
    /// The agent's base URL.
    pub url: String,
    /// The agent's PID (to stop it).
    pub pid: u32,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

/// The agents of one lab, by host name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabAgents {
    /// Lab name.
    pub lab: String,
    /// Agents by host name.
    pub agents: BTreeMap<String, LabAgent>,
    /// The lab's `tern pki` directory when the agents serve mutual TLS (`tern lab up
    /// --agents --tls`): clients use its `lab-admin` user certificate. `None`: plain HTTP on
    /// loopback, no authentication.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
}

/// The discovery file of lab `lab`.
pub fn discovery_path(lab: &str) -> PathBuf {
    Path::new(AGENTS_DIR).join(format!("{lab}.json"))
}

/// The directory holding lab `lab`'s agent configurations, logs and runtime directories.
pub fn lab_agents_dir(lab: &str) -> PathBuf {
    Path::new(AGENTS_DIR).join(lab)
}

impl LabAgents {
    /// Reads lab `lab`'s discovery file.
    pub fn load(lab: &str) -> Result<Self, LabError> {
        let path = discovery_path(lab);
        let text = std::fs::read_to_string(&path).map_err(|e| LabError::State {
            path: path.clone(),
            message: format!(
                "no agents known for lab {lab:?} ({e}); start them with `tern lab agents --name {lab}`"
            ),
        })?;
        serde_json::from_str(&text).map_err(|e| LabError::State {
            path: path.clone(),
            message: format!("not a valid agents file: {e}"),
        })
    }

    /// Writes the discovery file atomically.
    pub fn save(&self) -> Result<(), LabError> {
        let path = discovery_path(&self.lab);
        let err = |message: String| LabError::State {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(AGENTS_DIR)
            .map_err(|e| err(format!("creating {AGENTS_DIR}: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| err(format!("encoding agents file: {e}")))?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| err(format!("writing: {e}")))
    }

    /// Removes lab `lab`'s discovery file (missing is fine).
    pub fn remove(lab: &str) {
        let _ = std::fs::remove_file(discovery_path(lab));
    }
}
