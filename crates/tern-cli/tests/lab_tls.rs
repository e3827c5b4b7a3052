//! `tern lab up --agents --tls`: lab agents over mutual TLS with lab certificates, an
//! encrypted migration stream, and the audit log naming who did what (issue 10, items 2, 4
//! and 5). Real agents, real QEMU guest, real lab; needs root.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_pki::TlsFiles;

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const LAB: &str = "sec-tlab";

fn tern(args: &[&str]) -> Output {
    Command::new(TERN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tern")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> Output {
    let out = tern(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out));
    out
}

/// Stops the lab's agents and takes the lab down (its QEMUs with it) on every path.
struct LabDown;

impl Drop for LabDown {
    fn drop(&mut self) {
        let _ = tern(&["lab", "down", "--name", LAB]);
    }
}

fn client(files: &TlsFiles) -> reqwest::Client {
    tern_pki::reqwest_client_builder(files)
        .expect("client certificate")
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

fn user(pki: &std::path::Path, name: &str, role: &str) -> reqwest::Client {
    ok(&[
        "pki",
        "--dir",
        pki.to_str().expect("utf-8 path"),
        "issue",
        "user",
        name,
        "--role",
        role,
    ]);
    let mut files = TlsFiles::in_pki_dir(pki, "user", name);
    files.deny_list = None;
    client(&files)
}

#[test]
fn tls_lab_agents_migrate_encrypted_and_audit_the_operator_by_name() {
    let _down = LabDown;
    let _ = tern(&["lab", "down", "--name", LAB]);
    let up = ok(&[
        "lab",
        "up",
        "--name",
        LAB,
        "--agents",
        "--tls",
        "--agent-port-base",
        "7960",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_slice(&up.stdout).expect("lab up JSON");
    let h1 = v["agents"]["agents"]["h1"]["url"]
        .as_str()
        .expect("h1 agent URL")
        .to_string();
    assert!(h1.starts_with("https://127.0.0.1:"), "{v}");
    let pki = PathBuf::from(v["agents"]["pki_dir"].as_str().expect("lab pki dir"));
    ok(&[
        "vm", "create", "web", "--host", "h1", "--memory", "256M", "--lab", LAB,
    ]);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let viewer = user(&pki, "vera", "viewer");
    let operator = user(&pki, "olga", "operator");
    let body = json!({"vm": "web", "to_host": "h2"});
    let id = rt.block_on(async {
        let r = viewer
            .post(format!("{h1}/v1/migrations"))
            .json(&body)
            .send()
            .await
            .expect("viewer request");
        assert_eq!(r.status(), 403);
        let none: Vec<Value> = viewer
            .get(format!("{h1}/v1/migrations"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("JSON");
        assert!(
            none.is_empty(),
            "the refused call started nothing: {none:?}"
        );
        let r = operator
            .post(format!("{h1}/v1/migrations"))
            .json(&body)
            .send()
            .await
            .expect("operator request");
        assert_eq!(r.status(), 200);
        let rec: Value = r.json().await.expect("record");
        assert_eq!(rec["stream_encrypted"], true, "{rec}");
        let id = rec["id"].as_str().expect("id").to_string();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let v: Value = operator
                .get(format!("{h1}/v1/migrations/{id}"))
                .send()
                .await
                .expect("show")
                .json()
                .await
                .expect("JSON");
            let state = v["state"].as_str().unwrap_or("").to_string();
            if state == "completed" {
                break;
            }
            assert!(
                !matches!(state.as_str(), "failed" | "aborted" | "lost" | "stranded"),
                "{v}"
            );
            assert!(Instant::now() < deadline, "not completed in time: {v}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        id
    });

    let out = ok(&["audit", "--lab", LAB, "-o", "json"]);
    let log: Vec<Value> = serde_json::from_slice(&out.stdout).expect("audit JSON");
    let find = |who: &str, path: &str, status: u64| {
        log.iter()
            .find(|e| e["identity"] == who && e["path"] == path && e["status"] == status)
            .unwrap_or_else(|| panic!("{who} {path} {status} not in the audit log: {log:#?}"))
    };
    let started = find("olga", "/v1/migrations", 200);
    assert_eq!(started["role"], "operator");
    assert_eq!(started["host"], "h1");
    assert_eq!(started["target"], format!("migration {id}"));
    let refused = find("vera", "/v1/migrations", 403);
    assert_eq!(refused["outcome"], "refused");
    // The destination agent saw the source host's certificate, not a user.
    let incoming = find("h1", "/v1/incoming", 200);
    assert_eq!(incoming["host"], "h2");
    assert_eq!(incoming["kind"], "host");

    let show = ok(&["migration", "show", &id, "--lab", LAB]);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        shown.contains("encrypted (TLS, host certificates)"),
        "{shown}"
    );
    assert!(
        shown.contains("audit: user \"olga\" (role operator) POST /v1/migrations → 200"),
        "{shown}"
    );
}
