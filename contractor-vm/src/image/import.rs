//! `contractor image import`: a user's own image (AnyBuildOS) — a disk, a kernel and an
//! initrd — made into a builder image.
//!
//! What such an image needs, checked here where it can be:
//! - the disk (qcow2 or raw) is one ext2/3/4 file system on the whole disk (no partition
//!   table) with `/bin/sh`: checked, and the agent is written into it (as
//!   `/usr/local/sbin/contractor-agent`, with `/build`) with debugfs, on a copy;
//! - the kernel is an x86 bzImage: checked;
//! - the kernel, with the initrd, mounts `root=/dev/vda` and starts `init=`: it needs
//!   virtio-pci and virtio-blk (built in or loaded by the initrd), virtio-console and
//!   overlayfs (built in, or as uncompressed modules under `/lib/modules/<release>/`);
//!   not checked here: a build whose VM does not start fails with the console's tail.
//!
//! The result is an image like the built ones (`disk.qcow2`, `vmlinuz`, `initrd.img`,
//! `manifest.json` with suite `imported`) that boots with the given initrd. When the agent
//! changes, [`refresh`] writes the new one into it.

use std::path::Path;
use std::process::Command;

use crate::image::{
    agent_path, file_err, make_world_readable, path_str, sha256_file, tool_output, DirLock, Image,
    ImageError, Manifest, AGENT_IN_IMAGE, DISTRIBUTION_INITRD,
};
use crate::paths;

/// The `suite` of an imported image's manifest.
pub const IMPORTED: &str = "imported";

