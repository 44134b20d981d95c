//! The containment acceptance suite: builds whose scripts attack, each checked to have
//! failed *and* to have left the host unchanged; limits; and the failures the machinery
//! must survive (a killed front end, Ctrl-C, a dying agent, a guest kernel panic, several
//! builds at once). docs/security.md lists each scenario with the test that checks it.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use contractor_protocol::result::{Limit, Outcome};
use util::{assert_no_vm_left, latest_result, sha256, small_spec, vm_name_in, Project};

fn random_token() -> String {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value printed by the script's `check NAME VALUE` lines.
fn check<'a>(log: &'a str, name: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("CHECK {name} ")))
        .unwrap_or_else(|| panic!("no CHECK {name} in the log:\n{log}"))
}

#[test]
fn a_hostile_build_reaches_nothing_but_the_proxy_and_its_own_store_files() {
    if util::skip_without_vm(
        "a_hostile_build_reaches_nothing_but_the_proxy_and_its_own_store_files",
    ) {
        return;
    }
    let secret = format!("contractor-secret-{}", random_token());
    let host_secret = std::env::temp_dir().join(&secret);
    std::fs::write(&host_secret, &secret).expect("host secret");
    let marker = format!("/tmp/contractor-marker-{}", random_token());
    let listener = TcpListener::bind("127.0.0.1:0").expect("host listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let image = contractor_vm::image::load(
        &contractor_cli::paths::data_dir()
            .expect("data dir")
            .join("images/debian-12-build"),
    )
    .expect("manifest");

    let script = format!(
        r#"set +e
check() {{ echo "CHECK $1 $2"; }}
# The host's files: nothing of the host is mounted or copied in.
if grep -rqs {secret} /tmp /root /home /etc /mnt /media /srv /opt /var; then check host-secret visible; else check host-secret absent; fi
echo written-in-the-guest > {marker}
check mounts "$(awk '{{print $3}}' /proc/mounts | sort -u | tr '\n' ,)"
# The network: no interface but loopback, no DNS, no route.
check interfaces "$(awk -F: 'NR>2 {{gsub(/ /,"",$1); print $1}}' /proc/net/dev | tr '\n' ,)"
if getent hosts deb.debian.org >/dev/null; then check dns works; else check dns fails; fi
if curl --noproxy '*' -s --max-time 5 http://203.0.113.10/ >/dev/null; then check direct-tcp works; else check direct-tcp fails; fi
if curl --noproxy '*' -s --max-time 5 http://127.0.0.1:{port}/ >/dev/null; then check guest-loopback works; else check guest-loopback fails; fi
# Through the proxy: the allowed host works, everything else is refused.
allowed="--max-time 90 --retry 3 --retry-all-errors"
check allowed-http "$(curl -s -o /dev/null -w '%{{http_code}}' $allowed http://deb.debian.org/debian/dists/bookworm/Release)"
# -k: the machines this runs on intercept TLS with a CA that only the host trusts; what
# is checked here is that the tunnel through the proxy carries a whole HTTPS exchange.
check allowed-https "$(curl -k -s -o /dev/null -w '%{{http_code}}' $allowed https://deb.debian.org/debian/dists/bookworm/Release)"
check refused-host "$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 20 http://example.com/)"
# no_proxy (127.0.0.1,localhost) is emptied so that these go to the proxy, not the guest.
check host-loopback "$(no_proxy= NO_PROXY= curl -s -o /dev/null -w '%{{http_code}}' --max-time 20 http://127.0.0.1:{port}/)"
check private "$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 20 http://10.1.2.3/)"
check metadata "$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 20 http://169.254.169.254/latest/meta-data/)"
check numeric-trick "$(no_proxy= NO_PROXY= curl -s -o /dev/null -w '%{{http_code}}' --max-time 20 http://2130706433:{port}/)"
check tls-to-refused "$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 20 https://example.com/)"
# The store: only this build's own files, even with the build's own token.
auth="Authorization: Bearer $CONTRACTOR_STORE_TOKEN"
check no-token "$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' $CONTRACTOR_STORE/builds/$CONTRACTOR_BUILD_ID/source.tar)"
check own-source "$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' -H "$auth" $CONTRACTOR_STORE/builds/$CONTRACTOR_BUILD_ID/source.tar)"
check other-build "$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' -H "$auth" $CONTRACTOR_STORE/builds/someone-else/source.tar)"
check shared-area "$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' -H "$auth" $CONTRACTOR_STORE/cas/x)"
check traversal "$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' -H "$auth" --path-as-is $CONTRACTOR_STORE/builds/../../etc/passwd)"
check encoded-traversal "$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' -H "$auth" $CONTRACTOR_STORE/builds/%2e%2e/%2e%2e/etc/passwd)"
check write-outside "$(curl -s -o /dev/null -w '%{{http_code}}' --noproxy '*' -H "$auth" -X PUT --data x $CONTRACTOR_STORE/builds/someone-else/artifacts/x)"
exit 0"#
    );
    let spec = format!(
        "[build]\nscript = '''\n{script}\n'''\ntimeout = \"5m\"\n[vm]\ncpus = 1\nmemory = \"768MiB\"\n\
         [network]\nallow = [\"deb.debian.org\"]\n"
    );
    let project = Project::new(&spec);
    let build = project.build();
    let _ = std::fs::remove_file(&host_secret);
    let log = build.log();
    assert_eq!(
        build.result.outcome,
        Outcome::Success,
        "stderr:\n{}\nlog:\n{log}",
        build.stderr
    );

    assert_eq!(check(&log, "host-secret"), "absent");
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the guest wrote {marker} on the host"
    );
    let mounts = check(&log, "mounts");
    assert!(
        !mounts.contains("9p") && !mounts.contains("virtiofs") && !mounts.contains("nfs"),
        "{mounts}"
    );
    assert_eq!(check(&log, "interfaces"), "lo,");
    assert_eq!(check(&log, "dns"), "fails");
    assert_eq!(check(&log, "direct-tcp"), "fails");
    assert_eq!(check(&log, "guest-loopback"), "fails");
    assert!(
        listener.accept().is_err(),
        "something reached the host's loopback listener"
    );

    assert_eq!(check(&log, "allowed-http"), "200");
    assert_eq!(check(&log, "allowed-https"), "200");
    for refused in [
        "refused-host",
        "host-loopback",
        "private",
        "metadata",
        "numeric-trick",
    ] {
        assert_eq!(check(&log, refused), "403", "{refused}");
    }
    // A refused CONNECT gives curl no HTTP answer from the origin.
    assert_ne!(check(&log, "tls-to-refused"), "200");
    for host in ["example.com", "10.1.2.3", "169.254.169.254", "127.0.0.1"] {
        assert!(
            build.result.refused_hosts.iter().any(|h| h == host),
            "{host} not in {:?}",
            build.result.refused_hosts
        );
    }
    assert!(
        build.stderr.contains("refused:") && build.stderr.contains("example.com"),
        "{}",
        build.stderr
    );

    for store in [
        "other-build",
        "shared-area",
        "traversal",
        "encoded-traversal",
        "write-outside",
    ] {
        assert_eq!(check(&log, store), "403", "{store}");
    }
    assert_eq!(
        check(&log, "no-token"),
        "401",
        "a request without the token"
    );
    assert_eq!(
        check(&log, "own-source"),
        "200",
        "the token reads its own source"
    );
    assert!(!project
        .path()
        .join(".contractor/builds/someone-else")
        .exists());

    assert_eq!(
        sha256(&image.expect("image").dir.join("disk.qcow2")),
        image_sha(),
        "the base image changed"
    );
    assert_no_vm_left(&build);
}

