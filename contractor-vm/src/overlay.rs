//! The VM's disks: a qcow2 overlay on the image's base disk, made with `qemu-img` (or, for
//! a VM restored from a snapshot, written directly: [`qcow2`]), and
//! optionally a build disk, an empty ext4 file system of a given size made with `mke2fs`
//! (the guest agent puts the writable layer of its root on it, so that it caps what a build
//! can write). The base is only ever opened read-only (it is the overlay's backing file), so
//! one base serves any number of VMs and is never written. An overlay is named
//! `<vm name>.qcow2` and a build disk `<vm name>.disk.raw`, and only files named like that
//! are ever deleted.
//!
//! The caller must ensure, for `qemu:///system` as root, that QEMU (user `libvirt-qemu`) can
//! reach the base: every directory above it searchable (`x`) by others and the file readable.
//! The work directory is created here with mode 0755 when missing; directories above it that
//! already exist must also be searchable by `libvirt-qemu`.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod qcow2;

/// Errors making or removing an overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The work directory could not be created.
    #[error("cannot create the work directory {}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An overlay or build disk with this name exists already.
    #[error(
        "{} exists already: another VM of that name, or a leftover (delete it if no VM uses \
         it)",
        path.display()
    )]
    Exists {
        /// The overlay or build disk.
        path: PathBuf,
    },
    /// A build disk of zero or too many GiB was asked for.
    #[error("disk_gib = {gib} is not a disk size: give 1 or more GiB (and less than 16 EiB)")]
    DiskSize {
        /// The size asked for.
        gib: u64,
    },
    /// The build disk's file, an overlay written directly, or a VM's copy of its kernel or
    /// initrd could not be made.
    #[error("cannot create {}", path.display())]
    BuildDisk {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` or `mke2fs` could not be started.
    #[error("cannot run {program} (install the {package} package)")]
    Spawn {
        /// The program.
        program: String,
        /// The Debian package that has it.
        package: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` or `mke2fs` failed.
    #[error("`{command}` failed: {stderr}")]
    QemuImg {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `qemu-img` or `mke2fs` printed more than [`MAX_OUTPUT_BYTES`] on stdout.
    #[error("`{command}` printed more than {limit} bytes (is the image damaged or hostile?)")]
    Output {
        /// The command line.
        command: String,
        /// The limit.
        limit: u64,
    },
    /// `qemu-img info` printed something unexpected.
    #[error("cannot read `qemu-img info` output for {}", path.display())]
    Info {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A backing chain longer than [`MAX_BACKING_CHAIN`], or a layer without a path.
    #[error("the backing chain of {} {reason}", path.display())]
    Chain {
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An image's header could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The overlay could not be deleted.
    #[error("cannot delete overlay {}", path.display())]
    Delete {
        /// The overlay.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ImageInfo {
    /// The image format (`qcow2`, `raw`, ...).
    pub format: String,
    /// The virtual size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

/// The most of a program's stdout that is read: 4 MiB (`qemu-img info` of a chain of
/// [`MAX_BACKING_CHAIN`] layers is a few KiB, more with many internal snapshots); a program
/// that prints more is an error.
pub const MAX_OUTPUT_BYTES: u64 = 4 << 20;

/// Runs `qemu-img` or `mke2fs` and returns its stdout, at most [`MAX_OUTPUT_BYTES`] of it,
/// through the image tools' bounded runner (its error keeps the last lines of stderr): an
/// image file is the user's input (`contractor image import`), and what a program prints
/// about it must not grow this process without bound.
fn run(command: &mut Command) -> Result<Vec<u8>, OverlayError> {
    use crate::image::ImageError;
    let program = command.get_program().to_string_lossy().into_owned();
    crate::image::tool::bytes(command, MAX_OUTPUT_BYTES).map_err(|err| match err {
        ImageError::TooMuchOutput { command, limit } => OverlayError::Output { command, limit },
        ImageError::Tool { command, detail } => OverlayError::QemuImg {
            command,
            stderr: detail.trim().to_owned(),
        },
        ImageError::Spawn { source, .. } => OverlayError::Spawn {
            package: if program == "mke2fs" {
                "e2fsprogs"
            } else {
                "qemu-utils"
            },
            program,
            source,
        },
        other => OverlayError::QemuImg {
            command: program,
            stderr: other.to_string(),
        },
    })
}

/// Reads an image's format and virtual size (`qemu-img info -U`, so an image in use by
/// running VMs can be read).
pub fn image_info(path: &Path) -> Result<ImageInfo, OverlayError> {
    let stdout = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path))?;
    serde_json::from_slice(&stdout).map_err(|source| OverlayError::Info {
        path: path.to_owned(),
        source,
    })
}

/// The most layers a disk's backing chain may have: 16 (an image of Contractor has one; a
/// snapshot adds one).
pub const MAX_BACKING_CHAIN: usize = 16;

/// One image of `qemu-img info --backing-chain`.
#[derive(serde::Deserialize)]
struct ChainEntry {
    format: String,
    #[serde(rename = "full-backing-filename")]
    backing: Option<PathBuf>,
}

/// The backing chain of a disk: `path` itself first, then each file it stands on, with
/// its format (`qemu-img info -U --backing-chain`). These are the read-only layers under an
/// overlay made on `path`.
pub fn backing_chain(path: &Path) -> Result<Vec<crate::xml::Layer>, OverlayError> {
    let stdout = run(Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(path))?;
    let entries: Vec<ChainEntry> =
        serde_json::from_slice(&stdout).map_err(|source| OverlayError::Info {
            path: path.to_owned(),
            source,
        })?;
    if entries.len() > MAX_BACKING_CHAIN {
        return Err(OverlayError::Chain {
            path: path.to_owned(),
            reason: format!(
                "has {} layers; at most {MAX_BACKING_CHAIN} are accepted",
                entries.len()
            ),
        });
    }
    let mut layers = Vec::with_capacity(entries.len());
    let mut next = Some(path.to_owned());
    for entry in entries {
        let Some(file) = next.take() else {
            return Err(OverlayError::Chain {
                path: path.to_owned(),
                reason: "names a layer whose file qemu-img did not report".to_string(),
            });
        };
        next = entry.backing;
        layers.push(crate::xml::Layer {
            path: file,
            format: entry.format,
        });
    }
    Ok(layers)
}

/// Creates `dir` and its missing parents with mode 0755 (whatever the umask).
pub fn create_work_dir(dir: &Path) -> Result<(), OverlayError> {
    let err = |source| OverlayError::WorkDir {
        path: dir.to_owned(),
        source,
    };
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(d) = cursor {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        cursor = d.parent();
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(err)?;
    for d in missing {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(err)?;
    }
    Ok(())
}

/// The overlay path of VM `name` in `work_dir`.
pub fn overlay_path(work_dir: &Path, name: &str) -> PathBuf {
    work_dir.join(format!("{name}.qcow2"))
}

/// The build disk path of VM `name` in `work_dir`.
pub fn build_disk_path(work_dir: &Path, name: &str) -> PathBuf {
    work_dir.join(format!("{name}.disk.raw"))
}

/// The build disk path of VM `name` in `work_dir` when it is a qcow2 overlay on a
/// snapshot's build disk.
pub fn build_overlay_path(work_dir: &Path, name: &str) -> PathBuf {
    work_dir.join(format!("{name}.disk.qcow2"))
}

/// The names of a VM's own copies of its kernel and initrd in the work directory:
/// `<name>.vmlinuz`, `<name>.initrd`.
pub const BOOT_COPIES: [&str; 2] = ["vmlinuz", "initrd"];

/// The path of VM `name`'s own copy `what` (one of [`BOOT_COPIES`]) in `work_dir`.
pub fn boot_copy_path(work_dir: &Path, name: &str, what: &str) -> PathBuf {
    work_dir.join(format!("{name}.{what}"))
}

/// Copies `from` to VM `name`'s own `<name>.<what>` in `work_dir` (replacing one an earlier
/// VM of that name left), mode 0644. libvirt hands a domain's kernel and initrd to QEMU's
/// user while it runs (and cannot be told not to): the copy is what it hands over, and the
/// image's own files stay out of QEMU's reach. It is deleted with the overlay.
pub fn copy_boot_file(
    from: &Path,
    work_dir: &Path,
    name: &str,
    what: &str,
) -> Result<PathBuf, OverlayError> {
    let path = boot_copy_path(work_dir, name, what);
    let err = |source| OverlayError::BuildDisk {
        path: path.clone(),
        source,
    };
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    fs::copy(from, &path).map_err(err)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(err)?;
    Ok(path)
}

/// Creates the qcow2 overlay `path` (which must not exist) on `backing`, of the backing
/// file's virtual size and format.
pub fn create_overlay_file(backing: &Path, path: &Path) -> Result<(), OverlayError> {
    if path.exists() {
        return Err(OverlayError::Exists {
            path: path.to_owned(),
        });
    }
    let info = image_info(backing)?;
    let mut command = Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", "qcow2", "-F", &info.format, "-b"])
        .arg(backing)
        .arg(path);
    run(&mut command)?;
    // Readable by QEMU's user until libvirt relabels it for the VM.
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o644));
    Ok(())
}

/// Creates the overlay `path` on `backing`, a file of `format` (`qcow2` or `raw`) and
/// `size` bytes: written directly ([`qcow2::write_overlay`]: no process, no flush), or by
/// [`create_overlay_file`] where that does not apply (a name or size it does not write).
pub fn create_overlay_on(
    backing: &Path,
    format: &str,
    size: u64,
    path: &Path,
) -> Result<(), OverlayError> {
    match qcow2::write_overlay(path, backing, format, size) {
        Ok(()) => Ok(()),
        Err(qcow2::Qcow2Error::Unsupported(_)) => create_overlay_file(backing, path),
        Err(qcow2::Qcow2Error::Io { path, source }) => Err(match source.kind() {
            std::io::ErrorKind::AlreadyExists => OverlayError::Exists { path },
            _ => OverlayError::BuildDisk { path, source },
        }),
    }
}

/// The backing chain of `path`, a file of `format`, with each layer's virtual size: read
/// from the headers ([`qcow2::chain`]), or with `qemu-img` ([`backing_chain`], sizes from
/// [`image_info`]) where that does not apply or fails.
pub fn sized_chain(path: &Path, format: &str) -> Result<Vec<qcow2::Layer>, OverlayError> {
    match qcow2::chain(path, format) {
        Ok(layers) => Ok(layers),
        // Whatever the headers do not answer (or a layer that cannot be read), qemu-img
        // answers, or says what is wrong.
        Err(_) => backing_chain(path)?
            .into_iter()
            .map(|layer| {
                let size = image_info(&layer.path)?.virtual_size;
                Ok(qcow2::Layer {
                    path: layer.path,
                    format: layer.format,
                    size,
                })
            })
            .collect(),
    }
}

/// Creates the build disk of VM `name` in `work_dir`: a sparse raw file of `gib` GiB holding
/// an empty ext4 file system (no journal: nothing on it outlives the VM; inode tables left
/// for the guest to treat as uninitialised, so the file starts at a few MiB).
pub fn create_build_disk(work_dir: &Path, name: &str, gib: u64) -> Result<PathBuf, OverlayError> {
    create_work_dir(work_dir)?;
    let path = build_disk_path(work_dir, name);
    let bytes = gib
        .checked_mul(1 << 30)
        .filter(|&b| b > 0)
        .ok_or(OverlayError::DiskSize { gib })?;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => OverlayError::Exists { path: path.clone() },
            _ => OverlayError::BuildDisk {
                path: path.clone(),
                source,
            },
        })?;
    let made = file
        .set_len(bytes)
        .map_err(|source| OverlayError::BuildDisk {
            path: path.clone(),
            source,
        })
        .and_then(|()| {
            run(Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-m", "0", "-O", "^has_journal"])
                .args(["-E", "lazy_itable_init=1,root_owner=0:0", "-L", "build"])
                .arg(&path))
        });
    if let Err(err) = made {
        let _ = fs::remove_file(&path);
        return Err(err);
    }
    // Readable by QEMU's user until libvirt relabels it for the VM.
    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o644));
    Ok(path)
}

