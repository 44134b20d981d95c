//! Confinement applied in a child process (this test binary run again with one test
//! selected), which then tries what it must not do and what it must still do.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use contractor_confine::{confine, Policy};

const PROBE: &str = "CONTRACTOR_CONFINE_PROBE";

/// Runs `probe` (the name of a test in this file) in a child process with `dirs` in its
/// environment; the child fails if any of its assertions does.
fn in_child(probe: &str, home: &Path, work: &Path) {
    let exe = std::env::current_exe().expect("own exe");
    let out = Command::new(exe)
        .args([probe, "--exact", "--nocapture", "--test-threads=1"])
        .env(PROBE, "1")
        .env("PROBE_HOME", home)
        .env("PROBE_WORK", work)
        .output()
        .expect("run the probe");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "probe {probe} failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "probe {probe} did not run:\n{text}"
    );
}

fn probing() -> Option<(PathBuf, PathBuf)> {
    std::env::var_os(PROBE)?;
    let dir = |name| PathBuf::from(std::env::var_os(name).expect(name));
    Some((dir("PROBE_HOME"), dir("PROBE_WORK")))
}

/// A home with a secret in it, and a work directory with `ro/input` and an empty `rw/`.
fn home_and_work() -> (tempfile::TempDir, tempfile::TempDir) {
    let home = tempfile::tempdir().expect("home");
    let work = tempfile::tempdir().expect("work");
    std::fs::write(home.path().join("secret"), b"ssh key").expect("secret");
    std::fs::create_dir(work.path().join("ro")).expect("ro");
    std::fs::create_dir(work.path().join("rw")).expect("rw");
    std::fs::write(work.path().join("ro/input"), b"input").expect("input");
    (home, work)
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn a_confined_process_reaches_only_what_its_policy_names() {
    let (home, work) = home_and_work();
    std::os::unix::fs::symlink(home.path().join("secret"), work.path().join("rw/leak"))
        .expect("plant the link");
    in_child("probe_policy", home.path(), work.path());
}

#[test]
fn probe_policy() {
    let Some((home, work)) = probing() else {
        return;
    };
    let allowed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = TcpListener::bind("127.0.0.1:0").expect("bind");
    let allowed_port = allowed.local_addr().expect("addr").port();
    let policy = Policy {
        read: vec![work.join("ro")],
        read_write: vec![work.join("rw")],
        bind_ports: vec![],
        connect_ports: Some(vec![allowed_port]),
        max_open_files: Some(256),
        max_file_size: Some(1 << 20),
        max_address_space: Some(contractor_confine::TOOL_ADDRESS_SPACE),
        allow_exec: false,
        allowed_syscalls: None,
        socket_families: Some(&[libc::AF_INET]),
        stream_sockets_only: true,
    };
    // A service of the user's on a Unix socket (libvirt's session daemon, an SSH agent):
    // Landlock does not govern connect(2) by path, the socket filter does.
    let user_service =
        std::os::unix::net::UnixListener::bind(work.join("user.sock")).expect("a user's socket");
    let report = confine("probe", &policy).expect("confine");
    println!("{report:?}");
    assert!(report.enforced && report.no_new_privs && report.seccomp && report.rlimits);
    assert!(report.landlock_abi >= 1 && report.landlock_fs, "{report:?}");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // Reading /proc/self is refused too; when it is readable, it must say so.
    if !status.is_empty() {
        assert!(status.contains("NoNewPrivs:\t1") && status.contains("Seccomp:\t2"));
    }

    // What it must do.
    assert_eq!(
        std::fs::read(work.join("ro/input")).expect("read input"),
        b"input"
    );
    std::fs::write(work.join("rw/output"), b"out").expect("write output");
    assert_eq!(
        std::fs::read(work.join("rw/output")).expect("read output"),
        b"out"
    );

    // What it must not do: the home, through a path or a planted link.
    let e = std::fs::read(home.join("secret")).expect_err("home is out of reach");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::fs::read(work.join("rw/leak")).expect_err("a link into home");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::fs::write(work.join("ro/new"), b"x").expect_err("read-only");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::fs::write(work.join("elsewhere"), b"x").expect_err("outside");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    // No program can be started.
    let e = Command::new("/bin/true").status().expect_err("execve");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
    // No new namespace.
    let e = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).expect_err("unshare");
    assert_eq!(e, nix::errno::Errno::EPERM);
    // No new socket but TCP over IPv4: not the user's Unix socket, not UDP.
    let e = std::os::unix::net::UnixStream::connect(work.join("user.sock"))
        .expect_err("a Unix socket by path");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::net::UdpSocket::bind("127.0.0.1:0").expect_err("UDP");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    drop(user_service);
    // The address space is bounded: a vector of twice the limit cannot be had.
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_AS).expect("rlimit");
    assert_eq!((soft, hard), (contractor_confine::TOOL_ADDRESS_SPACE, soft));
    let mut big: Vec<u8> = Vec::new();
    let wanted = usize::try_from(2 * contractor_confine::TOOL_ADDRESS_SPACE).expect("64-bit");
    assert!(big.try_reserve_exact(wanted).is_err(), "8 GiB were mapped");

    if report.landlock_net {
        TcpStream::connect(("127.0.0.1", allowed_port)).expect("an allowed port");
        let port = other.local_addr().expect("addr").port();
        let e = TcpStream::connect(("127.0.0.1", port)).expect_err("a port outside the rules");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
        let e = TcpListener::bind("127.0.0.1:0").expect_err("bind");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
    }
}

