//! Real QEMU, real TLS: two QEMUs on 127.0.0.1 migrate with `tls-creds-x509` credentials
//! written by `tern_pki::write_qemu_creds`.
//!
//! - both hosts' certificates from the same CA, destination pinned to the real source:
//!   the migration completes;
//! - the destination's certificate from another CA: the source refuses it and the migration
//!   fails, the destination never completes;
//! - the destination pins another source host (`tls-authz`): the migration fails (with the
//!   `return-path` capability; without it the source of this tiny stream reports
//!   `completed` while the destination refused it and stays in `setup`).
//!
//! The guest is `-machine none` (no kernel needed): the TLS handshake and the stream are
//! what is tested, and they are the same for any guest.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_pki::{Pki, TlsFiles, Validity};
use tern_qemu::{LaunchMode, MigrationTls};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A QEMU killed by PID when the test ends, on every path.
struct Qemu {
    child: Child,
    qmp: Qmp,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, child: &mut Child) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(path) {
                break s;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("QEMU exited during start-up ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "QMP socket {} never appeared",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = qmp.line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        qmp.execute("qmp_capabilities", json!({})).unwrap();
        qmp
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }

    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(v["error"]["desc"].as_str().unwrap_or("?").to_string());
        }
    }

    fn migration_status(&mut self) -> String {
        let r = self.execute("query-migrate", json!({})).unwrap();
        r["status"].as_str().unwrap_or("none").to_string()
    }
}

fn start_qemu(dir: &Path, name: &str, mode: LaunchMode, tls: &MigrationTls) -> Qemu {
    let sock = dir.join(format!("{name}.qmp"));
    let mut args: Vec<String> = [
        "-machine",
        "none",
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", sock.display()));
    if mode == LaunchMode::Incoming {
        args.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    args.extend(tls.to_args(mode).unwrap());
    let mut child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (scripts/install-prereqs.sh)");
    let qmp = Qmp::connect(&sock, &mut child);
    Qemu { child, qmp }
}

fn free_port() -> u16 {
    TcpListener::bind((LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Migrates from a fresh source (creds `src_creds`, host h1) to a fresh destination
/// (creds `dst_creds`, accepting only `accept_from`); returns the source's final status and
/// the destination's status at that moment.
fn migrate(
    dir: &Path,
    src_creds: &Path,
    dst_creds: &Path,
    accept_from: &str,
    return_path: bool,
) -> (String, String) {
    let src_tls = MigrationTls {
        creds_dir: src_creds.to_path_buf(),
        accept_from: None,
    };
    let dst_tls = MigrationTls {
        creds_dir: dst_creds.to_path_buf(),
        accept_from: Some(accept_from.to_string()),
    };
    let mut dst = start_qemu(dir, "dst", LaunchMode::Incoming, &dst_tls);
    let mut src = start_qemu(dir, "src", LaunchMode::Boot, &src_tls);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    if return_path {
        // The destination reports its outcome back: the source completes only if the
        // destination loaded the stream (tern enables it with post-copy on both ends).
        for q in [&mut src.qmp, &mut dst.qmp] {
            q.execute(
                "migrate-set-capabilities",
                json!({ "capabilities": [{ "capability": "return-path", "state": true }] }),
            )
            .unwrap();
        }
    }
    dst.qmp
        .execute(
            "migrate-set-parameters",
            serde_json::to_value(MigrationTls::destination_parameters()).unwrap(),
        )
        .unwrap();
    dst.qmp
        .execute("migrate-incoming", json!({ "uri": uri }))
        .unwrap();
    src.qmp
        .execute(
            "migrate-set-parameters",
            serde_json::to_value(MigrationTls::source_parameters("h2")).unwrap(),
        )
        .unwrap();
    src.qmp.execute("migrate", json!({ "uri": uri })).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = src.qmp.migration_status();
        if s == "completed" || s == "failed" || s == "cancelled" {
            let d = dst.qmp.migration_status();
            return (s, d);
        }
        assert!(Instant::now() < deadline, "migration still {s} after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Creds {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    h1: PathBuf,
    h2: PathBuf,
    foreign_h2: PathBuf,
}

fn creds() -> Creds {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = Pki::init(&dir.join("pki")).unwrap();
    let other = Pki::init(&dir.join("other-pki")).unwrap();
    let mut out = Vec::new();
    for (p, host, name) in [
        (&pki, "h1", "h1"),
        (&pki, "h2", "h2"),
        (&other, "h2", "foreign-h2"),
    ] {
        p.issue_host(host, &[LOCALHOST], Validity::days(1)).unwrap();
        let d = dir.join(format!("qemu-{name}"));
        tern_pki::write_qemu_creds(&TlsFiles::in_pki_dir(p.dir(), "host", host), &d).unwrap();
        out.push(d);
    }
    let foreign_h2 = out.pop().unwrap();
    let h2 = out.pop().unwrap();
    let h1 = out.pop().unwrap();
    Creds {
        _tmp: tmp,
        dir,
        h1,
        h2,
        foreign_h2,
    }
}

#[test]
fn migration_with_tls_from_the_same_ca_completes() {
    let c = creds();
    let (src, dst) = migrate(&c.dir, &c.h1, &c.h2, "h1", true);
    assert_eq!(src, "completed");
    assert_eq!(dst, "completed");
}

#[test]
fn destination_with_a_certificate_of_another_ca_cannot_receive() {
    let c = creds();
    let (src, dst) = migrate(&c.dir, &c.h1, &c.foreign_h2, "h1", false);
    assert_eq!(src, "failed");
    assert_ne!(dst, "completed");
}

#[test]
fn destination_refuses_a_source_other_than_the_pinned_host() {
    let c = creds();
    let (src, dst) = migrate(&c.dir, &c.h1, &c.h2, "h3", true);
    assert_eq!(src, "failed");
    assert_ne!(dst, "completed");
}