fn image_sha() -> String {
    let dir = contractor_cli::paths::data_dir()
        .expect("data dir")
        .join("images/debian-12-build");
    contractor_vm::image::load(&dir)
        .expect("manifest")
        .expect("image")
        .manifest
        .disk_sha256
}

#[test]
fn endless_output_is_cut_at_max_log_and_fails_the_build() {
    if util::skip_without_vm("endless_output_is_cut_at_max_log_and_fails_the_build") {
        return;
    }
    let project = Project::new(&small_spec("yes contractor-flood", "max_log = \"1MiB\""));
    let build = project.build();
    assert_eq!(
        build.output.status.code(),
        Some(1),
        "stderr:\n{}",
        build.stderr
    );
    assert_eq!(build.result.outcome, Outcome::Failed);
    assert_eq!(build.result.limit, Some(Limit::MaxLog));
    let log = std::fs::read(&build.result.log).expect("log");
    let marker =
        b"\n[contractor: output cut here: the build passed build.max_log = 1048576 bytes]\n";
    assert!(log.ends_with(marker));
    // The agent's control messages (phases, about a hundred bytes) share the budget with
    // the output, so the output kept is 1 MiB less those.
    let output = log.len() - marker.len();
    assert!(
        (1024 * 1024 - 4096..=1024 * 1024).contains(&output),
        "{output} bytes of output kept"
    );
    assert!(build.stderr.contains("build.max_log"), "{}", build.stderr);
    assert_no_vm_left(&build);
}

