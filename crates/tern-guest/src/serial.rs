//! Parsing what the guest printed: the guest serial protocol (lines of `tern-load`) and the
//! host serial log (`tern-qemu`'s timestamped recording of them). Both formats are
//! specified in `docs/CONVENTIONS.md` ("Shared formats").
//!
//! Parsing is strict about protocol lines (a half line must not count as a heartbeat) and
//! tolerant about everything else: kernel messages, garbage bytes from a reset UART, or a
//! truncated log file become [`GuestLine::Other`] or are counted as skipped, never an error.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::image::GuestError;
use crate::params::{PageRate, WritePattern};

/// `READY …`: the workload is set up (working set allocated and touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// Working set in MiB.
    pub ws_mib: u64,
    /// Page writes per second asked for.
    pub rate: PageRate,
    /// Write pattern.
    pub pattern: WritePattern,
    /// Pages in the working set.
    pub pages: u64,
}

/// `STATUS …`: the workload's cumulative counters, once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The heartbeat sequence number at the time of the line.
    pub seq: u64,
    /// Complete verify passes over the working set.
    pub passes: u64,
    /// Total page writes.
    pub writes: u64,
    /// Page writes during the last second.
    pub wps: u64,
    /// Total corrupt pages found.
    pub corrupt: u64,
    /// Total control-counter mismatches.
    pub ctl_mismatch: u64,
}

/// `DISKREADY …`: the data disk is stamped and the disk workload starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReadyInfo {
    /// The guest's block device, e.g. `/dev/vda`.
    pub dev: String,
    /// 4 KiB blocks on it.
    pub blocks: u64,
    /// Block writes per second asked for (`max` is [`PageRate::Max`]).
    pub rate: PageRate,
    /// Block reads per second of the verifier.
    pub verify_rate: u64,
}

/// `DISKSTATUS …`: the disk workload's cumulative counters, once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The heartbeat sequence number at the time of the line.
    pub seq: u64,
    /// Complete verify passes over the disk.
    pub passes: u64,
    /// Total block writes.
    pub writes: u64,
    /// Block writes during the last second.
    pub wps: u64,
    /// Total corrupt blocks found.
    pub corrupt: u64,
    /// Total I/O errors.
    pub ioerr: u64,
}

/// One line of the guest serial protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestLine {
    /// `HB <seq> <guest_monotonic_ms>`.
    Heartbeat {
        /// Sequence number, from 1, +1 per line.
        seq: u64,
        /// The guest's CLOCK_MONOTONIC in ms (frozen while the guest is stopped, so
        /// useless for blackout; the host's arrival time is what counts).
        guest_ms: u64,
    },
    /// `STATUS …`.
    Status(GuestStatus),
    /// `CORRUPT page=<i> expected=<g> found=<g>`: a page did not hold its expected generation.
    Corrupt {
        /// Page index in the working set.
        page: u64,
        /// Generation the shadow array expected.
        expected: u64,
        /// Generation found in the page header.
        found: u64,
    },
    /// `CTLMISMATCH stack=<n> bss=<n>`: the twin control counters disagreed.
    CtlMismatch {
        /// The stack counter.
        stack: u64,
        /// The .bss counter.
        bss: u64,
    },
    /// `READY …`.
    Ready(ReadyInfo),
    /// `CORRUPT block=<i> expected=<g> found=<g>`: a data-disk block did not hold its
    /// expected generation.
    DiskCorrupt {
        /// Block index (4 KiB blocks).
        block: u64,
        /// Generation the guest expected.
        expected: u64,
        /// Generation found in the block header.
        found: u64,
    },
    /// `DISKREADY …`.
    DiskReady(DiskReadyInfo),
    /// `DISKSTATUS …`.
    DiskStatus(DiskStatus),
    /// `DISKERR op=<read|write> block=<i> errno=<n>`: an I/O error on the data disk.
    DiskError {
        /// `read` or `write`.
        op: String,
        /// Block index.
        block: u64,
        /// The guest's errno (0 for a short transfer).
        errno: u64,
    },
    /// `NETREADY port=<p>`: the UDP echo service listens.
    NetReady {
        /// UDP port.
        port: u16,
    },
    /// `NETSTATUS seq=<hb seq> rx=<n> tx=<n>`: datagrams received and echoed, once a second.
    NetStatus {
        /// The heartbeat sequence number at the time of the line.
        seq: u64,
        /// Datagrams received.
        rx: u64,
        /// Echoes sent.
        tx: u64,
    },
    /// Anything else (kernel messages, init messages, partial or malformed lines).
    Other(String),
}

