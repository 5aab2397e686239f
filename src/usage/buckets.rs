//! Local time buckets of the series: which bucket an instant falls in, its label, and every
//! bucket of a range (zero fill). Pure functions over chrono-tz: SQL only groups rows by UTC
//! time (a UTC hour, day or month, or a 15-minute UTC slot when a time zone is asked for), so
//! both backends give the same buckets, DST and :30/:45 offsets included.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Timelike, Utc};
use chrono_tz::Tz;

use super::filters::day_start;
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::dialect::Trunc;

/// Series granularity: `day` → hourly buckets, `month` → daily, `year` → monthly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Day,
    Month,
    Year,
}

impl Granularity {
    /// Case-insensitive, trimmed; `None` for anything else.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            "year" => Some(Self::Year),
            _ => None,
        }
    }

    /// The UTC unit of the series' buckets (hourly, daily, monthly).
    pub(crate) fn trunc(self) -> Trunc {
        match self {
            Self::Day => Trunc::Hour,
            Self::Month => Trunc::Day,
            Self::Year => Trunc::Month,
        }
    }
}

/// At most this many buckets in a zero-filled series.
pub const MAX_BUCKETS: usize = 10_000;

/// One bucket: the instant it starts, and its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub label: String,
}

/// `t` in `tz` as `%Y-%m-%dT%H:%M:%S%:z`, written out by hand where that is the same text (a
/// year of four digits, an offset of whole minutes): chrono parses the format string on every
/// call, which was a tenth of an hourly year's series (8,760 labels), and `write!` with widths
/// most of the rest.
fn with_offset(tz: Tz, t: DateTime<Utc>) -> String {
    use chrono::Offset;
    // (In UTC without a zone lookup: an hourly year writes 8,760 labels.)
    let (local, offset) = if tz == Tz::UTC {
        (t.naive_utc(), 0)
    } else {
        let local = t.with_timezone(&tz);
        (local.naive_local(), local.offset().fix().local_minus_utc())
    };
    if !(0..=9999).contains(&local.year()) || offset % 60 != 0 {
        return t
            .with_timezone(&tz)
            .format("%Y-%m-%dT%H:%M:%S%:z")
            .to_string();
    }
    let (sign, minutes) = if offset < 0 {
        (b'-', -offset / 60)
    } else {
        (b'+', offset / 60)
    };
    // Digit by digit: `write!` with widths was most of an hourly year's label time (8,760
    // labels). `labels_are_chrono_s_text` holds it to chrono's text.
    let mut out = [0u8; 25];
    let two = |at: &mut [u8], v: u32| {
        at[0] = b'0' + (v / 10 % 10) as u8;
        at[1] = b'0' + (v % 10) as u8;
    };
    // (0..=9999 checked above.)
    let year = local.year() as u32;
    two(&mut out[0..2], year / 100);
    two(&mut out[2..4], year % 100);
    out[4] = b'-';
    two(&mut out[5..7], local.month());
    out[7] = b'-';
    two(&mut out[8..10], local.day());
    out[10] = b'T';
    two(&mut out[11..13], local.hour());
    out[13] = b':';
    two(&mut out[14..16], local.minute());
    out[16] = b':';
    two(&mut out[17..19], local.second());
    out[19] = sign;
    // Offsets are within ±26 hours.
    two(&mut out[20..22], (minutes / 60) as u32);
    out[22] = b':';
    two(&mut out[23..25], (minutes % 60) as u32);
    String::from_utf8(out.to_vec()).unwrap_or_default()
}

/// Where the bucket that starts at `start` should end: the hour, day or month after it. Only a
/// guess where an offset changes by half an hour (an hour then lasts 30 or 90 minutes, and
/// buckets may even overlap): the caller checks it. `None` past chrono's range.
pub fn next_bucket_guess(g: Granularity, tz: Tz, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = start.with_timezone(&tz).date_naive();
    Some(match g {
        Granularity::Day => bucket_start(g, tz, start.checked_add_signed(Duration::hours(1))?),
        Granularity::Month => day_start(tz, local.succ_opt()?),
        Granularity::Year => day_start(
            tz,
            month_start(local).checked_add_months(chrono::Months::new(1))?,
        ),
    })
}

fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).unwrap_or(d)
}

/// The start of the bucket of `t` (as [`bucket_of`], without formatting its label).
pub fn bucket_start(g: Granularity, tz: Tz, t: DateTime<Utc>) -> DateTime<Utc> {
    // The start of the hour of `t` `into` seconds past its start, in whole seconds: integer
    // arithmetic (chrono's `Duration` subtraction was a tenth of the server's time for a dense
    // user's hourly year, whose plan asks tens of thousands of times).
    let back = |into: i64| DateTime::from_timestamp(t.timestamp() - into, 0).unwrap_or(t);
    if tz == Tz::UTC && g == Granularity::Day {
        // A UTC hour, without a zone lookup (an hourly year's plan and fold ask 8,760 times
        // each): the same arithmetic as below with no offset.
        return back(t.timestamp().rem_euclid(3600));
    }
    match g {
        Granularity::Day => {
            // The local hour's start: `t` less its seconds into the local hour, which are its
            // UTC seconds plus the offset, modulo an hour (any offset, seconds included). One
            // offset lookup and no local date and time built (that was a fifth of the server's
            // time for an hourly year in Nepal, whose plan, fold and labels ask per hour).
            use chrono::{Offset, TimeZone};
            let offset = tz.offset_from_utc_datetime(&t.naive_utc()).fix();
            back((t.timestamp() + i64::from(offset.local_minus_utc())).rem_euclid(3600))
        }
        Granularity::Month => day_start(tz, t.with_timezone(&tz).date_naive()),
        Granularity::Year => day_start(tz, month_start(t.with_timezone(&tz).date_naive())),
    }
}

/// [`bucket_start`] of the instant `seconds` (UTC epoch seconds) in epoch seconds: UTC hours
/// and days by arithmetic alone, other buckets through [`bucket_start`]. An instant outside
/// chrono's range is its own start.
pub fn bucket_start_seconds(g: Granularity, tz: Tz, seconds: i64) -> i64 {
    match (tz, g) {
        (Tz::UTC, Granularity::Day) => seconds - seconds.rem_euclid(3600),
        (Tz::UTC, Granularity::Month) => seconds - seconds.rem_euclid(86_400),
        // The local hour's start in seconds: one offset lookup, no `DateTime` made of the
        // result (an hourly year's plan and fold ask ~45,000 times outside UTC).
        (_, Granularity::Day) => offset_at(tz, seconds)
            .map(|offset| seconds - (seconds + i64::from(offset)).rem_euclid(3600))
            .filter(|start| in_chrono_range(*start))
            .unwrap_or(seconds),
        _ => DateTime::from_timestamp(seconds, 0)
            .map_or(seconds, |t| bucket_start(g, tz, t).timestamp()),
    }
}

/// A number naming the bucket of the instant `seconds` (UTC epoch seconds): two instants have
/// the same key exactly when [`bucket_start_seconds`] gives them the same start. Outside UTC a
/// daily or monthly bucket's start is a function of the local date (or month) alone, and two
/// local dates that occur start at two different instants (each date's start is an instant of
/// that date), so the key is the local day number (or month) — one offset lookup, not the
/// local midnight turned back into an instant (the plan of a dense user's daily year in New
/// York asked ~17,000 times whether an hour fits its day: half of the server's time). Hourly
/// buckets and UTC: the start itself.
pub fn bucket_key(g: Granularity, tz: Tz, seconds: i64) -> i64 {
    let local_day = || {
        let local = seconds.checked_add(i64::from(offset_at(tz, seconds)?))?;
        Some(local.div_euclid(86_400))
    };
    let key = match (tz, g) {
        (Tz::UTC, _) | (_, Granularity::Day) => None,
        (_, Granularity::Month) => local_day(),
        (_, Granularity::Year) => local_day()
            .and_then(|day| DateTime::from_timestamp(day.checked_mul(86_400)?, 0))
            .map(|t| i64::from(t.year()) * 12 + i64::from(t.month0())),
    };
    // (An instant chrono cannot place, beyond ±262,000 years, is keyed by its own start: far
    // from any local day number or month.)
    key.unwrap_or_else(|| bucket_start_seconds(g, tz, seconds))
}

