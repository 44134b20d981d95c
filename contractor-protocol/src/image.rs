//! Builder images: the layout the image builder (`contractor-vm image`) and the guest agent
//! share, the `manifest.json` of an image, and what `contractor-vm image build|import|list|rm`
//! print.
//!
//! An image is a directory `<data>/images/<name>/` holding `disk.qcow2` (the base disk, never
//! written after it is built), `vmlinuz`, `initrd.img` (the distribution's initrd),
//! `initramfs.img` (Contractor's own, holding the agent as `/init`) and `manifest.json`. The
//! invariant: an image's [`BootImage`] follows from its directory and its manifest alone
//! ([`Manifest::boot`]), so every reader boots an image the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vm::BootImage;

/// The agent's version: reported in its `hello`, recorded in the manifest of each image that
/// carries it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the agent lives in an image's root file system; the kernel starts it as init.
pub const AGENT_IN_IMAGE: &str = "/usr/local/sbin/contractor-agent";
/// Directory of Contractor's files in its initramfs.
pub const INITRAMFS_DIR: &str = "/contractor";
/// The list of modules in the initramfs, one initramfs path a line, in load order
/// (dependencies first). Its presence is what tells the agent that it is in stage 1.
pub const MODULE_LIST: &str = "/contractor/modules";
/// Version of the manifest and of the image layout: an image of another version is rebuilt.
/// 2: boots with Contractor's initramfs.
pub const MANIFEST_VERSION: u32 = 2;
/// Contractor's initramfs in the image directory.
pub const INITRAMFS_FILE: &str = "initramfs.img";
/// The distribution's initrd in the image directory (what version 1 booted with, and what an
/// imported image boots with).
pub const DISTRIBUTION_INITRD: &str = "initrd.img";
/// The base disk in the image directory.
pub const DISK_FILE: &str = "disk.qcow2";
/// The kernel in the image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The manifest in the image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The builder image a build uses when its spec names none, and whose presence
/// `contractor-vm check` reports.
pub const DEFAULT_IMAGE: &str = "debian-12-build";
/// The `suite` of an imported image's manifest.
pub const IMPORTED: &str = "imported";
/// The environment variable naming the data directory.
pub const DATA_DIR_ENV: &str = "CONTRACTOR_DATA_DIR";

/// The data directory, where images (`images/`) and VM scratch space (`vms/`) live:
/// `$CONTRACTOR_DATA_DIR`, else `/var/lib/contractor` for root (so that libvirt's QEMU user
/// can read it), else `$XDG_DATA_HOME/contractor`, else `~/.local/share/contractor`.
pub fn data_dir() -> Result<PathBuf, NoDataDir> {
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/contractor"));
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("contractor"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/contractor")),
        None => Err(NoDataDir),
    }
}

/// There is no data directory: no `$CONTRACTOR_DATA_DIR`, not root, neither `HOME` nor
/// `XDG_DATA_HOME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("neither HOME nor XDG_DATA_HOME is set; set {DATA_DIR_ENV} to a directory for images")]
pub struct NoDataDir;

/// `manifest.json` of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_VERSION`] for images built now).
    pub version: u32,
    /// Image name.
    pub name: String,
    /// Debian suite it was built from, or [`IMPORTED`].
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
    /// A derived image's definition (`[image]` of a spec): the base it was made from
    /// (`debian-12`, `debian-13`, `debian-unstable`). Absent for the built-in images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// A derived image's extra Debian packages, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// `false` when the image was built without checking the mirror's Release files against
    /// their `Valid-Until` date (`[image] check_valid_until = false`, only on request);
    /// absent when they were checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_valid_until: Option<bool>,
    /// An imported image: what the import took from the disk (the root partition, the
    /// kernel and initrd it found), as the import printed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The bases a derived image can start from, with their Debian suites.
pub const DERIVED_BASES: &[(&str, &str)] = &[
    ("debian-12", "bookworm"),
    ("debian-13", "trixie"),
    ("debian-unstable", "sid"),
];

/// The most extra packages a derived image may name.
pub const MAX_DERIVED_PACKAGES: usize = 256;

