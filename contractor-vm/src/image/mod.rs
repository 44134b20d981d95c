//! Builder images: built on first use, then reused (`contractor-vm image build|import|list|rm`).
//!
//! An image is a directory `<data>/images/<name>/` holding `disk.qcow2` (the base disk,
//! never written after it is built: every VM gets its own overlay), `vmlinuz`,
//! `initrd.img` (the distribution's initrd, kept for booting the image by hand),
//! `initramfs.img` (Contractor's own, which builds boot with: see [`initramfs`])
//! and `manifest.json` (`contractor_protocol::image::Manifest`). It is built in a scratch
//! directory and renamed into place, so a half-built image never looks finished. Building
//! needs no root: mmdebstrap runs in a user namespace and writes an ext2 file system
//! directly. Work on one image holds that image's lock, `<data>/images/.lock-NAME`
//! ([`DirLock::image`]): builds of other images go on, and one that has to wait says for whom.

pub mod import;
pub mod initramfs;
pub mod partition;
pub mod progress;
pub mod tool;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use contractor_protocol::error::ToolCode;
use contractor_protocol::image::{
    ImageInfo, Manifest, AGENT_IN_IMAGE, AGENT_VERSION, DISK_FILE, DISTRIBUTION_INITRD, IMPORTED,
    INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE, MANIFEST_VERSION,
};
use contractor_protocol::ExitCode;
use sha2::{Digest, Sha256};

use progress::Progress;

/// Packages of every image.
const PACKAGES: &str = "linux-image-cloud-amd64,build-essential,git,curl,ca-certificates,kmod";
/// Where the host keeps the certificate authorities it adds to Debian's (copied into images).
const LOCAL_CAS: &str = "/usr/local/share/ca-certificates";

/// What an image is built from: its Debian suite, the packages beyond [`PACKAGES`], and
/// for a derived image its definition (base and packages, kept in its manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    suite: &'static str,
    extra: Vec<String>,
    derived: Option<(String, Vec<String>)>,
    /// Whether apt checks the mirror's Release files against their `Valid-Until` date
    /// (always, unless a derived image's definition turns it off).
    check_valid_until: bool,
}

/// The recipe of a built-in image.
fn recipe(name: &str) -> Option<Recipe> {
    let (suite, extra): (&'static str, &[&str]) = match name {
        "debian-12-build" => ("bookworm", &[]),
        // Debian 13 has a Rust toolchain recent enough for crates.io (rustc 1.85).
        "debian-13-build" => ("trixie", &["rustc", "cargo"]),
        _ => return None,
    };
    Some(Recipe {
        suite,
        extra: extra.iter().map(ToString::to_string).collect(),
        derived: None,
        check_valid_until: true,
    })
}

/// The recipe of the image derived from `base` (`debian-12`, `debian-13`,
/// `debian-unstable`) with `packages`, and its name ([`derived_image_name`]): each package
/// checked to be a Debian package name, sorted, each once. `check_valid_until = false`
/// has apt accept a mirror whose Release file is past its `Valid-Until` date (a snapshot,
/// a slow mirror); it is part of the name and recorded in the manifest.
///
/// [`derived_image_name`]: contractor_protocol::image::derived_image_name
pub fn derived(
    base: &str,
    packages: &[String],
    check_valid_until: bool,
) -> Result<(String, Recipe), ImageError> {
    let suite = contractor_protocol::image::DERIVED_BASES
        .iter()
        .find(|(b, _)| *b == base)
        .map(|(_, suite)| *suite)
        .ok_or_else(|| ImageError::BadBase(base.to_string()))?;
    if packages.len() > contractor_protocol::image::MAX_DERIVED_PACKAGES {
        return Err(ImageError::TooManyPackages(packages.len()));
    }
    if let Some(bad) = packages
        .iter()
        .find(|p| !contractor_protocol::image::is_package_name(p))
    {
        return Err(ImageError::BadPackage(bad.clone()));
    }
    let mut sorted = packages.to_vec();
    sorted.sort();
    sorted.dedup();
    let name = contractor_protocol::image::derived_image_name(base, &sorted, check_valid_until);
    Ok((
        name,
        Recipe {
            suite,
            extra: sorted.clone(),
            derived: Some((base.to_string(), sorted)),
            check_valid_until,
        },
    ))
}
/// Size of the image's file system: room for the build's own files.
const ROOT_SIZE: &str = "4G";
/// The names of the images Contractor builds (its recipes).
pub const BUILT_IMAGES: &[&str] = &["debian-12-build", "debian-13-build"];
/// The largest `manifest.json` read.
const MAX_MANIFEST: u64 = 64 << 10;
/// The largest agent binary written into an image.
const MAX_AGENT: u64 = 256 << 20;

/// The manifest of image `name` from `suite`, whose disk is `disk`, carrying the agent
/// whose sha256 is `agent_sha`, made now.
pub fn new_manifest(
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
        agent_version: AGENT_VERSION.to_string(),
        agent_sha256: agent_sha.to_string(),
        cmdline: format!("console=ttyS0 root=/dev/vda rw init={AGENT_IN_IMAGE} panic=-1 quiet"),
        base: None,
        packages: Vec::new(),
        source: None,
        check_valid_until: None,
    })
}

