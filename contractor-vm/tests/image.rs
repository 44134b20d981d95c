//! `contractor-vm image` and `check` against the real binary, in a fresh data directory:
//! the answers are one JSON object each, mirrored strictly, and bad input is exit 2 with an
//! error object naming what is wrong. None of these builds an image or needs libvirt.

use std::process::{Command, Output};

/// `{"type":"images",...}` and `{"type":"removed",...}`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Images {
    r#type: String,
    version: u32,
    images: Vec<serde_json::Value>,
}

/// The error object of `--json-errors`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ErrorObject {
    r#type: String,
    version: u32,
    code: String,
    chain: Vec<String>,
}

/// The probes of `check`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    ok: bool,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    error: Vec<String>,
}

/// `{"type":"check",...}`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    r#type: String,
    version: u32,
    uri: String,
    libvirt: Probe,
    cpu_virt: bool,
    dev_kvm: bool,
    #[serde(default)]
    dev_kvm_yours: Option<bool>,
    #[serde(default)]
    libvirt_kvm: Option<bool>,
    agent: Probe,
    programs: Vec<serde_json::Value>,
    #[serde(default)]
    dev_kvm_group_rw: Option<bool>,
    #[serde(default)]
    subuids: Option<serde_json::Value>,
    space: serde_json::Value,
    #[serde(default)]
    launcher: Option<Probe>,
    findings: Vec<Finding>,
}

/// One judged fact of `check`, mirrored strictly.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Finding {
    status: String,
    what: String,
    detail: String,
}

fn run(data: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
        .args(args)
        .env("CONTRACTOR_DATA_DIR", data)
        .env("CONTRACTOR_AGENT", data.join("no-agent"))
        .output()
        .expect("run contractor-vm")
}

fn one_line<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout}");
    serde_json::from_str(&stdout).expect("the documented object")
}