/// Imports `disk`, `kernel` and `initrd` as the image `name` (replacing an imported image
/// of that name).
pub fn import(name: &str, disk: &Path, kernel: &Path, initrd: &Path) -> Result<Image, ImageError> {
    check_name(name)?;
    for (what, path) in [("disk", disk), ("kernel", kernel), ("initrd", initrd)] {
        if !path.is_file() {
            return Err(ImageError::Other(format!(
                "the {what} {} is not a file",
                path.display()
            )));
        }
    }
    check_kernel(kernel)?;
    let images = paths::data_dir().map_err(ImageError::Other)?.join("images");
    paths::create_dir_world_readable(&images).map_err(file_err("cannot create", &images))?;
    let agent = agent_path()?;
    let _lock = DirLock::acquire(&images.join(".lock"))?;
    let dir = images.join(name);
    if let Some(existing) = crate::image::load(&dir)? {
        if existing.manifest.suite != IMPORTED {
            return Err(ImageError::Other(format!(
                "{name} is a built image; import under another name"
            )));
        }
    }
    let scratch = images.join(format!(".import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    paths::create_dir_world_readable(&scratch).map_err(file_err("cannot create", &scratch))?;
    let result = (|| {
        for (from, to) in [(kernel, "vmlinuz"), (initrd, DISTRIBUTION_INITRD)] {
            let target = scratch.join(to);
            std::fs::copy(from, &target).map_err(file_err("cannot copy", from))?;
        }
        let manifest = write_disk(name, disk, &agent, &scratch)?;
        make_world_readable(&scratch)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(file_err("cannot replace", &dir))?;
        }
        std::fs::rename(&scratch, &dir).map_err(file_err("cannot move the image to", &dir))?;
        Ok(Image {
            dir: dir.clone(),
            manifest,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

/// Writes the current agent into the imported image in `dir` (its manifest says another).
/// The caller holds the images lock.
pub fn refresh(image: &Image, agent: &Path) -> Result<Image, ImageError> {
    let scratch = image.dir.with_file_name(format!(
        ".refresh-{}-{}",
        image.manifest.name,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    paths::create_dir_world_readable(&scratch).map_err(file_err("cannot create", &scratch))?;
    let result = (|| {
        let manifest = write_disk(
            &image.manifest.name,
            &image.dir.join("disk.qcow2"),
            agent,
            &scratch,
        )?;
        make_world_readable(&scratch)?;
        for file in ["disk.qcow2", "manifest.json"] {
            let (from, to) = (scratch.join(file), image.dir.join(file));
            std::fs::rename(&from, &to).map_err(file_err("cannot replace", &to))?;
        }
        Ok(Image {
            dir: image.dir.clone(),
            manifest,
        })
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Copies `disk` to `scratch/disk.qcow2` with the agent written in, and writes the manifest
/// there.
fn write_disk(
    name: &str,
    disk: &Path,
    agent: &Path,
    scratch: &Path,
) -> Result<Manifest, ImageError> {
    let raw = scratch.join("root.raw");
    tool_output(Command::new("qemu-img").args([
        "convert",
        "-O",
        "raw",
        path_str(disk)?,
        path_str(&raw)?,
    ]))?;
    let stat = |path: &str| {
        tool_output(Command::new("debugfs").args(["-R", &format!("stat {path}"), path_str(&raw)?]))
    };
    let shell = stat("/bin/sh").map_err(|e| {
        ImageError::Other(format!(
            "{} is not one ext2/3/4 file system on the whole disk (no partition table): {e}",
            disk.display()
        ))
    })?;
    if !shell.contains("Inode:") {
        return Err(ImageError::Other(format!(
            "{} has no /bin/sh; the build script runs with it",
            disk.display()
        )));
    }
    let commands = scratch.join("debugfs.commands");
    let agent_str = path_str(agent)?;
    let script = format!(
        "mkdir /usr\nmkdir /usr/local\nmkdir /usr/local/sbin\nrm {AGENT_IN_IMAGE}\n\
         write {agent_str} {AGENT_IN_IMAGE}\nsif {AGENT_IN_IMAGE} mode 0100755\n\
         sif {AGENT_IN_IMAGE} uid 0\nsif {AGENT_IN_IMAGE} gid 0\nmkdir /build\n"
    );
    std::fs::write(&commands, script).map_err(file_err("cannot write", &commands))?;
    tool_output(Command::new("debugfs").args(["-w", "-f", path_str(&commands)?, path_str(&raw)?]))?;
    let agent_size = std::fs::metadata(agent)
        .map_err(file_err("cannot read", agent))?
        .len();
    let written = stat(AGENT_IN_IMAGE)?;
    if !written.contains(&format!("Size: {agent_size}")) {
        return Err(ImageError::Other(format!(
            "could not write the agent into {} (is the file system full or read-only?): {}",
            disk.display(),
            written.lines().next().unwrap_or("")
        )));
    }
    let qcow2 = scratch.join("disk.qcow2");
    tool_output(Command::new("qemu-img").args([
        "convert",
        "-O",
        "qcow2",
        path_str(&raw)?,
        path_str(&qcow2)?,
    ]))?;
    std::fs::remove_file(&raw).map_err(file_err("cannot remove", &raw))?;
    let _ = std::fs::remove_file(&commands);
    let manifest = Manifest::new(name, IMPORTED, &qcow2, &sha256_file(agent)?)?;
    let path = scratch.join("manifest.json");
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| ImageError::Other(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(file_err("cannot write", &path))?;
    Ok(manifest)
}

/// Image names: lower-case letters, digits, `.`, `_` and `-`, starting with a letter or
/// digit; not the name of an image Contractor builds.
fn check_name(name: &str) -> Result<(), ImageError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !valid {
        return Err(ImageError::Other(format!(
            "{name:?} is not an image name: use lower-case letters, digits, '.', '_' and '-' \
             (e.g. \"my-distro\")"
        )));
    }
    if crate::spec::KNOWN_IMAGES.contains(&name) {
        return Err(ImageError::Other(format!(
            "{name} is the name of an image Contractor builds; import under another name"
        )));
    }
    Ok(())
}

/// An x86 Linux kernel (bzImage) has "HdrS" at offset 0x202.
fn check_kernel(kernel: &Path) -> Result<(), ImageError> {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    let ok = std::fs::File::open(kernel)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[0x202..0x206] == b"HdrS";
    if ok {
        Ok(())
    } else {
        Err(ImageError::Other(format!(
            "{} is not an x86 Linux kernel image (bzImage)",
            kernel.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_copied() {
        for bad in ["", "My-Image", "-x", "a/b", ".hidden", "debian-12-build"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["my-distro", "alpine3.20", "x_1"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn a_kernel_is_recognised_by_its_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        let mut bytes = vec![0u8; 0x300];
        std::fs::write(&kernel, &bytes).expect("write");
        assert!(check_kernel(&kernel).is_err());
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&kernel, &bytes).expect("write");
        assert!(check_kernel(&kernel).is_ok());
        assert!(check_kernel(&dir.path().join("missing")).is_err());
    }
}
