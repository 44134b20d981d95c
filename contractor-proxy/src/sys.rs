//! The one conversion this crate needs that neither `std` nor `nix` offers safely: taking
//! ownership of a file descriptor the kernel just gave us with `SCM_RIGHTS`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Owns `fd`, a descriptor `recvmsg` has just installed in this process.
pub(crate) fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` comes from an SCM_RIGHTS control message that `recvmsg` returned just
    // now: the kernel installed it as a new descriptor of this process, nothing else has
    // seen it, so it is open and owned by no one else; it is closed once, by this OwnedFd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
