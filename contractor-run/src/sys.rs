//! The system calls contractor-run needs that `nix` has no safe wrapper for; everything else
//! goes through `nix`. Each `unsafe` block says why it is sound.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `ioctl(0, TIOCSCTTY, 0)`: makes the terminal on stdin the controlling terminal of the
/// calling session leader. Async-signal-safe (one system call, no allocation), so it may
/// run between fork and exec.
pub(crate) fn stdin_as_controlling_terminal() -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal the terminal), no
    // pointer; on a descriptor that is not a terminal it fails without effect.
    if unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `IFF_UP` on the network interface `name` (`ip link set NAME up`), through
/// `SIOCGIFFLAGS`/`SIOCSIFFLAGS` on `socket` (any `AF_INET` datagram socket).
pub(crate) fn interface_up(socket: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long or holding a NUL",
        ));
    }
    // The zeroed tail is the name's NUL terminator.
    for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the descriptor is a socket borrowed for the call, and `request` is a valid,
    // NUL-terminated ifreq that SIOCGIFFLAGS fills in.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds the interface's flags.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `request`.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