#[test]
fn an_empty_data_directory_lists_no_images() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = run(data.path(), &["image", "list"]);
    assert!(out.status.success(), "{out:?}");
    let images: Images = one_line(&out);
    assert_eq!((images.r#type.as_str(), images.version), ("images", 1));
    assert!(images.images.is_empty());
}

#[test]
fn bad_names_and_missing_images_are_exit_2_naming_them() {
    let data = tempfile::tempdir().expect("tempdir");
    for (args, code, says) in [
        (
            &["image", "build", "../etc"][..],
            "bad_image_name",
            "\"../etc\"",
        ),
        (
            // Named, with what is accepted, before the agent is looked for.
            &["image", "build", "no-such-image"][..],
            "no_image",
            "no image no-such-image: Contractor builds debian-12-build, debian-13-build",
        ),
        (
            &["image", "rm", "nothing-here"][..],
            "no_image",
            "nothing-here",
        ),
        (
            &[
                "image",
                "import",
                "debian-12-build",
                "--disk",
                "/d",
                "--kernel",
                "/k",
                "--initrd",
                "/i",
            ][..],
            "built_image_name",
            "debian-12-build",
        ),
        (
            &[
                "image",
                "import",
                "mine",
                "--disk",
                "/nonexistent/d",
                "--kernel",
                "/k",
                "--initrd",
                "/i",
            ][..],
            "bad_import",
            "/nonexistent/d",
        ),
    ] {
        let mut all = args.to_vec();
        all.push("--json-errors");
        let out = run(data.path(), &all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let error: ErrorObject = one_line(&out);
        assert_eq!((error.r#type.as_str(), error.version), ("error", 1));
        assert_eq!(error.code, code, "{args:?}");
        assert!(error.chain.join(": ").contains(says), "{args:?}: {error:?}");
    }
}

#[test]
fn building_without_the_agent_is_exit_3_saying_how_to_build_it() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = run(
        data.path(),
        &["image", "build", "debian-12-build", "--json-errors"],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let error: ErrorObject = one_line(&out);
    assert_eq!(error.code, "no_agent");
    assert!(error.chain[0].contains("scripts/build-agent"), "{error:?}");
}

#[test]
fn check_reports_libvirt_kvm_and_the_agent() {
    let data = tempfile::tempdir().expect("tempdir");
    let uri = "qemu+unix:///system?socket=/nonexistent/contractor-test.sock";
    let out = run(data.path(), &["check", "--uri", uri]);
    assert!(out.status.success(), "{out:?}");
    let check: Check = one_line(&out);
    assert_eq!((check.r#type.as_str(), check.version), ("check", 1));
    assert_eq!(check.uri, uri);
    assert!(!check.libvirt.ok && !check.libvirt.error.is_empty());
    assert!(!check.agent.ok && check.agent.path.is_none());
    assert!(
        check.agent.error[0].contains("no-agent"),
        "{:?}",
        check.agent
    );
    let _ = (check.cpu_virt, check.dev_kvm, check.libvirt.path);
    // Every program the VM host needs, named with its package; the data directory's space.
    let names: Vec<&str> = check
        .programs
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "qemu-system-x86_64",
            "qemu-img",
            "mmdebstrap",
            "debugfs",
            "resize2fs"
        ]
    );
    assert!(check.programs.iter().all(|p| p["package"].is_string()));
    assert_eq!(check.dev_kvm_group_rw.is_some(), check.dev_kvm);
    assert_eq!(check.subuids.is_none(), nix::unistd::geteuid().is_root());
    assert_eq!(check.space["path"], data.path().to_str().expect("utf-8"));
    assert!(check.space["free_bytes"].as_u64().is_some_and(|b| b > 0));
    // Not a session URI: libvirt starts QEMU, no launcher is asked for.
    assert!(check.launcher.is_none());
}

#[test]
fn check_answers_its_findings_each_judged_with_the_fix() {
    let data = tempfile::tempdir().expect("tempdir");
    let uri = "qemu+unix:///system?socket=/nonexistent/contractor-test.sock";
    let out = run(data.path(), &["check", "--uri", uri]);
    assert!(out.status.success(), "{out:?}");
    let check: Check = one_line(&out);
    let line = |what: &str| {
        check
            .findings
            .iter()
            .find(|f| f.what == what)
            .unwrap_or_else(|| panic!("no {what} finding in {:?}", check.findings))
    };
    assert!(check
        .findings
        .iter()
        .all(|f| ["ok", "warn", "fail"].contains(&f.status.as_str()) && !f.detail.is_empty()));
    // The unreachable libvirt and the missing agent fail, each saying why.
    assert_eq!(line("libvirt").status, "fail");
    assert!(
        line("libvirt").detail.contains(uri),
        "{:?}",
        line("libvirt")
    );
    assert_eq!(line("guest agent").status, "fail");
    assert!(
        line("guest agent").detail.contains("scripts/build-agent"),
        "{:?}",
        line("guest agent")
    );
    // Each program a finding of its own; the empty data directory has no default image yet.
    for program in &check.programs {
        let name = program["name"].as_str().expect("name");
        let found = line(name);
        match program["path"].as_str() {
            Some(path) => assert_eq!((found.status.as_str(), found.detail.as_str()), ("ok", path)),
            None => assert_eq!(found.status, "fail"),
        }
    }
    assert_eq!(line("image").status, "warn");
    assert!(
        line("image")
            .detail
            .starts_with("debian-12-build is not built yet"),
        "{:?}",
        line("image")
    );
    assert!(check.findings.iter().all(|f| f.what != "QEMU confinement"));
}

#[test]
fn check_of_a_remote_uri_judges_kvm_by_that_libvirts_capabilities() {
    // libvirt's test driver stands for a remote host: its capabilities list no vmx/svm and
    // no kvm domain type, whatever this host's CPU and /dev/kvm are.
    let data = tempfile::tempdir().expect("tempdir");
    let uri = "test:///default";
    let out = run(data.path(), &["check", "--uri", uri]);
    assert!(out.status.success(), "{out:?}");
    let check: Check = one_line(&out);
    assert!(check.libvirt.ok, "{:?}", check.libvirt);
    assert_eq!(
        (check.cpu_virt, check.dev_kvm, check.libvirt_kvm),
        (false, false, Some(false))
    );
    assert_eq!((check.dev_kvm_yours, check.dev_kvm_group_rw), (None, None));
    let accelerator = check
        .findings
        .iter()
        .find(|f| f.what == "accelerator")
        .expect("an accelerator finding");
    assert_eq!(accelerator.status, "warn");
    assert!(
        accelerator
            .detail
            .contains("the CPU of libvirt's host at test:///default has no vmx or svm flag"),
        "{accelerator:?}"
    );
}

#[test]
fn check_under_a_session_uri_says_where_qemus_launcher_is_or_that_it_is_missing() {
    let data = tempfile::tempdir().expect("tempdir");
    let check = |bin: &std::path::Path| -> Check {
        let out = Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
            .args(["check", "--uri", "qemu:///session"])
            .env("CONTRACTOR_DATA_DIR", data.path())
            .env("CONTRACTOR_BIN", bin)
            .output()
            .expect("run contractor-vm");
        assert!(out.status.success(), "{out:?}");
        one_line(&out)
    };
    let launcher = std::path::Path::new(env!("CARGO_BIN_EXE_contractor-qemu"));
    let found = check(launcher.parent().expect("bin dir"))
        .launcher
        .expect("a launcher probe under qemu:///session");
    assert!(found.ok, "{found:?}");
    assert_eq!(found.path.as_deref(), launcher.to_str());
    let missing = check(data.path()).launcher.expect("a launcher probe");
    assert!(!missing.ok && missing.path.is_none());
    let said = missing.error.join(": ");
    assert!(
        said.contains(&format!("{}/contractor-qemu", data.path().display()))
            && said.contains("is missing or not executable"),
        "{said}"
    );
}

/// Runs a program the test makes its disk with, failing the test with its stderr.
fn tool(program: &str, args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} (scripts/setup installs it): {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("stdin");
    let out = child.wait_with_output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fake bzImage: "HdrS" at 0x202, then `tag`.
fn fake_kernel(tag: &str) -> Vec<u8> {
    let mut bytes = vec![0u8; 0x300];
    bytes[0x202..0x206].copy_from_slice(b"HdrS");
    bytes.extend_from_slice(tag.as_bytes());
    bytes
}

#[test]
fn a_partitioned_disk_is_imported_from_its_root_partition_with_its_newest_kernel() {
    // A GPT disk as cloud images have it (sfdisk writes the table): an EFI partition
    // first, then the ext4 root with two kernels in /boot (10 is newer than 9 though it
    // sorts before it as text).
    let data = tempfile::tempdir().expect("tempdir");
    let tree = data.path().join("tree");
    for dir in ["bin", "boot", "etc"] {
        std::fs::create_dir_all(tree.join(dir)).expect("mkdir");
    }
    std::fs::write(tree.join("bin/sh"), "#!/not/really\n").expect("sh");
    for (name, bytes) in [
        ("vmlinuz-6.1.0-9-amd64", fake_kernel("old")),
        ("vmlinuz-6.1.0-10-amd64", fake_kernel("new")),
        ("initrd.img-6.1.0-9-amd64", b"old initrd".to_vec()),
        ("initrd.img-6.1.0-10-amd64", b"new initrd".to_vec()),
    ] {
        std::fs::write(tree.join("boot").join(name), bytes).expect("boot file");
    }
    let agent = data.path().join("agent");
    std::fs::write(&agent, vec![0x7f; 4096]).expect("agent");
    let disk = data.path().join("cloud.raw");
    let disk_str = disk.to_str().expect("utf-8");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(128 << 20))
        .expect("disk");
    tool(
        "sfdisk",
        &["-q", disk_str],
        Some(
            "label: gpt\n\
             start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
             start=18432, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n",
        ),
    );
    let offset = format!("offset={}", 18432 * 512);
    let tree_str = tree.to_str().expect("utf-8");
    tool(
        "mkfs.ext4",
        &["-q", "-E", &offset, "-d", tree_str, disk_str, "64M"],
        None,
    );

    let out = Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
        .args(["image", "import", "cloudy", "--disk", disk_str])
        .env("CONTRACTOR_DATA_DIR", data.path())
        .env("CONTRACTOR_AGENT", &agent)
        .output()
        .expect("run contractor-vm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // It says what it picked, and keeps it in the manifest.
    assert!(
        stderr.contains("root: GPT partition 2 (Linux filesystem"),
        "{stderr}"
    );
    assert!(
        stderr.contains("kernel: /boot/vmlinuz-6.1.0-10-amd64 in /boot of the root"),
        "{stderr}"
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the image object");
    let source = answer["image"]["manifest"]["source"]
        .as_str()
        .expect("manifest.source");
    assert!(
        source.contains("initrd: /boot/initrd.img-6.1.0-10-amd64"),
        "{source}"
    );

    let image = data.path().join("images/cloudy");
    assert_eq!(
        std::fs::read(image.join("vmlinuz")).expect("kernel"),
        fake_kernel("new")
    );
    assert_eq!(
        std::fs::read(image.join("initrd.img")).expect("initrd"),
        b"new initrd"
    );
    // The disk is the root partition alone, with the agent written in.
    let root = data.path().join("root.raw");
    let root_str = root.to_str().expect("utf-8");
    tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.join("disk.qcow2").to_str().expect("utf-8"),
            root_str,
        ],
        None,
    );
    assert_eq!(
        std::fs::metadata(&root).expect("root").len(),
        64 << 20,
        "the root partition, not the whole disk"
    );
    let stat = Command::new("debugfs")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args(["-R", "stat /usr/local/sbin/contractor-agent", root_str])
        .output()
        .expect("debugfs");
    assert!(
        String::from_utf8_lossy(&stat.stdout).contains("Size: 4096"),
        "{}",
        String::from_utf8_lossy(&stat.stdout)
    );

    // A qcow2 over a backing file would carry that host file into the image: refused,
    // and so is a format other than qcow2 and raw.
    let secret = data.path().join("secret.raw");
    std::fs::write(&secret, vec![b's'; 1 << 20]).expect("secret");
    let over = data.path().join("over.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret.to_str().expect("utf-8"),
            "-F",
            "raw",
            over.to_str().expect("utf-8"),
        ],
        None,
    );
    let vmdk = data.path().join("disk.vmdk");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            vmdk.to_str().expect("utf-8"),
            "1M",
        ],
        None,
    );
    for (disk, says) in [
        (&over, "it has a backing file"),
        (&vmdk, "its format is vmdk; qcow2 and raw are imported"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
            .args(["image", "import", "sneaky", "--disk"])
            .arg(disk)
            .arg("--json-errors")
            .env("CONTRACTOR_DATA_DIR", data.path())
            .env("CONTRACTOR_AGENT", &agent)
            .output()
            .expect("run contractor-vm");
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let error: ErrorObject = one_line(&out);
        assert_eq!(error.code, "bad_import");
        assert!(error.chain.join(": ").contains(says), "{error:?}");
    }

    // A disk whose partitions hold no root says what each one holds.
    let empty = data.path().join("empty.raw");
    std::fs::File::create(&empty)
        .and_then(|f| f.set_len(32 << 20))
        .expect("disk");
    let empty_str = empty.to_str().expect("utf-8");
    tool(
        "sfdisk",
        &["-q", empty_str],
        Some("label: dos\nstart=2048, type=83\n"),
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
        .args([
            "image",
            "import",
            "empty",
            "--disk",
            empty_str,
            "--json-errors",
        ])
        .env("CONTRACTOR_DATA_DIR", data.path())
        .env("CONTRACTOR_AGENT", &agent)
        .output()
        .expect("run contractor-vm");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let error: ErrorObject = one_line(&refused);
    assert_eq!(error.code, "bad_import");
    let said = error.chain.join(": ");
    assert!(
        said.contains("partition 1 (Linux, 31 MiB): no file system known here"),
        "{said}"
    );
}

/// A mirror that never finishes an answer: every request gets a 200 whose body comes one
/// byte a second, so apt (and the image build holding its lock) waits as long as the test
/// runs.
fn trickling_mirror() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
                if stream.write_all(head).is_err() {
                    return;
                }
                while stream.write_all(b"x").is_ok() {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
        }
    });
    addr
}

