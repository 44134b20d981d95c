//! Reading the control channel's JSON Lines with a bound on the line length, on both ends.
//!
//! The other end is not trusted (the guest is root and hostile): a line is read into a
//! buffer that never grows past [`CONTROL_LINE_MAX`] bytes, so a peer that never sends a
//! newline costs at most that much memory, and the reader reports it instead of waiting.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Most bytes one control line may have, newline excluded: 1 MiB (1,048,576 bytes). A
/// longer line ends the conversation (`control_line_too_long`).
pub const CONTROL_LINE_MAX: usize = 1024 * 1024;

/// What reading one line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// One line, without its newline.
    Text(Vec<u8>),
    /// The stream ended (a last line without a newline is returned as `Text` first).
    End,
    /// The line passed [`CONTROL_LINE_MAX`]; the stream is left in the middle of it.
    TooLong,
}

/// Reads one line of at most `max` bytes from `input`.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
    max: usize,
) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let available = input.fill_buf().await?;
        if available.is_empty() {
            return Ok(if line.is_empty() {
                Line::End
            } else {
                Line::Text(line)
            });
        }
        let (take, found) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (at, true),
            None => (available.len(), false),
        };
        if line.len() + take > max {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&available[..take]);
        input.consume(if found { take + 1 } else { take });
        if found {
            return Ok(Line::Text(line));
        }
    }
}

/// A reader of bounded lines that keeps the part of a line it has read between calls, so
/// that [`LineReader::next`] is cancel-safe: a call dropped before its line is whole (by a
/// timeout, or by another branch of a `select!`) loses nothing, and the next call goes on
/// where it stopped. [`read_line`] is not: what it read of an unfinished line goes with
/// it. The kept part never grows past the `max` given to `next`.
#[derive(Debug)]
pub struct LineReader<R> {
    input: R,
    partial: Vec<u8>,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// Reads lines from `input`.
    pub fn new(input: R) -> LineReader<R> {
        LineReader {
            input,
            partial: Vec::new(),
        }
    }

    /// Reads one line of at most `max` bytes (as [`read_line`] does), cancel-safe.
    pub async fn next(&mut self, max: usize) -> std::io::Result<Line> {
        loop {
            // The only point where the call may be dropped: what was consumed before it is
            // in `partial` already.
            let available = self.input.fill_buf().await?;
            if available.is_empty() {
                return Ok(if self.partial.is_empty() {
                    Line::End
                } else {
                    Line::Text(std::mem::take(&mut self.partial))
                });
            }
            let (take, found) = match available.iter().position(|&b| b == b'\n') {
                Some(at) => (at, true),
                None => (available.len(), false),
            };
            if self.partial.len() + take > max {
                self.partial = Vec::new();
                return Ok(Line::TooLong);
            }
            self.partial.extend_from_slice(&available[..take]);
            self.input.consume(if found { take + 1 } else { take });
            if found {
                return Ok(Line::Text(std::mem::take(&mut self.partial)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn lines_come_out_whole_and_the_last_one_without_newline_too() {
        let mut input = &b"one\n\ntwo"[..];
        assert_eq!(
            read_line(&mut input, 10).await.expect("read"),
            Line::Text(b"one".to_vec())
        );
        assert_eq!(
            read_line(&mut input, 10).await.expect("read"),
            Line::Text(Vec::new())
        );
        assert_eq!(
            read_line(&mut input, 10).await.expect("read"),
            Line::Text(b"two".to_vec())
        );
        assert_eq!(read_line(&mut input, 10).await.expect("read"), Line::End);
    }

    #[tokio::test]
    async fn a_line_without_end_is_refused_at_the_limit_without_waiting_for_more() {
        let (mut writer, reader) = tokio::io::duplex(64 * 1024);
        // More than the limit, never a newline, and the writer stays open.
        writer.write_all(&[b'x'; 5000]).await.expect("write");
        let mut reader = tokio::io::BufReader::new(reader);
        assert_eq!(
            read_line(&mut reader, 4096).await.expect("read"),
            Line::TooLong
        );
        drop(writer);
    }

    #[tokio::test]
    async fn a_line_reader_dropped_in_the_middle_of_a_line_keeps_what_it_read() {
        let (mut writer, reader) = tokio::io::duplex(64 * 1024);
        let mut lines = LineReader::new(tokio::io::BufReader::new(reader));
        writer.write_all(b"{\"type\":\"hel").await.expect("write");
        // The read takes the first part and waits for the rest; then it is dropped.
        let cut = tokio::time::timeout(std::time::Duration::from_millis(50), lines.next(4096));
        assert!(cut.await.is_err(), "no whole line yet");
        writer.write_all(b"lo\"}\ntwo\n").await.expect("write");
        assert_eq!(
            lines.next(4096).await.expect("read"),
            Line::Text(b"{\"type\":\"hello\"}".to_vec())
        );
        assert_eq!(
            lines.next(4096).await.expect("read"),
            Line::Text(b"two".to_vec())
        );
        writer.write_all(&[b'x'; 5000]).await.expect("write");
        assert_eq!(lines.next(4096).await.expect("read"), Line::TooLong);
        drop(writer);
    }
}
