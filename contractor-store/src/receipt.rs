//! `contractor-store record receive`: the record of a build run on a build host
//! (`contractor build --host`), received from the hosted build's stream into the local
//! record directory, confined to that one directory.
//!
//! The stream is what follows the `finished` event of `contractor-host build`
//! (`contractor_protocol::hosted`): for each file a [`HostedLine::File`] line and exactly its
//! bytes, then [`HostedLine::End`]. The invariant: a file lands only as a new regular file
//! under the record, at a relative path of plain names that is not one of the files the
//! front end or this store writes itself ([`NOT_SENT`]), and the whole record stays within
//! its limits: each file costs its size rounded up to [`RECORD_ENTRY_BYTES`] (at least one
//! block), each directory it makes one block, all against the byte limit; at most
//! [`MAX_RECORD_FILES`] files, [`MAX_RECORD_DIRS`] directories and [`MAX_RECORD_DEPTH`]
//! components per path; a line is at most [`MAX_RECORD_LINE_BYTES`].

use std::collections::HashSet;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use contractor_protocol::hosted::{
    HostedLine, MAX_RECORD_DEPTH, MAX_RECORD_DIRS, MAX_RECORD_FILES, NOT_SENT, RECORD_ENTRY_BYTES,
    RECORD_OVERHEAD_BYTES,
};
use contractor_protocol::jsonl::JsonlReader;

/// The longest line of a record stream (a path holds at most [`MAX_RECORD_DEPTH`] names of
/// at most 255 bytes each).
pub const MAX_RECORD_LINE_BYTES: u64 = 64 * 1024;

use contractor_protocol::error::ToolCode;

/// Why a record could not be received.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The stream ended before its `end` line (the build host went away).
    #[error("the record stream ended early: {0}")]
    Cut(String),
    /// The stream broke a rule of the record stream or one of its limits.
    #[error("{0}")]
    Refused(String),
    /// The file system failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

impl ReceiptError {
    /// The error object's code: `record_cut`, `record_refused` or `record_write`.
    pub fn code(&self) -> ToolCode {
        match self {
            ReceiptError::Cut(_) => ToolCode::RecordCut,
            ReceiptError::Refused(_) => ToolCode::RecordRefused,
            ReceiptError::Io { .. } => ToolCode::RecordWrite,
        }
    }

    /// True when the stream, not this host, is at fault (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, ReceiptError::Io { .. })
    }
}

/// What a record received holds: files and the bytes they were charged.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Files written.
    pub files: u64,
    /// Bytes charged against the limit (files and directories, in blocks).
    pub charged_bytes: u64,
}

/// Reads a record stream from `input` into the directory `record` (which exists), at most
/// `limit` bytes as charged; stops after the `end` line.
pub fn receive(input: impl BufRead, record: &Path, limit: u64) -> Result<Received, ReceiptError> {
    let mut reader = JsonlReader::with_limit(input, MAX_RECORD_LINE_BYTES);
    let mut receipt = Receipt::default();
    loop {
        let line: Option<HostedLine> = reader
            .next_message()
            .map_err(|e| ReceiptError::Refused(format!("a line is not a record line: {e}")))?;
        match line {
            None => {
                return Err(ReceiptError::Cut(format!(
                    "after {} file(s), before its end line",
                    receipt.files
                )))
            }
            Some(HostedLine::File {
                path,
                bytes,
                executable,
            }) => receipt.file(reader.get_mut(), record, &path, bytes, executable, limit)?,
            Some(HostedLine::End { files }) if files == receipt.files => {
                return Ok(Received {
                    files,
                    charged_bytes: receipt.bytes,
                })
            }
            Some(HostedLine::End { files }) => {
                return Err(ReceiptError::Refused(format!(
                    "its end line counts {files} files, {} were sent",
                    receipt.files
                )))
            }
            Some(HostedLine::Hello { .. }) => {
                return Err(ReceiptError::Refused(
                    "a hello line in the record stream".into(),
                ))
            }
            Some(HostedLine::Source { .. }) => {
                return Err(ReceiptError::Refused(
                    "a source line in the record stream".into(),
                ))
            }
        }
    }
}

/// What has arrived of a record, and what it costs the local disk.
#[derive(Default)]
struct Receipt {
    files: u64,
    bytes: u64,
    /// The directories charged so far, relative to the record.
    dirs: HashSet<PathBuf>,
}

