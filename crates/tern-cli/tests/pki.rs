//! `tern pki` as an operator uses it: a CA in a temp dir, certificates issued, rotated,
//! revoked and listed through the binary. No root needed.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use serde_json::Value;

const TERN: &str = env!("CARGO_BIN_EXE_tern");

fn tern(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(TERN)
        .args(["pki", "--dir"])
        .arg(dir)
        .args(args)
        .output()
        .expect("run tern")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_issue_rotate_revoke_list() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let o = tern(&dir, &["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);

    let o = tern(&dir, &["init"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));

    let o = tern(
        &dir,
        &["issue", "host", "h1", "--ip", "10.0.0.1", "-o", "json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let host: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(host["identity"]["role"], "host");

    let o = tern(&dir, &["issue", "user", "alice", "--role", "superuser"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("viewer|operator|admin"),
        "{}",
        stderr(&o)
    );

    let mut serials = Vec::new();
    for _ in 0..2 {
        let o = tern(
            &dir,
            &["issue", "user", "alice", "--role", "operator", "-o", "json"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let key = v["key"].as_str().unwrap();
        assert_eq!(mode(key.as_ref()), 0o600);
        serials.push(v["identity"]["serial"].as_str().unwrap().to_string());
    }

    let o = tern(&dir, &["revoke", &serials[0]]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("alice"));
    let o = tern(&dir, &["revoke", "not-a-serial"]);
    assert_eq!(o.status.code(), Some(2));

    let o = tern(&dir, &["list", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.len(), 3);
    let state = |serial: &str| {
        list.iter()
            .find(|c| c["identity"]["serial"] == serial)
            .map(|c| c["revoked"].as_bool().unwrap())
            .unwrap()
    };
    assert!(state(&serials[0]), "old certificate revoked");
    assert!(!state(&serials[1]), "rotated certificate still valid");
}
