//! Contractor's own initramfs for a builder image, so the VM boots without the
//! distribution's initrd (udev and shell scripts: seconds under TCG).
//!
//! It holds the static agent as `/init`, the kernel modules the kernel needs to reach the
//! root disk and the host (virtio PCI, block, console, rng and what they depend on; those
//! built into the kernel are left out) and the list of them in load order, which the agent
//! reads in stage 1 (contractor-run's `guest::initrd`; the paths are in
//! `contractor_protocol::image`). The archive is an uncompressed
//! `newc` cpio, the format the kernel unpacks: no external tool is needed to write it, and
//! nothing has to be decompressed at boot. The invariant: every module on the list comes
//! after all the modules it depends on, as `modules.dep` states them.

use std::collections::{HashMap, HashSet};

use contractor_protocol::image::{INITRAMFS_DIR, MODULE_LIST};

/// The modules a builder needs, as module names (`-` and `_` are the same).
pub const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    // The agent's root is an overlay on the build disk (contractor-run's guest::init).
    "overlay",
];

/// A module that is neither built in nor in `modules.dep`.
#[derive(Debug, thiserror::Error)]
#[error("the kernel has no module {0} (neither built in nor in modules.dep)")]
pub struct MissingModule(pub String);

/// The module name of a path like `kernel/drivers/char/hw_random/virtio-rng.ko`:
/// `virtio_rng`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.split_once(".ko.").map(|(stem, _)| stem))
        .unwrap_or(file);
    stem.replace('-', "_")
}

/// Module name -> (its path, the paths of the modules it needs), from `modules.dep`.
type Dependencies = HashMap<String, (String, Vec<String>)>;

/// The module files (paths relative to `/lib/modules/<version>/`) to load for `wanted`, in
/// an order where each comes after its dependencies. `modules_dep` and `modules_builtin`
/// are the contents of those files; built-in modules need no file and are skipped.
pub fn load_order(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
) -> Result<Vec<String>, MissingModule> {
    let builtin: HashSet<String> = modules_builtin
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect();
    let mut deps = Dependencies::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim().to_string();
        let needs = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(&path), (path, needs));
    }
    let mut order = Vec::new();
    let mut placed = HashSet::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let Some((path, _)) = deps.get(&name) else {
            return Err(MissingModule(name));
        };
        place(path, &deps, &builtin, &mut placed, &mut order, 0)?;
    }
    Ok(order)
}

/// Appends `path` after its dependencies (depth-first), each once.
fn place(
    path: &str,
    deps: &Dependencies,
    builtin: &HashSet<String>,
    placed: &mut HashSet<String>,
    order: &mut Vec<String>,
    depth: usize,
) -> Result<(), MissingModule> {
    let name = module_name(path);
    // modules.dep is acyclic; the depth bound only guards against a corrupt file.
    if placed.contains(&name) || builtin.contains(&name) || depth > 64 {
        return Ok(());
    }
    let Some((path, needs)) = deps.get(&name) else {
        return Err(MissingModule(name));
    };
    // modprobe loads a module's dependencies from the end of its modules.dep line.
    for need in needs.iter().rev() {
        place(need, deps, builtin, placed, order, depth + 1)?;
    }
    if placed.insert(name) {
        order.push(path.clone());
    }
    Ok(())
}

/// A `newc` cpio archive being written into memory.
#[derive(Debug, Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Cpio {
        Cpio::default()
    }

    /// Adds a directory (its parents must have been added first).
    pub fn directory(&mut self, name: &str, mode: u32) {
        self.entry(name, libc::S_IFDIR | mode, 2, (0, 0), &[]);
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, libc::S_IFREG | mode, 1, (0, 0), data);
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, libc::S_IFCHR | mode, 1, (major, minor), &[]);
    }

    /// Ends the archive with its trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.bytes
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let inode = if name == "TRAILER!!!" {
            0
        } else {
            self.next_inode
        };
        // magic, then 13 eight-digit hex fields: ino, mode, uid, gid, nlink, mtime,
        // filesize, devmajor, devminor, rdevmajor, rdevminor, namesize (with its NUL),
        // check.
        let fields = [
            inode,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Header plus name, and data, each end on a multiple of four bytes.
    fn pad(&mut self) {
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
    }
}