/// What a record file of `bytes` bytes costs: its size rounded up to a block, at least one.
fn record_file_cost(bytes: u64) -> u64 {
    bytes
        .div_ceil(RECORD_ENTRY_BYTES)
        .max(1)
        .saturating_mul(RECORD_ENTRY_BYTES)
}

impl Receipt {
    /// Receives one file of `bytes` bytes from `input` into `record/path`: a relative path
    /// of plain names, not one of [`NOT_SENT`], new, within the record's limits.
    fn file(
        &mut self,
        input: &mut impl Read,
        record: &Path,
        path: &str,
        bytes: u64,
        executable: bool,
        limit: u64,
    ) -> Result<(), ReceiptError> {
        let refused = ReceiptError::Refused;
        let relative = checked_path(path)?;
        self.files += 1;
        if self.files > MAX_RECORD_FILES {
            return Err(refused(format!(
                "it holds more than {MAX_RECORD_FILES} files"
            )));
        }
        // Every directory the file needs that is not charged yet is charged now, whether or
        // not it exists already (the count errs on the safe side).
        let new_dirs: Vec<PathBuf> = relative
            .ancestors()
            .skip(1)
            .filter(|d| !d.as_os_str().is_empty() && !self.dirs.contains(*d))
            .map(Path::to_path_buf)
            .collect();
        let dirs = self.dirs.len() as u64 + new_dirs.len() as u64;
        if dirs > MAX_RECORD_DIRS {
            return Err(refused(format!(
                "{path:?} would bring it to {dirs} directories; at most {MAX_RECORD_DIRS} are accepted"
            )));
        }
        let cost = record_file_cost(bytes)
            .saturating_add((new_dirs.len() as u64).saturating_mul(RECORD_ENTRY_BYTES));
        self.bytes = self.bytes.saturating_add(cost);
        if self.bytes > limit {
            return Err(refused(format!(
                "it is bigger than {limit} bytes (max_log + max_artifacts + {RECORD_OVERHEAD_BYTES}), \
                 counting each file and directory as at least {RECORD_ENTRY_BYTES} bytes"
            )));
        }
        self.dirs.extend(new_dirs);
        write_file(input, &record.join(relative), path, bytes, executable)
    }
}

/// `path` as a relative path of plain names, not one of [`NOT_SENT`]; else why not.
fn checked_path(path: &str) -> Result<&Path, ReceiptError> {
    let refused = ReceiptError::Refused;
    let relative = Path::new(path);
    let plain = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    let depth = relative.components().count();
    if !plain || depth == 0 || depth > MAX_RECORD_DEPTH || path.contains('\0') {
        return Err(refused(format!(
            "{path:?} is not a relative path of plain names"
        )));
    }
    let first = relative.components().next().map(|c| c.as_os_str());
    if NOT_SENT
        .iter()
        .any(|n| first == Some(std::ffi::OsStr::new(n)))
    {
        return Err(refused(format!(
            "{path:?} is written by this host, not sent"
        )));
    }
    Ok(relative)
}

