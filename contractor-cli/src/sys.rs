//! The front end's only `unsafe`: what neither std nor nix offers safely (asking a
//! terminal its size). Children get their parent-death signal from
//! `contractor_protocol::process::die_with_parent`, through `contractor_protocol::tool::start`.

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