/// The initramfs: `agent` as `/init`, and `modules` (file name in the archive, contents)
/// in load order, listed in [`MODULE_LIST`].
pub fn build(agent: &[u8], modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut cpio = Cpio::new();
    for dir in ["dev", "proc", "root"] {
        cpio.directory(dir, 0o755);
    }
    // The kernel opens /dev/console for init's standard streams before /init runs.
    cpio.char_device("dev/console", 0o600, 5, 1);
    let ours = INITRAMFS_DIR.trim_start_matches('/');
    cpio.directory(ours, 0o755);
    let mut list = String::new();
    for (name, data) in modules {
        let path = format!("{INITRAMFS_DIR}/{name}");
        cpio.file(path.trim_start_matches('/'), 0o644, data);
        list.push_str(&path);
        list.push('\n');
    }
    cpio.file(MODULE_LIST.trim_start_matches('/'), 0o644, list.as_bytes());
    cpio.file("init", 0o755, agent);
    cpio.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Abridged from Debian 12's 6.1 cloud kernel.
    const DEP: &str = "\
kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/fs/fuse/fuse.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/overlayfs/overlay.ko:
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\nkernel/lib/crc16.ko\n";

    fn position(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|p| module_name(p) == name)
            .unwrap_or_else(|| panic!("{name} missing from {order:?}"))
    }

    #[test]
    fn modules_come_after_their_dependencies_each_once() {
        let order = load_order(DEP, BUILTIN, WANTED_MODULES).expect("order");
        assert_eq!(order.len(), 9, "{order:?}");
        let unique: HashSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len());
        for (module, needs) in [
            (
                "virtio_pci",
                &[
                    "virtio",
                    "virtio_ring",
                    "virtio_pci_legacy_dev",
                    "virtio_pci_modern_dev",
                ][..],
            ),
            ("virtio_blk", &["virtio", "virtio_ring"][..]),
            ("virtio_console", &["virtio", "virtio_ring"][..]),
            ("virtio_rng", &["virtio", "virtio_ring"][..]),
        ] {
            for need in needs {
                assert!(
                    position(&order, need) < position(&order, module),
                    "{need} before {module}: {order:?}"
                );
            }
        }
        assert!(order.contains(&"kernel/drivers/char/hw_random/virtio-rng.ko".to_string()));
        assert!(!order.iter().any(|p| p.contains("fuse")));
    }

    #[test]
    fn built_in_modules_are_skipped_and_unknown_ones_refused() {
        let order = load_order(DEP, BUILTIN, &["ext4", "virtio-blk"]).expect("order");
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/block/virtio_blk.ko"
            ]
        );
        let err = load_order(DEP, BUILTIN, &["virtio_gpu"]).expect_err("unknown");
        assert_eq!(err.0, "virtio_gpu");
    }

    #[test]
    fn module_names_ignore_directories_suffixes_and_dashes() {
        assert_eq!(module_name("kernel/a/virtio-rng.ko"), "virtio_rng");
        assert_eq!(module_name("kernel/a/virtio_blk.ko.xz"), "virtio_blk");
        assert_eq!(module_name("ext4"), "ext4");
    }

    /// One archive entry read back: name, mode, (rdevmajor, rdevminor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Reads a newc archive back, trailer included.
    fn parse(mut bytes: &[u8]) -> Vec<Entry> {
        let align = |n: usize| n.next_multiple_of(4);
        let mut entries = Vec::new();
        loop {
            assert_eq!(&bytes[..6], b"070701", "magic");
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).expect("ascii");
                u32::from_str_radix(text, 16).expect("hex")
            };
            let (mode, size, rdev) = (field(1), field(6) as usize, (field(9), field(10)));
            let name_size = field(11) as usize;
            assert_eq!(field(12), 0, "check");
            let name = std::str::from_utf8(&bytes[110..110 + name_size - 1])
                .expect("name")
                .to_string();
            assert_eq!(bytes[110 + name_size - 1], 0, "name ends with NUL");
            let data_start = align(110 + name_size);
            let data = bytes[data_start..data_start + size].to_vec();
            bytes = &bytes[align(data_start + size)..];
            let end = name == "TRAILER!!!";
            entries.push((name, mode, rdev, data));
            if end {
                assert!(bytes.is_empty(), "nothing after the trailer");
                return entries;
            }
        }
    }

    #[test]
    fn cpio_entries_read_back_aligned() {
        let mut cpio = Cpio::new();
        cpio.directory("d", 0o755);
        cpio.file("d/f", 0o644, b"hello");
        cpio.file("empty", 0o600, b"");
        cpio.char_device("console", 0o600, 5, 1);
        let bytes = cpio.finish();
        assert!(bytes.len().is_multiple_of(4));
        let entries = parse(&bytes);
        let summary: Vec<_> = entries
            .iter()
            .map(|(n, m, r, d)| (n.as_str(), *m, *r, d.as_slice()))
            .collect();
        assert_eq!(
            summary,
            [
                ("d", libc::S_IFDIR | 0o755, (0, 0), &b""[..]),
                ("d/f", libc::S_IFREG | 0o644, (0, 0), &b"hello"[..]),
                ("empty", libc::S_IFREG | 0o600, (0, 0), &b""[..]),
                ("console", libc::S_IFCHR | 0o600, (5, 1), &b""[..]),
                ("TRAILER!!!", 0, (0, 0), &b""[..]),
            ]
        );
    }

    #[test]
    fn initramfs_has_init_the_modules_and_their_list() {
        let modules = vec![
            ("00-virtio.ko".to_string(), b"one".to_vec()),
            ("01-virtio_blk.ko".to_string(), b"two".to_vec()),
        ];
        let entries = parse(&build(b"\x7fELF agent", &modules));
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.0 == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        let init = find("init");
        assert_eq!(init.1, libc::S_IFREG | 0o755);
        assert_eq!(init.3, b"\x7fELF agent");
        assert_eq!(find("dev/console").2, (5, 1));
        assert_eq!(find("contractor/01-virtio_blk.ko").3, b"two");
        let list = String::from_utf8(find("contractor/modules").3.clone()).expect("utf8");
        assert_eq!(
            list,
            "/contractor/00-virtio.ko\n/contractor/01-virtio_blk.ko\n"
        );
        // Every entry's parent directory comes before it.
        for (i, (name, ..)) in entries.iter().enumerate() {
            if let Some((parent, _)) = name.rsplit_once('/') {
                assert!(entries[..i].iter().any(|e| e.0 == parent), "{name}");
            }
        }
    }
}
