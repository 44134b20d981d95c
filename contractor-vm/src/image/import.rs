//! `contractor-vm image import`: a user's own image (AnyBuildOS) made into a builder image:
//! a disk as people have them (a cloud image: a partition table, the root file system on
//! one partition, the kernel and initrd in its `/boot`), or a file system on the whole disk
//! with a kernel and initrd given beside it.
//!
//! What the import does, and checks where it can:
//! - the disk (qcow2 or raw, without a backing or external data file: such a disk would
//!   copy another host file into the image) is read as raw; its GPT or MBR partition table
//!   ([`super::partition`]), when it has one, is searched for the root: the first ext2/3/4
//!   partition with `/bin/sh`. A disk without a table must be one ext2/3/4 file system;
//! - unless `--kernel` and `--initrd` are given, the kernel is the newest (by version)
//!   regular file `vmlinuz-*` in the root's `/boot`, or at the top of another ext2/3/4
//!   partition (a separate `/boot`); its initrd is the file of the same version named as
//!   Debian, Fedora or Arch name it ([`INITRD_NAMES`]). Each pick is printed on stderr and
//!   kept in the manifest (`source`);
//! - the kernel is an x86 bzImage: checked;
//! - the root file system is copied out on its own (it boots as `root=/dev/vda`), and the
//!   agent is written into it (as `/usr/local/sbin/contractor-agent`, with `/build`) with
//!   debugfs;
//! - the kernel, with the initrd, mounts `root=/dev/vda` and starts `init=`: it needs
//!   virtio-pci and virtio-blk (built in or loaded by the initrd), virtio-console and
//!   overlayfs (built in, or as uncompressed modules under `/lib/modules/<release>/`);
//!   not checked here: a build whose VM does not start fails with the console's tail.
//!
//! The result is an image like the built ones (`disk.qcow2`, `vmlinuz`, `initrd.img`,
//! `manifest.json` with suite `imported`) that boots with the image's own initrd. When the
//! agent changes, [`refresh`] writes the new one into it.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use contractor_protocol::image::{
    Manifest, AGENT_IN_IMAGE, DISK_FILE, DISTRIBUTION_INITRD, IMPORTED, KERNEL_FILE, MANIFEST_FILE,
};

use super::partition::{self, FileSystem, Layout};
use super::{
    agent_path, create_dir_world_readable, file_err, images_dir, make_world_readable, new_manifest,
    path_str, sha256_file, tool, version_order, write_manifest, DirLock, Image, ImageError,
    BUILT_IMAGES,
};

/// The names an initrd of kernel version `{v}` has, tried in this order: Debian and
/// Ubuntu, Fedora and RHEL (and Arch, whose "version" is `linux`), SUSE, others.
pub const INITRD_NAMES: &[&str] = &[
    "initrd.img-{v}",
    "initramfs-{v}.img",
    "initrd-{v}",
    "initrd-{v}.img",
    "initramfs-{v}",
];