/// Errors building, importing, finding or removing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The static guest agent binary is missing.
    #[error("the guest agent binary {} does not exist; build it with scripts/build-agent (or set CONTRACTOR_AGENT)", .0.display())]
    NoAgent(PathBuf),
    /// The agent binary is larger than an agent can be.
    #[error("the guest agent binary {} is {size} bytes, more than the {MAX_AGENT} an agent may have", path.display())]
    AgentTooLarge {
        /// The binary.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// This program's own path is unknown (to find the agent beside it).
    #[error(
        "cannot locate this program (to find contractor-agent beside it); set CONTRACTOR_AGENT"
    )]
    Locate(#[source] std::io::Error),
    /// The data directory cannot be told.
    #[error("cannot tell the data directory")]
    DataDir(#[source] contractor_protocol::image::NoDataDir),
    /// The name is not an image name.
    #[error("{name:?} is not an image name: use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 (e.g. \"my-distro\")")]
    BadName {
        /// The name given.
        name: String,
    },
    /// No recipe builds an image of that name, and none was imported.
    #[error("no image {name}: Contractor builds {}, and others are imported with `contractor-vm image import {name} --disk … --kernel … --initrd …`", BUILT_IMAGES.join(", "))]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// `image rm` of an image that is not there.
    #[error("no image {name:?} in {}; built images: {known}", dir.display())]
    NotThere {
        /// The name asked for.
        name: String,
        /// The images directory.
        dir: PathBuf,
        /// The images there, comma-separated, or `none`.
        known: String,
    },
    /// An import under the name of an image Contractor builds.
    #[error("{0} is the name of an image Contractor builds; import under another name")]
    BuiltName(String),
    /// An import would replace a built image.
    #[error("{0} is a built image; import under another name")]
    ReplacesBuilt(String),
    /// An import's input is not a file.
    #[error("the {what} {} is not a file", path.display())]
    NotAFile {
        /// `disk`, `kernel` or `initrd`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// An import's kernel is not a bzImage.
    #[error("{} is not an x86 Linux kernel image (bzImage: \"HdrS\" at offset 0x202)", .0.display())]
    NotAKernel(PathBuf),
    /// An import's disk is not one ext2/3/4 file system.
    #[error("{} is not one ext2/3/4 file system on the whole disk (no partition table)", disk.display())]
    NotExtFs {
        /// The disk given.
        disk: PathBuf,
        /// What debugfs said.
        #[source]
        source: Box<ImageError>,
    },
    /// An import's disk has no shell.
    #[error("{} has no /bin/sh; the build script runs with it", .0.display())]
    NoShell(PathBuf),
    /// An import's disk would make qemu-img read another file, or is not qcow2 or raw.
    #[error("{} cannot be imported: {why}", disk.display())]
    UnsafeDisk {
        /// The disk given.
        disk: PathBuf,
        /// What it refers to, or its format.
        why: String,
    },
    /// An import's partition table is unreadable.
    #[error(transparent)]
    Partitions(#[from] partition::PartitionError),
    /// No partition of an imported disk holds a root file system.
    #[error("{} has no ext2/3/4 partition with /bin/sh (Contractor imports ext2/3/4 root file systems): {found}", disk.display())]
    NoRoot {
        /// The disk given.
        disk: PathBuf,
        /// Each partition and what it holds.
        found: String,
    },
    /// No kernel was found in an imported disk.
    #[error("found no kernel (a regular file vmlinuz-*) in {searched} of {}; give the kernel and initrd with --kernel and --initrd", disk.display())]
    NoKernel {
        /// The disk given.
        disk: PathBuf,
        /// Where it was looked for.
        searched: String,
    },
    /// The newest kernel of an imported disk has no initrd.
    #[error("found the kernel {kernel} but no initrd for it (looked for {tried}); give the kernel and initrd with --kernel and --initrd")]
    NoInitrd {
        /// The kernel's path in the image.
        kernel: String,
        /// The names looked for.
        tried: String,
    },
    /// The agent could not be written into an imported disk.
    #[error("could not write the agent into {} (is the file system full or read-only?): {detail}", disk.display())]
    AgentNotWritten {
        /// The disk given.
        disk: PathBuf,
        /// What debugfs reported of the file.
        detail: String,
    },
    /// A path that tools are given is not UTF-8.
    #[error("the path {} is not UTF-8; use another", .0.display())]
    NotUtf8(PathBuf),
    /// A tool the build needs failed.
    #[error("`{command}` failed: {detail}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit status and last lines of output.
        detail: String,
    },
    /// A tool printed more than it may.
    #[error("`{command}` printed more than {limit} bytes")]
    TooMuchOutput {
        /// The command line.
        command: String,
        /// The limit.
        limit: u64,
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
    #[error("{what} {}", path.display())]
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
    /// A kernel module the builder needs is missing.
    #[error("cannot write Contractor's initramfs")]
    Modules(#[source] initramfs::MissingModule),
    /// A kernel module file is not what it should be.
    #[error("the kernel module {path} in the image {reason}")]
    BadModule {
        /// Its path in the image.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A manifest is unreadable.
    #[error("the manifest {} is invalid; remove the image (`contractor-vm image rm NAME`) and build it again", path.display())]
    BadManifest {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest is larger than a manifest can be.
    #[error("the manifest {} is larger than {MAX_MANIFEST} bytes; remove the image and build it again", .0.display())]
    ManifestTooLarge(PathBuf),
    /// A manifest could not be written.
    #[error("cannot write the manifest")]
    WriteManifest(#[source] serde_json::Error),
    /// A derived image's base is not one Contractor knows.
    #[error("no base {0:?} for a derived image: use one of {bases}", bases = derived_bases())]
    BadBase(String),
    /// A derived image names a package that cannot be a Debian package name.
    #[error("{0:?} is not a Debian package name (lower-case letters, digits, `+`, `-` and `.`, e.g. python3-pytest)")]
    BadPackage(String),
    /// A derived image names too many packages.
    #[error("{0} packages: a derived image takes at most {max}", max = contractor_protocol::image::MAX_DERIVED_PACKAGES)]
    TooManyPackages(usize),
    /// The Debian mirror has no package of a derived image's (apt's own message).
    #[error("the image's packages cannot be installed: {0}")]
    NoSuchPackage(String),
    /// mmdebstrap (or the apt it runs) failed: its `E:` lines, apt's own first, and the
    /// file that keeps its whole output.
    #[error("{}", apt_message(errors, log))]
    Apt {
        /// The `E:` lines (at most [`tool::MAX_ERROR_LINES`]), apt's before mmdebstrap's.
        errors: Vec<String>,
        /// The whole output.
        log: PathBuf,
    },
}

/// The apt option `[image] check_valid_until = false` passes to mmdebstrap.
pub const NO_VALID_UNTIL_APTOPT: &str = "--aptopt=Acquire::Check-Valid-Until \"false\"";

/// The message of [`ImageError::Apt`]: `mmdebstrap failed: E: …; E: … (full log: PATH)`,
/// with what to do when a Release file has expired.
fn apt_message(errors: &[String], log: &Path) -> String {
    let said = match errors.is_empty() {
        true => "it printed no E: line".to_string(),
        false => errors.join("; "),
    };
    let expired = errors
        .iter()
        .any(|e| e.contains("is expired") || e.contains("Valid-Until"));
    let hint = match expired {
        true => {
            " — the mirror's Release file is past its Valid-Until date (a snapshot or a \
                 stale mirror); to accept it, set `check_valid_until = false` under [image] \
                 in contractor.toml"
        }
        false => "",
    };
    format!(
        "mmdebstrap failed: {said}{hint} (full log: {})",
        log.display()
    )
}

/// The names of the bases a derived image can start from, for messages.
fn derived_bases() -> String {
    let bases: Vec<&str> = contractor_protocol::image::DERIVED_BASES
        .iter()
        .map(|(base, _)| *base)
        .collect();
    bases.join(", ")
}

impl ImageError {
    /// The exit code a tool reports for this error: `BadInput` for what the caller can fix
    /// in the request (names, files given), `Infrastructure` for the host and its tools.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ImageError::DataDir(_)
            | ImageError::BadName { .. }
            | ImageError::Unknown { .. }
            | ImageError::NotThere { .. }
            | ImageError::BuiltName(_)
            | ImageError::ReplacesBuilt(_)
            | ImageError::NotAFile { .. }
            | ImageError::NotAKernel(_)
            | ImageError::NotExtFs { .. }
            | ImageError::NoShell(_)
            | ImageError::Partitions(_)
            | ImageError::UnsafeDisk { .. }
            | ImageError::NoRoot { .. }
            | ImageError::NoKernel { .. }
            | ImageError::NoInitrd { .. }
            | ImageError::AgentNotWritten { .. }
            | ImageError::NotUtf8(_)
            | ImageError::BadBase(_)
            | ImageError::BadPackage(_)
            | ImageError::TooManyPackages(_)
            | ImageError::NoSuchPackage(_) => ExitCode::BadInput,
            ImageError::NoAgent(_)
            | ImageError::AgentTooLarge { .. }
            | ImageError::Locate(_)
            | ImageError::Tool { .. }
            | ImageError::Apt { .. }
            | ImageError::TooMuchOutput { .. }
            | ImageError::Spawn { .. }
            | ImageError::File { .. }
            | ImageError::NoBootFile(_)
            | ImageError::Modules(_)
            | ImageError::BadModule { .. }
            | ImageError::BadManifest { .. }
            | ImageError::ManifestTooLarge(_)
            | ImageError::WriteManifest(_) => ExitCode::Infrastructure,
        }
    }

    /// The machine-readable `code` of the error object `--json-errors` prints.
    pub fn code(&self) -> ToolCode {
        match self {
            ImageError::NoAgent(_) | ImageError::AgentTooLarge { .. } | ImageError::Locate(_) => {
                ToolCode::NoAgent
            }
            ImageError::DataDir(_) => ToolCode::DataDir,
            ImageError::BadName { .. } => ToolCode::BadImageName,
            ImageError::Unknown { .. } | ImageError::NotThere { .. } => ToolCode::NoImage,
            ImageError::BuiltName(_) | ImageError::ReplacesBuilt(_) => ToolCode::BuiltImageName,
            ImageError::BadBase(_)
            | ImageError::BadPackage(_)
            | ImageError::TooManyPackages(_)
            | ImageError::NoSuchPackage(_) => ToolCode::BadPackages,
            ImageError::NotAFile { .. }
            | ImageError::NotAKernel(_)
            | ImageError::NotExtFs { .. }
            | ImageError::NoShell(_)
            | ImageError::Partitions(_)
            | ImageError::UnsafeDisk { .. }
            | ImageError::NoRoot { .. }
            | ImageError::NoKernel { .. }
            | ImageError::NoInitrd { .. }
            | ImageError::AgentNotWritten { .. }
            | ImageError::NotUtf8(_) => ToolCode::BadImport,
            ImageError::Tool { .. } | ImageError::TooMuchOutput { .. } => ToolCode::ImageTool,
            ImageError::Apt { .. } => ToolCode::ImageApt,
            ImageError::Spawn { .. } => ToolCode::ImageToolMissing,
            ImageError::File { .. } => ToolCode::ImageFile,
            ImageError::NoBootFile(_) | ImageError::Modules(_) | ImageError::BadModule { .. } => {
                ToolCode::ImageContents
            }
            ImageError::BadManifest { .. }
            | ImageError::ManifestTooLarge(_)
            | ImageError::WriteManifest(_) => ToolCode::Manifest,
        }
    }
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
    /// What `contractor-vm image` prints of it.
    pub fn info(&self) -> ImageInfo {
        let size = [DISK_FILE, KERNEL_FILE, DISTRIBUTION_INITRD, INITRAMFS_FILE]
            .iter()
            .filter_map(|f| std::fs::metadata(self.dir.join(f)).ok())
            .map(|m| m.len())
            .sum();
        ImageInfo {
            name: self.manifest.name.clone(),
            dir: self.dir.clone(),
            boot: self.manifest.boot(&self.dir),
            size,
            manifest: self.manifest.clone(),
            snapshots: crate::snapshot::list(&self.dir),
        }
    }
}

/// The static agent binary: `$CONTRACTOR_AGENT`, else `contractor-agent` beside this
/// program.
pub fn agent_path() -> Result<PathBuf, ImageError> {
    if let Some(path) = std::env::var_os("CONTRACTOR_AGENT").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ImageError::NoAgent(path))
        };
    }
    let exe = std::env::current_exe().map_err(ImageError::Locate)?;
    let path = exe.with_file_name("contractor-agent");
    if path.is_file() {
        Ok(path)
    } else {
        Err(ImageError::NoAgent(path))
    }
}

/// `<data>/images`.
pub fn images_dir() -> Result<PathBuf, ImageError> {
    Ok(contractor_protocol::image::data_dir()
        .map_err(ImageError::DataDir)?
        .join("images"))
}

/// Creates `dir` and its parents with mode 0755, so that libvirt's QEMU user can reach
/// what is inside when it runs as another user.
pub(crate) fn create_dir_world_readable(dir: &Path) -> Result<(), ImageError> {
    contractor_protocol::file::create_dir_world_readable(dir)
        .map_err(file_err("cannot create", dir))
}

/// Image names: lower-case letters, digits, `.`, `_` and `-`, starting with a letter or
/// digit, at most 64 bytes (so that a name is one directory under `images/`).
pub fn check_name(name: &str) -> Result<(), ImageError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(ImageError::BadName {
            name: name.to_string(),
        })
    }
}

