//! Link rates as `tc` understands them ("1gbit", "300mbit", "100mbps").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Examples of valid link rates, shown in every parse error so a user can fix the value at once.
pub const LINK_RATE_EXAMPLES: &str =
    "\"1gbit\", \"300mbit\", \"500kbit\", \"100mbps\" (bytes/s), \"2.5gbit\", \"1000000\" (bit/s)";

/// Slowest rate we accept: below this `tbf` needs bursts smaller than one Ethernet frame.
pub const MIN_LINK_RATE_BITS: u64 = 8_000;
/// Fastest rate we accept: far above what a veth pair moves on these machines, so larger values are
/// almost certainly typos (a missing unit) rather than intent.
pub const MAX_LINK_RATE_BITS: u64 = 400_000_000_000;

/// A link's bandwidth in bits per second.
///
/// The text form follows `tc`'s units (`tc(8)` "RATES"): `bit`, `kbit`, `mbit`, `gbit`, `tbit` are
/// decimal bits per second; `bps`, `kbps`, `mbps`, `gbps` are *bytes* per second (the classic tc
/// trap: "100mbps" is 800 Mbit/s); a plain number is bits per second. Units are case-insensitive and
/// may have a fractional part ("2.5gbit"). [`Display`](fmt::Display) writes the largest exact bit
/// unit, so `parse(display(r)) == r` for every rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LinkRate {
    bits_per_sec: u64,
}

/// Why a link rate was refused; the message names the value and shows valid examples.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid link rate {value:?}: {reason}; valid examples: {LINK_RATE_EXAMPLES}")]
pub struct LinkRateError {
    /// The text (or number) that was refused.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl LinkRate {
    /// A rate of `bits_per_sec`, checked against [`MIN_LINK_RATE_BITS`]..=[`MAX_LINK_RATE_BITS`].
    pub fn from_bits_per_sec(bits_per_sec: u64) -> Result<Self, LinkRateError> {
        if !(MIN_LINK_RATE_BITS..=MAX_LINK_RATE_BITS).contains(&bits_per_sec) {
            return Err(LinkRateError {
                value: format!("{bits_per_sec}bit"),
                reason: format!(
                    "must be between {} and {}",
                    LinkRate {
                        bits_per_sec: MIN_LINK_RATE_BITS
                    },
                    LinkRate {
                        bits_per_sec: MAX_LINK_RATE_BITS
                    }
                ),
            });
        }
        Ok(LinkRate { bits_per_sec })
    }

    /// Rate in bits per second (what `tc` is given).
    pub fn bits_per_sec(self) -> u64 {
        self.bits_per_sec
    }

    /// Rate in bytes per second (what migration bandwidth settings such as QEMU's `max-bandwidth`
    /// are expressed in).
    pub fn bytes_per_sec(self) -> u64 {
        self.bits_per_sec / 8
    }
}

/// Units accepted after the number, with their multiplier to bits per second.
const UNITS: &[(&str, u64)] = &[
    ("tbit", 1_000_000_000_000),
    ("gbit", 1_000_000_000),
    ("mbit", 1_000_000),
    ("kbit", 1_000),
    ("bit", 1),
    ("gbps", 8_000_000_000),
    ("mbps", 8_000_000),
    ("kbps", 8_000),
    ("bps", 8),
];

impl FromStr for LinkRate {
    type Err = LinkRateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| LinkRateError {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let text = s.trim().to_ascii_lowercase();
        if text.is_empty() {
            return Err(err("empty"));
        }
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(err("must start with a number"));
        }
        let multiplier = if unit.is_empty() {
            1
        } else {
            match UNITS.iter().find(|(name, _)| *name == unit) {
                Some((_, m)) => *m,
                None => {
                    return Err(err(&format!(
                        "unknown unit {unit:?} (use bit, kbit, mbit, gbit, tbit, or bps, kbps, mbps, gbps for bytes/s)"
                    )));
                }
            }
        };
        let bits = scale_decimal(number, multiplier).ok_or_else(|| err("not a valid number"))?;
        LinkRate::from_bits_per_sec(bits).map_err(|e| err(&e.reason))
    }
}

