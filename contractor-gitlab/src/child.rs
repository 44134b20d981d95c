//! Runs one child process (bash for a runner stage, `contractor build` for a job stage) so
//! that the runner's cancel reaches it exactly once: SIGTERM and SIGINT are caught by this
//! process (`signal-hook`) and forwarded by a thread to the child, which runs in a process
//! group of its own (the runner's signal to this process's group would otherwise reach it
//! twice, and a second signal makes `contractor build` kill its tools instead of stopping
//! them). This process then waits for the child, so `run` ends only when the build has
//! destroyed its VM; killed (the runner's SIGKILL), it leaves the child SIGTERM
//! (`PR_SET_PDEATHSIG`), so no build outlives the job.
//!
//! The invariant: a pid is only signalled while its process has not been reaped (the wait
//! looks with `WNOWAIT` first), so a forwarded signal never reaches a reused pid.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Starts `command` in its own process group and waits for it, forwarding SIGTERM and
/// SIGINT to it.
pub fn run(command: &mut Command) -> std::io::Result<ExitStatus> {
    // Caught here (a signal that came before the child started is forwarded once it has),
    // not blocked: the child inherits the signal mask, and handlers reset at `execve`.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let handle = signals.handle();
    contractor_protocol::process::die_with_parent(command);
    let mut child = match command.process_group(0).spawn() {
        Ok(child) => child,
        Err(err) => {
            handle.close();
            return Err(err);
        }
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let running = Arc::new(Mutex::new(true));
    let forwarding = running.clone();
    std::thread::spawn(move || {
        for number in signals.forever() {
            let Ok(running) = forwarding.lock() else {
                return;
            };
            if let (true, Ok(signal)) = (*running, Signal::try_from(number)) {
                let _ = kill(pid, signal);
            }
        }
    });
    let exited = || waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
    while let Err(Errno::EINTR) = exited() {}
    if let Ok(mut running) = running.lock() {
        *running = false;
    }
    handle.close();
    child.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_childs_exit_status_is_returned() {
        let status = run(Command::new("sh").args(["-c", "exit 7"])).expect("sh runs");
        assert_eq!(status.code(), Some(7));
    }

    #[test]
    fn the_child_starts_with_no_signal_blocked() {
        // grep itself reads its status (a shell would clear its mask first): a blocked
        // SIGTERM would keep `contractor build` from ever seeing the runner's cancel.
        let dir = tempfile::tempdir().expect("test setup");
        let out = std::fs::File::create(dir.path().join("status")).expect("test setup");
        let status = run(Command::new("grep")
            .args(["SigBlk", "/proc/self/status"])
            .stdout(out))
        .expect("grep runs");
        assert!(status.success());
        let line = std::fs::read_to_string(dir.path().join("status")).expect("test setup");
        assert_eq!(line.trim_end(), "SigBlk:\t0000000000000000");
    }
}
