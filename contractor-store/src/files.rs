//! Reading and writing files beneath the store root, with symlinks in mind.
//!
//! [`crate::path`] guarantees a request names something lexically beneath the root; this
//! module keeps that true on disk. A read opens the file and serves it only if the path the
//! kernel reports for the open descriptor is still beneath the canonical root (a symlink
//! placed by the host may thus be opened, but nothing is read through it unless it stays
//! inside). A write refuses to pass
//! through any symlinked directory, streams into a fresh temporary file beside the
//! destination, and renames it into place only when the whole body has arrived and been
//! synced: the destination is either absent, the old file, or one complete new file, never a
//! partial one. An [`Upload`] that is dropped before [`Upload::commit`] removes its
//! temporary file.
//!
//! The store directory belongs to the host, and a client can only create regular files and
//! directories through it, never symlinks; so the checks here guard against links the host
//! placed, not against a client racing to swap one in.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::io::{Read, Write};

use bytes::{Bytes, BytesMut};
use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::digest::{DigestCache, FileVersion, Hasher, Sha256};
use crate::path::StorePath;

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Nothing is there, or it is not a regular file.
    #[error("no such file")]
    NotFound,
    /// A symlink leads outside the store root.
    #[error("{path} leads outside the store through a symlink")]
    Escapes {
        /// The path as requested, beneath the root.
        path: PathBuf,
    },
    /// A write would pass through a symlinked directory.
    #[error("{path} is a symlink; the store does not write through symlinks")]
    SymlinkInPath {
        /// The symlink.
        path: PathBuf,
    },
    /// A write needs a directory where a file already is.
    #[error("{path} is a file, not a directory")]
    NotADirectory {
        /// The file in the way.
        path: PathBuf,
    },
    /// A write names a directory.
    #[error("{path} is a directory")]
    IsADirectory {
        /// The directory.
        path: PathBuf,
    },
    /// The uploaded content does not have the digest the client named.
    #[error("content has SHA-256 {actual}, but the request said {expected}")]
    DigestMismatch {
        /// What the request said.
        expected: Sha256,
        /// What arrived.
        actual: Sha256,
    },
    /// The kernel refused (`EACCES`/`EPERM`): the path is outside what the confined store
    /// may reach (its Landlock rules), a symlink into the user's home for example.
    #[error("the kernel refused to {action} {path}: it is outside what this store may reach")]
    Denied {
        /// What the store was doing.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The filesystem failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What the store was doing: "open", "create directory", ...
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// Whether this is the file system running out of space (or quota).
    pub fn is_disk_full(&self) -> bool {
        match self {
            FileError::Io { source, .. } => is_disk_full(source),
            _ => false,
        }
    }

    /// Builds an [`FileError::Io`] from an `io::Error`, for `map_err`.
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| {
            if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) {
                FileError::Denied {
                    action,
                    path,
                    source,
                }
            } else {
                FileError::Io {
                    action,
                    path,
                    source,
                }
            }
        }
    }
}

/// A regular file opened for reading, with what it was when opened.
#[derive(Debug)]
pub struct OpenedFile {
    /// The open file, positioned at its start.
    pub file: std::fs::File,
    /// Its length in bytes.
    pub len: u64,
    /// Which version of the file this is (for the ETag and the digest cache).
    pub version: FileVersion,
    /// The whole content, read at once when the file is at most the `preread` size asked
    /// for; `None` for larger files.
    pub content: Option<Bytes>,
}

/// The store root held open, so that a read can be resolved by the kernel relative to it
/// and confined to it (`openat2` with `RESOLVE_BENEATH`): one system call, no walk of the
/// root's own path and no `readlink` afterwards. Where `openat2` is missing (Linux before
/// 5.6) or refused (a seccomp filter), reads take the path of [`open_for_read`].
#[derive(Debug)]
pub struct RootDir {
    path: PathBuf,
    dir: Option<std::os::fd::OwnedFd>,
    /// Cleared when `openat2` turns out not to be available.
    beneath: std::sync::atomic::AtomicBool,
}