#[test]
fn artifacts_past_max_artifacts_fail_the_build_and_are_not_kept() {
    if util::skip_without_vm("artifacts_past_max_artifacts_fail_the_build_and_are_not_kept") {
        return;
    }
    let project = Project::new(&small_spec(
        "head -c 3000000 /dev/urandom > big.bin",
        "artifacts = [\"big.bin\"]\nmax_artifacts = \"1MiB\"",
    ));
    let build = project.build();
    assert_eq!(
        build.output.status.code(),
        Some(1),
        "stderr:\n{}",
        build.stderr
    );
    assert_eq!(build.result.outcome, Outcome::Failed);
    assert_eq!(build.result.limit, Some(Limit::MaxArtifacts));
    assert!(
        build.result.artifacts.is_empty(),
        "{:?}",
        build.result.artifacts
    );
    assert!(!build.record.join("artifacts/big.bin").exists());
    assert!(
        build.stderr.contains("build.max_artifacts"),
        "{}",
        build.stderr
    );
    assert_no_vm_left(&build);
}

/// Measures, while `work` runs, the longest time the host took to start and finish `true`.
fn host_probe_during<T>(work: impl FnOnce() -> T) -> (T, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicU64::new(0));
    let probe = {
        let (stop, worst) = (stop.clone(), worst.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                Command::new("true").status().expect("run true on the host");
                worst.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let result = work();
    stop.store(true, Ordering::Relaxed);
    probe.join().expect("probe");
    (result, Duration::from_millis(worst.load(Ordering::Relaxed)))
}

#[test]
fn resource_exhaustion_fails_the_build_and_the_host_stays_responsive() {
    if util::skip_without_vm("resource_exhaustion_fails_the_build_and_the_host_stays_responsive") {
        return;
    }
    // (attack, script, build limits, VM limits, the limit the build must fail on)
    let scripts = [
        (
            "fork bomb",
            "bomb() { bomb | bomb & }; bomb; sleep 600",
            "timeout = \"40s\"",
            "",
            None,
        ),
        (
            "memory hog",
            "tail /dev/zero; echo survived",
            "timeout = \"3m\"",
            "",
            Some(Limit::Memory),
        ),
        (
            "disk filler",
            "dd if=/dev/zero of=/tmp/fill bs=4M; echo survived",
            "timeout = \"5m\"",
            "disk = \"1GiB\"\n",
            Some(Limit::Disk),
        ),
    ];
    for (attack, script, limits, vm_limits, limit) in scripts {
        let project = Project::new(&format!("{}{vm_limits}", small_spec(script, limits)));
        let (build, worst) = host_probe_during(|| project.build());
        assert_ne!(
            build.result.outcome,
            Outcome::Success,
            "{attack} succeeded; stderr:\n{}",
            build.stderr
        );
        assert!(
            matches!(build.result.outcome, Outcome::Failed | Outcome::Timeout),
            "{attack}: {:?}; stderr:\n{}",
            build.result.outcome,
            build.stderr
        );
        assert!(
            !build.log().contains("survived"),
            "{attack}: the script went on"
        );
        if let Some(limit) = limit {
            assert_eq!(
                build.result.limit,
                Some(limit),
                "{attack}: result.json must name the limit; stderr:\n{}",
                build.stderr
            );
            assert!(
                build.stderr.contains(limit.field()),
                "{attack}: the summary must name {}:\n{}",
                limit.field(),
                build.stderr
            );
        }
        assert!(
            worst < Duration::from_secs(5),
            "{attack}: the host took {worst:?} to run `true`"
        );
        assert_no_vm_left(&build);
    }
    let next = Project::new(&small_spec("echo still-working", "")).build();
    assert_eq!(
        next.result.outcome,
        Outcome::Success,
        "the next build failed:\n{}",
        next.stderr
    );
    assert_eq!(
        sha256(
            &contractor_cli::paths::data_dir()
                .expect("data")
                .join("images/debian-12-build/disk.qcow2")
        ),
        image_sha()
    );
}

/// Starts `contractor build` in `project` and returns it once its script runs, with the
/// VM's name.
fn start_build(project: &Project) -> (std::process::Child, String, mpsc::Receiver<String>) {
    let mut child = Command::new(util::contractor())
        .arg("build")
        .current_dir(project.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start contractor build");
    let (lines_tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !seen.contains("contractor: phase script") {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the script never started; stderr:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
    }
    let name = vm_name_in(&seen).expect("VM name");
    (child, name, lines)
}

/// The processes whose parent is `parent`: (pid, start time, command name).
fn children_of(parent: u32) -> Vec<(u32, u64, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let name = stat[stat.find('(').map_or(0, |i| i + 1)..close].to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            let start = fields.get(19).and_then(|s| s.parse().ok()).unwrap_or(0);
            children.push((pid, start, name));
        }
    }
    children
}

/// The QEMU process of VM `name`: the one whose command line names it as its guest.
fn qemu_of(name: &str) -> Option<u32> {
    let wanted = format!("guest={name},");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let mut args = cmdline.split(|&b| b == 0);
            let is_qemu = args.next()?.ends_with(b"qemu-system-x86_64");
            let names_it = args.any(|a| a.starts_with(wanted.as_bytes()));
            (is_qemu && names_it).then_some(pid)
        })
}

