//! A snapshot's own files, sealed when it is made and checked before each restore, so that
//! a snapshot changed behind Contractor's back is never restored.
//!
//! When a snapshot is made its files (saved state, root overlay, build disk) are given to
//! the user who made it (root under `qemu:///system`, where libvirt's relabelling may have
//! left them QEMU's), mode 0644, and each is hashed ([`content_sha256`]) and its identity
//! recorded: device, inode, size, modification and change time ([`Identity`]). Before a
//! restore each file's identity is compared with the recorded one; only a file whose
//! identity changed is hashed again, and a hash that differs discards the snapshot.
//!
//! Why the identity is enough when it is unchanged: every write to a file, every
//! `utimensat` that sets its modification time back, every `chown`/`chmod` and every
//! rename of another file into its place changes its change time (`ctime`) or its inode,
//! and no system call lets a process set `ctime`: only root can get around it (by setting
//! the system clock, or writing the block device). The files are owned by the user who
//! made them and not writable by anyone else, and libvirt is told never to relabel them
//! (see `crate::xml`), so QEMU's user cannot write them at all; the identity check is what
//! catches a writer that kept size and modification time, at the price of a `stat` per
//! file instead of reading some 200 MiB at every restore.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{lseek, Whence};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// One sealed file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SealedFile {
    /// Its name in the snapshot's directory.
    pub(super) name: String,
    /// [`content_sha256`] when it was sealed.
    pub(super) sha256: String,
    /// Its identity when it was last hashed.
    pub(super) identity: Identity,
}

/// Gives `dir/name` to this process's user, mode 0644, and seals it.
pub(super) fn seal(dir: &Path, name: &str) -> Result<SealedFile, String> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getegid();
    nix::unistd::fchown(file.as_fd(), Some(uid), Some(gid))
        .map_err(|e| format!("cannot give {} to uid {uid}: {e}", path.display()))?;
    nix::sys::stat::fchmod(
        file.as_fd(),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    let (sha256, identity) = hashed(&file, &path)?;
    Ok(SealedFile {
        name: name.to_string(),
        sha256,
        identity,
    })
}

/// What [`check`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Checked {
    /// Every file has the identity it was sealed with.
    Unchanged,
    /// Some file's identity changed but its content did not: the seals with the new
    /// identities, to record.
    Resealed(Vec<SealedFile>),
}

/// Checks the sealed files of the snapshot in `dir`; `Err` names the file that changed (or
/// cannot be read) and how.
pub(super) fn check(dir: &Path, sealed: &[SealedFile]) -> Result<Checked, String> {
    let mut changed = false;
    let mut now = Vec::with_capacity(sealed.len());
    for seal in sealed {
        let path = dir.join(&seal.name);
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if Identity::of(&meta) == seal.identity {
            now.push(seal.clone());
            continue;
        }
        let (sha256, identity) = hashed(&file, &path)?;
        if sha256 != seal.sha256 {
            return Err(format!(
                "{} changed since the snapshot was made (sha256 {sha256}, was {})",
                path.display(),
                seal.sha256
            ));
        }
        changed = true;
        now.push(SealedFile {
            name: seal.name.clone(),
            sha256,
            identity,
        });
    }
    Ok(if changed {
        Checked::Resealed(now)
    } else {
        Checked::Unchanged
    })
}

/// The file's [`content_sha256`] and its identity, which must be the same before and after
/// the reading.
fn hashed(file: &std::fs::File, path: &Path) -> Result<(String, Identity), String> {
    let stat = || {
        file.metadata()
            .map(|m| Identity::of(&m))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let before = stat()?;
    let sha256 =
        content_sha256(file).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if stat()? != before {
        return Err(format!("{} changed while it was read", path.display()));
    }
    Ok((sha256, before))
}

/// The sha256 of a file's content as its data extents: for each (found with `SEEK_DATA`
/// and `SEEK_HOLE`, so a sparse build disk of some GiB costs only what it holds), its
/// offset and length (8 bytes each, little-endian) and its bytes; then the file's size.
/// Holes read as zeros, so the extents and the size determine the content: two files with
/// the same value have the same bytes. A file system without `SEEK_DATA` gives one extent,
/// the whole file.
pub(super) fn content_sha256(file: &std::fs::File) -> std::io::Result<String> {
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset: u64 = 0;
    while offset < size {
        let (start, end) = match data_extent(file, offset, size)? {
            Some(extent) => extent,
            None => break,
        };
        hasher.update(start.to_le_bytes());
        hasher.update((end - start).to_le_bytes());
        let mut reader = std::io::Read::take(reader_at(file, start)?, end - start);
        let mut read: u64 = 0;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        if read != end - start {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file is shorter than its extents",
            ));
        }
        offset = end;
    }
    hasher.update(size.to_le_bytes());
    Ok(crate::image::hex(&hasher.finalize()))
}

