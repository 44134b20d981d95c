//! `contractor-store record source`: a record's packed source copied out to a new file, for
//! `contractor rebuild`, which builds the record's own `source.tar` again (the build then
//! moves the copy into the rebuild's record).
//!
//! The invariant: the record is found as `record show` finds it (a checked build id, a real
//! directory; [`crate::reading::resolve`]), its `source.tar` is opened as a regular file,
//! never through a link, and exactly the bytes its size says when opened are copied: a file
//! that grows meanwhile is not read past that size. The copy goes into a file made new
//! ([`create`], never over an existing one) before the binary confines itself to reading
//! `ROOT/builds/`; a failed copy leaves that file to its caller to remove.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use contractor_protocol::error::ToolCode;
use contractor_protocol::store::{RecordSource, RecordSourceTag};
use contractor_protocol::PROTOCOL_VERSION;

use crate::reading::{resolve, ReadError};

/// Why a record's source could not be copied out.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The record is not there, or could not be read.
    #[error(transparent)]
    Record(#[from] ReadError),
    /// The record has no `source.tar` that can be read.
    #[error("cannot read {path}: a rebuild builds the record's own packed source")]
    NoSource {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The copy could not be made or written.
    #[error("cannot write {path}, the copy of the record's source.tar a rebuild builds")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl SourceError {
    /// The error object's code.
    pub fn code(&self) -> ToolCode {
        match self {
            SourceError::Record(e) => e.code(),
            SourceError::NoSource { .. } => ToolCode::NoSource,
            SourceError::Write { .. } => ToolCode::SourceCopy,
        }
    }

    /// True when the caller asked for a record, or a source, that is not there (exit 2);
    /// false when this host could not read or write (exit 3).
    pub fn is_bad_input(&self) -> bool {
        match self {
            SourceError::Record(e) => e.is_bad_input(),
            SourceError::NoSource { .. } => true,
            SourceError::Write { .. } => false,
        }
    }
}

/// Makes the file the copy goes to: new (never over an existing file or through a link),
/// with the mode the umask gives, as `pack` makes `source.tar`.
pub fn create(to: &Path) -> Result<File, SourceError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|source| SourceError::Write {
            path: to.to_path_buf(),
            source,
        })
}

/// Copies the `source.tar` of the record `id` (the newest when None) under `root` into
/// `out` (the file [`create`] made at `to`).
pub fn copy(
    root: &Path,
    id: Option<&str>,
    out: &mut File,
    to: &Path,
) -> Result<RecordSource, SourceError> {
    let (id, dir) = resolve(root, id)?;
    let path = dir.join("source.tar");
    let no_source = |source| SourceError::NoSource {
        path: path.clone(),
        source,
    };
    let file = contractor_protocol::file::open_regular(&path).map_err(no_source)?;
    let bytes = file.metadata().map_err(no_source)?.len();
    let write = |source| SourceError::Write {
        path: to.to_path_buf(),
        source,
    };
    let copied = io::copy(&mut file.take(bytes), out).map_err(write)?;
    if copied != bytes {
        return Err(no_source(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("it ended after {copied} of its {bytes} bytes"),
        )));
    }
    Ok(RecordSource {
        kind: RecordSourceTag::RecordSource,
        version: PROTOCOL_VERSION,
        id,
        path: to.to_path_buf(),
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "20261125-141502-3fa2c1";

    #[test]
    fn the_source_is_copied_to_a_new_file_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("builds").join(ID);
        std::fs::create_dir_all(&record).expect("mkdir");
        std::fs::write(record.join("source.tar"), b"a tar").expect("write");
        let to = dir.path().join(".rebuild-1.tar");
        let mut out = create(&to).expect("create");
        let copied = copy(dir.path(), Some(ID), &mut out, &to).expect("copy");
        assert_eq!((copied.id.as_str(), copied.bytes), (ID, 5));
        assert_eq!(std::fs::read(&to).expect("read"), b"a tar");
        // Never over an existing file.
        let err = create(&to).expect_err("exists");
        assert_eq!(err.code(), ToolCode::SourceCopy);
        assert!(!err.is_bad_input());

        // A link planted as source.tar is not followed; a record without one is named.
        std::fs::remove_file(record.join("source.tar")).expect("rm");
        std::os::unix::fs::symlink(&to, record.join("source.tar")).expect("link");
        let other = dir.path().join(".rebuild-2.tar");
        let err = copy(
            dir.path(),
            Some(ID),
            &mut create(&other).expect("create"),
            &other,
        )
        .expect_err("a link");
        assert_eq!(err.code(), ToolCode::NoSource);
        assert!(err.is_bad_input());
        assert!(err
            .to_string()
            .ends_with("source.tar: a rebuild builds the record's own packed source"));
        let err = copy(dir.path(), Some("20261125-141502-000000"), &mut out, &to)
            .expect_err("no such build");
        assert_eq!(err.code(), ToolCode::NoSuchBuild);
    }
}
