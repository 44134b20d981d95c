//! `contractor build --host`: builds on a second host made on this machine — a network
//! namespace with its own address, an sshd of Debian's started in it, a separate user
//! (`contractor-bh`) with its own libvirt session and data directory — compared with the
//! same builds on this machine. Needs root (the namespace, the user, the sshd); skips,
//! saying so, without it.

mod util;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use contractor_protocol::result::{BuildResult, Outcome};
use util::{run, Build, Project};

/// The build host's user.
const USER: &str = "contractor-bh";

/// Call first: true when the test must skip (said on stderr), or when it cannot run here.
fn skip(test: &str) -> bool {
    if util::skip_without_vm(test) {
        return true;
    }
    if !nix::unistd::geteuid().is_root() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: a build host is made with a network namespace, a user and an sshd, which needs root (CI runs it as root)"
        );
        return true;
    }
    false
}

/// The build host's user, with its own data directory under its home.
fn build_host_user() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        if Command::new("id")
            .args(["-u", USER])
            .output()
            .is_ok_and(|o| !o.status.success())
        {
            run("useradd", &["--create-home", "--shell", "/bin/sh", USER]);
        }
        // sshd without PAM refuses a locked account ("!"); "*" is no password, not locked.
        run("usermod", &["-p", "*", USER]);
        let home = PathBuf::from(format!("/home/{USER}"));
        let _ = std::fs::remove_dir_all(home.join(".local/share/contractor/images"));
        home
    })
}

/// Gives the build host this machine's image `name` (built here if it is missing), once
/// per test run, so that it need not build its own; its snapshots are made there.
fn give_image(name: &str) {
    static GIVEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if given.iter().any(|g| g == name) {
        return;
    }
    run(
        &util::contractor().to_string_lossy(),
        &["image", "build", name],
    );
    let local = contractor_cli::paths::data_dir()
        .expect("data dir")
        .join("images")
        .join(name);
    let data = build_host_user().join(".local/share/contractor");
    let images = data.join("images");
    std::fs::create_dir_all(&images).expect("the build host's image directory");
    let to = images.join(name);
    let _ = std::fs::remove_dir_all(&to);
    run(
        "cp",
        &["-a", &local.to_string_lossy(), &to.to_string_lossy()],
    );
    let _ = std::fs::remove_dir_all(to.join("snapshots"));
    run(
        "chown",
        &[
            "-R",
            &format!("{USER}:{USER}"),
            &build_host_user().join(".local").to_string_lossy(),
        ],
    );
    given.push(name.to_string());
}

/// Fixtures alive, and whether IPv4 forwarding was off before the first.
static FORWARDING: Mutex<(u32, Option<String>)> = Mutex::new((0, None));

/// One build host: its namespace and address, its sshd, and the ssh configuration that
/// reaches it (through `$CONTRACTOR_SSH`, a wrapper that adds `-F`).
struct BuildHost {
    namespace: String,
    outer: String,
    subnet: String,
    address: String,
    sshd: Child,
    dir: tempfile::TempDir,
    /// Held while this test's build host lives: the tests share one build host user, so
    /// one libvirt session, whose VMs and room each test checks; they run one at a time so
    /// that no test sees (or counts) another's VM.
    _alone: std::sync::MutexGuard<'static, ()>,
}

