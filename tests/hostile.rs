//! The hostile-guest and hostile-project acceptance suite (issue 13): real builds whose
//! scripts, as root in the guest, take the agent's own virtio-serial ports
//! (tests/hostile/steal.pl: pidfd_open + pidfd_getfd) and write what a compromised guest
//! would, or whose project directory carries links, FIFOs and hostile names. Each test
//! checks that the build ends within its timeout with a named outcome, that the
//! `contractor` process's peak RSS stays under [`RSS_BAR_KIB`], and that no VM is left.
//! docs/security.md lists each attack with its test.

mod util;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use contractor_protocol::result::{BuildResult, Limit, Outcome};
use util::{vm_name_in, Project};

/// The bar for the host side's peak resident memory: 256 MiB.
const RSS_BAR_KIB: u64 = 256 * 1024;

/// The tool the scripts use to take one of the agent's ports.
const STEAL: &str = include_str!("hostile/steal.pl");

/// One `contractor build`, watched.
struct Run {
    /// The exit code (None: killed by the watchdog or a signal).
    code: Option<i32>,
    stderr: String,
    result: Option<BuildResult>,
    /// Peak RSS of `contractor` and the processes it waited for (wait4's ru_maxrss: the
    /// largest of them). Today the store, proxy and relay run inside `contractor`, so this
    /// is the whole host side but QEMU (bounded by `vm.memory`) and libvirt.
    peak_rss_kib: u64,
    elapsed: Duration,
}

impl Run {
    fn code_of_error(&self) -> &str {
        self.result
            .as_ref()
            .and_then(|r| r.error.as_ref())
            .map_or("", |e| e.code.as_str())
    }

    fn log(&self, project: &Project) -> String {
        let id = &self.result.as_ref().expect("result").id;
        std::fs::read_to_string(
            project
                .path()
                .join(".contractor/builds")
                .join(id)
                .join("build.log"),
        )
        .unwrap_or_default()
    }

    /// What every hostile build must satisfy, whatever its outcome.
    fn assert_contained(&self, name: &str, limit: Duration) {
        eprintln!(
            "{name}: exit {:?} in {:.1}s, peak RSS {} KiB, error {:?}",
            self.code,
            self.elapsed.as_secs_f64(),
            self.peak_rss_kib,
            self.code_of_error()
        );
        assert!(
            self.code.is_some(),
            "{name}: the watchdog had to kill contractor after {limit:?}; stderr:\n{}",
            self.stderr
        );
        assert!(
            self.result.is_some(),
            "{name}: no result.json; stderr:\n{}",
            self.stderr
        );
        assert!(
            self.peak_rss_kib < RSS_BAR_KIB,
            "{name}: contractor peaked at {} KiB, over the {RSS_BAR_KIB} KiB bar",
            self.peak_rss_kib
        );
        if let Some(vm) = vm_name_in(&self.stderr) {
            assert!(util::wait_vm_gone(&vm), "{name}: VM {vm} left behind");
        }
    }
}