/// `number` (digits with at most one '.') times `multiplier`, exactly, or `None` when malformed,
/// not a whole number of bits per second, or overflowing.
fn scale_decimal(number: &str, multiplier: u64) -> Option<u64> {
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if frac_part.contains('.') || frac_part.len() > 12 {
        return None;
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    let mut total = int.checked_mul(multiplier)?;
    if !frac_part.is_empty() {
        let frac: u128 = frac_part.parse().ok()?;
        let denom = 10u128.pow(frac_part.len() as u32);
        let scaled = frac * u128::from(multiplier);
        if scaled % denom != 0 {
            return None;
        }
        total = total.checked_add(u64::try_from(scaled / denom).ok()?)?;
    }
    Some(total)
}

impl fmt::Display for LinkRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, m) in UNITS.iter().filter(|(name, _)| name.ends_with("bit")) {
            if self.bits_per_sec % m == 0 {
                return write!(f, "{}{}", self.bits_per_sec / m, name);
            }
        }
        write!(f, "{}bit", self.bits_per_sec)
    }
}

impl TryFrom<String> for LinkRate {
    type Error = LinkRateError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<LinkRate> for String {
    fn from(rate: LinkRate) -> String {
        rate.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> u64 {
        s.parse::<LinkRate>().unwrap().bits_per_sec()
    }

    #[test]
    fn parses_bit_units() {
        assert_eq!(bits("1gbit"), 1_000_000_000);
        assert_eq!(bits("300mbit"), 300_000_000);
        assert_eq!(bits("500kbit"), 500_000);
        assert_eq!(bits("1000000"), 1_000_000);
        assert_eq!(bits("64000bit"), 64_000);
        assert_eq!(bits("10GBit"), 10_000_000_000);
        assert_eq!(bits(" 2.5gbit "), 2_500_000_000);
        assert_eq!(bits(".5gbit"), 500_000_000);
    }

    #[test]
    fn bps_units_are_bytes() {
        assert_eq!(bits("100mbps"), 800_000_000);
        assert_eq!(bits("1gbps"), 8_000_000_000);
        assert_eq!(bits("10kbps"), 80_000);
        assert_eq!(
            "100mbps".parse::<LinkRate>().unwrap().bytes_per_sec(),
            100_000_000
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "1gbit", "300mbit", "500kbit", "1500mbit", "10gbit", "8001bit", "2500mbit",
        ] {
            let r: LinkRate = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
            assert_eq!(r.to_string().parse::<LinkRate>().unwrap(), r);
        }
        assert_eq!(
            "100mbps".parse::<LinkRate>().unwrap().to_string(),
            "800mbit"
        );
        assert_eq!(
            "2.5gbit".parse::<LinkRate>().unwrap().to_string(),
            "2500mbit"
        );
    }

    #[test]
    fn errors_name_value_and_show_examples() {
        for bad in [
            "",
            "fast",
            "1gbyte",
            "mbit",
            "1.2.3mbit",
            "-5mbit",
            "0",
            "1bit",
            "999tbit",
            "0.0000001bit",
        ] {
            let e = bad.parse::<LinkRate>().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.contains("300mbit"), "{msg}");
        }
        let e = "1gbyte".parse::<LinkRate>().unwrap_err();
        assert!(e.reason.contains("unknown unit \"gbyte\""), "{e}");
        let e = "0".parse::<LinkRate>().unwrap_err();
        assert!(e.reason.contains("between"), "{e}");
    }

    #[test]
    fn serde_uses_text_form() {
        let r: LinkRate = "300mbit".parse().unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"300mbit\"");
        assert_eq!(
            serde_json::from_str::<LinkRate>("\"100mbps\"").unwrap(),
            "800mbit".parse().unwrap()
        );
        assert!(serde_json::from_str::<LinkRate>("\"lots\"").is_err());
    }

    #[test]
    fn bounds() {
        assert!(LinkRate::from_bits_per_sec(MIN_LINK_RATE_BITS).is_ok());
        assert!(LinkRate::from_bits_per_sec(MIN_LINK_RATE_BITS - 1).is_err());
        assert!(LinkRate::from_bits_per_sec(MAX_LINK_RATE_BITS).is_ok());
        assert!(LinkRate::from_bits_per_sec(MAX_LINK_RATE_BITS + 1).is_err());
    }
}