/// The UTC offset of `tz` at the instant `seconds` (UTC epoch seconds), in seconds; `None`
/// outside chrono's range.
fn offset_at(tz: Tz, seconds: i64) -> Option<i32> {
    use chrono::{Offset, TimeZone};
    let t = DateTime::from_timestamp(seconds, 0)?;
    Some(
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc(),
    )
}

/// Whether the instant `seconds` (UTC epoch seconds) is within chrono's range.
pub(crate) fn in_chrono_range(seconds: i64) -> bool {
    const RANGE: std::ops::RangeInclusive<i64> =
        DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp();
    RANGE.contains(&seconds)
}

/// [`label_at`] of the bucket starting at `seconds` (UTC epoch seconds).
pub fn label_at_seconds(g: Granularity, tz: Tz, seconds: i64) -> String {
    DateTime::from_timestamp(seconds, 0)
        .map(|t| label_at(g, tz, t))
        .unwrap_or_default()
}

/// The bucket of `t`: `day` → the local hour (`2024-03-10T03:00:00-04:00`, the repeated
/// autumn hour once per offset), `month` → the local date (`2024-03-10`), `year` → the local
/// month (`2024-03-01T00:00:00-05:00`). In UTC these are SPEC §5's labels.
pub fn bucket_of(g: Granularity, tz: Tz, t: DateTime<Utc>) -> Bucket {
    let local = t.with_timezone(&tz);
    match g {
        Granularity::Day => {
            let into_hour = Duration::seconds(i64::from(local.minute() * 60 + local.second()))
                + Duration::nanoseconds(i64::from(local.nanosecond()));
            let start = t - into_hour;
            Bucket {
                start,
                label: with_offset(tz, start),
            }
        }
        Granularity::Month => {
            let d = local.date_naive();
            Bucket {
                start: day_start(tz, d),
                label: d.format("%Y-%m-%d").to_string(),
            }
        }
        Granularity::Year => {
            let start = day_start(tz, month_start(local.date_naive()));
            Bucket {
                start,
                label: with_offset(tz, start),
            }
        }
    }
}

/// The label of the bucket that starts at `start` (a [`bucket_start`]): [`bucket_of`]'s, with
/// one time-zone conversion instead of two.
pub fn label_at(g: Granularity, tz: Tz, start: DateTime<Utc>) -> String {
    match g {
        Granularity::Day | Granularity::Year => with_offset(tz, start),
        Granularity::Month => start
            .with_timezone(&tz)
            .date_naive()
            .format("%Y-%m-%d")
            .to_string(),
    }
}

