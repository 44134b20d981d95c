//! Builder images: built on first use, then reused.
//!
//! An image is a directory `<data>/images/<name>/` holding `disk.qcow2` (the base disk,
//! never written after it is built: every VM gets its own overlay), `vmlinuz`,
//! `initrd.img` (the distribution's initrd, kept for booting the image by hand),
//! `initramfs.img` (Contractor's own, which builds boot with: see [`crate::initramfs`])
//! and `manifest.json`. It is built in a scratch directory and renamed into
//! place, so a half-built image never looks finished. Building needs no root: mmdebstrap
//! runs in a user namespace and writes an ext2 file system directly.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use contractor_protocol::vm::BootImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::initramfs;
use crate::paths;
use crate::progress::Progress;

/// Where the agent lives in the image; the kernel starts it as init.
pub(crate) const AGENT_IN_IMAGE: &str = "/usr/local/sbin/contractor-agent";
/// Packages of every image.
const PACKAGES: &str = "linux-image-cloud-amd64,build-essential,git,curl,ca-certificates,kmod";
/// Where the host keeps the certificate authorities it adds to Debian's (copied into images).
const LOCAL_CAS: &str = "/usr/local/share/ca-certificates";

/// What an image is built from: its Debian suite and the packages beyond [`PACKAGES`].
fn recipe(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "debian-12-build" => Some(("bookworm", "")),
        // Debian 13 has a Rust toolchain recent enough for crates.io (rustc 1.85).
        "debian-13-build" => Some(("trixie", ",rustc,cargo")),
        _ => None,
    }
}
/// Size of the image's file system: room for the build's own files.
const ROOT_SIZE: &str = "4G";
/// Version of the manifest and of the image layout: an image of another version is
/// rebuilt. 2: boots with Contractor's initramfs.
pub const MANIFEST_VERSION: u32 = 2;
/// Contractor's initramfs in the image directory.
pub const INITRAMFS_FILE: &str = "initramfs.img";
/// The distribution's initrd in the image directory (what version 1 booted with).
pub(crate) const DISTRIBUTION_INITRD: &str = "initrd.img";

/// `manifest.json` of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_VERSION`] for images built now).
    pub version: u32,
    /// Image name.
    pub name: String,
    /// Debian suite it was built from.
    pub suite: String,
    /// Unix time it was built.
    pub created: u64,
    /// sha256 of `disk.qcow2`.
    pub disk_sha256: String,
    /// Version of the agent inside.
    pub agent_version: String,
    /// sha256 of the agent binary inside.
    pub agent_sha256: String,
    /// Kernel command line to boot it with.
    pub cmdline: String,
}

impl Manifest {
    /// The manifest of image `name` from `suite`, whose disk is `disk`, carrying the agent
    /// whose sha256 is `agent_sha`, made now.
    pub fn new(
        name: &str,
        suite: &str,
        disk: &Path,
        agent_sha: &str,
    ) -> Result<Manifest, ImageError> {
        Ok(Manifest {
            version: MANIFEST_VERSION,
            name: name.to_string(),
            suite: suite.to_string(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            disk_sha256: sha256_file(disk)?,
            agent_version: contractor_run::guest::agent::AGENT_VERSION.to_string(),
            agent_sha256: agent_sha.to_string(),
            cmdline: format!("console=ttyS0 root=/dev/vda rw init={AGENT_IN_IMAGE} panic=-1 quiet"),
        })
    }

    /// The initrd (a file in the image directory) to boot with: Contractor's initramfs
    /// from version 2 on, the distribution's before. It follows from the version rather
    /// than from a field of its own, so that an older `contractor` sharing the data
    /// directory still reads this manifest (its fields are checked strictly) and rebuilds
    /// the image as it always did, instead of failing.
    pub fn initrd(&self) -> &'static str {
        // An imported image boots with the initrd it came with.
        if self.version >= 2 && self.suite != crate::import::IMPORTED {
            INITRAMFS_FILE
        } else {
            DISTRIBUTION_INITRD
        }
    }
}

