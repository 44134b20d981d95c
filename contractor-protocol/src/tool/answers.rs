//! Reading what a tool answers on its stdout: JSON Lines, each at most
//! [`crate::jsonl::MAX_LINE_BYTES`], in its protocol version; its error object is the tool's
//! failure, and a line that is not its documented JSON is refused naming the tool and
//! showing the line's first [`GARBAGE_SHOWN`] bytes.

use std::io::{BufReader, Read};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde::de::DeserializeOwned;

use super::{start_noted, ToolError};
use crate::error::ErrorObject;
use crate::jsonl::JsonlReader;
use crate::PROTOCOL_VERSION;

/// The most bytes of a line that is not JSON shown in the error ([`ToolError::Garbage`]).
pub const GARBAGE_SHOWN: usize = 80;

/// The reader of a tool's stdout: JSON Lines, each at most
/// [`crate::jsonl::MAX_LINE_BYTES`].
pub struct Answers {
    name: &'static str,
    reader: JsonlReader<BufReader<ChildStdout>>,
}

impl Answers {
    /// Reads the stdout of `child`, which runs tool `name` (started by
    /// [`super::spawn`], so with its stdout on a pipe that nobody has taken yet).
    pub fn of(name: &'static str, child: &mut Child) -> Result<Answers, ToolError> {
        let stdout = child.stdout.take().ok_or(ToolError::Io {
            name,
            source: std::io::Error::other("no stdout pipe"),
        })?;
        Ok(Answers {
            name,
            reader: JsonlReader::new(BufReader::new(stdout)),
        })
    }

    /// The next line as a `T`, the tool's error object as `Err`, `None` at the end.
    pub fn next_reply<T: DeserializeOwned>(&mut self) -> Result<Option<Reply<T>>, ToolError> {
        let name = self.name;
        let Some(line) = self
            .reader
            .next_line()
            .map_err(|source| ToolError::Protocol { name, source })?
        else {
            return Ok(None);
        };
        let value: serde_json::Value = match serde_json::from_slice(line) {
            Ok(value) => value,
            Err(source) => {
                let start = quoted_start(line);
                let line = self.reader.line();
                return Err(ToolError::Garbage {
                    name,
                    line,
                    start,
                    source,
                });
            }
        };
        if let Some(got) = value["version"].as_u64() {
            if got != u64::from(PROTOCOL_VERSION) {
                return Err(ToolError::Version {
                    name,
                    got: u32::try_from(got).unwrap_or(u32::MAX),
                });
            }
        }
        if value["type"] == "error" {
            if let Ok(error) = serde_json::from_value::<ErrorObject>(value.clone()) {
                return Ok(Some(Reply::Error(error)));
            }
        }
        match serde_json::from_value(value) {
            Ok(answer) => Ok(Some(Reply::Answer(answer))),
            Err(source) => {
                let start = quoted_start(line);
                let line = self.reader.line();
                Err(ToolError::Garbage {
                    name,
                    line,
                    start,
                    source,
                })
            }
        }
    }