/// Writes the `bytes` bytes of record file `path` from `input` into the new file `target`
/// (its directories made as needed; executable or not).
fn write_file(
    input: &mut impl Read,
    target: &Path,
    path: &str,
    bytes: u64,
    executable: bool,
) -> Result<(), ReceiptError> {
    if let Some(parent) = target.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|source| ReceiptError::Io {
                action: "create",
                path: parent.to_path_buf(),
                source,
            })?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(target)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => ReceiptError::Refused(format!(
                "{path:?} was sent twice or is already in the record"
            )),
            _ => ReceiptError::Io {
                action: "create",
                path: target.to_path_buf(),
                source,
            },
        })?;
    let copied =
        std::io::copy(&mut input.take(bytes), &mut file).map_err(|source| ReceiptError::Io {
            action: "write",
            path: target.to_path_buf(),
            source,
        })?;
    if copied != bytes {
        return Err(ReceiptError::Cut(format!(
            "{path:?} ended after {copied} of its {bytes} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_file_lands_only_as_a_new_plain_path_within_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut received = Receipt::default();
        let mut input: &[u8] = b"hello world";
        received
            .file(&mut input, dir.path(), "artifacts/bin/x", 5, true, 1 << 20)
            .expect("a plain path is received");
        assert_eq!(
            std::fs::read(dir.path().join("artifacts/bin/x")).expect("read"),
            b"hello"
        );
        assert_eq!(input, b" world", "exactly the file's bytes are taken");
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../x",
            "result.json",
            "owner.json",
            "",
        ] {
            let mut input: &[u8] = b"x";
            assert!(
                received
                    .file(&mut input, dir.path(), bad, 1, false, 1 << 20)
                    .is_err(),
                "{bad:?} was received"
            );
        }
        let mut input: &[u8] = b"xx";
        assert!(
            received
                .file(&mut input, dir.path(), "artifacts/bin/x", 1, false, 1 << 20)
                .is_err(),
            "an existing file is never overwritten"
        );
        let mut input: &[u8] = &[0u8; 200];
        let err = received
            .file(&mut input, dir.path(), "big", 200, false, 100)
            .expect_err("over the limit")
            .to_string();
        assert!(err.contains("bigger than 100 bytes"), "{err}");
        let mut input: &[u8] = b"abc";
        let err = received
            .file(&mut input, dir.path(), "short", 10, false, 1 << 20)
            .expect_err("short")
            .to_string();
        assert!(err.contains("ended after 3 of its 10 bytes"), "{err}");
    }

    #[test]
    fn empty_files_in_deep_directories_are_charged_a_block_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut received = Receipt::default();
        // 256 blocks; a hostile build host sends 500 empty files, each 63 levels deep in
        // a tree of its own (62 directories): 31,500 directories for 0 bytes of files.
        let limit = 256 * 4096;
        let deep = vec!["d"; 61].join("/");
        let mut refused = None;
        for i in 0..500 {
            let path = format!("t{i}/{deep}/empty");
            let mut input: &[u8] = b"";
            if let Err(why) = received.file(&mut input, dir.path(), &path, 0, false, limit) {
                refused = Some((i, why.to_string()));
                break;
            }
        }
        let (i, why) = refused.expect("31,500 directories were made for an empty record");
        // Each file costs 63 blocks (62 directories and itself): the fifth passes 256.
        assert_eq!(i, 4, "{why}");
        assert!(why.contains("bigger than 1048576 bytes"), "{why}");
        assert!(why.contains("each file and directory"), "{why}");
        assert!(
            !dir.path().join("t4").exists(),
            "nothing made for a refused file"
        );
        // Directories already charged are not charged again: a sibling costs one block.
        let mut received = Receipt::default();
        for name in ["a/b/c/one", "a/b/c/two", "a/b/three"] {
            let mut input: &[u8] = b"x";
            received
                .file(&mut input, dir.path(), name, 1, false, 6 * 4096)
                .expect("three directories and three files fit in six blocks");
        }
        let mut input: &[u8] = b"";
        let err = received
            .file(&mut input, dir.path(), "a/four", 0, false, 6 * 4096)
            .expect_err("a seventh block")
            .to_string();
        assert!(err.contains("bigger than"), "{err}");
    }

    #[test]
    fn the_directories_of_a_record_are_capped_in_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut received = Receipt::default();
        received
            .dirs
            .extend((1..MAX_RECORD_DIRS).map(|n| PathBuf::from(format!("seen{n}"))));
        let mut input: &[u8] = b"";
        let err = received
            .file(&mut input, dir.path(), "a/b/f", 0, false, u64::MAX)
            .expect_err("over the cap")
            .to_string();
        assert!(
            err.contains("100001 directories; at most 100000 are accepted"),
            "{err}"
        );
        let mut input: &[u8] = b"";
        received
            .file(&mut input, dir.path(), "a/f", 0, false, u64::MAX)
            .expect("one more directory fits");
    }

    #[test]
    fn a_stream_is_received_to_its_end_line_and_a_cut_one_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stream = b"{\"type\":\"file\",\"path\":\"build.log\",\"bytes\":3,\"executable\":false}\nlog{\"type\":\"end\",\"files\":1}\nafter";
        let received = receive(&stream[..], dir.path(), 1 << 20).expect("received");
        assert_eq!(received.files, 1);
        assert_eq!(
            std::fs::read(dir.path().join("build.log")).expect("log"),
            b"log"
        );
        let cut = b"{\"type\":\"file\",\"path\":\"x\",\"bytes\":1,\"executable\":false}\nx";
        let err = receive(&cut[..], dir.path(), 1 << 20).expect_err("cut");
        assert_eq!(err.code(), ToolCode::RecordCut, "{err}");
        for bad in [&b"{\"type\":\"end\",\"files\":2}\n"[..], b"garbage\n"] {
            let err = receive(bad, dir.path(), 1 << 20).expect_err("refused");
            assert_eq!(err.code(), ToolCode::RecordRefused, "{err}");
        }
    }
}
