//! `contractor shell`: an interactive shell in a kept VM, through `contractor-run shell`.
//!
//! The front end keeps only the user's terminal: it starts `contractor-run shell` with the
//! request (the VM's control socket, the terminal's size and type) as the first line of its
//! stdin, waits for its `shell_started` line, then puts the terminal in raw mode and carries
//! bytes between the terminal and the tool until the tool ends (the shell exited and the VM
//! powers off). The VM's channel is opened, and the agent spoken to, only by that confined
//! tool. Then the front end destroys what is left of the VM and has the store remove its
//! record file (`contractor-store record forget-vm`).

use std::ffi::OsStr;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;

use contractor_protocol::run::{ShellEvent, ShellRequest};
use contractor_protocol::store::KeptVm;
use contractor_protocol::vm::VmResult;
use contractor_protocol::PROTOCOL_VERSION;
use nix::sys::termios::{self, SetArg, Termios};

use crate::tools::{Answers, ToolError, RUN};

/// Why a shell could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// `contractor-run shell` could not open the shell, or failed while carrying it.
    #[error("cannot open the shell in VM {name}")]
    Run {
        /// The VM.
        name: String,
        /// Why.
        #[source]
        source: ToolError,
    },
}

/// Opens the shell in `vm` and returns when it has ended; then destroys the VM and removes
/// `record`'s `vm.json`.
pub fn attach(vm: &KeptVm, record: &Path) -> Result<(), ShellError> {
    let result = converse(vm);
    let args = [
        OsStr::new("destroy"),
        OsStr::new("--name"),
        OsStr::new(&vm.name),
        OsStr::new("--uri"),
        OsStr::new(&vm.uri),
    ];
    match crate::tools::answer::<VmResult>(crate::tools::VM, &args) {
        Ok(_) => {}
        Err(err) if err.tool_code() == Some(&contractor_protocol::error::ToolCode::NotFound) => {}
        Err(err) => eprintln!(
            "contractor: cannot destroy VM {}: {}",
            vm.name,
            contractor_protocol::result::joined_chain(&err)
        ),
    }
    if let Err(err) = crate::records::forget_kept_vm(record) {
        eprintln!("contractor: cannot remove the record's vm.json: {err}");
    }
    result
}

fn converse(vm: &KeptVm) -> Result<(), ShellError> {
    let failed = |source| ShellError::Run {
        name: vm.name.clone(),
        source,
    };
    let (cols, rows) = terminal_size();
    let request = ShellRequest {
        version: PROTOCOL_VERSION,
        control_socket: vm.control_socket.clone(),
        cols,
        rows,
        term: std::env::var("TERM").ok().filter(|t| !t.is_empty()),
    };
    let mut command = crate::tools::command(RUN).map_err(failed)?;
    // Its messages go to the user's stderr as they are; the front end adds its own line.
    command.arg("shell");
    let mut child = crate::tools::spawn(RUN, command).map_err(failed)?;
    let mut keys = crate::tools::send(RUN, &mut child, &request).map_err(failed)?;
    let mut answers = Answers::of(RUN, &mut child).map_err(failed)?;
    let ShellEvent::ShellStarted { .. } = answers.first(&mut child).map_err(failed)?;

    let raw = RawMode::enter();
    // Keyboard to the tool; this thread may stay blocked on stdin when the shell ends.
    std::thread::spawn(move || std::io::copy(&mut std::io::stdin().lock(), &mut keys));
    // The shell's terminal bytes to the screen (each read at once, prompts included).
    let (mut screen, mut buf) = (std::io::stdout(), [0u8; 4096]);
    loop {
        match answers.rest().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => drop(screen.write_all(&buf[..n]).and_then(|()| screen.flush())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(raw);
    match child.wait() {
        Ok(status) if status.success() => Ok(()),
        status => Err(failed(ToolError::exited(
            RUN,
            status.ok().and_then(|s| s.code()),
        ))),
    }
}

fn terminal_size() -> (u16, u16) {
    crate::sys::terminal_size(&std::io::stdin()).unwrap_or((0, 0))
}

/// The terminal in raw mode (keys go to the VM's shell as typed, Ctrl-C included) while it
/// lives; restored when dropped. Nothing happens when stdin is not a terminal.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, saved);
        }
    }
}
