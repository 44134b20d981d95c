//! `contractor-run shell`: the conversation with the agent of a kept VM that opens its
//! interactive shell, held here so that guest bytes are handled only in a confined process.
//!
//! The request is the first line of stdin ([`read_request`], at most [`MAX_REQUEST_BYTES`]);
//! the tool connects to the control channel ([`connect`]), confines itself, sends the
//! agent's `shell` message and skips what the agent said before (the end of its build) up
//! to `shell_started` ([`start`], each line at most [`CONTROL_LINE_MAX`]). From then on it
//! only carries bytes ([`carry`]): the rest of stdin to the guest, the guest's terminal
//! output to stdout, unread and unchanged, until the agent closes the channel (the shell
//! exited and the VM powers off).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use contractor_protocol::agent::{GuestMessage, HostMessage};
use contractor_protocol::error::ToolCode;
use contractor_protocol::run::ShellRequest;

pub use crate::control::CONTROL_LINE_MAX;

/// Most bytes of the request line on stdin, newline excluded: 64 KiB (65,536 bytes).
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Why the shell could not be carried.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The control channel's socket did not accept the connection.
    #[error(
        "cannot connect to the VM's control channel {}: is the VM still running? (`virsh list`)",
        socket.display()
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent closed the channel before it started the shell.
    #[error("the VM closed its control channel before the shell started")]
    ClosedEarly,
    /// The agent sent a line longer than [`CONTROL_LINE_MAX`] before the shell.
    #[error("the agent sent a control line longer than {CONTROL_LINE_MAX} bytes")]
    LineTooLong,
    /// Reading or writing the control channel failed.
    #[error("the shell's control channel failed")]
    Channel(#[source] std::io::Error),
    /// Writing the terminal's bytes to stdout failed.
    #[error("cannot write the shell's output to stdout")]
    Stdout(#[source] std::io::Error),
}

impl ShellError {
    /// The error's code in the tool's error object.
    pub fn code(&self) -> ToolCode {
        match self {
            ShellError::Connect { .. } => ToolCode::Connect,
            ShellError::ClosedEarly => ToolCode::ChannelClosed,
            ShellError::LineTooLong => ToolCode::ControlLineTooLong,
            ShellError::Channel(_) => ToolCode::Channel,
            ShellError::Stdout(_) => ToolCode::Stdout,
        }
    }
}

/// What reading the request line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum RequestLine {
    /// The line, without its newline.
    Text(Vec<u8>),
    /// Stdin ended before any byte.
    Empty,
    /// The line passed [`MAX_REQUEST_BYTES`].
    TooLong,
}

