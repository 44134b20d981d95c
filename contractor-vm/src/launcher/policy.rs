//! What `contractor-vm` tells the QEMU launcher about one VM ([`QemuPolicy`], JSON in the
//! environment variable [`POLICY_ENV`]), and the confinement the launcher derives from it
//! ([`QemuPolicy::confinement`]).
//!
//! The invariant: the derived policy grants QEMU reading of its installation and of this
//! VM's boot files, writing of this VM's two disks and the few device nodes QEMU opens (no
//! terminal: not `/dev/pts`), and nothing else on the file system; no TCP at all; and rlimits sized from this VM's memory
//! and disks. Every path in the JSON must be absolute, and a JSON text with an unknown or
//! missing field is refused (naming it), never half-applied.

use std::path::{Path, PathBuf};

use contractor_protocol::vm::Accel;
use serde::{Deserialize, Serialize};

/// The environment variable that carries the [`QemuPolicy`] JSON. libvirt sets it for the
/// QEMU process (`<qemu:env>` in the domain XML), and it stays in QEMU's environment after
/// the launcher has executed QEMU: evidence that QEMU was started confined.
pub const POLICY_ENV: &str = "CONTRACTOR_QEMU_POLICY";

/// The version of the [`QemuPolicy`] JSON this crate writes and reads.
pub const POLICY_VERSION: u32 = 1;

/// QEMU's address space beyond the guest's memory: 4 GiB. Measured here: TCG QEMU with a
/// 2 GiB guest peaks at 3.7 GB of virtual memory (VmPeak), i.e. 1.7 GB beyond the guest
/// (the TCG translation buffer, thread stacks and arenas of its I/O and vCPU threads, the
/// libraries it maps). A guest that drives QEMU past it gets allocation failures in QEMU
/// (the VM dies), not a host out of memory.
pub const ADDRESS_SPACE_BEYOND_GUEST: u64 = 4 << 30;

/// `RLIMIT_NOFILE` for QEMU: 4096. QEMU holds a few dozen descriptors for a builder (disks,
/// chardevs, eventfds, the sockets libvirt passes); the cap keeps a guest-driven leak from
/// exhausting the user's descriptors.
pub const MAX_OPEN_FILES: u64 = 4096;

/// QEMU's installation and what its dynamic loader reads at start: the programs, libraries,
/// modules, firmware and keymaps live under these (those that do not exist are left out).
/// On a merged-/usr host (Debian 12) `/lib` and `/lib64` are links into `/usr` and grant
/// nothing more; on others they hold the libraries. Without `/etc/ld.so.cache` QEMU still
/// starts (the loader searches its default directories), but it could then pick other
/// copies of its libraries than the host's configuration says.
///
/// Nothing else was needed (found by experiment with libvirt 9.0 and QEMU 7.2): libvirt
/// passes the monitor and channel sockets as descriptors (`fd=N`) and the console log as a
/// descriptor set (`-add-fd`), so neither libvirt's per-domain directory nor the console
/// log's directory is granted; nor is `/proc`, `/sys`, `/etc` or `/tmp`.
pub const INSTALLATION: &[&str] = &["/usr", "/lib", "/lib64", "/etc/ld.so.cache"];

/// Device nodes QEMU reads: the RNG backend of the builder (`<rng>`).
pub const READ_DEVICES: &[&str] = &["/dev/urandom"];

/// Device nodes QEMU reads and writes: only `/dev/null`, which QEMU opens at start to probe
/// whether the kernel has open-file-description locks (without it, it logs "Failed to open
/// /dev/null for OFD lock probing" and falls back to weaker POSIX locks for its image
/// locking). Not `/dev/ptmx` nor `/dev/pts`: a QEMU taken over by its guest could open the
/// user's terminals there (read keystrokes, write into them). The serial console needs no
/// pty: it has no host end, only its log, which libvirt passes as a descriptor
/// (`crate::xml`).
pub const READ_WRITE_DEVICES: &[&str] = &["/dev/null"];