/// Parses one guest line. Never fails: what is not a well-formed protocol line is `Other`.
pub fn parse_guest_line(line: &str) -> GuestLine {
    let text = line.trim_end_matches(['\r', '\n']).trim();
    parse_protocol(text).unwrap_or_else(|| GuestLine::Other(line.to_string()))
}

fn parse_protocol(text: &str) -> Option<GuestLine> {
    let mut words = text.split_ascii_whitespace();
    let tag = words.next()?;
    let rest: Vec<&str> = words.collect();
    match tag {
        "HB" => match rest.as_slice() {
            [seq, ms] => Some(GuestLine::Heartbeat {
                seq: seq.parse().ok()?,
                guest_ms: ms.parse().ok()?,
            }),
            _ => None,
        },
        "STATUS" => {
            let f = Fields::new(
                &rest,
                &["seq", "passes", "writes", "wps", "corrupt", "ctl_mismatch"],
            )?;
            Some(GuestLine::Status(GuestStatus {
                seq: f.num(0)?,
                passes: f.num(1)?,
                writes: f.num(2)?,
                wps: f.num(3)?,
                corrupt: f.num(4)?,
                ctl_mismatch: f.num(5)?,
            }))
        }
        "CORRUPT" if rest.first().is_some_and(|w| w.starts_with("block=")) => {
            let f = Fields::new(&rest, &["block", "expected", "found"])?;
            Some(GuestLine::DiskCorrupt {
                block: f.num(0)?,
                expected: f.num(1)?,
                found: f.num(2)?,
            })
        }
        "DISKREADY" => {
            let f = Fields::new(&rest, &["dev", "blocks", "rate", "verify_rate"])?;
            Some(GuestLine::DiskReady(DiskReadyInfo {
                dev: f.values[0].to_string(),
                blocks: f.num(1)?,
                rate: f.values[2].parse().ok()?,
                verify_rate: f.num(3)?,
            }))
        }
        "DISKSTATUS" => {
            let f = Fields::new(
                &rest,
                &["seq", "passes", "writes", "wps", "corrupt", "ioerr"],
            )?;
            Some(GuestLine::DiskStatus(DiskStatus {
                seq: f.num(0)?,
                passes: f.num(1)?,
                writes: f.num(2)?,
                wps: f.num(3)?,
                corrupt: f.num(4)?,
                ioerr: f.num(5)?,
            }))
        }
        "NETREADY" => {
            let f = Fields::new(&rest, &["port"])?;
            Some(GuestLine::NetReady {
                port: f.values[0].parse().ok()?,
            })
        }
        "NETSTATUS" => {
            let f = Fields::new(&rest, &["seq", "rx", "tx"])?;
            Some(GuestLine::NetStatus {
                seq: f.num(0)?,
                rx: f.num(1)?,
                tx: f.num(2)?,
            })
        }
        "DISKERR" => {
            let f = Fields::new(&rest, &["op", "block", "errno"])?;
            Some(GuestLine::DiskError {
                op: f.values[0].to_string(),
                block: f.num(1)?,
                errno: f.num(2)?,
            })
        }
        "CORRUPT" => {
            let f = Fields::new(&rest, &["page", "expected", "found"])?;
            Some(GuestLine::Corrupt {
                page: f.num(0)?,
                expected: f.num(1)?,
                found: f.num(2)?,
            })
        }
        "CTLMISMATCH" => {
            let f = Fields::new(&rest, &["stack", "bss"])?;
            Some(GuestLine::CtlMismatch {
                stack: f.num(0)?,
                bss: f.num(1)?,
            })
        }
        "READY" => {
            let f = Fields::new(&rest, &["ws_mib", "rate", "pattern", "pages"])?;
            Some(GuestLine::Ready(ReadyInfo {
                ws_mib: f.num(0)?,
                rate: f.values[1].parse().ok()?,
                pattern: f.values[2].parse().ok()?,
                pages: f.num(3)?,
            }))
        }
        _ => None,
    }
}

/// `key=value` words in exactly the expected order (the protocol's fixed format; a line
/// with missing or extra keys is not trusted).
struct Fields<'a> {
    values: Vec<&'a str>,
}

