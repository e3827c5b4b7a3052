//! `tc` configuration of one link end: rate limit (tbf), delay (netem, where it exists), cut.

use std::time::Duration;

use crate::cmd::tc_in;
use crate::error::LabError;
use crate::lab::netem_available;
use crate::rate::LinkRate;

/// Token bucket depth, as time at line rate. tbf sends at most `burst` bytes back to back; it has
/// to cover the qdisc watchdog's wake-up jitter or the link runs below its rate (a 1 ms bucket
/// at 1 Gbit/s is 125 kB).
const BURST_TIME_US: u64 = 2_000;
/// Smallest bucket: veth passes GSO super-packets of up to 64 KiB; a bucket smaller than one of
/// them makes tbf split every packet in software, which costs more CPU than the 2 cores can spare.
const MIN_BURST_BYTES: u64 = 96 * 1024;
/// Queue behind the bucket, as time at line rate: enough for one TCP stream to keep the link busy
/// (the namespaces' RTT is tens of microseconds) without adding bufferbloat a migration would
/// notice.
const QUEUE_TIME_US: u64 = 20_000;

/// tbf `burst` and `limit` in bytes for `rate`.
pub(crate) fn tbf_params(rate: LinkRate) -> (u64, u64) {
    let bytes = rate.bytes_per_sec();
    let burst = (bytes * BURST_TIME_US / 1_000_000).max(MIN_BURST_BYTES);
    let limit = burst + (bytes * QUEUE_TIME_US / 1_000_000).max(MIN_BURST_BYTES);
    (burst, limit)
}

/// Fails with a clear message when a delay is asked for and the kernel has no netem.
pub(crate) fn require_netem(delay: Duration) -> Result<(), LabError> {
    if netem_available() {
        Ok(())
    } else {
        Err(LabError::NetemUnavailable {
            delay_ms: delay.as_millis(),
        })
    }
}

/// Kind of the root qdisc on `dev` ("noqueue" when nothing is configured on a veth).
pub(crate) fn root_qdisc_kind(netns: &str, dev: &str) -> Result<String, LabError> {
    let out = tc_in(netns, &["qdisc", "show", "dev", dev, "root"])?;
    Ok(out
        .lines()
        .find(|l| l.contains(" root"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("noqueue")
        .to_string())
}

/// Makes `dev` drop every packet it would send: the kernel's `blackhole` qdisc (always built with
/// CONFIG_NET_SCHED) reports success to the sender and frees the packet, so nothing upstream
/// notices. Falls back to a zero-length pfifo where `blackhole` is refused.
pub(crate) fn blackhole(netns: &str, dev: &str) -> Result<(), LabError> {
    match tc_in(
        netns,
        &["qdisc", "replace", "dev", dev, "root", "blackhole"],
    ) {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::debug!(error = %e, "blackhole qdisc refused; using pfifo limit 0");
            tc_in(
                netns,
                &[
                    "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0",
                ],
            )
            .map(|_| ())
        }
    }
}

/// Configures `dev`'s egress for `rate`/`delay`, replacing whatever was there (a blackhole cut
/// included). With neither, the root qdisc is removed and the veth is back to `noqueue`.
pub(crate) fn apply(
    netns: &str,
    dev: &str,
    rate: Option<LinkRate>,
    delay: Option<Duration>,
) -> Result<(), LabError> {
    let current = root_qdisc_kind(netns, dev)?;
    // A netem child under tbf (or netem at the root) cannot be turned into tbf by `replace`;
    // start from a clean root whenever the shape of the tree changes.
    let want = match (rate, delay) {
        (Some(_), _) => "tbf",
        (None, Some(_)) => "netem",
        (None, None) => "noqueue",
    };
    if current != "noqueue" && (current != want || delay.is_some()) {
        tc_in(netns, &["qdisc", "del", "dev", dev, "root"])?;
    }
    if let Some(rate) = rate {
        let (burst, limit) = tbf_params(rate);
        tc_in(
            netns,
            &[
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "handle",
                "1:",
                "tbf",
                "rate",
                &format!("{}bit", rate.bits_per_sec()),
                "burst",
                &burst.to_string(),
                "limit",
                &limit.to_string(),
            ],
        )?;
    }
    if let Some(delay) = delay {
        let us = format!("{}us", delay.as_micros());
        let parent: &[&str] = if rate.is_some() {
            &["parent", "1:1", "handle", "10:"]
        } else {
            &["root", "handle", "1:"]
        };
        let mut args = vec!["qdisc", "add", "dev", dev];
        args.extend_from_slice(parent);
        args.extend_from_slice(&["netem", "delay", &us, "limit", "100000"]);
        tc_in(netns, &args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tbf_params_scale_with_rate() {
        let r = |s: &str| s.parse::<LinkRate>().unwrap();
        let (b10, l10) = tbf_params(r("10mbit"));
        assert_eq!(b10, MIN_BURST_BYTES);
        assert!(l10 > b10);
        let (b1g, l1g) = tbf_params(r("1gbit"));
        assert_eq!(b1g, 250_000);
        assert_eq!(l1g, 250_000 + 2_500_000);
        let (b10g, _) = tbf_params(r("10gbit"));
        assert_eq!(b10g, 2_500_000);
    }
}