/// True when `name` is a Debian package name (policy 5.6.1: lower-case letters, digits,
/// `+`, `-` and `.`, at least two characters, starting with a letter or digit), at most
/// 128 bytes. Nothing else reaches mmdebstrap's `--include`.
pub fn is_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() >= 2
        && name.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// The name of the image derived from `base` with `packages`: the base and the first 12
/// hex digits of the SHA-256 of the definition (`base`, then the sorted, deduplicated
/// packages, one per line), e.g. `debian-12-3fa2c1d4e5b6`. The same definition gets the
/// same name in every project, so projects share it.
pub fn derived_name(base: &str, packages: &[String]) -> String {
    derived_image_name(base, packages, true)
}

/// [`derived_name`], for an image whose build checks the mirror's `Valid-Until` or not
/// (`check_valid_until = false` adds the line `check-valid-until=false` to the definition,
/// so such an image is never shared with a definition that did not ask for it).
pub fn derived_image_name(base: &str, packages: &[String], check_valid_until: bool) -> String {
    use sha2::Digest;
    let mut sorted: Vec<&String> = packages.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut hasher = sha2::Sha256::new();
    hasher.update(base.as_bytes());
    hasher.update(b"\n");
    for package in sorted {
        hasher.update(package.as_bytes());
        hasher.update(b"\n");
    }
    if !check_valid_until {
        hasher.update(b"check-valid-until=false\n");
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{base}-{hex}")
}

impl Manifest {
    /// The initrd (a file in the image directory) to boot with: Contractor's initramfs from
    /// version 2 on, the distribution's before. It follows from the version rather than from
    /// a field of its own, so that an older `contractor` sharing the data directory still
    /// reads this manifest (its fields are checked strictly) and rebuilds the image as it
    /// always did, instead of failing. An imported image boots with the initrd it came with.
    pub fn initrd(&self) -> &'static str {
        if self.version >= 2 && self.suite != IMPORTED {
            INITRAMFS_FILE
        } else {
            DISTRIBUTION_INITRD
        }
    }

    /// The boot files of the image in `dir` that has this manifest.
    pub fn boot(&self, dir: &Path) -> BootImage {
        BootImage {
            disk: dir.join(DISK_FILE),
            kernel: dir.join(KERNEL_FILE),
            initrd: Some(dir.join(self.initrd())),
            cmdline: self.cmdline.clone(),
        }
    }
}

/// An image on disk, as `contractor-vm image` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    /// Image name (its directory's name).
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// The files to boot it with (a `contractor-vm create` spec's `image`).
    pub boot: BootImage,
    /// Total size in bytes of its disk, kernel, initrd and initramfs.
    pub size: u64,
    /// Its `manifest.json`.
    pub manifest: Manifest,
    /// The saved, booted builders kept for it (one per VM shape and slot).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
}

/// One snapshot of a booted builder of an image (`contractor-vm` keeps them under the
/// image's `snapshots/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    /// Its directory.
    pub dir: PathBuf,
    /// The bytes its files take on disk.
    pub bytes: u64,
    /// The VM shape it was saved with: CPUs,
    pub cpus: u32,
    /// memory in MiB,
    pub memory_mib: u64,
    /// build disk in GiB,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// and accelerator.
    pub accel: crate::vm::Accel,
    /// When it was made, seconds since the Unix epoch.
    pub created: u64,
}

/// The single result object `contractor-vm image …` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageResult {
    /// The image built, found or imported (`image build`, `image import`).
    Image {
        /// Protocol version, 1.
        version: u32,
        /// The image (boxed: it is much larger than the other messages).
        image: Box<ImageInfo>,
    },
    /// The images under the data directory, by name (`image list`).
    Images {
        /// Protocol version, 1.
        version: u32,
        /// The images.
        images: Vec<ImageInfo>,
    },
    /// The image is gone (`image rm`).
    Removed {
        /// Protocol version, 1.
        version: u32,
        /// Image name.
        name: String,
    },
    /// The derived images `image gc` removed (no build used them for its `--days`).
    Collected {
        /// Protocol version, 1.
        version: u32,
        /// Their names, sorted.
        removed: Vec<String>,
    },
}