impl RootDir {
    /// Opens `root`, which must be canonical. If the directory cannot be held open, every
    /// read goes through [`open_for_read`].
    pub fn open(root: &Path) -> RootDir {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_DIRECTORY | OFlag::O_PATH).bits())
            .open(root)
            .ok()
            .map(std::os::fd::OwnedFd::from);
        RootDir {
            path: root.to_path_buf(),
            beneath: std::sync::atomic::AtomicBool::new(dir.is_some()),
            dir,
        }
    }

    /// The canonical root.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// As [`open_for_read`] does, with the same answers: the kernel resolves `path` beneath
    /// the root and fails the lookup (`EXDEV`) if it would leave it. Such a path, an absolute
    /// symlink among them (which `RESOLVE_BENEATH` never follows even when it points inside),
    /// is then decided by [`open_for_read`]. Blocking, but only briefly on a local disk.
    pub fn open_for_read(&self, path: &StorePath, preread: u64) -> Result<OpenedFile, FileError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(dir) = self.dir.as_ref().filter(|_| self.beneath.load(Relaxed)) else {
            return open_for_read(&self.path, path, preread);
        };
        let relative = relative_c_path(path);
        match openat2_beneath(dir, &relative) {
            Ok(fd) => {
                let file = std::fs::File::from(fd);
                let metadata = file
                    .metadata()
                    .map_err(|e| FileError::io("inspect", &path.under(&self.path))(e))?;
                finish_open(file, &metadata, &self.path, path, preread)
            }
            Err(e) if is_absent(&e) || e.raw_os_error() == Some(Errno::ELOOP as i32) => {
                Err(FileError::NotFound)
            }
            // Leads outside the root, or through an absolute symlink; or a rename raced
            // with the lookup: the slower check decides.
            Err(e) if errno_is(&e, &[Errno::EXDEV, Errno::EAGAIN]) => {
                open_for_read(&self.path, path, preread)
            }
            // No openat2 here (ENOSYS, or EPERM under seccomp): stop trying it.
            Err(e) if errno_is(&e, &[Errno::ENOSYS, Errno::EPERM]) => {
                self.beneath.store(false, Relaxed);
                open_for_read(&self.path, path, preread)
            }
            Err(e) => Err(FileError::io("open", &path.under(&self.path))(e)),
        }
    }
}

/// `path`'s names joined by `/`, NUL-terminated; `.` for the root itself. The names hold no
/// `/` and no NUL ([`StorePath`]'s invariant).
fn relative_c_path(path: &StorePath) -> std::ffi::CString {
    let names = path.names();
    if names.is_empty() {
        return c".".to_owned();
    }
    let mut bytes = Vec::with_capacity(names.iter().map(|n| n.len() + 1).sum());
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            bytes.push(b'/');
        }
        bytes.extend_from_slice(name.as_bytes());
    }
    // A NUL cannot be in a name; were one there, the lookup of "" would find nothing.
    std::ffi::CString::new(bytes).unwrap_or_default()
}

/// Whether `err` is one of the system errors `errnos`.
fn errno_is(err: &io::Error, errnos: &[Errno]) -> bool {
    err.raw_os_error()
        .is_some_and(|raw| errnos.contains(&Errno::from_raw(raw)))
}

/// `openat2(dir, relative, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, RESOLVE_BENEATH)`.
fn openat2_beneath(
    dir: &std::os::fd::OwnedFd,
    relative: &std::ffi::CStr,
) -> io::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH);
    Ok(nix::fcntl::openat2(dir, relative, how)?)
}

/// Opens the regular file `path` names beneath `root` (which must be canonical), following
/// symlinks only as long as they stay beneath `root`: the file is opened (non-blocking, so a
/// FIFO cannot stall it), and served only if it is a regular file whose real path, as the
/// kernel reports it for the open descriptor, is beneath `root`. A file of at most `preread`
/// bytes is read at once into [`OpenedFile::content`]. Blocking, but only briefly on a local
/// disk. [`RootDir::open_for_read`] gives the same answers with fewer system calls.
pub fn open_for_read(root: &Path, path: &StorePath, preread: u64) -> Result<OpenedFile, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let requested = path.under(root);
    // Non-blocking so that a FIFO cannot hold the open; no controlling terminal, ever.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(&requested);
    let file = match opened {
        Ok(file) => file,
        Err(e) if is_absent(&e) || e.raw_os_error() == Some(Errno::ELOOP as i32) => {
            return Err(FileError::NotFound)
        }
        Err(e) => return Err(FileError::io("open", &requested)(e)),
    };
    let metadata = file
        .metadata()
        .map_err(FileError::io("inspect", &requested))?;
    if !metadata.is_file() {
        return Err(FileError::NotFound);
    }
    // Where the open file really is, symlinks resolved, checked before a byte is read.
    if !real_path_of(&file, &requested).starts_with(root) {
        return Err(FileError::Escapes { path: requested });
    }
    finish_open(file, &metadata, root, path, preread)
}

/// The rest of a read's open, once `file` (whose metadata is `metadata`) is known to be
/// beneath the root: checks it is a regular file, notes its version and reads it whole if it
/// is at most `preread` bytes.
fn finish_open(
    mut file: std::fs::File,
    metadata: &std::fs::Metadata,
    root: &Path,
    path: &StorePath,
    preread: u64,
) -> Result<OpenedFile, FileError> {
    if !metadata.is_file() {
        return Err(FileError::NotFound);
    }
    let len = metadata.len();
    let content = if len <= preread {
        // Exactly the length just measured, which the answer announces.
        let mut buffer = vec![0u8; usize::try_from(len).unwrap_or(0)];
        file.read_exact(&mut buffer)
            .map_err(|e| FileError::io("read", &path.under(root))(e))?;
        Some(Bytes::from(buffer))
    } else {
        None
    };
    Ok(OpenedFile {
        file,
        len,
        version: FileVersion::of(metadata),
        content,
    })
}