/// Errors building or finding an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The static guest agent binary is missing.
    #[error("the guest agent binary {0} does not exist; build it with scripts/build-agent (or set CONTRACTOR_AGENT)")]
    NoAgent(PathBuf),
    /// A tool the build needs failed.
    #[error("`{command}` failed: {detail}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit status and last lines of output.
        detail: String,
    },
    /// A tool could not be started.
    #[error("cannot run `{command}` (is it installed? scripts/setup installs it)")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// File work failed.
    #[error("{what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image has no kernel or initrd in /boot.
    #[error("the image has no {0} in /boot")]
    NoBootFile(&'static str),
    /// A manifest is unreadable.
    #[error("the manifest {path} is invalid")]
    BadManifest {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Another error.
    #[error("{0}")]
    Other(String),
}

pub(crate) fn file_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::File {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A built image on disk.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Image {
    /// The boot files for contractor-vm.
    pub fn boot(&self) -> BootImage {
        BootImage {
            disk: self.dir.join("disk.qcow2"),
            kernel: self.dir.join("vmlinuz"),
            initrd: Some(self.dir.join(self.manifest.initrd())),
            cmdline: self.manifest.cmdline.clone(),
        }
    }
}

/// The static agent binary: `$CONTRACTOR_AGENT`, else `contractor-agent` beside this
/// program.
pub fn agent_path() -> Result<PathBuf, ImageError> {
    if let Some(path) = std::env::var_os("CONTRACTOR_AGENT") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ImageError::NoAgent(path))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| ImageError::Other(format!("cannot locate this program: {e}")))?;
    let path = exe.with_file_name("contractor-agent");
    if path.is_file() {
        Ok(path)
    } else {
        Err(ImageError::NoAgent(path))
    }
}

/// Returns the image `name`, building it first if it is missing or carries another agent.
pub fn ensure(name: &str) -> Result<Image, ImageError> {
    let images = paths::data_dir().map_err(ImageError::Other)?.join("images");
    paths::create_dir_world_readable(&images).map_err(file_err("cannot create", &images))?;
    let agent = agent_path()?;
    let agent_sha = sha256_file(&agent)?;
    let _lock = DirLock::acquire(&images.join(".lock"))?;
    let dir = images.join(name);
    if let Some(image) = load(&dir)? {
        if image.manifest.version != MANIFEST_VERSION {
            eprintln!(
                "contractor: image {name} has layout version {} (this contractor uses {MANIFEST_VERSION}); rebuilding it",
                image.manifest.version
            );
        } else if image.manifest.agent_sha256 == agent_sha {
            return Ok(image);
        } else if image.manifest.suite == crate::import::IMPORTED {
            eprintln!(
                "contractor: image {name} carries another agent version; writing this one into it"
            );
            return crate::import::refresh(&image, &agent);
        } else {
            eprintln!("contractor: image {name} carries another agent version; rebuilding it");
        }
    }
    if recipe(name).is_none() {
        return Err(ImageError::Other(format!(
            "no image {name}: Contractor builds {}, and others are imported with `contractor image import {name} --disk … --kernel … --initrd …`",
            crate::spec::KNOWN_IMAGES.join(", ")
        )));
    }
    build(name, &images, &agent, &agent_sha)
}

/// The images built under the data directory, by name.
pub fn list() -> Result<Vec<Image>, ImageError> {
    let images = paths::data_dir().map_err(ImageError::Other)?.join("images");
    let entries = match std::fs::read_dir(&images) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_err("cannot list", &images)(e)),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // the lock, and images being built
        }
        if let Some(image) = load(&entry.path())? {
            found.push(image);
        }
    }
    found.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
    Ok(found)
}