/// Imports `disk` as the image `name` (replacing an imported image of that name), with
/// `boot` (kernel, initrd) when given, else the kernel and initrd found in the disk.
pub fn import(name: &str, disk: &Path, boot: Option<(&Path, &Path)>) -> Result<Image, ImageError> {
    check_name(name)?;
    let mut inputs = vec![("disk", disk)];
    if let Some((kernel, initrd)) = boot {
        inputs.extend([("kernel", kernel), ("initrd", initrd)]);
    }
    for (what, path) in inputs {
        if !path.is_file() {
            return Err(ImageError::NotAFile {
                what,
                path: path.to_path_buf(),
            });
        }
    }
    if let Some((kernel, _)) = boot {
        check_kernel(kernel)?;
    }
    let images = images_dir()?;
    create_dir_world_readable(&images)?;
    let agent = agent_path()?;
    let _lock = DirLock::image(&images, name, &format!("importing image {name}"))?;
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
        let whole = scratch.join("whole.raw");
        let format = disk_format(disk)?;
        qemu_img_convert("raw", &["-f", format, path_str(disk)?], &whole)?;
        let root = find_root(disk, &whole)?;
        let (kernel_out, initrd_out) =
            (scratch.join(KERNEL_FILE), scratch.join(DISTRIBUTION_INITRD));
        let mut source = vec![format!("root: {}", root.shown)];
        match boot {
            Some((kernel, initrd)) => {
                for (from, to) in [(kernel, &kernel_out), (initrd, &initrd_out)] {
                    std::fs::copy(from, to).map_err(file_err("cannot copy", from))?;
                }
            }
            None => {
                let found = find_boot(disk, &root)?;
                for (from, to) in [(&found.kernel, &kernel_out), (&found.initrd, &initrd_out)] {
                    debugfs_dump(&from.0, &from.1, to)?;
                }
                check_kernel(&kernel_out)?;
                source.push(format!("kernel: {}", found.kernel.2));
                source.push(format!("initrd: {}", found.initrd.2));
            }
        }
        for line in &source {
            let _ = writeln!(std::io::stderr(), "contractor-vm: import {name}: {line}");
        }
        let raw = scratch.join("root.raw");
        match root.offset {
            None => std::fs::rename(&whole, &raw).map_err(file_err("cannot move", &whole))?,
            Some((offset, size)) => {
                let part = format!(
                    "driver=raw,offset={offset},size={size},file.driver=file,file.filename={}",
                    path_str(&whole)?
                );
                let mut command = Command::new("qemu-img");
                command.args([
                    "convert",
                    "--image-opts",
                    &part,
                    "-O",
                    "raw",
                    path_str(&raw)?,
                ]);
                tool::output(&mut command)?;
                std::fs::remove_file(&whole).map_err(file_err("cannot remove", &whole))?;
            }
        }
        let mut manifest = write_disk(name, disk, &raw, &agent, &scratch)?;
        manifest.source = Some(source.join("; "));
        write_manifest(&scratch, &manifest)?;
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

/// The format of the disk given, `qcow2` or `raw`, read by `qemu-img info`; a disk that
/// would make qemu-img read another file (a backing file, an external data file, or another
/// format, such as a VMDK's extents) is refused: the copy would carry that host file into
/// the image, where the build could read it.
fn disk_format(disk: &Path) -> Result<&'static str, ImageError> {
    let info = tool::output(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "--",
        path_str(disk)?,
    ]))?;
    let info: serde_json::Value = serde_json::from_str(&info).map_err(|e| ImageError::Tool {
        command: format!("qemu-img info --output=json {}", disk.display()),
        detail: format!("printed no JSON: {e}"),
    })?;
    let refuse = |why: String| ImageError::UnsafeDisk {
        disk: disk.to_path_buf(),
        why,
    };
    if let Some(backing) = info.get("backing-filename") {
        return Err(refuse(format!("it has a backing file ({backing})")));
    }
    if let Some(data_file) = info.pointer("/format-specific/data/data-file") {
        return Err(refuse(format!(
            "it has an external data file ({data_file})"
        )));
    }
    match info.get("format").and_then(|f| f.as_str()) {
        Some("qcow2") => Ok("qcow2"),
        Some("raw") => Ok("raw"),
        other => Err(refuse(format!(
            "its format is {}; qcow2 and raw are imported (convert it with `qemu-img convert -O qcow2`)",
            other.unwrap_or("unknown")
        ))),
    }
}

/// Where the root file system lies on the raw disk.
struct Root {
    /// The device debugfs reads it as (`whole.raw?offset=N` for a partition).
    device: String,
    /// (offset, size) in bytes of its partition; `None` for the whole disk.
    offset: Option<(u64, u64)>,
    /// How messages name it.
    shown: String,
    /// The other ext2/3/4 partitions (device, name), where a separate `/boot` may be.
    others: Vec<(String, String)>,
}

/// A partition as messages name it: `partition 1 (Linux filesystem, 2.0 GiB)`.
fn shown_partition(p: &partition::Partition) -> String {
    let size = if p.size >= 1 << 30 {
        format!("{:.1} GiB", p.size as f64 / f64::from(1u32 << 30))
    } else {
        format!("{} MiB", p.size >> 20)
    };
    format!("partition {} ({}, {size})", p.number, p.kind)
}

/// True when the file system on `device` has `/bin/sh` (a file or a link).
fn has_shell(device: &str) -> bool {
    tool::output(Command::new("debugfs").args(["-R", "stat /bin/sh", device]))
        .is_ok_and(|out| out.contains("Inode:"))
}

fn find_root(disk: &Path, whole: &Path) -> Result<Root, ImageError> {
    let whole_str = path_str(whole)?;
    let partitions = match partition::read(whole)? {
        Layout::WholeDisk => {
            return Ok(Root {
                device: whole_str.to_string(),
                offset: None,
                shown: "the whole disk (ext2/3/4, no partition table)".into(),
                others: Vec::new(),
            })
        }
        Layout::Table { scheme, partitions } => (scheme, partitions),
    };
    let (scheme, partitions) = partitions;
    let mut file = std::fs::File::open(whole).map_err(file_err("cannot read", whole))?;
    let mut found = Vec::new();
    let mut root = None;
    let mut others = Vec::new();
    for p in &partitions {
        let fs = partition::file_system_at(&mut file, p.start)
            .map_err(file_err("cannot read", whole))?;
        let shown = shown_partition(p);
        let device = format!("{whole_str}?offset={}", p.start);
        if fs != FileSystem::Ext {
            found.push(format!("{shown}: {}", fs.name()));
        } else if root.is_none() && has_shell(&device) {
            found.push(format!("{shown}: ext2/3/4 with /bin/sh"));
            root = Some((device, (p.start, p.size), format!("{scheme} {shown}")));
        } else {
            found.push(format!("{shown}: ext2/3/4"));
            others.push((device, shown));
        }
    }
    match root {
        Some((device, offset, shown)) => Ok(Root {
            device,
            offset: Some(offset),
            shown,
            others,
        }),
        None => Err(ImageError::NoRoot {
            disk: disk.to_path_buf(),
            found: if found.is_empty() {
                format!("its {scheme} partition table has no partitions")
            } else {
                found.join("; ")
            },
        }),
    }
}

