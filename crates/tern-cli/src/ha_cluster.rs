//! The hook for `tern demo --evacuate --ha` (issue 12): a throwaway PostgreSQL, several
//! `tern server` processes on it, killing the leader and measuring the takeover, and the
//! "no migration started twice" verdict from the controllers' event history.
//!
//! The evacuation demo (another engineer's work) starts its agents and guests, then:
//! `let pg = ThrowawayPostgres::start(port)?; let mut ctl = ControllerProcess::spawn(&exe,
//! "c1", &pg.url, &agents)?; …` for two controllers, asks the leader
//! (`leader_of`) to evacuate, calls `kill` on it mid-evacuation, `wait_for_leader` on the
//! other (→ `takeover_s`), and at the end `duplicated_migrations` over
//! `GET /v1/evacuations/{id}` → `GET /v1/migrations/{id}` views. Every process is killed by
//! PID on drop; the cluster directory is removed. `crates/tern-cli/tests/ha.rs` runs the same
//! sequence with fake agents.
#![allow(dead_code)] // Used by the evacuation demo's `--ha` mode, which is not wired yet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::Value;

/// `scripts/pg-test-server.sh`, found next to the source tree or installed.
fn pg_script() -> PathBuf {
    let dev = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-server.sh");
    if dev.exists() {
        dev
    } else {
        PathBuf::from("/usr/share/tern/pg-test-server.sh")
    }
}

/// A PostgreSQL cluster made with `initdb` in a temporary directory, on loopback; stopped
/// and removed when dropped.
pub struct ThrowawayPostgres {
    dir: PathBuf,
    /// `postgres://tern@127.0.0.1:PORT/tern_test`.
    pub url: String,
}

impl ThrowawayPostgres {
    /// Starts one on `port` (needs root and Debian's postgresql).
    pub fn start(port: u16) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tern-demo-pg.{}", std::process::id()));
        let out = Command::new("bash")
            .arg(pg_script())
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .context("running scripts/pg-test-server.sh")?;
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let pg = Self { dir, url };
        if !out.status.success() || !pg.url.starts_with("postgres://") {
            return Err(anyhow!(
                "PostgreSQL did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(pg)
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(pg_script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// One `tern server` process; killed (SIGKILL) when dropped.
pub struct ControllerProcess {
    child: Option<Child>,
    /// Its API.
    pub url: String,
    /// Its lab-mode token.
    pub token: String,
    /// Its `[ha] id`.
    pub id: String,
    dir: tempfile::TempDir,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl ControllerProcess {
    /// Starts `exe server` as controller `id` on `database` with `agents` (host → URL) and
    /// waits for its API (its token file appears, `/v1/leader` answers).
    pub async fn spawn(
        exe: &Path,
        id: &str,
        database: &str,
        agents: &BTreeMap<String, String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token_file = dir.path().join("state/token");
        let agents: String = agents
            .iter()
            .map(|(h, u)| format!("{h} = \"{u}\"\n"))
            .collect();
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndatabase = \"{database}\"\ntoken_file = \"{}\"\n\
                 runner_tick_ms = 200\n[ha]\nid = \"{id}\"\n[agents]\n{agents}",
                token_file.display()
            ),
        )?;
        let child = Command::new(exe)
            .args(["server", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut c = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            id: id.to_string(),
            dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(&token_file) {
                c.token = t.trim().to_string();
                if c.leader_status().await.is_ok() {
                    return Ok(c);
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(anyhow!("controller {id} did not start within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crashed machine.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `GET /v1/leader`.
    pub async fn leader_status(&self) -> anyhow::Result<Value> {
        let r = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .build()?
            .get(format!("{}/v1/leader", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(anyhow!("/v1/leader: {}", r.status()));
        }
        Ok(r.json().await?)
    }

    /// Waits until this controller leads; returns how long that took.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        loop {
            if self
                .leader_status()
                .await
                .is_ok_and(|v| v["role"] == "leader")
            {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                return Err(anyhow!(
                    "controller {} did not lead within {timeout:?}",
                    self.id
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The index of the controller that leads now, if any.
pub async fn leader_of(controllers: &[ControllerProcess]) -> Option<usize> {
    for (i, c) in controllers.iter().enumerate() {
        if c.leader_status()
            .await
            .is_ok_and(|v| v["role"] == "leader" || v["role"] == "single")
        {
            return Some(i);
        }
    }
    None
}

/// Migrations started more than once, from `GET /v1/migrations/{id}` views: a VM with more
/// than one start (`attempt N (key) to …` events; adoption after a takeover is not a start)
/// beyond the retries the migration itself records. Returns the VM names.
pub fn duplicated_migrations(views: &[Value]) -> Vec<String> {
    let mut starts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for v in views {
        let vm = v["migration"]["vm"].as_str().unwrap_or("?").to_string();
        let attempts = v["migration"]["attempts"].as_u64().unwrap_or(0);
        let n = v["events"].as_array().map_or(0, |es| {
            es.iter()
                .filter(|e| {
                    e["kind"] == "attempt"
                        && e["detail"]
                            .as_str()
                            .is_some_and(|d| d.starts_with("attempt ") && d.contains(") to "))
                })
                .count() as u64
        });
        let e = starts.entry(vm).or_default();
        e.0 += n;
        e.1 += attempts;
    }
    starts
        .into_iter()
        .filter(|(_, (n, attempts))| n > attempts)
        .map(|(vm, _)| vm)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(vm: &str, attempts: u64, details: &[&str]) -> Value {
        json!({"migration": {"vm": vm, "attempts": attempts},
               "events": details.iter().map(|d| json!({"kind": "attempt", "detail": d})).collect::<Vec<_>>()})
    }

    #[test]
    fn a_second_start_of_the_same_attempt_is_a_duplicate_and_adoption_is_not() {
        let once = view(
            "a",
            1,
            &[
                "attempt 1 (m-a1) to h2",
                "adopted agent migration x for attempt m-a1",
            ],
        );
        let twice = view(
            "b",
            1,
            &["attempt 1 (m-a1) to h2", "attempt 1 (m-a1) to h2"],
        );
        let retried = view(
            "c",
            2,
            &["attempt 1 (m-a1) to h2", "attempt 2 (m-a2) to h3"],
        );
        assert_eq!(duplicated_migrations(&[once, twice, retried]), ["b"]);
    }
}