/// Returns the image `name`, building it first if it is missing or carries another agent.
pub fn ensure(name: &str) -> Result<Image, ImageError> {
    ensure_with(name, recipe(name))
}

/// The image derived from `base` with `packages` ([`derived`]), built first when missing
/// or when it carries another agent.
pub fn ensure_derived(
    base: &str,
    packages: &[String],
    check_valid_until: bool,
) -> Result<Image, ImageError> {
    let (name, recipe) = derived(base, packages, check_valid_until)?;
    ensure_with(&name, Some(recipe))
}

/// The image `name`, built from `recipe` when missing or stale.
fn ensure_with(name: &str, recipe: Option<Recipe>) -> Result<Image, ImageError> {
    check_name(name)?;
    let images = images_dir()?;
    // An unknown name is refused before anything else is looked for, the agent included.
    if load(&images.join(name))?.is_none() && recipe.is_none() {
        return Err(ImageError::Unknown {
            name: name.to_string(),
        });
    }
    let agent = agent_path()?;
    let agent_sha = sha256_file(&agent)?;
    create_dir_world_readable(&images)?;
    let _lock = DirLock::image(&images, name, &format!("checking or building image {name}"))?;
    let dir = images.join(name);
    if let Some(image) = load(&dir)? {
        if image.manifest.version != MANIFEST_VERSION {
            eprintln!(
                "contractor-vm: image {name} has layout version {} (this contractor-vm uses {MANIFEST_VERSION}); rebuilding it",
                image.manifest.version
            );
        } else if image.manifest.agent_sha256 == agent_sha {
            if !reclaimed_intact(&image)? {
                eprintln!(
                    "contractor-vm: image {name}'s disk was left writable by QEMU's user (by an earlier contractor-vm under qemu:///system) and no longer matches its manifest's sha256; rebuilding it"
                );
            } else {
                mark_used(&image.dir);
                return Ok(image);
            }
        } else if image.manifest.suite == IMPORTED {
            eprintln!(
                "contractor-vm: image {name} carries another agent version; writing this one into it"
            );
            return import::refresh(&image, &agent);
        } else {
            eprintln!("contractor-vm: image {name} carries another agent version; rebuilding it");
        }
    }
    let Some(recipe) = recipe else {
        return Err(ImageError::Unknown {
            name: name.to_string(),
        });
    };
    build(name, &recipe, &images, &agent, &agent_sha)
}

