//! Integrity and blackout analysis of host serial logs.
//!
//! A migration is judged on three independent signals, because each one alone has missed
//! real bugs (QEMU 7.2 + TCG lost a dirty *stack* page that the page checker never saw):
//! - data pages: `CORRUPT` lines from the guest's continuous verifier;
//! - control state: `CTLMISMATCH` lines from the stack/.bss twin counters, and the
//!   heartbeat sequence, which lives in the main loop's frame and must stay +1 per line
//!   across the switchover (a stale stack page makes it jump back);
//! - liveness: the host-time gaps between heartbeats, i.e. the blackout (source's last
//!   heartbeat → destination's first) and post-copy stalls on the destination.
//!
//! Times are host arrival times from the log, never the guest's clock: the guest's clock
//! is frozen during stop-and-copy, and QEMU's `downtime` is meaningless in post-copy.

use serde::{Deserialize, Serialize};

use crate::serial::{
    DiskReadyInfo, DiskStatus, GuestLine, GuestStatus, HostLine, HostSerialLog, LineKind,
    ReadyInfo, parse_guest_line,
};

/// Which stream a sequence anomaly was seen in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogSide {
    /// Within one log (boot analysis) or the source's log.
    Source,
    /// Within the destination's log.
    Destination,
    /// Between the source's last heartbeat and the destination's first.
    Switchover,
}

/// A heartbeat whose sequence number was not the previous one + 1.
///
/// `next > previous + 1` means lines were lost (or the guest skipped ahead);
/// `next <= previous` means the guest went back in time — a stale stack page after a
/// migration, or a reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceAnomaly {
    /// Where it was seen.
    pub side: LogSide,
    /// Host arrival time (ns) of the offending heartbeat.
    pub at_ns: u64,
    /// The sequence number before.
    pub previous: u64,
    /// The sequence number that should have been `previous + 1`.
    pub next: u64,
}

impl SequenceAnomaly {
    /// True when the sequence went backwards or repeated (state from the past).
    pub fn is_backwards(&self) -> bool {
        self.next <= self.previous
    }
}

/// What one guest's log says about its health (a boot, or one side of a migration).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestHealth {
    /// The `READY` line, if it was seen.
    pub ready: Option<ReadyInfo>,
    /// Host time (ns) the `READY` line arrived.
    pub ready_ns: Option<u64>,
    /// Host time (ns) the first heartbeat arrived.
    pub first_heartbeat_ns: Option<u64>,
    /// Host time (ns) the last heartbeat arrived.
    pub last_heartbeat_ns: Option<u64>,
    /// Number of heartbeat lines.
    pub heartbeats: u64,
    /// Sequence number of the first heartbeat.
    pub first_seq: Option<u64>,
    /// Sequence number of the last heartbeat.
    pub last_seq: Option<u64>,
    /// Complete verify passes, from the last `STATUS` line.
    pub verify_passes: u64,
    /// Corrupt pages: the larger of the `CORRUPT` lines seen and the last `STATUS` total
    /// (a line lost on the serial port is still counted by the guest).
    pub corrupt_pages: u64,
    /// Control-counter mismatches, counted the same way.
    pub control_mismatches: u64,
    /// The last `STATUS` line.
    pub last_status: Option<GuestStatus>,
    /// Heartbeats whose sequence was not previous + 1.
    pub sequence_anomalies: Vec<SequenceAnomaly>,
    /// Largest host-time gap between consecutive heartbeats, in ms.
    pub max_gap_ms: f64,
    /// The `DISKREADY` line, if the guest runs the data-disk workload.
    pub disk_ready: Option<DiskReadyInfo>,
    /// The last `DISKSTATUS` line.
    pub last_disk_status: Option<DiskStatus>,
    /// Corrupt data-disk blocks: the larger of the `CORRUPT block=` lines seen and the last
    /// `DISKSTATUS` total.
    pub disk_corrupt_blocks: u64,
    /// Data-disk I/O errors, counted the same way (`DISKERR` lines vs `DISKSTATUS`).
    pub disk_io_errors: u64,
    /// Complete verify passes over the data disk, from the last `DISKSTATUS`.
    pub disk_verify_passes: u64,
}

