//! Real QEMU, real TLS: two QEMUs on 127.0.0.1 migrate with `tls-creds-x509` credentials
//! written by `tern_pki::write_qemu_creds`.
//!
//! - both hosts' certificates from the same CA, destination pinned to the real source:
//!   the migration completes;
//! - the destination's certificate from another CA: the source refuses it and the migration
//!   fails, the destination never completes;
//! - post-copy cut mid-way by a relay, recovered on a new channel: the recovery channel is
//!   TLS too (no guest page stamps, ChaCha20-Poly1305) and the migration completes;
//! - the destination pins another source host (`tls-authz`): the migration fails (with the
//!   `return-path` capability; without it the source of this tiny stream reports
//!   `completed` while the destination refused it and stays in `setup`).
//!
//! The guest is `-machine none` (no kernel needed): the TLS handshake and the stream are
//! what is tested, and they are the same for any guest.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
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

fn start_qemu(dir: &Path, name: &str, mode: LaunchMode, tls: Option<&MigrationTls>) -> Qemu {
    start_qemu_with(dir, name, mode, tls, &["-machine", "none"])
}

fn start_qemu_with(
    dir: &Path,
    name: &str,
    mode: LaunchMode,
    tls: Option<&MigrationTls>,
    machine: &[&str],
) -> Qemu {
    let sock = dir.join(format!("{name}.qmp"));
    let mut args: Vec<String> = machine.iter().map(|s| s.to_string()).collect();
    args.extend(
        [
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", sock.display()));
    if mode == LaunchMode::Incoming {
        args.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    if let Some(tls) = tls {
        args.extend(tls.to_args(mode).unwrap());
    }
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

/// Polls the source until the migration ends; returns its final status.
fn wait_for_end(src: &mut Qemu) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = src.qmp.migration_status();
        if s == "completed" || s == "failed" || s == "cancelled" {
            return s;
        }
        assert!(Instant::now() < deadline, "migration still {s} after 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-connection TCP relay that keeps every byte the source sent: what a packet capture
/// on the migration link would see.
/// Source → destination bytes, and the first 4 KiB the destination sent back.
type Captured = (Vec<u8>, Vec<u8>);

/// Returns the port to connect to and a handle yielding (source → destination bytes, the
/// first 4 KiB the destination sent back).
fn capturing_relay(to: u16) -> (u16, std::thread::JoinHandle<Captured>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = TcpStream::connect((LOCALHOST, to)).unwrap();
        let mut back_src = from_src.try_clone().unwrap();
        let mut back_dst = to_dst.try_clone().unwrap();
        // Destination → source (TLS handshake, return path): relayed, the start kept.
        let back = std::thread::spawn(move || {
            let mut head = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match back_dst.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if head.len() < 4096 {
                            head.extend_from_slice(&buf[..n]);
                        }
                        if back_src.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = back_src.shutdown(std::net::Shutdown::Write);
            head
        });
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    // Keep capturing even if the destination went away.
                    let _ = to_dst.write_all(&buf[..n]);
                }
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
        (seen, back.join().unwrap_or_default())
    });
    (port, handle)
}

/// The page stamp the guest memory is filled with (like tern-load's page stamps).
const STAMP: &[u8; 16] = b"TERN-KNOWN-PAGE!";

/// Migrates a 32 MiB guest whose RAM is filled with [`STAMP`] through a capturing relay;
/// returns the source's final status and the bytes the source sent.
fn migrate_stamped_ram(c: &Creds, tls: bool) -> (String, Vec<u8>, Vec<u8>) {
    let ram_file = c.dir.join("ram");
    std::fs::write(&ram_file, STAMP.repeat(32 * 1024 * 1024 / STAMP.len())).unwrap();
    let src_machine = format!(
        "memory-backend-file,id=mem,size=32M,mem-path={},share=off",
        ram_file.display()
    );
    let src_args = [
        "-object",
        &src_machine,
        "-machine",
        "none,memory-backend=mem",
    ];
    let dst_args = [
        "-object",
        "memory-backend-ram,id=mem,size=32M",
        "-machine",
        "none,memory-backend=mem",
    ];
    let src_tls = MigrationTls {
        creds_dir: c.h1.clone(),
        accept_from: None,
    };
    let dst_tls = MigrationTls {
        creds_dir: c.h2.clone(),
        accept_from: Some("h1".to_string()),
    };
    let mut dst = start_qemu_with(
        &c.dir,
        "dst",
        LaunchMode::Incoming,
        tls.then_some(&dst_tls),
        &dst_args,
    );
    let mut src = start_qemu_with(
        &c.dir,
        "src",
        LaunchMode::Boot,
        tls.then_some(&src_tls),
        &src_args,
    );
    let dst_port = free_port();
    if tls {
        dst.qmp
            .execute(
                "migrate-set-parameters",
                serde_json::to_value(MigrationTls::destination_parameters()).unwrap(),
            )
            .unwrap();
        src.qmp
            .execute(
                "migrate-set-parameters",
                serde_json::to_value(MigrationTls::source_parameters("h2")).unwrap(),
            )
            .unwrap();
    }
    dst.qmp
        .execute(
            "migrate-incoming",
            json!({ "uri": format!("tcp:127.0.0.1:{dst_port}") }),
        )
        .unwrap();
    let (relay_port, relay) = capturing_relay(dst_port);
    src.qmp
        .execute(
            "migrate",
            json!({ "uri": format!("tcp:127.0.0.1:{relay_port}") }),
        )
        .unwrap();
    let status = wait_for_end(&mut src);
    // The source may report completion when its last bytes are in socket buffers: wait for
    // the destination to have loaded them before stopping anything.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status == "completed" && dst.qmp.migration_status() != "completed" {
        assert!(Instant::now() < deadline, "destination never completed");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(src);
    drop(dst);
    let (sent, back) = relay.join().unwrap();
    (status, sent, back)
}

/// The cipher suite of the TLS ServerHello at the start of `bytes` (sent in clear, also in
/// TLS 1.3).
fn server_hello_cipher(bytes: &[u8]) -> Option<u16> {
    // record: type 22, version (2), length (2); handshake: type 2, length (3),
    // legacy_version (2), random (32), session id (1 + n), cipher suite (2).
    if bytes.len() < 5 + 4 + 2 + 32 + 1 || bytes[0] != 22 || bytes[5] != 2 {
        return None;
    }
    let sid = 5 + 4 + 2 + 32;
    let at = sid + 1 + usize::from(bytes[sid]);
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

fn count_stamps(bytes: &[u8]) -> usize {
    bytes.windows(STAMP.len()).filter(|w| *w == STAMP).count()
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
    capabilities: &[&str],
) -> (String, String) {
    let src_tls = MigrationTls {
        creds_dir: src_creds.to_path_buf(),
        accept_from: None,
    };
    let dst_tls = MigrationTls {
        creds_dir: dst_creds.to_path_buf(),
        accept_from: Some(accept_from.to_string()),
    };
    let mut dst = start_qemu(dir, "dst", LaunchMode::Incoming, Some(&dst_tls));
    let mut src = start_qemu(dir, "src", LaunchMode::Boot, Some(&src_tls));
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    // `return-path`: the destination reports its outcome back, so the source completes only
    // if the destination loaded the stream (tern has it with post-copy on both ends).
    let caps: Vec<Value> = capabilities
        .iter()
        .map(|c| json!({ "capability": c, "state": true }))
        .collect();
    for q in [&mut src.qmp, &mut dst.qmp] {
        q.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .unwrap();
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
    let (src, dst) = migrate(&c.dir, &c.h1, &c.h2, "h1", &["return-path"]);
    assert_eq!(src, "completed");
    assert_eq!(dst, "completed");
}

#[test]
fn destination_with_a_certificate_of_another_ca_cannot_receive() {
    let c = creds();
    let (src, dst) = migrate(&c.dir, &c.h1, &c.foreign_h2, "h1", &[]);
    assert_eq!(src, "failed");
    assert_ne!(dst, "completed");
}

#[test]
fn destination_refuses_a_source_other_than_the_pinned_host() {
    let c = creds();
    let (src, dst) = migrate(&c.dir, &c.h1, &c.h2, "h3", &["return-path"]);
    assert_eq!(src, "failed");
    assert_ne!(dst, "completed");
}

#[test]
fn captured_stream_carries_guest_memory_only_without_tls() {
    let c = creds();
    let (status, plain, _) = migrate_stamped_ram(&c, false);
    assert_eq!(status, "completed");
    // Without TLS the guest's pages are on the wire as they are (so this check can fail).
    assert!(
        count_stamps(&plain) > 1000,
        "{} bytes, no stamps",
        plain.len()
    );

    let (status, encrypted, back) = migrate_stamped_ram(&c, true);
    assert_eq!(status, "completed");
    assert!(
        encrypted.len() > 32 * 1024 * 1024,
        "only {} bytes sent",
        encrypted.len()
    );
    assert_eq!(
        count_stamps(&encrypted),
        0,
        "guest memory visible in the TLS stream"
    );
    // GNUTLS_PRIORITY took effect: TLS_CHACHA20_POLY1305_SHA256, no AES re-key crash.
    assert_eq!(
        server_hello_cipher(&back),
        Some(0x1303),
        "{:02x?}",
        &back[..back.len().min(64)]
    );
}

#[test]
fn multifd_channels_use_the_same_tls_credentials() {
    // tern enables multifd on both ends where the plan allows it: every channel is TLS too.
    let c = creds();
    let (src, dst) = migrate(&c.dir, &c.h1, &c.h2, "h1", &["return-path", "multifd"]);
    assert_eq!(src, "completed");
    assert_eq!(dst, "completed");
    let (src, _) = migrate(&c.dir, &c.h1, &c.foreign_h2, "h1", &["multifd"]);
    assert_eq!(src, "failed");
}

/// A relay whose connections can be cut (both directions shut down) on demand: a link
/// failure during post-copy, without root or network namespaces.
struct CuttableRelay {
    port: u16,
    streams: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl CuttableRelay {
    fn start(to: u16) -> CuttableRelay {
        let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = streams.clone();
        std::thread::spawn(move || {
            // Every connection the source opens (main channel, return path) is relayed.
            for from_src in listener.incoming() {
                let Ok(from_src) = from_src else { return };
                let Ok(to_dst) = TcpStream::connect((LOCALHOST, to)) else {
                    return;
                };
                {
                    let mut k = kept.lock().unwrap();
                    k.push(from_src.try_clone().unwrap());
                    k.push(to_dst.try_clone().unwrap());
                }
                for (mut a, mut b) in [
                    (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap()),
                    (to_dst, from_src),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        CuttableRelay { port, streams }
    }

    fn cut(&self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn wait_for_status(q: &mut Qemu, wanted: &[&str], what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = q.qmp.migration_status();
        if wanted.contains(&s.as_str()) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {s} after 60 s, wanted {wanted:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn postcopy_recovers_over_tls_after_a_link_cut() {
    if !tern_qemu::userfaultfd_available() {
        eprintln!("skipped: no userfaultfd on this host (post-copy cannot run here)");
        return;
    }
    let c = creds();
    let ram_file = c.dir.join("ram");
    std::fs::write(&ram_file, STAMP.repeat(32 * 1024 * 1024 / STAMP.len())).unwrap();
    let src_machine = format!(
        "memory-backend-file,id=mem,size=32M,mem-path={},share=off",
        ram_file.display()
    );
    let src_tls = MigrationTls {
        creds_dir: c.h1.clone(),
        accept_from: None,
    };
    let dst_tls = MigrationTls {
        creds_dir: c.h2.clone(),
        accept_from: Some("h1".to_string()),
    };
    let mut dst = start_qemu_with(
        &c.dir,
        "dst",
        LaunchMode::Incoming,
        Some(&dst_tls),
        &[
            "-object",
            "memory-backend-ram,id=mem,size=32M",
            "-machine",
            "none,memory-backend=mem",
        ],
    );
    let mut src = start_qemu_with(
        &c.dir,
        "src",
        LaunchMode::Boot,
        Some(&src_tls),
        &[
            "-object",
            &src_machine,
            "-machine",
            "none,memory-backend=mem",
        ],
    );
    let caps = json!({ "capabilities": [
        { "capability": "return-path", "state": true },
        { "capability": "postcopy-ram", "state": true },
    ]});
    for q in [&mut src.qmp, &mut dst.qmp] {
        q.execute("migrate-set-capabilities", caps.clone()).unwrap();
    }
    dst.qmp
        .execute(
            "migrate-set-parameters",
            serde_json::to_value(MigrationTls::destination_parameters()).unwrap(),
        )
        .unwrap();
    let mut src_params = serde_json::to_value(MigrationTls::source_parameters("h2")).unwrap();
    // 2 MB/s in both phases: 32 MiB take long enough to switch and cut in the middle.
    src_params["max-bandwidth"] = json!(2_000_000);
    src_params["max-postcopy-bandwidth"] = json!(2_000_000);
    src.qmp
        .execute("migrate-set-parameters", src_params)
        .unwrap();
    let dst_port = free_port();
    dst.qmp
        .execute(
            "migrate-incoming",
            json!({ "uri": format!("tcp:127.0.0.1:{dst_port}") }),
        )
        .unwrap();
    let relay = CuttableRelay::start(dst_port);
    src.qmp
        .execute(
            "migrate",
            json!({ "uri": format!("tcp:127.0.0.1:{}", relay.port) }),
        )
        .unwrap();
    wait_for_status(&mut src, &["active"], "source pre-copy");
    src.qmp
        .execute("migrate-start-postcopy", json!({}))
        .unwrap();
    wait_for_status(&mut src, &["postcopy-active"], "source post-copy");
    relay.cut();
    wait_for_status(&mut src, &["postcopy-paused"], "source after the cut");
    wait_for_status(&mut dst, &["postcopy-paused"], "destination after the cut");

    // Recovery on a new channel, with the same TLS parameters (they persist in both QEMUs).
    let recover_port = free_port();
    let (recover_relay, captured) = capturing_relay(recover_port);
    dst.qmp
        .execute(
            "migrate-recover",
            json!({ "uri": format!("tcp:127.0.0.1:{recover_port}") }),
        )
        .unwrap();
    src.qmp
        .execute(
            "migrate",
            json!({ "uri": format!("tcp:127.0.0.1:{recover_relay}"), "resume": true }),
        )
        .unwrap();
    let end = wait_for_status(&mut src, &["completed", "failed"], "source after recovery");
    assert_eq!(end, "completed");
    wait_for_status(&mut dst, &["completed"], "destination after recovery");
    drop(src);
    drop(dst);
    let (sent, back) = captured.join().unwrap();
    assert!(
        sent.len() > 1024 * 1024,
        "recovery channel carried {} bytes",
        sent.len()
    );
    assert_eq!(
        count_stamps(&sent),
        0,
        "guest memory visible on the recovery channel"
    );
    assert_eq!(server_hello_cipher(&back), Some(0x1303));
}
