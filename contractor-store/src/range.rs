//! Conditional and partial GETs: the `Range`, `If-Range` and `If-None-Match` headers
//! (RFC 9110), reduced to what the store supports.
//!
//! The invariant: a [`ByteRange`] handed to the server always lies within the file
//! (`start <= end < len`), so the server never seeks or reads past what it announced in
//! `Content-Range`. Only one range per request is served; a request for several, or a
//! header that does not parse, is answered with the whole file, as RFC 9110 allows.

/// An inclusive byte range within a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
}

impl ByteRange {
    /// How many bytes the range holds.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a range holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a `Range` header asks of a file of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// Serve the whole file (no header, several ranges, or a header that does not parse).
    Whole,
    /// Serve this part (206).
    Part(ByteRange),
    /// No byte of the file is in the range (416).
    Unsatisfiable,
}

/// Interprets a `Range` header value for a file of `len` bytes.
pub fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |text: &str| -> Option<u64> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Too many digits for u64 is still a valid (huge) number.
        Some(text.parse().unwrap_or(u64::MAX))
    };
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Some(suffix) = number(last) else {
            return RangeRequest::Whole;
        };
        if suffix == 0 || len == 0 {
            return RangeRequest::Unsatisfiable;
        }
        let start = len.saturating_sub(suffix);
        return RangeRequest::Part(ByteRange {
            start,
            end: len - 1,
        });
    }
    let Some(start) = number(first) else {
        return RangeRequest::Whole;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match number(last) {
            Some(end) if end >= start => end,
            _ => return RangeRequest::Whole,
        }
    };
    if start >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Part(ByteRange {
        start,
        end: end.min(len - 1),
    })
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, as RFC 9110 asks).
pub fn none_match(value: &str, etag: &str) -> bool {
    let bare = |tag: &str| tag.trim().trim_start_matches("W/").to_string();
    let wanted = bare(etag);
    value
        .split(',')
        .any(|tag| tag.trim() == "*" || bare(tag) == wanted)
}

/// Whether an `If-Range` value lets a range be served (strong comparison with `etag`; a
/// date is never trusted, since the store's ETags are exact and its dates are not sent).
pub fn if_range_allows(value: &str, etag: &str) -> bool {
    let value = value.trim();
    !value.starts_with("W/") && value == etag
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Part(ByteRange { start, end })
    }

    #[test]
    fn single_ranges_are_clamped_to_the_file() {
        assert_eq!(parse_range("bytes=0-99", 1000), part(0, 99));
        assert_eq!(parse_range("bytes=10-", 1000), part(10, 999));
        assert_eq!(parse_range("bytes=990-5000", 1000), part(990, 999));
        assert_eq!(parse_range("bytes=-100", 1000), part(900, 999));
        assert_eq!(parse_range("bytes=-5000", 1000), part(0, 999));
        assert_eq!(parse_range("bytes=999-999", 1000), part(999, 999));
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999", 10),
            part(0, 9)
        );
    }

    #[test]
    fn ranges_past_the_end_are_unsatisfiable() {
        assert_eq!(
            parse_range("bytes=1000-", 1000),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(
            parse_range("bytes=2000-3000", 1000),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(parse_range("bytes=-0", 1000), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn other_headers_mean_the_whole_file() {
        for value in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=1",
            "",
        ] {
            assert_eq!(parse_range(value, 1000), RangeRequest::Whole, "{value:?}");
        }
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = "\"abc\"";
        assert!(none_match("\"abc\"", etag));
        assert!(none_match("W/\"abc\"", etag));
        assert!(none_match("\"x\", \"abc\"", etag));
        assert!(none_match("*", etag));
        assert!(!none_match("\"abd\"", etag));
    }

    #[test]
    fn if_range_compares_strongly() {
        assert!(if_range_allows("\"abc\"", "\"abc\""));
        assert!(!if_range_allows("W/\"abc\"", "\"abc\""));
        assert!(!if_range_allows("Wed, 21 Oct 2015 07:28:00 GMT", "\"abc\""));
    }
}