impl GuestHealth {
    /// Heartbeats arrived, nothing corrupt (pages or disk blocks), no disk I/O error, no
    /// control mismatch, sequence continuous.
    pub fn is_healthy(&self) -> bool {
        self.heartbeats > 0
            && self.disk_corrupt_blocks == 0
            && self.disk_io_errors == 0
            && self.corrupt_pages == 0
            && self.control_mismatches == 0
            && self.sequence_anomalies.is_empty()
    }
}

/// One parsed guest line with its host arrival time.
#[derive(Debug, Clone)]
struct Event {
    ns: u64,
    line: GuestLine,
}

/// Complete lines of a log, parsed. A trailing fragment is left out: its timestamp is the
/// stream's close, and its text may be cut mid-number (`HB 12 45` of `HB 12 4567`).
fn complete_events(lines: &[HostLine]) -> Vec<Event> {
    lines
        .iter()
        .filter(|l| l.kind == LineKind::Complete)
        .map(|l| Event {
            ns: l.mono_ns,
            line: parse_guest_line(&l.text),
        })
        .collect()
}

/// Analyses a boot (or any single guest run).
pub fn analyze_boot(log: &HostSerialLog) -> GuestHealth {
    health(&complete_events(&log.lines), LogSide::Source)
}

fn health(events: &[Event], side: LogSide) -> GuestHealth {
    let mut h = GuestHealth::default();
    let (mut corrupt_lines, mut ctl_lines) = (0u64, 0u64);
    let (mut disk_corrupt_lines, mut disk_err_lines) = (0u64, 0u64);
    let mut prev: Option<(u64, u64)> = None; // (seq, ns)
    let mut max_gap_ns = 0u64;
    for e in events {
        match &e.line {
            GuestLine::Heartbeat { seq, .. } => {
                h.heartbeats += 1;
                h.first_heartbeat_ns.get_or_insert(e.ns);
                h.first_seq.get_or_insert(*seq);
                h.last_heartbeat_ns = Some(e.ns);
                h.last_seq = Some(*seq);
                if let Some((pseq, pns)) = prev {
                    if *seq != pseq.wrapping_add(1) {
                        h.sequence_anomalies.push(SequenceAnomaly {
                            side,
                            at_ns: e.ns,
                            previous: pseq,
                            next: *seq,
                        });
                    }
                    max_gap_ns = max_gap_ns.max(e.ns.saturating_sub(pns));
                }
                prev = Some((*seq, e.ns));
            }
            GuestLine::Status(s) => h.last_status = Some(*s),
            GuestLine::Corrupt { .. } => corrupt_lines += 1,
            GuestLine::CtlMismatch { .. } => ctl_lines += 1,
            GuestLine::Ready(r) => {
                h.ready = Some(*r);
                h.ready_ns = Some(e.ns);
            }
            GuestLine::DiskReady(r) => h.disk_ready = Some(r.clone()),
            GuestLine::DiskStatus(s) => h.last_disk_status = Some(*s),
            GuestLine::DiskCorrupt { .. } => disk_corrupt_lines += 1,
            GuestLine::DiskError { .. } => disk_err_lines += 1,
            GuestLine::NetReady { .. } | GuestLine::NetStatus { .. } | GuestLine::Other(_) => {}
        }
    }
    let (disk_corrupt, disk_err, disk_passes) = h
        .last_disk_status
        .map_or((0, 0, 0), |s| (s.corrupt, s.ioerr, s.passes));
    h.disk_corrupt_blocks = disk_corrupt_lines.max(disk_corrupt);
    h.disk_io_errors = disk_err_lines.max(disk_err);
    h.disk_verify_passes = disk_passes;
    let (status_corrupt, status_ctl, passes) = h
        .last_status
        .map_or((0, 0, 0), |s| (s.corrupt, s.ctl_mismatch, s.passes));
    h.verify_passes = passes;
    h.corrupt_pages = corrupt_lines.max(status_corrupt);
    h.control_mismatches = ctl_lines.max(status_ctl);
    h.max_gap_ms = ns_to_ms(max_gap_ns);
    h
}

fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The verdict on one migration, from the source's and the destination's serial logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationIntegrity {
    /// The destination printed at least one heartbeat (false: cancelled or failed before
    /// the guest ran there).
    pub switched_over: bool,
    /// Host-time gap (ms) between the source's last heartbeat and the destination's first:
    /// the blackout the guest's users saw. `None` without a switchover.
    pub blackout_ms: Option<f64>,
    /// Host time (ns) of the source's last heartbeat (estimated for a split line, see
    /// [`analyze_migration`]).
    pub source_last_heartbeat_ns: Option<u64>,
    /// Host time (ns) of the destination's first heartbeat.
    pub dest_first_heartbeat_ns: Option<u64>,
    /// Sequence number of the source's last heartbeat (including a split, joined one).
    pub last_source_seq: Option<u64>,
    /// Sequence number of the destination's first heartbeat.
    pub first_dest_seq: Option<u64>,
    /// A line was split between the source's trailing fragment and the destination's first
    /// line, and was joined.
    pub split_line_joined: bool,
    /// No gap or backwards step in either log, and (after a switchover)
    /// `first_dest_seq == last_source_seq + 1`.
    pub heartbeat_continuous: bool,
    /// Every sequence anomaly, in both logs and across the switchover.
    pub sequence_anomalies: Vec<SequenceAnomaly>,
    /// Corrupt pages reported in both logs (each bad page is printed once by the guest).
    pub corrupt_pages: u64,
    /// Control-counter mismatches in both logs.
    pub control_mismatches: u64,
    /// Verify passes in the source's last `STATUS` line.
    pub verify_passes_before: u64,
    /// Growth of the pass counter on the destination (its last `STATUS` minus the
    /// source's last). `STATUS` comes once a second, so at least one pass ran entirely on
    /// the destination only when this is ≥ 2.
    pub verify_passes_after: u64,
    /// Largest host-time gap (ms) between consecutive destination heartbeats: post-copy
    /// page-fault stalls show up here.
    pub max_dest_gap_ms: f64,
    /// Heartbeats printed on the destination.
    pub dest_heartbeats: u64,
    /// The guest ran the data-disk workload (a `DISKREADY` line on either side).
    pub disk_workload: bool,
    /// Corrupt data-disk blocks in both logs (each bad block is printed once).
    pub disk_corrupt_blocks: u64,
    /// Data-disk I/O errors in both logs.
    pub disk_io_errors: u64,
    /// Growth of the disk verifier's pass counter on the destination (its last
    /// `DISKSTATUS` minus the source's last). ≥ 2 means at least one verification of the
    /// whole disk ran entirely on the destination.
    pub disk_verify_passes_after: u64,
}

impl MigrationIntegrity {
    /// The guest came through intact: switched over, continuous heartbeats, no corrupt
    /// page, no control mismatch, and the verifier kept running on the destination.
    pub fn is_intact(&self) -> bool {
        self.switched_over
            && self.heartbeat_continuous
            && self.corrupt_pages == 0
            && self.control_mismatches == 0
            && self.verify_passes_after >= 1
            && self.disk_corrupt_blocks == 0
            && self.disk_io_errors == 0
            && (!self.disk_workload || self.disk_verify_passes_after >= 1)
    }
}

