//! Reading and writing files beneath the store root, with symlinks in mind.
//!
//! [`crate::path`] guarantees a request names something lexically beneath the root; this
//! module keeps that true on disk. A read resolves every symlink (`canonicalize`) and serves
//! the file only if the result is still beneath the canonical root. A write refuses to pass
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

use tokio::fs::{self, File};
use tokio::io::AsyncWriteExt;

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
    /// Builds an [`FileError::Io`] from an `io::Error`, for `map_err`.
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
        let path = path.to_path_buf();
        move |source| FileError::Io {
            action,
            path,
            source,
        }
    }
}

/// A regular file opened for reading, with its length at the time it was opened.
#[derive(Debug)]
pub struct OpenedFile {
    /// The open file, positioned at its start.
    pub file: File,
    /// Its length in bytes.
    pub len: u64,
}

/// Opens the regular file `path` names beneath `root` (which must be canonical), following
/// symlinks only as long as they stay beneath `root`.
pub async fn open_for_read(root: &Path, path: &StorePath) -> Result<OpenedFile, FileError> {
    let requested = path.under(root);
    let real = match fs::canonicalize(&requested).await {
        Ok(real) => real,
        Err(e) if is_absent(&e) => return Err(FileError::NotFound),
        Err(e) => return Err(FileError::io("resolve", &requested)(e)),
    };
    if !real.starts_with(root) {
        return Err(FileError::Escapes { path: requested });
    }
    // Check the type before opening: opening a FIFO for reading would block.
    let metadata = fs::metadata(&real)
        .await
        .map_err(FileError::io("inspect", &real))?;
    if !metadata.is_file() {
        return Err(FileError::NotFound);
    }
    let file = File::open(&real)
        .await
        .map_err(FileError::io("open", &real))?;
    let metadata = file
        .metadata()
        .await
        .map_err(FileError::io("inspect", &real))?;
    if !metadata.is_file() {
        return Err(FileError::NotFound);
    }
    Ok(OpenedFile {
        file,
        len: metadata.len(),
    })
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

/// An upload in progress: a temporary file beside its destination. Dropping it without
/// calling [`Upload::commit`] removes the temporary file.
#[derive(Debug)]
pub struct Upload {
    file: Option<File>,
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
        let (root_dir, parents) = (root.to_path_buf(), parents.to_vec());
        let created =
            tokio::task::spawn_blocking(move || create_parents(&root_dir, &parents)).await;
        // Joining fails only if the task panicked or the runtime is shutting down.
        let join_failed = |e| FileError::io("create directories under", root)(io::Error::other(e));
        let directory = created.map_err(join_failed)??;

        let destination = path.under(root);
        match fs::symlink_metadata(&destination).await {
            Ok(m) if m.is_dir() => return Err(FileError::IsADirectory { path: destination }),
            Ok(_) => {}
            Err(e) if is_absent(&e) => {}
            Err(e) => return Err(FileError::io("inspect", &destination)(e)),
        }

        let (file, temp) = create_temp(&directory).await?;
        Ok(Upload {
            file: Some(file),
            temp,
            destination,
            directory,
            committed: false,
        })
    }

    /// Appends `data` to the temporary file.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        let file = self.file.as_mut().ok_or_else(|| closed(&self.temp))?;
        file.write_all(data)
            .await
            .map_err(FileError::io("write", &self.temp))
    }

    /// Syncs the temporary file, gives it `mode` (when set), and renames it onto the
    /// destination, atomically.
    pub async fn commit(mut self, mode: Option<u32>) -> Result<Written, FileError> {
        let mut file = self.file.take().ok_or_else(|| closed(&self.temp))?;
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .await
                .map_err(FileError::io("set the mode of", &self.temp))?;
        }
        file.flush()
            .await
            .map_err(FileError::io("write", &self.temp))?;
        file.sync_all()
            .await
            .map_err(FileError::io("sync", &self.temp))?;
        drop(file);

        let written = match fs::symlink_metadata(&self.destination).await {
            Ok(m) if m.is_dir() => {
                return Err(FileError::IsADirectory {
                    path: self.destination.clone(),
                })
            }
            Ok(_) => Written::Replaced,
            Err(_) => Written::Created,
        };
        fs::rename(&self.temp, &self.destination)
            .await
            .map_err(FileError::io("rename into place", &self.destination))?;
        self.committed = true;
        // Make the rename itself durable.
        let directory = File::open(&self.directory)
            .await
            .map_err(FileError::io("open directory", &self.directory))?;
        directory
            .sync_all()
            .await
            .map_err(FileError::io("sync directory", &self.directory))?;
        Ok(written)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.committed {
            // Close before removing; removal failing (already gone) leaves nothing to do.
            self.file.take();
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

/// Creates a new, uniquely named temporary file in `directory`.
async fn create_temp(directory: &Path) -> Result<(File, PathBuf), FileError> {
    loop {
        let n = UPLOAD_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = directory.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
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
        upload.write(b"hello ").await.expect("write");
        upload.write(b"world").await.expect("write");
        let destination = root.join("builds/b/artifacts/out/file");
        assert!(!destination.exists());
        assert_eq!(upload.commit(None).await.expect("commit"), Written::Created);
        assert_eq!(std::fs::read(&destination).expect("read"), b"hello world");

        let mut again = Upload::begin(&root, &path).await.expect("begin");
        again.write(b"new").await.expect("write");
        assert_eq!(
            again.commit(Some(0o755)).await.expect("commit"),
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
    async fn dropped_upload_leaves_nothing() {
        let (_dir, root) = canonical_temp_dir();
        let mut upload = Upload::begin(&root, &store_path("/builds/b/artifacts/x"))
            .await
            .expect("begin");
        upload.write(b"partial").await.expect("write");
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

        let alias = open_for_read(&root, &store_path("/alias"))
            .await
            .expect("inside link");
        assert_eq!(alias.len, 6);
        for url in ["/out", "/outdir/secret"] {
            let err = open_for_read(&root, &store_path(url)).await.expect_err(url);
            assert!(matches!(err, FileError::Escapes { .. }), "{url}: {err:?}");
        }
    }

    #[tokio::test]
    async fn read_of_missing_or_directory_is_not_found() {
        let (_dir, root) = canonical_temp_dir();
        std::fs::create_dir(root.join("dir")).expect("mkdir");
        std::fs::write(root.join("file"), b"x").expect("write");
        for url in ["/", "/dir", "/missing", "/file/below"] {
            let err = open_for_read(&root, &store_path(url)).await.expect_err(url);
            assert!(matches!(err, FileError::NotFound), "{url}: {err:?}");
        }
    }
}
