//! The shell of a kept VM (`contractor build --keep`, `contractor shell`): after `done`, the
//! agent waits on the control port for a `shell` message, starts an interactive shell on a
//! pseudo-terminal in the build's working directory with the build's environment, and then
//! carries raw terminal bytes between the control port and the terminal until the shell
//! exits. No network is involved: the control port is a virtio-serial link.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use contractor_protocol::agent::{GuestMessage, Job};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::guest::agent::{script_env, send, AgentError, ShellRequest, WORK_DIR};

/// Serves one shell for `request` (the host's `shell` message, handed over by the control
/// reader with the rest of the channel). Returns when the shell has exited.
pub(crate) async fn serve<W>(request: ShellRequest, mut out: W, job: &Job) -> Result<(), AgentError>
where
    W: AsyncWrite + Unpin,
{
    let ShellRequest {
        cols,
        rows,
        term,
        input: lines,
    } = request;
    let (master, child) =
        spawn_shell(job, cols, rows, term.as_deref()).map_err(AgentError::Spawn)?;
    send(&mut out, &GuestMessage::ShellStarted).await?;

    // Bytes the host sent after its `shell` line are in the reader's buffer: keep them.
    let mut input = lines;
    let reader = File::from(master.try_clone().map_err(AgentError::Control)?);
    let mut terminal_in = tokio::fs::File::from_std(File::from(master));
    let mut terminal_out = tokio::fs::File::from_std(reader);
    let to_terminal = async {
        let _ = tokio::io::copy(&mut input, &mut terminal_in).await;
    };
    let from_terminal = async {
        // Ends when the shell and everything it started have closed the terminal (EIO).
        let _ = tokio::io::copy(&mut terminal_out, &mut out).await;
        let _ = out.flush().await;
    };
    tokio::select! {
        () = from_terminal => {}
        () = to_terminal => {}
    }
    let _ = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait()
    })
    .await;
    Ok(())
}

/// Starts `bash -i` (or `sh -i`) as a session leader on a new pseudo-terminal of the given
/// size; returns the terminal's master side and the child.
fn spawn_shell(
    job: &Job,
    cols: u16,
    rows: u16,
    term: Option<&str>,
) -> io::Result<(OwnedFd, std::process::Child)> {
    let size = nix::pty::Winsize {
        ws_row: if rows == 0 { 24 } else { rows },
        ws_col: if cols == 0 { 80 } else { cols },
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let nix::pty::OpenptyResult { master, slave } = nix::pty::openpty(&size, None)?;
    let shell = ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|s| std::path::Path::new(s).exists())
        .unwrap_or("/bin/sh");
    let mut env = script_env(job);
    env.insert("TERM".into(), term.unwrap_or("xterm-256color").to_string());
    let dir = if std::path::Path::new(WORK_DIR).is_dir() {
        WORK_DIR
    } else {
        "/"
    };
    let mut command = Command::new(shell);
    command
        .arg("-i")
        .env_clear()
        .envs(&env)
        .current_dir(dir)
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls
    // (setsid and ioctl, one system call each) and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()?;
            // stdin is the terminal: make it the session's controlling terminal.
            crate::sys::stdin_as_controlling_terminal()
        });
    }
    let child = command.spawn()?;
    Ok((master, child))
}