/// Analyses one migration from the source's and the destination's host serial logs.
///
/// A line split by the switchover (the source's trailing `P` fragment + the destination's
/// first line) is joined and counted as the *source's* last line: the guest printed it
/// before it stopped. Its arrival time is unknown (a fragment is stamped when the stream
/// closed), so for a joined heartbeat it is estimated as the previous source heartbeat's
/// arrival plus the guest-clock difference between the two beats (the guest clock runs in
/// real time while the guest runs on the source); without a previous heartbeat the last
/// complete source line's time is used.
///
/// A cancelled migration (no destination heartbeat) is reported with
/// `switched_over == false` and no blackout; continuity then covers the source only.
pub fn analyze_migration(source: &HostSerialLog, dest: &HostSerialLog) -> MigrationIntegrity {
    let mut src_events = complete_events(&source.lines);
    let mut dest_lines: &[HostLine] = &dest.lines;
    let mut split_line_joined = false;

    // The remainder is the destination's first *complete* line: a destination that stalled
    // in the middle of it (a post-copy page fault) first wrote part of it as a fragment.
    let first_complete = dest.lines.iter().position(|l| l.kind == LineKind::Complete);
    if let (Some(frag), Some(i)) = (
        source.lines.last().filter(|l| l.kind == LineKind::Fragment),
        first_complete,
    ) {
        let first = &dest.lines[i];
        let line = parse_guest_line(&format!("{}{}", frag.text, first.text));
        let ns = estimate_joined_time(&src_events, &line).unwrap_or(frag.mono_ns);
        src_events.push(Event { ns, line });
        dest_lines = &dest.lines[i + 1..];
        split_line_joined = true;
    }
    let dest_events = complete_events(dest_lines);

    let src = health(&src_events, LogSide::Source);
    let dst = health(&dest_events, LogSide::Destination);

    let switched_over = dst.heartbeats > 0;
    let mut anomalies = src.sequence_anomalies.clone();
    if let (Some(last), Some(first), Some(at_ns)) =
        (src.last_seq, dst.first_seq, dst.first_heartbeat_ns)
    {
        if first != last.wrapping_add(1) {
            anomalies.push(SequenceAnomaly {
                side: LogSide::Switchover,
                at_ns,
                previous: last,
                next: first,
            });
        }
    }
    anomalies.extend(dst.sequence_anomalies.iter().copied());

    let blackout_ms = match (src.last_heartbeat_ns, dst.first_heartbeat_ns) {
        (Some(s), Some(d)) => Some(ns_to_ms(d.saturating_sub(s))),
        _ => None,
    };
    let passes_before = src.verify_passes;
    let passes_after = dst
        .last_status
        .map_or(0, |s| s.passes.saturating_sub(passes_before));

    MigrationIntegrity {
        switched_over,
        blackout_ms,
        source_last_heartbeat_ns: src.last_heartbeat_ns,
        dest_first_heartbeat_ns: dst.first_heartbeat_ns,
        last_source_seq: src.last_seq,
        first_dest_seq: dst.first_seq,
        split_line_joined,
        heartbeat_continuous: anomalies.is_empty() && src.heartbeats > 0,
        sequence_anomalies: anomalies,
        // Each fault is printed once, on whichever side the guest was running; the guest's
        // own totals continue across the migration, so the destination's last STATUS
        // covers both sides too.
        corrupt_pages: src
            .corrupt_pages
            .max(dst.corrupt_pages)
            .max(count(&src_events, is_corrupt) + count(&dest_events, is_corrupt)),
        control_mismatches: src
            .control_mismatches
            .max(dst.control_mismatches)
            .max(count(&src_events, is_ctl) + count(&dest_events, is_ctl)),
        verify_passes_before: passes_before,
        verify_passes_after: passes_after,
        max_dest_gap_ms: dst.max_gap_ms,
        dest_heartbeats: dst.heartbeats,
        disk_workload: src.disk_ready.is_some() || dst.disk_ready.is_some(),
        disk_corrupt_blocks: src
            .disk_corrupt_blocks
            .max(dst.disk_corrupt_blocks)
            .max(count(&src_events, is_disk_corrupt) + count(&dest_events, is_disk_corrupt)),
        disk_io_errors: src
            .disk_io_errors
            .max(dst.disk_io_errors)
            .max(count(&src_events, is_disk_err) + count(&dest_events, is_disk_err)),
        disk_verify_passes_after: dst
            .last_disk_status
            .map_or(0, |s| s.passes.saturating_sub(src.disk_verify_passes)),
    }
}

