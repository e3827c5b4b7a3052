//! The network blackout as a client of the VM sees it.
//!
//! The serial heartbeat measures when the guest's vCPUs stopped and resumed; a user of the
//! VM cares about when its *network* answered, which also depends on the destination's
//! NIC coming up and the tenant network learning the VM's new port (QEMU's
//! `announce-self` RARPs). [`UdpProbe`] sends a numbered datagram to the guest's echo
//! service (`tern-load` with `tern_ip=`, see `docs/CONVENTIONS.md`) every few ms and
//! records when each echo arrives, on the host's `CLOCK_MONOTONIC` — the clock of the serial
//! logs, so both blackouts can be compared directly. [`analyze_probe`] turns the record
//! into `net_blackout_ms` (longest gap between echoes) and `net_lost_requests`.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Host `CLOCK_MONOTONIC` in ns (the serial recorder's clock).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// What the probe saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetProbeReport {
    /// Requests sent.
    pub sent: u64,
    /// Distinct requests answered.
    pub received: u64,
    /// Requests never answered.
    pub net_lost_requests: u64,
    /// Longest host-time gap between two consecutive echoes, in ms (0 with < 2 echoes).
    pub net_blackout_ms: f64,
    /// Host time (ns) of the last echo before the longest gap.
    pub blackout_start_ns: Option<u64>,
    /// Host time (ns) of the first echo after it.
    pub blackout_end_ns: Option<u64>,
    /// Host time (ns) of the first echo.
    pub first_reply_ns: Option<u64>,
    /// Host time (ns) of the last echo.
    pub last_reply_ns: Option<u64>,
}

/// Judges a probe record: `sent` and `replies` are `(request number, host ns)`. Duplicate
/// echoes count once; echoes of numbers never sent are ignored.
pub fn analyze_probe(sent: &[(u64, u64)], replies: &[(u64, u64)]) -> NetProbeReport {
    let sent_ids: std::collections::BTreeSet<u64> = sent.iter().map(|(s, _)| *s).collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut times: Vec<u64> = Vec::new();
    for (seq, ns) in replies {
        if sent_ids.contains(seq) && seen.insert(*seq) {
            times.push(*ns);
        }
    }
    times.sort_unstable();
    let mut report = NetProbeReport {
        sent: sent_ids.len() as u64,
        received: seen.len() as u64,
        net_lost_requests: (sent_ids.len() - seen.len()) as u64,
        first_reply_ns: times.first().copied(),
        last_reply_ns: times.last().copied(),
        ..Default::default()
    };
    if let Some((a, b)) = times
        .windows(2)
        .map(|w| (w[0], w[1]))
        .max_by_key(|(a, b)| b - a)
    {
        report.net_blackout_ms = (b - a) as f64 / 1e6;
        report.blackout_start_ns = Some(a);
        report.blackout_end_ns = Some(b);
    }
    report
}

#[derive(Default)]
struct Record {
    sent: Vec<(u64, u64)>,
    replies: Vec<(u64, u64)>,
}

/// A running probe: one thread sends, one receives. Stopped (threads joined) by
/// [`UdpProbe::stop`] or on drop.
pub struct UdpProbe {
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

/// Payload: request number and send time, 16 bytes, echoed back unchanged.
const PAYLOAD: usize = 16;

impl UdpProbe {
    /// Starts probing `target` every `interval` from a socket in network namespace `netns`
    /// (`/run/netns/<name>`, e.g. a lab client host), or the current one.
    pub fn start(target: SocketAddr, interval: Duration, netns: Option<&str>) -> io::Result<Self> {
        let socket = match netns {
            Some(ns) => socket_in_netns(ns)?,
            None => UdpSocket::bind("0.0.0.0:0")?,
        };
        socket.connect(target)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let rx = socket.try_clone()?;
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_recv = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Record::default()));
        let interval = interval.max(Duration::from_micros(100));

