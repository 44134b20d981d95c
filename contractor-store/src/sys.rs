//! The system calls contractor-store needs that `nix` has no safe wrapper for; everything
//! else goes through `nix`. Each `unsafe` block says why it is sound.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `sync_file_range(fd, offset, len, SYNC_FILE_RANGE_WRITE)`: starts writing back that
/// range of `file` without waiting for it.
pub(crate) fn start_writeback(file: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off64_t::try_from(offset).map_err(io::Error::other)?;
    let len = libc::off64_t::try_from(len).map_err(io::Error::other)?;
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is borrowed
    // from `file`, which outlives the call.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_fd().as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
