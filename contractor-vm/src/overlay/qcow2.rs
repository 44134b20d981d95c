//! qcow2 headers read and written here, without `qemu-img`, for the one case that is on
//! the path of every restore: an empty overlay on a known backing file, and the backing
//! chain of the snapshot's own root.
//!
//! Why not `qemu-img`: each `qemu-img` run costs a process start (some 15-30 ms here), and
//! `qemu-img create` flushes the new file to disk five times (`fdatasync`), which on a busy
//! host's disk took up to 1.7 s per overlay. The overlay is thrown away with its VM, so
//! nothing is gained by flushing it: it is written here in one `write` and never synced.
//!
//! The overlay written is what `qemu-img create -f qcow2 -F FMT -b BACKING` writes (qcow2
//! version 3, 64 KiB clusters, 16-bit refcounts): the header with the backing format
//! extension and the backing file's name in cluster 0, the refcount table in cluster 1,
//! its one refcount block in cluster 2 and the (empty) L1 table from cluster 3. Its virtual
//! size is the backing file's. Limits: a backing name of at most [`MAX_BACKING_NAME`]
//! bytes (QEMU's own limit) and a virtual size of at most [`MAX_SIZE`] (one cluster of L1
//! table); anything else is [`Unsupported`] and the caller uses `qemu-img`.
//!
//! The reader ([`chain`]) follows backing file names only through qcow2 headers that name
//! their backing format (as every overlay of Contractor does) and raw files; anything else
//! (another format, a `json:` or protocol name, a header it does not know) is
//! [`Unsupported`] too. A header is read with one bounded read of its first cluster.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A file or request this module does not handle; the caller falls back to `qemu-img`.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct Unsupported {
    /// Why.
    pub reason: String,
}

/// What can go wrong reading or writing a header.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Not something handled here: use `qemu-img`.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// The file could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

const MAGIC: u32 = 0x5146_49fb;
const CLUSTER_BITS: u32 = 16;
const CLUSTER: usize = 1 << CLUSTER_BITS;
/// The length of a version 3 header without optional fields.
const HEADER_V3: u32 = 104;
/// The length of a version 2 header.
const HEADER_V2: u32 = 72;
/// The header extension that names the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// The longest backing file name: 1023 bytes (QEMU refuses longer ones).
pub const MAX_BACKING_NAME: usize = 1023;
/// The largest virtual size of an overlay written here: 4 TiB (an L1 table of one
/// cluster: 8192 entries of 512 MiB each).
pub const MAX_SIZE: u64 = (CLUSTER as u64 / 8) << (CLUSTER_BITS + CLUSTER_BITS - 3);
/// The most layers [`chain`] follows (as `crate::overlay::MAX_BACKING_CHAIN`).
const MAX_LAYERS: usize = super::MAX_BACKING_CHAIN;

fn unsupported(reason: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Unsupported(Unsupported {
        reason: reason.into(),
    })
}

/// One layer of a backing chain: its file, its format and its virtual size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The file.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// The virtual size in bytes.
    pub size: u64,
}

