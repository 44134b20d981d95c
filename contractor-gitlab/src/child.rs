//! Runs one child process (bash for a runner stage, `contractor build` for a job stage) so
//! that the runner's cancel reaches it exactly once: SIGTERM and SIGINT are caught by this
//! process (`signal-hook`) and forwarded by a thread to the child, which runs in a process
//! group of its own (the runner's signal to this process's group would otherwise reach it
//! twice, and a second signal makes `contractor build` kill its tools instead of stopping
//! them). This process then waits for the child, so `run` ends only when the build has
//! destroyed its VM; killed (the runner's SIGKILL), it leaves the child SIGTERM
//! (`PR_SET_PDEATHSIG`), so no build outlives the job.
//!
//! The invariant: a pid is only signalled while its process has not been reaped
//! (`contractor_protocol::tool::Supervised`), so a forwarded signal never reaches a reused
//! pid.

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};

use contractor_protocol::tool::Supervised;
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Starts `command` in its own process group and waits for it, forwarding SIGTERM and
/// SIGINT to it.
pub fn run(command: &mut Command) -> std::io::Result<ExitStatus> {
    // Caught here (a signal that came before the child started is forwarded once it has),
    // not blocked: the child inherits the signal mask, and handlers reset at `execve`.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let handle = signals.handle();
    let child = match Supervised::start(command.process_group(0)) {
        Ok(child) => child,
        Err(err) => {
            handle.close();
            return Err(err);
        }
    };
    let signaller = child.signaller();
    std::thread::spawn(move || {
        for number in signals.forever() {
            if let Ok(signal) = Signal::try_from(number) {
                signaller.signal(signal);
            }
        }
    });
    let status = child.wait();
    handle.close();
    status
}

#[cfg(test)]
mod tests {
    use super::*;

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
