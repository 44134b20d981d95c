//! What neither std nor nix offers safely: taking ownership of a descriptor the process
//! inherited by number (`--ready-fd N`), and starting a child with a parent-death signal.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Makes the child of `command` receive SIGTERM when the thread that forks it ends
/// (`crate::process::die_with_parent`).
pub(crate) fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::Pid::this();
    // SAFETY: the closure runs in the forked child before exec; it only makes the
    // async-signal-safe system calls prctl and getppid (nix's wrappers allocate
    // nothing), as `pre_exec` requires.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            if nix::unistd::getppid() != parent {
                // The exec is not carried out; the child exits.
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            Ok(())
        });
    }
}

/// Takes descriptor `fd`, inherited from the parent, as this process's own. Fails when no
/// descriptor `fd` is open. Call it at the start of `main`, before this process opens
/// anything: an `fd` that was not inherited could otherwise name a file of its own.
pub(crate) fn take_inherited(fd: RawFd) -> std::io::Result<OwnedFd> {
    // The link exists exactly while the descriptor is open (procfs, always mounted where
    // the tools run).
    std::fs::symlink_metadata(format!("/proc/self/fd/{fd}"))?;
    // SAFETY: `fd` is open (checked above) and, taken before this process opened anything,
    // it is the descriptor the caller named: inherited, and used by nothing else here, so
    // this OwnedFd is its only owner and closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
