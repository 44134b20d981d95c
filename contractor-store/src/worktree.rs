//! Whether a project is in a git work tree, and which of its paths git tracks: what packing
//! needs to apply `.gitignore` as git does (only in a work tree, and never to a tracked
//! file).
//!
//! The project directory is hostile, so git itself is never run on it: a repository's
//! config can name programs git runs (`core.fsmonitor`, `core.hooksPath`, filters, an
//! alternate `core.worktree`), and no flag list is sure to switch them all off. Instead the
//! index file (`.git/index`, format versions 2, 3 and 4, SHA-1 or SHA-256) is read as
//! plain bytes, through the same reader as every other file of the project (regular files
//! only, no links followed at the last component, at most [`MAX_INDEX_BYTES`]), and parsed
//! with every length checked. An index that cannot be read or parsed gives a warning and no
//! tracked paths (the `.gitignore` files still apply).
//!
//! A work tree is found as git finds one: the nearest of the project directory and its
//! parents that holds a `.git` directory with a `HEAD`, or a `.git` file saying
//! `gitdir: <path>` (a linked work tree or a submodule), whose `index` is then read.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use contractor_protocol::file::read_regular;

/// Largest index file read: 256 MiB (an index of a million paths is about 100 MiB). A bigger
/// one is not read (warning): `.gitignore` then applies to tracked files too.
pub const MAX_INDEX_BYTES: u64 = 256 * 1024 * 1024;

/// Largest `.git` file (`gitdir: <path>`) read: 4 KiB.
pub const MAX_GITFILE_BYTES: u64 = 4096;

/// The git work tree a project is in.
#[derive(Debug, Default)]
pub struct WorkTree {
    /// Paths git tracks, relative to the project directory (as bytes, `/`-separated).
    pub tracked: HashSet<Vec<u8>>,
    /// Directories (relative to the project directory) that hold a tracked path.
    pub tracked_dirs: HashSet<Vec<u8>>,
    /// Why the tracked paths could not be read, if they could not.
    pub warning: Option<String>,
}

impl WorkTree {
    /// Whether git tracks `relative` (a file or link), or a path under it (a directory).
    pub fn tracks(&self, relative: &Path, is_dir: bool) -> bool {
        let bytes = relative.as_os_str().as_bytes();
        if is_dir {
            self.tracked_dirs.contains(bytes)
        } else {
            self.tracked.contains(bytes)
        }
    }
}

/// The work tree `project` is in, or `None` when it is in none.
pub fn find(project: &Path) -> Option<WorkTree> {
    let project = std::fs::canonicalize(project).ok()?;
    for top in project.ancestors() {
        let dot_git = top.join(".git");
        let Ok(meta) = std::fs::symlink_metadata(&dot_git) else {
            continue;
        };
        let git_dir = if meta.is_dir() {
            if !dot_git.join("HEAD").exists() {
                continue;
            }
            dot_git
        } else if meta.is_file() {
            match read_gitfile(&dot_git) {
                Ok(dir) => dir,
                Err(why) => return Some(unread(format!("{}: {why}", dot_git.display()))),
            }
        } else {
            return Some(unread(format!(
                "{} is a symbolic link or special file, not followed",
                dot_git.display()
            )));
        };
        let prefix = project
            .strip_prefix(top)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let index = git_dir.join("index");
        return Some(match read_index(&index) {
            Ok(paths) => tracked_under(paths, &prefix),
            // A repository with nothing added yet has no index: nothing is tracked.
            Err(IndexError::Missing) => WorkTree::default(),
            Err(err) => unread(format!("{}: {err}", index.display())),
        });
    }
    None
}

fn unread(why: String) -> WorkTree {
    WorkTree {
        warning: Some(format!(
            "cannot tell which files git tracks ({why}): .gitignore applied to all files"
        )),
        ..WorkTree::default()
    }
}

/// The directory a `.git` file names (`gitdir: <path>`, relative to the file's directory).
fn read_gitfile(path: &Path) -> Result<PathBuf, String> {
    let bytes = read_regular(path, MAX_GITFILE_BYTES).map_err(|e| e.to_string())?;
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let dir = line
        .strip_prefix(b"gitdir: ")
        .ok_or("it does not start with `gitdir: `")?;
    let dir = Path::new(OsStr::from_bytes(dir.strip_suffix(b"\r").unwrap_or(dir)));
    let base = path.parent().unwrap_or(Path::new("/"));
    Ok(base.join(dir))
}

/// The tracked paths under `prefix` (the project's place in the work tree), relative to it.
fn tracked_under(paths: Vec<Vec<u8>>, prefix: &Path) -> WorkTree {
    let mut prefix = prefix.as_os_str().as_bytes().to_vec();
    if !prefix.is_empty() {
        prefix.push(b'/');
    }
    let mut tree = WorkTree::default();
    for path in paths {
        let Some(relative) = path.strip_prefix(prefix.as_slice()) else {
            continue;
        };
        for (i, &b) in relative.iter().enumerate() {
            if b == b'/' {
                tree.tracked_dirs.insert(relative[..i].to_vec());
            }
        }
        tree.tracked.insert(relative.to_vec());
    }
    tree
}

/// Why an index could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// There is no index file.
    #[error("there is no index")]
    Missing,
    /// It could not be read.
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    /// It is not an index this parser knows.
    #[error("not a git index of version 2, 3 or 4: {0}")]
    Format(&'static str),
}

/// The paths in the index file `path` (each once per stage it has).
pub fn read_index(path: &Path) -> Result<Vec<Vec<u8>>, IndexError> {
    let bytes = read_regular(path, MAX_INDEX_BYTES).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => IndexError::Missing,
        _ => IndexError::Read(e),
    })?;
    // The hash length is in the repository's config; rather than read that too, try SHA-1
    // then SHA-256: every entry's name length is checked, so the wrong one does not parse.
    parse_index(&bytes, 20).or_else(|_| parse_index(&bytes, 32))
}