    /// The tool's first answer; its error object, or its end, is the tool's failure (after
    /// waiting for `child` to learn its exit code).
    pub fn first<T: DeserializeOwned>(&mut self, child: &mut Child) -> Result<T, ToolError> {
        match self.next_reply::<T>() {
            Ok(Some(Reply::Answer(answer))) => Ok(answer),
            Ok(Some(Reply::Error(error))) => Err(failed(self.name, child, Some(error))),
            Ok(None) => Err(failed(self.name, child, None)),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(err)
            }
        }
    }

    /// The next raw line (without its newline), `None` at the end.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, ToolError> {
        let name = self.name;
        self.reader
            .next_line()
            .map(|line| line.map(<[u8]>::to_vec))
            .map_err(|source| ToolError::Protocol { name, source })
    }

    /// The rest of the tool's stdout, after the lines read so far, as bytes (what
    /// `contractor-run shell` writes after its one JSON line).
    pub fn rest(&mut self) -> &mut BufReader<ChildStdout> {
        self.reader.get_mut()
    }

    /// Drains the rest of the output so that the tool never blocks on a full pipe.
    pub fn drain(mut self) {
        let mut sink = [0u8; 8192];
        let input = self.reader.get_mut();
        while matches!(input.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// The first [`GARBAGE_SHOWN`] bytes of `line`, quoted and escaped.
fn quoted_start(line: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&line[..line.len().min(GARBAGE_SHOWN)]);
    match line.len().saturating_sub(GARBAGE_SHOWN) {
        0 => format!("{shown:?}"),
        more => format!("{shown:?} ({more} more bytes not shown)"),
    }
}

/// One line of a tool's stdout.
pub enum Reply<T> {
    /// What was asked for.
    Answer(T),
    /// The tool's error object (`--json-errors`).
    Error(ErrorObject),
}

/// The failure of a tool that ended (or is ended now) after `error`.
fn failed(name: &'static str, child: &mut Child, error: Option<ErrorObject>) -> ToolError {
    drop(child.stdin.take());
    let exit_code = child.wait().ok().and_then(|status| status.code());
    ToolError::Failed {
        name,
        exit_code,
        error,
    }
}

/// The first answer of `child` (tool `name`), the rest of its stdout drained.
fn answered<T: DeserializeOwned>(name: &'static str, child: &mut Child) -> Result<T, ToolError> {
    let mut answers = Answers::of(name, child)?;
    let answer = answers.first(child)?;
    answers.drain();
    Ok(answer)
}

/// Runs tool `name` by `command` (e.g. over `ssh` on a build host) to completion, stdin from
/// nothing, with `--json-errors` added to its arguments, and returns its one JSON answer.
pub fn answer_of<T: DeserializeOwned>(
    name: &'static str,
    mut command: Command,
) -> Result<T, ToolError> {
    command.arg("--json-errors");
    let mut child = super::spawn(name, command)?;
    drop(child.stdin.take());
    let answer = answered(name, &mut child)?;
    let status = child
        .wait()
        .map_err(|source| ToolError::Io { name, source })?;
    match status.success() {
        true => Ok(answer),
        false => Err(ToolError::exited(name, status.code())),
    }
}

/// Runs tool `name` by `command` to completion with `request` as its stdin (one JSON line)
/// and returns its one JSON answer and its exit code: an answer with a non-zero exit (a
/// verdict that does not verify) is the caller's to judge. The tool's stderr is kept (at
/// most [`MAX_TEXT_BYTES`]) and shown only when it failed without its error object: what it
/// says otherwise is in its answer or its error object, which the caller reports once.
pub fn ask_of<R: serde::Serialize, T: DeserializeOwned>(
    name: &'static str,
    mut command: Command,
    request: &R,
) -> Result<(T, Option<i32>), ToolError> {
    command.arg("--json-errors").stderr(Stdio::piped());
    let mut child = super::spawn(name, command)?;
    let stderr = child.stderr.take();
    let said = std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(mut stderr) = stderr {
            let _ = (&mut stderr).take(MAX_TEXT_BYTES).read_to_end(&mut kept);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        }
        kept
    });
    // A tool that exits early closes its stdin: its answer (or error) says why.
    let _ = send(name, &mut child, request);
    let answered = answered(name, &mut child);
    let status = child.wait();
    let said = said.join().unwrap_or_default();
    let silent_failure = match &answered {
        Err(ToolError::Failed { error, .. }) => error.is_none(),
        Err(_) => true,
        Ok(_) => false,
    };
    if silent_failure && !said.is_empty() {
        eprint!("{}", String::from_utf8_lossy(&said));
    }
    let answer = answered?;
    let status = status.map_err(|source| ToolError::Io { name, source })?;
    Ok((answer, status.code()))
}

