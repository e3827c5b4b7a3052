//! Post-copy after a link-down, decided by the same [`PostcopySupervisor`] the engine runs.
//!
//! The simulator does not model the supervisor's polls one by one: it asks the supervisor at
//! each of its deadlines (a due attempt, the window's end), which is when the engine's 250 ms
//! polls would first see a decision change, give or take one poll.

pub use tern_policy::PostcopyTimings;
use tern_policy::{PostcopyAction, PostcopyObservation, PostcopyStatus, PostcopySupervisor};

/// When post-copy runs again after the link went down at `down_ms` and came back at
/// `back_ms` (ms since the start), or `None` if the supervisor gave up first (stranded).
///
/// A link that is down makes sockets fail at once, so QEMU enters `postcopy-paused` at
/// `down_ms` and every recovery attempt before `back_ms` fails immediately (connection
/// refused); the first attempt at or after `back_ms` succeeds after `recover_ms`.
pub fn recovery_after_link_down(
    down_ms: u64,
    back_ms: u64,
    recover_ms: u64,
    timings: PostcopyTimings,
) -> Option<u64> {
    let mut supervisor = PostcopySupervisor::new(timings);
    let mut at = down_ms;
    loop {
        let poll = PostcopyObservation::Poll {
            at_ms: at,
            status: PostcopyStatus::Paused,
            transferred_bytes: 0,
            remaining_bytes: 1,
        };
        for d in supervisor.observe(&poll) {
            match d.action {
                PostcopyAction::Recover { .. } if at >= back_ms => {
                    return Some(at + recover_ms);
                }
                PostcopyAction::Recover { .. } => {
                    supervisor.observe(&PostcopyObservation::RecoveryAttemptFailed {
                        at_ms: at,
                        reason: "link down: connection refused".into(),
                    });
                }
                PostcopyAction::GiveUpStranded { .. } => return None,
                _ => {}
            }
        }
        at = supervisor.next_deadline_ms()?.max(at + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_follows_the_backoff_and_the_window() {
        let t = PostcopyTimings::default();
        // Attempts every 250 ms while the outage is younger than the 2 s stall timeout: the
        // link is back at 3000, so the attempt at 3000 succeeds, 100 ms later.
        assert_eq!(recovery_after_link_down(1_000, 3_000, 100, t), Some(3_100));
        // Past the stall timeout the backoff starts: 3000, 3500, 4500, 6500 …
        assert_eq!(recovery_after_link_down(1_000, 4_600, 100, t), Some(6_600));
        // Back before the first attempt: recovered at once.
        assert_eq!(recovery_after_link_down(1_000, 1_000, 100, t), Some(1_100));
        // Longer than the window: stranded.
        let short = PostcopyTimings {
            recovery_window_ms: 10_000,
            ..t
        };
        assert_eq!(recovery_after_link_down(0, 60_000, 100, short), None);
    }

    /// Issue 14: a link cut shorter than the stall timeout stalls the guest at most the cut +
    /// 0.5 s (here: + one 250 ms retry + the 100 ms recovery handshake).
    #[test]
    fn a_short_cut_costs_at_most_the_cut_plus_half_a_second() {
        let t = PostcopyTimings::default();
        let mut worst_extra = 0;
        for cut in (50..t.stall_timeout_ms).step_by(50) {
            for down in [0, 1_000, 7_333] {
                let resumed = recovery_after_link_down(down, down + cut, 100, t)
                    .expect("a short cut never strands");
                let stall = resumed - down;
                assert!(
                    stall <= cut + 500,
                    "cut {cut} ms at {down}: stall {stall} ms"
                );
                worst_extra = worst_extra.max(stall - cut);
            }
        }
        assert!(worst_extra <= 350, "worst extra stall {worst_extra} ms");
    }
}
