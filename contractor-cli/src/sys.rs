//! The front end's only `unsafe`: what neither std nor nix offers safely (starting a child
//! with a parent-death signal, asking a terminal its size).

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Makes the child of `command` receive SIGTERM when this process dies, however it dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, so tools are only
/// started from threads that live as long as the build (the main thread, or a thread that
/// waits for its child). If this process died before the child set the signal, the child
/// finds itself adopted and stops at once.
pub fn die_with_parent(command: &mut Command) {
    let parent = Pid::this();
    // SAFETY: the closure runs in the forked child before exec; it only makes the
    // async-signal-safe system calls prctl and getppid (nix's wrappers allocate
    // nothing), as `pre_exec` requires.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            if nix::unistd::getppid() != parent {
                // The exec is not carried out; the child exits.
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            Ok(())
        });
    }
}

mod ioctl {
    nix::ioctl_read_bad!(window_size, nix::libc::TIOCGWINSZ, nix::pty::Winsize);
}

/// The (columns, rows) of the terminal `tty` is, if it is one.
pub fn terminal_size(tty: &impl std::os::fd::AsRawFd) -> Option<(u16, u16)> {
    let mut size = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one Winsize through the pointer, which points to ours; a
    // descriptor that is no terminal makes it fail with ENOTTY, nothing else.
    unsafe { ioctl::window_size(tty.as_raw_fd(), &mut size) }.ok()?;
    Some((size.ws_col, size.ws_row))
}
