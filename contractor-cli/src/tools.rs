//! The tools the front end composes: where their executables are, how each is started, and
//! how their JSON answers are read.
//!
//! A tool is found in `$CONTRACTOR_BIN` when that is set, else beside the running
//! `contractor` executable (cargo and the installer put them together). Every tool is
//! started so that it is sent SIGTERM when this process dies, SIGKILL included
//! (`PR_SET_PDEATHSIG`): each tool stops cleanly on SIGTERM (contractor-vm destroys the VM
//! it holds and deletes its overlay), so a killed front end leaves nothing running.
//! (The unit tests of this crate, which run from `target/<profile>/deps/`, take the tools
//! from `target/<profile>/`: build them first, `cargo build --workspace`.)

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use contractor_protocol::error::{ErrorObject, ToolCode};
use contractor_protocol::jsonl::{JsonlError, JsonlReader};
use contractor_protocol::PROTOCOL_VERSION;
use serde::de::DeserializeOwned;

/// The store tool.
pub const STORE: &str = "contractor-store";
/// The proxy tool.
pub const PROXY: &str = "contractor-proxy";
/// The VM tool.
pub const VM: &str = "contractor-vm";
/// The run tool.
pub const RUN: &str = "contractor-run";
/// The provenance tool (signs, verifies, holds the key).
pub const ATTEST: &str = "contractor-attest";
/// The build hosts' tool (`send` runs a session with a build host, `hosts` reports them).
pub const HOST: &str = "contractor-host";
/// The launcher that confines QEMU under `qemu:///session` (started by libvirt, found by
/// `contractor-vm`).
pub const QEMU_LAUNCHER: &str = "contractor-qemu";

/// Why a tool could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The executable is not where tools are looked for.
    #[error("the tool {name} is missing: {} is not an executable file ({hint})", path.display())]
    Missing {
        /// The tool.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to fix it.
        hint: &'static str,
    },
    /// The executable could not be started.
    #[error("cannot start {name} ({})", path.display())]
    Start {
        /// The tool.
        name: &'static str,
        /// The executable.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the tool failed.
    #[error("cannot talk to {name}")]
    Io {
        /// The tool.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be written to the tool's stdin.
    #[error("cannot send the request to {name}")]
    Request {
        /// The tool.
        name: &'static str,
        /// Why.
        #[source]
        source: JsonlError,
    },
    /// The tool said something that is not its documented JSON.
    #[error("{name} wrote something other than its documented JSON")]
    Protocol {
        /// The tool.
        name: &'static str,
        /// What was wrong.
        #[source]
        source: JsonlError,
    },
    /// The tool speaks another protocol version.
    #[error(
        "{name} speaks protocol version {got}, this contractor speaks {PROTOCOL_VERSION}: \
         install the tools of one release together"
    )]
    Version {
        /// The tool.
        name: &'static str,
        /// Its version.
        got: u32,
    },
    /// The tool reported an error (its `--json-errors` object), or ended without answering.
    #[error("{name} failed ({}){}", exit_text(*.exit_code), chain_text(.error))]
    Failed {
        /// The tool.
        name: &'static str,
        /// Its exit code, if it exited.
        exit_code: Option<i32>,
        /// Its error object, if it wrote one.
        error: Option<ErrorObject>,
    },
}

fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".into(),
    }
}

fn chain_text(error: &Option<ErrorObject>) -> String {
    match error {
        Some(error) => format!(": {}", error.chain.join(": ")),
        None => ": it wrote no answer; its own message is above".into(),
    }
}

impl ToolError {
    /// The code of the tool's own error object, if it wrote one.
    pub fn tool_code(&self) -> Option<&ToolCode> {
        match self {
            ToolError::Failed {
                error: Some(error), ..
            } => Some(&error.code),
            _ => None,
        }
    }

    /// The messages of the tool's own error object, as an error whose sources are its
    /// causes; None when it wrote no object (or an empty one).
    pub fn messages(&self) -> Option<ToolMessages> {
        match self {
            ToolError::Failed {
                error: Some(error), ..
            } => ToolMessages::from_chain(&error.chain),
            _ => None,
        }
    }

    /// True when the tool refused its input (exit code 2) rather than failing.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ToolError::Failed {
                exit_code: Some(2),
                ..
            }
        )
    }
}

/// A tool's error chain (the `chain` of its error object) as a Rust error: the first
/// message, caused by the next, and so on, so that a report of it reads as if the work had
/// been done in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolMessages {
    message: String,
    cause: Option<Box<ToolMessages>>,
}

