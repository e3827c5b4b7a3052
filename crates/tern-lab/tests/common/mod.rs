//! Helpers shared by the lab integration tests: unique lab names, TCP endpoints inside lab
//! hosts, throughput measurement, leak checks.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tern_lab::{Lab, LabHost, lab_of_netns};

/// A lab name unique to this test process and `tag`.
pub fn lab_name(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

/// Namespaces of lab `name` that exist now.
pub fn namespaces_of(name: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|ns| lab_of_netns(ns) == Some(name))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that nothing of lab `name` is left: no namespace, no state file.
pub fn assert_no_leftovers(name: &str) {
    assert_eq!(
        namespaces_of(name),
        Vec::<String>::new(),
        "namespaces of {name} left"
    );
    assert!(
        !tern_lab::state_path(name).exists(),
        "state file of {name} left"
    );
}

/// A listener on `host`'s lab address, port chosen by the kernel.
pub fn listen(host: &LabHost) -> TcpListener {
    let addr = host.address();
    host.run_in_netns(move || TcpListener::bind((addr, 0)))
        .expect("enter namespace")
        .expect("bind listener")
}

/// A TCP connection made from inside `from` to `to`.
pub fn connect(from: &LabHost, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    from.run_in_netns(move || TcpStream::connect_timeout(&to, timeout))
        .expect("enter namespace")
}

/// Sends `bytes` from host `from` to host `to` over one TCP stream and returns the goodput in
/// bit/s, timed at the receiver from the first byte to the end of stream.
pub fn measure_throughput(lab: &Lab, from: &str, to: &str, bytes: usize) -> f64 {
    let listener = listen(lab.host(to).unwrap());
    let target = listener.local_addr().unwrap();
    let sender_host = lab.host(from).unwrap().clone();
    let sender = std::thread::spawn(move || {
        let mut s = connect(&sender_host, target, Duration::from_secs(2)).expect("connect");
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n]).expect("send");
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write).ok();
    });
    let (mut conn, _) = listener.accept().expect("accept");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let mut first: Option<Instant> = None;
    loop {
        let n = conn.read(&mut buf).expect("receive");
        if n == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        got += n;
    }
    let elapsed = first.expect("received nothing").elapsed();
    sender.join().expect("sender thread");
    assert_eq!(got, bytes, "bytes received");
    got as f64 * 8.0 / elapsed.as_secs_f64()
}