impl<'a> Fields<'a> {
    fn new(words: &[&'a str], keys: &[&str]) -> Option<Self> {
        if words.len() != keys.len() {
            return None;
        }
        let values = words
            .iter()
            .zip(keys)
            .map(|(w, k)| w.strip_prefix(k)?.strip_prefix('='))
            .collect::<Option<Vec<_>>>()?;
        Some(Self { values })
    }

    fn num(&self, i: usize) -> Option<u64> {
        self.values[i].parse().ok()
    }
}

/// Whether a host log line was complete or a fragment (text without its newline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LineKind {
    /// `L`: a complete line.
    Complete,
    /// `P`: a fragment without newline, written when the stream fell silent mid-line or
    /// closed; its timestamp is then, not when the bytes arrived. Only a log's last line is
    /// a fragment that matters (a switchover split the line); an earlier one is followed by
    /// the complete line and ignored.
    Fragment,
}

/// One line of a host serial log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLine {
    /// Host CLOCK_MONOTONIC (ns) when the line arrived.
    pub mono_ns: u64,
    /// Complete line or trailing fragment.
    pub kind: LineKind,
    /// What the guest printed, without the newline.
    pub text: String,
}

/// A host serial log, as written by `tern-qemu`'s serial recorder (one per QEMU process).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSerialLog {
    /// The well-formed lines, in file order.
    pub lines: Vec<HostLine>,
    /// Lines that were not `<mono_ns> L|P <text>` and were skipped.
    pub skipped: usize,
}