/// The files of an image that its VMs read and must never write.
const READ_ONLY_FILES: [&str; 4] = [DISK_FILE, KERNEL_FILE, DISTRIBUTION_INITRD, INITRAMFS_FILE];

/// Takes an image's files back from another owner: an earlier contractor-vm let libvirt
/// hand the disk to QEMU's user for good under `qemu:///system` (its DAC relabelling), where
/// a QEMU taken over by its guest could write it. Each of [`READ_ONLY_FILES`] owned by
/// another user or writable by anyone but its owner is given to this process's user, mode
/// 0644 (only root can take a file from another user; otherwise it is left as it is); a
/// disk taken back or mended (it was writable by others) is checked against the
/// manifest's sha256. False: it no longer matches.
fn reclaimed_intact(image: &Image) -> Result<bool, ImageError> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getegid();
    let mut disk_reclaimed = false;
    for name in READ_ONLY_FILES {
        let path = image.dir.join(name);
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let meta = file
            .metadata()
            .map_err(file_err("cannot read the metadata of", &path))?;
        let foreign = meta.uid() != uid.as_raw();
        if !foreign && meta.mode() & 0o7777 == 0o644 {
            continue;
        }
        if foreign && !uid.is_root() {
            continue;
        }
        eprintln!(
            "contractor-vm: {} is owned by uid {} with mode {:o}; taking it back (uid {uid}, mode 644)",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
        nix::unistd::fchown(file.as_fd(), Some(uid), Some(gid))
            .map_err(std::io::Error::from)
            .map_err(file_err("cannot take back", &path))?;
        nix::sys::stat::fchmod(
            file.as_fd(),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .map_err(std::io::Error::from)
        .map_err(file_err("cannot set permissions of", &path))?;
        // Whoever could write it (its other owner, or anyone) may have: the disk is read.
        disk_reclaimed |= name == DISK_FILE;
    }
    if disk_reclaimed {
        return Ok(sha256_file(&image.dir.join(DISK_FILE))? == image.manifest.disk_sha256);
    }
    Ok(true)
}

/// The file in an image's directory whose modification time says when a build last used
/// the image (`ensure` touches it); without it, the manifest's `created` counts.
pub const USED_FILE: &str = "last-used";

fn mark_used(dir: &Path) {
    let path = dir.join(USED_FILE);
    let touched = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(err) = touched {
        eprintln!(
            "contractor-vm: cannot mark {} as used: {err}",
            path.display()
        );
    }
}

/// When a build last used the image in `dir` (see [`USED_FILE`]).
fn last_used(image: &Image) -> std::time::SystemTime {
    std::fs::metadata(image.dir.join(USED_FILE))
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| std::time::UNIX_EPOCH + Duration::from_secs(image.manifest.created))
}