/// True while process `pid` (started at `start`) exists and is not a zombie.
fn still_running(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    fields.first() != Some(&"Z") && fields.get(19).and_then(|s| s.parse().ok()) == Some(start)
}

#[test]
fn a_killed_front_end_leaves_no_vm_no_tool_and_no_overlay_and_its_record_says_interrupted() {
    if util::skip_without_vm(
        "a_killed_front_end_leaves_no_vm_no_tool_and_no_overlay_and_its_record_says_interrupted",
    ) {
        return;
    }
    let project = Project::new(&small_spec("echo started; sleep 600", ""));
    let (mut child, name, _lines) = start_build(&project);
    let first_id =
        std::fs::read_link(project.path().join(".contractor/latest")).expect("latest link");
    let tools = children_of(child.id());
    let names: Vec<&str> = tools.iter().map(|(_, _, n)| n.as_str()).collect();
    for tool in [
        "contractor-stor",
        "contractor-prox",
        "contractor-vm",
        "contractor-run",
    ] {
        // /proc/PID/stat holds the first 15 bytes of the name.
        assert!(
            names.contains(&tool),
            "no {tool} among the children {names:?}"
        );
    }
    // Every host process serving the guest is confined while it serves this build: the
    // store, the proxy and the relay by themselves, and this VM's QEMU (by libvirt's
    // sandbox under qemu:///system, by contractor-qemu under qemu:///session).
    let mut serving: Vec<(u32, String)> = tools
        .iter()
        .filter(|(_, _, tool)| {
            ["contractor-stor", "contractor-prox", "contractor-run"].contains(&tool.as_str())
        })
        .map(|(pid, _, tool)| (*pid, tool.clone()))
        .collect();
    let qemu = qemu_of(&name).unwrap_or_else(|| panic!("no QEMU process of {name}"));
    serving.push((qemu, format!("QEMU of {name}")));
    for (pid, tool) in &serving {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(
            field("NoNewPrivs:"),
            "1",
            "{tool} (pid {pid}) lacks no_new_privs"
        );
        assert_eq!(
            field("Seccomp:"),
            "2",
            "{tool} (pid {pid}) has no seccomp filter"
        );
    }
    let overlay = contractor_cli::paths::data_dir()
        .expect("data dir")
        .join("vms")
        .join(format!("{name}.qcow2"));
    assert!(
        overlay.exists(),
        "no overlay {} while the build runs",
        overlay.display()
    );
    child.kill().expect("SIGKILL contractor");
    child.wait().expect("reap");
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(15);
    let left = |()| {
        let mut left = Vec::new();
        if util::vm_left_behind(&name) {
            left.push(format!("VM {name}"));
        }
        for (pid, start, tool) in &tools {
            if still_running(*pid, *start) {
                left.push(format!("{tool} (pid {pid})"));
            }
        }
        if overlay.exists() && !util::reused_slot(&name) {
            left.push(format!("overlay {}", overlay.display()));
        }
        left
    };
    let mut remaining = left(());
    while !remaining.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        remaining = left(());
    }
    assert!(
        remaining.is_empty(),
        "15 s after SIGKILL of contractor these remain: {remaining:?}"
    );
    eprintln!(
        "all of {names:?}, the VM and its overlay were gone {:.1} s after SIGKILL",
        killed.elapsed().as_secs_f64()
    );

    std::fs::write(
        project.path().join("contractor.toml"),
        small_spec("echo next", ""),
    )
    .expect("spec");
    let next = project.build();
    assert_eq!(next.result.outcome, Outcome::Success, "{}", next.stderr);
    let first = project
        .path()
        .join(".contractor")
        .join(&first_id)
        .join("result.json");
    let first: contractor_protocol::result::BuildResult =
        serde_json::from_str(&std::fs::read_to_string(&first).expect("first result.json"))
            .expect("protocol");
    assert_eq!(first.outcome, Outcome::Interrupted);
    assert!(first.error.expect("reason").chain[0].contains("ended before the build finished"));
}

