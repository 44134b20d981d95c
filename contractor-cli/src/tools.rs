//! The tools the front end composes: their names, and where the front end looks for them.
//! Starting them, reading their JSON answers and stopping them is
//! `contractor_protocol::tool`'s, shared with every tool that starts another.
//!
//! A tool is found in `$CONTRACTOR_BIN` when that is set, else beside the running
//! `contractor` executable (cargo and the installer put them together). Every tool is
//! started so that it is sent SIGTERM when this process dies, SIGKILL included
//! (`PR_SET_PDEATHSIG`): each tool stops cleanly on SIGTERM (contractor-vm destroys the VM
//! it holds and deletes its overlay), so a killed front end leaves nothing running.
//! (The unit tests of this crate, which run from `target/<profile>/deps/`, take the tools
//! from `target/<profile>/`: build them first, `cargo build --workspace`.)

use std::process::Command;

use contractor_protocol::tool::Locator;
pub use contractor_protocol::tool::{
    answer_of, ask_of, send, signal_running, spawn, spawn_reading, start, text, Answers, Lines,
    Reply, ToolError, ToolMessages, MAX_TEXT_BYTES,
};
use serde::de::DeserializeOwned;

/// The tools' names (`STORE`, `PROXY`, `VM`, `RUN`, `ATTEST`, `HOST`, `QEMU_LAUNCHER`).
pub use contractor_protocol::tool::names::*;

/// Where the front end looks for the tools.
const TOOLS: Locator = Locator {
    unit_test: cfg!(test),
    hint_env: "CONTRACTOR_BIN names the directory holding the tools",
    hint_beside: "the tools are looked for beside the contractor executable; set \
                  CONTRACTOR_BIN to their directory, or build them all with cargo build \
                  --workspace",
};

/// A command for tool `name` (started by [`spawn`] or [`text`], it dies with this process).
pub fn command(name: &'static str) -> Result<Command, ToolError> {
    TOOLS.command(name)
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

/// Tool `name`'s one answer to `request`, run with `args` (a subcommand), and its exit
/// code.
pub fn ask<R: serde::Serialize, T: DeserializeOwned>(
    name: &'static str,
    args: &[&str],
    request: &R,
) -> Result<(T, Option<i32>), ToolError> {
    let mut command = command(name)?;
    command.args(args);
    ask_of(name, command, request)
}
