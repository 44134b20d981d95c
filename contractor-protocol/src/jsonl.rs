//! JSON Lines: one JSON object per line. The writer flushes after every line so that a
//! reader at the other end of a pipe sees each event as it happens.

use std::io::{self, BufRead, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors reading or writing a JSON Lines stream.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// The underlying stream failed.
    #[error("I/O error on the JSON Lines stream")]
    Io(#[source] io::Error),
    /// A line was not a valid message.
    #[error("line {line}: invalid message")]
    Parse {
        /// 1-based line number in the stream.
        line: usize,
        /// What serde said, with the column and the field.
        #[source]
        source: serde_json::Error,
    },
    /// A message could not be serialised.
    #[error("cannot encode message")]
    Encode(#[source] serde_json::Error),
    /// A line was longer than the reader accepts.
    #[error("line {line} is longer than {max} bytes")]
    TooLong {
        /// 1-based line number in the stream.
        line: usize,
        /// The reader's limit.
        max: u64,
    },
    /// A line was not UTF-8.
    #[error("line {line} is not UTF-8")]
    NotUtf8 {
        /// 1-based line number in the stream.
        line: usize,
    },
}

/// The longest line a [`JsonlReader`] accepts unless told otherwise: 4 MiB. Every message of
/// the protocol is far smaller (the relay caps a guest's control line at 1 MiB).
pub const MAX_LINE_BYTES: u64 = 4 * 1024 * 1024;

/// Writes one message as one line and flushes.
pub fn write_line<W: Write, T: Serialize>(out: &mut W, message: &T) -> Result<(), JsonlError> {
    let mut line = Vec::new();
    encode_line(&mut line, message)?;
    write_flushed(out, &line)
}

/// Appends one message as one line to `lines`, for writing several lines at once.
pub fn encode_line<T: Serialize>(lines: &mut Vec<u8>, message: &T) -> Result<(), JsonlError> {
    serde_json::to_writer(&mut *lines, message).map_err(JsonlError::Encode)?;
    lines.push(b'\n');
    Ok(())
}

/// Writes whole lines made by [`encode_line`] in one go and flushes.
pub fn write_flushed<W: Write>(out: &mut W, lines: &[u8]) -> Result<(), JsonlError> {
    out.write_all(lines).map_err(JsonlError::Io)?;
    out.flush().map_err(JsonlError::Io)
}

/// Reads messages line by line; blank lines are skipped. A line longer than the reader's
/// limit ([`MAX_LINE_BYTES`] by default) is an error, never buffered whole.
pub struct JsonlReader<R> {
    input: R,
    line: usize,
    buf: Vec<u8>,
    max: u64,
}

impl<R: BufRead> JsonlReader<R> {
    /// Wraps a buffered reader.
    pub fn new(input: R) -> Self {
        JsonlReader {
            input,
            line: 0,
            buf: Vec::new(),
            max: MAX_LINE_BYTES,
        }
    }

    /// Wraps a buffered reader that accepts lines of at most `max` bytes.
    pub fn with_limit(input: R, max: u64) -> Self {
        JsonlReader {
            max,
            ..JsonlReader::new(input)
        }
    }

    /// The 1-based number of the line read last (0 before the first).
    pub fn line(&self) -> usize {
        self.line
    }

    /// The underlying reader (what it holds beyond the lines read so far).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }

    /// The underlying reader, given up: what follows the lines read so far.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// The next non-blank line, without its newline, or `None` at the end of the stream.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, JsonlError> {
        Ok(if self.fill()? { Some(&self.buf) } else { None })
    }

    /// The next message, or `None` at the end of the stream.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, JsonlError> {
        if !self.fill()? {
            return Ok(None);
        }
        let line = self.line;
        let text = std::str::from_utf8(&self.buf).map_err(|_| JsonlError::NotUtf8 { line })?;
        serde_json::from_str(text)
            .map(Some)
            .map_err(|source| JsonlError::Parse { line, source })
    }

    /// Reads the next non-blank line into `buf`, without its line end; false at the end.
    fn fill(&mut self) -> Result<bool, JsonlError> {
        loop {
            self.buf.clear();
            let n = (&mut self.input)
                .take(self.max + 1)
                .read_until(b'\n', &mut self.buf)
                .map_err(JsonlError::Io)?;
            if n == 0 {
                return Ok(false);
            }
            self.line += 1;
            if n as u64 > self.max {
                return Err(JsonlError::TooLong {
                    line: self.line,
                    max: self.max,
                });
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            while self.buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                self.buf.pop();
            }
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Ready;

    #[test]
    fn round_trips_lines_and_names_the_bad_line() {
        let mut out = Vec::new();
        let ready = Ready::new("store", "127.0.0.1:8080".parse().expect("addr"));
        write_line(&mut out, &ready).expect("write");
        out.extend_from_slice(b"\n{\"type\":\"ready\",\"oops\":1}\n");
        let mut reader = JsonlReader::new(&out[..]);
        let first: Ready = reader.next_message().expect("read").expect("one message");
        assert_eq!(first, ready);
        let err = reader
            .next_message::<Ready>()
            .expect_err("second line is invalid");
        match err {
            JsonlError::Parse { line, source } => {
                assert_eq!(line, 3);
                assert!(source.to_string().contains("oops"), "{source}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn a_line_longer_than_the_limit_is_an_error_not_a_buffer() {
        let mut input = b"{\"a\":1}\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.push(b'\n');
        let mut reader = JsonlReader::with_limit(&input[..], 64);
        let first: serde_json::Value = reader.next_message().expect("read").expect("one");
        assert_eq!(first["a"], 1);
        match reader.next_message::<serde_json::Value>() {
            Err(JsonlError::TooLong { line: 2, max: 64 }) => {}
            other => panic!("expected TooLong on line 2, got {other:?}"),
        }
    }
}