#[test]
fn a_build_returns_before_libvirt_confirms_and_its_vm_goes_even_if_its_group_is_killed() {
    if util::skip_without_vm(
        "a_build_returns_before_libvirt_confirms_and_its_vm_goes_even_if_its_group_is_killed",
    ) {
        return;
    }
    // `contractor build` returns once its VM holder has let go of the VM (the holder then
    // leads a session of its own and finishes the destroy alone). Whatever the caller does
    // next, here what a CI engine does at a job's end, SIGKILL to the job's process group,
    // the VM and its overlay still go.
    let project = Project::new(&small_spec("echo done", ""));
    let mut command = Command::new(util::contractor());
    command.arg("build").current_dir(project.path());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start contractor build");
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    let output = child.wait_with_output().expect("wait");
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let name = vm_name_in(&stderr).expect("VM name");
    assert!(
        util::wait_vm_gone(&name),
        "VM {name} or its overlay left {:?} after the build and its group were gone",
        util::VM_GONE
    );
    let record = project.path().join(".contractor/latest");
    let tools_log = std::fs::read_to_string(record.join("tools.log")).expect("tools.log");
    assert!(
        tools_log.contains(&format!("contractor-vm: stdin closed; destroying {name}")),
        "the holder let go of the VM when the build was done:\n{tools_log}"
    );
}

#[test]
fn ctrl_c_stops_the_build_within_seconds_and_says_so() {
    if util::skip_without_vm("ctrl_c_stops_the_build_within_seconds_and_says_so") {
        return;
    }
    let project = Project::new(&small_spec("echo started; sleep 600", ""));
    let (mut child, name, lines) = start_build(&project);
    let interrupted = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT contractor");
    let status = child.wait().expect("wait");
    let took = interrupted.elapsed();
    let rest: Vec<String> = lines.iter().collect();
    assert_eq!(status.code(), Some(130), "stderr:\n{}", rest.join("\n"));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        rest.iter().any(|l| l.contains("was interrupted")),
        "{rest:?}"
    );
    assert_eq!(latest_result(project.path()).outcome, Outcome::Interrupted);
    assert!(util::wait_vm_gone(&name), "VM {name} left behind");
}