/// Removes the built image `name`. Running VMs keep their open base until they end.
pub fn remove(name: &str) -> Result<(), ImageError> {
    let images = paths::data_dir().map_err(ImageError::Other)?.join("images");
    let dir = images.join(name);
    if name.is_empty() || name.starts_with('.') || name.contains('/') || load(&dir)?.is_none() {
        let known: Vec<String> = list()?.into_iter().map(|i| i.manifest.name).collect();
        return Err(ImageError::Other(format!(
            "no image {name:?} in {}; built images: {}",
            images.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    let _lock = DirLock::acquire(&images.join(".lock"))?;
    std::fs::remove_dir_all(&dir).map_err(file_err("cannot remove", &dir))
}

/// `2026-11-25 14:15:02` (UTC) from Unix seconds.
pub fn format_time(unix: u64) -> String {
    let secs = i64::try_from(unix).unwrap_or(0);
    // SAFETY: libc::tm is plain old data; all-zero is a valid value to be overwritten.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: gmtime_r writes into our tm from a valid time_t.
    unsafe { libc::gmtime_r(&secs, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Reads an image's manifest, if the image exists.
pub fn load(dir: &Path) -> Result<Option<Image>, ImageError> {
    let path = dir.join("manifest.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err("cannot read", &path)(e)),
    };
    let manifest =
        serde_json::from_str(&text).map_err(|source| ImageError::BadManifest { path, source })?;
    Ok(Some(Image {
        dir: dir.to_path_buf(),
        manifest,
    }))
}

/// Whether `dir` holds certificates for update-ca-certificates (`*.crt`, at any depth).
fn has_local_cas(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let path = e.path();
            path.extension().is_some_and(|x| x == "crt") || (path.is_dir() && has_local_cas(&path))
        })
    })
}

fn build(name: &str, images: &Path, agent: &Path, agent_sha: &str) -> Result<Image, ImageError> {
    let Some((suite, extra_packages)) = recipe(name) else {
        return Err(ImageError::Other(format!("no recipe for image {name}")));
    };
    let mirror = std::env::var("CONTRACTOR_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let progress = Progress::start(&format!("building image {name}"));
    let scratch = images.join(format!(".build-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    paths::create_dir_world_readable(&scratch).map_err(file_err("cannot create", &scratch))?;
    let result = (|| {
        let root = scratch.join("root.ext2");
        progress.step("installing Debian packages (mmdebstrap)");
        let upload = format!("upload {} {AGENT_IN_IMAGE}", agent.display());
        let chmod = format!("chmod 0755 \"$1{AGENT_IN_IMAGE}\" && mkdir -p \"$1/build\"");
        let mut mmdebstrap = Command::new("mmdebstrap");
        mmdebstrap
            .args(["--mode=unshare", "--format=ext2", "--variant=apt"])
            .arg(format!("--include={PACKAGES}{extra_packages}"))
            .arg(format!("--customize-hook={upload}"))
            .arg(format!("--customize-hook={chmod}"));
        // The guest trusts what the host trusts: Debian's authorities plus the host's own
        // additions (e.g. a company proxy that inspects TLS).
        if has_local_cas(Path::new(LOCAL_CAS)) {
            mmdebstrap
                .arg(format!(
                    "--customize-hook=copy-in {LOCAL_CAS} /usr/local/share"
                ))
                .arg("--customize-hook=chroot \"$1\" update-ca-certificates");
        }
        mmdebstrap.args([suite, path_str(&root)?, &mirror]);
        run_tool(&mut mmdebstrap, &progress)?;

        progress.step("growing the file system");
        run_tool(
            Command::new("e2fsck").args(["-f", "-y", path_str(&root)?]),
            &progress,
        )
        .or_else(e2fsck_fixed)?;
        run_tool(
            Command::new("resize2fs").args([path_str(&root)?, ROOT_SIZE]),
            &progress,
        )?;

        progress.step("taking out the kernel and initrd");
        let listing =
            tool_output(Command::new("debugfs").args(["-R", "ls -p /boot", path_str(&root)?]))?;
        let kernel = boot_file(&listing, "vmlinuz-").ok_or(ImageError::NoBootFile("vmlinuz-*"))?;
        let initrd =
            boot_file(&listing, "initrd.img-").ok_or(ImageError::NoBootFile("initrd.img-*"))?;
        for (from, to) in [(&kernel, "vmlinuz"), (&initrd, "initrd.img")] {
            let out = scratch.join(to);
            let request = format!("dump /boot/{from} {}", path_str(&out)?);
            run_tool(
                Command::new("debugfs").args(["-R", &request, path_str(&root)?]),
                &progress,
            )?;
            if !out.is_file() {
                return Err(ImageError::NoBootFile(if to == "vmlinuz" {
                    "vmlinuz-*"
                } else {
                    "initrd.img-*"
                }));
            }
        }

        progress.step("writing Contractor's initramfs");
        let version = kernel.trim_start_matches("vmlinuz-");
        write_initramfs(&root, version, agent, &scratch, &progress)?;

        progress.step("converting to qcow2");
        let disk = scratch.join("disk.qcow2");
        run_tool(
            Command::new("qemu-img").args([
                "convert",
                "-O",
                "qcow2",
                path_str(&root)?,
                path_str(&disk)?,
            ]),
            &progress,
        )?;
        std::fs::remove_file(&root).map_err(file_err("cannot remove", &root))?;

        progress.step("recording the manifest");
        let manifest = Manifest::new(name, suite, &disk, agent_sha)?;
        let manifest_path = scratch.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| ImageError::Other(e.to_string()))?;
        std::fs::write(&manifest_path, text + "\n")
            .map_err(file_err("cannot write", &manifest_path))?;
        make_world_readable(&scratch)?;

        let dir = images.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(file_err("cannot replace", &dir))?;
        }
        std::fs::rename(&scratch, &dir).map_err(file_err("cannot move the new image to", &dir))?;
        Ok(Image { dir, manifest })
    })();
    match &result {
        Ok(_) => progress.finish("ready"),
        Err(_) => {
            drop(progress);
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    result
}

/// Writes `initramfs.img` into `scratch`: the agent, and the modules of kernel `version`
/// that the builder needs, taken out of the root file system `root` with debugfs.
fn write_initramfs(
    root: &Path,
    version: &str,
    agent: &Path,
    scratch: &Path,
    progress: &Progress,
) -> Result<(), ImageError> {
    let module_dir = format!("/lib/modules/{version}");
    let read = |file: &str| {
        tool_output(Command::new("debugfs").args([
            "-R",
            &format!("cat {module_dir}/{file}"),
            path_str(root)?,
        ]))
    };
    let modules_dep = read("modules.dep")?;
    let modules_builtin = read("modules.builtin")?;
    let order = initramfs::load_order(&modules_dep, &modules_builtin, initramfs::WANTED_MODULES)
        .map_err(|e| ImageError::Other(e.to_string()))?;
    let dumped = scratch.join("module.ko");
    let mut modules = Vec::new();
    for (i, path) in order.iter().enumerate() {
        let file_name = path.rsplit('/').next().unwrap_or(path);
        // Debian 13 ships its modules xz-compressed; the initramfs holds them plain.
        let (file_name, xz) = match file_name.strip_suffix(".xz") {
            Some(plain) => (plain, true),
            None => (file_name, false),
        };
        if !file_name.ends_with(".ko") {
            return Err(ImageError::Other(format!(
                "the kernel module {path} is neither a plain .ko nor xz-compressed (.ko.xz)"
            )));
        }
        let request = format!("dump {module_dir}/{path} {}", path_str(&dumped)?);
        run_tool(
            Command::new("debugfs").args(["-R", &request, path_str(root)?]),
            progress,
        )?;
        let data = if xz {
            xz_decompress(&dumped)?
        } else {
            std::fs::read(&dumped).map_err(file_err("cannot read", &dumped))?
        };
        std::fs::remove_file(&dumped).map_err(file_err("cannot remove", &dumped))?;
        if !data.starts_with(b"\x7fELF") {
            return Err(ImageError::Other(format!(
                "{module_dir}/{path} in the image is not a kernel module"
            )));
        }
        modules.push((format!("{i:02}-{file_name}"), data));
    }
    let agent_bytes = std::fs::read(agent).map_err(file_err("cannot read", agent))?;
    let out = scratch.join(INITRAMFS_FILE);
    std::fs::write(&out, initramfs::build(&agent_bytes, &modules))
        .map_err(file_err("cannot write", &out))
}

/// The contents of the xz-compressed file `path` (with `xz`, from xz-utils).
fn xz_decompress(path: &Path) -> Result<Vec<u8>, ImageError> {
    tool_bytes(
        Command::new("xz")
            .args(["--decompress", "--stdout"])
            .arg(path),
    )
}

/// e2fsck exits 1 when it fixed something: that is success here.
fn e2fsck_fixed(err: ImageError) -> Result<(), ImageError> {
    match &err {
        ImageError::Tool { detail, .. } if detail.starts_with("exit status: 1") => Ok(()),
        _ => Err(err),
    }
}

pub(crate) fn path_str(path: &Path) -> Result<&str, ImageError> {
    path.to_str()
        .ok_or_else(|| ImageError::Other(format!("path {} is not UTF-8", path.display())))
}

/// The newest file in a `debugfs ls -p` listing whose name starts with `prefix`.
fn boot_file(listing: &str, prefix: &str) -> Option<String> {
    let mut names: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split('/').nth(5))
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names.last().map(|s| s.to_string())
}

/// Runs a tool, showing its latest output line as the progress detail; on failure returns
/// its last lines.
fn run_tool(command: &mut Command, progress: &Progress) -> Result<(), ImageError> {
    let shown = format!("{command:?}").replace('"', "");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            command: shown.clone(),
            source,
        })?;
    let stdout = child.stdout.take();
    let out_thread = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut out) = stdout {
            let _ = out.read_to_string(&mut text);
        }
        text
    });
    let mut tail: Vec<String> = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            progress.detail(line.trim_start_matches("I: "));
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
    }
    let stdout_text = out_thread.join().unwrap_or_default();
    let status = child.wait().map_err(|source| ImageError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    tail.extend(stdout_text.lines().rev().take(5).map(str::to_string));
    Err(ImageError::Tool {
        command: shown,
        detail: format!("{status}\n{}", tail.join("\n")),
    })
}

