//! The VM's disk: a qcow2 overlay on the image's base disk, made with `qemu-img`. The base
//! is only ever opened read-only (it is the overlay's backing file), so one base serves any
//! number of VMs and is never written. An overlay is named `<vm name>.qcow2`, and only files
//! named like that are ever deleted.
//!
//! The caller must ensure, for `qemu:///system` as root, that QEMU (user `libvirt-qemu`) can
//! reach the base: every directory above it searchable (`x`) by others and the file readable.
//! The work directory is created here with mode 0755 when missing; directories above it that
//! already exist must also be searchable by `libvirt-qemu`.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// An overlay with this name exists already.
    #[error(
        "overlay {} exists already: another VM of that name, or a leftover (delete it if no \
         VM uses it)",
        path.display()
    )]
    Exists {
        /// The overlay.
        path: PathBuf,
    },
    /// `qemu-img` could not be started.
    #[error("cannot run qemu-img (install the qemu-utils package)")]
    Spawn(#[source] std::io::Error),
    /// `qemu-img` failed.
    #[error("`{command}` failed: {stderr}")]
    QemuImg {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
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

fn run(command: &mut Command) -> Result<Vec<u8>, OverlayError> {
    let output = command.output().map_err(OverlayError::Spawn)?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        let line = std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        Err(OverlayError::QemuImg {
            command: line,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
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

/// Creates the overlay of VM `name` on `base` in `work_dir` (created if missing). Its
/// virtual size is `disk_gib` when that is larger than the base, else the base's size.
/// `base` must be absolute; the overlay records it as its backing file with its format.
pub fn create_overlay(
    base: &Path,
    work_dir: &Path,
    name: &str,
    disk_gib: Option<u64>,
) -> Result<PathBuf, OverlayError> {
    create_work_dir(work_dir)?;
    let overlay = overlay_path(work_dir, name);
    if overlay.exists() {
        return Err(OverlayError::Exists { path: overlay });
    }
    let info = image_info(base)?;
    let mut command = Command::new("qemu-img");
    command
        .args(["create", "-q", "-f", "qcow2", "-F", &info.format, "-b"])
        .arg(base)
        .arg(&overlay);
    if let Some(bytes) = disk_gib.and_then(|g| g.checked_mul(1 << 30)) {
        if bytes > info.virtual_size {
            command.arg(bytes.to_string());
        }
    }
    run(&mut command)?;
    // Readable by QEMU's user until libvirt relabels it for the VM.
    let _ = fs::set_permissions(&overlay, fs::Permissions::from_mode(0o644));
    Ok(overlay)
}

/// Deletes the overlay at `path` if it is VM `name`'s (file named `<name>.qcow2`). Returns
/// whether a file was deleted; a missing file is not an error.
pub fn delete_overlay(path: &Path, name: &str) -> Result<bool, OverlayError> {
    if path.file_name() != Some(format!("{name}.qcow2").as_ref()) {
        return Ok(false);
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
    fn deletes_only_files_named_after_the_vm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("base.qcow2");
        fs::write(&other, b"x").expect("write");
        assert!(!delete_overlay(&other, "contractor-a").expect("delete"));
        assert!(other.exists());
        let mine = overlay_path(dir.path(), "contractor-a");
        fs::write(&mine, b"x").expect("write");
        assert!(delete_overlay(&mine, "contractor-a").expect("delete"));
        assert!(!mine.exists());
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
    fn overlay_grows_only_beyond_the_base() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("SKIPPED: qemu-img is not installed");
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
        let small =
            create_overlay(&base, &dir.path().join("w"), "contractor-s", Some(1)).expect("overlay");
        assert_eq!(image_info(&small).expect("info").virtual_size, 2 << 30);
        let big =
            create_overlay(&base, &dir.path().join("w"), "contractor-b", Some(5)).expect("overlay");
        assert_eq!(image_info(&big).expect("info").virtual_size, 5 << 30);
        assert!(matches!(
            create_overlay(&base, &dir.path().join("w"), "contractor-b", None),
            Err(OverlayError::Exists { .. })
        ));
        assert_eq!(
            fs::read(&base).expect("read base"),
            before,
            "base unchanged"
        );
    }
}
