//! Calendar dates of Unix times, in UTC, without the C library's `gmtime_r`: one rule for
//! every tool that prints a time (the front end, `contractor-attest`'s messages).

/// The (year, month, day) of `days` after 1970-01-01, in the proleptic Gregorian calendar
/// (Howard Hinnant's days-to-civil algorithm).
pub fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// `2026-11-25 14:15:02` (UTC) from Unix seconds.
pub fn format_utc(unix: u64) -> String {
    let (year, month, day) = civil_date(unix / 86_400);
    let secs = unix % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_seconds_become_the_utc_calendar() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_788), (2026, 12, 1));
        assert_eq!(format_utc(1_795_615_977), "2026-11-25 14:12:57");
    }
}