/// Sends `request` as one JSON line on the stdin of `child` (tool `name`, started with its
/// stdin on a pipe that nobody has taken yet), and returns that stdin.
pub fn send<R: serde::Serialize>(
    name: &'static str,
    child: &mut Child,
    request: &R,
) -> Result<ChildStdin, ToolError> {
    let mut stdin = child.stdin.take().ok_or(ToolError::Io {
        name,
        source: std::io::Error::other("no stdin pipe"),
    })?;
    crate::jsonl::write_line(&mut stdin, request)
        .map_err(|source| ToolError::Request { name, source })?;
    Ok(stdin)
}

/// The most bytes of plain text read from a tool's stdout by [`text`].
pub const MAX_TEXT_BYTES: u64 = 64 * 1024;

/// Runs `command` (tool `name`) to completion, stdin from `/dev/null`, and returns its
/// stdout as trimmed text (at most [`MAX_TEXT_BYTES`]).
pub fn text(name: &'static str, mut command: Command) -> Result<String, ToolError> {
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = start_noted(name, &mut command)?;
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        stdout
            .take(MAX_TEXT_BYTES)
            .read_to_end(&mut out)
            .map_err(|source| ToolError::Io { name, source })?;
    }
    let status = child
        .wait()
        .map_err(|source| ToolError::Io { name, source })?;
    if !status.success() {
        return Err(ToolError::exited(name, status.code()));
    }
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool::tests::sh;

    #[test]
    fn a_garbage_answer_is_refused_naming_the_tool_and_the_lines_start_bounded() {
        let long = "x".repeat(500);
        let mut child = super::super::spawn(
            "contractor-test",
            sh(&format!("echo 'hello, I am not JSON {long}'; sleep 30")),
        )
        .expect("sh starts");
        let mut answers = Answers::of("contractor-test", &mut child).expect("stdout");
        let err = answers
            .first::<serde_json::Value>(&mut child)
            .expect_err("garbage");
        let text = err.to_string();
        assert!(
            text.starts_with("contractor-test wrote something"),
            "{text}"
        );
        assert!(
            text.contains("line 1, starting \"hello, I am not JSON xxx"),
            "{text}"
        );
        assert!(text.contains("more bytes not shown"), "{text}");
        assert!(text.len() < 300, "{text}");
        // The child that wrote it was ended, not left running.
        assert!(child.try_wait().expect("try_wait").is_some());
    }

    #[test]
    fn json_that_is_not_the_documented_answer_is_refused_naming_the_line_and_its_start() {
        #[derive(Debug, serde::Deserialize)]
        struct Ready {
            #[allow(dead_code)]
            port: u16,
        }
        let mut child = super::super::spawn(
            "contractor-test",
            sh(r#"echo; echo '{"type":"ready","port":"not a port"}'"#),
        )
        .expect("sh starts");
        let mut answers = Answers::of("contractor-test", &mut child).expect("stdout");
        let err = answers.next_reply::<Ready>().err().expect("not a Ready");
        let text = err.to_string();
        assert!(
            text.starts_with("contractor-test wrote something other than its documented JSON"),
            "{text}"
        );
        assert!(
            text.contains(r#"line 2, starting "{\"type\":\"ready\""#),
            "{text}"
        );
        answers.drain();
        let _ = child.wait();
    }

    #[test]
    fn a_tool_that_ends_without_answering_fails_with_its_exit_code() {
        let err =
            answer_of::<serde_json::Value>("contractor-test", sh("exit 3")).expect_err("no answer");
        assert_eq!(
            err.to_string(),
            "contractor-test failed (exit code 3): it wrote no answer; its own message is above"
        );
    }

    #[test]
    fn a_tool_of_another_protocol_version_is_refused() {
        let err = answer_of::<serde_json::Value>(
            "contractor-test",
            sh(r#"echo '{"type":"ready","version":9}'"#),
        )
        .expect_err("version 9");
        assert!(matches!(err, ToolError::Version { got: 9, .. }), "{err}");
    }

    #[test]
    fn text_is_trimmed() {
        let out = text("contractor-test", sh("echo ' abc '")).expect("text");
        assert_eq!(out, "abc");
    }
}