/// A child killed (and reaped) when dropped, also when the test fails: its mmdebstrap
/// follows it (the parent-death signal).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `contractor-vm image build --base debian-12 --package PACKAGE` from `mirror`, its stderr
/// read line by line into the returned channel.
fn start_derived_build(
    data: &std::path::Path,
    agent: &std::path::Path,
    mirror: std::net::SocketAddr,
    package: &str,
) -> (Running, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_contractor-vm"))
        .args([
            "image",
            "build",
            "--base",
            "debian-12",
            "--package",
            package,
        ])
        .env("CONTRACTOR_DATA_DIR", data)
        .env("CONTRACTOR_AGENT", agent)
        .env(
            "CONTRACTOR_DEBIAN_MIRROR",
            format!("http://{mirror}/debian"),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run contractor-vm");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Running(child), rx)
}

/// The first line from `lines` that contains `wanted`, waiting at most 120 s for it (a
/// bound on a hang, not a measure of speed), else the test fails with what came.
fn line_with(lines: &std::sync::mpsc::Receiver<String>, wanted: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(wanted) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {wanted:?} in 120 s; stderr so far: {seen:#?}"),
        }
    }
}

#[test]
fn building_one_image_holds_up_no_other_and_a_build_of_the_same_one_says_whom_it_waits_for() {
    let data = tempfile::tempdir().expect("tempdir");
    let agent = data.path().join("agent");
    std::fs::write(&agent, vec![0x7f; 4096]).expect("agent");
    let mirror = trickling_mirror();
    // A: an image build stuck at its download (as a real one is for minutes).
    let (first, first_lines) = start_derived_build(data.path(), &agent, mirror, "hello");
    line_with(&first_lines, "installing Debian packages");
    // B, another image, starts building at once: it does not wait for A's lock.
    let (_other, other_lines) = start_derived_build(data.path(), &agent, mirror, "figlet");
    line_with(&other_lines, "installing Debian packages");
    // A again waits, and says for whom: A's first build, by pid.
    let (_again, again_lines) = start_derived_build(data.path(), &agent, mirror, "hello");
    let waiting = line_with(&again_lines, "waiting for");
    let holder = format!("pid {}, for ", first.0.id());
    assert!(
        waiting.contains(&holder) && waiting.contains(": checking or building image debian-12-"),
        "{waiting}"
    );
}