/// The next data extent at or after `offset`: `(start, end)`, or none.
fn data_extent(
    file: &std::fs::File,
    offset: u64,
    size: u64,
) -> std::io::Result<Option<(u64, u64)>> {
    let at = |o: u64| i64::try_from(o).map_err(|_| std::io::Error::other("offset too large"));
    let start = match lseek(file.as_fd(), at(offset)?, Whence::SeekData) {
        Ok(start) => start as u64,
        // Past the last data.
        Err(nix::errno::Errno::ENXIO) => return Ok(None),
        // No SEEK_DATA here: all of it is data.
        Err(nix::errno::Errno::EINVAL) => return Ok(Some((offset, size))),
        Err(e) => return Err(e.into()),
    };
    let end = match lseek(file.as_fd(), at(start)?, Whence::SeekHole) {
        Ok(end) => (end as u64).min(size),
        Err(nix::errno::Errno::EINVAL) => size,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((start, end)))
}

/// A reader of `file` from `offset` on (its own descriptor's position, set by `lseek`).
fn reader_at(file: &std::fs::File, offset: u64) -> std::io::Result<&std::fs::File> {
    let at = i64::try_from(offset).map_err(|_| std::io::Error::other("offset too large"))?;
    lseek(file.as_fd(), at, Whence::SeekSet)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn the_content_hash_sees_a_byte_written_into_a_hole_or_over_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        let hash = || content_sha256(&std::fs::File::open(&path).expect("open")).expect("hash");
        let write_at = |offset: u64, bytes: &[u8]| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .expect("open");
            file.seek(SeekFrom::Start(offset)).expect("seek");
            file.write_all(bytes).expect("write");
        };
        write_at(8 << 20, b"data in the middle");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(64 << 20))
            .expect("sparse");
        let sparse = hash();
        assert_eq!(hash(), sparse, "stable");
        write_at(40 << 20, b"x");
        let filled = hash();
        assert_ne!(filled, sparse, "a byte written into a hole");
        write_at(8 << 20, b"DATA");
        assert_ne!(hash(), filled, "bytes written over data");
    }

    #[test]
    fn a_change_that_keeps_size_and_mtime_is_found_and_an_untouched_file_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("state.save"), vec![7u8; 100_000]).expect("write");
        let sealed = vec![seal(dir.path(), "state.save").expect("seal")];
        let meta = std::fs::metadata(dir.path().join("state.save")).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o644);
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        assert_eq!(check(dir.path(), &sealed), Ok(Checked::Unchanged));

        // Touched but not changed: resealed with its new identity, not refused.
        let file = std::fs::File::options()
            .write(true)
            .open(dir.path().join("state.save"))
            .expect("open");
        file.set_modified(std::time::SystemTime::now())
            .expect("touch");
        drop(file);
        let Ok(Checked::Resealed(again)) = check(dir.path(), &sealed) else {
            panic!("not resealed")
        };
        assert_eq!(again[0].sha256, sealed[0].sha256);
        assert_eq!(check(dir.path(), &again), Ok(Checked::Unchanged));

        // One byte changed, its size and modification time put back.
        let path = dir.path().join("state.save");
        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");
        let mut file = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        file.seek(SeekFrom::Start(50_000)).expect("seek");
        file.write_all(&[8]).expect("write");
        file.set_modified(mtime).expect("mtime back");
        drop(file);
        let err = check(dir.path(), &again).expect_err("changed");
        assert!(err.contains("state.save changed"), "{err}");
        assert!(err.contains(&again[0].sha256), "{err}");

        std::fs::remove_file(&path).expect("rm");
        let err = check(dir.path(), &again).expect_err("missing");
        assert!(err.contains("state.save"), "{err}");
    }
}