/// Every bucket from the one holding `start` to the one holding `end`, in order; `Err` with
/// the count when that is more than [`MAX_BUCKETS`].
pub fn buckets_between(
    g: Granularity,
    tz: Tz,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<Bucket>, u64> {
    if end < start {
        return Ok(Vec::new());
    }
    let (first, last) = (
        start.with_timezone(&tz).date_naive(),
        end.with_timezone(&tz).date_naive(),
    );
    let estimate: u64 = match g {
        Granularity::Day => ((end - start).num_hours() + 2).max(0) as u64,
        Granularity::Month => ((last - first).num_days() + 1).max(0) as u64,
        Granularity::Year => {
            let months = |d: NaiveDate| i64::from(d.year()) * 12 + i64::from(d.month0());
            (months(last) - months(first) + 1).max(0) as u64
        }
    };
    if estimate > MAX_BUCKETS as u64 + 1 {
        return Err(estimate);
    }
    let mut out = Vec::new();
    match g {
        Granularity::Day => {
            let mut b = bucket_of(g, tz, start);
            while b.start <= end {
                let next = bucket_of(g, tz, b.start + Duration::hours(1));
                out.push(b);
                b = next;
            }
        }
        Granularity::Month => {
            let mut d = first;
            while d <= last {
                out.push(Bucket {
                    start: day_start(tz, d),
                    label: d.format("%Y-%m-%d").to_string(),
                });
                d = match d.succ_opt() {
                    Some(n) => n,
                    None => break,
                };
            }
        }
        Granularity::Year => {
            let mut d = month_start(first);
            while d <= last {
                let start = day_start(tz, d);
                out.push(Bucket {
                    start,
                    label: with_offset(tz, start),
                });
                d = match d.checked_add_months(chrono::Months::new(1)) {
                    Some(n) => n,
                    None => break,
                };
            }
        }
    }
    if out.len() > MAX_BUCKETS {
        return Err(out.len() as u64);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Offset, TimeZone};

    /// Zones with DST, :30 and :45 offsets, half-hour DST changes and midnight changes.
    const ZONES: [&str; 7] = [
        "UTC",
        "America/New_York",
        "Asia/Kathmandu",
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "America/Santiago",
        "Africa/Casablanca",
    ];

    /// `check` at every `step` through 2024 in each of [`ZONES`].
    fn through_2024(step: Duration, mut check: impl FnMut(&str, Tz, DateTime<Utc>)) {
        for zone in ZONES {
            let tz: Tz = zone.parse().unwrap();
            let mut t = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
            while t.year() < 2025 {
                check(zone, tz, t);
                t += step;
            }
        }
    }

    #[test]
    fn bucket_start_is_the_start_of_bucket_of() {
        through_2024(Duration::seconds(7 * 3600 + 13 * 60 + 7), |zone, tz, t| {
            for g in [Granularity::Day, Granularity::Month, Granularity::Year] {
                assert_eq!(
                    bucket_start(g, tz, t),
                    bucket_of(g, tz, t).start,
                    "{zone} {t} {g:?}"
                );
            }
        });
    }

    #[test]
    fn bucket_keys_name_the_buckets() {
        // Two instants share a key exactly when they share a bucket: across every offset change
        // of 2005–2030 (a second apart at each, and a bucket's length apart) in zones that
        // change at local midnight (Santiago, Havana, Beirut, Cairo), by half an hour (Lord
        // Howe) or at :45 (Chatham), and over the local days that never happened (Apia's
        // 2011-12-30, Kwajalein's 1993-08-21).
        let same = |g: Granularity, tz: Tz, a: i64, b: i64| {
            (bucket_key(g, tz, a) == bucket_key(g, tz, b))
                == (bucket_start_seconds(g, tz, a) == bucket_start_seconds(g, tz, b))
        };
        let grains = [Granularity::Day, Granularity::Month, Granularity::Year];
        let check = |zone: &str, tz: Tz, t: i64| {
            for g in grains {
                for d in [1, 3_600, 86_399, 86_400, 90_000, 2_678_400] {
                    assert!(same(g, tz, t, t + d), "{zone} {t} +{d} {g:?}");
                    assert!(same(g, tz, t - d, t), "{zone} {t} -{d} {g:?}");
                }
            }
        };
        let zones = [
            "America/Santiago",
            "America/Havana",
            "Asia/Beirut",
            "Africa/Cairo",
            "Australia/Lord_Howe",
            "Pacific/Chatham",
            "America/New_York",
        ];
        let offset = |tz: Tz, t: i64| offset_at(tz, t);
        for zone in zones {
            let tz: Tz = zone.parse().unwrap();
            let mut t = Utc
                .with_ymd_and_hms(2005, 1, 1, 0, 0, 0)
                .unwrap()
                .timestamp();
            let end = Utc
                .with_ymd_and_hms(2030, 1, 1, 0, 0, 0)
                .unwrap()
                .timestamp();
            while t < end {
                let next = t + 3_600;
                if offset(tz, t) != offset(tz, next) {
                    // The change's second, and a few either side of it.
                    let (mut lo, mut hi) = (t, next);
                    while hi - lo > 1 {
                        let mid = (lo + hi) / 2;
                        match offset(tz, mid) == offset(tz, t) {
                            true => lo = mid,
                            false => hi = mid,
                        }
                    }
                    for u in hi - 2..=hi + 2 {
                        check(zone, tz, u);
                    }
                    for u in (t - 60..=next + 60).step_by(311) {
                        check(zone, tz, u);
                    }
                } else if t % (7 * 86_400) == 0 {
                    check(zone, tz, t + 1_234);
                }
                t = next;
            }
        }
        for (zone, y, m, d) in [
            ("Pacific/Apia", 2011, 12, 29),
            ("Pacific/Kwajalein", 1993, 8, 20),
        ] {
            let tz: Tz = zone.parse().unwrap();
            let t0 = Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap().timestamp();
            for u in (t0 - 2 * 86_400..t0 + 4 * 86_400).step_by(600) {
                check(zone, tz, u);
            }
        }
    }

    #[test]
    fn bucket_start_in_seconds_is_bucket_start() {
        // Through 2024, every 7 min 13 s, and around every offset change (a second either side),
        // in each zone; and in 1950, when Monrovia's offset had seconds (−00:44:30).
        let mut check = |zone: &str, tz: Tz, t: DateTime<Utc>| {
            for g in [Granularity::Day, Granularity::Month, Granularity::Year] {
                assert_eq!(
                    bucket_start_seconds(g, tz, t.timestamp()),
                    bucket_start(g, tz, t).timestamp(),
                    "{zone} {t} {g:?}"
                );
            }
        };
        through_2024(Duration::seconds(7 * 60 + 13), &mut check);
        for zone in ZONES {
            let tz: Tz = zone.parse().unwrap();
            let mut t = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
            while t.year() < 2025 {
                let next = t + Duration::minutes(15);
                if tz.offset_from_utc_datetime(&t.naive_utc())
                    != tz.offset_from_utc_datetime(&next.naive_utc())
                {
                    let mut u = t - Duration::minutes(1);
                    while u <= next + Duration::minutes(1) {
                        check(zone, tz, u);
                        u += Duration::seconds(1);
                    }
                }
                t = next;
            }
        }
        let monrovia: Tz = "Africa/Monrovia".parse().unwrap();
        let mut t = Utc.with_ymd_and_hms(1950, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            monrovia
                .offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc(),
            -(44 * 60 + 30)
        );
        for _ in 0..500 {
            check("Africa/Monrovia", monrovia, t);
            t += Duration::seconds(3_607);
        }
    }

    #[test]
    fn the_label_at_a_bucket_start_is_the_bucket_s_label() {
        through_2024(Duration::seconds(5 * 3600 + 41 * 60 + 3), |zone, tz, t| {
            for g in [Granularity::Day, Granularity::Month, Granularity::Year] {
                assert_eq!(
                    label_at(g, tz, bucket_start(g, tz, t)),
                    bucket_of(g, tz, t).label,
                    "{zone} {t} {g:?}"
                );
            }
        });
    }

    #[test]
    fn labels_are_chrono_s_text() {
        through_2024(Duration::seconds(3 * 3600 + 17 * 60 + 11), |zone, tz, t| {
            assert_eq!(
                with_offset(tz, t),
                t.with_timezone(&tz)
                    .format("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string(),
                "{zone} {t}"
            );
        });
        // An offset with seconds (local mean time) and a year of five digits: chrono's text.
        let amsterdam: Tz = "Europe/Amsterdam".parse().unwrap();
        let lmt = Utc.with_ymd_and_hms(1900, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            with_offset(amsterdam, lmt),
            lmt.with_timezone(&amsterdam)
                .format("%Y-%m-%dT%H:%M:%S%:z")
                .to_string()
        );
        let far = Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(with_offset(Tz::UTC, far), "+10000-01-01T00:00:00+00:00");
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn labels(v: &[Bucket]) -> Vec<&str> {
        v.iter().map(|b| b.label.as_str()).collect()
    }

    #[test]
    fn utc_labels_are_spec_5s() {
        let t = at("2025-01-31T10:20:30.5Z");
        assert_eq!(
            bucket_of(Granularity::Day, Tz::UTC, t).label,
            "2025-01-31T10:00:00+00:00"
        );
        assert_eq!(
            bucket_of(Granularity::Month, Tz::UTC, t).label,
            "2025-01-31"
        );
        assert_eq!(
            bucket_of(Granularity::Year, Tz::UTC, t).label,
            "2025-01-01T00:00:00+00:00"
        );
    }

    #[test]
    fn new_york_spring_forward_and_fall_back_hours() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // 2024-03-10: 02:00 EST jumps to 03:00 EDT (07:00Z).
        let hours = buckets_between(
            Granularity::Day,
            ny,
            at("2024-03-10T05:00:00Z"),
            at("2024-03-10T08:59:59Z"),
        )
        .unwrap();
        assert_eq!(
            labels(&hours),
            [
                "2024-03-10T00:00:00-05:00",
                "2024-03-10T01:00:00-05:00",
                "2024-03-10T03:00:00-04:00",
                "2024-03-10T04:00:00-04:00"
            ]
        );
        // 2024-11-03: 01:00-02:00 happens twice, first EDT then EST.
        let hours = buckets_between(
            Granularity::Day,
            ny,
            at("2024-11-03T04:00:00Z"),
            at("2024-11-03T07:59:59Z"),
        )
        .unwrap();
        assert_eq!(
            labels(&hours),
            [
                "2024-11-03T00:00:00-04:00",
                "2024-11-03T01:00:00-04:00",
                "2024-11-03T01:00:00-05:00",
                "2024-11-03T02:00:00-05:00"
            ]
        );
        assert_eq!(
            bucket_of(Granularity::Day, ny, at("2024-11-03T06:30:00Z")).label,
            "2024-11-03T01:00:00-05:00"
        );
        // The local days around them are 23 and 25 hours long.
        let day = |d| bucket_of(Granularity::Month, ny, at(d));
        let (a, b) = (day("2024-03-10T12:00:00Z"), day("2024-03-11T12:00:00Z"));
        assert_eq!((b.start - a.start).num_hours(), 23);
        let (a, b) = (day("2024-11-03T12:00:00Z"), day("2024-11-04T12:00:00Z"));
        assert_eq!((b.start - a.start).num_hours(), 25);
        assert_eq!(
            bucket_of(Granularity::Year, ny, at("2024-03-31T12:00:00Z")).label,
            "2024-03-01T00:00:00-05:00"
        );
        assert_eq!(
            bucket_of(Granularity::Year, ny, at("2024-04-01T12:00:00Z")).label,
            "2024-04-01T00:00:00-04:00"
        );
    }

    #[test]
    fn half_and_three_quarter_hour_offsets() {
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let b = bucket_of(Granularity::Day, kolkata, at("2024-05-01T09:29:59Z"));
        assert_eq!(b.label, "2024-05-01T14:00:00+05:30");
        assert_eq!(b.start, at("2024-05-01T08:30:00Z"));
        let b = bucket_of(Granularity::Month, kolkata, at("2024-04-30T18:30:00Z"));
        assert_eq!(b.label, "2024-05-01");
        let kathmandu: Tz = "Asia/Kathmandu".parse().unwrap();
        assert_eq!(
            bucket_of(Granularity::Day, kathmandu, at("2024-05-01T00:14:00Z")).label,
            "2024-05-01T05:00:00+05:45"
        );
    }

    #[test]
    fn ranges_cross_month_and_year_ends_and_are_capped() {
        let tz = Tz::UTC;
        let days = buckets_between(
            Granularity::Month,
            tz,
            at("2024-12-30T10:00:00Z"),
            at("2025-01-02T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            labels(&days),
            ["2024-12-30", "2024-12-31", "2025-01-01", "2025-01-02"]
        );
        let months = buckets_between(
            Granularity::Year,
            tz,
            at("2024-11-15T00:00:00Z"),
            at("2025-02-01T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(months.len(), 4);
        assert_eq!(months[3].label, "2025-02-01T00:00:00+00:00");
        let start = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
        assert!(
            buckets_between(Granularity::Day, tz, start, start + Duration::days(3650)).is_err()
        );
        assert_eq!(
            buckets_between(Granularity::Day, tz, start, start + Duration::hours(9_999))
                .unwrap()
                .len(),
            10_000
        );
    }
}