/// What a qcow2 header says.
struct Header {
    size: u64,
    backing: Option<(PathBuf, String)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// Reads the qcow2 header of `path` (at most its first cluster).
fn read_header(path: &Path) -> Result<Header, Qcow2Error> {
    let io = |source| Qcow2Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(CLUSTER);
    fs::File::open(path)
        .and_then(|f| f.take(CLUSTER as u64).read_to_end(&mut head))
        .map_err(io)?;
    let name = path.display();
    if head.len() < HEADER_V2 as usize || be32(&head, 0) != MAGIC {
        return Err(unsupported(format!("{name} is not a qcow2 file")));
    }
    let version = be32(&head, 4);
    let header_len = match version {
        2 => HEADER_V2,
        3 if head.len() >= HEADER_V3 as usize => be32(&head, 100),
        _ => return Err(unsupported(format!("{name}: qcow2 version {version}"))),
    } as usize;
    if version == 3 && be64(&head, 72) != 0 {
        return Err(unsupported(format!("{name}: incompatible qcow2 features")));
    }
    let size = be64(&head, 24);
    let backing_offset = be64(&head, 8);
    let backing_len = be32(&head, 16) as usize;
    if backing_offset == 0 {
        return Ok(Header {
            size,
            backing: None,
        });
    }
    let start = usize::try_from(backing_offset).unwrap_or(usize::MAX);
    if backing_len > MAX_BACKING_NAME || start.saturating_add(backing_len) > head.len() {
        return Err(unsupported(format!(
            "{name}: its backing file name is not within its first cluster"
        )));
    }
    let name_bytes = &head[start..start + backing_len];
    // A protocol (`nbd://…`) or `json:` name is not a file: QEMU's to resolve.
    if name_bytes.starts_with(b"json:") || name_bytes.windows(3).any(|w| w == b"://") {
        return Err(unsupported(format!(
            "{name}: its backing is not a file name"
        )));
    }
    let backing = PathBuf::from(std::ffi::OsStr::from_bytes(name_bytes));
    // The header extensions, from the end of the header to the first of type 0.
    let mut at = header_len;
    let mut format = None;
    while at + 8 <= head.len().min(start) {
        let (kind, len) = (be32(&head, at), be32(&head, at + 4) as usize);
        if kind == 0 {
            break;
        }
        let data = at + 8;
        if data + len > head.len() {
            break;
        }
        if kind == EXT_BACKING_FORMAT {
            format = std::str::from_utf8(&head[data..data + len])
                .ok()
                .map(str::to_string);
        }
        at = data + len.div_ceil(8) * 8;
    }
    let Some(format) = format else {
        return Err(unsupported(format!(
            "{name} does not name its backing file's format"
        )));
    };
    // A relative name is relative to the overlay's directory, as QEMU reads it.
    let backing = match (backing.is_absolute(), path.parent()) {
        (false, Some(dir)) => dir.join(backing),
        _ => backing,
    };
    Ok(Header {
        size,
        backing: Some((backing, format)),
    })
}

/// The backing chain of `path`, a file of `format` (`qcow2` or `raw`): itself first, then
/// each file it stands on.
pub fn chain(path: &Path, format: &str) -> Result<Vec<Layer>, Qcow2Error> {
    let mut layers = Vec::new();
    let mut next = Some((path.to_owned(), format.to_string()));
    while let Some((path, format)) = next.take() {
        if layers.len() == MAX_LAYERS {
            return Err(unsupported(format!(
                "{}: more than {MAX_LAYERS} layers",
                path.display()
            )));
        }
        let size = match format.as_str() {
            "qcow2" => {
                let header = read_header(&path)?;
                next = header.backing;
                header.size
            }
            "raw" => fs::metadata(&path)
                .map_err(|source| Qcow2Error::Io {
                    path: path.clone(),
                    source,
                })?
                .len(),
            other => return Err(unsupported(format!("{}: format {other}", path.display()))),
        };
        layers.push(Layer { path, format, size });
    }
    Ok(layers)
}

/// The bytes of an empty qcow2 overlay of `size` bytes on `backing` (a file of `format`).
fn overlay_bytes(backing: &Path, format: &str, size: u64) -> Result<Vec<u8>, Qcow2Error> {
    let name = backing.as_os_str().as_bytes();
    if name.is_empty() || name.len() > MAX_BACKING_NAME {
        return Err(unsupported(format!(
            "a backing file name of {} bytes (1 to {MAX_BACKING_NAME} are written here)",
            name.len()
        )));
    }
    if size == 0 || size > MAX_SIZE {
        return Err(unsupported(format!(
            "a virtual size of {size} bytes (1 to {MAX_SIZE} are written here)"
        )));
    }
    // Each L1 entry maps one L2 table of CLUSTER / 8 clusters.
    let per_l1 = (CLUSTER as u64 / 8) << CLUSTER_BITS;
    let l1_entries = size.div_ceil(per_l1);
    let l1_offset = 3 * CLUSTER;
    let mut file = vec![0u8; l1_offset + l1_entries as usize * 8];
    let mut put = |at: usize, bytes: &[u8]| file[at..at + bytes.len()].copy_from_slice(bytes);
    // The format extension, padded to 8 bytes, then the end extension; the name after them.
    let format_padded = format.len().div_ceil(8) * 8;
    let name_offset = HEADER_V3 as usize + 8 + format_padded + 8;
    put(0, &MAGIC.to_be_bytes());
    put(4, &3u32.to_be_bytes());
    put(8, &(name_offset as u64).to_be_bytes());
    put(16, &(name.len() as u32).to_be_bytes());
    put(20, &CLUSTER_BITS.to_be_bytes());
    put(24, &size.to_be_bytes());
    // crypt_method 0
    put(36, &(l1_entries as u32).to_be_bytes());
    put(40, &(l1_offset as u64).to_be_bytes());
    put(48, &(CLUSTER as u64).to_be_bytes()); // the refcount table
    put(56, &1u32.to_be_bytes()); // of one cluster
                                  // no snapshots; no incompatible, compatible or autoclear features
    put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    put(100, &HEADER_V3.to_be_bytes());
    let ext = HEADER_V3 as usize;
    put(ext, &EXT_BACKING_FORMAT.to_be_bytes());
    put(ext + 4, &(format.len() as u32).to_be_bytes());
    put(ext + 8, format.as_bytes());
    // the end extension is all zeros
    put(name_offset, name);
    // The refcount table's one entry: the refcount block in cluster 2, which counts the
    // four clusters in use (header, refcount table, refcount block, L1 table) once each.
    put(CLUSTER, &(2 * CLUSTER as u64).to_be_bytes());
    for n in 0..4 {
        put(2 * CLUSTER + 2 * n, &1u16.to_be_bytes());
    }
    Ok(file)
}

/// Writes an empty qcow2 overlay at `path` (which must not exist; mode 0644) on `backing`,
/// a file of `format`, with `size` bytes of virtual size. Not synced: see the module.
pub fn write_overlay(
    path: &Path,
    backing: &Path,
    format: &str,
    size: u64,
) -> Result<(), Qcow2Error> {
    let bytes = overlay_bytes(backing, format, size)?;
    let io = |source| Qcow2Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(io)?;
    if let Err(err) = file.write_all(&bytes) {
        let _ = fs::remove_file(path);
        return Err(io(err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
        Command::new("qemu-img").args(args).output().ok()
    }

    #[test]
    fn an_overlay_written_here_is_one_qemu_img_checks_clean_and_reads_through() {
        if qemu_img(&["--version".as_ref()]).is_none() {
            // To the stderr handle: libtest captures eprintln!.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("SKIPPED: qemu-img is not installed\n"),
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("base.raw");
        // A base with data in it, so that reading through the overlay shows the base.
        let mut data = vec![0u8; 3 << 20];
        data[5 << 10..6 << 10].fill(0x5a);
        fs::write(&raw, &data).expect("raw base");
        let qcow = dir.path().join("base.qcow2");
        let out = qemu_img(&[
            "convert".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            raw.as_os_str(),
            qcow.as_os_str(),
        ])
        .expect("qemu-img");
        assert!(out.status.success(), "{out:?}");
        for (base, format) in [(&raw, "raw"), (&qcow, "qcow2")] {
            let layers = chain(base, format).expect("chain of the base");
            assert_eq!(layers.len(), 1);
            assert_eq!(layers[0].size, 3 << 20);
            let overlay = dir.path().join(format!("over-{format}.qcow2"));
            write_overlay(&overlay, base, format, layers[0].size).expect("overlay");
            let check = qemu_img(&["check".as_ref(), overlay.as_os_str()]).expect("check");
            assert!(check.status.success(), "{check:?}");
            let info = qemu_img(&[
                "info".as_ref(),
                "--backing-chain".as_ref(),
                "--output=json".as_ref(),
                overlay.as_os_str(),
            ])
            .expect("info");
            let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
            assert_eq!(info[0]["virtual-size"], 3 << 20);
            assert_eq!(info[0]["backing-filename-format"], format);
            assert_eq!(
                info[0]["full-backing-filename"],
                base.to_str().expect("utf-8")
            );
            // Read through: the overlay's content is the base's.
            let flat = dir.path().join(format!("flat-{format}.raw"));
            let out = qemu_img(&[
                "convert".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                overlay.as_os_str(),
                flat.as_os_str(),
            ])
            .expect("convert");
            assert!(out.status.success(), "{out:?}");
            assert_eq!(
                fs::read(&flat).expect("flat"),
                data,
                "reads through to the base"
            );
            // And the chain read back here is what qemu-img reports.
            let layers = chain(&overlay, "qcow2").expect("chain of the overlay");
            let got: Vec<(PathBuf, &str)> = layers
                .iter()
                .map(|l| (l.path.clone(), l.format.as_str()))
                .collect();
            assert_eq!(
                got,
                vec![(overlay.clone(), "qcow2"), (base.clone(), format)]
            );
            assert!(matches!(
                write_overlay(&overlay, base, format, 1),
                Err(Qcow2Error::Io { .. })
            ));
        }
    }

    #[test]
    fn what_is_not_written_or_read_here_is_unsupported_not_guessed() {
        let long = PathBuf::from(format!("/{}", "a".repeat(MAX_BACKING_NAME)));
        assert!(matches!(
            overlay_bytes(&long, "raw", 1 << 20),
            Err(Qcow2Error::Unsupported(_))
        ));
        assert!(matches!(
            overlay_bytes(Path::new("/b"), "raw", MAX_SIZE + 1),
            Err(Qcow2Error::Unsupported(_))
        ));
        assert!(matches!(
            overlay_bytes(Path::new("/b"), "raw", 0),
            Err(Qcow2Error::Unsupported(_))
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk");
        fs::write(&junk, b"not an image at all, only text").expect("write");
        assert!(matches!(
            chain(&junk, "qcow2"),
            Err(Qcow2Error::Unsupported(_))
        ));
        assert!(matches!(
            chain(&junk, "vmdk"),
            Err(Qcow2Error::Unsupported(_))
        ));
        // A backing that is not a file name is QEMU's to resolve.
        let json = dir.path().join("json.qcow2");
        let bytes =
            overlay_bytes(Path::new("json:{\"driver\":\"nbd\"}"), "raw", 1 << 20).expect("bytes");
        fs::write(&json, &bytes).expect("write");
        assert!(matches!(
            chain(&json, "qcow2"),
            Err(Qcow2Error::Unsupported(_))
        ));
        // A header whose backing name points past its first cluster.
        let mut bytes = overlay_bytes(Path::new("/b"), "raw", 1 << 20).expect("bytes");
        bytes[8..16].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let bad = dir.path().join("bad.qcow2");
        fs::write(&bad, &bytes).expect("write");
        assert!(matches!(
            chain(&bad, "qcow2"),
            Err(Qcow2Error::Unsupported(_))
        ));
    }
}
