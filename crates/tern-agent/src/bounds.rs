//! Numeric bounds of every number a client may send, checked with the same functions by the
//! CLI (when it parses flags) and by the agent (when it parses a request), so both refuse the
//! same values with the same words. Pure: no I/O.

use crate::AgentError;

/// The slowest rate tern accepts for a migration stream or link: 8 kbit/s (1,000 bytes/s).
/// Below it even an idle 64 MiB guest would take more than 18 hours.
pub const MIN_BYTES_PER_S: u64 = 1_000;
/// The fastest: 400 gbit/s (50 GB/s), beyond any NIC QEMU's migration stream can fill.
pub const MAX_BYTES_PER_S: u64 = 50_000_000_000;
/// The longest deadline a must-finish migration may be given: one week.
pub const MAX_DEADLINE_S: u64 = 7 * 24 * 3600;
/// Guest memory bounds (MiB), as [`tern_qemu::VmSpec::validate`] enforces them.
pub const MIN_MEMORY_MIB: u64 = 64;
/// 4 TiB.
pub const MAX_MEMORY_MIB: u64 = 4 << 20;

/// Checks a rate in bytes per second (`what` names it: "bandwidth", "link rate").
pub fn check_bandwidth(what: &str, bytes_per_s: u64) -> Result<u64, AgentError> {
    if !(MIN_BYTES_PER_S..=MAX_BYTES_PER_S).contains(&bytes_per_s) {
        return Err(AgentError::Invalid(format!(
            "{what} {bytes_per_s} B/s is out of range: give 1000 to 50000000000 bytes per second \
             (8 kbit/s to 400 gbit/s)"
        )));
    }
    Ok(bytes_per_s)
}

/// Checks a deadline in seconds.
pub fn check_deadline_s(s: u64) -> Result<u64, AgentError> {
    if s == 0 || s > MAX_DEADLINE_S {
        return Err(AgentError::Invalid(format!(
            "deadline {s} s is invalid: give a deadline > 0 and at most {MAX_DEADLINE_S} s (one week)"
        )));
    }
    Ok(s)
}

/// Checks a deadline in milliseconds (the in-process order's unit).
pub fn check_deadline_ms(ms: u64) -> Result<u64, AgentError> {
    if ms == 0 || ms > MAX_DEADLINE_S * 1000 {
        return Err(AgentError::Invalid(format!(
            "deadline {ms} ms is invalid: give a deadline > 0 and at most {MAX_DEADLINE_S} s (one week)"
        )));
    }
    Ok(ms)
}

/// Parses guest memory: a number of MiB (`256`) or a size with a unit (`512M`, `1G`,
/// `1GiB`, `2T`); binary units, case-insensitive.
pub fn parse_memory_mib(text: &str) -> Result<u64, AgentError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        AgentError::Invalid(format!(
            "memory {text:?} is invalid: give MiB (256) or a size with a unit (512M, 1G, 1GiB)"
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(bad()),
    };
    check_memory_mib(n.checked_mul(factor).ok_or_else(bad)?)
}

/// Checks guest memory in MiB.
pub fn check_memory_mib(mib: u64) -> Result<u64, AgentError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(AgentError::Invalid(format!(
            "memory {mib} MiB is out of range: give {MIN_MEMORY_MIB} MiB to 4 TiB"
        )));
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_bounds_are_8_kbit_to_400_gbit() {
        assert!(check_bandwidth("bandwidth", 1_000).is_ok());
        assert!(check_bandwidth("bandwidth", 50_000_000_000).is_ok());
        let e = check_bandwidth("bandwidth", 1).unwrap_err().to_string();
        assert!(
            e.contains("bandwidth 1 B/s") && e.contains("8 kbit/s"),
            "{e}"
        );
        assert!(check_bandwidth("bandwidth", 50_000_000_001).is_err());
        assert!(check_bandwidth("bandwidth", 0).is_err());
    }

    #[test]
    fn deadlines_must_be_positive() {
        assert!(check_deadline_s(1).is_ok());
        let e = check_deadline_s(0).unwrap_err().to_string();
        assert!(e.contains("deadline 0 s") && e.contains("> 0"), "{e}");
        assert!(check_deadline_s(MAX_DEADLINE_S + 1).is_err());
        assert!(check_deadline_ms(0).is_err());
        assert_eq!(check_deadline_ms(1500).unwrap(), 1500);
    }

    #[test]
    fn memory_takes_units() {
        assert_eq!(parse_memory_mib("256").unwrap(), 256);
        assert_eq!(parse_memory_mib("512M").unwrap(), 512);
        assert_eq!(parse_memory_mib("1G").unwrap(), 1024);
        assert_eq!(parse_memory_mib("1GiB").unwrap(), 1024);
        assert_eq!(parse_memory_mib("2g").unwrap(), 2048);
        for bad in ["", "G", "1X", "-1", "1.5G", "32"] {
            let e = parse_memory_mib(bad).unwrap_err().to_string();
            assert!(e.contains("memory"), "{bad}: {e}");
        }
        assert!(parse_memory_mib("5T").is_err());
        assert!(parse_memory_mib("99999999999999999999G").is_err());
    }
}
