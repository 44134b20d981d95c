//! JSON Lines: one JSON object per line. The writer flushes after every line so that a
//! reader at the other end of a pipe sees each event as it happens.

use std::io::{self, BufRead, Write};

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
}

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

/// Reads messages line by line; blank lines are skipped.
pub struct JsonlReader<R> {
    input: R,
    line: usize,
    buf: String,
}

impl<R: BufRead> JsonlReader<R> {
    /// Wraps a buffered reader.
    pub fn new(input: R) -> Self {
        JsonlReader {
            input,
            line: 0,
            buf: String::new(),
        }
    }

    /// The next message, or `None` at the end of the stream.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, JsonlError> {
        loop {
            self.buf.clear();
            let n = self
                .input
                .read_line(&mut self.buf)
                .map_err(JsonlError::Io)?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            if self.buf.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&self.buf)
                .map(Some)
                .map_err(|source| JsonlError::Parse {
                    line: self.line,
                    source,
                });
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
}
