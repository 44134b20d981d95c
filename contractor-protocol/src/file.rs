//! Opening files that someone else chose: the project's tree, a build record the guest wrote
//! into, a store directory shipped inside a project. One copy for every tool.
//!
//! The invariant: nothing but a regular file is ever opened for reading, a symbolic link in
//! the last component is never followed, a FIFO never blocks the reader, and the type is
//! checked again on the opened file, so one swapped between a check and the open is caught.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading only if it is a regular file: never follows a symlink in its
/// last component, never blocks on a FIFO, never takes a terminal, and checks the type of
/// what was opened (so a file swapped between a check and the open is caught).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // O_NOFOLLOW's answer for a link in the last component.
            Some(libc::ELOOP) => std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "it is a symbolic link, not a regular file",
            ),
            _ => e,
        })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", kind_name(kind)),
        ));
    }
    Ok(file)
}

/// Reads the regular file `path` (see [`open_regular`]) if it has at most `max` bytes; a
/// bigger one is an error (`InvalidData`), and at most `max + 1` bytes are ever read.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is bigger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// [`read_regular`], with a file that does not exist as `None`: how a record's optional
/// files (`result.json`, `downloads.jsonl`, ...) are read back, by every reader of records.
pub fn read_regular_if_exists(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    match read_regular(path, max) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The most bytes of a record's `downloads.jsonl` that are read: what a build writes
/// (64 MiB, then a `cut` line) and a margin.
pub const MAX_DOWNLOADS_FILE: u64 = 65 << 20;

/// What a file type is, for messages: "a FIFO", "a symbolic link", ….
pub fn kind_name(kind: std::fs::FileType) -> &'static str {
    if kind.is_file() {
        "a regular file"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_char_device() {
        "a character device"
    } else {
        "a special file"
    }
}

/// Creates `dir` and its parents with mode 0755 (less the umask), so that libvirt's QEMU
/// user can reach what is inside when it runs as another user.
pub fn create_dir_world_readable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    }

    #[test]
    fn opening_a_fifo_as_a_regular_file_fails_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        mkfifo(&dir.path().join("fifo"));
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).expect("symlink");
        let err = open_regular(&dir.path().join("fifo")).expect_err("a fifo");
        assert_eq!(err.to_string(), "it is a FIFO, not a regular file");
        assert!(open_regular(&dir.path().join("link")).is_err(), "a link");
    }

    #[test]
    fn a_file_bigger_than_the_bound_is_refused_by_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, "12345").expect("write");
        assert_eq!(read_regular(&path, 5).expect("5 bytes"), b"12345");
        let err = read_regular(&path, 4).expect_err("too big");
        assert_eq!(err.to_string(), "it is bigger than 4 bytes");
    }
}