/// A file to take out of the disk: (device, path in that file system, how it is shown).
type Found = (String, String, String);

struct Boot {
    kernel: Found,
    initrd: Found,
}

/// The regular files of `dir` on `device` (none when it has no such directory).
fn regular_files(device: &str, dir: &str) -> Vec<String> {
    let Ok(listing) =
        tool::output(Command::new("debugfs").args(["-R", &format!("ls -p {dir}"), device]))
    else {
        return Vec::new();
    };
    // `ls -p` lines: /inode/mode/uid/gid/name/size/ ; regular files have mode 100xxx.
    listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('/').collect();
            // Names are shown to the user: only printable ASCII ones are candidates.
            let name = fields.get(5)?;
            (fields.len() >= 7
                && fields[2].starts_with("100")
                && name.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| name.to_string())
        })
        .collect()
}

/// The newest kernel and its initrd: in the root's `/boot`, else at the top of another
/// ext2/3/4 partition.
fn find_boot(disk: &Path, root: &Root) -> Result<Boot, ImageError> {
    let mut places = vec![(
        root.device.clone(),
        "/boot".to_string(),
        format!("/boot of the root ({})", root.shown),
    )];
    for (device, shown) in &root.others {
        places.push((
            device.clone(),
            "/".to_string(),
            format!("the top of {shown}"),
        ));
    }
    for (device, dir, shown) in &places {
        let files = regular_files(device, dir);
        let Some(kernel) = files
            .iter()
            .filter(|f| f.starts_with("vmlinuz-"))
            .max_by(|a, b| version_order(a, b))
        else {
            continue;
        };
        let version = kernel.trim_start_matches("vmlinuz-");
        let in_dir = |file: &str| {
            if dir == "/" {
                format!("/{file}")
            } else {
                format!("{dir}/{file}")
            }
        };
        let names: Vec<String> = INITRD_NAMES
            .iter()
            .map(|n| n.replace("{v}", version))
            .collect();
        let Some(initrd) = names.iter().find(|n| files.contains(n)) else {
            return Err(ImageError::NoInitrd {
                kernel: format!("{} in {shown}", in_dir(kernel)),
                tried: names.join(", "),
            });
        };
        let at = |file: &str| {
            (
                device.clone(),
                in_dir(file),
                format!("{} in {shown}", in_dir(file)),
            )
        };
        return Ok(Boot {
            kernel: at(kernel),
            initrd: at(initrd),
        });
    }
    Err(ImageError::NoKernel {
        disk: disk.to_path_buf(),
        searched: places
            .iter()
            .map(|(_, _, shown)| shown.as_str())
            .collect::<Vec<_>>()
            .join(" and "),
    })
}

/// Writes the file `path` of the file system on `device` to `out`.
fn debugfs_dump(device: &str, path: &str, out: &Path) -> Result<(), ImageError> {
    let request = format!("dump {path} {}", path_str(out)?);
    tool::output(Command::new("debugfs").args(["-R", &request, device]))?;
    if out.is_file() {
        Ok(())
    } else {
        Err(ImageError::Tool {
            command: format!("debugfs -R '{request}' {device}"),
            detail: "wrote nothing".into(),
        })
    }
}

/// `qemu-img convert -O <format> <inputs…> <out>`.
fn qemu_img_convert(format: &str, inputs: &[&str], out: &Path) -> Result<(), ImageError> {
    let mut command = Command::new("qemu-img");
    command
        .args(["convert", "-O", format])
        .args(inputs)
        .arg(path_str(out)?);
    tool::output(&mut command).map(|_| ())
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
        let disk = image.dir.join(DISK_FILE);
        let raw = scratch.join("root.raw");
        qemu_img_convert("raw", &[path_str(&disk)?], &raw)?;
        let mut manifest = write_disk(&image.manifest.name, &disk, &raw, agent, &scratch)?;
        manifest.source = image.manifest.source.clone();
        write_manifest(&scratch, &manifest)?;
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

/// Writes the agent into the root file system `raw` (a scratch copy, taken out of `disk`)
/// and converts it to `scratch/disk.qcow2`; returns the manifest for it (the caller writes
/// it).
fn write_disk(
    name: &str,
    disk: &Path,
    raw: &Path,
    agent: &Path,
    scratch: &Path,
) -> Result<Manifest, ImageError> {
    let stat = |path: &str| {
        tool::output(Command::new("debugfs").args(["-R", &format!("stat {path}"), path_str(raw)?]))
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
    tool::output(Command::new("debugfs").args(["-w", "-f", path_str(&commands)?, path_str(raw)?]))?;
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
    qemu_img_convert("qcow2", &[path_str(raw)?], &qcow2)?;
    std::fs::remove_file(raw).map_err(file_err("cannot remove", raw))?;
    let _ = std::fs::remove_file(&commands);
    new_manifest(name, IMPORTED, &qcow2, &sha256_file(agent)?)
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