fn is_disk_corrupt(l: &GuestLine) -> bool {
    matches!(l, GuestLine::DiskCorrupt { .. })
}

fn is_disk_err(l: &GuestLine) -> bool {
    matches!(l, GuestLine::DiskError { .. })
}

fn is_corrupt(l: &GuestLine) -> bool {
    matches!(l, GuestLine::Corrupt { .. })
}

fn is_ctl(l: &GuestLine) -> bool {
    matches!(l, GuestLine::CtlMismatch { .. })
}

fn count(events: &[Event], pred: fn(&GuestLine) -> bool) -> u64 {
    events.iter().filter(|e| pred(&e.line)).count() as u64
}

/// Arrival time of a joined line: previous heartbeat's arrival + guest-clock delta for a
/// heartbeat, else the last complete source line's arrival.
fn estimate_joined_time(src: &[Event], joined: &GuestLine) -> Option<u64> {
    let last_ns = src.last().map(|e| e.ns);
    let GuestLine::Heartbeat { guest_ms, .. } = joined else {
        return last_ns;
    };
    src.iter()
        .rev()
        .find_map(|e| match e.line {
            GuestLine::Heartbeat {
                guest_ms: prev_ms, ..
            } if prev_ms <= *guest_ms => Some(e.ns + (guest_ms - prev_ms) * 1_000_000),
            _ => None,
        })
        .or(last_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A log of heartbeats `seqs` every 10 ms from `t0_ms` (host) with guest ms = seq*10.
    fn beats(t0_ms: u64, seqs: impl IntoIterator<Item = u64>) -> String {
        seqs.into_iter()
            .enumerate()
            .map(|(i, s)| format!("{} L HB {s} {}\n", (t0_ms + 10 * i as u64) * MS, s * 10))
            .collect()
    }

    fn status(t_ms: u64, seq: u64, passes: u64, corrupt: u64, ctl: u64) -> String {
        format!(
            "{} L STATUS seq={seq} passes={passes} writes=100 wps=100 corrupt={corrupt} ctl_mismatch={ctl}\n",
            t_ms * MS
        )
    }

    #[test]
    fn boot_health_counts_everything() {
        let mut text = String::from("1 L [    0.5] kernel noise\n");
        text += &format!(
            "{} L READY ws_mib=16 rate=max pattern=seq pages=4096\n",
            900 * MS
        );
        text += &beats(1000, 1..=100);
        text += &status(1995, 100, 42, 0, 0);
        text += "garbage\n";
        let h = analyze_boot(&HostSerialLog::parse(&text));
        assert_eq!(h.ready.map(|r| r.pages), Some(4096));
        assert_eq!(h.ready_ns, Some(900 * MS));
        assert_eq!(h.first_heartbeat_ns, Some(1000 * MS));
        assert_eq!(h.heartbeats, 100);
        assert_eq!((h.first_seq, h.last_seq), (Some(1), Some(100)));
        assert_eq!(h.verify_passes, 42);
        assert_eq!((h.corrupt_pages, h.control_mismatches), (0, 0));
        assert!(h.sequence_anomalies.is_empty());
        assert!((h.max_gap_ms - 10.0).abs() < 1e-9);
        assert!(h.is_healthy());
    }

    fn disk_status(t_ms: u64, seq: u64, passes: u64, corrupt: u64) -> String {
        format!(
            "{} L DISKSTATUS seq={seq} passes={passes} writes=10 wps=10 corrupt={corrupt} ioerr=0\n",
            t_ms * MS
        )
    }

    #[test]
    fn disk_blocks_are_judged_apart_from_pages() {
        let mut text = format!(
            "{} L DISKREADY dev=/dev/vda blocks=2048 rate=100 verify_rate=1000\n",
            900 * MS
        );
        text += &beats(1000, 1..=100);
        text += &status(1995, 100, 4, 0, 0);
        text += &disk_status(1996, 100, 2, 0);
        let h = analyze_boot(&HostSerialLog::parse(&text));
        assert_eq!(h.disk_ready.as_ref().map(|d| d.blocks), Some(2048));
        assert_eq!((h.disk_verify_passes, h.disk_corrupt_blocks), (2, 0));
        assert!(h.is_healthy());

        text += "2000000000 L CORRUPT block=7 expected=3 found=2\n";
        let h = analyze_boot(&HostSerialLog::parse(&text));
        assert_eq!((h.disk_corrupt_blocks, h.corrupt_pages), (1, 0));
        assert!(!h.is_healthy());

        // Migration: the destination must verify the disk; a bad block on it fails it.
        let src = format!(
            "{}{}{}{}",
            "1 L DISKREADY dev=/dev/vda blocks=8 rate=100 verify_rate=1000\n",
            beats(1000, 1..=50),
            status(1495, 50, 3, 0, 0),
            disk_status(1496, 50, 5, 0)
        );
        let dst_ok = format!(
            "{}{}{}",
            beats(2000, 51..=200),
            status(3495, 200, 9, 0, 0),
            disk_status(3496, 200, 8, 0)
        );
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst_ok));
        assert!(m.disk_workload);
        assert_eq!((m.disk_verify_passes_after, m.disk_corrupt_blocks), (3, 0));
        assert!(m.is_intact(), "{m:?}");
        let dst_bad = format!("{dst_ok}3500000000 L CORRUPT block=1 expected=4 found=3\n");
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst_bad));
        assert_eq!(m.disk_corrupt_blocks, 1);
        assert!(!m.is_intact());
        let dst_unverified = format!(
            "{}{}{}",
            beats(2000, 51..=200),
            status(3495, 200, 9, 0, 0),
            disk_status(3496, 200, 5, 0)
        );
        let m = analyze_migration(
            &HostSerialLog::parse(&src),
            &HostSerialLog::parse(&dst_unverified),
        );
        assert!(
            !m.is_intact(),
            "the disk was never verified on the destination"
        );
    }

    #[test]
    fn boot_without_heartbeats_is_not_healthy() {
        let h = analyze_boot(&HostSerialLog::parse("5 L Kernel panic\n"));
        assert_eq!(h.heartbeats, 0);
        assert_eq!(h.first_heartbeat_ns, None);
        assert!(!h.is_healthy());
    }

    #[test]
    fn boot_detects_gap_backwards_corrupt_and_mismatch() {
        let mut text = beats(0, [1, 2, 3, 5, 6, 4]);
        text += "100000000 L CORRUPT page=3 expected=7 found=6\n";
        text += "100000001 L CORRUPT page=9 expected=7 found=6\n";
        text += "100000002 L CTLMISMATCH stack=5 bss=6\n";
        let h = analyze_boot(&HostSerialLog::parse(&text));
        assert_eq!(h.sequence_anomalies.len(), 2);
        assert_eq!(
            (
                h.sequence_anomalies[0].previous,
                h.sequence_anomalies[0].next
            ),
            (3, 5)
        );
        assert!(!h.sequence_anomalies[0].is_backwards());
        assert!(h.sequence_anomalies[1].is_backwards());
        assert_eq!(h.corrupt_pages, 2);
        assert_eq!(h.control_mismatches, 1);
        assert!(!h.is_healthy());
    }

    #[test]
    fn status_totals_count_when_lines_were_lost() {
        let text = beats(0, 1..=3) + &status(30, 3, 9, 4, 2);
        let h = analyze_boot(&HostSerialLog::parse(&text));
        assert_eq!((h.corrupt_pages, h.control_mismatches), (4, 2));
    }

    #[test]
    fn trailing_fragment_of_a_single_log_is_ignored() {
        let text = beats(0, 1..=3) + "999 P HB 4 4";
        let h = analyze_boot(&HostSerialLog::parse(&text));
        assert_eq!(h.last_seq, Some(3));
    }

    #[test]
    fn clean_migration_measures_blackout_and_growth() {
        // Source: beats 1..=50 from t=1000 ms (last at 1490 ms), 10 passes.
        let src = beats(1000, 1..=50) + &status(1495, 50, 10, 0, 0);
        // Destination: resumes at 1700 ms with beat 51; passes grow to 25.
        let dst = beats(1700, 51..=200) + &status(3000, 200, 25, 0, 0);
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!(m.switched_over);
        assert!(!m.split_line_joined);
        assert_eq!((m.last_source_seq, m.first_dest_seq), (Some(50), Some(51)));
        assert!(m.heartbeat_continuous);
        assert!((m.blackout_ms.unwrap() - 210.0).abs() < 1e-9);
        assert_eq!((m.verify_passes_before, m.verify_passes_after), (10, 15));
        assert!((m.max_dest_gap_ms - 10.0).abs() < 1e-9);
        assert_eq!(m.dest_heartbeats, 150);
        assert!(m.is_intact());
    }

    #[test]
    fn split_heartbeat_is_joined_and_timed_from_the_guest_clock() {
        // Source's last complete beat is 49 at 1480 ms (guest 490 ms); beat 50 (guest 500)
        // was cut after "HB 5"; the fragment is stamped at stream close, 2000 ms.
        let src = beats(1000, 1..=49) + &format!("{} P HB 5", 2000 * MS);
        let dst = format!("{} L 0 500\n", 1690 * MS) + &beats(1700, 51..=60);
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!(m.split_line_joined);
        assert_eq!(m.last_source_seq, Some(50));
        assert_eq!(m.first_dest_seq, Some(51));
        assert!(m.heartbeat_continuous, "{:?}", m.sequence_anomalies);
        // Estimated arrival of beat 50: 1480 + (500 - 490) = 1490 ms; dest's first: 1700.
        assert_eq!(m.source_last_heartbeat_ns, Some(1490 * MS));
        assert!((m.blackout_ms.unwrap() - 210.0).abs() < 1e-9);
        assert_eq!(m.dest_heartbeats, 10);
    }

    /// Fragments written during silence (the recorder no longer waits for the close): an
    /// earlier fragment followed by its complete line counts once, and a destination that
    /// stalled in the middle of the split line's remainder still joins it.
    #[test]
    fn fragments_written_during_silence_are_joined_once() {
        let src = beats(1000, 1..=20)
            + &format!("{} P HB 2", 1205 * MS)
            + "\n"
            + &beats(1210, 21..=49)
            + &format!("{} P HB 5", 1600 * MS);
        let dst = format!("{} P 0 5\n", 1690 * MS)
            + &format!("{} L 0 500\n", 1695 * MS)
            + &beats(1700, 51..=60);
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!(m.split_line_joined);
        assert_eq!((m.last_source_seq, m.first_dest_seq), (Some(50), Some(51)));
        assert!(m.heartbeat_continuous, "{:?}", m.sequence_anomalies);
        assert_eq!(m.dest_heartbeats, 10);
    }

    #[test]
    fn split_status_line_is_joined_too() {
        let src = beats(0, 1..=5) + &format!("{} P STATUS seq=5 passes=3 writ", 90 * MS);
        let dst = format!("{} L es=1 wps=1 corrupt=0 ctl_mismatch=0\n", 200 * MS)
            + &beats(210, 6..=8)
            + &status(240, 8, 9, 0, 0);
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!(m.split_line_joined);
        assert_eq!(m.verify_passes_before, 3);
        assert_eq!(m.verify_passes_after, 6);
        assert!(m.heartbeat_continuous);
        assert_eq!(m.dest_first_heartbeat_ns, Some(210 * MS));
    }

    #[test]
    fn stale_stack_after_switchover_is_a_backwards_jump() {
        // The destination resumed with an old stack page: the sequence restarts at 40.
        let src = beats(0, 1..=50);
        let dst = beats(700, 40..=45) + "800000000 L CTLMISMATCH stack=1 bss=2\n";
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!(!m.heartbeat_continuous);
        assert_eq!(m.sequence_anomalies.len(), 1);
        let a = m.sequence_anomalies[0];
        assert_eq!((a.side, a.previous, a.next), (LogSide::Switchover, 50, 40));
        assert!(a.is_backwards());
        assert_eq!(m.control_mismatches, 1);
        assert!(!m.is_intact());
    }

    #[test]
    fn gaps_inside_either_log_break_continuity() {
        let src = beats(0, [1, 2, 4, 5]);
        let dst = beats(100, [6, 7, 8]);
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!(!m.heartbeat_continuous);
        assert_eq!(m.sequence_anomalies[0].side, LogSide::Source);

        let src = beats(0, 1..=5);
        let dst = beats(100, [6, 7, 9]);
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!(!m.heartbeat_continuous);
        assert_eq!(m.sequence_anomalies[0].side, LogSide::Destination);
    }

    #[test]
    fn corrupt_pages_are_summed_over_both_logs() {
        let src = beats(0, 1..=3) + "40000000 L CORRUPT page=1 expected=2 found=1\n";
        let dst = beats(100, 4..=6)
            + "170000000 L CORRUPT page=2 expected=2 found=1\n"
            + "171000000 L CORRUPT page=3 expected=2 found=1\n";
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert_eq!(m.corrupt_pages, 3);
        assert!(m.heartbeat_continuous);
        assert!(!m.is_intact());
    }

    #[test]
    fn post_copy_stall_shows_as_max_dest_gap() {
        let src = beats(0, 1..=5);
        let mut dst = beats(100, 6..=8); // 100, 110, 120 ms
        dst += &format!("{} L HB 9 90\n", 2120 * MS); // stalled 2 s
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::parse(&dst));
        assert!((m.max_dest_gap_ms - 2000.0).abs() < 1e-9);
        assert!(m.heartbeat_continuous);
    }

    #[test]
    fn cancelled_migration_has_no_switchover_or_blackout() {
        let src = beats(0, 1..=300) + &status(2990, 300, 12, 0, 0);
        let m = analyze_migration(&HostSerialLog::parse(&src), &HostSerialLog::default());
        assert!(!m.switched_over);
        assert_eq!(m.blackout_ms, None);
        assert_eq!(m.first_dest_seq, None);
        assert_eq!(m.last_source_seq, Some(300));
        assert!(m.heartbeat_continuous);
        assert_eq!((m.verify_passes_before, m.verify_passes_after), (12, 0));
        assert_eq!(m.max_dest_gap_ms, 0.0);
        assert!(!m.is_intact());
    }

    #[test]
    fn cancelled_with_trailing_fragment_and_garbage_dest_is_graceful() {
        let src = beats(0, 1..=3) + "99 P HB 4";
        let m = analyze_migration(
            &HostSerialLog::parse(&src),
            &HostSerialLog::parse("not a log line\n\u{0}\u{1}\n"),
        );
        assert!(!m.switched_over);
        assert!(!m.split_line_joined);
        assert_eq!(m.last_source_seq, Some(3));
    }

    #[test]
    fn empty_logs_do_not_panic() {
        let m = analyze_migration(&HostSerialLog::default(), &HostSerialLog::default());
        assert!(!m.switched_over);
        assert!(!m.heartbeat_continuous);
        let h = analyze_boot(&HostSerialLog::default());
        assert_eq!(h.heartbeats, 0);
    }
}
