//! Turns a byte stream into text events without splitting a UTF-8 character between two
//! events. Invalid bytes become U+FFFD in the text; the log file keeps the exact bytes.

/// Accumulates bytes and hands out the longest prefix that ends on a character boundary.
#[derive(Debug, Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    /// Adds `bytes` and returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.pending);
        let complete = self.pending.len() - keep;
        let text = String::from_utf8_lossy(&self.pending[..complete]).into_owned();
        self.pending.drain(..complete);
        text
    }

    /// Returns whatever is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 sequence that is not complete yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // a continuation byte: look further back
        }
        let needed = match b {
            0b1100_0000..=0b1101_1111 => 2,
            0b1110_0000..=0b1110_1111 => 3,
            0b1111_0000..=0b1111_0111 => 4,
            _ => 1,
        };
        return if needed > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_across_pushes_comes_out_whole() {
        let mut c = Utf8Chunker::default();
        let euro = "€".as_bytes(); // three bytes
        assert_eq!(c.push(&[b'a', euro[0]]), "a");
        assert_eq!(c.push(&euro[1..2]), "");
        assert_eq!(c.push(&[euro[2], b'b']), "€b");
        assert_eq!(c.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut c = Utf8Chunker::default();
        assert_eq!(c.push(&[b'x', 0xff, b'y']), "x\u{fffd}y");
        assert_eq!(c.push(&[0xe2]), "");
        assert_eq!(c.finish(), "\u{fffd}");
    }
}
