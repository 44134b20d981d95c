//! Where a JSON request went wrong: the line, column and field (`job.artifacts[1]`) of a
//! serde_json error, for the message a user reads. serde knows the position of syntax errors
//! and of errors in plain structs; inside an internally tagged enum it does not, so
//! [`locate_tagged`] parses each top-level member again on its own to find it.
//!
//! The invariant: a position is reported only when it is known, and then in serde_json's
//! terms (lines from 1, columns counting bytes from 1 on the line).

use std::io::{self, BufRead};
use std::ops::Range;

/// A bad JSON text's error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The line (from 1), or 0 when the position is unknown.
    pub line: usize,
    /// The column on that line (from 1).
    pub column: usize,
    /// The field at the position (`spec.image.kernel`), empty for none.
    pub field: String,
    /// serde's message without its ` at line L column C` suffix.
    pub detail: String,
}

impl Located {
    /// ` at line L, column C, in `field`` (or without the field), or empty when the position
    /// is unknown: the text to put between "bad JSON request" and the detail.
    pub fn at(&self) -> String {
        match (self.line, self.field.is_empty()) {
            (0, _) => String::new(),
            (line, true) => format!(" at line {line}, column {}", self.column),
            (line, false) => format!(
                " at line {line}, column {}, in `{}`",
                self.column, self.field
            ),
        }
    }
}

/// Locates `e`, the error of parsing `text` as a plain struct (or any value whose errors
/// serde positions).
pub fn locate(text: &str, e: &serde_json::Error) -> Located {
    let detail = detail(e);
    if e.line() == 0 {
        return Located {
            line: 0,
            column: 0,
            field: String::new(),
            detail,
        };
    }
    Located {
        line: e.line(),
        column: e.column(),
        field: field_at(text, offset_of(text, e.line(), e.column())),
        detail,
    }
}

/// Locates `e`, the error of parsing `text` as an internally tagged enum. When serde gives no
/// position, each top-level member is handed to `reparse(key, value_text)`, which parses the
/// value as that member's type and returns its error (or `None` for a key it does not know
/// or a value that parses); the first error with a position names the place. An unknown
/// top-level key is found by serde's `unknown field` message.
pub fn locate_tagged<F>(text: &str, e: &serde_json::Error, reparse: F) -> Located
where
    F: Fn(&str, &str) -> Option<serde_json::Error>,
{
    if e.line() != 0 {
        return locate(text, e);
    }
    let whole = detail(e);
    for (key, colon, value) in top_level_members(text) {
        let sub = &text[value.clone()];
        if let Some(sub_error) = reparse(&key, sub).filter(|s| s.line() != 0) {
            let inner_offset = offset_of(sub, sub_error.line(), sub_error.column());
            let inner = field_at(sub, inner_offset);
            let field = if inner.is_empty() {
                key
            } else if inner.starts_with('[') {
                format!("{key}{inner}")
            } else {
                format!("{key}.{inner}")
            };
            let (line, column) = line_column(text, value.start + inner_offset);
            return Located {
                line,
                column,
                field,
                detail: detail(&sub_error),
            };
        }
        if whole.starts_with(&format!("unknown field `{key}`")) {
            let (line, column) = line_column(text, colon);
            return Located {
                line,
                column,
                field: key,
                detail: whole,
            };
        }
    }
    Located {
        line: 0,
        column: 0,
        field: String::new(),
        detail: whole,
    }
}

/// Reads `input` up to the end of its first JSON value (a request object), leaving the rest
/// unread.
pub fn read_first_value<R: BufRead>(input: R) -> io::Result<Vec<u8>> {
    let mut cursor = JsonCursor::default();
    let mut text = Vec::new();
    for byte in input.bytes() {
        let byte = byte?;
        text.push(byte);
        cursor.feed(byte);
        if cursor.ended_first_value(byte) {
            break;
        }
    }
    Ok(text)
}

/// The field at a byte offset of a JSON text: the container the offset is in, unless the
/// byte just before it opened that container (then the error is about the container itself).
pub fn field_at(text: &str, offset: usize) -> String {
    let mut cursor = JsonCursor::default();
    let bytes = &text.as_bytes()[..offset.min(text.len())];
    for &b in bytes {
        cursor.feed(b);
    }
    if !cursor.in_string
        && matches!(
            bytes.iter().rev().find(|b| !b.is_ascii_whitespace()),
            Some(b'{' | b'[')
        )
    {
        cursor.stack.pop();
    }
    cursor.path()
}

/// serde's message without its ` at line L column C` suffix.
fn detail(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&suffix).unwrap_or(&text).to_string()
}

/// The byte offset of serde_json's (line, column) in `text`.
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (line_start + column).min(text.len())
}

/// serde_json's (line, column) of a byte offset in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before.len()
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
    (line, column)
}

/// Each top-level member of an object: its key, the offset of its `:`, its value's bytes.
fn top_level_members(text: &str) -> Vec<(String, usize, Range<usize>)> {
    let mut cursor = JsonCursor::default();
    let mut members = Vec::new();
    let mut current: Option<(String, usize, Option<usize>)> = None;
    for (i, &b) in text.as_bytes().iter().enumerate() {
        let top = cursor.stack.len() == 1 && !cursor.in_string;
        cursor.feed(b);
        if !top {
            continue;
        }
        match b {
            b',' | b'}' => {
                if let Some((key, colon, Some(start))) = current.take() {
                    members.push((key, colon, start..i));
                }
            }
            b':' => {
                if let Some(Frame::Object { key: Some(key), .. }) = cursor.stack.last() {
                    current = Some((key.clone(), i, None));
                }
            }
            _ if b.is_ascii_whitespace() => {}
            _ => {
                if let Some((_, _, start @ None)) = &mut current {
                    *start = Some(i);
                }
            }
        }
    }
    members
}