/// The path the kernel has for an open file (`/proc/self/fd/N`); where `/proc` is missing,
/// the canonical form of `requested`.
fn real_path_of(file: &std::fs::File, requested: &Path) -> PathBuf {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::read_link(link)
        .or_else(|_| std::fs::canonicalize(requested))
        .unwrap_or_default()
}

/// What a directory holds, for a listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listing {
    /// The directory as requested, with a trailing `/`.
    pub path: String,
    /// Its entries, sorted by name; upload temporary files are left out.
    pub entries: Vec<ListingEntry>,
}

/// One entry of a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListingEntry {
    /// The entry's name (not a path).
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Size in bytes (files only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// SHA-256 in hex (files only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Lists the directory `path` names beneath `root` (canonical), following symlinks to it
/// only inside the root; entries that are symlinks are listed as such, not followed.
/// [`FileError::NotADirectory`] if it is not a directory. Blocking.
pub fn list_directory(
    root: &Path,
    path: &StorePath,
    digests: &DigestCache,
) -> Result<Listing, FileError> {
    let requested = path.under(root);
    let real = match std::fs::canonicalize(&requested) {
        Ok(real) => real,
        Err(e) if is_absent(&e) => return Err(FileError::NotFound),
        Err(e) => return Err(FileError::io("resolve", &requested)(e)),
    };
    if !real.starts_with(root) {
        return Err(FileError::Escapes { path: requested });
    }
    match std::fs::metadata(&real) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(FileError::NotADirectory { path: requested }),
        Err(e) if is_absent(&e) => return Err(FileError::NotFound),
        Err(e) => return Err(FileError::io("inspect", &real)(e)),
    }
    let reader = match std::fs::read_dir(&real) {
        Ok(reader) => reader,
        Err(e) if is_absent(&e) => return Err(FileError::NotFound),
        Err(e) => return Err(FileError::io("list", &real)(e)),
    };
    let mut entries = Vec::new();
    for entry in reader {
        let entry = entry.map_err(FileError::io("list", &real))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let entry_path = entry.path();
        let metadata = match std::fs::symlink_metadata(&entry_path) {
            Ok(metadata) => metadata,
            // Removed since the directory was read.
            Err(e) if is_absent(&e) => continue,
            Err(e) => return Err(FileError::io("inspect", &entry_path)(e)),
        };
        let file_type = metadata.file_type();
        let (kind, size, sha256) = if file_type.is_file() {
            let digest = digests
                .digest(&entry_path, &metadata)
                .map_err(FileError::io("hash", &entry_path))?;
            ("file", Some(metadata.len()), Some(digest.to_hex()))
        } else if file_type.is_dir() {
            ("directory", None, None)
        } else if file_type.is_symlink() {
            ("symlink", None, None)
        } else {
            ("other", None, None)
        };
        entries.push(ListingEntry {
            name,
            kind,
            size,
            sha256,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut shown = path.to_string();
    if !shown.ends_with('/') {
        shown.push('/');
    }
    Ok(Listing {
        path: shown,
        entries,
    })
}

/// Whether `e` is ENOSPC or EDQUOT.
pub fn is_disk_full(e: &io::Error) -> bool {
    // 122 is EDQUOT on Linux.
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(122)
}

/// Whether an error means "nothing there" (including a file where a directory was expected).
fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// Whether the destination of a finished upload was new or replaced an older file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Nothing was there before.
    Created,
    /// An older file was replaced.
    Replaced,
}

/// What a finished upload stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Whether the destination was new.
    pub written: Written,
    /// The stored content's SHA-256.
    pub sha256: Sha256,
    /// Its size in bytes.
    pub len: u64,
    /// The size of the file it replaced (0 if none).
    pub replaced_len: u64,
    /// The version now on disk.
    pub version: FileVersion,
}

/// Pieces smaller than this are gathered before being handed on, so that the threads wake
/// for large pieces only; larger pieces are handed on as they are, without a copy.
const WRITE_BATCH: usize = 256 * 1024;

/// Pieces in flight between the request and each of the hasher and writer threads.
const WRITE_QUEUE: usize = 16;

/// The writer asks the kernel to start writing back every this many bytes, so that the final
/// sync finds little left to do.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Bytes a direct writer gathers before each write.
const DIRECT_CHUNK: usize = 4 << 20;

/// Direct writes in flight at once: two keep the disk busy while one completes.
const DIRECT_IN_FLIGHT: usize = 2;

/// The alignment `O_DIRECT` asks of buffers, lengths and offsets: the page size, which is a
/// multiple of every logical block size in common use.
const DIRECT_ALIGN: usize = 4096;

/// An upload in progress: a temporary file beside its destination. Each piece of the body
/// goes (shared, not copied) to two blocking threads: one hashes, one writes (directly to
/// the disk where the file system allows it), so hashing, writing and receiving proceed in
/// parallel. Dropping it without calling
/// [`Upload::commit`] removes the temporary file.
#[derive(Debug)]
pub struct Upload {
    sender: Option<tokio::sync::mpsc::Sender<Bytes>>,
    writer: Option<tokio::task::JoinHandle<io::Result<std::fs::File>>>,
    hash_sender: Option<tokio::sync::mpsc::Sender<Bytes>>,
    hasher: Option<tokio::task::JoinHandle<Sha256>>,
    batch: BytesMut,
    len: u64,
    temp: PathBuf,
    destination: PathBuf,
    directory: PathBuf,
    committed: bool,
}

/// Distinguishes the temporary files of concurrent uploads within one process.
static UPLOAD_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The prefix of every temporary upload file's name.
pub const TEMP_PREFIX: &str = ".contractor-upload-";

impl Upload {
    /// Starts an upload to `path` beneath `root` (which must be canonical): creates the
    /// missing parent directories, refusing any symlink among them, and creates the
    /// temporary file.
    pub async fn begin(root: &Path, path: &StorePath) -> Result<Upload, FileError> {
        let Some((_, parents)) = path.names().split_last() else {
            return Err(FileError::IsADirectory {
                path: root.to_path_buf(),
            });
        };
        let destination = path.under(root);
        let (root_dir, parents, target) =
            (root.to_path_buf(), parents.to_vec(), destination.clone());
        let prepared = tokio::task::spawn_blocking(move || {
            let directory = create_parents(&root_dir, &parents)?;
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => return Err(FileError::IsADirectory { path: target }),
                Ok(_) => {}
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(FileError::io("inspect", &target)(e)),
            }
            let (file, temp) = create_temp(&directory)?;
            Ok((directory, file, temp))
        })
        .await;
        // Joining fails only if the task panicked or the runtime is shutting down.
        let join_failed = |e| FileError::io("create directories under", root)(io::Error::other(e));
        let (directory, file, temp) = prepared.map_err(join_failed)??;

        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let writer = tokio::task::spawn_blocking(move || {
            if set_direct(&file, true).is_ok() {
                write_direct(file, &mut receiver)
            } else {
                write_buffered(file, &mut receiver)
            }
        });
        let (hash_sender, mut hash_receiver) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = Hasher::default();
            while let Some(piece) = hash_receiver.blocking_recv() {
                hasher.update(&piece);
            }
            hasher.finish()
        });
        Ok(Upload {
            sender: Some(sender),
            writer: Some(writer),
            hash_sender: Some(hash_sender),
            hasher: Some(hasher),
            batch: BytesMut::new(),
            len: 0,
            temp,
            destination,
            directory,
            committed: false,
        })
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been received yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data` to the temporary file.
    pub async fn write(&mut self, data: Bytes) -> Result<(), FileError> {
        self.len += data.len() as u64;
        if data.len() >= WRITE_BATCH {
            self.flush_batch().await?;
            return self.hand_on(data).await;
        }
        self.batch.extend_from_slice(&data);
        if self.batch.len() >= WRITE_BATCH {
            self.flush_batch().await?;
        }
        Ok(())
    }

    /// Hands the gathered small pieces on.
    async fn flush_batch(&mut self) -> Result<(), FileError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = self.batch.split().freeze();
        self.hand_on(batch).await
    }

    /// Gives `piece` to the hasher and the writer threads.
    async fn hand_on(&mut self, piece: Bytes) -> Result<(), FileError> {
        let hash_sender = self
            .hash_sender
            .as_ref()
            .ok_or_else(|| closed(&self.temp))?;
        // The hasher never stops early: it fails only by panicking.
        if hash_sender.send(piece.clone()).await.is_err() {
            return Err(closed(&self.temp));
        }
        let sender = self.sender.as_ref().ok_or_else(|| closed(&self.temp))?;
        if sender.send(piece).await.is_err() {
            // The writer stopped early: it failed. Report why.
            self.sender = None;
            return match self.finish_writer().await {
                Ok(_) => Err(closed(&self.temp)),
                Err(e) => Err(e),
            };
        }
        Ok(())
    }

    /// Waits for the writer thread and takes back the file.
    async fn finish_writer(&mut self) -> Result<std::fs::File, FileError> {
        self.sender = None;
        let writer = self.writer.take().ok_or_else(|| closed(&self.temp))?;
        match writer.await {
            Ok(Ok(file)) => Ok(file),
            Ok(Err(e)) => Err(FileError::io("write", &self.temp)(e)),
            Err(e) => Err(FileError::io("write", &self.temp)(io::Error::other(e))),
        }
    }

    /// Finishes the upload: checks the content against `expected` (when set), syncs the
    /// temporary file, gives it `mode` (when set), and renames it onto the destination,
    /// atomically. On any failure nothing is renamed and the temporary file is removed.
    pub async fn commit(
        mut self,
        mode: Option<u32>,
        expected: Option<Sha256>,
    ) -> Result<Committed, FileError> {
        self.flush_batch().await?;
        let file = self.finish_writer().await?;
        self.hash_sender = None;
        let hasher = self.hasher.take().ok_or_else(|| closed(&self.temp))?;
        let sha256 = hasher
            .await
            .map_err(|e| FileError::io("hash", &self.temp)(io::Error::other(e)))?;
        if let Some(expected) = expected {
            if expected != sha256 {
                return Err(FileError::DigestMismatch {
                    expected,
                    actual: sha256,
                });
            }
        }
        let (temp, destination, directory) = (
            self.temp.clone(),
            self.destination.clone(),
            self.directory.clone(),
        );
        let finished = tokio::task::spawn_blocking(move || {
            finish_file(file, mode, &temp, &destination, &directory)
        })
        .await;
        let join_failed = |e| FileError::io("finish", &self.temp)(io::Error::other(e));
        let (written, replaced_len, version) = match finished.map_err(join_failed)? {
            Ok(done) => done,
            Err((renamed, e)) => {
                self.committed = renamed;
                return Err(e);
            }
        };
        self.committed = true;
        Ok(Committed {
            written,
            sha256,
            len: self.len,
            replaced_len,
            version,
        })
    }
}

/// Writes every piece from `pieces` to `file` through the page cache, asking the kernel to
/// start writing back every [`WRITEBACK_EVERY`] bytes.
fn write_buffered(
    mut file: std::fs::File,
    pieces: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> io::Result<std::fs::File> {
    let (mut written, mut started) = (0u64, 0u64);
    while let Some(piece) = pieces.blocking_recv() {
        file.write_all(&piece)?;
        written += piece.len() as u64;
        if written - started >= WRITEBACK_EVERY {
            start_writeback(&file, started, written - started);
            started = written;
        }
    }
    Ok(file)
}

/// Writes every piece from `pieces` to `file`, which is open with `O_DIRECT`: the pieces are
/// gathered into aligned buffers of [`DIRECT_CHUNK`] bytes, each written straight to the
/// disk by one of [`DIRECT_IN_FLIGHT`] threads, so the data is copied once (into the buffer)
/// rather than into the page cache and then written back, the disk always has a write
/// queued, and the final sync has only metadata left to do. The last partial block goes
/// through the page cache. Should the file system refuse a direct write (`EINVAL`), the
/// rest goes through the page cache too.
fn write_direct(
    file: std::fs::File,
    pieces: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> io::Result<std::fs::File> {
    let (free, freed) = std::sync::mpsc::channel::<AlignedChunk>();
    for _ in 0..=DIRECT_IN_FLIGHT {
        let _ = free.send(AlignedChunk::new());
    }
    let (current, end) = std::thread::scope(|scope| -> io::Result<(AlignedChunk, u64)> {
        let (mut lanes, mut writers) = (Vec::new(), Vec::new());
        for _ in 0..DIRECT_IN_FLIGHT {
            let (lane, chunks) = std::sync::mpsc::sync_channel::<(AlignedChunk, u64)>(1);
            let (free, file) = (free.clone(), &file);
            let writer = scope.spawn(move || -> io::Result<()> {
                for (chunk, offset) in chunks {
                    write_all_at(file, chunk.bytes(), offset)?;
                    // The gatherer may have stopped already; the buffer is then dropped.
                    let _ = free.send(chunk);
                }
                Ok(())
            });
            lanes.push(lane);
            writers.push(writer);
        }
        // Only the lanes give buffers back: if they all stop, waiting for one ends too.
        drop(free);
        let gathered = gather(pieces, &lanes, &freed);
        drop(lanes);
        let mut failure = None;
        for writer in writers {
            match writer.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(_) => failure = failure.or(Some(io::Error::other("a disk writer panicked"))),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => gathered,
        }
    })?;
    // The partial chunk: whole blocks and the rest, through the page cache.
    set_direct(&file, false)?;
    write_all_at(&file, &current.bytes()[..current.filled], end)?;
    Ok(file)
}

/// Fills buffers from `freed` with `pieces` and hands each full one, with its offset, to the
/// next of `lanes`. Returns the last, partly filled buffer and its offset.
fn gather(
    pieces: &mut tokio::sync::mpsc::Receiver<Bytes>,
    lanes: &[std::sync::mpsc::SyncSender<(AlignedChunk, u64)>],
    freed: &std::sync::mpsc::Receiver<AlignedChunk>,
) -> io::Result<(AlignedChunk, u64)> {
    let empty = || match freed.recv() {
        Ok(mut chunk) => {
            chunk.filled = 0;
            Ok(chunk)
        }
        Err(_) => Err(io::Error::other("a disk writer stopped")),
    };
    let stopped = || io::Error::other("a disk writer stopped");
    let mut current = empty()?;
    let (mut offset, mut next) = (0u64, 0usize);
    while let Some(piece) = pieces.blocking_recv() {
        let mut rest = &piece[..];
        while !rest.is_empty() {
            rest = current.fill(rest);
            if current.filled == DIRECT_CHUNK {
                let full = std::mem::replace(&mut current, empty()?);
                lanes[next].send((full, offset)).map_err(|_| stopped())?;
                offset += DIRECT_CHUNK as u64;
                next = (next + 1) % lanes.len();
            }
        }
    }
    Ok((current, offset))
}

/// A buffer of [`DIRECT_CHUNK`] bytes aligned to [`DIRECT_ALIGN`], as `O_DIRECT` needs, and
/// how much of it is filled.
struct AlignedChunk {
    memory: Vec<u8>,
    start: usize,
    filled: usize,
}

impl AlignedChunk {
    fn new() -> AlignedChunk {
        // Zeroed memory comes from the system untouched, so an unused tail costs nothing.
        let memory = vec![0u8; DIRECT_CHUNK + DIRECT_ALIGN];
        let start = memory.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedChunk {
            memory,
            start,
            filled: 0,
        }
    }

    /// Copies as much of `data` as fits; returns what did not.
    fn fill<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let n = data.len().min(DIRECT_CHUNK - self.filled);
        let at = self.start + self.filled;
        self.memory[at..at + n].copy_from_slice(&data[..n]);
        self.filled += n;
        &data[n..]
    }

    /// The filled part.
    fn bytes(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.filled]
    }
}

/// Writes all of `data` at `offset` of `file`. If the file system refuses a direct write
/// (`EINVAL`), switches the file to the page cache and carries on.
fn write_all_at(file: &std::fs::File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut refused = false;
    while !data.is_empty() {
        match file.write_at(data, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => (data, offset) = (&data[n..], offset + n as u64),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if !refused && e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                set_direct(file, false)?;
                refused = true;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Turns `O_DIRECT` on or off for `file`; fails where the file system does not support it.
fn set_direct(file: &std::fs::File, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_DIRECT, on);
    fcntl(file, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to disk, without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Only a hint: the final `fsync` is what
/// makes the upload durable, and it has less left to do. Errors are ignored for the same
/// reason.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    let _ = crate::sys::start_writeback(file, offset, len);
}

/// Sets the mode, syncs, renames into place and syncs the directory (blocking). The error
/// says whether the rename had already happened.
fn finish_file(
    file: std::fs::File,
    mode: Option<u32>,
    temp: &Path,
    destination: &Path,
    directory: &Path,
) -> Result<(Written, u64, FileVersion), (bool, FileError)> {
    use std::os::unix::fs::PermissionsExt;
    let before = |e| (false, e);
    if let Some(mode) = mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(FileError::io("set the mode of", temp))
            .map_err(before)?;
    }
    file.sync_all()
        .map_err(FileError::io("sync", temp))
        .map_err(before)?;
    let metadata = file
        .metadata()
        .map_err(FileError::io("inspect", temp))
        .map_err(before)?;
    drop(file);
    let (written, replaced_len) = match std::fs::symlink_metadata(destination) {
        Ok(m) if m.is_dir() => {
            return Err((
                false,
                FileError::IsADirectory {
                    path: destination.to_path_buf(),
                },
            ))
        }
        Ok(m) => (Written::Replaced, if m.is_file() { m.len() } else { 0 }),
        Err(_) => (Written::Created, 0),
    };
    std::fs::rename(temp, destination)
        .map_err(FileError::io("rename into place", destination))
        .map_err(before)?;
    // Make the rename itself durable.
    let after = |e| (true, e);
    std::fs::File::open(directory)
        .and_then(|d| d.sync_all())
        .map_err(FileError::io("sync directory", directory))
        .map_err(after)?;
    Ok((written, replaced_len, FileVersion::of(&metadata)))
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            // Stop the writer (it closes the file), then remove the temporary file; removal
            // failing (already gone) leaves nothing to do.
            self.sender.take();
            self.hash_sender.take();
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn closed(temp: &Path) -> FileError {
    FileError::io("write", temp)(io::Error::other("upload already finished"))
}

/// Creates `root/names...` one directory at a time, refusing symlinks and files in the way.
/// Returns the innermost directory.
fn create_parents(root: &Path, names: &[String]) -> Result<PathBuf, FileError> {
    let mut current = root.to_path_buf();
    for name in names {
        current.push(name);
        loop {
            match std::fs::symlink_metadata(&current) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(FileError::SymlinkInPath { path: current })
                }
                Ok(m) if m.is_dir() => break,
                Ok(_) => return Err(FileError::NotADirectory { path: current }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match std::fs::create_dir(&current) {
                        // Another upload may have created it meanwhile: look again.
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(FileError::io("create directory", &current)(e)),
                    }
                }
                Err(e) => return Err(FileError::io("inspect", &current)(e)),
            }
        }
    }
    Ok(current)
}

/// Creates a new, uniquely named temporary file in `directory` (blocking).
fn create_temp(directory: &Path) -> Result<(std::fs::File, PathBuf), FileError> {
    loop {
        let n = UPLOAD_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = directory.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
        {
            Ok(file) => return Ok((file, temp)),
            // Left behind by an earlier process with the same pid: pick the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(FileError::io("create", &temp)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_path(url: &str) -> StorePath {
        StorePath::parse(url).expect("valid path")
    }

    fn canonical_temp_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().canonicalize().expect("canonical");
        (dir, root)
    }

    #[tokio::test]
    async fn upload_appears_only_on_commit() {
        let (_dir, root) = canonical_temp_dir();
        let path = store_path("/builds/b/artifacts/out/file");
        let mut upload = Upload::begin(&root, &path).await.expect("begin");
        upload
            .write(Bytes::from_static(b"hello "))
            .await
            .expect("write");
        upload
            .write(Bytes::from_static(b"world"))
            .await
            .expect("write");
        let destination = root.join("builds/b/artifacts/out/file");
        assert!(!destination.exists());
        assert_eq!(
            upload.commit(None, None).await.expect("commit").written,
            Written::Created
        );
        assert_eq!(std::fs::read(&destination).expect("read"), b"hello world");

        let mut again = Upload::begin(&root, &path).await.expect("begin");
        again
            .write(Bytes::from_static(b"new"))
            .await
            .expect("write");
        assert_eq!(
            again
                .commit(Some(0o755), None)
                .await
                .expect("commit")
                .written,
            Written::Replaced
        );
        assert_eq!(std::fs::read(&destination).expect("read"), b"new");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&destination).expect("meta").permissions(),
        );
        assert_eq!(mode & 0o777, 0o755);
        let names: Vec<_> = std::fs::read_dir(destination.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["file"]);
    }

    #[tokio::test]
    async fn an_upload_of_many_odd_pieces_is_stored_whole() {
        let (_dir, root) = canonical_temp_dir();
        // Crosses more direct-write chunks than there are buffers, and ends with a partial
        // block.
        let content: Vec<u8> = (0..5 * DIRECT_CHUNK + 3 * DIRECT_ALIGN + 4321)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        let mut upload = Upload::begin(&root, &store_path("/builds/b/artifacts/big"))
            .await
            .expect("begin");
        let mut sizes = [1, 4095, 300_000, 70_000, 1 << 20, 3].iter().cycle();
        let mut rest = &content[..];
        while !rest.is_empty() {
            let n = rest.len().min(*sizes.next().expect("cycle"));
            upload
                .write(Bytes::copy_from_slice(&rest[..n]))
                .await
                .expect("write");
            rest = &rest[n..];
        }
        let committed = upload
            .commit(None, Some(Sha256::of(&content)))
            .await
            .expect("commit");
        assert_eq!(committed.len, content.len() as u64);
        let stored = std::fs::read(root.join("builds/b/artifacts/big")).expect("read");
        assert!(stored == content, "stored content differs");
    }

    #[tokio::test]
    async fn dropped_upload_leaves_nothing() {
        let (_dir, root) = canonical_temp_dir();
        let mut upload = Upload::begin(&root, &store_path("/builds/b/artifacts/x"))
            .await
            .expect("begin");
        upload
            .write(Bytes::from_static(b"partial"))
            .await
            .expect("write");
        drop(upload);
        let artifacts = root.join("builds/b/artifacts");
        assert_eq!(std::fs::read_dir(artifacts).expect("list").count(), 0);
    }

    #[tokio::test]
    async fn upload_refuses_symlinked_directories() {
        let (_dir, root) = canonical_temp_dir();
        let outside = tempfile::tempdir().expect("outside");
        std::fs::create_dir_all(root.join("builds/b")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), root.join("builds/b/artifacts")).expect("ln");
        let err = Upload::begin(&root, &store_path("/builds/b/artifacts/x"))
            .await
            .expect_err("");
        assert!(matches!(err, FileError::SymlinkInPath { .. }), "{err:?}");
        assert_eq!(std::fs::read_dir(outside.path()).expect("list").count(), 0);
    }

    #[tokio::test]
    async fn upload_refuses_a_file_in_the_way_and_a_directory_destination() {
        let (_dir, root) = canonical_temp_dir();
        std::fs::create_dir_all(root.join("builds/b/artifacts/dir")).expect("mkdir");
        std::fs::write(root.join("builds/b/artifacts/file"), b"x").expect("write");
        let err = Upload::begin(&root, &store_path("/builds/b/artifacts/file/x")).await;
        assert!(
            matches!(err, Err(FileError::NotADirectory { .. })),
            "{err:?}"
        );
        let err = Upload::begin(&root, &store_path("/builds/b/artifacts/dir")).await;
        assert!(
            matches!(err, Err(FileError::IsADirectory { .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn read_follows_symlinks_only_inside_the_root() {
        let (_dir, root) = canonical_temp_dir();
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret"), b"secret").expect("write");
        std::fs::write(root.join("inside"), b"inside").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("out")).expect("ln");
        std::os::unix::fs::symlink(outside.path(), root.join("outdir")).expect("ln");
        std::os::unix::fs::symlink("inside", root.join("alias")).expect("ln");

        let alias = open_for_read(&root, &store_path("/alias"), 0).expect("inside link");
        assert_eq!(alias.len, 6);
        for url in ["/out", "/outdir/secret"] {
            let err = open_for_read(&root, &store_path(url), 0).expect_err(url);
            assert!(matches!(err, FileError::Escapes { .. }), "{url}: {err:?}");
        }
    }

    #[test]
    fn reads_beneath_the_open_root_answer_as_reads_by_path() {
        let (_dir, root) = canonical_temp_dir();
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret"), b"secret").expect("write");
        std::fs::create_dir_all(root.join("sub/dir")).expect("mkdir");
        std::fs::write(root.join("sub/inside"), b"inside").expect("write");
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, root.join(name)).expect("ln");
        };
        link(Path::new("inside"), "sub/relative");
        link(Path::new("../sub/inside"), "sub/dir/up");
        link(&root.join("sub/inside"), "absolute-inside");
        link(
            Path::new("../../../../../../../../etc/hostname"),
            "up-and-out",
        );
        link(&outside.path().join("secret"), "out");
        link(outside.path(), "outdir");
        let status = std::process::Command::new("mkfifo")
            .arg(root.join("pipe"))
            .status()
            .expect("run mkfifo");
        assert!(status.success());

        let opened = RootDir::open(&root);
        let answer = |result: Result<OpenedFile, FileError>| match result {
            Ok(file) => format!("{:?}", file.content),
            Err(e) => format!("{e:?}"),
        };
        for url in [
            "/sub/inside",
            "/sub/relative",
            "/sub/dir/up",
            "/absolute-inside",
            "/up-and-out",
            "/out",
            "/outdir/secret",
            "/pipe",
            "/sub",
            "/",
            "/missing",
            "/sub/inside/below",
        ] {
            let path = store_path(url);
            let by_path = answer(open_for_read(&root, &path, 64));
            assert_eq!(answer(opened.open_for_read(&path, 64)), by_path, "{url}");
        }
        let served = opened
            .open_for_read(&store_path("/absolute-inside"), 64)
            .expect("inside");
        assert_eq!(served.content.as_deref(), Some(&b"inside"[..]));
        let err = opened
            .open_for_read(&store_path("/outdir/secret"), 64)
            .expect_err("outside");
        assert!(matches!(err, FileError::Escapes { .. }), "{err:?}");
    }

    #[test]
    fn read_of_a_fifo_is_not_found_and_does_not_block() {
        let (_dir, root) = canonical_temp_dir();
        let status = std::process::Command::new("mkfifo")
            .arg(root.join("pipe"))
            .status()
            .expect("run mkfifo");
        assert!(status.success());
        let err = open_for_read(&root, &store_path("/pipe"), 0).expect_err("fifo");
        assert!(matches!(err, FileError::NotFound), "{err:?}");
    }

    #[tokio::test]
    async fn read_of_missing_or_directory_is_not_found() {
        let (_dir, root) = canonical_temp_dir();
        std::fs::create_dir(root.join("dir")).expect("mkdir");
        std::fs::write(root.join("file"), b"x").expect("write");
        for url in ["/", "/dir", "/missing", "/file/below"] {
            let err = open_for_read(&root, &store_path(url), 0).expect_err(url);
            assert!(matches!(err, FileError::NotFound), "{url}: {err:?}");
        }
    }
}
