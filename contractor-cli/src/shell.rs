//! `contractor shell`: an interactive shell in a kept VM, over its control channel.
//!
//! The client sends one `shell` message (terminal size and type), skips whatever the agent
//! said before (its last build messages) up to `shell_started`, then puts the terminal in
//! raw mode and carries bytes both ways until the agent closes the shell. The VM powers off
//! when the shell exits; the client then destroys what is left of it and its record file.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use contractor_protocol::agent::{GuestMessage, HostMessage};
use contractor_protocol::vm::VmResult;
use nix::sys::termios::{self, SetArg, Termios};

use crate::build::{KeptVm, KEPT_VM_FILE};

/// Why a shell could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The record has no kept VM.
    #[error(
        "build {id} has no kept VM ({} is missing): run `contractor build --keep`, or \
         `contractor shell` without an id for a fresh VM",
        file.display()
    )]
    NotKept {
        /// The build id.
        id: String,
        /// The file that would name the VM.
        file: std::path::PathBuf,
    },
    /// `vm.json` is unreadable.
    #[error("cannot read {}", file.display())]
    Record {
        /// The file.
        file: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The control channel did not answer.
    #[error("cannot reach VM {name} on {}: is it still running? (`virsh list`)", socket.display())]
    Connect {
        /// The VM.
        name: String,
        /// Its control socket.
        socket: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The conversation with the agent failed.
    #[error("the shell's control channel failed")]
    Io(#[source] std::io::Error),
}

/// Reads the kept VM of the build record `record` (build `id`).
pub fn kept_vm(record: &Path, id: &str) -> Result<KeptVm, ShellError> {
    let file = record.join(KEPT_VM_FILE);
    let text = match contractor_protocol::file::read_regular(&file, 64 * 1024) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ShellError::NotKept {
                id: id.to_string(),
                file,
            })
        }
        Err(e) => {
            return Err(ShellError::Record {
                file,
                source: e.into(),
            })
        }
    };
    serde_json::from_slice(&text).map_err(|e| ShellError::Record {
        file,
        source: e.into(),
    })
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
    let _ = std::fs::remove_file(record.join(KEPT_VM_FILE));
    result
}

fn converse(vm: &KeptVm) -> Result<(), ShellError> {
    let stream = UnixStream::connect(&vm.control_socket).map_err(|source| ShellError::Connect {
        name: vm.name.clone(),
        socket: vm.control_socket.clone(),
        source,
    })?;
    let (cols, rows) = terminal_size();
    let request = HostMessage::Shell {
        cols,
        rows,
        term: std::env::var("TERM").ok().filter(|t| !t.is_empty()),
    };
    let mut writer = stream.try_clone().map_err(ShellError::Io)?;
    contractor_protocol::jsonl::write_line(&mut writer, &request)
        .map_err(|e| ShellError::Io(std::io::Error::other(e)))?;

    // Skip what the agent said before the shell (the end of its build), up to shell_started.
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(ShellError::Io)? == 0 {
            return Err(ShellError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VM closed the channel before the shell started",
            )));
        }
        if let Ok(GuestMessage::ShellStarted) = serde_json::from_str(line.trim_end()) {
            break;
        }
    }

    let _raw = RawMode::enter();
    // Keyboard to the VM; this thread may stay blocked on stdin when the shell ends.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if writer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    // The VM to the screen, until the shell exits and the VM powers off.
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = stdout.write_all(&buf[..n]);
                let _ = stdout.flush();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(())
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