/// The structure of a JSON text read byte by byte: the open containers and the current key.
/// Enough to name the field at an error's position, to find where the first value ends, and
/// to find each top-level member's value.
#[derive(Debug, Default)]
struct JsonCursor {
    stack: Vec<Frame>,
    in_string: bool,
    escaped: bool,
    string: Vec<u8>,
    started: bool,
}

#[derive(Debug)]
enum Frame {
    Object {
        key: Option<String>,
        expect_key: bool,
    },
    Array {
        index: usize,
    },
}

impl JsonCursor {
    fn feed(&mut self, byte: u8) {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
                if let Some(Frame::Object { key, expect_key }) = self.stack.last_mut() {
                    if *expect_key {
                        *key = Some(String::from_utf8_lossy(&self.string).into_owned());
                        *expect_key = false;
                    }
                }
                return;
            }
            self.string.push(byte);
            return;
        }
        if !byte.is_ascii_whitespace() {
            self.started = true;
        }
        match byte {
            b'"' => {
                self.in_string = true;
                self.string.clear();
            }
            b'{' => self.stack.push(Frame::Object {
                key: None,
                expect_key: true,
            }),
            b'[' => self.stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                self.stack.pop();
            }
            b',' => match self.stack.last_mut() {
                Some(Frame::Object { key, expect_key }) => {
                    *key = None;
                    *expect_key = true;
                }
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            _ => {}
        }
    }

    /// The field the cursor is in: `spec.image.kernel`, `job.artifacts[0]`.
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Object { key: Some(key), .. } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                Frame::Object { key: None, .. } => break,
                Frame::Array { index } => path.push_str(&format!("[{index}]")),
            }
        }
        path
    }

    /// True once a whole value has been read and `byte` (just fed) ended it.
    fn ended_first_value(&self, byte: u8) -> bool {
        self.started
            && self.stack.is_empty()
            && !self.in_string
            && matches!(byte, b'}' | b']' | b'\n')
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Job {
        script: String,
        #[serde(default)]
        artifacts: Vec<String>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Plain {
        version: u32,
        job: Option<Job>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
    #[allow(dead_code)]
    enum Tagged {
        Create { version: u32, job: Job },
    }

    fn plain(text: &str) -> String {
        let e = serde_json::from_str::<Plain>(text).expect_err("bad");
        let l = locate(text, &e);
        format!("{}: {}", l.at(), l.detail)
    }

    fn tagged(text: &str) -> String {
        let e = serde_json::from_str::<Tagged>(text).expect_err("bad");
        let l = locate_tagged(text, &e, |key, value| match key {
            "job" => serde_json::from_str::<Job>(value).err(),
            "version" => serde_json::from_str::<u32>(value).err(),
            _ => None,
        });
        format!("{}: {}", l.at(), l.detail)
    }

    #[test]
    fn plain_errors_name_line_column_and_field() {
        let m = plain("{\"version\":1,\n \"job\":{\"script\":\"make\",\"artifacts\":[\"a\", 5]}}");
        assert!(
            m.contains("line 2, column 43, in `job.artifacts[1]`"),
            "{m}"
        );
        let m = plain("{\"version\":1,\"tunnel\":\"x\"}");
        assert!(m.contains("in `tunnel`: unknown field"), "{m}");
        let m = plain("{\"version\":\"1\"}");
        assert!(m.contains("in `version`: invalid type"), "{m}");
        let m = plain("{\"version\":1,\n\"job\": 5}");
        assert!(m.contains("in `job`: invalid type"), "{m}");
        let m = plain("{\"version\":1,");
        assert!(m.starts_with(" at line 1, column 13:"), "{m}");
    }

    #[test]
    fn tagged_errors_are_found_by_parsing_members_again() {
        let text =
            "{\"type\":\"create\",\"version\":1,\n\"job\":{\"script\":\"make\",\"artifacts\":[7]}}";
        let m = tagged(text);
        assert!(
            m.contains("line 2, column 37, in `job.artifacts[0]`"),
            "{m}"
        );
        let m = tagged("{\"type\":\"create\",\"version\":1,\"job\":{\"script\":\"\"},\n \"x\":1}");
        assert!(
            m.contains("line 2, column 4, in `x`: unknown field `x`"),
            "{m}"
        );
        let m = tagged("{\"type\":\"create\"}");
        assert!(m.starts_with(": missing field"), "{m}");
    }

    #[test]
    fn escaped_quotes_in_strings_do_not_confuse_the_field() {
        assert_eq!(field_at(r#"{"a":"x\"y","b":"#, 17), "b");
        assert_eq!(field_at(r#"{"a":{"c":[1,{"d":"#, 18), "a.c[1].d");
    }

    #[test]
    fn the_first_value_ends_at_its_closing_brace() {
        let mut input = std::io::Cursor::new(b"{\"a\":[1,\"}\"]}\nrest".to_vec());
        let first = read_first_value(&mut input).expect("read");
        assert_eq!(first, b"{\"a\":[1,\"}\"]}");
        let mut rest = String::new();
        input.read_to_string(&mut rest).expect("rest");
        assert_eq!(rest, "\nrest");
    }
}