impl HostSerialLog {
    /// Reads and parses a log file. Only I/O errors fail; malformed lines are skipped and
    /// counted, and invalid UTF-8 is replaced (a UART can emit anything).
    pub fn read(path: &Path) -> Result<Self, GuestError> {
        let bytes = std::fs::read(path).map_err(|source| GuestError::SerialLog {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::parse(&String::from_utf8_lossy(&bytes)))
    }

    /// Parses log text.
    pub fn parse(text: &str) -> Self {
        let mut log = HostSerialLog::default();
        for raw in text.split('\n') {
            if raw.is_empty() {
                continue;
            }
            match parse_host_line(raw) {
                Some(l) => log.lines.push(l),
                None => log.skipped += 1,
            }
        }
        log
    }
}

fn parse_host_line(raw: &str) -> Option<HostLine> {
    let (ns, rest) = raw.split_once(' ')?;
    let mono_ns = ns.parse().ok()?;
    let (kind, text) = match rest.split_once(' ') {
        Some((k, t)) => (k, t),
        None => (rest, ""),
    };
    let kind = match kind {
        "L" => LineKind::Complete,
        "P" => LineKind::Fragment,
        _ => return None,
    };
    Some(HostLine {
        mono_ns,
        kind,
        text: text.trim_end_matches('\r').to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_parses_and_half_heartbeats_do_not() {
        assert_eq!(
            parse_guest_line("HB 12 4567"),
            GuestLine::Heartbeat {
                seq: 12,
                guest_ms: 4567
            }
        );
        assert_eq!(
            parse_guest_line("HB 12 4567\r"),
            GuestLine::Heartbeat {
                seq: 12,
                guest_ms: 4567
            }
        );
        for bad in ["HB 12", "HB", "HB 1x 5", "HB 1 2 3", "XHB 1 2", "HB -1 2"] {
            assert_eq!(parse_guest_line(bad), GuestLine::Other(bad.into()), "{bad}");
        }
    }

    #[test]
    fn status_corrupt_ctl_ready_parse() {
        assert_eq!(
            parse_guest_line(
                "STATUS seq=901 passes=2624 writes=10748416 wps=1149888 corrupt=1 ctl_mismatch=2"
            ),
            GuestLine::Status(GuestStatus {
                seq: 901,
                passes: 2624,
                writes: 10748416,
                wps: 1149888,
                corrupt: 1,
                ctl_mismatch: 2
            })
        );
        assert_eq!(
            parse_guest_line("CORRUPT page=7 expected=3 found=2"),
            GuestLine::Corrupt {
                page: 7,
                expected: 3,
                found: 2
            }
        );
        assert_eq!(
            parse_guest_line("CTLMISMATCH stack=10 bss=11"),
            GuestLine::CtlMismatch { stack: 10, bss: 11 }
        );
        assert_eq!(
            parse_guest_line("READY ws_mib=16 rate=max pattern=seq pages=4096"),
            GuestLine::Ready(ReadyInfo {
                ws_mib: 16,
                rate: PageRate::Max,
                pattern: WritePattern::Sequential,
                pages: 4096
            })
        );
        assert_eq!(
            parse_guest_line("READY ws_mib=16 rate=500 pattern=random pages=4096"),
            GuestLine::Ready(ReadyInfo {
                ws_mib: 16,
                rate: PageRate::PerSecond(500),
                pattern: WritePattern::Random,
                pages: 4096
            })
        );
    }

    #[test]
    fn disk_lines_parse_and_page_corruption_stays_apart() {
        assert_eq!(
            parse_guest_line("CORRUPT block=700 expected=3 found=2"),
            GuestLine::DiskCorrupt {
                block: 700,
                expected: 3,
                found: 2
            }
        );
        assert!(matches!(
            parse_guest_line("CORRUPT page=7 expected=3 found=2"),
            GuestLine::Corrupt { page: 7, .. }
        ));
        assert_eq!(
            parse_guest_line("DISKREADY dev=/dev/vda blocks=1024 rate=max verify_rate=1000"),
            GuestLine::DiskReady(DiskReadyInfo {
                dev: "/dev/vda".into(),
                blocks: 1024,
                rate: PageRate::Max,
                verify_rate: 1000
            })
        );
        assert_eq!(
            parse_guest_line("DISKSTATUS seq=96 passes=2 writes=199 wps=199 corrupt=1 ioerr=0"),
            GuestLine::DiskStatus(DiskStatus {
                seq: 96,
                passes: 2,
                writes: 199,
                wps: 199,
                corrupt: 1,
                ioerr: 0
            })
        );
        assert_eq!(
            parse_guest_line("DISKERR op=read block=5 errno=5"),
            GuestLine::DiskError {
                op: "read".into(),
                block: 5,
                errno: 5
            }
        );
        assert_eq!(
            parse_guest_line("NETREADY port=7777"),
            GuestLine::NetReady { port: 7777 }
        );
        assert_eq!(
            parse_guest_line("NETSTATUS seq=5 rx=3 tx=3"),
            GuestLine::NetStatus {
                seq: 5,
                rx: 3,
                tx: 3
            }
        );
        for bad in [
            "NETREADY port=70000",
            "CORRUPT block=x expected=1 found=0",
            "DISKSTATUS seq=1 passes=2",
            "DISKREADY dev=/dev/vda blocks=1 rate=0x verify_rate=1",
        ] {
            assert!(
                matches!(parse_guest_line(bad), GuestLine::Other(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn malformed_key_value_lines_are_other() {
        for bad in [
            "STATUS seq=1 passes=2",
            "STATUS passes=2 seq=1 writes=0 wps=0 corrupt=0 ctl_mismatch=0",
            "CORRUPT page=1 expected=2 found=x",
            "CORRUPT page=1 expected=2",
            "CTLMISMATCH stack=1",
            "READY ws_mib=16 rate=fast pattern=seq pages=1",
            "[    0.000000] Linux version 6.1.0",
            "",
        ] {
            assert_eq!(parse_guest_line(bad), GuestLine::Other(bad.into()), "{bad}");
        }
    }

    #[test]
    fn host_log_parses_kinds_and_skips_garbage() {
        let text = "100 L HB 1 5\n\
                    garbage without timestamp\n\
                    200 X HB 2 6\n\
                    300 L \n\
                    350 L\n\
                    12a L HB 3 7\n\
                    400 L HB 2 6\r\n\
                    500 P HB 1";
        let log = HostSerialLog::parse(text);
        assert_eq!(log.skipped, 3);
        let got: Vec<_> = log
            .lines
            .iter()
            .map(|l| (l.mono_ns, l.kind, l.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (100, LineKind::Complete, "HB 1 5"),
                (300, LineKind::Complete, ""),
                (350, LineKind::Complete, ""),
                (400, LineKind::Complete, "HB 2 6"),
                (500, LineKind::Fragment, "HB 1"),
            ]
        );
    }

    #[test]
    fn host_log_text_keeps_inner_spaces() {
        let log = HostSerialLog::parse("1 L a  b c\n");
        assert_eq!(log.lines[0].text, "a  b c");
    }

    #[test]
    fn reading_a_missing_log_names_it() {
        let err = HostSerialLog::read(Path::new("/nonexistent/serial.log")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/serial.log"), "{err}");
    }

    #[test]
    fn reading_invalid_utf8_is_tolerated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.log");
        std::fs::write(&p, b"1 L \xff\xfe\n2 L HB 1 1\n").unwrap();
        let log = HostSerialLog::read(&p).unwrap();
        assert_eq!(log.lines.len(), 2);
        assert_eq!(
            parse_guest_line(&log.lines[1].text),
            GuestLine::Heartbeat {
                seq: 1,
                guest_ms: 1
            }
        );
    }
}