impl BuildHost {
    fn start() -> BuildHost {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        static ALONE: Mutex<()> = Mutex::new(());
        // A test that failed holding it poisons it; the next still runs alone.
        let alone = ALONE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        build_host_user();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let net = (pid + n * 7) % 250 + 1;
        let namespace = format!("contractor-bh-{pid}-{n}");
        let outer = format!("vbh{}x{n}a", pid % 100_000);
        let inner = format!("vbh{}x{n}b", pid % 100_000);
        let subnet = format!("10.231.{net}.0/30");
        let address = format!("10.231.{net}.2");
        run("ip", &["netns", "add", &namespace]);
        run(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ],
        );
        run("ip", &["link", "set", &inner, "netns", &namespace]);
        run(
            "ip",
            &["addr", "add", &format!("10.231.{net}.1/30"), "dev", &outer],
        );
        run("ip", &["link", "set", &outer, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &namespace];
            all.extend(args);
            run("ip", &all);
        };
        in_ns(&["ip", "addr", "add", &format!("{address}/30"), "dev", &inner]);
        in_ns(&["ip", "link", "set", &inner, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.231.{net}.1"),
        ]);
        // The build host reaches the registries as this machine does: forwarded, masqueraded.
        {
            let mut forwarding = FORWARDING.lock().unwrap_or_else(|e| e.into_inner());
            if forwarding.0 == 0 {
                let before =
                    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
                forwarding.1 = Some(before.trim().to_string());
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
            }
            forwarding.0 += 1;
        }
        run(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &subnet,
                "-j",
                "MASQUERADE",
            ],
        );

        let dir = tempfile::tempdir().expect("the build host's ssh directory");
        let d = dir.path();
        let keygen = |name: &str| {
            run(
                "ssh-keygen",
                &[
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-f",
                    &d.join(name).to_string_lossy(),
                ],
            );
        };
        keygen("host_key");
        keygen("client_key");
        let public = |name: &str| {
            std::fs::read_to_string(d.join(format!("{name}.pub"))).expect("public key")
        };
        std::fs::write(d.join("authorized_keys"), public("client_key")).expect("authorized_keys");
        std::fs::write(
            d.join("known_hosts"),
            format!("{address} {}", public("host_key")),
        )
        .expect("known_hosts");
        // sshd reads authorized_keys as the user.
        run("chmod", &["0755", &d.to_string_lossy()]);
        run(
            "chmod",
            &["0644", &d.join("authorized_keys").to_string_lossy()],
        );
        let tools = util::bin_dir();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress {address}\nHostKey {host_key}\nPidFile none\nUsePAM no\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 AuthorizedKeysFile {keys}\nAllowUsers {USER}\nClientAliveInterval 2\nClientAliveCountMax 3\n\
                 SetEnv PATH={tools}:/usr/local/bin:/usr/bin:/bin\nLogLevel INFO\n",
                host_key = d.join("host_key").display(),
                keys = d.join("authorized_keys").display(),
                tools = tools.display(),
            ),
        )
        .expect("sshd_config");
        std::fs::write(
            d.join("ssh_config"),
            format!(
                "Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  \
                 GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n",
                key = d.join("client_key").display(),
                known = d.join("known_hosts").display(),
            ),
        )
        .expect("ssh_config");
        let wrapper = d.join("ssh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec ssh -F {} \"$@\"\n",
                d.join("ssh_config").display()
            ),
        )
        .expect("ssh wrapper");
        run("chmod", &["0755", &wrapper.to_string_lossy()]);
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let sshd = Command::new("ip")
            .args([
                "netns",
                "exec",
                &namespace,
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
            ])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            // Its log (the readiness probe below shows as a client that sent no banner).
            .stderr(std::fs::File::create(d.join("sshd.log")).expect("sshd.log"))
            .spawn()
            .expect("start sshd");
        let host = BuildHost {
            namespace,
            outer,
            subnet,
            address,
            sshd,
            dir,
            _alone: alone,
        };
        let at: SocketAddr = format!("{}:22", host.address).parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&at, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {at}");
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    /// How many SSH connections its sshd has accepted so far.
    fn accepted(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("sshd.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Accepted publickey for"))
            .count()
    }

    /// `contractor-bh@ADDRESS`.
    fn name(&self) -> String {
        format!("{USER}@{}", self.address)
    }

    /// The `ssh` that reaches this host.
    fn ssh(&self) -> PathBuf {
        self.dir.path().join("ssh")
    }

    /// `contractor ARGS` in `project`, with this host's ssh.
    fn contractor(&self, project: &Project, args: &[&str]) -> Command {
        let mut command = Command::new(util::contractor());
        command
            .args(args)
            .current_dir(project.path())
            .env("CONTRACTOR_SSH", self.ssh())
            .env("CONTRACTOR_CONFIG", "/nonexistent/contractor/config.toml");
        command
    }

    /// `command` run on the build host, as its user, over ssh.
    fn on_host(&self, command: &str) -> String {
        let out = Command::new(self.ssh())
            .args(["-o", "BatchMode=yes", &self.name(), command])
            .output()
            .expect("ssh");
        assert!(
            out.status.success(),
            "ssh {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The Contractor VMs in the build host user's libvirt session.
    fn vms(&self) -> Vec<String> {
        self.on_host("virsh -c qemu:///session list --all --name")
            .lines()
            .filter(|l| l.starts_with("contractor-"))
            .map(String::from)
            .collect()
    }

    /// Waits until the build host has no Contractor VM, at most `within`; the VMs left.
    fn vms_left_after(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let vms = self.vms();
            if vms.is_empty() || Instant::now() > deadline {
                return vms;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Cuts (or restores) this host's link.
    fn link(&self, up: bool) {
        run(
            "ip",
            &["link", "set", &self.outer, if up { "up" } else { "down" }],
        );
    }
}

impl Drop for BuildHost {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
        let _ = Command::new("iptables")
            .args([
                "-t",
                "nat",
                "-D",
                "POSTROUTING",
                "-s",
                &self.subnet,
                "-j",
                "MASQUERADE",
            ])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
        // Gone with the namespace, unless that failed.
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .stderr(Stdio::null())
            .status();
        let mut forwarding = FORWARDING.lock().unwrap_or_else(|e| e.into_inner());
        forwarding.0 = forwarding.0.saturating_sub(1);
        if forwarding.0 == 0 {
            if let Some(before) = forwarding.1.take() {
                let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", before);
            }
        }
    }
}

/// A build of `project` on `host` (`contractor build --host NAME ARGS`), while this
/// machine's libvirt is watched: the names of every domain it had meanwhile come back too.
fn build_there(host: &BuildHost, project: &Project, args: &[&str]) -> (Build, Vec<String>) {
    let name = host.name();
    let mut all = vec!["build", "--host", &name];
    all.extend(args);
    let mut command = host.contractor(project, &all);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (done, seen) = (done.clone(), seen.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let domains = util::libvirt_domains();
                if let Ok(mut seen) = seen.lock() {
                    seen.extend(
                        domains
                            .lines()
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let output = command.output().expect("run contractor build --host");
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let result = util::latest_result(project.path());
    let record = project.path().join(".contractor/builds").join(&result.id);
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    (
        Build {
            output,
            stderr,
            result,
            record,
        },
        seen,
    )
}

/// The files of a record, relative, but those only one side writes for itself.
fn record_files(record: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, files: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("record dir").flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, base, files);
            } else {
                files.push(
                    path.strip_prefix(base)
                        .expect("inside")
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut files = Vec::new();
    walk(record, record, &mut files);
    files.retain(|f| !f.starts_with("inputs/"));
    files.sort();
    files
}

/// The progress lines of a build (plain display), without the build's id and timings.
fn progress(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| {
            l.starts_with("contractor: phase")
                || l.starts_with("contractor: artifact")
                || l == &"contractor: VM booted"
        })
        .map(String::from)
        .collect()
}

/// Checks the build on the host against the same build here: both succeed with the same
/// record files, artifacts, progress and script output; the host is named in the remote
/// one only; this machine's libvirt never saw the remote VM; nothing is left there.
fn same_as_local(
    host: &BuildHost,
    project: &Project,
    image: &str,
    output_line: &str,
) -> (Build, Build) {
    let local = project.build();
    assert_eq!(
        local.result.outcome,
        Outcome::Success,
        "local build:\n{}",
        local.stderr
    );
    give_image(image);
    let (remote, seen) = build_there(host, project, &[]);
    assert_eq!(
        remote.result.outcome,
        Outcome::Success,
        "build on {}:\n{}\nresult: {:?}",
        host.name(),
        remote.stderr,
        remote.result
    );
    assert_eq!(remote.result.host.as_deref(), Some(host.name().as_str()));
    assert_eq!(local.result.host, None);
    assert_ne!(remote.result.id, local.result.id);
    assert_eq!(
        record_files(&remote.record),
        record_files(&local.record),
        "the records hold the same files"
    );
    let relative = |b: &Build| -> Vec<String> {
        b.result
            .artifacts
            .iter()
            .map(|a| {
                a.strip_prefix(&b.record)
                    .expect("artifact in its record")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    assert_eq!(relative(&remote), relative(&local));
    for artifact in &remote.result.artifacts {
        assert!(
            artifact.is_file(),
            "{} is in the local record",
            artifact.display()
        );
    }
    // The signed statement says what the build host's VM ran with, as the local one does
    // (not the `auto` the front end asked for).
    let internal = |b: &Build| {
        let statement =
            contractor_protocol::attest::read_statement(&b.record.join("provenance.json"))
                .unwrap_or_else(|e| panic!("the statement of {}: {e}", b.record.display()));
        statement["predicate"]["buildDefinition"]["internalParameters"].clone()
    };
    let (here, there) = (internal(&local), internal(&remote));
    assert_eq!(there["accelerator"], here["accelerator"], "{there}");
    assert_ne!(there["accelerator"], "auto", "{there}");
    assert_eq!(there["buildHost"], host.name().as_str(), "{there}");
    assert!(remote.result.log.starts_with(&remote.record));
    assert!(
        remote.log().contains(output_line),
        "remote log:\n{}",
        remote.log()
    );
    assert!(
        String::from_utf8_lossy(&remote.output.stdout).contains(output_line),
        "the script's output streamed back"
    );
    assert_eq!(
        progress(&remote.stderr),
        progress(&local.stderr),
        "shown as a local build is"
    );
    let vm = util::vm_name_in(&remote.stderr)
        .unwrap_or_else(|| panic!("no VM line:\n{}", remote.stderr));
    assert!(
        !seen.iter().any(|d| d == &vm),
        "this machine's libvirt saw {vm}: {seen:?}"
    );
    assert_eq!(
        host.vms_left_after(Duration::from_secs(15)),
        Vec::<String>::new(),
        "VMs left on the build host"
    );
    let left = host.on_host(&format!(
        "ls -d .local/share/contractor/hosted/*/.contractor/builds/{} 2>/dev/null || true",
        remote.result.id
    ));
    assert_eq!(
        left.trim(),
        "",
        "the build host keeps no record once it came back"
    );
    (local, remote)
}

#[test]
fn hello_and_the_rust_crate_build_on_a_build_host_as_they_do_here() {
    if skip("hello_and_the_rust_crate_build_on_a_build_host_as_they_do_here") {
        return;
    }
    let host = BuildHost::start();
    let hello = Project::hello();
    let (_, remote) = same_as_local(&host, &hello, "debian-12-build", "all checks passed");
    let binary = remote.record.join("artifacts/hello");
    let greeting = Command::new(&binary)
        .arg("host")
        .output()
        .expect("run the artifact");
    assert_eq!(
        String::from_utf8_lossy(&greeting.stdout).trim(),
        "Hello, host!"
    );
    // `contractor show` reads the record as a local one.
    let shown = host
        .contractor(&hello, &["show"])
        .output()
        .expect("contractor show");
    assert!(shown.status.success());
    assert!(String::from_utf8_lossy(&shown.stdout).contains(&remote.result.id));

    let crate_project = Project::example(
        "rust-crate",
        &["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"],
    );
    let (local, remote) = same_as_local(&host, &crate_project, "debian-13-build", "cargo 1.");
    let urls = |b: &Build| -> Vec<String> {
        let mut urls: Vec<String> = std::fs::read_to_string(b.record.join("downloads.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|d| d["url"].as_str().map(String::from))
            .collect();
        urls.sort();
        urls.dedup();
        urls
    };
    assert!(
        !urls(&remote).is_empty(),
        "the build host's downloads are recorded here"
    );
    assert_eq!(urls(&remote), urls(&local));
    let digits = Command::new(remote.record.join("artifacts/target/release/digits"))
        .arg("1234567")
        .output()
        .expect("run digits");
    let here = Command::new(local.record.join("artifacts/target/release/digits"))
        .arg("1234567")
        .output()
        .expect("run digits");
    assert_eq!(digits.stdout, here.stdout);
}

/// A project whose script runs for ten minutes, started on `host`; returns the front end
/// once the script's first line has come back, with its stderr so far.
fn long_build(host: &BuildHost, project: &Project) -> (Child, Arc<Mutex<String>>) {
    let name = host.name();
    let mut child = host
        .contractor(project, &["build", "--host", &name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start contractor build --host");
    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if line == "sleeping" {
                let _ = tx.send(());
            }
        }
    });
    let err = BufReader::new(child.stderr.take().expect("stderr"));
    let shared = stderr.clone();
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            if let Ok(mut s) = shared.lock() {
                s.push_str(&line);
                s.push('\n');
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(300)).is_err() {
        let _ = child.kill();
        panic!(
            "the script did not start on the build host:\n{}",
            stderr.lock().map(|s| s.clone()).unwrap_or_default()
        );
    }
    (child, stderr)
}

fn sleeping_project() -> Project {
    give_image("debian-12-build");
    Project::new(&util::small_spec("echo sleeping\nsleep 600", ""))
}

#[test]
fn killing_the_front_end_leaves_no_vm_on_the_build_host() {
    if skip("killing_the_front_end_leaves_no_vm_on_the_build_host") {
        return;
    }
    let host = BuildHost::start();
    let project = sleeping_project();
    let (mut front, _) = long_build(&host, &project);
    assert!(
        !host.vms().is_empty(),
        "the build's VM runs on the build host"
    );
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(front.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the front end");
    let _ = front.wait();
    let left = host.vms_left_after(Duration::from_secs(15));
    assert_eq!(
        left,
        Vec::<String>::new(),
        "VMs still on the build host {:?} after the kill",
        killed.elapsed()
    );
}

#[test]
fn ctrl_c_interrupts_the_build_there_and_its_record_comes_back() {
    if skip("ctrl_c_interrupts_the_build_there_and_its_record_comes_back") {
        return;
    }
    let host = BuildHost::start();
    let project = sleeping_project();
    let (mut front, stderr) = long_build(&host, &project);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(front.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("Ctrl-C");
    let status = front.wait().expect("wait");
    let stderr = stderr.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(status.code(), Some(130), "stderr:\n{stderr}");
    let result: BuildResult = util::latest_result(project.path());
    assert_eq!(result.outcome, Outcome::Interrupted, "{result:?}");
    let log = std::fs::read_to_string(&result.log).expect("the record's log came back");
    assert!(log.contains("sleeping"), "log:\n{log}");
    assert_eq!(
        host.vms_left_after(Duration::from_secs(15)),
        Vec::<String>::new()
    );
}

#[test]
fn a_cut_connection_is_an_infrastructure_failure_naming_the_host_and_leaves_no_vm() {
    if skip("a_cut_connection_is_an_infrastructure_failure_naming_the_host_and_leaves_no_vm") {
        return;
    }
    let host = BuildHost::start();
    let project = sleeping_project();
    let (mut front, stderr) = long_build(&host, &project);
    host.link(false);
    let cut = Instant::now();
    let status = front.wait().expect("wait");
    let waited = cut.elapsed();
    host.link(true);
    let stderr = stderr.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(3),
        "after {waited:?}; stderr:\n{stderr}"
    );
    let result = util::latest_result(project.path());
    assert_eq!(result.outcome, Outcome::Infrastructure);
    let error = result.error.expect("an error");
    assert_eq!(error.code, "build_host");
    assert!(error.chain.join(": ").contains(&host.name()), "{error:?}");
    assert!(
        stderr.contains(&host.name()),
        "the summary names the host:\n{stderr}"
    );
    // The build host's sshd ends the session (ClientAliveInterval), and with it the build.
    assert_eq!(
        host.vms_left_after(Duration::from_secs(30)),
        Vec::<String>::new()
    );
}

#[test]
fn of_two_configured_hosts_one_unreachable_the_build_runs_on_the_other_and_says_so() {
    if skip("of_two_configured_hosts_one_unreachable_the_build_runs_on_the_other_and_says_so") {
        return;
    }
    let host = BuildHost::start();
    give_image("debian-12-build");
    // Nothing listens on port 2 of the build host's address: refused at once.
    let unreachable = format!("{}:2", host.name());

    // `contractor doctor --host` reports the build host's own facts (its user, its libvirt
    // session, its images), asked of its contractor-vm; an unreachable one fails, named.
    let project = Project::hello();
    let doctor = host
        .contractor(&project, &["doctor", "--host", &host.name()])
        .output()
        .expect("contractor doctor --host");
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(0), "{said}");
    assert!(
        said.starts_with(&format!("build host {}:\n", host.name())),
        "{said}"
    );
    for line in [
        "ok   libvirt           qemu:///session answers",
        &format!("ok   subordinate uids  {USER} has a range"),
        &format!(
            "ok   image             /home/{USER}/.local/share/contractor/images/debian-12-build"
        ),
    ] {
        assert!(said.contains(line), "no {line:?} in:\n{said}");
    }
    let doctor = host
        .contractor(&project, &["doctor", "--host", &unreachable])
        .output()
        .expect("contractor doctor --host");
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(3), "{said}");
    assert!(said.contains("FAIL contractor-vm"), "{said}");
    let config = host.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("hosts = [\"{unreachable}\", \"ssh://{}\"]\n", host.name()),
    )
    .expect("config");
    let project = Project::hello();
    let output = host
        .contractor(&project, &["build"])
        .env("CONTRACTOR_CONFIG", &config)
        .output()
        .expect("contractor build");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr:\n{stderr}");
    let result = util::latest_result(project.path());
    assert_eq!(result.outcome, Outcome::Success);
    assert_eq!(result.host.as_deref(), Some(host.name().as_str()));
    assert!(
        stderr.contains(&format!("contractor: build host {} chosen", host.name())),
        "it says which host it chose:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("{unreachable}: cannot be reached")),
        "it says which host it passed over and why:\n{stderr}"
    );
    assert!(stderr.contains("room for "), "{stderr}");

    // With neither reachable, nothing is built and both are named.
    std::fs::write(
        &config,
        format!("hosts = [\"{unreachable}\", \"{}:3\"]\n", host.name()),
    )
    .expect("config");
    let output = host
        .contractor(&project, &["build"])
        .env("CONTRACTOR_CONFIG", &config)
        .output()
        .expect("contractor build");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "stderr:\n{stderr}");
    assert!(
        stderr.contains("none of the 2 build hosts can take the build"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{}:3", host.name())), "{stderr}");

    // A bad entry is bad input naming the file and the value.
    std::fs::write(&config, "hosts = [\"-oProxyCommand=sh\"]\n").expect("config");
    let output = host
        .contractor(&project, &["build"])
        .env("CONTRACTOR_CONFIG", &config)
        .output()
        .expect("contractor build");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("config.toml") && stderr.contains("-oProxyCommand=sh"),
        "{stderr}"
    );
}

#[test]
fn builds_share_one_connection_and_a_full_host_makes_the_next_wait_in_line() {
    if skip("builds_share_one_connection_and_a_full_host_makes_the_next_wait_in_line") {
        return;
    }
    let host = BuildHost::start();
    let project = sleeping_project();
    let connections = host.accepted();
    let (mut front, _) = long_build(&host, &project);

    // `contractor hosts` names the host, its room and the build running there.
    let listed = host
        .contractor(&project, &["hosts", "--host", &host.name()])
        .output()
        .expect("contractor hosts");
    let said = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert_eq!(
        listed.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let line = said
        .lines()
        .find(|l| l.starts_with(&host.name()))
        .unwrap_or_else(|| panic!("the host is not listed:\n{said}"));
    // This test's build alone: the file's tests run one at a time (BuildHost::start).
    let running: u32 = line
        .split_once(" running ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no running count in {line:?}"));
    assert!(line.contains(" room ") && running == 1, "{line}");
    let cpus: u32 = line
        .rsplit_once(" CPUs)")
        .and_then(|(head, _)| head.rsplit_once(' '))
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no CPU count in {line:?}"));

    // A build asking for all its CPUs does not fit beside the running one: it waits in
    // line, saying so, and does not start a VM there.
    let whole = Project::new(&format!(
        "[build]\nscript = 'true'\n[vm]\ncpus = {cpus}\nmemory = \"768MiB\"\n"
    ));
    let mut waiting = host
        .contractor(&whole, &["build", "--host", &host.name()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the second build");
    let (tx, rx) = std::sync::mpsc::channel();
    let err = BufReader::new(waiting.stderr.take().expect("stderr"));
    std::thread::spawn(move || {
        for line in err.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains("room for 0 more build(s)") && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    let _ = waiting.kill();
    let _ = waiting.wait();
    assert!(
        seen.contains("contractor: all 1 build host(s) are full; waiting in line: position 1"),
        "the second build did not wait in line:\n{seen}"
    );
    assert!(seen.contains("room for 0 more build(s)"), "{seen}");
    assert!(
        !whole.path().join(".contractor/builds").exists(),
        "the waiting build made a record"
    );
    // The build, the listing and the waiting build's probes went over one connection.
    assert_eq!(
        host.accepted() - connections,
        1,
        "connections accepted by the build host's sshd"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(front.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("Ctrl-C");
    let _ = front.wait();
    assert_eq!(
        host.vms_left_after(Duration::from_secs(15)),
        Vec::<String>::new()
    );
}
