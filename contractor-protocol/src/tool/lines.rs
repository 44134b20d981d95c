//! A tool's answer of several lines: a first line that says how many lines follow (the
//! store's `record list`: `{"type":"record_list",…,"builds":3}`), those lines, each typed,
//! or the bytes it says it sends (`record log`), and then the tool's end.
//!
//! The invariant: an answer is taken only when the tool also ended well. An error object in
//! place of a line, an end before the count, or a failing exit is the tool's failure
//! ([`ToolError::Failed`], with its error object when it wrote one); a line that is not the
//! documented JSON is refused as [`Answers`] refuses it. Each line is bounded as [`Answers`]
//! bounds it; the count is the tool's, and a tool that sends fewer lines ends the reading.

use std::io::BufReader;
use std::process::{Child, ChildStdout, Command, Stdio};

use serde::de::DeserializeOwned;

use super::{Answers, Reply, ToolError};

/// The answer of a tool being read, after its first line ([`Lines::start`]).
pub struct Lines {
    name: &'static str,
    child: Child,
    answers: Answers,
}

impl Lines {
    /// Runs `command` (tool `name`) with `--json-errors` added to its arguments, its stdin
    /// closed and its stderr discarded (its error object says the same, reported once), and
    /// reads its first line, a `T`.
    pub fn start<T: DeserializeOwned>(
        name: &'static str,
        mut command: Command,
    ) -> Result<(Lines, T), ToolError> {
        command.arg("--json-errors").stderr(Stdio::null());
        let mut child = super::spawn(name, command)?;
        drop(child.stdin.take());
        let mut answers = Answers::of(name, &mut child)?;
        let first = answers.first(&mut child)?;
        Ok((
            Lines {
                name,
                child,
                answers,
            },
            first,
        ))
    }

    /// The bytes the tool sends after its first line (a log, as the store sends it).
    pub fn bytes(&mut self) -> &mut BufReader<ChildStdout> {
        self.answers.rest()
    }

    /// The `count` lines that follow, each a `T`; then the tool's end, whose failure is an
    /// error.
    pub fn rest<T: DeserializeOwned>(self, count: u64) -> Result<Vec<T>, ToolError> {
        let Lines {
            name,
            mut child,
            mut answers,
        } = self;
        let mut lines = Vec::new();
        for _ in 0..count {
            let error = match answers.next_reply::<T>()? {
                Some(Reply::Answer(line)) => {
                    lines.push(line);
                    continue;
                }
                Some(Reply::Error(error)) => Some(error),
                None => None,
            };
            let exit_code = child.wait().ok().and_then(|status| status.code());
            return Err(ToolError::Failed {
                name,
                exit_code,
                error,
            });
        }
        answers.drain();
        let status = child
            .wait()
            .map_err(|source| ToolError::Io { name, source })?;
        match status.success() {
            true => Ok(lines),
            false => Err(ToolError::exited(name, status.code())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool::tests::sh;
    use std::io::Read;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Count {
        n: u64,
    }

    #[test]
    fn the_counted_lines_are_taken_only_when_the_tool_ends_well() {
        let (lines, count) =
            Lines::start::<Count>("contractor-test", sh(r#"printf '{"n":2}\n1\n2\n'"#))
                .expect("first line");
        assert_eq!(count, Count { n: 2 });
        assert_eq!(lines.rest::<u32>(count.n).expect("two lines"), [1, 2]);

        // Fewer lines than counted: the tool's failure, with its exit code.
        let (lines, count) =
            Lines::start::<Count>("contractor-test", sh(r#"printf '{"n":2}\n1\n'; exit 3"#))
                .expect("first line");
        let err = lines.rest::<u32>(count.n).expect_err("one line short");
        assert!(
            matches!(
                err,
                ToolError::Failed {
                    exit_code: Some(3),
                    error: None,
                    ..
                }
            ),
            "{err}"
        );

        // An error object in place of a line is the tool's failure, in its words.
        let error = r#"{"type":"error","version":1,"code":"io","chain":["cannot read x"]}"#;
        let (lines, count) = Lines::start::<Count>(
            "contractor-test",
            sh(&format!(r#"printf '{{"n":2}}\n1\n%s\n' '{error}'; exit 1"#)),
        )
        .expect("first line");
        let err = lines.rest::<u32>(count.n).expect_err("an error object");
        assert_eq!(
            err.to_string(),
            "contractor-test failed (exit code 1): cannot read x"
        );

        // Every line there, but a failing end: no answer.
        let (lines, count) =
            Lines::start::<Count>("contractor-test", sh(r#"printf '{"n":1}\n1\n'; exit 4"#))
                .expect("first line");
        assert!(matches!(
            lines.rest::<u32>(count.n),
            Err(ToolError::Failed {
                exit_code: Some(4),
                ..
            })
        ));
    }

    #[test]
    fn a_refusal_of_the_input_is_reported_as_bad_input() {
        let refused = ToolError::exited("contractor-test", Some(2));
        assert_eq!(refused.exit_code(), crate::ExitCode::BadInput);
        for other in [Some(1), Some(3), None] {
            let failed = ToolError::exited("contractor-test", other);
            assert_eq!(failed.exit_code(), crate::ExitCode::Infrastructure);
        }
    }

    #[test]
    fn the_bytes_after_the_first_line_are_read_as_sent() {
        let (mut lines, count) =
            Lines::start::<Count>("contractor-test", sh(r#"printf '{"n":5}\nhello'"#))
                .expect("first line");
        let mut sent = Vec::new();
        lines
            .bytes()
            .take(count.n)
            .read_to_end(&mut sent)
            .expect("bytes");
        assert_eq!(sent, b"hello");
        assert!(lines.rest::<u32>(0).expect("ended well").is_empty());
    }
}