impl ToolMessages {
    /// The error for `chain`, outermost first; None when it is empty.
    pub fn from_chain(chain: &[String]) -> Option<ToolMessages> {
        chain.iter().rev().fold(None, |cause, message| {
            Some(ToolMessages {
                message: message.clone(),
                cause: cause.map(Box::new),
            })
        })
    }
}

impl std::fmt::Display for ToolMessages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ToolMessages {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|cause| cause as &(dyn std::error::Error + 'static))
    }
}

/// The directory the tools are taken from.
pub fn directory() -> Result<PathBuf, ToolError> {
    contractor_protocol::process::tools_dir(cfg!(test)).map_err(|source| ToolError::Io {
        name: "contractor",
        source,
    })
}

/// The executable of tool `name`.
pub fn locate(name: &'static str) -> Result<PathBuf, ToolError> {
    let path = directory()?.join(name);
    if contractor_protocol::process::is_executable(&path) {
        Ok(path)
    } else {
        let hint = if std::env::var_os("CONTRACTOR_BIN").is_some() {
            "CONTRACTOR_BIN names the directory holding the tools"
        } else {
            "the tools are looked for beside the contractor executable; set CONTRACTOR_BIN to \
             their directory, or build them all with cargo build --workspace"
        };
        Err(ToolError::Missing { name, path, hint })
    }
}

/// A command for tool `name` (started by [`spawn`] or [`text`], it dies with this process).
pub fn command(name: &'static str) -> Result<Command, ToolError> {
    Ok(Command::new(locate(name)?))
}

/// Starts `command`, which dies with this process (`PR_SET_PDEATHSIG`, see
/// `contractor_protocol::process::die_with_parent`): the one place the front end starts a
/// process. The tools go through [`spawn`] and [`text`], which also note them for
/// [`signal_running`].
pub fn start(command: &mut Command) -> std::io::Result<Child> {
    contractor_protocol::process::die_with_parent(command);
    command.spawn()
}

/// Starts `command` (of tool `name`) with piped stdin and stdout.
pub fn spawn(name: &'static str, command: Command) -> Result<Child, ToolError> {
    spawn_reading(name, command, Stdio::piped())
}

/// Starts `command` (of tool `name`) reading `stdin`, with its stdout piped.
pub fn spawn_reading(
    name: &'static str,
    mut command: Command,
    stdin: Stdio,
) -> Result<Child, ToolError> {
    command.stdin(stdin).stdout(Stdio::piped());
    let child = start(&mut command).map_err(|source| ToolError::Start {
        name,
        path: PathBuf::from(command.get_program()),
        source,
    })?;
    note_started(&child);
    Ok(child)
}

/// A tool this process started: its pid and start time, so that a pid reused by another
/// process is never signalled.
#[derive(Clone, Copy)]
struct StartedTool {
    pid: u32,
    start: Option<u64>,
}

impl StartedTool {
    /// Whether it still runs (or has ended and not been waited for yet).
    fn runs(self) -> bool {
        self.start.is_some() && contractor_protocol::process::start_time(self.pid) == self.start
    }
}

/// The tools this process started that may still run ([`signal_running`]); those that
/// ended are dropped at each start, so it holds at most the tools running at once.
static STARTED: Mutex<Vec<StartedTool>> = Mutex::new(Vec::new());

fn note_started(child: &Child) {
    let tool = StartedTool {
        pid: child.id(),
        start: contractor_protocol::process::start_time(child.id()),
    };
    if let Ok(mut started) = STARTED.lock() {
        started.retain(|t| t.runs());
        started.push(tool);
    }
}

