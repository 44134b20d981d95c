//! `contractor-store record follow`: the whole stream of a build run on a build host
//! (`contractor build --host`), read by this confined process instead of the front end.
//!
//! The stream is `contractor-host build`'s stdout (`contractor_protocol::hosted`):
//! its hello, the build's events up to `finished` (or its error object), then the record.
//! The invariant: nothing the build host wrote reaches the front end as it was written.
//! Each line before the record is read within [`MAX_LINE_BYTES`], parsed into its protocol
//! type and written on again from that type ([`FollowedLine`] for the hello and an error,
//! the build events as [`BuildEvent`]); anything else ends the stream with an error. The
//! record after `finished` is the receipt's ([`crate::receipt`]).

use std::io::{BufRead, Write};
use std::path::Path;

use contractor_protocol::build::BuildEvent;
use contractor_protocol::error::{ErrorObject, ToolCode};
use contractor_protocol::hosted::{FollowedLine, HostedLine};
use contractor_protocol::jsonl::{write_line, JsonlError, JsonlReader, MAX_LINE_BYTES};

use crate::receipt::{self, ReceiptError, Received};

/// Why a hosted build's stream could not be followed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The stream ended before the build's `finished` event.
    #[error("the build host's stream ended before the build finished")]
    Cut,
    /// A line before the record broke the hosted build protocol.
    #[error("{0}")]
    Stream(String),
    /// A checked line could not be written on.
    #[error("cannot write to stdout")]
    Write(#[source] JsonlError),
    /// The record after `finished` could not be received.
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
}

impl FollowError {
    /// The error object's code: `hosted_cut`, `hosted_stream`, `stdout`, or the receipt's.
    pub fn code(&self) -> ToolCode {
        match self {
            FollowError::Cut => ToolCode::HostedCut,
            FollowError::Stream(_) => ToolCode::HostedStream,
            FollowError::Write(_) => ToolCode::Stdout,
            FollowError::Receipt(e) => e.code(),
        }
    }

    /// True when the stream, not this host, is at fault (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            FollowError::Cut | FollowError::Stream(_) => true,
            FollowError::Write(_) => false,
            FollowError::Receipt(e) => e.is_bad_input(),
        }
    }
}

/// How the stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// The build finished and its record was received.
    Received(Received),
    /// The build host could not run the build (its error was written on).
    HostFailed,
}

/// Reads a hosted build's stream from `input`, writes its checked lines to `out`, and
/// receives the record after `finished` into `record` (at most `limit` bytes as charged).
pub fn follow(
    input: impl BufRead,
    out: &mut impl Write,
    record: &Path,
    limit: u64,
) -> Result<Followed, FollowError> {
    let mut reader = JsonlReader::with_limit(input, MAX_LINE_BYTES);
    let mut hello = false;
    loop {
        let value: serde_json::Value = match reader.next_message() {
            Ok(Some(value)) => value,
            Ok(None) => return Err(FollowError::Cut),
            Err(err) => {
                return Err(FollowError::Stream(format!(
                    "it wrote something other than the hosted build protocol: {err}"
                )))
            }
        };
        let kind = value["type"].as_str().unwrap_or_default().to_string();
        if !hello {
            write(out, &checked_hello(&kind, value)?)?;
            hello = true;
            continue;
        }
        match kind.as_str() {
            "error" => {
                let error: ErrorObject = serde_json::from_value(value).map_err(|err| {
                    FollowError::Stream(format!("it wrote a malformed error: {err}"))
                })?;
                let failed = FollowedLine::HostFailed {
                    code: error.code.to_string(),
                    chain: error.chain,
                };
                write(out, &failed)?;
                return Ok(Followed::HostFailed);
            }
            "source" => match serde_json::from_value::<HostedLine>(value) {
                Ok(HostedLine::Source { need }) => write(out, &FollowedLine::HostSource { need })?,
                _ => return Err(FollowError::Stream("its source line is malformed".into())),
            },
            "file" | "end" => {
                return Err(FollowError::Stream(
                    "it sent the record before the build finished".into(),
                ))
            }
            _ => {
                let event: BuildEvent = serde_json::from_value(value).map_err(|err| {
                    FollowError::Stream(format!("it wrote a malformed {kind:?} event: {err}"))
                })?;
                write(out, &event)?;
                if let BuildEvent::Finished { .. } = event {
                    let received = receipt::receive(reader.into_inner(), record, limit)?;
                    return Ok(Followed::Received(received));
                }
            }
        }
    }
}

/// The first line, `kind`, as the build host's hello.
fn checked_hello(kind: &str, value: serde_json::Value) -> Result<FollowedLine, FollowError> {
    if kind != "hello" {
        return Err(FollowError::Stream(format!(
            "its first line was not hello but type {kind:?}"
        )));
    }
    match serde_json::from_value::<HostedLine>(value) {
        Ok(HostedLine::Hello {
            version,
            contractor,
        }) => Ok(FollowedLine::HostHello {
            version,
            contractor,
        }),
        _ => Err(FollowError::Stream("its hello line is malformed".into())),
    }
}

fn write(out: &mut impl Write, line: &impl serde::Serialize) -> Result<(), FollowError> {
    write_line(out, line).map_err(FollowError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn followed(stream: &str) -> (Result<Followed, FollowError>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = Vec::new();
        let ended = follow(stream.as_bytes(), &mut out, dir.path(), 1 << 20);
        (ended, String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn only_checked_lines_are_written_on_and_a_bad_one_ends_the_stream() {
        let hello = r#"{"type":"hello","version":1,"contractor":"9.9.9"}"#;
        let (ended, out) = followed(&format!(
            "{hello}\n{{\"type\":\"output\",\"text\":\"hi\"}}\n{{\"type\":\"output\",\"text\":5}}\n"
        ));
        assert!(matches!(ended, Err(FollowError::Stream(_))), "{ended:?}");
        assert_eq!(
            out,
            "{\"type\":\"host_hello\",\"version\":1,\"contractor\":\"9.9.9\"}\n\
             {\"type\":\"output\",\"text\":\"hi\"}\n"
        );

        let (ended, out) = followed("{\"type\":\"started\"}\n");
        assert!(matches!(ended, Err(FollowError::Stream(_))), "{ended:?}");
        assert!(out.is_empty(), "{out}");

        let (ended, _) = followed(&format!("{hello}\n{{\"type\":\"end\",\"files\":0}}\n"));
        assert!(matches!(ended, Err(FollowError::Stream(_))), "{ended:?}");

        let (ended, out) = followed(&format!(
            "{hello}\n{{\"type\":\"error\",\"version\":1,\"code\":\"libvirt\",\"chain\":[\"down\"]}}\n"
        ));
        assert_eq!(ended.expect("host failed"), Followed::HostFailed);
        assert!(
            out.ends_with("{\"type\":\"host_failed\",\"code\":\"libvirt\",\"chain\":[\"down\"]}\n"),
            "{out}"
        );

        let (ended, _) = followed(hello);
        assert!(matches!(ended, Err(FollowError::Cut)), "{ended:?}");
    }
}
