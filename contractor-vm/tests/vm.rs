//! The real binary against the real libvirt (qemu:///system, TCG): create, status, destroy,
//! hold. See tests/util/mod.rs for where the test image comes from.

mod util;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use contractor_protocol::vm::{Accel, VmInfo, VmResult};
use util::*;

fn expect_vm(result: VmResult) -> VmInfo {
    match result {
        VmResult::Vm { version: 1, vm } => vm,
        other => panic!("expected a vm result, got {other:?}"),
    }
}

#[test]
fn create_status_destroy_leaves_nothing_and_base_untouched() {
    let Some(fx) = fixture("create_status_destroy_leaves_nothing_and_base_untouched") else {
        return;
    };
    let base_sha = sha256(&fx.base);
    let name = vm_name("life");
    let _guard = VmGuard(name.clone());
    let args = fx.create_args(&name);
    let started = Instant::now();
    let vm = expect_vm(result(&run(&args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())));
    eprintln!(
        "create to running: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(vm.name, name);
    assert_eq!(vm.state, "running");
    assert_eq!(vm.accel, Some(Accel::Tcg));
    let overlay = vm.overlay.clone().expect("overlay reported");
    assert_eq!(overlay, fx.work_dir().join(format!("{name}.qcow2")));
    assert!(overlay.exists());
    for socket in [&vm.control_socket, &vm.tunnel_socket] {
        let socket = socket.as_deref().expect("socket reported");
        assert!(socket.exists(), "{} exists", socket.display());
    }

    let xml = virsh(&["dumpxml", &name]);
    let xml = String::from_utf8_lossy(&xml.stdout);
    assert!(xml.contains("<domain type='qemu'"), "{xml}");
    assert!(!xml.contains("<interface"), "no network interface: {xml}");
    assert!(
        xml.contains("https://contractor.invalid/vm/1"),
        "owner metadata: {xml}"
    );

    let status = expect_vm(result(&run(&["status", "--uri", URI, "--name", &name])));
    assert_eq!(status.state, "running");
    assert_eq!(status.control_socket, vm.control_socket);
    match result(&run(&["list", "--uri", URI])) {
        VmResult::List { vms, .. } => assert!(vms.iter().any(|v| v.name == name)),
        other => panic!("expected a list, got {other:?}"),
    }

    // Let the guest run (and write to its disk) for a moment.
    let console = fx.work_dir().join(format!("{name}.console.log"));
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::metadata(&console)
            .is_ok_and(|m| m.len() > 1000)),
        "the guest wrote to its console log {}",
        console.display()
    );

    let destroyed = result(&run(&["destroy", "--uri", URI, "--name", &name]));
    assert_eq!(
        destroyed,
        VmResult::Destroyed {
            version: 1,
            name: name.clone()
        }
    );
    assert!(!vm_exists(&name), "gone from virsh list --all");
    assert!(!overlay.exists(), "overlay deleted");
    assert_eq!(
        sha256(&fx.base),
        base_sha,
        "the base disk was never written"
    );

    let again = run(&["destroy", "--uri", URI, "--name", &name]);
    assert_eq!(
        again.status.code(),
        Some(2),
        "destroying a missing VM is bad input"
    );
    assert!(again.stdout.is_empty());
}

fn spawn_held(fx: &Fixture, name: &str) -> (std::process::Child, VmInfo) {
    let mut child = bin()
        .args(fx.create_args(name))
        .arg("--hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read result");
    let vm = match serde_json::from_str(&line) {
        Ok(r) => expect_vm(r),
        Err(e) => panic!("bad result line {line:?}: {e}"),
    };
    assert_eq!(vm.state, "running");
    assert!(vm_exists(name));
    (child, vm)
}

fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("held contractor-vm did not exit");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn held_vm_is_destroyed_when_stdin_closes() {
    let Some(fx) = fixture("held_vm_is_destroyed_when_stdin_closes") else {
        return;
    };
    let name = vm_name("hold");
    let _guard = VmGuard(name.clone());
    let (mut child, vm) = spawn_held(&fx, &name);
    std::thread::sleep(Duration::from_secs(1));
    assert!(vm_exists(&name), "held while stdin is open");
    drop(child.stdin.take());
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status}");
    assert!(!vm_exists(&name));
    assert!(
        !vm.overlay.as_deref().is_some_and(Path::exists),
        "overlay deleted"
    );
}

#[test]
fn held_vm_is_destroyed_on_sigterm() {
    let Some(fx) = fixture("held_vm_is_destroyed_on_sigterm") else {
        return;
    };
    let name = vm_name("term");
    let _guard = VmGuard(name.clone());
    let (mut child, vm) = spawn_held(&fx, &name);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(130), "interrupted");
    assert!(!vm_exists(&name));
    assert!(
        !vm.overlay.as_deref().is_some_and(Path::exists),
        "overlay deleted"
    );
}