/// Removes the derived images (those with a `base`) that no build has used for `max_age`,
/// and returns their names. The default and imported images are never removed this way.
pub fn gc(max_age: Duration) -> Result<Vec<String>, ImageError> {
    gc_in(&images_dir()?, max_age, std::time::SystemTime::now())
}

fn gc_in(
    images: &Path,
    max_age: Duration,
    now: std::time::SystemTime,
) -> Result<Vec<String>, ImageError> {
    let entries = match std::fs::read_dir(images) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_err("cannot list", images)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // Read under the image's lock: one being built is then finished, and used.
        let _lock = DirLock::image(images, &name, &format!("collecting image {name}"))?;
        let Some(image) = load(&entry.path())? else {
            continue;
        };
        let idle = now.duration_since(last_used(&image)).unwrap_or_default();
        if image.manifest.base.is_some() && idle > max_age {
            std::fs::remove_dir_all(&image.dir).map_err(file_err("cannot remove", &image.dir))?;
            removed.push(image.manifest.name.clone());
        }
    }
    removed.sort();
    Ok(removed)
}

/// The images under the data directory, by name.
pub fn list() -> Result<Vec<Image>, ImageError> {
    let images = images_dir()?;
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

/// Removes the image `name`. Running VMs keep their open base until they end.
pub fn remove(name: &str) -> Result<(), ImageError> {
    let images = images_dir()?;
    let dir = images.join(name);
    if check_name(name).is_err() || load(&dir)?.is_none() {
        let known: Vec<String> = list()?.into_iter().map(|i| i.manifest.name).collect();
        return Err(ImageError::NotThere {
            name: name.to_string(),
            dir: images,
            known: if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            },
        });
    }
    let _lock = DirLock::image(&images, name, &format!("removing image {name}"))?;
    std::fs::remove_dir_all(&dir).map_err(file_err("cannot remove", &dir))
}

/// Reads an image's manifest, if the image exists.
pub fn load(dir: &Path) -> Result<Option<Image>, ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err("cannot read", &path)(e)),
    };
    let mut text = Vec::new();
    file.take(MAX_MANIFEST + 1)
        .read_to_end(&mut text)
        .map_err(file_err("cannot read", &path))?;
    if text.len() as u64 > MAX_MANIFEST {
        return Err(ImageError::ManifestTooLarge(path));
    }
    let manifest =
        serde_json::from_slice(&text).map_err(|source| ImageError::BadManifest { path, source })?;
    Ok(Some(Image {
        dir: dir.to_path_buf(),
        manifest,
    }))
}

/// Writes `manifest` as `manifest.json` into `dir`.
pub(crate) fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(manifest).map_err(ImageError::WriteManifest)?;
    std::fs::write(&path, text + "\n").map_err(file_err("cannot write", &path))
}

