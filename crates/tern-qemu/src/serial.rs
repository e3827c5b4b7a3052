//! Recording a guest's serial console with host timestamps.
//!
//! Blackout must be measured on the host: during stop-and-copy the guest's clock is frozen,
//! so the guest sees a gap of a few milliseconds where the host saw hundreds (measured here:
//! 9–13 ms in the guest vs 45–240 ms on the host), and QEMU's own `downtime` field is
//! meaningless in post-copy. So every line the guest prints is stamped with the host's
//! `CLOCK_MONOTONIC` the moment it arrives; both ends of a migration run on hosts that share
//! that clock in the lab (on real hosts, the comparison is per-host and the gap is bounded by
//! the migration's own QMP events instead).
//!
//! The log format (`<mono_ns> L <text>` / `<mono_ns> P <fragment>`) is specified in
//! `docs/CONVENTIONS.md`; `tern-guest` parses it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Nanoseconds of the host's `CLOCK_MONOTONIC`, comparable across processes on one host.
pub fn host_monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists
    // on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A background thread that copies a QEMU serial socket into a timestamped log file.
///
/// The serial chardev is a unix socket server with `wait=off`, so the recorder can attach
/// after QEMU starts and re-attach after a restart of whoever owns it; output produced while
/// no reader is attached is lost, which is why the recorder connects as soon as the socket
/// appears.
#[derive(Debug)]
pub struct SerialRecorder {
    log: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SerialRecorder {
    /// Starts recording `socket` into `log` (appending). Connecting is retried for
    /// `connect_timeout` while the socket does not exist yet.
    pub fn start(socket: &Path, log: &Path, connect_timeout: Duration) -> std::io::Result<Self> {
        // 0600: the guest's console may print secrets; only the agent (root) reads it.
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)?;
        let stop = Arc::new(AtomicBool::new(false));
        let socket = socket.to_path_buf();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("serial-recorder".into())
            .spawn(move || record(&socket, file, &stop2, connect_timeout))?;
        Ok(Self {
            log: log.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The log file being written.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Stops recording and waits for the last bytes to be written.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SerialRecorder {
    fn drop(&mut self) {
        self.stop();
    }
}

fn record(socket: &Path, mut out: File, stop: &AtomicBool, connect_timeout: Duration) {
    let deadline = Instant::now() + connect_timeout;
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline && !stop.load(Ordering::SeqCst) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %e, "serial socket never appeared");
                return;
            }
        }
    };
    // A short read timeout lets the thread notice `stop` while the guest is silent.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut pending: Vec<u8> = Vec::new();
    // Length of `pending` when it was last written out as a `P` fragment (0: not written).
    let mut fragment_written = 0usize;
    let mut buf = [0u8; 8192];
    let mut draining = false;
    let mut drain_reads = 0;
    loop {
        if draining {
            drain_reads += 1;
            if drain_reads > 8 {
                break;
            }
        }
        // Once asked to stop, read what is already buffered (short timeout) and leave.
        if !draining && stop.load(Ordering::SeqCst) {
            draining = true;
            let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let now = host_monotonic_ns();
                pending.extend_from_slice(&buf[..n]);
                let mut text = String::new();
                while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                    fragment_written = 0;
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line[..line.len() - 1]);
                    let line = line.trim_end_matches('\r');
                    text.push_str(&format!("{now} L {line}\n"));
                }
                if !text.is_empty() {
                    let _ = out.write_all(text.as_bytes());
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if draining {
                    break;
                }
                // Silence in the middle of a line: the guest stopped mid-line (a switchover
                // splits a line between source and destination). Write the fragment now, not
                // only when the stream closes: whoever holds this recorder may die before that
                // (an agent killed during post-copy, while the source QEMU keeps the serial
                // socket open), and the analyser needs the fragment to join the split line.
                // Should the line go on here after all, its complete `L` form follows and
                // the earlier `P` is ignored (only a log's last line is a fragment to join).
                if !pending.is_empty() && pending.len() != fragment_written {
                    let frag = String::from_utf8_lossy(&pending);
                    let frag = frag.trim_end_matches('\r');
                    let _ = writeln!(out, "{} P {frag}", host_monotonic_ns());
                    fragment_written = pending.len();
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // The stream closed (QEMU exited or the guest moved away) in the middle of a line: keep
    // the fragment, the analyser joins it with its remainder on the destination.
    if !pending.is_empty() && pending.len() != fragment_written {
        let frag = String::from_utf8_lossy(&pending);
        let frag = frag.trim_end_matches('\r');
        let _ = writeln!(out, "{} P {frag}", host_monotonic_ns());
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// The log's text once `done` holds for it; fails after 5 s with the text so far.
    fn log_when(log: &Path, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "log never reached the state: {text:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lines_are_timestamped_and_fragments_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let log = dir.path().join("serial.log");
        let listener = UnixListener::bind(&sock).unwrap();
        let before = host_monotonic_ns();
        let mut rec = SerialRecorder::start(&sock, &log, Duration::from_secs(2)).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"HB 1 10\r\nHB 2 20\nHB 3").unwrap();
        // A gap in the data (not a synchronisation): the next chunk must be stamped later.
        std::thread::sleep(Duration::from_millis(50));
        conn.write_all(b" 30\nHB 4").unwrap();
        drop(conn);
        // EOF ends the recorder by itself, writing the last fragment.
        let text = log_when(&log, |t| t.lines().count() == 4);
        rec.stop();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let parts: Vec<(u64, &str, &str)> = lines
            .iter()
            .map(|l| {
                let mut it = l.splitn(3, ' ');
                (
                    it.next().unwrap().parse().unwrap(),
                    it.next().unwrap(),
                    it.next().unwrap(),
                )
            })
            .collect();
        assert_eq!(parts[0].1, "L");
        assert_eq!(parts[0].2, "HB 1 10");
        assert_eq!(parts[2].2, "HB 3 30");
        assert_eq!(parts[3], (parts[3].0, "P", "HB 4"));
        assert!(parts[0].0 >= before);
        assert!(
            parts[2].0 >= parts[1].0 + 40_000_000,
            "second chunk arrived later"
        );
    }

    /// A line cut by silence is on disk as a fragment while the stream is still open (the
    /// recorder's owner may be killed before it closes), and a line that goes on after all is
    /// written complete.
    #[test]
    fn a_fragment_is_written_during_silence_without_waiting_for_the_close() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let log = dir.path().join("serial.log");
        let listener = UnixListener::bind(&sock).unwrap();
        let mut rec = SerialRecorder::start(&sock, &log, Duration::from_secs(2)).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"HB 1 10\nHB 2").unwrap();
        // The fragment appears while the connection is still open.
        let text = log_when(&log, |t| t.ends_with(" P HB 2\n"));
        assert_eq!(text.lines().count(), 2, "{text}");
        conn.write_all(b" 20\nHB 3").unwrap();
        drop(conn);
        let text = log_when(&log, |t| t.lines().count() == 4);
        rec.stop();
        let kinds: Vec<(&str, &str)> = text
            .lines()
            .map(|l| {
                let mut it = l.splitn(3, ' ').skip(1);
                (it.next().unwrap(), it.next().unwrap())
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("L", "HB 1 10"),
                ("P", "HB 2"),
                ("L", "HB 2 20"),
                ("P", "HB 3")
            ],
            "{text}"
        );
    }

    #[test]
    fn missing_socket_gives_up_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = SerialRecorder::start(
            &dir.path().join("nope.sock"),
            &dir.path().join("l"),
            Duration::from_millis(50),
        )
        .unwrap();
        rec.stop();
        assert_eq!(std::fs::read_to_string(dir.path().join("l")).unwrap(), "");
    }
}