#[test]
fn a_dying_agent_or_guest_kernel_is_an_infrastructure_failure_with_the_console_tail() {
    if util::skip_without_vm(
        "a_dying_agent_or_guest_kernel_is_an_infrastructure_failure_with_the_console_tail",
    ) {
        return;
    }
    for (what, script) in [
        (
            "agent killed",
            "echo killing-the-agent; kill -9 $PPID; sleep 60",
        ),
        (
            "kernel panic",
            "echo crashing-the-kernel; echo c > /proc/sysrq-trigger; sleep 60",
        ),
    ] {
        let project = Project::new(&small_spec(script, ""));
        let build = project.build();
        assert_eq!(
            build.output.status.code(),
            Some(3),
            "{what}: stderr:\n{}",
            build.stderr
        );
        assert_eq!(build.result.outcome, Outcome::Infrastructure, "{what}");
        assert!(
            build.stderr.contains("console:"),
            "{what}: no console in the summary:\n{}",
            build.stderr
        );
        assert!(
            build.stderr.contains("    | "),
            "{what}: no console tail:\n{}",
            build.stderr
        );
        assert_no_vm_left(&build);
    }
}

#[test]
fn four_builds_at_once_are_isolated_and_all_succeed() {
    if util::skip_without_vm("four_builds_at_once_are_isolated_and_all_succeed") {
        return;
    }
    let projects: Vec<Project> = (0..4)
        .map(|i| {
            Project::new(&small_spec(
                &format!("echo build-{i} > out.txt; cat out.txt"),
                "artifacts = [\"out.txt\"]",
            ))
        })
        .collect();
    let builds: Vec<util::Build> = std::thread::scope(|scope| {
        let handles: Vec<_> = projects.iter().map(|p| scope.spawn(|| p.build())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("build thread"))
            .collect()
    });
    let mut names = std::collections::BTreeSet::new();
    for (i, build) in builds.iter().enumerate() {
        assert_eq!(
            build.result.outcome,
            Outcome::Success,
            "build {i}: {}",
            build.stderr
        );
        let artifact = build.record.join("artifacts/out.txt");
        assert_eq!(
            std::fs::read_to_string(&artifact).expect("artifact"),
            format!("build-{i}\n")
        );
        names.insert(build.vm_name());
        assert_no_vm_left(build);
    }
    assert_eq!(names.len(), 4, "VM names clashed: {names:?}");
}

/// Unmounts the file system at its path when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_host_disk_fails_the_build_with_that_reason_and_keeps_earlier_records() {
    if util::skip_without_vm(
        "a_full_host_disk_fails_the_build_with_that_reason_and_keeps_earlier_records",
    ) {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED a_full_host_disk_fails_the_build_with_that_reason_and_keeps_earlier_records: mounting the small host file system it fills needs root"
        );
        return;
    }
    let spec = |size: &str| {
        format!(
            "[build]\nscript = '''\nhead -c {size} /dev/zero > out.bin\n'''\n\
             artifacts = [\"out.bin\"]\n[vm]\ncpus = 1\nmemory = \"768MiB\"\n"
        )
    };
    let project = Project::new(&spec("4096"));
    // The build records live in .contractor: put them on a 16 MiB file system.
    let records = project.path().join(".contractor");
    std::fs::create_dir(&records).expect("records dir");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "contractor-test-full"])
        .arg(&records)
        .status()
        .expect("mount");
    assert!(status.success(), "mount a tmpfs on {}", records.display());
    let _mounted = Mounted(records.clone());

    let first = project.build();
    assert_eq!(first.result.outcome, Outcome::Success, "{}", first.stderr);
    let first_result = std::fs::read(first.record.join("result.json")).expect("result");
    let first_artifact = first.record.join("artifacts/out.bin");
    assert_eq!(
        std::fs::metadata(&first_artifact).expect("artifact").len(),
        4096
    );

    std::fs::write(project.path().join("contractor.toml"), spec("64M")).expect("spec");
    let second = project.build();
    assert_ne!(second.result.outcome, Outcome::Success, "{}", second.stderr);
    assert!(
        second.stderr.contains("disk is full"),
        "the summary must say the host's disk is full:\n{}",
        second.stderr
    );
    let error = second.result.error.as_ref().expect("error in result.json");
    assert!(
        error.chain.iter().any(|m| m.contains("disk is full")),
        "{error:?}"
    );
    assert!(
        !second.record.join("artifacts/out.bin").exists(),
        "no part of the upload is kept"
    );
    assert_no_vm_left(&second);

    assert_eq!(
        std::fs::read(first.record.join("result.json")).expect("result"),
        first_result,
        "the earlier build's record is unchanged"
    );
    assert_eq!(
        std::fs::read(&first_artifact).expect("artifact"),
        vec![0u8; 4096]
    );
}

