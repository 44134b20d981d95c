//! `contractor-vm image import`: a user's own image (AnyBuildOS) — a disk, a kernel and an
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

use contractor_protocol::image::{
    Manifest, AGENT_IN_IMAGE, DISK_FILE, DISTRIBUTION_INITRD, IMPORTED, KERNEL_FILE, MANIFEST_FILE,
};

use super::{
    agent_path, create_dir_world_readable, file_err, images_dir, make_world_readable, new_manifest,
    path_str, sha256_file, tool, write_manifest, DirLock, Image, ImageError, BUILT_IMAGES,
};

/// Imports `disk`, `kernel` and `initrd` as the image `name` (replacing an imported image
/// of that name).
pub fn import(name: &str, disk: &Path, kernel: &Path, initrd: &Path) -> Result<Image, ImageError> {
    check_name(name)?;
    for (what, path) in [("disk", disk), ("kernel", kernel), ("initrd", initrd)] {
        if !path.is_file() {
            return Err(ImageError::NotAFile {
                what,
                path: path.to_path_buf(),
            });
        }
    }
    check_kernel(kernel)?;
    let images = images_dir()?;
    create_dir_world_readable(&images)?;
    let agent = agent_path()?;
    let _lock = DirLock::acquire(&images.join(".lock"))?;
    let dir = images.join(name);
    if let Some(existing) = super::load(&dir)? {
        if existing.manifest.suite != IMPORTED {
            return Err(ImageError::ReplacesBuilt(name.to_string()));
        }
    }
    let scratch = images.join(format!(".import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    create_dir_world_readable(&scratch)?;
    let result = (|| {
        for (from, to) in [(kernel, KERNEL_FILE), (initrd, DISTRIBUTION_INITRD)] {
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
    create_dir_world_readable(&scratch)?;
    let result = (|| {
        let manifest = write_disk(
            &image.manifest.name,
            &image.dir.join(DISK_FILE),
            agent,
            &scratch,
        )?;
        make_world_readable(&scratch)?;
        for file in [DISK_FILE, MANIFEST_FILE] {
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
    tool::output(Command::new("qemu-img").args([
        "convert",
        "-O",
        "raw",
        path_str(disk)?,
        path_str(&raw)?,
    ]))?;
    let stat = |path: &str| {
        tool::output(Command::new("debugfs").args(["-R", &format!("stat {path}"), path_str(&raw)?]))
    };
    let shell = stat("/bin/sh").map_err(|e| ImageError::NotExtFs {
        disk: disk.to_path_buf(),
        source: Box::new(e),
    })?;
    if !shell.contains("Inode:") {
        return Err(ImageError::NoShell(disk.to_path_buf()));
    }
    let commands = scratch.join("debugfs.commands");
    let agent_str = path_str(agent)?;
    let script = format!(
        "mkdir /usr\nmkdir /usr/local\nmkdir /usr/local/sbin\nrm {AGENT_IN_IMAGE}\n\
         write {agent_str} {AGENT_IN_IMAGE}\nsif {AGENT_IN_IMAGE} mode 0100755\n\
         sif {AGENT_IN_IMAGE} uid 0\nsif {AGENT_IN_IMAGE} gid 0\nmkdir /build\n"
    );
    std::fs::write(&commands, script).map_err(file_err("cannot write", &commands))?;
    tool::output(Command::new("debugfs").args([
        "-w",
        "-f",
        path_str(&commands)?,
        path_str(&raw)?,
    ]))?;
    let agent_size = std::fs::metadata(agent)
        .map_err(file_err("cannot read", agent))?
        .len();
    let written = stat(AGENT_IN_IMAGE)?;
    if !written.contains(&format!("Size: {agent_size}")) {
        return Err(ImageError::AgentNotWritten {
            disk: disk.to_path_buf(),
            detail: written.lines().next().unwrap_or("").to_string(),
        });
    }
    let qcow2 = scratch.join(DISK_FILE);
    tool::output(Command::new("qemu-img").args([
        "convert",
        "-O",
        "qcow2",
        path_str(&raw)?,
        path_str(&qcow2)?,
    ]))?;
    std::fs::remove_file(&raw).map_err(file_err("cannot remove", &raw))?;
    let _ = std::fs::remove_file(&commands);
    let manifest = new_manifest(name, IMPORTED, &qcow2, &sha256_file(agent)?)?;
    write_manifest(scratch, &manifest)?;
    Ok(manifest)
}

/// An imported image's name: an image name ([`super::check_name`]), not the name of an
/// image Contractor builds.
fn check_name(name: &str) -> Result<(), ImageError> {
    super::check_name(name)?;
    if BUILT_IMAGES.contains(&name) {
        return Err(ImageError::BuiltName(name.to_string()));
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
        Err(ImageError::NotAKernel(kernel.to_path_buf()))
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
