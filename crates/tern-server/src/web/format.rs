//! Small pure formatting helpers of the web view: HTML escaping, sizes, rates, durations and
//! times (UTC, as the controller's logs and events are).

/// `s` escaped for HTML text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Bytes as B, KiB, MiB or GiB with one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A rate in bytes/s as MB/s (decimal, as link rates are quoted).
pub fn rate(bytes_per_s: u64) -> String {
    format!("{:.1} MB/s", bytes_per_s as f64 / 1e6)
}

/// Seconds as `42 s`, `3 m 05 s` or `1 h 02 m`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "—".into();
    }
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{seconds:.1} s"),
        60..3600 => format!("{} m {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} m", s / 3600, (s % 3600) / 60),
    }
}

/// Wall-clock ms since the epoch as `HH:MM:SS` UTC.
pub fn clock(wall_ms: u64) -> String {
    let s = (wall_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_neutralises_markup_in_names_and_reasons() {
        assert_eq!(
            esc(r#"<script>"a" & 'b'</script>"#),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
        assert_eq!(esc("plain-vm_1"), "plain-vm_1");
    }

    #[test]
    fn sizes_rates_durations_and_clocks_read_as_operators_expect() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(bytes(8 << 30), "8.0 GiB");
        assert_eq!(rate(125_000_000), "125.0 MB/s");
        assert_eq!(duration(4.25), "4.2 s");
        assert_eq!(duration(185.0), "3 m 05 s");
        assert_eq!(duration(3720.0), "1 h 02 m");
        assert_eq!(duration(f64::NAN), "—");
        assert_eq!(duration(-1.0), "—");
        assert_eq!(clock(86_400_000 + 3_723_000), "01:02:03");
    }
}
