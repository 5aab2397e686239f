//! How the admin pages show numbers, money, durations and instants (issue 21, item 4): counts
//! with thousands separators, costs as dollars with one precision per column (enough digits
//! for its smallest cost), durations in ms or s, instants in the page's zone with the exact
//! UTC instant kept for a tooltip.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// `90636158` → `90,636,158`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The decimals a column of costs (micro-dollars) is shown with: two (cents) when its smallest
/// non-zero cost is at least a cent, else enough for two significant digits of that cost (at
/// most six: the micro-dollar the costs are kept in).
pub fn money_decimals(micros: &[i64]) -> usize {
    let smallest = micros
        .iter()
        .map(|m| m.unsigned_abs())
        .filter(|m| *m > 0)
        .min();
    match smallest {
        Some(m) if m < 10_000 => {
            // m micro-dollars has its first significant digit at decimal 6 - ⌊log10 m⌋; one
            // more shows two significant digits.
            let magnitude = m.ilog10() as usize;
            (6 - magnitude + 1).clamp(2, 6)
        }
        _ => 2,
    }
}

/// `186270000` micro-dollars with 2 decimals → `$186.27`; thousands separated.
pub fn money(micros: i64, decimals: usize) -> String {
    let decimals = decimals.min(6);
    let scale = 10i64.pow(6 - decimals as u32);
    // Rounded half away from zero to the shown precision.
    let rounded = (micros.abs() + scale / 2) / scale;
    let unit = 10i64.pow(decimals as u32);
    let (whole, frac) = (rounded / unit, rounded % unit);
    let sign = if micros < 0 && rounded != 0 { "-" } else { "" };
    if decimals == 0 {
        format!("{sign}${}", thousands(whole))
    } else {
        format!("{sign}${}.{frac:0decimals$}", thousands(whole))
    }
}

/// A duration in seconds as people read it: `850 ms`, `1.23 s`, `12.4 s`, `2 min 05 s`.
pub fn duration(sec: f64) -> String {
    if !sec.is_finite() || sec < 0.0 {
        return "–".to_owned();
    }
    if sec < 1.0 {
        let ms = sec * 1e3;
        return if ms < 10.0 {
            format!("{ms:.1} ms")
        } else {
            format!("{ms:.0} ms")
        };
    }
    if sec < 10.0 {
        return format!("{sec:.2} s");
    }
    if sec < 60.0 {
        return format!("{sec:.1} s");
    }
    let whole = sec.round() as u64;
    format!("{} min {:02} s", whole / 60, whole % 60)
}

/// An instant shown in `tz` to the second (`2026-11-26 15:04:05`), and its exact UTC form
/// for a tooltip (`2026-11-26T14:04:05.123456Z`).
pub fn instant(t: DateTime<Utc>, tz: Tz) -> (String, String) {
    (
        t.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S").to_string(),
        t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    )
}

/// A share as a percentage with one decimal (`12.5 %`), or `–` when the whole is zero.
pub fn share(part: i64, whole: i64) -> String {
    if whole == 0 {
        return "–".to_owned();
    }
    format!("{:.1} %", part as f64 * 100.0 / whole as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn counts_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(90_636_158), "90,636,158");
        assert_eq!(thousands(-1_234_567), "-1,234,567");
        assert_eq!(thousands(i64::MIN), "-9,223,372,036,854,775,808");
    }

    #[test]
    fn money_has_one_precision_per_column() {
        assert_eq!(money_decimals(&[186_270_000, 1_880_000]), 2);
        assert_eq!(money_decimals(&[]), 2);
        assert_eq!(money_decimals(&[0, 0]), 2);
        // $0.00188 shows two significant digits with 4 decimals.
        assert_eq!(money_decimals(&[186_270_000, 1_880]), 4);
        assert_eq!(money_decimals(&[1]), 6);
        assert_eq!(money_decimals(&[50_000, 10_000]), 2);
        assert_eq!(money_decimals(&[5_000]), 4);
        assert_eq!(money_decimals(&[999]), 5);
        assert_eq!(money(186_270_000, 2), "$186.27");
        assert_eq!(money(1_880, 4), "$0.0019");
        assert_eq!(money(186_270_000, 4), "$186.2700");
        assert_eq!(money(1, 6), "$0.000001");
        assert_eq!(money(1_234_567_890_000, 2), "$1,234,567.89");
        assert_eq!(money(0, 2), "$0.00");
        assert_eq!(money(4_999, 2), "$0.00");
        assert_eq!(money(5_000, 2), "$0.01");
        assert_eq!(money(-1_500_000, 2), "-$1.50");
    }

    #[test]
    fn durations_read_in_ms_or_s() {
        assert_eq!(duration(0.0042), "4.2 ms");
        assert_eq!(duration(0.85), "850 ms");
        assert_eq!(duration(1.234), "1.23 s");
        assert_eq!(duration(12.44), "12.4 s");
        assert_eq!(duration(125.0), "2 min 05 s");
        assert_eq!(duration(-1.0), "–");
    }

    #[test]
    fn instants_show_in_the_zone_with_the_exact_utc_kept() {
        let t = Utc.with_ymd_and_hms(2026, 11, 26, 14, 4, 5).unwrap()
            + chrono::Duration::microseconds(123_456);
        let (shown, exact) = instant(t, "Asia/Kolkata".parse().unwrap());
        assert_eq!(shown, "2026-11-26 19:34:05");
        assert_eq!(exact, "2026-11-26T14:04:05.123456Z");
        assert_eq!(share(1, 8), "12.5 %");
        assert_eq!(share(1, 0), "–");
    }
}