#[test]
fn a_launcher_may_execute_its_program_and_the_program_stays_confined() {
    let home = tempfile::tempdir().expect("home");
    let work = tempfile::tempdir().expect("work");
    std::fs::write(home.path().join("secret"), b"ssh key").expect("secret");
    in_child("probe_launcher", home.path(), work.path());
}

#[test]
fn probe_launcher() {
    let Some((home, _work)) = probing() else {
        return;
    };
    let policy = Policy {
        read: ["/usr", "/bin", "/lib", "/lib64", "/etc/ld.so.cache"]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
        connect_ports: Some(vec![]),
        allow_exec: true,
        ..Policy::default()
    };
    let report = confine("probe", &policy).expect("confine");
    assert!(report.landlock_fs && report.seccomp, "{report:?}");
    let ran = Command::new("/bin/true")
        .status()
        .expect("execve is allowed");
    assert!(ran.success());
    // The program it starts inherits the rules: the home stays out of reach.
    let out = Command::new("/bin/cat")
        .arg(home.join("secret"))
        .stdin(std::process::Stdio::inherit())
        .output()
        .expect("run cat");
    assert!(!out.status.success(), "cat read the home");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Permission denied"), "{text}");
}

#[test]
fn x32_system_calls_are_refused_before_any_other_rule() {
    let home = tempfile::tempdir().expect("home");
    let work = tempfile::tempdir().expect("work");
    in_child("probe_x32", home.path(), work.path());
}

/// `syscall(nr, a, b, c)`: the result, or the errno it failed with.
fn raw_syscall(nr: libc::c_long, a: usize, b: usize, c: usize) -> Result<libc::c_long, i32> {
    // SAFETY: the calls made here either fail before touching memory (refused by the
    // filter, or unknown to a kernel without x32) or read only the NUL-terminated path
    // passed by pointer, which outlives the call; none writes to this process's memory.
    let r = unsafe { libc::syscall(nr, a, b, c) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

#[test]
fn probe_x32() {
    let Some((_home, work)) = probing() else {
        return;
    };
    const X32: libc::c_long = 0x4000_0000;
    // The x32 numbers of execve and ptrace (x32 has its own); socket and mount are shared.
    const X32_EXECVE: libc::c_long = 520;
    const X32_PTRACE: libc::c_long = 521;
    // A launcher's policy: execve allowed (so the denylist does not name it) and a socket
    // filter, so that each of the three filters is the one that would have let a call by.
    let policy = Policy {
        read: vec![work.clone()],
        connect_ports: Some(vec![]),
        allow_exec: true,
        socket_families: Some(&[libc::AF_INET]),
        stream_sockets_only: true,
        ..Policy::default()
    };
    let report = confine("probe", &policy).expect("confine");
    assert!(report.seccomp, "{report:?}");
    // A Unix socket by the x86_64 number is refused by the socket filter ...
    let e = std::os::unix::net::UnixStream::connect(work.join("none.sock")).expect_err("unix");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    // ... and by the x32 number by the first rule of every filter (without it: a socket
    // where the kernel has x32, ENOSYS where it has not).
    let unix = raw_syscall(
        libc::SYS_socket | X32,
        libc::AF_UNIX as usize,
        libc::SOCK_STREAM as usize,
        0,
    );
    assert_eq!(unix, Err(libc::EPERM), "x32 socket(AF_UNIX)");
    let path = std::ffi::CString::new("/nonexistent/contractor-x32-probe").expect("path");
    for (name, nr) in [
        ("execve", X32_EXECVE),
        ("execve (x86_64 number)", libc::SYS_execve),
        ("ptrace", X32_PTRACE),
        ("mount", libc::SYS_mount),
    ] {
        let called = raw_syscall(nr | X32, path.as_ptr() as usize, 0, 0);
        assert_eq!(called, Err(libc::EPERM), "x32 {name}");
    }
    // The x86_64 execve still passes this launcher's filters (and fails for the path).
    let e = raw_syscall(libc::SYS_execve, path.as_ptr() as usize, 0, 0);
    assert_eq!(e, Err(libc::ENOENT), "execve of a missing file");
}

#[test]
fn an_offline_tool_reaches_its_paths_and_no_network_and_runs_nothing() {
    let (home, work) = home_and_work();
    in_child("probe_offline", home.path(), work.path());
}

#[test]
fn probe_offline() {
    let Some((home, work)) = probing() else {
        return;
    };
    let listening = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listening.local_addr().expect("addr").port();
    let policy = Policy::offline(vec![work.join("ro")], vec![work.join("rw")], 64);
    let report = confine("probe", &policy).expect("confine");
    assert!(report.enforced && report.no_new_privs && report.seccomp && report.rlimits);
    assert!(report.landlock_fs, "{report:?}");

    // Its paths, and nothing else.
    assert_eq!(
        std::fs::read(work.join("ro/input")).expect("read"),
        b"input"
    );
    std::fs::write(work.join("rw/output"), b"out").expect("write output");
    let e = std::fs::read(home.join("secret")).expect_err("home is out of reach");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::fs::write(work.join("ro/new"), b"x").expect_err("read-only");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    // No new socket of any family, so no TCP to a port that listens, no UDP.
    let e = TcpStream::connect(("127.0.0.1", port)).expect_err("TCP");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let e = std::net::UdpSocket::bind("127.0.0.1:0").expect_err("UDP");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    // Runs nothing, and holds few files.
    let e = Command::new("/bin/true").status().expect_err("execve");
    assert_eq!(errno(&e), libc::EPERM, "{e}");
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("rlimit");
    assert!(soft <= 64, "{soft}");
    drop(listening);
}