/// The KVM device, granted only when the VM uses KVM.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// A file QEMU writes, and the largest it may grow to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritableFile {
    /// The file.
    pub path: PathBuf,
    /// Its largest size in bytes.
    pub max_bytes: u64,
}

/// One VM's facts, as `contractor-vm create` knows them, from which the launcher confines
/// QEMU. Example:
/// `{"version":1,"qemu":"/usr/bin/qemu-system-x86_64","accel":"tcg","memory_mib":2048,
/// "image_disk":"/i/disk.qcow2","kernel":"/i/vmlinuz","initrd":"/i/initrd.img",
/// "overlay":{"path":"/w/contractor-x.qcow2","max_bytes":4362076160},
/// "build_disk":{"path":"/w/contractor-x.disk.raw","max_bytes":10737418240}}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuPolicy {
    /// [`POLICY_VERSION`].
    pub version: u32,
    /// The real QEMU the launcher executes.
    pub qemu: PathBuf,
    /// `kvm` or `tcg` (`auto` is read as `tcg`: no `/dev/kvm`).
    pub accel: Accel,
    /// The guest's memory in MiB.
    pub memory_mib: u64,
    /// The base image (read only; the overlay's backing file).
    pub image_disk: PathBuf,
    /// The kernel QEMU loads.
    pub kernel: PathBuf,
    /// The initrd QEMU loads, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The VM's qcow2 overlay (`vda`).
    pub overlay: WritableFile,
    /// The VM's build disk (`vdb`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_disk: Option<WritableFile>,
    /// More read-only backing files of the disks: a snapshot's root and build disk, under
    /// the overlays of a VM restored from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<PathBuf>,
}

/// Why a policy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The JSON does not parse as a [`QemuPolicy`].
    #[error("{} is not a valid policy{at}: {detail}", POLICY_ENV)]
    Json {
        /// Where: ` at line 1, column 40, in `overlay.path``.
        at: String,
        /// serde's message.
        detail: String,
    },
    /// A field has a value the launcher refuses.
    #[error("{} field `{field}`: {reason}", POLICY_ENV)]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl QemuPolicy {
    /// Parses and checks the JSON text of a policy.
    pub fn parse(text: &str) -> Result<QemuPolicy, PolicyError> {
        let policy: QemuPolicy = serde_json::from_str(text).map_err(|e| {
            let located = contractor_protocol::locate::locate(text, &e);
            PolicyError::Json {
                at: located.at(),
                detail: located.detail,
            }
        })?;
        policy.check()?;
        Ok(policy)
    }

    /// The JSON text of this policy (one line).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn check(&self) -> Result<(), PolicyError> {
        if self.version != POLICY_VERSION {
            return Err(PolicyError::Field {
                field: "version",
                reason: format!("is {}; this launcher reads {POLICY_VERSION}", self.version),
            });
        }
        if self.memory_mib == 0 {
            return Err(PolicyError::Field {
                field: "memory_mib",
                reason: String::from("must be at least 1"),
            });
        }
        let mut paths: Vec<(&'static str, &Path)> = vec![
            ("qemu", &self.qemu),
            ("image_disk", &self.image_disk),
            ("kernel", &self.kernel),
            ("overlay.path", &self.overlay.path),
        ];
        if let Some(initrd) = &self.initrd {
            paths.push(("initrd", initrd));
        }
        if let Some(disk) = &self.build_disk {
            paths.push(("build_disk.path", &disk.path));
        }
        paths.extend(self.backing.iter().map(|p| ("backing", p.as_path())));
        for (field, path) in paths {
            if !path.is_absolute() {
                return Err(PolicyError::Field {
                    field,
                    reason: format!("{} is not an absolute path", path.display()),
                });
            }
        }
        Ok(())
    }

    /// The confinement of QEMU for this VM. `extra_read` are files QEMU's command line names
    /// that it must read (libvirt's master-key file, see [`super::argv::files_to_read`]).
    pub fn confinement(&self, extra_read: &[PathBuf]) -> contractor_confine::Policy {
        let mut read: Vec<PathBuf> = INSTALLATION
            .iter()
            .chain(READ_DEVICES)
            .map(PathBuf::from)
            .collect();
        read.push(self.image_disk.clone());
        read.push(self.kernel.clone());
        read.extend(self.initrd.iter().cloned());
        read.extend(self.backing.iter().cloned());
        read.extend(extra_read.iter().cloned());
        let mut read_write: Vec<PathBuf> = READ_WRITE_DEVICES.iter().map(PathBuf::from).collect();
        if self.accel == Accel::Kvm {
            read_write.push(PathBuf::from(KVM_DEVICE));
        }
        read_write.push(self.overlay.path.clone());
        read_write.extend(self.build_disk.iter().map(|d| d.path.clone()));
        contractor_confine::Policy {
            read,
            read_write,
            // QEMU speaks to libvirt over Unix sockets libvirt passes in, and the builder
            // has no network device: no TCP at all.
            bind_ports: Vec::new(),
            connect_ports: Some(Vec::new()),
            max_open_files: Some(MAX_OPEN_FILES),
            max_file_size: Some(self.max_file_size()),
            max_address_space: Some(self.max_address_space()),
            // The launcher executes QEMU after confining itself; QEMU's own sandbox
            // (`-sandbox spawn=deny`, which libvirt passes) then refuses exec.
            allow_exec: true,
            allowed_syscalls: None,
            // libvirt passes the monitor and channel sockets in: QEMU needs no new one.
            socket_families: Some(&[]),
            stream_sockets_only: true,
        }
    }

    /// `RLIMIT_AS`: the guest's memory plus [`ADDRESS_SPACE_BEYOND_GUEST`].
    pub fn max_address_space(&self) -> u64 {
        self.memory_mib
            .saturating_mul(1 << 20)
            .saturating_add(ADDRESS_SPACE_BEYOND_GUEST)
    }

    /// `RLIMIT_FSIZE`: the larger of the two disks' bounds. The limit is per file, so each
    /// disk can reach its own size, and no file QEMU writes can grow past the larger one.
    pub fn max_file_size(&self) -> u64 {
        self.build_disk
            .iter()
            .map(|d| d.max_bytes)
            .fold(self.overlay.max_bytes, u64::max)
    }
}