/// The contents of the agent binary, checked for size.
pub(crate) fn read_agent(agent: &Path) -> Result<Vec<u8>, ImageError> {
    let size = std::fs::metadata(agent)
        .map_err(file_err("cannot read", agent))?
        .len();
    if size > MAX_AGENT {
        return Err(ImageError::AgentTooLarge {
            path: agent.to_path_buf(),
            size,
        });
    }
    std::fs::read(agent).map_err(file_err("cannot read", agent))
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

fn build(
    name: &str,
    recipe: &Recipe,
    images: &Path,
    agent: &Path,
    agent_sha: &str,
) -> Result<Image, ImageError> {
    let progress = Progress::start(&format!("building image {name}"));
    let scratch = images.join(format!(".build-{name}-{}", std::process::id()));
    // mmdebstrap's whole output, kept beside the images when it fails (named in the error).
    let log = images.join(format!(".build-{name}.log"));
    let _ = std::fs::remove_dir_all(&scratch);
    create_dir_world_readable(&scratch)?;
    let result = (|| {
        let root = scratch.join("root.ext2");
        progress.step("installing Debian packages (mmdebstrap)");
        install(recipe, agent, &root, &progress, &log)?;
        progress.step("growing the file system");
        grow(&root, &progress)?;
        progress.step("taking out the kernel and initrd");
        let kernel = take_out_boot_files(&root, &scratch, &progress)?;
        progress.step("writing Contractor's initramfs");
        let version = kernel.trim_start_matches("vmlinuz-");
        write_initramfs(&root, version, agent, &scratch, &progress)?;
        progress.step("converting to qcow2");
        let disk = scratch.join("disk.qcow2");
        tool::run(
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
        let mut manifest = new_manifest(name, recipe.suite, &disk, agent_sha)?;
        if let Some((base, packages)) = &recipe.derived {
            manifest.base = Some(base.clone());
            manifest.packages = packages.clone();
        }
        if !recipe.check_valid_until {
            manifest.check_valid_until = Some(false);
        }
        write_manifest(&scratch, &manifest)?;
        make_world_readable(&scratch)?;
        let dir = images.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(file_err("cannot replace", &dir))?;
        }
        std::fs::rename(&scratch, &dir).map_err(file_err("cannot move the new image to", &dir))?;
        Ok(Image { dir, manifest })
    })();
    match &result {
        Ok(_) => {
            let _ = std::fs::remove_file(&log);
            progress.finish("ready")
        }
        Err(_) => {
            drop(progress);
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    result
}

/// Installs the recipe's Debian packages and the agent into the ext2 file system `root`
/// with mmdebstrap (its output in `log`); a package the mirror lacks is named as apt says.
fn install(
    recipe: &Recipe,
    agent: &Path,
    root: &Path,
    progress: &Progress,
    log: &Path,
) -> Result<(), ImageError> {
    let extra_packages: String = recipe.extra.iter().map(|p| format!(",{p}")).collect();
    let mirror = std::env::var("CONTRACTOR_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let upload = format!("upload {} {AGENT_IN_IMAGE}", agent.display());
    let chmod = format!("chmod 0755 \"$1{AGENT_IN_IMAGE}\" && mkdir -p \"$1/build\"");
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--mode=unshare", "--format=ext2", "--variant=apt"])
        .arg(format!("--include={PACKAGES}{extra_packages}"))
        .arg(format!("--customize-hook={upload}"))
        .arg(format!("--customize-hook={chmod}"));
    if !recipe.check_valid_until {
        mmdebstrap.arg(NO_VALID_UNTIL_APTOPT);
    }
    // The guest trusts what the host trusts: Debian's authorities plus the host's own
    // additions (e.g. a company proxy that inspects TLS).
    if has_local_cas(Path::new(LOCAL_CAS)) {
        mmdebstrap
            .arg(format!(
                "--customize-hook=copy-in {LOCAL_CAS} /usr/local/share"
            ))
            .arg("--customize-hook=chroot \"$1\" update-ca-certificates");
    }
    mmdebstrap.args([recipe.suite, path_str(root)?, &mirror]);
    tool::own_group_dying_with_us(&mut mmdebstrap);
    tool::run_logged(&mut mmdebstrap, progress, log).map_err(|err| match err {
        // apt's own words name the package the mirror lacks.
        ImageError::Apt { errors, .. }
            if recipe.derived.is_some()
                && errors
                    .iter()
                    .any(|l| l.contains("Unable to locate package")) =>
        {
            let apt: Vec<&str> = errors
                .iter()
                .map(String::as_str)
                .filter(|l| l.contains("Unable to locate package"))
                .collect();
            ImageError::NoSuchPackage(apt.join("; "))
        }
        other => other,
    })
}

/// Checks the file system `root` and grows it to [`ROOT_SIZE`].
fn grow(root: &Path, progress: &Progress) -> Result<(), ImageError> {
    tool::run(
        Command::new("e2fsck").args(["-f", "-y", path_str(root)?]),
        progress,
    )
    .or_else(e2fsck_fixed)?;
    tool::run(
        Command::new("resize2fs").args([path_str(root)?, ROOT_SIZE]),
        progress,
    )
}

/// Copies the newest kernel and initrd of `root`'s `/boot` into `scratch` as `vmlinuz` and
/// `initrd.img`; returns the kernel's file name (`vmlinuz-VERSION`).
fn take_out_boot_files(
    root: &Path,
    scratch: &Path,
    progress: &Progress,
) -> Result<String, ImageError> {
    let listing =
        tool::output(Command::new("debugfs").args(["-R", "ls -p /boot", path_str(root)?]))?;
    let kernel = boot_file(&listing, "vmlinuz-").ok_or(ImageError::NoBootFile("vmlinuz-*"))?;
    let initrd =
        boot_file(&listing, "initrd.img-").ok_or(ImageError::NoBootFile("initrd.img-*"))?;
    for (from, to, pattern) in [
        (&kernel, "vmlinuz", "vmlinuz-*"),
        (&initrd, "initrd.img", "initrd.img-*"),
    ] {
        let out = scratch.join(to);
        let request = format!("dump /boot/{from} {}", path_str(&out)?);
        tool::run(
            Command::new("debugfs").args(["-R", &request, path_str(root)?]),
            progress,
        )?;
        if !out.is_file() {
            return Err(ImageError::NoBootFile(pattern));
        }
    }
    Ok(kernel)
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
        tool::output(Command::new("debugfs").args([
            "-R",
            &format!("cat {module_dir}/{file}"),
            path_str(root)?,
        ]))
    };
    let modules_dep = read("modules.dep")?;
    let modules_builtin = read("modules.builtin")?;
    let order = initramfs::load_order(&modules_dep, &modules_builtin, initramfs::WANTED_MODULES)
        .map_err(ImageError::Modules)?;
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
            return Err(ImageError::BadModule {
                path: format!("{module_dir}/{path}"),
                reason: "is neither a plain .ko nor xz-compressed (.ko.xz)",
            });
        }
        let request = format!("dump {module_dir}/{path} {}", path_str(&dumped)?);
        tool::run(
            Command::new("debugfs").args(["-R", &request, path_str(root)?]),
            progress,
        )?;
        let data = if xz {
            xz_decompress(&dumped)?
        } else {
            read_capped(&dumped, tool::MAX_BINARY)?
        };
        std::fs::remove_file(&dumped).map_err(file_err("cannot remove", &dumped))?;
        if !data.starts_with(b"\x7fELF") {
            return Err(ImageError::BadModule {
                path: format!("{module_dir}/{path}"),
                reason: "is not a kernel module (ELF)",
            });
        }
        modules.push((format!("{i:02}-{file_name}"), data));
    }
    let agent_bytes = read_agent(agent)?;
    let out = scratch.join(INITRAMFS_FILE);
    std::fs::write(&out, initramfs::build(&agent_bytes, &modules))
        .map_err(file_err("cannot write", &out))
}

/// The contents of the xz-compressed file `path` (with `xz`, from xz-utils).
fn xz_decompress(path: &Path) -> Result<Vec<u8>, ImageError> {
    tool::bytes(
        Command::new("xz")
            .args(["--decompress", "--stdout"])
            .arg(path),
        tool::MAX_BINARY,
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
        .ok_or_else(|| ImageError::NotUtf8(path.to_path_buf()))
}

/// The newest file in a `debugfs ls -p` listing whose name starts with `prefix`, newest
/// by [`version_order`] of the names.
fn boot_file(listing: &str, prefix: &str) -> Option<String> {
    listing
        .lines()
        .filter_map(|line| line.split('/').nth(5))
        .filter(|name| name.starts_with(prefix))
        .max_by(|a, b| version_order(a, b))
        .map(str::to_string)
}

/// Orders names as versions (as `sort -V` does): runs of digits compare as numbers, the
/// rest byte by byte; so `vmlinuz-6.1.0-10` is newer than `vmlinuz-6.1.0-9`.
pub(crate) fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(first) = rest.chars().next() {
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            out.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for ((da, pa), (db, pb)) in ra.iter().zip(rb.iter()) {
        let order = if *da && *db {
            let (ta, tb) = (pa.trim_start_matches('0'), pb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            pa.cmp(pb)
        };
        if order.is_ne() {
            return order;
        }
    }
    ra.len().cmp(&rb.len()).then_with(|| a.cmp(b))
}

/// The contents of `path`, which must not be larger than `limit` bytes.
fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, ImageError> {
    let file = std::fs::File::open(path).map_err(file_err("cannot read", path))?;
    let mut data = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(file_err("cannot read", path))?;
    if data.len() as u64 > limit {
        return Err(ImageError::File {
            what: "larger than a kernel module may be:",
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::FileTooLarge),
        });
    }
    Ok(data)
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
/// same image at once. Its holder writes into the file what it does (`PID SINCE WHAT`), so
/// that a process that has to wait says for whom.
pub(crate) struct DirLock(std::fs::File);

/// At most this many bytes of a lock's note are read.
const MAX_LOCK_NOTE: u64 = 512;

impl DirLock {
    /// Takes the lock of image `name` (`<images>/.lock-NAME`): each image has its own, so
    /// building one never holds up a build that needs another. `doing` is the note.
    pub(crate) fn image(images: &Path, name: &str, doing: &str) -> Result<DirLock, ImageError> {
        Self::acquire(&images.join(format!(".lock-{name}")), doing)
    }

    /// Takes the lock `path`; while another process holds it, says once on stderr who holds
    /// it and what for, then waits.
    pub(crate) fn acquire(path: &Path, doing: &str) -> Result<DirLock, ImageError> {
        use std::io::{Seek, Write};
        use std::os::fd::AsRawFd;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(file_err("cannot open the lock", path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(file_err("cannot lock", path)(err));
            }
            eprintln!(
                "contractor-vm: waiting for {}: {}",
                path.display(),
                holder(&mut file)
            );
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(file_err("cannot lock", path)(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let note = format!("{} {since} {doing}\n", std::process::id());
        let noted = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(note.as_bytes()));
        noted.map_err(file_err("cannot write", path))?;
        Ok(DirLock(file))
    }
}

/// Who holds a lock, from its note: `pid 1234, for 42 s: building image NAME` (control
/// characters dropped), or that the note cannot be read.
fn holder(file: &mut std::fs::File) -> String {
    use std::io::Seek;
    let mut note = String::new();
    let read = file
        .rewind()
        .and_then(|()| (&*file).take(MAX_LOCK_NOTE).read_to_string(&mut note));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut words = note.trim().splitn(3, ' ');
    match (read, words.next(), words.next(), words.next()) {
        (Ok(_), Some(pid), Some(since), Some(doing)) => {
            let doing: String = doing.chars().filter(|c| !c.is_control()).collect();
            let held = since
                .parse::<u64>()
                .map(|since| format!(", for {} s", now.saturating_sub(since)))
                .unwrap_or_default();
            format!("pid {pid}{held}: {doing}")
        }
        _ => "another process holds it (it wrote no note)".to_string(),
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
    fn check_valid_until_off_is_its_own_image_and_tells_apt() {
        let packages = ["nodejs".to_string()];
        let (checked, recipe) = derived("debian-unstable", &packages, true).expect("checked");
        assert!(recipe.check_valid_until);
        let (unchecked, recipe) = derived("debian-unstable", &packages, false).expect("unchecked");
        assert!(!recipe.check_valid_until);
        assert_ne!(checked, unchecked);
        assert_eq!(
            NO_VALID_UNTIL_APTOPT,
            r#"--aptopt=Acquire::Check-Valid-Until "false""#
        );
    }

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
        let two =
            "/12/100644/0/0/vmlinuz-6.1.0-9-amd64/1/\n/13/100644/0/0/vmlinuz-6.1.0-10-amd64/1/\n";
        assert_eq!(
            boot_file(two, "vmlinuz-").as_deref(),
            Some("vmlinuz-6.1.0-10-amd64"),
            "the newest by version, not by bytes"
        );
    }

    #[test]
    fn gc_removes_only_derived_images_unused_for_longer_than_asked() {
        let images = tempfile::tempdir().expect("tempdir");
        let day = Duration::from_secs(86_400);
        let now = std::time::UNIX_EPOCH + 100 * day;
        let make = |name: &str, base: Option<&str>, created_day: u64, used_day: Option<u32>| {
            let dir = images.path().join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let mut manifest = Manifest {
                version: MANIFEST_VERSION,
                name: name.into(),
                suite: "bookworm".into(),
                created: created_day * 86_400,
                disk_sha256: "d".into(),
                agent_version: AGENT_VERSION.into(),
                agent_sha256: "a".into(),
                cmdline: "root=/dev/vda".into(),
                base: None,
                packages: Vec::new(),
                source: None,
                check_valid_until: None,
            };
            if let Some(base) = base {
                manifest.base = Some(base.into());
                manifest.packages = vec!["python3-pytest".into()];
            }
            write_manifest(&dir, &manifest).expect("manifest");
            if let Some(used) = used_day {
                let file = std::fs::File::create(dir.join(USED_FILE)).expect("used");
                file.set_modified(std::time::UNIX_EPOCH + day * used)
                    .expect("mtime");
            }
            dir
        };
        let stale = make("debian-12-aaaa", Some("debian-12"), 10, Some(50));
        let fresh = make("debian-12-bbbb", Some("debian-12"), 10, Some(95));
        let never = make("debian-13-cccc", Some("debian-13"), 20, None);
        let default = make("debian-12-build", None, 1, None);
        let removed = gc_in(images.path(), 30 * day, now).expect("gc");
        assert_eq!(removed, ["debian-12-aaaa", "debian-13-cccc"]);
        assert!(!stale.exists() && !never.exists());
        assert!(fresh.exists(), "used 5 days ago");
        assert!(default.exists(), "a default image is never collected");
        let missing = images.path().join("none");
        assert!(gc_in(&missing, day, now).expect("no images dir").is_empty());
    }

    #[test]
    fn an_image_reports_its_boot_files_and_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DISK_FILE), b"disk").expect("write");
        std::fs::write(dir.path().join(INITRAMFS_FILE), b"ramfs").expect("write");
        let text = r#"{"version": 2, "name": "x", "suite": "bookworm",
            "created": 1, "disk_sha256": "d", "agent_version": "0.1.0",
            "agent_sha256": "a", "cmdline": "root=/dev/vda"}"#;
        std::fs::write(dir.path().join(MANIFEST_FILE), text).expect("write");
        let image = load(dir.path()).expect("load").expect("an image");
        let info = image.info();
        assert_eq!(info.size, 9);
        assert_eq!(info.boot.disk, dir.path().join(DISK_FILE));
        assert_eq!(info.boot.initrd, Some(dir.path().join(INITRAMFS_FILE)));
        assert!(load(&dir.path().join("missing")).expect("load").is_none());
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            "{\"version\": 2,\n  \"extra\": 1}",
        )
        .expect("write");
        let err = load(dir.path()).expect_err("a bad manifest");
        assert!(matches!(err, ImageError::BadManifest { .. }), "{err}");
        assert_eq!(err.exit_code(), ExitCode::Infrastructure);
    }

    #[test]
    fn a_disk_left_to_qemus_user_is_taken_back_and_checked_against_its_manifest() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !nix::unistd::geteuid().is_root() {
            // To the stderr handle: libtest captures eprintln!.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!("skipped: only root can take a file back from another user\n"),
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join(DISK_FILE);
        std::fs::write(&disk, b"disk").expect("write");
        let text = format!(
            r#"{{"version": 2, "name": "x", "suite": "bookworm", "created": 1,
            "disk_sha256": "{}", "agent_version": "0.1.0", "agent_sha256": "a",
            "cmdline": "root=/dev/vda"}}"#,
            sha256_file(&disk).expect("sha256")
        );
        std::fs::write(dir.path().join(MANIFEST_FILE), text).expect("write");
        let image = load(dir.path()).expect("load").expect("an image");
        // As libvirt's relabelling left it: QEMU's user's (any other uid will do).
        let qemu = Some(nix::unistd::Uid::from_raw(64055));
        nix::unistd::chown(&disk, qemu, None).expect("chown");
        assert!(reclaimed_intact(&image).expect("reclaim"), "unchanged");
        let meta = std::fs::metadata(&disk).expect("stat");
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o644));
        // Written while it was QEMU's: no longer the image the manifest names.
        std::fs::write(&disk, b"DISK").expect("write");
        nix::unistd::chown(&disk, qemu, None).expect("chown");
        assert!(!reclaimed_intact(&image).expect("reclaim"), "changed");
        // Ours but writable by others: its mode is mended, and it is checked too, since
        // QEMU's user (anyone) could write it.
        std::fs::write(&disk, b"disk").expect("write");
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(reclaimed_intact(&image).expect("reclaim"), "unchanged");
        let meta = std::fs::metadata(&disk).expect("stat");
        assert_eq!(meta.mode() & 0o7777, 0o644);
        std::fs::write(&disk, b"DISK").expect("write");
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(
            !reclaimed_intact(&image).expect("reclaim"),
            "a disk anyone could write, and someone did, is not taken as intact"
        );
    }

    #[test]
    fn names_are_checked_before_a_path_is_made_of_them() {
        for bad in [
            "",
            "My-Image",
            "-x",
            "a/b",
            ".hidden",
            "..",
            &"x".repeat(65),
        ] {
            let err = check_name(bad).expect_err(bad);
            assert_eq!(err.exit_code(), ExitCode::BadInput);
        }
        for good in ["my-distro", "alpine3.20", "x_1", "debian-12-build"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        for name in BUILT_IMAGES {
            assert!(recipe(name).is_some(), "{name}");
        }
    }

    #[test]
    fn a_derived_recipe_is_its_base_suite_with_its_packages_once_each() {
        let packages: Vec<String> = ["nodejs", "python3-pytest", "nodejs"]
            .iter()
            .map(ToString::to_string)
            .collect();
        let (name, recipe) = derived("debian-13", &packages, true).expect("derived");
        assert!(check_name(&name).is_ok(), "{name}");
        assert_eq!(recipe.suite, "trixie");
        assert_eq!(recipe.extra, ["nodejs", "python3-pytest"]);
        assert_eq!(
            recipe.derived,
            Some(("debian-13".to_string(), recipe.extra.clone()))
        );
        let err = derived("ubuntu", &[], true).expect_err("no such base");
        assert_eq!(err.code(), ToolCode::BadPackages);
        assert!(
            err.to_string()
                .contains("debian-12, debian-13, debian-unstable"),
            "{err}"
        );
        let err = derived("debian-12", &["a,--hook=x".into()], true).expect_err("not a name");
        assert_eq!(err.exit_code(), ExitCode::BadInput);
    }
}