/// Runs `contractor build` in `project`, killed by a watchdog after `limit`; stderr goes
/// to a file so that a flood cannot block it, and is read back at most 16 MiB.
fn build(project: &Project, limit: Duration) -> Run {
    let stderr_path = project.path().join(".stderr");
    let stderr_file = std::fs::File::create(&stderr_path).expect("stderr file");
    let started = Instant::now();
    // Reaped by wait4 below, which also reports its peak RSS (std's wait does not).
    #[allow(clippy::zombie_processes)]
    let child = Command::new(util::contractor())
        .arg("build")
        .current_dir(project.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .process_group(0)
        .spawn()
        .expect("run contractor build");
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let mut status = 0;
    // wait4 (the waited child's own peak RSS) is not in nix.
    // SAFETY: rusage is plain old data; zeroed is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into locals.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4");
    let elapsed = started.elapsed();
    let _ = done_tx.send(());
    watchdog.join().expect("watchdog");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let mut stderr = Vec::new();
    std::fs::File::open(&stderr_path)
        .expect("stderr")
        .take(16 << 20)
        .read_to_end(&mut stderr)
        .expect("read stderr");
    let result = std::fs::read_dir(project.path().join(".contractor/builds"))
        .ok()
        .and_then(|mut entries| entries.next())
        .and_then(|entry| entry.ok())
        .and_then(|entry| std::fs::read_to_string(entry.path().join("result.json")).ok())
        .map(|text| serde_json::from_str(&text).expect("result.json matches the protocol"));
    Run {
        code,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        result,
        peak_rss_kib: usage.ru_maxrss as u64,
        elapsed,
    }
}

/// A project whose script may use `perl steal.pl PORT`.
fn hostile_project(script: &str, build_extra: &str) -> Project {
    let project = Project::new(&util::small_spec(script, build_extra));
    std::fs::write(project.path().join("steal.pl"), STEAL).expect("steal.pl");
    project
}

#[test]
fn a_control_line_without_newline_ends_the_build_at_its_bound() {
    if util::skip_without_vm("a_control_line_without_newline_ends_the_build_at_its_bound") {
        return;
    }
    let project = hostile_project(
        "head -c 67108864 /dev/zero | tr '\\0' x | perl steal.pl org.contractor.control\nsleep 300",
        "timeout = \"4m\"",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("control line", Duration::from_secs(300));
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(run.code_of_error(), "control_line_too_long");
    assert!(
        run.elapsed < Duration::from_secs(200),
        "ended at the bound, not the timeout"
    );
}

#[test]
fn a_flood_of_control_messages_counts_against_max_log() {
    if util::skip_without_vm("a_flood_of_control_messages_counts_against_max_log") {
        return;
    }
    let project = hostile_project(
        r#"yes '{"type":"phase","phase":"script"}' | head -c 200000000 | perl steal.pl org.contractor.control
sleep 300"#,
        "timeout = \"4m\"\nmax_log = \"1MiB\"",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("control flood", Duration::from_secs(300));
    assert_eq!(
        run.code,
        Some(1),
        "{}",
        &run.stderr[..run.stderr.len().min(4000)]
    );
    let result = run.result.as_ref().expect("result");
    assert_eq!(result.limit, Some(Limit::MaxLog), "{result:?}");
    assert!(
        run.stderr.len() < 4 << 20,
        "contractor printed {} bytes on stderr",
        run.stderr.len()
    );
}

#[test]
fn an_oversized_guest_error_is_capped_in_result_json() {
    if util::skip_without_vm("an_oversized_guest_error_is_capped_in_result_json") {
        return;
    }
    // One line under the 1 MiB bound: 100 causes of 9,000 bytes each.
    let project = hostile_project(
        r#"perl -e 'print "{\"type\":\"error\",\"code\":\"x\",\"chain\":[", join(",", map { "\"" . ("e" x 9000) . "\"" } 1..100), "]}\n{\"type\":\"done\"}\n"' | perl steal.pl org.contractor.control
sleep 300"#,
        "timeout = \"4m\"",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("oversized error", Duration::from_secs(300));
    assert_ne!(run.code, Some(0));
    let id = &run.result.as_ref().expect("result").id;
    let size = std::fs::metadata(
        project
            .path()
            .join(".contractor/builds")
            .join(id)
            .join("result.json"),
    )
    .expect("result.json")
    .len();
    assert!(size < 128 * 1024, "result.json has {size} bytes");
    let chain = &run
        .result
        .as_ref()
        .and_then(|r| r.error.as_ref())
        .expect("error")
        .chain;
    assert!(chain.len() <= 16, "{} causes kept", chain.len());
    assert!(
        run.stderr.len() < 64 * 1024,
        "stderr has {} bytes",
        run.stderr.len()
    );
}

#[test]
fn a_guest_that_claims_success_without_its_artifacts_fails_on_the_host() {
    if util::skip_without_vm("a_guest_that_claims_success_without_its_artifacts_fails_on_the_host")
    {
        return;
    }
    let project = hostile_project(
        r#"printf '{"type":"script_exited","code":0}\n{"type":"done"}\n' | perl steal.pl org.contractor.control
sleep 300"#,
        "timeout = \"4m\"\nartifacts = [\"declared-but-never-made\"]",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("lying guest", Duration::from_secs(300));
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(run.code_of_error(), "artifact_missing");
    assert_eq!(
        run.result.as_ref().expect("result").outcome,
        Outcome::Failed
    );
}

#[test]
fn a_malformed_tunnel_frame_ends_the_build_at_once() {
    if util::skip_without_vm("a_malformed_tunnel_frame_ends_the_build_at_once") {
        return;
    }
    let project = hostile_project(
        "head -c 64 /dev/zero | tr '\\0' '\\377' | perl steal.pl org.contractor.tunnel\nsleep 300",
        "timeout = \"4m\"",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("tunnel frame", Duration::from_secs(300));
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(run.code_of_error(), "tunnel_broken");
    assert!(
        run.elapsed < Duration::from_secs(150),
        "ended at once, not at the timeout"
    );
}

#[test]
fn a_frozen_agent_is_reported_unresponsive_not_as_a_timeout() {
    if util::skip_without_vm("a_frozen_agent_is_reported_unresponsive_not_as_a_timeout") {
        return;
    }
    let project = hostile_project(
        "kill -STOP $(perl steal.pl --pid org.contractor.control)\nsleep 300",
        "timeout = \"4m\"",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("frozen guest", Duration::from_secs(300));
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(run.code_of_error(), "guest_unresponsive");
    assert!(
        run.elapsed < Duration::from_secs(150),
        "ended on liveness, not at the timeout"
    );
}

#[test]
fn empty_files_in_deep_trees_cannot_fill_the_host_past_max_artifacts() {
    if util::skip_without_vm("empty_files_in_deep_trees_cannot_fill_the_host_past_max_artifacts") {
        return;
    }
    let project = hostile_project(
        r#"auth="Authorization: Bearer $CONTRACTOR_STORE_TOKEN"
base="$CONTRACTOR_STORE/builds/$CONTRACTOR_BUILD_ID/artifacts"
i=0
while [ $i -lt 2000 ]; do
  i=$((i+1))
  code=$(curl -s --noproxy '*' -o /tmp/body -w '%{http_code}' -X PUT --data-binary '' -H "$auth" "$base/t$i/a/b/c/d/e/f/g/h/i/j/k/l/m/n/empty")
  if [ "$code" != 201 ]; then echo "REFUSED $i $code $(cat /tmp/body)"; break; fi
done
echo "PUTS $i""#,
        "timeout = \"4m\"\nmax_artifacts = \"1MiB\"",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("store disk", Duration::from_secs(300));
    let log = run.log(&project);
    assert!(log.contains("REFUSED") && log.contains(" 413 "), "{log}");
    let id = &run.result.as_ref().expect("result").id;
    let artifacts = project
        .path()
        .join(".contractor/builds")
        .join(id)
        .join("artifacts");
    let (entries, bytes) = disk_use(&artifacts);
    eprintln!("store disk: {entries} entries, {bytes} bytes of blocks under artifacts/");
    assert!(
        entries <= 256,
        "{entries} files and directories for max_artifacts = 1 MiB"
    );
    assert!(
        bytes <= 2 << 20,
        "{bytes} bytes on disk for max_artifacts = 1 MiB"
    );
}

/// Files and directories under `dir`, and the bytes of blocks they hold (st_blocks).
fn disk_use(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut count = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let meta = entry.metadata().expect("metadata");
            count += 1;
            bytes += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    (count, bytes)
}

#[test]
fn links_fifos_and_devices_in_the_project_are_never_opened_on_the_host() {
    if util::skip_without_vm("links_fifos_and_devices_in_the_project_are_never_opened_on_the_host")
    {
        return;
    }
    let outside = tempfile::NamedTempFile::new().expect("host file");
    std::fs::write(outside.path(), "secret-line\n").expect("write");
    let project = hostile_project(
        r#"check() { echo "CHECK $1 $2"; }
if [ -f outside/secret-line ]; then check outside-patterns not-applied; else check outside-patterns applied; fi
if [ -e pipe ] || [ -e sub/pipe ]; then check fifo packed; else check fifo skipped; fi
if [ -f kept.txt ]; then check kept present; else check kept missing; fi"#,
        "timeout = \"4m\"",
    );
    let p = project.path();
    // A git work tree, so that its .gitignore files are read (outside one they are not).
    std::fs::create_dir_all(p.join(".git")).expect("mkdir");
    std::fs::write(p.join(".git/HEAD"), "ref: refs/heads/main\n").expect("write");
    std::os::unix::fs::symlink("/dev/zero", p.join(".gitignore")).expect("link");
    std::fs::create_dir_all(p.join("sub")).expect("mkdir");
    std::fs::create_dir_all(p.join("outside")).expect("mkdir");
    mkfifo(&p.join("sub/.gitignore"));
    mkfifo(&p.join("pipe"));
    std::os::unix::fs::symlink(outside.path(), p.join("outside/.gitignore")).expect("link");
    std::fs::write(p.join("outside/secret-line"), "x").expect("write");
    std::fs::write(p.join("kept.txt"), "x").expect("write");
    if nix::unistd::geteuid().is_root() {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        // makedev(1, 3) is /dev/null's device.
        mknod(
            &p.join("null-device"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o600),
            makedev(1, 3),
        )
        .expect("mknod");
    } else {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"SKIPPED part of links_fifos_and_devices_in_the_project_are_never_opened_on_the_host: a device node in the source needs root to create\n");
    }
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("project files", Duration::from_secs(300));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let log = run.log(&project);
    let check = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("CHECK {name} ")))
            .unwrap_or_else(|| panic!("no CHECK {name} in:\n{log}"))
            .to_string()
    };
    assert_eq!(check("outside-patterns"), "not-applied");
    assert_eq!(check("fifo"), "skipped");
    assert_eq!(check("kept"), "present");
    for named in [
        ".gitignore is not applied",
        "sub/.gitignore is not applied",
        "skipped pipe",
    ] {
        assert!(
            run.stderr.contains(named),
            "no warning {named:?}:\n{}",
            run.stderr
        );
    }
    if nix::unistd::geteuid().is_root() {
        assert!(run.stderr.contains("skipped null-device"), "{}", run.stderr);
    }
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
}

#[test]
fn guest_chosen_names_are_escaped_in_contractors_own_lines() {
    if util::skip_without_vm("guest_chosen_names_are_escaped_in_contractors_own_lines") {
        return;
    }
    let project = hostile_project(
        r#"mkdir out && touch "out/$(printf 'a\033]0;pwned\007b')""#,
        "timeout = \"4m\"\nartifacts = [\"out\"]",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("escapes", Duration::from_secs(300));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        !run.stderr.contains('\u{1b}'),
        "a raw ESC reached the terminal:\n{:?}",
        run.stderr
    );
    assert!(
        run.stderr.contains("\\x1b"),
        "the name is shown escaped:\n{}",
        run.stderr
    );
}

/// 1,200 idle connections (over the agent's 496, `GUEST_CONNECTIONS_MAX`) stop neither
/// output nor a real upload, and one more connection to the proxy waits for its turn and is
/// answered by the proxy (not refused by the agent) once they close.
#[test]
fn a_thousand_idle_connections_do_not_stop_output_or_a_real_upload_and_one_more_waits_its_turn() {
    if util::skip_without_vm("a_thousand_idle_connections_do_not_stop_output_or_a_real_upload") {
        return;
    }
    let project = hostile_project(
        r#"mkfifo /tmp/release && touch /tmp/held
cat > /tmp/hold.sh <<'EOF'
for i in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/8480 && echo >> /tmp/held && cat /tmp/release) 2>/dev/null & done
for i in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/3128 && echo >> /tmp/held && cat /tmp/release) 2>/dev/null & done
EOF
bash /tmp/hold.sh
# Until all 1,200 are connected (accepted or waiting in a listen queue).
for i in $(seq 240); do
  held=$(wc -l < /tmp/held)
  [ "$held" -ge 1200 ] && break
  sleep 1
done
echo "held $held"
echo marker-after-the-connections
echo made > hello
curl -s -o /tmp/answer -w '%{http_code}' -x http://127.0.0.1:3128 http://refused.invalid/ > /tmp/code &
sleep 3
echo "answered-while-held-$(cat /tmp/code)"
exec 4<>/tmp/release; exec 4>&-; sleep 1; exec 4<>/tmp/release; exec 4>&-
wait %%
echo "proxy-answered-$(cat /tmp/code)""#,
        "timeout = \"4m\"\nartifacts = [\"hello\"]",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("connections", Duration::from_secs(300));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let log = run.log(&project);
    assert!(log.contains("marker-after-the-connections"), "{log}");
    // Nothing while every slot is held; then the proxy's refusal of a host off the allow
    // list, not the agent's 503.
    assert!(log.contains("answered-while-held-\n"), "{log}");
    assert!(log.contains("proxy-answered-403"), "{log}");
    let id = &run.result.as_ref().expect("result").id;
    let stored = project
        .path()
        .join(".contractor/builds")
        .join(id)
        .join("artifacts/hello");
    assert_eq!(std::fs::read_to_string(stored).expect("artifact"), "made\n");
}

#[test]
fn artifact_names_the_store_cannot_take_fail_the_build_not_the_infrastructure() {
    if util::skip_without_vm(
        "artifact_names_the_store_cannot_take_fail_the_build_not_the_infrastructure",
    ) {
        return;
    }
    for (case, make) in [
        ("backslash", r#"mkdir out && touch 'out/a\b'"#),
        (
            "non-UTF-8",
            r#"mkdir out && touch "out/$(printf 'a\377')" "out/$(printf 'a\376')""#,
        ),
    ] {
        let project = hostile_project(make, "timeout = \"4m\"\nartifacts = [\"out\"]");
        let run = build(&project, Duration::from_secs(300));
        run.assert_contained(case, Duration::from_secs(300));
        assert_eq!(run.code, Some(1), "{case}: {}", run.stderr);
        assert_eq!(run.code_of_error(), "artifact_name", "{case}");
    }
}

#[test]
fn a_directory_where_the_cache_goes_does_not_break_cache_clear() {
    if util::skip_without_vm("a_directory_where_the_cache_goes_does_not_break_cache_clear") {
        return;
    }
    let project = hostile_project(
        r#"mkdir -p /root/cached && echo x > /root/cached/f
curl -s --noproxy '*' -o /dev/null -w '%{http_code}\n' -X PUT --data-binary x -H "Authorization: Bearer $CONTRACTOR_STORE_TOKEN" "$CONTRACTOR_STORE/builds/$CONTRACTOR_BUILD_ID/artifacts/.contractor-cache.tar/inside""#,
        "timeout = \"4m\"\n[cache]\npaths = [\"/root/cached\"]",
    );
    let run = build(&project, Duration::from_secs(300));
    run.assert_contained("cache directory", Duration::from_secs(300));
    let clear = Command::new(util::contractor())
        .args(["cache", "clear"])
        .current_dir(project.path())
        .output()
        .expect("cache clear");
    assert!(
        clear.status.success(),
        "cache clear: {}",
        String::from_utf8_lossy(&clear.stderr)
    );
    let cache = project.path().join(".contractor/cache");
    let left = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "{} still holds {left} entries", cache.display());
}