/// Parses an index whose object names are `hash_len` bytes long.
pub fn parse_index(bytes: &[u8], hash_len: usize) -> Result<Vec<Vec<u8>>, IndexError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != b"DIRC" {
        return Err(IndexError::Format("no DIRC signature"));
    }
    let version = r.u32()?;
    if !(2..=4).contains(&version) {
        return Err(IndexError::Format("unknown version"));
    }
    let count = r.u32()? as usize;
    // Each entry takes at least 62 bytes: a count beyond that is a lie, not an allocation.
    if count > bytes.len() / 62 {
        return Err(IndexError::Format("more entries than the file can hold"));
    }
    let mut paths: Vec<Vec<u8>> = Vec::with_capacity(count);
    for _ in 0..count {
        let start = r.at;
        r.take(40 + hash_len)?;
        let flags = r.u16()?;
        if flags & 0x4000 != 0 {
            if version < 3 {
                return Err(IndexError::Format("extended flags in a version 2 index"));
            }
            r.u16()?;
        }
        let name_len = usize::from(flags & 0x0fff);
        let path = if version == 4 {
            let strip = r.varint()?;
            let previous = paths.last().map(Vec::as_slice).unwrap_or_default();
            let keep = previous
                .len()
                .checked_sub(strip)
                .ok_or(IndexError::Format("a path strips more than the one before"))?;
            let mut path = previous[..keep].to_vec();
            path.extend_from_slice(r.until_nul()?);
            path
        } else {
            let path = r.until_nul()?.to_vec();
            // 1 to 8 NULs pad the entry to a multiple of 8 bytes; one was read.
            let len = r.at - start;
            r.take((8 - len % 8) % 8)?;
            path
        };
        if name_len != 0x0fff && path.len() != name_len {
            return Err(IndexError::Format(
                "a name's length does not match its flags",
            ));
        }
        if path.is_empty() || path.starts_with(b"/") {
            return Err(IndexError::Format("an empty or absolute path"));
        }
        paths.push(path);
    }
    Ok(paths)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(IndexError::Format("truncated"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u32(&mut self) -> Result<u32, IndexError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u16(&mut self) -> Result<u16, IndexError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn until_nul(&mut self) -> Result<&'a [u8], IndexError> {
        let rest = &self.bytes[self.at..];
        let n = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(IndexError::Format("a path without its NUL"))?;
        self.at += n + 1;
        Ok(&rest[..n])
    }

    /// git's offset varint (each continuation adds one before shifting).
    fn varint(&mut self) -> Result<usize, IndexError> {
        let mut byte = self.take(1)?[0];
        let mut value = usize::from(byte & 0x7f);
        while byte & 0x80 != 0 {
            byte = self.take(1)?[0];
            value = value
                .checked_add(1)
                .and_then(|v| v.checked_mul(128))
                .and_then(|v| v.checked_add(usize::from(byte & 0x7f)))
                .ok_or(IndexError::Format("a prefix length overflows"))?;
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 2 index entry for `path` (SHA-1), as git writes it.
    fn entry_v2(path: &str) -> Vec<u8> {
        let mut e = vec![0u8; 40 + 20];
        e.extend_from_slice(&(path.len() as u16).to_be_bytes());
        e.extend_from_slice(path.as_bytes());
        let pad = 8 - e.len() % 8;
        e.extend(std::iter::repeat_n(0, pad));
        e
    }

    fn index(version: u32, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut i = b"DIRC".to_vec();
        i.extend_from_slice(&version.to_be_bytes());
        i.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for e in entries {
            i.extend_from_slice(e);
        }
        i.extend_from_slice(&[0u8; 20]);
        i
    }

    #[test]
    fn a_version_2_index_gives_its_paths() {
        let i = index(2, &[entry_v2("Cargo.lock"), entry_v2("src/lib.rs")]);
        assert_eq!(
            parse_index(&i, 20).expect("parse"),
            [b"Cargo.lock".to_vec(), b"src/lib.rs".to_vec()]
        );
    }

    #[test]
    fn a_version_4_index_shares_prefixes() {
        let mut entries = Vec::new();
        for (strip, suffix, full) in [(0u8, "src/a.rs", "src/a.rs"), (4, "b.rs", "src/b.rs")] {
            let mut e = vec![0u8; 60];
            e.extend_from_slice(&(full.len() as u16).to_be_bytes());
            e.push(strip);
            e.extend_from_slice(suffix.as_bytes());
            e.push(0);
            entries.push(e);
        }
        let i = index(4, &entries);
        assert_eq!(
            parse_index(&i, 20).expect("parse"),
            [b"src/a.rs".to_vec(), b"src/b.rs".to_vec()]
        );
    }

    #[test]
    fn broken_indexes_are_errors_not_panics() {
        let good = index(2, &[entry_v2("a")]);
        for cut in 0..good.len() - 20 {
            assert!(parse_index(&good[..cut], 20).is_err(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_index(&huge, 20).is_err());
        let mut v9 = good;
        v9[4..8].copy_from_slice(&9u32.to_be_bytes());
        assert!(parse_index(&v9, 20).is_err());
    }

    #[test]
    fn tracked_paths_are_taken_relative_to_the_project() {
        let tree = tracked_under(
            vec![b"sub/dir/x".to_vec(), b"other/y".to_vec()],
            Path::new("sub"),
        );
        assert!(tree.tracks(Path::new("dir/x"), false));
        assert!(tree.tracks(Path::new("dir"), true));
        assert!(!tree.tracks(Path::new("other/y"), false));
    }
}
