//! Shared harness of the end-to-end tests: temporary projects, running `contractor build`,
//! reading the build record with the protocol's types (which reject unknown fields), and
//! checking that nothing of a build is left in libvirt or on disk.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use contractor_protocol::result::BuildResult;

/// The directory of the workspace's binaries: the test executable runs from
/// `target/<profile>/deps/`, the binaries sit in `target/<profile>/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("deps/");
    deps.parent().expect("the profile directory").to_path_buf()
}

/// The `contractor` executable (run `cargo build --workspace` first; scripts/test does).
pub fn contractor() -> PathBuf {
    let path = bin_dir().join("contractor");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` before these tests (scripts/test does)",
        path.display()
    );
    path
}

/// Why this machine cannot run VM tests, if it cannot: libvirt unreachable, QEMU or the
/// built binaries missing.
pub fn no_vm_reason() -> Option<String> {
    static REASON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REASON
        .get_or_init(|| {
            if !bin_dir().join("contractor-vm").is_file() {
                return Some(format!(
                    "the tools are not built in {} (cargo build --workspace)",
                    bin_dir().display()
                ));
            }
            let uri = contractor_protocol::vm::default_uri();
            match Command::new("virsh").args(["-c", &uri, "uri"]).output() {
                Ok(out) if out.status.success() => None,
                Ok(out) => Some(format!(
                    "libvirt at {uri} is unreachable: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => Some(format!("virsh cannot run ({e})")),
            }
        })
        .clone()
}

/// Call first in every test that boots a VM: true when the test must skip, after saying so
/// on stderr in a way libtest does not capture. With CONTRACTOR_REQUIRE_VM=1 (scripts/test,
/// CI) a machine without VMs fails the test instead.
pub fn skip_without_vm(test: &str) -> bool {
    let Some(reason) = no_vm_reason() else {
        return false;
    };
    if std::env::var_os("CONTRACTOR_REQUIRE_VM").is_some_and(|v| v == "1") {
        panic!("{test} needs a VM and CONTRACTOR_REQUIRE_VM=1, but {reason}");
    }
    // Written to the stderr handle, not with eprintln!, which libtest would capture.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs a VM, but {reason} (scripts/test runs it)"
    );
    true
}

/// A project directory with a `contractor.toml`.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(spec: &str) -> Project {
        let dir = tempfile::tempdir().expect("temp project dir");
        std::fs::write(dir.path().join("contractor.toml"), spec).expect("write spec");
        Project { dir }
    }

    /// examples/hello, copied.
    pub fn hello() -> Project {
        Project::example("hello", &["hello.c", "Makefile"])
    }

    /// examples/NAME (its contractor.toml and `files`), copied.
    pub fn example(name: &str, files: &[&str]) -> Project {
        let example = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name);
        let project = Project::new(
            &std::fs::read_to_string(example.join("contractor.toml")).expect("example spec"),
        );
        for file in files {
            let to = project.path().join(file);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::copy(example.join(file), to).expect("copy example");
        }
        project
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn build(&self) -> Build {
        self.build_with(&[])
    }

    /// `contractor build ARGS` in the project.
    pub fn build_with(&self, args: &[&str]) -> Build {
        let record = self.path().join(".contractor/latest");
        let output = Command::new(contractor())
            .arg("build")
            .args(args)
            .current_dir(self.path())
            .output()
            .expect("run contractor build");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let result_text = std::fs::read_to_string(record.join("result.json"))
            .unwrap_or_else(|e| panic!("no result.json ({e}); stderr:\n{stderr}"));
        let result: BuildResult =
            serde_json::from_str(&result_text).expect("result.json matches the protocol");
        // The record itself, not `latest`, which moves on with the next build.
        let record = self.path().join(".contractor/builds").join(&result.id);
        Build {
            output,
            stderr,
            result,
            record,
        }
    }
}

pub struct Build {
    pub output: Output,
    pub stderr: String,
    pub result: BuildResult,
    pub record: PathBuf,
}

impl Build {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.result.log).expect("build log")
    }

    /// The VM's name, from the progress line `VM contractor-... started`.
    pub fn vm_name(&self) -> String {
        vm_name_in(&self.stderr).unwrap_or_else(|| panic!("no VM line in stderr:\n{}", self.stderr))
    }
}

/// The VM's name in `contractor build`'s stderr, once it has started.
pub fn vm_name_in(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|l| {
        l.strip_prefix("contractor: VM ")
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    })
}

/// Reads the build record `result.json` of the newest build of `project`.
pub fn latest_result(project: &Path) -> BuildResult {
    let path = project.join(".contractor/latest/result.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("result.json matches the protocol")
}

pub fn small_spec(script: &str, extra_build: &str) -> String {
    format!("[build]\nscript = '''\n{script}\n'''\n{extra_build}\n[vm]\ncpus = 1\nmemory = \"768MiB\"\n")
}

pub fn libvirt_domains() -> String {
    let uri = contractor_protocol::vm::default_uri();
    let out = Command::new("virsh")
        .args(["-c", &uri, "list", "--all", "--name"])
        .output()
        .expect("virsh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How long a VM may take to go after its build returned: `contractor build` does not wait
/// for libvirt's confirmation, its VM holder finishes the destroy alone (a guard against a
/// VM that never goes, not a measurement: it takes well under a second here).
pub const VM_GONE: std::time::Duration = std::time::Duration::from_secs(30);

/// Asserts the build's VM is gone from libvirt and its overlay from the disk, within
/// [`VM_GONE`] of the build's return.
///
/// A VM restored from a snapshot has the name of the snapshot's slot, which the next build
/// of the same shape (another test, running at the same time) may be using already: a
/// domain of that name counts as left behind only when its owner, recorded in its
/// metadata, is gone (or is the build's own holder, still destroying it).
pub fn assert_no_vm_left(build: &Build) {
    let name = build.vm_name();
    let overlay = overlay_of(&name);
    assert!(
        wait_vm_gone(&name),
        "VM {name} or its overlay {} left behind {VM_GONE:?} after the build",
        overlay.display()
    );
}

/// Whether VM `name` and its overlay are gone (or its slot reused) within [`VM_GONE`].
pub fn wait_vm_gone(name: &str) -> bool {
    let overlay = overlay_of(name);
    let deadline = std::time::Instant::now() + VM_GONE;
    loop {
        let domain = libvirt_domains().lines().any(|l| l.trim() == name);
        if (!domain && !overlay.exists()) || (reused_slot(name) && !holder_destroys(name)) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Whether the owner of domain `name` is a `contractor-vm` that has let go of it (a session
/// of its own, see docs/protocol.md's `create --hold`), so still destroying it.
fn holder_destroys(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let session = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(4))
            .and_then(|sid| sid.parse::<u32>().ok());
        session == Some(pid)
    })
}

/// The overlay file VM `name` has while it runs.
pub fn overlay_of(name: &str) -> PathBuf {
    contractor_cli::paths::data_dir()
        .expect("data dir")
        .join("vms")
        .join(format!("{name}.qcow2"))
}

/// Whether a VM named `name` is still there after its build ended (see
/// [`assert_no_vm_left`] for a snapshot slot's name in use by another build).
pub fn vm_left_behind(name: &str) -> bool {
    libvirt_domains().lines().any(|l| l.trim() == name) && !reused_slot(name)
}

/// Whether `name` is a snapshot slot's that another, running build has restored by now.
pub fn reused_slot(name: &str) -> bool {
    name.starts_with("contractor-snap-") && owner_is_alive(name)
}

/// Whether domain `name` exists and the process its metadata names as owner is running.
pub fn owner_is_alive(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// The pid domain `name`'s metadata names as its owner, if it exists.
fn owner_pid(name: &str) -> Option<u32> {
    let uri = contractor_protocol::vm::default_uri();
    let out = Command::new("virsh")
        .args(["-c", &uri, "dumpxml", name])
        .output()
        .expect("virsh");
    let xml = String::from_utf8_lossy(&out.stdout);
    // libvirt writes the metadata element back with either quote.
    xml.split("owner pid=")
        .nth(1)
        .and_then(|rest| rest.get(1..))
        .and_then(|rest| rest.split(['\'', '"']).next())
        .and_then(|pid| pid.parse::<u32>().ok())
}

/// `contractor build --json` in `project`: the VM's snapshot report (from `vm_started`),
/// the result, and stderr.
pub fn build_json(
    project: &Project,
) -> (
    Option<contractor_protocol::vm::SnapshotReport>,
    BuildResult,
    String,
) {
    use contractor_protocol::build::BuildEvent;
    let output = Command::new(contractor())
        .args(["build", "--json"])
        .current_dir(project.path())
        .output()
        .expect("run contractor build --json");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut snapshot = None;
    let mut result = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        match serde_json::from_str::<BuildEvent>(line) {
            Ok(BuildEvent::VmStarted { snapshot: s, .. }) => snapshot = s,
            Ok(BuildEvent::Finished { result: r }) => result = Some(r),
            _ => {}
        }
    }
    let result = result.unwrap_or_else(|| panic!("no finished event; stderr:\n{stderr}"));
    (snapshot, result, stderr)
}

pub fn sha256(path: &Path) -> String {
    contractor_vm::image::sha256_file(path).expect("sha256")
}

/// Runs `program` with `args` and returns its stdout; a failure panics with its output.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `git` with `args` in the work tree `dir`, as a test author; its stdout, trimmed.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