/// What a stand-in agent saw of the process that opened its control channel.
struct ShellPeer {
    pid: i32,
    exe: std::path::PathBuf,
    status: String,
    request: String,
    typed: String,
}

/// A stand-in for a kept VM's agent on the Unix socket `socket`: it answers one `shell`
/// request as the real agent does (after the end of a build it says `shell_started`), echoes
/// one typed line, then closes the channel as a VM that powers off does.
fn stand_in_agent(socket: &std::path::Path) -> std::thread::JoinHandle<ShellPeer> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind the stand-in");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept the shell's connection");
        let pid = getsockopt(&stream, PeerCredentials)
            .expect("SO_PEERCRED")
            .pid();
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        let mut request = String::new();
        reader.read_line(&mut request).expect("the shell request");
        // The request came after the peer's confinement (if any): look at it now.
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        writer
            .write_all(b"{\"type\":\"done\"}\n{\"type\":\"shell_started\"}\nstand-in ready\r\n")
            .expect("answer");
        let mut typed = String::new();
        reader.read_line(&mut typed).expect("a typed line");
        writer
            .write_all(format!("you typed: {typed}").as_bytes())
            .expect("echo");
        ShellPeer {
            pid,
            exe,
            status,
            request,
            typed,
        }
    })
}

/// `contractor shell ID` on a kept VM whose control channel is a stand-in's socket: the
/// front end never connects to the channel; a confined `contractor-run` holds the
/// conversation, and the user still sees the shell's bytes and types into it.
#[test]
fn the_shell_conversation_is_held_by_a_confined_contractor_run_not_by_the_front_end() {
    let project = Project::new(&small_spec("true", ""));
    let id = "20261205-000000-5e11aa";
    let record = project.path().join(".contractor/builds").join(id);
    std::fs::create_dir_all(&record).expect("record dir");
    let socket = project.path().join("control.sock");
    let agent = stand_in_agent(&socket);
    let kept = serde_json::json!({
        "name": "contractor-stand-in-shell",
        "uri": "test:///default",
        "control_socket": socket,
    });
    std::fs::write(record.join("vm.json"), kept.to_string()).expect("vm.json");

    let mut child = Command::new(util::contractor())
        .args(["shell", id])
        .current_dir(project.path())
        .env("TERM", "xterm-stand-in")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run contractor shell");
    let front_end = i32::try_from(child.id()).expect("pid");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"echo hi\n")
        .expect("type");
    let output = child.wait_with_output().expect("contractor shell");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let peer = agent.join().expect("the stand-in agent");

    assert_ne!(
        peer.pid, front_end,
        "the front end opened the VM's control channel itself"
    );
    assert_eq!(
        peer.exe.file_name().and_then(|n| n.to_str()),
        Some("contractor-run"),
        "the channel's peer is {}",
        peer.exe.display()
    );
    assert!(
        peer.status.contains("NoNewPrivs:\t1") && peer.status.contains("Seccomp:\t2"),
        "the conversation is not confined:\n{}",
        peer.status
    );
    let request: serde_json::Value =
        serde_json::from_str(peer.request.trim_end()).expect("a JSON shell request");
    assert_eq!(request["type"], "shell", "{request}");
    assert_eq!(request["term"], "xterm-stand-in", "{request}");
    assert_eq!(peer.typed, "echo hi\n");
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("stand-in ready\r\nyou typed: echo hi\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("shell_started"), "{stdout}");
    assert!(!record.join("vm.json").exists(), "vm.json is removed");
}
