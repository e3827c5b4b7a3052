//! Real-namespace tests of the lab (run as root). Each test uses its own lab name and checks at
//! the end that nothing of it is left.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{assert_no_leftovers, connect, lab_name, listen, measure_throughput, namespaces_of};
use tern_lab::{
    FaultMode, Lab, LabError, LabSpec, LinkRate, LinkState, Signal, kill_process, netem_available,
};

fn spec(name: &str) -> LabSpec {
    LabSpec {
        name: name.to_string(),
        ..LabSpec::default()
    }
}

#[test]
fn up_reach_status_and_down() {
    let name = lab_name("updown");
    {
        let lab = Lab::up_guarded(&spec(&name)).unwrap();
        assert_eq!(lab.hosts().len(), 2);
        let mut ns = namespaces_of(&name);
        ns.sort();
        assert_eq!(
            ns,
            vec![
                format!("tern-{name}-h1"),
                format!("tern-{name}-h2"),
                format!("tern-{name}-sw")
            ]
        );
        let h1 = lab.host("h1").unwrap();
        let h2 = lab.host("h2").unwrap();
        assert_eq!(h1.address().to_string(), "198.18.0.1");
        assert_eq!(h2.address().to_string(), "198.18.0.2");
        assert_eq!(
            h1.netns_path(),
            std::path::PathBuf::from(format!("/run/netns/tern-{name}-h1"))
        );

        // TCP from h1 to a listener in h2, through the bridge.
        let listener = listen(h2);
        let target = listener.local_addr().unwrap();
        let mut c = connect(h1, target, Duration::from_secs(2)).expect("h1 reaches h2");
        let (mut s, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(h1.address()));
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");

        // command() runs inside the namespace: eth0 there carries the host's address.
        let out = h1
            .command("ip")
            .args(["-o", "-4", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("198.18.0.1/24"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );

        // Another process finds the lab through its state file.
        let loaded = Lab::load(&name).unwrap();
        assert_eq!(&loaded, &*lab);
        assert!(Lab::list().unwrap().iter().any(|l| l.name() == name));

        // Status shows a process started inside h2.
        let mut child = h2
            .command("sleep")
            .arg("30")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(2);
        let status = loop {
            let st = lab.status().unwrap();
            if st.hosts[1].processes.iter().any(|p| p.pid == pid) || Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.hosts[0].link, LinkState::Up);
        assert_eq!(status.hosts[1].address, "198.18.0.2/24");
        let p = status.hosts[1]
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .expect("sleep listed in h2");
        assert_eq!(p.comm, "sleep");
        assert!(status.hosts[0].processes.iter().all(|p| p.pid != pid));
        eprintln!("{status}");
        assert!(status.to_string().contains(&format!("sleep({pid})")));
        kill_process(pid, Signal::SIGKILL).unwrap();
        child.wait().unwrap();
    }
    assert_no_leftovers(&name);
    // Idempotent: taking it down again is a no-op.
    let again = Lab::down(&name).unwrap();
    assert!(again.namespaces_removed.is_empty());
    assert!(!again.state_file_removed);
}

#[test]
fn rate_limit_is_measured_and_changes_live() {
    let name = lab_name("shape");
    {
        let mut lab = Lab::up_guarded(&LabSpec {
            link_rate: Some("100mbit".parse().unwrap()),
            ..spec(&name)
        })
        .unwrap();
        assert_eq!(
            lab.host("h1").unwrap().link_rate(),
            Some("100mbit".parse().unwrap())
        );
        // Goodput is ~95.6 % of the wire rate (headers); allow ±25 %.
        let bps = measure_throughput(&lab, "h1", "h2", 6 * 1024 * 1024);
        assert!(
            (75e6..=125e6).contains(&bps),
            "h1→h2 at 100mbit: {bps:.0} bit/s"
        );
        // The reverse direction is shaped too (switch-side port egress).
        let bps = measure_throughput(&lab, "h2", "h1", 6 * 1024 * 1024);
        assert!(
            (75e6..=125e6).contains(&bps),
            "h2→h1 at 100mbit: {bps:.0} bit/s"
        );

        // With h2's own link unshaped, h2→h1 is limited only by the switch port toward h1.
        lab.set_link_rate("h2", None).unwrap();
        let bps = measure_throughput(&lab, "h2", "h1", 6 * 1024 * 1024);
        assert!(
            (75e6..=125e6).contains(&bps),
            "h2→h1, only h1 shaped: {bps:.0} bit/s"
        );

        // Live change to 40mbit on h1's link only, recorded in the state file.
        let slow: LinkRate = "40mbit".parse().unwrap();
        lab.set_link_rate("h1", Some(slow)).unwrap();
        assert_eq!(
            Lab::load(&name).unwrap().host("h1").unwrap().link_rate(),
            Some(slow)
        );
        let bps = measure_throughput(&lab, "h1", "h2", 3 * 1024 * 1024);
        assert!(
            (30e6..=50e6).contains(&bps),
            "h1→h2 at 40mbit: {bps:.0} bit/s"
        );

        // Removing the limits makes the link much faster than any of the limits above.
        lab.set_link_rate("h1", None).unwrap();
        lab.set_link_rate("h2", None).unwrap();
        let bps = measure_throughput(&lab, "h1", "h2", 32 * 1024 * 1024);
        assert!(bps > 300e6, "unshaped: {bps:.0} bit/s");
    }
    assert_no_leftovers(&name);
}

/// Reads what arrives on `conn` for `window`; returns the byte count.
fn drain_for(conn: &mut std::net::TcpStream, window: Duration, buf: &mut [u8]) -> usize {
    let end = Instant::now() + window;
    let mut got = 0;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match conn.read(buf) {
            Ok(0) => return got,
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return got;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Sends 5 UDP datagrams from `from` to `to` and counts how many arrive within 300 ms.
fn udp_delivered(lab: &Lab, from: &str, to: &str) -> usize {
    let to_addr = lab.host(to).unwrap().address();
    let from_addr = lab.host(from).unwrap().address();
    let rx = lab
        .host(to)
        .unwrap()
        .run_in_netns(move || std::net::UdpSocket::bind((to_addr, 0)))
        .unwrap()
        .unwrap();
    let tx = lab
        .host(from)
        .unwrap()
        .run_in_netns(move || std::net::UdpSocket::bind((from_addr, 0)))
        .unwrap()
        .unwrap();
    let target = rx.local_addr().unwrap();
    for _ in 0..5 {
        let _ = tx.send_to(b"ping", target);
    }
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut n = 0;
    let mut buf = [0u8; 16];
    while rx.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn blackhole_stalls_transfer_and_restore_resumes_it() {
    let name = lab_name("cut");
    {
        let lab = Lab::up_guarded(&LabSpec {
            link_rate: Some("20mbit".parse().unwrap()),
            ..spec(&name)
        })
        .unwrap();
        let listener = listen(lab.host("h2").unwrap());
        let target = listener.local_addr().unwrap();
        let h1 = lab.host("h1").unwrap().clone();
        const TOTAL: usize = 3 * 1024 * 1024;
        let sender = std::thread::spawn(move || {
            let mut s = connect(&h1, target, Duration::from_secs(2)).unwrap();
            s.write_all(&vec![7u8; TOTAL]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < 256 * 1024 {
            got += drain_for(&mut conn, Duration::from_millis(50), &mut buf);
        }

        lab.cut_link("h1", FaultMode::Blackhole).unwrap();
        assert_eq!(
            lab.link_state("h1").unwrap(),
            LinkState::Cut(FaultMode::Blackhole)
        );
        assert_eq!(lab.link_state("h2").unwrap(), LinkState::Up);
        // Packets already past h1's link may still arrive; after that, silence.
        got += drain_for(&mut conn, Duration::from_millis(300), &mut buf);
        let during_cut = drain_for(&mut conn, Duration::from_millis(700), &mut buf);
        assert_eq!(during_cut, 0, "bytes arrived through a blackholed link");
        // Both directions are dead, not just one.
        assert_eq!(
            udp_delivered(&lab, "h1", "h2"),
            0,
            "h1→h2 passes a blackhole"
        );
        assert_eq!(
            udp_delivered(&lab, "h2", "h1"),
            0,
            "h2→h1 passes a blackhole"
        );
        assert!(
            got < TOTAL,
            "transfer finished before the cut; make it longer"
        );

        lab.restore_link("h1").unwrap();
        assert_eq!(lab.link_state("h1").unwrap(), LinkState::Up);
        let deadline = Instant::now() + Duration::from_secs(15);
        while got < TOTAL && Instant::now() < deadline {
            got += drain_for(&mut conn, Duration::from_millis(200), &mut buf);
        }
        assert_eq!(got, TOTAL, "transfer did not resume after restore");
        assert!(
            udp_delivered(&lab, "h1", "h2") > 0,
            "h1→h2 dead after restore"
        );
        assert!(
            udp_delivered(&lab, "h2", "h1") > 0,
            "h2→h1 dead after restore"
        );
        sender.join().unwrap();
        // The rate limit is back after restore.
        assert_eq!(
            lab.host("h1").unwrap().link_rate(),
            Some("20mbit".parse().unwrap())
        );
        let bps = measure_throughput(&lab, "h1", "h2", 1024 * 1024);
        assert!(bps < 30e6, "restore lost the rate limit: {bps:.0} bit/s");
    }
    assert_no_leftovers(&name);
}

#[test]
fn link_down_and_fault_for_block_new_connections() {
    let name = lab_name("down");
    {
        let lab = Lab::up_guarded(&spec(&name)).unwrap();
        let h1 = lab.host("h1").unwrap();
        let listener = listen(lab.host("h2").unwrap());
        let target = listener.local_addr().unwrap();
        for mode in [FaultMode::LinkDown, FaultMode::Blackhole] {
            lab.cut_link("h1", mode).unwrap();
            assert_eq!(lab.link_state("h1").unwrap(), LinkState::Cut(mode));
            let status = lab.status().unwrap();
            assert_eq!(status.hosts[0].link, LinkState::Cut(mode));
            assert!(
                connect(h1, target, Duration::from_millis(300)).is_err(),
                "connected through a link cut with {mode}"
            );
            lab.restore_link("h1").unwrap();
            assert_eq!(lab.link_state("h1").unwrap(), LinkState::Up);
            let c = connect(h1, target, Duration::from_secs(3));
            assert!(c.is_ok(), "no connection after restoring {mode}: {c:?}");
            listener.accept().unwrap();
        }
        // fault_for: cut for a while, restored afterwards.
        let start = Instant::now();
        lab.fault_for("h1", FaultMode::LinkDown, Duration::from_millis(200))
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(lab.link_state("h1").unwrap(), LinkState::Up);
        assert!(connect(h1, target, Duration::from_secs(3)).is_ok());
    }
    assert_no_leftovers(&name);
}

#[test]
fn down_cleans_up_after_a_crash_without_state_file() {
    let name = lab_name("crash");
    let lab = Lab::up(&spec(&name)).unwrap();
    // Two processes left behind by the "crashed" run; one ignores SIGTERM.
    let mut polite = lab
        .host("h1")
        .unwrap()
        .command("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let mut stubborn = lab
        .host("h2")
        .unwrap()
        .command("sh")
        .args(["-c", "trap '' TERM; exec sleep 60"])
        .spawn()
        .unwrap();
    let stubborn_pid = stubborn.id();
    // The trap is set once the shell has exec'd `sleep` (it sets the trap first).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{stubborn_pid}/comm"))
        .map(|c| c.trim() != "sleep")
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the stubborn shell never exec'd sleep"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_file(lab.state_path()).unwrap();
    drop(lab);
    assert!(Lab::orphaned_names().contains(&name));
    assert!(matches!(Lab::load(&name), Err(LabError::NotFound { .. })));

    let report = Lab::down(&name).unwrap();
    assert_eq!(report.namespaces_removed.len(), 3, "{report:?}");
    assert!(!report.state_file_removed);
    assert!(
        report
            .processes_killed
            .iter()
            .any(|p| p.pid == stubborn_pid)
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(polite.wait().unwrap().signal(), Some(15));
    assert_eq!(stubborn.wait().unwrap().signal(), Some(9));
    assert_no_leftovers(&name);
}

#[test]
fn parallel_labs_do_not_collide() {
    let a = lab_name("para");
    let b = lab_name("parb");
    let (la, lb) = std::thread::scope(|s| {
        let ta = s.spawn(|| Lab::up_guarded(&spec(&a)));
        let tb = s.spawn(|| Lab::up_guarded(&spec(&b)));
        (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap())
    });
    // Same addresses in both labs, but separate switches: a listener in lab B's h2 is unreachable
    // from lab A's h1 (A's h2 answers with RST), and reachable from B's h1.
    let listener = listen(lb.host("h2").unwrap());
    let target = listener.local_addr().unwrap();
    let from_a = connect(la.host("h1").unwrap(), target, Duration::from_secs(2));
    assert_eq!(
        from_a.map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    );
    assert!(connect(lb.host("h1").unwrap(), target, Duration::from_secs(2)).is_ok());
    // Cutting a link in A leaves B alone.
    la.cut_link("h1", FaultMode::LinkDown).unwrap();
    assert_eq!(lb.link_state("h1").unwrap(), LinkState::Up);
    drop(la);
    assert_no_leftovers(&a);
    assert_eq!(namespaces_of(&b).len(), 3, "taking A down touched B");
    drop(lb);
    assert_no_leftovers(&b);
}

#[test]
fn invalid_inputs_give_clear_errors() {
    for bad in [
        "",
        "Upper",
        "has_underscore",
        "-lead",
        "trail-",
        "waytoolongforalabname12",
    ] {
        let e = Lab::up(&spec(bad)).unwrap_err();
        assert!(matches!(e, LabError::InvalidName { .. }), "{bad}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        assert!(msg.contains("lowercase"), "{msg}");
        assert!(namespaces_of(bad).is_empty());
    }
    for hosts in [0, 1, 9] {
        let e = Lab::up(&LabSpec {
            name: lab_name("hosts"),
            hosts,
            ..LabSpec::default()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("invalid host count {hosts}")),
            "{e}"
        );
        assert!(e.to_string().contains("2 to 8"), "{e}");
    }
    let e = "fast".parse::<LinkRate>().unwrap_err().to_string();
    assert!(e.contains("\"fast\"") && e.contains("1gbit"), "{e}");
    let e = "melt".parse::<FaultMode>().unwrap_err().to_string();
    assert!(e.contains("\"melt\"") && e.contains("blackhole"), "{e}");
    let e = Lab::load(&lab_name("nosuch")).unwrap_err();
    assert!(matches!(e, LabError::NotFound { .. }), "{e}");

    let name = lab_name("inval");
    {
        let lab = Lab::up_guarded(&spec(&name)).unwrap();
        let e = lab.host("h7").unwrap_err().to_string();
        assert!(e.contains("\"h7\"") && e.contains("h1, h2"), "{e}");
        assert!(lab.cut_link("h9", FaultMode::Blackhole).is_err());
        // Building the same lab twice is refused and leaves the first intact.
        let e = Lab::up(&spec(&name)).unwrap_err();
        assert!(matches!(e, LabError::AlreadyExists { .. }), "{e}");
        assert_eq!(namespaces_of(&name).len(), 3);
        if !netem_available() {
            let e = Lab::up(&LabSpec {
                name: lab_name("delay"),
                link_delay: Some(Duration::from_millis(20)),
                ..LabSpec::default()
            })
            .unwrap_err();
            assert!(matches!(e, LabError::NetemUnavailable { .. }), "{e}");
            assert!(e.to_string().contains("netem"), "{e}");
            let mut lab = Lab::load(&name).unwrap();
            assert!(
                lab.set_link_delay("h1", Some(Duration::from_millis(5)))
                    .is_err()
            );
        }
    }
    assert_no_leftovers(&name);
    assert_no_leftovers(&lab_name("delay"));
}

#[test]
fn guard_takes_lab_down_on_panic() {
    let name = lab_name("panic");
    let n = name.clone();
    let r = std::panic::catch_unwind(move || {
        let _lab = Lab::up_guarded(&spec(&n)).unwrap();
        panic!("test body failed");
    });
    assert!(r.is_err());
    assert_no_leftovers(&name);
}

#[test]
fn down_of_one_lab_spares_a_lab_whose_name_extends_it() {
    // Lab "x" has namespace tern-x-h1; lab "x-h1" has tern-x-h1-sw and tern-x-h1-h1.
    let short = lab_name("pre");
    let long = format!("{short}-h1");
    let ls = Lab::up_guarded(&spec(&short)).unwrap();
    let ll = Lab::up_guarded(&spec(&long)).unwrap();
    assert_eq!(namespaces_of(&short).len(), 3);
    assert_eq!(namespaces_of(&long).len(), 3);
    drop(ls);
    assert_no_leftovers(&short);
    assert_eq!(
        namespaces_of(&long).len(),
        3,
        "down({short}) touched {long}"
    );
    assert!(Lab::load(&long).is_ok());
    drop(ll);
    assert_no_leftovers(&long);
}

#[test]
fn racing_ups_of_one_name_build_it_once() {
    let name = lab_name("race");
    let results: Vec<Result<tern_lab::LabGuard, LabError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| Lab::up_guarded(&spec(&name))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let built = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(built, 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, LabError::AlreadyExists { .. }), "{e}");
        }
    }
    // The losers' failures did not damage the winner's lab.
    assert_eq!(namespaces_of(&name).len(), 3);
    let lab = Lab::load(&name).unwrap();
    let listener = listen(lab.host("h2").unwrap());
    assert!(
        connect(
            lab.host("h1").unwrap(),
            listener.local_addr().unwrap(),
            Duration::from_secs(2)
        )
        .is_ok()
    );
    drop(results);
    assert_no_leftovers(&name);
}

#[test]
fn eight_host_lab_is_fully_connected() {
    let name = lab_name("eight");
    {
        let started = Instant::now();
        let lab = Lab::up_guarded(&LabSpec {
            hosts: 8,
            link_rate: Some("1gbit".parse().unwrap()),
            ..spec(&name)
        })
        .unwrap();
        eprintln!("8-host lab up in {:?}", started.elapsed());
        let status = lab.status().unwrap();
        let addrs: Vec<&str> = status.hosts.iter().map(|h| h.address.as_str()).collect();
        assert_eq!(
            addrs,
            (1..=8)
                .map(|i| format!("198.18.0.{i}/24"))
                .collect::<Vec<_>>()
        );
        let listener = listen(lab.host("h1").unwrap());
        let target = listener.local_addr().unwrap();
        for h in &lab.hosts()[1..] {
            let c = connect(h, target, Duration::from_secs(2));
            assert!(c.is_ok(), "{} cannot reach h1: {c:?}", h.name());
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip(), std::net::IpAddr::V4(h.address()));
        }
    }
    assert_no_leftovers(&name);
}

#[test]
fn a_stale_state_file_without_namespaces_does_not_block_up() {
    // What a test or agent killed mid-`down` leaves: the state file, no namespaces.
    let name = lab_name("stale");
    std::fs::create_dir_all(tern_lab::STATE_DIR).unwrap();
    let stale = tern_lab::state_path(&name);
    std::fs::write(&stale, "{\"stale\": true}").unwrap();
    {
        let lab = Lab::up_guarded(&spec(&name)).expect("a stale state file must not block up");
        assert_eq!(lab.hosts().len(), 2);
    }
    assert!(!stale.exists(), "down removes the new state file");
    assert_no_leftovers(&name);

    // With the lab's namespaces present, the state file is not stale: up still refuses.
    let lab = Lab::up_guarded(&spec(&name)).unwrap();
    let err = Lab::up(&spec(&name)).expect_err("a live lab is refused");
    assert!(matches!(err, LabError::AlreadyExists { .. }), "{err}");
    drop(lab);
    assert_no_leftovers(&name);
}
