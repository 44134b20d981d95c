//! Shared harness of the integration tests: finds the test image, builds a private base disk
//! from it, runs the real `contractor-vm` binary, and makes sure no VM outlives a test.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use contractor_protocol::vm::VmResult;

pub const URI: &str = "qemu:///system";

/// The binary under test.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_contractor-vm"));
    cmd.env_remove("CONTRACTOR_LIBVIRT_URI");
    cmd
}

/// Runs the binary with `args` and no stdin.
pub fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run contractor-vm")
}

/// The single result object a successful run printed.
pub fn result(output: &Output) -> VmResult {
    assert!(
        output.status.success(),
        "contractor-vm failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one line on stdout: {stdout}"
    );
    serde_json::from_str(&stdout).expect("stdout is one VmResult")
}

pub fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .expect("virsh is installed (libvirt-clients)")
}

/// Fails the test unless libvirt answers at qemu:///system.
pub fn require_libvirt() {
    let out = Command::new("virsh").args(["-c", URI, "version"]).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "libvirt is not reachable at {URI}: {}\nStart it as root with \
             `mkdir -p /var/log/libvirt /var/run/libvirt; virtlogd -d; libvirtd -d`",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            panic!("cannot run virsh ({e}): install libvirt-clients and libvirt-daemon-system")
        }
    }
}

/// A private copy of the test image in a fresh directory under /var/tmp (mode 0755, so that
/// QEMU's user can read it), deleted with the fixture.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The fixture, or `None` (with a loud message) when the test image is missing and
/// CONTRACTOR_REQUIRE_VM is unset. Fails when libvirt is unreachable.
pub fn fixture(test: &str) -> Option<Fixture> {
    let kernel = env_path("CONTRACTOR_TEST_KERNEL", "/tmp/img/vmlinuz");
    let initrd = env_path("CONTRACTOR_TEST_INITRD", "/tmp/img/initrd.img");
    let rootfs = env_path("CONTRACTOR_TEST_ROOTFS", "/tmp/img/root.ext2");
    let missing: Vec<_> = [&kernel, &initrd, &rootfs]
        .into_iter()
        .filter(|p| !p.is_file())
        .collect();
    if !missing.is_empty() {
        let message = format!(
            "test image missing: {missing:?} (set CONTRACTOR_TEST_KERNEL, CONTRACTOR_TEST_INITRD, \
             CONTRACTOR_TEST_ROOTFS)"
        );
        if std::env::var_os("CONTRACTOR_REQUIRE_VM").is_some() {
            panic!("{message}, and CONTRACTOR_REQUIRE_VM is set");
        }
        // To the stderr handle: libtest captures eprintln!.
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("\n!!!!!!!! SKIPPED {test}: {message} !!!!!!!!\n\n"),
        );
        return None;
    }
    require_libvirt();
    std::fs::create_dir_all("/var/tmp").expect("/var/tmp");
    let dir = tempfile::Builder::new()
        .prefix("contractor-vm-test-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Copies, so that libvirt's relabelling of the files a VM uses never touches the originals.
    let base = dir.path().join("base.qcow2");
    let status = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&rootfs)
        .arg(&base)
        .status()
        .expect("qemu-img");
    assert!(status.success(), "qemu-img convert failed");
    let copy = |from: &Path, name: &str| {
        let to = dir.path().join(name);
        std::fs::copy(from, &to).expect("copy boot file");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        to
    };
    let kernel = copy(&kernel, "vmlinuz");
    let initrd = copy(&initrd, "initrd.img");
    Some(Fixture {
        dir,
        base,
        kernel,
        initrd,
    })
}

impl Fixture {
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The flags of `create` for a small TCG VM named `name`.
    pub fn create_args(&self, name: &str) -> Vec<String> {
        vec![
            "create".into(),
            "--uri".into(),
            URI.into(),
            "--name".into(),
            name.into(),
            "--disk".into(),
            self.base.display().to_string(),
            "--kernel".into(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            self.initrd.display().to_string(),
            "--work-dir".into(),
            self.work_dir().display().to_string(),
            "--accel".into(),
            "tcg".into(),
            "--cpus".into(),
            "1".into(),
            "--memory-mib".into(),
            "512".into(),
        ]
    }
}

/// A fresh VM name for a test.
pub fn vm_name(tag: &str) -> String {
    let mut bytes = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("contractor-test-{tag}-{hex}")
}

/// Destroys the VM when dropped, so that a failing test leaves no VM behind.
pub struct VmGuard(pub String);

impl Drop for VmGuard {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
    }
}

/// True when libvirt knows a domain called `name`.
pub fn vm_exists(name: &str) -> bool {
    let out = virsh(&["list", "--all", "--name"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == name)
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// `sha256sum` of a file.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}
