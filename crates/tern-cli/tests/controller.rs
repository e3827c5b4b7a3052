//! `tern server` and the commands that talk to it, as an operator runs them: a real
//! `tern server` process on loopback with a real SQLite file, driven through the `tern` CLI.
//! No root, QEMU or lab needed (agents are not called: only planning and settings).
//! The server is killed by PID on every path (guard with `Drop`).

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// A `tern server` process; killed when dropped.
struct ServerProcess {
    child: Child,
    url: String,
    token_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let token_file = dir.path().join("state/token");
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndatabase = \"{}\"\ntoken_file = \"{}\"\n\
                 [agents]\nh1 = \"http://127.0.0.1:9\"\nh2 = \"http://127.0.0.1:9\"\n",
                dir.path().join("state/controller.db").display(),
                token_file.display()
            ),
        )
        .unwrap();
        let child = Command::new(TERN)
            .args(["server", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            token_file,
            _dir: dir,
        };
        let t = Instant::now();
        while !(s.token_file.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "tern server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file)
            .unwrap()
            .trim()
            .to_string()
    }

    fn tern(&self, args: &[&str]) -> Output {
        Command::new(TERN)
            .args(args)
            .env("TERN_SERVER", &self.url)
            .env("TERN_TOKEN", self.token())
            .output()
            .unwrap()
    }
}

fn heartbeat(host: &str, free: u64, vms: &[(&str, u64)]) -> Value {
    json!({
        "host": host,
        "facts": {"memory_mib": 8192, "free_memory_mib": free, "qemu_version": "10.0.0",
            "migration_capabilities": ["postcopy-ram"], "permit_post_copy": true,
            "max_outbound": 2, "max_inbound": 2},
        "vms": vms.iter().map(|(n, m)| json!({"name": n, "memory_mib": m})).collect::<Vec<_>>()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_server_and_host_commands() {
    let s = ServerProcess::start();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for (host, free, vms) in [("h1", 0, vec![("web", 512)]), ("h2", 4096, vec![])] {
        let r = http
            .post(format!("{}/v1/agents/heartbeat", s.url))
            .bearer_auth(s.token())
            .json(&heartbeat(host, free, &vms))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let out = s.tern(&["host", "list", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let hosts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 2);
    assert_eq!(hosts[0]["name"], "h1");

    let out = s.tern(&[
        "host",
        "set",
        "h2",
        "--max-inbound",
        "1",
        "--post-copy",
        "deny",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = s.tern(&["host", "show", "h2", "-o", "json"]);
    let h2: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (h2["max_inbound"].as_u64(), h2["post_copy"].as_str()),
        (Some(1), Some("deny"))
    );

    let out = s.tern(&["host", "evacuate", "h1", "--deadline", "30m", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("planned evacuation of h1"), "{text}");
    assert!(text.contains("web") && text.contains("→ h2"), "{text}");

    // No --to: the controller chooses and says why (its agent is not running here, so the
    // attempt then fails; the choice and the record are what is checked).
    let out = s.tern(&["migrate", "web", "--context", "maintenance"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("web from h1 to h2") && text.contains("MiB free"),
        "{text}"
    );
    let out = s.tern(&["migrate", "ghost"]);
    assert_eq!(out.status.code(), Some(2));
    let out = s.tern(&["host", "evacuate", "h1", "--dry-run"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "web is already migrating: {out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already migrating"));

    for bad in ["0", "-5m", "tomorrow"] {
        let deadline = format!("--deadline={bad}");
        let out = s.tern(&["host", "evacuate", "h1", &deadline, "--dry-run"]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{bad:?}")), "{err}");
    }
    let out = s.tern(&["host", "show", "h9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"h9\""));
    let out = Command::new(TERN)
        .args(["host", "list", "--server", &s.url])
        .env("TERN_TOKEN", "wrong-token")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong bearer token"));
    let out = s.tern(&["host", "list", "--server", "notaurl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a URL"));

    // An empty host: the evacuation completes at once and --watch says so (exit 0).
    let out = s.tern(&["host", "evacuate", "h2", "--deadline", "10m", "--watch"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("started evacuation of h2") && text.contains("completed"),
        "{text}"
    );
    let out = s.tern(&["host", "show", "h2", "-o", "json"]);
    let h2: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h2["state"], "draining");
}

/// `tern server` with `[tls]` and the CLI with `--pki-dir/--user` (and `TERN_PKI_DIR`,
/// `TERN_USER`, `--cert/--key/--ca`): roles are enforced end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_commands_over_mutual_tls_with_roles() {
    use tern_pki::{Pki, Role, TlsFiles, Validity};
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let pki = Pki::init(&pki_dir).unwrap();
    let localhost: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    pki.issue_host("controller", &[localhost], Validity::days(1))
        .unwrap();
    pki.issue_host("h1", &[localhost], Validity::days(1))
        .unwrap();
    pki.issue_user("vera", Role::Viewer, Validity::days(1))
        .unwrap();
    let ada = pki
        .issue_user("ada", Role::Admin, Validity::days(1))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndatabase = \"{}\"\n[agents]\nh1 = \"http://127.0.0.1:9\"\n\
             [tls]\npki_dir = \"{}\"\n",
            dir.path().join("state/controller.db").display(),
            pki_dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(TERN)
        .args(["server", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = ServerProcess {
        child,
        url: format!("https://127.0.0.1:{port}"),
        token_file: dir.path().join("state/token"),
        _dir: dir,
    };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "tern server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = tern_pki::reqwest_client_builder(&TlsFiles::in_pki_dir(&pki_dir, "host", "h1"))
        .unwrap()
        .no_proxy()
        .build()
        .unwrap();
    let r = agent
        .post(format!("{}/v1/agents/heartbeat", s.url))
        .json(&heartbeat("h1", 4096, &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let tern = |args: &[&str], envs: &[(&str, &str)]| {
        let mut c = Command::new(TERN);
        c.args(args)
            .env("TERN_SERVER", &s.url)
            .env_remove("TERN_TOKEN")
            .env_remove("TERN_PKI_DIR")
            .env_remove("TERN_USER");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let pki_s = pki_dir.display().to_string();
    let out = tern(
        &[
            "host",
            "list",
            "-o",
            "json",
            "--pki-dir",
            &pki_s,
            "--user",
            "vera",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let hosts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hosts[0]["name"], "h1");

    // The viewer may not change host settings: 403 naming the role needed, exit 2.
    let viewer = [("TERN_PKI_DIR", pki_s.as_str()), ("TERN_USER", "vera")];
    let out = tern(&["host", "set", "h1", "--max-inbound", "1"], &viewer);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vera") && err.contains("admin"), "{err}");

    // The admin may, with explicit --cert/--key/--ca.
    let (cert, key, ca) = (
        ada.cert_path.display().to_string(),
        ada.key_path.display().to_string(),
        pki.ca_cert_path().display().to_string(),
    );
    let out = tern(
        &[
            "host",
            "set",
            "h1",
            "--max-inbound",
            "1",
            "--cert",
            &cert,
            "--key",
            &key,
            "--ca",
            &ca,
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");

    // No certificate for an https:// controller: a clear message, not a TLS error.
    let out = tern(&["host", "list"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pki-dir"));
    let out = tern(
        &["host", "list", "--pki-dir", &pki_s, "--user", "nobody"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nobody\""));
}