/// Sends `signal` to every tool this process started that still runs: how an interrupted
/// build stops whatever it waits for.
pub fn signal_running(signal: nix::sys::signal::Signal) {
    if let Ok(started) = STARTED.lock() {
        for tool in started.iter().filter(|t| t.runs()) {
            let pid = i32::try_from(tool.pid).unwrap_or(i32::MAX);
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }
}

/// The reader of a tool's stdout: JSON Lines, each at most
/// [`contractor_protocol::jsonl::MAX_LINE_BYTES`].
pub struct Answers {
    name: &'static str,
    reader: JsonlReader<BufReader<ChildStdout>>,
}

impl Answers {
    /// Reads the stdout of `child`, which runs tool `name` (started by [`spawn`], so with
    /// its stdout on a pipe that nobody has taken yet).
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
        let value: Option<serde_json::Value> =
            self.reader
                .next_message()
                .map_err(|source| ToolError::Protocol {
                    name: self.name,
                    source,
                })?;
        let Some(value) = value else {
            return Ok(None);
        };
        if let Some(got) = value["version"].as_u64() {
            if got != u64::from(PROTOCOL_VERSION) {
                return Err(ToolError::Version {
                    name: self.name,
                    got: u32::try_from(got).unwrap_or(u32::MAX),
                });
            }
        }
        if value["type"] == "error" {
            if let Ok(error) = serde_json::from_value::<ErrorObject>(value.clone()) {
                return Ok(Some(Reply::Error(error)));
            }
        }
        serde_json::from_value(value)
            .map(|v| Some(Reply::Answer(v)))
            .map_err(|source| ToolError::Protocol {
                name: self.name,
                source: JsonlError::Parse { line: 0, source },
            })
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

/// Runs tool `name` with `args` to completion, stdin from `/dev/null`, and returns its one
/// JSON answer.
pub fn answer<T: DeserializeOwned>(
    name: &'static str,
    args: &[&std::ffi::OsStr],
) -> Result<T, ToolError> {
    let mut command = command(name)?;
    command.args(args);
    answer_of(name, command)
}

/// [`answer`] of tool `name` run by `command` (e.g. over `ssh` on a build host), with
/// `--json-errors` added to its arguments.
pub fn answer_of<T: DeserializeOwned>(
    name: &'static str,
    mut command: Command,
) -> Result<T, ToolError> {
    command.arg("--json-errors");
    let mut child = spawn(name, command)?;
    drop(child.stdin.take());
    let mut answers = Answers::of(name, &mut child)?;
    let answer = answers.first(&mut child)?;
    answers.drain();
    let status = child
        .wait()
        .map_err(|source| ToolError::Io { name, source })?;
    if status.success() {
        Ok(answer)
    } else {
        Err(ToolError::Failed {
            name,
            exit_code: status.code(),
            error: None,
        })
    }
}

/// Runs tool `name` to completion with `request` as its stdin (one JSON line) and returns
/// its one JSON answer and its exit code: an answer with a non-zero exit (a verdict that
/// does not verify) is the caller's to judge. The tool's stderr is kept (at most
/// [`MAX_TEXT_BYTES`]) and shown only when it failed without its error object: what it
/// says otherwise is in its answer or its error object, which the caller reports once.
pub fn ask<R: serde::Serialize, T: DeserializeOwned>(
    name: &'static str,
    request: &R,
) -> Result<(T, Option<i32>), ToolError> {
    ask_of(name, command(name)?, request)
}

/// [`ask`] of tool `name` run by `command` (with its subcommand).
pub fn ask_of<R: serde::Serialize, T: DeserializeOwned>(
    name: &'static str,
    mut command: Command,
    request: &R,
) -> Result<(T, Option<i32>), ToolError> {
    command.arg("--json-errors").stderr(Stdio::piped());
    let mut child = spawn(name, command)?;
    let stderr = child.stderr.take();
    let said = std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(mut stderr) = stderr {
            let _ = (&mut stderr).take(MAX_TEXT_BYTES).read_to_end(&mut kept);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        }
        kept
    });
    if let Some(mut stdin) = child.stdin.take() {
        // A tool that exits early closes its stdin: its answer (or error) says why.
        let _ = contractor_protocol::jsonl::write_line(&mut stdin, request);
    }
    let answered = Answers::of(name, &mut child).and_then(|mut answers| {
        let answer = answers.first(&mut child)?;
        answers.drain();
        Ok(answer)
    });
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

/// The most bytes of plain text read from a tool's stdout by [`text`].
pub const MAX_TEXT_BYTES: u64 = 64 * 1024;

/// Runs `command` (tool `name`) to completion, stdin from `/dev/null`, and returns its
/// stdout as trimmed text (at most [`MAX_TEXT_BYTES`]).
pub fn text(name: &'static str, mut command: Command) -> Result<String, ToolError> {
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = start(&mut command).map_err(|source| ToolError::Start {
        name,
        path: PathBuf::from(command.get_program()),
        source,
    })?;
    note_started(&child);
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
        return Err(ToolError::Failed {
            name,
            exit_code: status.code(),
            error: None,
        });
    }
    Ok(String::from_utf8_lossy(&out).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_chain_reads_as_an_error_and_its_causes() {
        let chain = ["cannot read x".to_string(), "denied".to_string()];
        let messages = ToolMessages::from_chain(&chain).expect("messages");
        assert_eq!(contractor_protocol::result::error_chain(&messages), chain);
        assert_eq!(ToolMessages::from_chain(&[]), None);
    }
}