#[test]
fn killed_holder_leaves_no_running_vm() {
    let Some(fx) = fixture("killed_holder_leaves_no_running_vm") else {
        return;
    };
    let name = vm_name("kill");
    let _guard = VmGuard(name.clone());
    let (mut child, _vm) = spawn_held(&fx, &name);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(
        wait_for(Duration::from_secs(20), || !vm_exists(&name)),
        "libvirt autodestroys the VM when its connection closes"
    );
    // The overlay stays behind (nobody was left to delete it); the fixture dir removes it.
}

#[test]
fn missing_kernel_is_bad_input_naming_the_path() {
    let Some(fx) = fixture("missing_kernel_is_bad_input_naming_the_path") else {
        return;
    };
    let name = vm_name("nokernel");
    let _guard = VmGuard(name.clone());
    let mut args = fx.create_args(&name);
    let at = args.iter().position(|a| a == "--kernel").expect("--kernel") + 1;
    args[at] = "/nonexistent/vmlinuz".into();
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/vmlinuz"), "{stderr}");
    assert!(!vm_exists(&name));
    assert!(
        !fx.work_dir().join(format!("{name}.qcow2")).exists(),
        "no overlay left"
    );
}

#[test]
fn explicit_kvm_on_a_cpu_without_the_flag_is_refused_before_libvirt_starts_anything() {
    let Some(fx) =
        fixture("explicit_kvm_on_a_cpu_without_the_flag_is_refused_before_libvirt_starts_anything")
    else {
        return;
    };
    use contractor_vm::accel::{cpuinfo_has_virt, read_cpuinfo};
    if cpuinfo_has_virt(&read_cpuinfo()) {
        eprintln!(
            "\n!!!!!!!! SKIPPED: this CPU has vmx/svm; the refusal needs one without !!!!!!!!\n"
        );
        return;
    }
    let name = vm_name("kvm");
    let _guard = VmGuard(name.clone());
    let mut args = fx.create_args(&name);
    let at = args.iter().position(|a| a == "--accel").expect("--accel") + 1;
    args[at] = "kvm".into();
    args.push("--json-errors".into());
    let out = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let error: contractor_protocol::error::ErrorObject =
        serde_json::from_str(&stdout).expect("one error object");
    assert_eq!(error.code.as_str(), "kvm_unusable", "{error:?}");
    assert!(
        error.chain[0].starts_with("cannot use KVM: this CPU has no vmx or svm flag")
            && error.chain[0].ends_with("or use --accel tcg (software emulation, slower)"),
        "{error:?}"
    );
    assert!(!vm_exists(&name));
    assert!(
        !fx.work_dir().join(format!("{name}.qcow2")).exists(),
        "no overlay made"
    );
}

#[test]
fn reap_destroys_vms_whose_owner_exited() {
    let Some(fx) = fixture("reap_destroys_vms_whose_owner_exited") else {
        return;
    };
    let name = vm_name("reap");
    let _guard = VmGuard(name.clone());
    // The VM belongs to the calling process: here a shell that exits right away.
    let quoted: Vec<String> = fx
        .create_args(&name)
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let script = format!(
        "'{}' {}",
        env!("CARGO_BIN_EXE_contractor-vm"),
        quoted.join(" ")
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    let vm = expect_vm(result(&out));
    assert!(vm_exists(&name));
    match result(&run(&["reap", "--uri", URI])) {
        VmResult::List { vms, .. } => {
            let reaped = vms
                .iter()
                .find(|v| v.name == name)
                .expect("our VM was reaped");
            assert_eq!(reaped.state, "destroyed");
        }
        other => panic!("expected a list, got {other:?}"),
    }
    assert!(!vm_exists(&name));
    assert!(
        !vm.overlay.as_deref().is_some_and(Path::exists),
        "overlay deleted"
    );
}

#[test]
fn unreachable_libvirt_is_an_infrastructure_error() {
    let out = run(&[
        "list",
        "--uri",
        "qemu+unix:///system?socket=/nonexistent/sock",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("libvirtd -d") && stderr.contains("/nonexistent/sock"),
        "{stderr}"
    );
}

#[test]
fn bad_json_is_bad_input() {
    let mut child = bin()
        .args(["list", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"{\"type\": \"list\",\n \"version\": 1,\n oops}")
            .expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
}

#[test]
fn help_shows_an_example_request() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains(r#""type": "create""#), "{help}");
}

#[test]
fn capacity_counts_the_memory_the_kernel_can_give_back_not_only_the_free() {
    require_libvirt();
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .expect("meminfo field")
            / 1024
    };
    let available = field("MemAvailable:");
    let out = run(&["capacity", "--uri", URI]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: contractor_protocol::hosted::CapacityReport =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap_or_default())
            .expect("one capacity line");
    let contractor_protocol::hosted::CapacityReport::Capacity {
        free_memory_mib, ..
    } = report;
    // The page cache is given back on demand: a host whose memory is mostly cache has room.
    // (Where the cache is small, MemFree alone is about as large and this holds either way.)
    assert!(
        free_memory_mib >= available / 2,
        "capacity says {free_memory_mib} MiB free, the kernel says {available} MiB available"
    );
}