/// The largest a qcow2 overlay of an image of `virtual_size` bytes grows to: every cluster
/// written once, plus its metadata (L1/L2 tables, 8 bytes per 64 KiB cluster; refcounts,
/// 2 bytes per cluster; a header), with room: the virtual size plus a sixty-fourth plus
/// 64 MiB.
pub fn overlay_max_bytes(virtual_size: u64) -> u64 {
    virtual_size
        .saturating_add(virtual_size / 64)
        .saturating_add(64 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(accel: Accel) -> QemuPolicy {
        QemuPolicy {
            version: POLICY_VERSION,
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel,
            memory_mib: 2048,
            image_disk: "/i/disk.qcow2".into(),
            kernel: "/i/vmlinuz".into(),
            initrd: Some("/i/initrd.img".into()),
            overlay: WritableFile {
                path: "/w/contractor-x.qcow2".into(),
                max_bytes: 3 << 30,
            },
            build_disk: Some(WritableFile {
                path: "/w/contractor-x.disk.raw".into(),
                max_bytes: 10 << 30,
            }),
            backing: Vec::new(),
        }
    }

    fn has(paths: &[PathBuf], path: &str) -> bool {
        paths.iter().any(|p| p == Path::new(path))
    }

    #[test]
    fn a_tcg_vm_reads_its_boot_files_and_writes_its_disks_only() {
        let key = PathBuf::from("/home/u/.config/libvirt/qemu/lib/domain-1-x/master-key.aes");
        let c = policy(Accel::Tcg).confinement(std::slice::from_ref(&key));
        for path in [
            "/usr",
            "/lib",
            "/lib64",
            "/etc/ld.so.cache",
            "/dev/urandom",
            "/i/disk.qcow2",
            "/i/vmlinuz",
            "/i/initrd.img",
        ] {
            assert!(has(&c.read, path), "read {path}");
        }
        assert!(has(&c.read, &key.to_string_lossy()));
        for path in [
            "/dev/null",
            "/w/contractor-x.qcow2",
            "/w/contractor-x.disk.raw",
        ] {
            assert!(has(&c.read_write, path), "read-write {path}");
        }
        for path in ["/dev/ptmx", "/dev/pts"] {
            assert!(
                !has(&c.read_write, path) && !has(&c.read, path),
                "no terminal: {path}"
            );
        }
        assert!(!has(&c.read_write, "/dev/kvm"), "TCG gets no /dev/kvm");
        for paths in [&c.read, &c.read_write] {
            assert!(!paths.iter().any(|p| p == Path::new("/")
                || p == Path::new("/home")
                || p == Path::new("/etc")
                || p == Path::new("/tmp")
                || p == Path::new("/dev")));
        }
        assert!(c.bind_ports.is_empty());
        assert_eq!(c.connect_ports, Some(Vec::new()));
        assert!(c.allow_exec);
        assert_eq!(c.max_open_files, Some(4096));
        assert_eq!(c.max_address_space, Some((2 << 30) + (4 << 30)));
        assert_eq!(c.max_file_size, Some(10 << 30), "the larger disk");
    }

    #[test]
    fn a_kvm_vm_also_gets_dev_kvm() {
        let c = policy(Accel::Kvm).confinement(&[]);
        assert!(has(&c.read_write, "/dev/kvm"));
    }

    #[test]
    fn without_a_build_disk_the_overlay_bounds_the_file_size() {
        let mut p = policy(Accel::Tcg);
        p.build_disk = None;
        p.initrd = None;
        let c = p.confinement(&[]);
        assert_eq!(c.max_file_size, Some(3 << 30));
        assert!(!has(&c.read_write, "/w/contractor-x.disk.raw"));
        assert!(!has(&c.read, "/i/initrd.img"));
    }

    #[test]
    fn the_json_reads_back_and_keeps_out_unknown_fields() {
        let p = policy(Accel::Tcg);
        assert_eq!(QemuPolicy::parse(&p.to_json()).expect("parse"), p);
        let text = p.to_json().replacen("\"kernel\"", "\"kernal\"", 1);
        let e = QemuPolicy::parse(&text).expect_err("typo").to_string();
        assert!(e.contains("CONTRACTOR_QEMU_POLICY"), "{e}");
        assert!(e.contains("kernal"), "{e}");
        let text = p
            .to_json()
            .replacen("\"max_bytes\":3221225472", "\"max_bytes\":-1", 1);
        let e = QemuPolicy::parse(&text).expect_err("negative").to_string();
        assert!(e.contains("overlay.max_bytes"), "{e}");
        let e = QemuPolicy::parse("not json").expect_err("junk").to_string();
        assert!(e.contains("not a valid policy"), "{e}");
    }

    #[test]
    fn relative_paths_and_other_versions_are_refused_by_name() {
        let mut p = policy(Accel::Tcg);
        p.overlay.path = "w/x.qcow2".into();
        let e = QemuPolicy::parse(&p.to_json())
            .expect_err("relative")
            .to_string();
        assert!(
            e.contains("`overlay.path`") && e.contains("w/x.qcow2"),
            "{e}"
        );
        let mut p = policy(Accel::Tcg);
        p.version = 2;
        let e = QemuPolicy::parse(&p.to_json())
            .expect_err("version")
            .to_string();
        assert!(e.contains("`version`"), "{e}");
        let mut p = policy(Accel::Tcg);
        p.memory_mib = 0;
        let e = QemuPolicy::parse(&p.to_json())
            .expect_err("memory")
            .to_string();
        assert!(e.contains("`memory_mib`"), "{e}");
    }

    #[test]
    fn an_overlay_may_grow_past_its_virtual_size_by_its_metadata() {
        let size = 2u64 << 30;
        let max = overlay_max_bytes(size);
        // 64 KiB clusters: L2 entries and refcounts take about 1/6500 of the size.
        assert!(max > size + size / 6500 + (1 << 20));
        assert!(max < size + size / 32 + (128 << 20));
        assert_eq!(overlay_max_bytes(u64::MAX), u64::MAX);
    }
}
