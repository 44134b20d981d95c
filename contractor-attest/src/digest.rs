//! The SHA-256 of a record's files: its artifacts (from the store's `artifacts.json`, or
//! hashed here) and single files, streamed. Only regular files are opened, never a link
//! (contractor_protocol::file), and at most [`MAX_SUBJECTS`] artifacts are listed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{hex, io, AttestError};

/// Most artifacts a statement lists (more are an error: the statement would not be true).
pub const MAX_SUBJECTS: usize = 100_000;
/// Most bytes of a record's `artifacts.json` read (an entry is about 150 bytes).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Each artifact's path beneath `artifacts/` and SHA-256: from the store's
/// `artifacts.json` when the record has one, else hashed here.
pub fn artifact_digests(record: &Path) -> Result<BTreeMap<String, String>, AttestError> {
    let index = record.join("artifacts.json");
    if let Ok(bytes) = contractor_protocol::file::read_regular(&index, MAX_INDEX_BYTES) {
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            if let Some(list) = value["artifacts"].as_array() {
                let found: BTreeMap<String, String> = list
                    .iter()
                    .filter_map(|a| {
                        Some((a["path"].as_str()?.into(), a["sha256"].as_str()?.into()))
                    })
                    .collect();
                if found.len() > MAX_SUBJECTS {
                    return Err(AttestError::TooManyArtifacts(index));
                }
                return Ok(found);
            }
        }
    }
    hash_artifacts(&record.join("artifacts"))
}

/// Hashes every regular file under `dir` (links and special files left out), by its
/// `/`-separated path beneath it.
pub fn hash_artifacts(dir: &Path) -> Result<BTreeMap<String, String>, AttestError> {
    let mut found = BTreeMap::new();
    for path in regular_files(dir)? {
        let Ok(relative) = path.strip_prefix(dir) else {
            continue;
        };
        if let Some(sha256) = file_sha256(&path)? {
            found.insert(relative.to_string_lossy().into_owned(), sha256);
        }
    }
    Ok(found)
}

/// The regular files beneath `dir`, sorted; directories are walked, nothing else followed.
fn regular_files(dir: &Path) -> Result<Vec<PathBuf>, AttestError> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => found.push(entry.path()),
                _ => {}
            }
            if found.len() > MAX_SUBJECTS {
                return Err(AttestError::TooManyArtifacts(dir));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// SHA-256 of the regular file `path`, streamed; `None` when it does not exist.
pub fn file_sha256(path: &Path) -> Result<Option<String>, AttestError> {
    let mut file = match contractor_protocol::file::open_regular(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AttestError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(hex(&hasher.finalize())))
}