        let (s_stop, s_rec) = (stop_send.clone(), record.clone());
        let sender = std::thread::spawn(move || {
            let period = interval.as_nanos() as u64;
            let mut next = mono_ns();
            let mut seq = 0u64;
            while !s_stop.load(Ordering::Relaxed) {
                let now = mono_ns();
                let mut buf = [0u8; PAYLOAD];
                buf[..8].copy_from_slice(&seq.to_be_bytes());
                buf[8..].copy_from_slice(&now.to_be_bytes());
                // A send error (no route while a link is cut) is a lost request, not a stop.
                let _ = socket.send(&buf);
                if let Ok(mut r) = s_rec.lock() {
                    r.sent.push((seq, now));
                }
                seq += 1;
                next += period;
                let now = mono_ns();
                if next > now {
                    std::thread::sleep(Duration::from_nanos(next - now));
                } else {
                    next = now; // fell behind: no burst of catch-up requests
                }
            }
        });
        let (r_stop, r_rec) = (stop_recv.clone(), record.clone());
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !r_stop.load(Ordering::Relaxed) {
                if let Ok(n) = rx.recv(&mut buf) {
                    let at = mono_ns();
                    if n >= 8 {
                        let mut seq = [0u8; 8];
                        seq.copy_from_slice(&buf[..8]);
                        if let Ok(mut r) = r_rec.lock() {
                            r.replies.push((u64::from_be_bytes(seq), at));
                        }
                    }
                }
            }
        });
        Ok(Self {
            stop_send,
            stop_recv,
            record,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Echoes received so far (for waiting on "the guest answers").
    pub fn replies(&self) -> u64 {
        self.record.lock().map_or(0, |r| r.replies.len() as u64)
    }

    /// The report so far, without stopping.
    pub fn report(&self) -> NetProbeReport {
        self.record
            .lock()
            .map(|r| analyze_probe(&r.sent, &r.replies))
            .unwrap_or_default()
    }

    /// Stops sending, waits `grace` for echoes still in flight, stops and reports.
    pub fn stop(mut self, grace: Duration) -> NetProbeReport {
        self.finish(grace)
    }

    /// Stops the sender, lets the receiver collect late echoes for `grace`, stops it.
    fn finish(&mut self, grace: Duration) -> NetProbeReport {
        self.stop_send.store(true, Ordering::Relaxed);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        if self.receiver.is_some() {
            std::thread::sleep(grace);
        }
        self.stop_recv.store(true, Ordering::Relaxed);
        if let Some(t) = self.receiver.take() {
            let _ = t.join();
        }
        self.report()
    }
}

impl Drop for UdpProbe {
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

/// A UDP socket created inside network namespace `ns`: a helper thread enters the
/// namespace (`setns(2)` affects only the calling thread) and binds; the socket stays in
/// that namespace whichever thread uses it afterwards.
fn socket_in_netns(ns: &str) -> io::Result<UdpSocket> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("network namespace {path}: {e}")))?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a namespace fd we hold open, for this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        UdpSocket::bind("0.0.0.0:0")
    })
    .join()
    .map_err(|_| io::Error::other("the namespace helper thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn blackout_is_the_longest_echo_gap_and_losses_are_counted() {
        let sent: Vec<(u64, u64)> = (0..10).map(|i| (i, i * 10 * MS)).collect();
        // Requests 4..=6 lost (a 40 ms hole), 9 answered twice, 42 never sent.
        let replies = vec![
            (0, MS),
            (1, 11 * MS),
            (2, 21 * MS),
            (3, 31 * MS),
            (7, 71 * MS),
            (8, 81 * MS),
            (9, 91 * MS),
            (9, 92 * MS),
            (42, 95 * MS),
        ];
        let r = analyze_probe(&sent, &replies);
        assert_eq!((r.sent, r.received, r.net_lost_requests), (10, 7, 3));
        assert!((r.net_blackout_ms - 40.0).abs() < 1e-9, "{r:?}");
        assert_eq!(
            (r.blackout_start_ns, r.blackout_end_ns),
            (Some(31 * MS), Some(71 * MS))
        );
        assert_eq!(
            (r.first_reply_ns, r.last_reply_ns),
            (Some(MS), Some(91 * MS))
        );
    }

    #[test]
    fn no_or_one_echo_has_no_gap() {
        let sent = [(0, 0), (1, 10)];
        let r = analyze_probe(&sent, &[]);
        assert_eq!(
            (r.received, r.net_lost_requests, r.net_blackout_ms),
            (0, 2, 0.0)
        );
        let r = analyze_probe(&sent, &[(1, 15)]);
        assert_eq!((r.received, r.net_blackout_ms), (1, 0.0));
    }

    #[test]
    fn probe_measures_a_local_echo_server_and_its_outage() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (p, d) = (paused.clone(), done.clone());
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !d.load(Ordering::Relaxed) {
                if let Ok((n, from)) = server.recv_from(&mut buf)
                    && !p.load(Ordering::Relaxed)
                {
                    let _ = server.send_to(&buf[..n], from);
                }
            }
        });
        let probe = UdpProbe::start(addr, Duration::from_millis(2), None).unwrap();
        let wait = |n: u64| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while probe.replies() < n {
                assert!(std::time::Instant::now() < deadline, "no echoes");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait(10);
        paused.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(150)); // the outage being measured
        paused.store(false, Ordering::Relaxed);
        let before = probe.replies();
        wait(before + 10);
        let r = probe.stop(Duration::from_millis(50));
        done.store(true, Ordering::Relaxed);
        let _ = echo.join();
        assert!(r.net_blackout_ms >= 140.0, "{r:?}");
        assert!(r.net_lost_requests >= 30, "{r:?}");
        assert!(r.received >= 20, "{r:?}");
    }
}