/// Reads the request line from `input`, leaving what follows it (the keyboard) unread.
pub fn read_request<R: BufRead>(input: &mut R) -> std::io::Result<RequestLine> {
    let mut line = Vec::new();
    let n = input
        .take(MAX_REQUEST_BYTES + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(RequestLine::Empty);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.len() as u64 > MAX_REQUEST_BYTES {
        return Ok(RequestLine::TooLong);
    }
    Ok(RequestLine::Text(line))
}

/// Connects to the control channel of `request`.
pub fn connect(request: &ShellRequest) -> Result<UnixStream, ShellError> {
    UnixStream::connect(&request.control_socket).map_err(|source| ShellError::Connect {
        socket: request.control_socket.clone(),
        source,
    })
}

/// Asks the agent on `channel` for its shell and waits for `shell_started`, reading
/// `guest` (the channel too, cloned before confinement); returns that reader, holding
/// whatever the agent sent after it.
pub fn start(
    channel: &mut UnixStream,
    guest: UnixStream,
    request: &ShellRequest,
) -> Result<BufReader<UnixStream>, ShellError> {
    let message = HostMessage::Shell {
        cols: request.cols,
        rows: request.rows,
        term: request.term.clone(),
    };
    let mut line =
        serde_json::to_vec(&message).map_err(|e| ShellError::Channel(std::io::Error::other(e)))?;
    line.push(b'\n');
    channel.write_all(&line).map_err(ShellError::Channel)?;
    let mut reader = BufReader::new(guest);
    loop {
        line.clear();
        let n = (&mut reader)
            .take(CONTROL_LINE_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(ShellError::Channel)?;
        if n == 0 {
            return Err(ShellError::ClosedEarly);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.len() > CONTROL_LINE_MAX {
            return Err(ShellError::LineTooLong);
        }
        if let Ok(GuestMessage::ShellStarted) = serde_json::from_slice(&line) {
            return Ok(reader);
        }
    }
}

/// Carries the keyboard (`keys`, read on a thread of its own) to `channel`, and the guest's
/// bytes from `guest` to `screen`, until the guest closes the channel. The keyboard's end
/// only stops its thread (as a terminal's Ctrl-D is a byte for the guest's shell to read);
/// that thread may stay blocked on `keys` when the shell ends.
pub fn carry<K, W>(
    keys: K,
    mut channel: UnixStream,
    mut guest: BufReader<UnixStream>,
    screen: &mut W,
) -> Result<(), ShellError>
where
    K: Read + Send + 'static,
    W: Write,
{
    std::thread::spawn(move || {
        let mut keys = keys;
        let mut buf = [0u8; 4096];
        loop {
            match keys.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if channel.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    let mut buf = [0u8; 4096];
    loop {
        let n = match guest.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ShellError::Channel(e)),
        };
        screen
            .write_all(&buf[..n])
            .and_then(|()| screen.flush())
            .map_err(ShellError::Stdout)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_one_bounded_line_and_the_keyboard_stays_unread() {
        let mut input = &b"{\"version\":1}\nls\n"[..];
        assert_eq!(
            read_request(&mut input).expect("read"),
            RequestLine::Text(b"{\"version\":1}".to_vec())
        );
        assert_eq!(input, b"ls\n");
        assert_eq!(
            read_request(&mut &b""[..]).expect("read"),
            RequestLine::Empty
        );
        let long = vec![b'x'; MAX_REQUEST_BYTES as usize + 1];
        assert_eq!(
            read_request(&mut &long[..]).expect("read"),
            RequestLine::TooLong
        );
    }

    #[test]
    fn the_agent_s_last_build_messages_are_skipped_and_its_bytes_after_the_shell_kept() {
        let (mut host, agent) = UnixStream::pair().expect("pair");
        let request = ShellRequest {
            version: 1,
            control_socket: PathBuf::from("/unused"),
            cols: 80,
            rows: 24,
            term: Some("vt100".into()),
        };
        let mut agent_writer = agent.try_clone().expect("clone");
        agent_writer
            .write_all(b"{\"type\":\"done\"}\nnot json\n{\"type\":\"shell_started\"}\n$ ")
            .expect("agent");
        drop(agent_writer);
        agent.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let guest = host.try_clone().expect("clone");
        let mut reader = start(&mut host, guest, &request).expect("started");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).expect("rest");
        assert_eq!(rest, b"$ ");
        let mut sent = String::new();
        BufReader::new(agent).read_line(&mut sent).expect("request");
        let sent: HostMessage = serde_json::from_str(&sent).expect("a shell message");
        assert_eq!(
            sent,
            HostMessage::Shell {
                cols: 80,
                rows: 24,
                term: Some("vt100".into())
            }
        );
    }

    #[test]
    fn a_channel_that_closes_before_the_shell_is_an_error() {
        let (mut host, agent) = UnixStream::pair().expect("pair");
        let request = ShellRequest {
            version: 1,
            control_socket: PathBuf::from("/unused"),
            cols: 0,
            rows: 0,
            term: None,
        };
        agent.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let guest = host.try_clone().expect("clone");
        let err = start(&mut host, guest, &request).expect_err("no shell");
        assert_eq!(err.code(), ToolCode::ChannelClosed);
    }
}
