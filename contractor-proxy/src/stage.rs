//! Staging of pinned bodies: a download whose URL is pinned (`--pins`) is read whole into
//! a temporary file, hashed, and only then served (with `Content-Length`, from the file), so
//! that no client can ever end a message holding bytes that were not verified.
//!
//! The file is unnamed: an `O_TMPFILE` in the download cache's `tmp/` directory when there
//! is a cache (the one directory the confined proxy may write), else a `memfd` (memory).
//! Nothing is left behind on any exit: the file goes when its last descriptor closes. The
//! bytes staged at once are bounded by medium, across the whole process: at most
//! [`MAX_STAGED_ON_DISK`] in the cache's directory, [`MAX_STAGED_IN_MEMORY`] in memory; a
//! body that would go over is refused ([`StageError::TooLarge`]).

use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::stat::Mode;

/// The most bytes staged at once in the download cache's `tmp/` directory (8 GiB).
pub const MAX_STAGED_ON_DISK: u64 = 8 << 30;

/// The most bytes staged at once in memory, when there is no cache directory (512 MiB).
pub const MAX_STAGED_IN_MEMORY: u64 = 512 << 20;

/// Where pinned bodies are staged, and how many bytes are staged now.
#[derive(Debug)]
pub struct Stager {
    /// The directory for unnamed files (`<cache>/tmp`), if any.
    dir: Option<PathBuf>,
    on_disk: AtomicU64,
    in_memory: AtomicU64,
}

/// Why a body could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// No temporary file could be made.
    #[error("cannot make a file to stage the body in")]
    Create(#[source] io::Error),
    /// Writing the file failed.
    #[error("cannot stage the body")]
    Write(#[source] io::Error),
    /// The body is larger than the room left.
    #[error(
        "the pinned body is over the {limit} bytes that may be staged {medium} at once, so it \
         cannot be verified before it is passed on"
    )]
    TooLarge {
        /// The limit of its medium.
        limit: u64,
        /// `on disk` or `in memory`.
        medium: &'static str,
    },
}

impl Stager {
    /// Stages in `dir` (unnamed files) when given, else in memory.
    pub fn new(dir: Option<PathBuf>) -> Stager {
        Stager {
            dir,
            on_disk: AtomicU64::new(0),
            in_memory: AtomicU64::new(0),
        }
    }

    /// A new, empty staging file: on disk if there is a directory and it takes unnamed
    /// files, else in memory.
    pub fn open(self: &Arc<Self>) -> Result<Staging, StageError> {
        let on_disk = self.dir.as_ref().and_then(|dir| {
            nix::fcntl::open(
                dir,
                OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
                Mode::S_IRUSR | Mode::S_IWUSR,
            )
            .ok()
        });
        let (fd, disk) = match on_disk {
            Some(fd) => (fd, true),
            None => (
                memfd_create(c"contractor-proxy-staged", MFdFlags::MFD_CLOEXEC)
                    .map_err(|e| StageError::Create(e.into()))?,
                false,
            ),
        };
        Ok(Staging {
            file: File::from(fd),
            size: 0,
            on_disk: disk,
            stager: Arc::clone(self),
        })
    }

    fn counter(&self, on_disk: bool) -> (&AtomicU64, u64, &'static str) {
        match on_disk {
            true => (&self.on_disk, MAX_STAGED_ON_DISK, "on disk"),
            false => (&self.in_memory, MAX_STAGED_IN_MEMORY, "in memory"),
        }
    }
}

/// A body being staged, then served: its bytes count against the room of its medium
/// until it is dropped.
#[derive(Debug)]
pub struct Staging {
    file: File,
    size: u64,
    on_disk: bool,
    stager: Arc<Stager>,
}

impl Staging {
    /// Adds `data`, if there is room for it.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StageError> {
        let (used, limit, medium) = self.stager.counter(self.on_disk);
        let more = data.len() as u64;
        let before = used.fetch_add(more, Ordering::Relaxed);
        if before.saturating_add(more) > limit {
            used.fetch_sub(more, Ordering::Relaxed);
            return Err(StageError::TooLarge { limit, medium });
        }
        self.size += more;
        self.file.write_all(data).map_err(StageError::Write)
    }

    /// How many bytes are staged.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A descriptor of the staged bytes, read from the start; the room stays taken until
    /// this `Staging` is dropped.
    pub fn reader(&mut self) -> io::Result<File> {
        self.file.rewind()?;
        self.file.try_clone()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let (used, _, _) = self.stager.counter(self.on_disk);
        used.fetch_sub(self.size, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_body_is_staged_unnamed_read_back_whole_and_its_room_given_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stager = Arc::new(Stager::new(Some(dir.path().to_path_buf())));
        let mut staging = stager.open().expect("open");
        staging.write(b"crate ").expect("write");
        staging.write(b"bytes").expect("write");
        assert_eq!(staging.size(), 11);
        let mut read = String::new();
        staging
            .reader()
            .expect("reader")
            .read_to_string(&mut read)
            .expect("read");
        assert_eq!(read, "crate bytes");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            0,
            "the staged file has no name"
        );
        let taken =
            stager.on_disk.load(Ordering::Relaxed) + stager.in_memory.load(Ordering::Relaxed);
        assert_eq!(taken, 11);
        drop(staging);
        assert_eq!(stager.on_disk.load(Ordering::Relaxed), 0);
        assert_eq!(stager.in_memory.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn without_a_directory_bodies_are_staged_in_memory_up_to_the_limit() {
        let stager = Arc::new(Stager::new(None));
        let mut staging = stager.open().expect("open");
        assert!(!staging.on_disk);
        stager
            .in_memory
            .store(MAX_STAGED_IN_MEMORY - 4, Ordering::Relaxed);
        staging.write(b"four").expect("fits exactly");
        let error = staging.write(b"x").expect_err("over the limit");
        assert!(error.to_string().contains("in memory"), "{error}");
        assert_eq!(staging.size(), 4);
    }
}
