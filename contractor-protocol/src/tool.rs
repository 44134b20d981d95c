//! Starting and supervising Contractor's own executables, for every tool that starts
//! another (the front end, contractor-host, contractor-gitlab): where they are, how each is
//! started, how its JSON answers are read ([`answers`]), how it is stopped ([`stop`]) and how
//! Ctrl-C and SIGTERM reach what it started ([`signals`]).
//!
//! A tool is found in `$CONTRACTOR_BIN` when that is set, else beside the running executable
//! ([`Locator`]). Every child is started so that it is sent SIGTERM when this process dies,
//! SIGKILL included (`PR_SET_PDEATHSIG`, [`crate::process::die_with_parent`]): each tool
//! stops cleanly on SIGTERM (contractor-vm destroys the VM it holds), so a killed parent
//! leaves nothing running. Every error names the tool it is about ([`ToolError`]).

pub mod answers;
pub mod failure;
pub mod lines;
pub mod names;
pub mod signals;
pub mod stop;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use crate::error::{ErrorObject, ToolCode};
use crate::jsonl::JsonlError;
use crate::PROTOCOL_VERSION;

pub use answers::{answer_of, ask_of, send, text, Answers, Reply, MAX_TEXT_BYTES};
pub use failure::ToolFailure;
pub use lines::Lines;
pub use signals::{signal_name, Caught, SignalWatch};
pub use stop::{
    child_pid, handed_over, stop_child, wait_or_stop, Service, Signaller, Supervised, STOP_GRACE,
};

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
    /// A line of the tool's stdout is not the JSON it documents.
    #[error(
        "{name} wrote something other than its documented JSON: line {line}, starting {start}"
    )]
    Garbage {
        /// The tool.
        name: &'static str,
        /// The line's number in the tool's stdout (1-based).
        line: usize,
        /// The line's first [`answers::GARBAGE_SHOWN`] bytes, quoted and escaped.
        start: String,
        /// What was wrong with it.
        #[source]
        source: serde_json::Error,
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
    /// The failure of tool `name`, which ended with `exit_code` (None: killed by a signal)
    /// and wrote no error object.
    pub fn exited(name: &'static str, exit_code: Option<i32>) -> ToolError {
        ToolError::Failed {
            name,
            exit_code,
            error: None,
        }
    }

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

    /// The exit code that reports this failure: `BadInput` when the tool refused its input
    /// ([`ToolError::is_bad_input`]), `Infrastructure` otherwise.
    pub fn exit_code(&self) -> crate::ExitCode {
        match self.is_bad_input() {
            true => crate::ExitCode::BadInput,
            false => crate::ExitCode::Infrastructure,
        }
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

/// Where a program that starts tools finds them, and what it tells a user who has not put
/// them there.
#[derive(Debug, Clone, Copy)]
pub struct Locator {
    /// Whether the caller runs as a unit test (its `cfg!(test)`): the tools are then in
    /// the directory above the test's (see [`crate::process::tools_dir`]).
    pub unit_test: bool,
    /// The hint given for a missing tool when `$CONTRACTOR_BIN` is set.
    pub hint_env: &'static str,
    /// The hint given for a missing tool otherwise.
    pub hint_beside: &'static str,
}

impl Locator {
    /// The executable of tool `name`.
    pub fn locate(&self, name: &'static str) -> Result<PathBuf, ToolError> {
        let dir = crate::process::tools_dir(self.unit_test).map_err(|source| ToolError::Io {
            name: "contractor",
            source,
        })?;
        let path = dir.join(name);
        if crate::process::is_executable(&path) {
            Ok(path)
        } else {
            let hint = match std::env::var_os("CONTRACTOR_BIN") {
                Some(_) => self.hint_env,
                None => self.hint_beside,
            };
            Err(ToolError::Missing { name, path, hint })
        }
    }

    /// A command for tool `name` (started by [`spawn`] or [`text`], it dies with this
    /// process).
    pub fn command(&self, name: &'static str) -> Result<Command, ToolError> {
        Ok(Command::new(self.locate(name)?))
    }
}

/// Starts `command`, which dies with this process (`PR_SET_PDEATHSIG`, see
/// [`crate::process::die_with_parent`]): the one place a tool starts a process. Tools go
/// through [`spawn`] and [`text`], which also note them for [`signal_running`]; `ssh` to a
/// build host comes here directly (an interruption ends its session in order rather than
/// signal it).
pub fn start(command: &mut Command) -> std::io::Result<Child> {
    crate::process::die_with_parent(command);
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
    start_noted(name, &mut command)
}

/// Starts `command` (of tool `name`) as it is and notes it for [`signal_running`].
fn start_noted(name: &'static str, command: &mut Command) -> Result<Child, ToolError> {
    let child = start(command).map_err(|source| ToolError::Start {
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
        self.start.is_some() && crate::process::start_time(self.pid) == self.start
    }
}

/// The tools this process started that may still run ([`signal_running`]); those that
/// ended are dropped at each start, so it holds at most the tools running at once.
static STARTED: Mutex<Vec<StartedTool>> = Mutex::new(Vec::new());

fn note_started(child: &Child) {
    let tool = StartedTool {
        pid: child.id(),
        start: crate::process::start_time(child.id()),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// `sh -c SCRIPT`, a stand-in tool for the tests of this module (a `--json-errors`
    /// added after the script becomes its `$0`).
    pub(crate) fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn a_tool_chain_reads_as_an_error_and_its_causes() {
        // Moved with ToolMessages from contractor-cli's tools.rs.
        let chain = ["cannot read x".to_string(), "denied".to_string()];
        let messages = ToolMessages::from_chain(&chain).expect("messages");
        assert_eq!(crate::result::error_chain(&messages), chain);
        assert_eq!(ToolMessages::from_chain(&[]), None);
    }

    #[test]
    fn a_missing_tool_is_named_with_where_it_was_looked_for_and_the_hint() {
        let locator = Locator {
            unit_test: true,
            hint_env: "set in the environment",
            hint_beside: "looked for beside",
        };
        let err = locator
            .locate("contractor-no-such-tool")
            .expect_err("missing");
        let text = err.to_string();
        assert!(
            text.starts_with("the tool contractor-no-such-tool is missing: "),
            "{text}"
        );
        assert!(
            text.contains("contractor-no-such-tool is not an executable file"),
            "{text}"
        );
    }

    #[test]
    fn a_tool_started_here_gets_sigterm_when_the_thread_that_started_it_ends() {
        // PR_SET_PDEATHSIG fires when the thread that forked the child ends: a short-lived
        // thread stands in for a parent that died.
        let child = std::thread::spawn(|| {
            let mut command = Command::new("sleep");
            command.arg("30");
            spawn_reading("sleep", command, Stdio::null()).expect("spawn sleep")
        })
        .join()
        .expect("the spawning thread");
        let status = { child }.wait().expect("wait");
        assert_eq!(status.signal(), Some(nix::libc::SIGTERM), "{status:?}");
    }
}
