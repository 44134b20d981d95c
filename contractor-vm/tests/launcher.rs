//! The QEMU launcher, `contractor-qemu`, run for real: it refuses a domain without a policy
//! and a policy that does not parse (naming the field), and the QEMU it executes reaches the
//! files its policy grants and no other, not even a sibling of a granted file.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const LAUNCHER: &str = env!("CARGO_BIN_EXE_contractor-qemu");
const QEMU: &str = "/usr/bin/qemu-system-x86_64";

fn launcher(policy: Option<&str>, args: &[&str], stdin: &str) -> Output {
    let mut command = Command::new(LAUNCHER);
    command
        .args(args)
        .env_remove("CONTRACTOR_QEMU_POLICY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(policy) = policy {
        command.env("CONTRACTOR_QEMU_POLICY", policy);
    }
    let mut child = command.spawn().expect("start contractor-qemu");
    let mut input = child.stdin.take().expect("stdin");
    // QEMU may exit before it reads: a broken pipe is not this test's concern.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    child.wait_with_output().expect("wait")
}

fn policy(kernel: &Path) -> String {
    format!(
        r#"{{"version":1,"qemu":"{QEMU}","accel":"tcg","memory_mib":64,"image_disk":"/nonexistent/disk.qcow2","kernel":"{}","overlay":{{"path":"/nonexistent/o.qcow2","max_bytes":1048576}}}}"#,
        kernel.display()
    )
}

/// QEMU confined by `policy` (no machine, stopped) with one more `option value` (a
/// `-chardev`, a `-blockdev`), quit at once over QMP.
fn stopped_qemu(policy: &str, option: &str, value: &str) -> Output {
    launcher(
        Some(policy),
        &[
            "-name",
            "guest=contractor-test",
            "-machine",
            "none",
            "-display",
            "none",
            "-nodefaults",
            "-S",
            option,
            value,
            "-qmp",
            "stdio",
        ],
        "{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n",
    )
}

/// [`stopped_qemu`] under the usual policy with one `-chardev`.
fn qemu_with_chardev(kernel: &Path, chardev: &str) -> Output {
    stopped_qemu(&policy(kernel), "-chardev", chardev)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_domain_without_a_policy_is_refused_and_qemu_never_runs() {
    let output = launcher(None, &["-name", "guest=contractor-x", "-version"], "");
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("refusing to start QEMU"), "{text}");
    assert!(text.contains("CONTRACTOR_QEMU_POLICY"), "{text}");
    assert!(output.stdout.is_empty(), "QEMU ran: {:?}", output.stdout);
}

#[test]
fn a_bad_policy_is_refused_naming_the_field() {
    let bad = r#"{"version":1,"qemu":"/usr/bin/qemu-system-x86_64","accel":"tgc"}"#;
    let output = launcher(Some(bad), &["-version"], "");
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("in `accel`"), "{text}");
    assert!(output.stdout.is_empty(), "QEMU ran: {:?}", output.stdout);
}

#[test]
fn confined_qemu_reads_what_the_policy_grants_and_not_its_neighbour() {
    if !Path::new(QEMU).exists() {
        // To the stderr handle: libtest captures eprintln!.
        let _ =
            std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: no {QEMU}\n"));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let granted = dir.path().join("vmlinuz");
    let neighbour = dir.path().join("secret");
    std::fs::write(&granted, vec![0u8; 65536]).expect("write");
    std::fs::write(&neighbour, vec![0u8; 65536]).expect("write");
    let policy = policy(&granted);
    let run = |file: &Path| {
        let blockdev = format!(
            "driver=file,filename={},node-name=d,read-only=on",
            file.display()
        );
        stopped_qemu(&policy, "-blockdev", &blockdev)
    };
    let allowed = run(&granted);
    assert!(
        allowed.status.success(),
        "QEMU could not use the granted file: {}",
        stderr(&allowed)
    );
    let refused = run(&neighbour);
    assert!(
        !refused.status.success(),
        "QEMU opened a file it was not granted"
    );
    let text = stderr(&refused);
    assert!(text.contains("Permission denied"), "{text}");
}

#[test]
fn the_capability_probe_runs_qemu_with_a_warning() {
    if !Path::new(QEMU).exists() {
        // To the stderr handle: libtest captures eprintln!.
        let _ =
            std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: no {QEMU}\n"));
        return;
    }
    let output = launcher(None, &["-machine", "none", "-version"], "");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("QEMU emulator version"));
    assert!(
        stderr(&output).contains("capability probe"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn confined_qemu_cannot_connect_to_a_unix_socket_of_the_user() {
    if !Path::new(QEMU).exists() {
        // To the stderr handle: libtest captures eprintln!.
        let _ =
            std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: no {QEMU}\n"));
        return;
    }
    // Landlock does not govern connect(2) to a Unix socket by path; QEMU's policy refuses
    // every new socket (a seccomp filter on socket(2)), so QEMU cannot reach, say,
    // libvirt's session daemon.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("user-service.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"k").expect("write");
    let output = qemu_with_chardev(&kernel, &format!("socket,id=c,path={}", path.display()));
    assert!(
        !output.status.success(),
        "QEMU connected to {}",
        path.display()
    );
    let text = stderr(&output);
    assert!(text.contains("Permission denied"), "{text}");
    assert!(
        listener.accept().is_err(),
        "the user's socket saw a connection from confined QEMU"
    );
}

#[test]
fn confined_qemu_cannot_open_a_terminal_of_the_user_nor_make_a_pty() {
    if !Path::new(QEMU).exists() {
        // To the stderr handle: libtest captures eprintln!.
        let _ =
            std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: no {QEMU}\n"));
        return;
    }
    // A terminal of this test's own, as a user's other terminals are: a QEMU taken over by
    // its guest must not read its keystrokes or write into it.
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let tty = nix::unistd::ttyname(&pty.slave).expect("ttyname");
    assert!(tty.starts_with("/dev/pts/"), "{}", tty.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"k").expect("write");
    let run = |chardev: &str| qemu_with_chardev(&kernel, chardev);
    // A chardev QEMU may still use: the launcher lets an ordinary QEMU start.
    let null = run("null,id=c");
    assert!(null.status.success(), "{}", stderr(&null));
    for chardev in [
        format!("tty,id=c,path={}", tty.display()),
        "pty,id=c".into(),
    ] {
        let output = run(&chardev);
        assert!(
            !output.status.success(),
            "QEMU opened a terminal with -chardev {chardev}"
        );
        let text = stderr(&output);
        assert!(text.contains("Permission denied"), "{chardev}: {text}");
    }
}
