//! Sizes and durations as people write them on a command line or in a request: `512M`,
//! `2GiB`, `30m`, `1h30m`, `7d`. One parser of each for every tool, so that a value means
//! the same everywhere. Sizes use binary units (`K` is 1024 bytes, whether written `K`,
//! `KB` or `KiB`); a value that does not fit in a `u64` is refused, never wrapped.

use std::time::Duration;

/// A size or duration that does not parse; the message names the value and what is
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a number of bytes with an optional unit.
    #[error("{0:?} is not a size; write a number of bytes, optionally with K, M, G or T")]
    NotASize(String),
    /// Not numbers with units.
    #[error(
        "{0:?} is not an age or duration; write a number and a unit (s, m, h, d or w), \
         or several: 30m, 12h, 7d, 1h30m"
    )]
    NotADuration(String),
    /// A value too large for 64 bits (bytes or seconds).
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a byte count: a number, optionally followed by `B`, `K`, `M`, `G` or `T` (powers
/// of 1024; `KiB`… and `KB`… are read the same way; case does not matter).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::NotASize(text.to_string());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| UnitError::TooLarge(text.to_string()))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| UnitError::TooLarge(text.to_string()))
}

/// Parses a duration: one or more numbers each followed by a unit, `s`, `m`, `h`, `d` or
/// `w` (`90s`, `30m`, `1h30m`, `7d`). A bare number has no unit and is refused; zero is
/// accepted (a caller that needs more says so).
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::NotADuration(text.to_string());
    let too_large = || UnitError::TooLarge(text.to_string());
    let mut total = 0u64;
    let mut digits = String::new();
    let mut seen_unit = false;
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let seconds: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(bad()),
        };
        if digits.is_empty() {
            return Err(bad());
        }
        let number: u64 = digits.parse().map_err(|_| too_large())?;
        let part = number.checked_mul(seconds).ok_or_else(too_large)?;
        total = total.checked_add(part).ok_or_else(too_large)?;
        digits.clear();
        seen_unit = true;
    }
    if !digits.is_empty() || !seen_unit {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size(" 3 TB "), Ok(3 << 40));
        assert_eq!(parse_size("7B"), Ok(7));
        for bad in ["", "K", "12X", "-1", "1.5G"] {
            let err = parse_size(bad).expect_err(bad);
            assert_eq!(err, UnitError::NotASize(bad.into()));
        }
        assert!(parse_size("12X")
            .expect_err("unit")
            .to_string()
            .contains("\"12X\" is not a size; write a number of bytes"));
        assert_eq!(
            parse_size("99999999999T"),
            Err(UnitError::TooLarge("99999999999T".into()))
        );
        assert_eq!(
            parse_size("99999999999999999999"),
            Err(UnitError::TooLarge("99999999999999999999".into()))
        );
    }

    #[test]
    fn durations_parse_with_one_or_more_units() {
        let secs = |s| Ok(Duration::from_secs(s));
        assert_eq!(parse_duration("90s"), secs(90));
        assert_eq!(parse_duration("30m"), secs(1800));
        assert_eq!(parse_duration("1h30m"), secs(5400));
        assert_eq!(parse_duration("7d"), secs(7 * 86_400));
        assert_eq!(parse_duration("1w"), secs(604_800));
        assert_eq!(parse_duration("0s"), secs(0));
        for bad in ["7", "d", "7x", "", "-1d", "1h30", "h30m", "1.5h"] {
            let err = parse_duration(bad).expect_err(bad);
            assert_eq!(err, UnitError::NotADuration(bad.into()));
            assert!(err.to_string().contains("7d"), "{err}");
        }
        assert!(parse_duration("7")
            .expect_err("no unit")
            .to_string()
            .starts_with("\"7\" is not an age"));
        assert_eq!(
            parse_duration("99999999999999999w"),
            Err(UnitError::TooLarge("99999999999999999w".into()))
        );
    }
}