pub(crate) fn tool_output(command: &mut Command) -> Result<String, ImageError> {
    tool_bytes(command).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// Runs `command` and returns its stdout; a failure carries its stderr.
fn tool_bytes(command: &mut Command) -> Result<Vec<u8>, ImageError> {
    let shown = format!("{command:?}").replace('"', "");
    let output = command
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| ImageError::Spawn {
            command: shown.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImageError::Tool {
            command: shown,
            detail: format!(
                "{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(output.stdout)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = std::fs::File::open(path).map_err(file_err("cannot read", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(file_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn make_world_readable(dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let entries = std::fs::read_dir(dir).map_err(file_err("cannot list", dir))?;
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(file_err("cannot set permissions of", &path))?;
    }
    Ok(())
}

/// An exclusive lock on a file, held until dropped (flock), so two builds do not build the
/// same image at once.
pub(crate) struct DirLock(std::fs::File);

impl DirLock {
    pub(crate) fn acquire(path: &Path) -> Result<DirLock, ImageError> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(file_err("cannot open the lock", path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(file_err("cannot lock", path)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(DirLock(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_files_are_found_in_a_debugfs_listing() {
        let listing = "/5122/040755/0/0/./\n/2/040755/0/0/../\n/5633/100644/0/0/System.map-6.1.0-50-cloud-amd64/83/\n\
                       /6657/100644/0/0/initrd.img-6.1.0-50-cloud-amd64/14401936/\n\
                       /7169/100644/0/0/vmlinuz-6.1.0-50-cloud-amd64/14149568/\n";
        assert_eq!(
            boot_file(listing, "vmlinuz-").as_deref(),
            Some("vmlinuz-6.1.0-50-cloud-amd64")
        );
        assert_eq!(
            boot_file(listing, "initrd.img-").as_deref(),
            Some("initrd.img-6.1.0-50-cloud-amd64")
        );
        assert_eq!(boot_file("/1/040755/0/0/./\n", "vmlinuz-"), None);
    }

    #[test]
    fn the_layout_version_says_which_initrd_boots() {
        let v1 = r#"{"version": 1, "name": "debian-12-build", "suite": "bookworm",
            "created": 1, "disk_sha256": "d", "agent_version": "0.1.0",
            "agent_sha256": "a", "cmdline": "root=/dev/vda"}"#;
        let mut manifest: Manifest = serde_json::from_str(v1).expect("a version 1 manifest");
        assert_eq!(manifest.initrd(), "initrd.img");
        manifest.version = MANIFEST_VERSION;
        assert_eq!(manifest.initrd(), INITRAMFS_FILE);
        let image = Image {
            dir: "/images/x".into(),
            manifest,
        };
        assert_eq!(
            image.boot().initrd.as_deref(),
            Some(Path::new("/images/x/initramfs.img"))
        );
    }

    #[test]
    fn times_are_printed_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_795_615_977), "2026-11-25 14:12:57");
    }
}