/// Creates the overlay of VM `name` on `base` in `work_dir` (created if missing), of the
/// base's virtual size. `base` must be absolute; the overlay records it as its backing file
/// with its format.
pub fn create_overlay(base: &Path, work_dir: &Path, name: &str) -> Result<PathBuf, OverlayError> {
    create_work_dir(work_dir)?;
    let overlay = overlay_path(work_dir, name);
    create_overlay_file(base, &overlay)?;
    Ok(overlay)
}

/// Deletes the overlay at `path` if it is VM `name`'s (file named `<name>.qcow2`), and the
/// VM's build disk next to it (`<name>.disk.raw` or `<name>.disk.qcow2`). Returns whether the overlay was deleted; missing files are
/// not an error.
pub fn delete_overlay(path: &Path, name: &str) -> Result<bool, OverlayError> {
    if path.file_name() != Some(format!("{name}.qcow2").as_ref()) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        let copies = BOOT_COPIES.map(|what| boot_copy_path(dir, name, what));
        for disk in [build_disk_path(dir, name), build_overlay_path(dir, name)]
            .into_iter()
            .chain(copies)
        {
            match fs::remove_file(&disk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(OverlayError::Delete { path: disk, source }),
            }
        }
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(OverlayError::Delete {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_prints_too_much_is_stopped_and_named() {
        let mut flood = Command::new("sh");
        flood.args(["-c", "head -c 5000000 /dev/zero"]);
        match run(&mut flood) {
            Err(OverlayError::Output { command, limit }) => {
                assert_eq!(limit, MAX_OUTPUT_BYTES);
                assert!(command.starts_with("sh -c head -c 5000000"), "{command}");
            }
            other => panic!(
                "expected an output error, got {:?}",
                other.map(|out| out.len())
            ),
        }
    }

    #[test]
    fn a_failing_program_s_stderr_is_kept_only_up_to_its_bound() {
        let mut noisy = Command::new("sh");
        noisy.args([
            "-c",
            "echo start >&2; head -c 1000000 /dev/zero | tr '\\0' x >&2; exit 1",
        ]);
        match run(&mut noisy) {
            Err(OverlayError::QemuImg { stderr, .. }) => {
                assert!(stderr.contains("xxx"), "{}", &stderr[..20]);
                assert!(stderr.len() < 100_000, "{}", stderr.len());
            }
            other => panic!("expected a failure, got {:?}", other.map(|out| out.len())),
        }
    }

    #[test]
    fn deletes_only_files_named_after_the_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("base.qcow2");
        fs::write(&other, b"x").expect("write");
        assert!(!delete_overlay(&other, "contractor-a").expect("delete"));
        assert!(other.exists());
        let mine = overlay_path(dir.path(), "contractor-a");
        fs::write(&mine, b"x").expect("write");
        let kernel = dir.path().join("vmlinuz");
        fs::write(&kernel, b"k").expect("write");
        let copy = copy_boot_file(&kernel, dir.path(), "contractor-a", "vmlinuz").expect("copy");
        assert_eq!(copy, dir.path().join("contractor-a.vmlinuz"));
        assert_eq!(
            fs::metadata(&copy).expect("stat").permissions().mode() & 0o777,
            0o644
        );
        assert!(delete_overlay(&mine, "contractor-a").expect("delete"));
        assert!(
            !mine.exists() && !copy.exists(),
            "the copies go with the overlay"
        );
        assert!(kernel.exists(), "the image's file stays");
        assert!(!delete_overlay(&mine, "contractor-a").expect("missing is fine"));
    }

    #[test]
    fn work_dirs_are_world_searchable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("a/b");
        create_work_dir(&deep).expect("create");
        for d in [dir.path().join("a"), deep] {
            let mode = fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o755, "{}", d.display());
        }
    }

    #[test]
    fn overlays_keep_the_base_size_and_never_write_the_base() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            // To the stderr handle: libtest captures eprintln!.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("SKIPPED: qemu-img is not installed\n"),
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("2G"))
        .expect("base");
        let before = fs::read(&base).expect("read base");
        let overlay =
            create_overlay(&base, &dir.path().join("w"), "contractor-s").expect("overlay");
        assert_eq!(image_info(&overlay).expect("info").virtual_size, 2 << 30);
        assert!(matches!(
            create_overlay(&base, &dir.path().join("w"), "contractor-s"),
            Err(OverlayError::Exists { .. })
        ));
        assert_eq!(
            fs::read(&base).expect("read base"),
            before,
            "base unchanged"
        );
    }

    #[test]
    fn a_build_disk_is_a_sparse_empty_ext4_of_the_size_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = create_build_disk(dir.path(), "contractor-d", 3).expect("build disk");
        let meta = fs::metadata(&disk).expect("stat");
        assert_eq!(meta.len(), 3 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );
        // dumpe2fs reads the superblock mke2fs wrote: ext4, 3 GiB of blocks, no journal.
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&disk)
            .output()
            .expect("dumpe2fs");
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                .unwrap_or_default()
        };
        let blocks: u64 = field("Block count:").parse().expect("block count");
        let size: u64 = field("Block size:").parse().expect("block size");
        assert_eq!(blocks * size, 3 << 30);
        assert!(field("Filesystem features:").contains("extent"), "{text}");
        assert!(
            !field("Filesystem features:").contains("has_journal"),
            "{text}"
        );
        assert!(matches!(
            create_build_disk(dir.path(), "contractor-d", 1),
            Err(OverlayError::Exists { .. })
        ));
        assert!(matches!(
            create_build_disk(dir.path(), "contractor-z", 0),
            Err(OverlayError::DiskSize { gib: 0 })
        ));
        assert!(!build_disk_path(dir.path(), "contractor-z").exists());

        // Deleting the overlay deletes the build disk with it.
        let overlay = overlay_path(dir.path(), "contractor-d");
        fs::write(&overlay, b"x").expect("write");
        assert!(delete_overlay(&overlay, "contractor-d").expect("delete"));
        assert!(!disk.exists() && !overlay.exists());
    }
}