impl ImageResult {
    /// The message's `type`, as written on the wire (`image`, `images`, `removed`,
    /// `collected`): what an answer was, when it was not the one asked for.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageResult::Image { .. } => "image",
            ImageResult::Images { .. } => "images",
            ImageResult::Removed { .. } => "removed",
            ImageResult::Collected { .. } => "collected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_version_says_which_initrd_boots() {
        let v1 = r#"{"version": 1, "name": "debian-12-build", "suite": "bookworm",
            "created": 1, "disk_sha256": "d", "agent_version": "0.1.0",
            "agent_sha256": "a", "cmdline": "root=/dev/vda"}"#;
        let mut manifest: Manifest = serde_json::from_str(v1).expect("a version 1 manifest");
        assert_eq!(manifest.initrd(), DISTRIBUTION_INITRD);
        manifest.version = MANIFEST_VERSION;
        assert_eq!(manifest.initrd(), INITRAMFS_FILE);
        assert_eq!(
            manifest.boot(Path::new("/images/x")).initrd.as_deref(),
            Some(Path::new("/images/x/initramfs.img"))
        );
        manifest.suite = IMPORTED.into();
        assert_eq!(manifest.initrd(), DISTRIBUTION_INITRD);
    }

    #[test]
    fn a_derived_image_is_named_by_its_definition_alone() {
        let a = derived_name("debian-12", &["python3-pytest".into(), "nodejs".into()]);
        let b = derived_name(
            "debian-12",
            &["nodejs".into(), "python3-pytest".into(), "nodejs".into()],
        );
        assert_eq!(a, b);
        assert!(
            a.starts_with("debian-12-") && a.len() == "debian-12-".len() + 12,
            "{a}"
        );
        assert_ne!(
            a,
            derived_name("debian-13", &["nodejs".into(), "python3-pytest".into()])
        );
        assert_ne!(a, derived_name("debian-12", &["nodejs".into()]));
        for good in ["g++", "python3-pytest", "libc6-dev", "0ad"] {
            assert!(is_package_name(good), "{good}");
        }
        for bad in ["a", "Python3", "-x", "a,b", "a b", "--include=x", "x;rm"] {
            assert!(!is_package_name(bad), "{bad}");
        }
    }

    #[test]
    fn results_have_the_documented_shape() {
        let manifest = Manifest {
            version: 2,
            name: "debian-12-build".into(),
            suite: "bookworm".into(),
            created: 1,
            disk_sha256: "d".into(),
            agent_version: "0.1.0".into(),
            agent_sha256: "a".into(),
            cmdline: "root=/dev/vda".into(),
            base: None,
            source: None,
            packages: vec![],
            check_valid_until: None,
        };
        let dir = PathBuf::from("/d/images/debian-12-build");
        let result = ImageResult::Image {
            version: 1,
            image: Box::new(ImageInfo {
                name: "debian-12-build".into(),
                boot: manifest.boot(&dir),
                dir,
                size: 5,
                manifest,
                snapshots: vec![],
            }),
        };
        let text = serde_json::to_string(&result).expect("json");
        assert!(
            text.starts_with(
                r#"{"type":"image","version":1,"image":{"name":"debian-12-build","dir":"/d/images/debian-12-build","boot":{"disk":"/d/images/debian-12-build/disk.qcow2","#
            ),
            "{text}"
        );
        let back: ImageResult = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, result);
        assert_eq!(back.kind(), "image");
        let removed = ImageResult::Removed {
            version: 1,
            name: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&removed).expect("json"),
            r#"{"type":"removed","version":1,"name":"x"}"#
        );
    }

    #[test]
    fn an_answers_kind_is_its_type_on_the_wire() {
        let answers = [
            ImageResult::Images {
                version: 1,
                images: vec![],
            },
            ImageResult::Removed {
                version: 1,
                name: "x".into(),
            },
            ImageResult::Collected {
                version: 1,
                removed: vec![],
            },
        ];
        for answer in answers {
            let text = serde_json::to_value(&answer).expect("json");
            assert_eq!(text["type"], answer.kind(), "{text}");
        }
    }
}
