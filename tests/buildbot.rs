//! End-to-end: a real Buildbot (Debian's `buildbot` and `buildbot-worker`, with PyPI's
//! `buildbot-www` for its REST API; scripts/setup installs them) whose builders run
//! `contractor build` through contrib/buildbot/contractor_step.py. The test writes a
//! master.cfg in a temporary master directory, starts two workers on two "hosts" of their
//! own — network namespaces it makes, each joined to this machine by a veth pair — that
//! reach the master over their own links, and drives the master through its REST API as a
//! user or another service would: forcing builds, reading builds, steps and logs, stopping
//! a build. The project is a git repository made at test time, checked out by the
//! builders' Git step; each build's artifacts and result.json are uploaded to the master.
//!
//! It checks: builds spread over both workers, with the artifact on the master; a failing
//! script is a FAILURE (Buildbot's result 2), libvirt unreachable an EXCEPTION (4), not a
//! FAILURE; a build stopped from the master is CANCELLED (6), its `contractor build` ended
//! by SIGTERM (its record says `interrupted`), and its VM is gone.
//!
//! VMs: four, of one shape restored from one snapshot (two builds of hello, a failing
//! script, a sleeping one); the infrastructure failure boots none.
//! Needs root (the namespaces); skips, saying so, without it.

mod util;

use util::run;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use contractor_protocol::result::{BuildResult, Outcome};
use serde_json::{json, Value};

/// Buildbot's result codes (buildbot.process.results).
const SUCCESS: i64 = 0;
const FAILURE: i64 = 2;
const EXCEPTION: i64 = 4;
const CANCELLED: i64 = 6;

/// The two workers, one per namespace.
const WORKERS: [&str; 2] = ["west", "east"];

/// The builders: name, the project's branch, extra environment of the step.
const BUILDERS: [(&str, &str, &str); 4] = [
    ("hello", "main", ""),
    ("fails", "fails", ""),
    // contractor-vm cannot reach libvirt: an infrastructure failure, before any VM.
    (
        "no-libvirt",
        "main",
        "qemu+unix:///system?socket=/nonexistent/contractor-test/libvirt-sock",
    ),
    ("sleeps", "sleeps", ""),
];

/// How long a build may take here (TCG, a shared machine).
const BUILD_DEADLINE: Duration = Duration::from_secs(240);

/// Call first: true when the test must skip (said on stderr), or when it cannot run here.
fn skip(test: &str) -> bool {
    if util::skip_without_vm(test) {
        return true;
    }
    let reason = if !nix::unistd::geteuid().is_root() {
        Some(
            "its workers' hosts are network namespaces, which needs root (CI runs it as root)"
                .to_string(),
        )
    } else {
        missing_buildbot()
    };
    let Some(reason) = reason else {
        return false;
    };
    if std::env::var_os("CONTRACTOR_REQUIRE_VM").is_some_and(|v| v == "1") {
        panic!("{test} cannot run with CONTRACTOR_REQUIRE_VM=1: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
    true
}

/// What of Buildbot is missing here, if anything (scripts/setup installs it all).
fn missing_buildbot() -> Option<String> {
    for program in ["buildbot", "buildbot-worker"] {
        let found = Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{program}` is not installed (run scripts/setup)"));
        }
    }
    // The REST API is served by the master's www service, which needs the buildbot-www
    // package's base application; Debian does not package it.
    let www = Command::new(buildbot_python())
        .args(["-c", "import buildbot_www"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !www {
        return Some("Buildbot's buildbot_www module is missing (run scripts/setup)".to_string());
    }
    None
}

/// The Python that runs the `buildbot` script (its `#!` line).
fn buildbot_python() -> PathBuf {
    let script = String::from_utf8_lossy(
        &Command::new("sh")
            .args(["-c", "command -v buildbot"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_string();
    std::fs::read_to_string(&script)
        .ok()
        .and_then(|text| {
            let first = text.lines().next()?.strip_prefix("#!")?.trim().to_string();
            first.split_whitespace().next().map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A worker's host: a network namespace joined to this machine by a veth pair, with no
/// other route out than to the master's address.
struct Host {
    namespace: String,
    outer: String,
    /// This machine's end of the link.
    gateway: String,
}

impl Host {
    fn new(n: u32) -> Host {
        let pid = std::process::id();
        let net = (pid + n * 11) % 250 + 1;
        let host = Host {
            namespace: format!("contractor-bb-{pid}-{n}"),
            outer: format!("vbb{}x{n}a", pid % 100_000),
            gateway: format!("10.232.{net}.1"),
        };
        let inner = format!("vbb{}x{n}b", pid % 100_000);
        run("ip", &["netns", "add", &host.namespace]);
        run(
            "ip",
            &[
                "link",
                "add",
                &host.outer,
                "type",
                "veth",
                "peer",
                "name",
                &inner,
            ],
        );
        run("ip", &["link", "set", &inner, "netns", &host.namespace]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", host.gateway),
                "dev",
                &host.outer,
            ],
        );
        run("ip", &["link", "set", &host.outer, "up"]);
        host.exec(&[
            "ip",
            "addr",
            "add",
            &format!("10.232.{net}.2/30"),
            "dev",
            &inner,
        ]);
        host.exec(&["ip", "link", "set", &inner, "up"]);
        // contractor's store and proxy listen on the namespace's loopback.
        host.exec(&["ip", "link", "set", "lo", "up"]);
        host
    }

    /// `args` run in the namespace.
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.namespace];
        all.extend(args);
        run("ip", &all)
    }

    /// Routes `address` (the master's, on another link of this machine) over this link.
    fn route_to(&self, address: &str) {
        if address != self.gateway {
            self.exec(&["ip", "route", "add", address, "via", &self.gateway]);
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .status();
        // Gone with the namespace, unless that failed.
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer])
            .stderr(Stdio::null())
            .status();
    }
}

/// A process of Buildbot's run in the foreground, in its own process group: stopped with
/// SIGTERM to the group (then SIGKILL) when dropped, so a failing test leaves none.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-i32::try_from(self.0.id()).expect("pid"));
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A free TCP port on `address` (bound, then released for Buildbot to take).
fn free_port(address: &str) -> u16 {
    let ip: Ipv4Addr = address.parse().expect("address");
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The project's repository: `main` builds hello and collects it, `fails` has a script
/// that exits 3 (the script's code, which must not read as contractor's own
/// infrastructure code), `sleeps` sleeps.
fn repository(dir: &Path) -> PathBuf {
    let work = dir.join("project");
    std::fs::create_dir(&work).expect("project");
    let git = |args: &[&str]| {
        util::git(&work, args);
    };
    let spec = |script: &str| {
        std::fs::write(
            work.join("contractor.toml"),
            format!(
                "[build]\nscript = \"{script}\"\nartifacts = [\"hello\"]\n\
                 [vm]\ncpus = 1\nmemory = \"768MiB\"\n"
            ),
        )
        .expect("contractor.toml");
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(
        work.join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"hello from buildbot\"); return 0; }\n",
    )
    .expect("hello.c");
    spec("cc -O2 -o hello hello.c && ./hello");
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "hello"]);
    git(&["checkout", "-q", "-b", "fails"]);
    spec("echo about to fail; exit 3");
    git(&["commit", "-q", "-am", "fails"]);
    git(&["checkout", "-q", "-b", "sleeps", "main"]);
    spec("echo sleeping now; sleep 600");
    git(&["commit", "-q", "-am", "sleeps"]);
    let bare = dir.join("project.git");
    run(
        "git",
        &[
            "clone",
            "-q",
            "--bare",
            &work.to_string_lossy(),
            &bare.to_string_lossy(),
        ],
    );
    bare
}

/// The master.cfg: the two workers, a force scheduler, one builder per entry of
/// BUILDERS (each on both workers): checkout, ContractorBuild, uploads.
fn master_cfg(pb: &str, www: u16, repo: &Path) -> String {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/buildbot");
    let contractor = util::contractor();
    let mut builders = String::new();
    for (name, branch, uri) in BUILDERS {
        let env = if uri.is_empty() {
            "{}".to_string()
        } else {
            format!("{{'CONTRACTOR_LIBVIRT_URI': {uri:?}}}")
        };
        builders.push_str(&format!("builder({name:?}, {branch:?}, {env})\n"));
    }
    format!(
        r#"# Written by tests/buildbot.rs.
import sys
sys.path.insert(0, {contrib:?})
from buildbot.plugins import schedulers, steps, util, worker
from contractor_step import ContractorBuild

c = BuildmasterConfig = {{}}
c['title'] = 'contractor test'
c['buildbotURL'] = 'http://127.0.0.1:{www}/'
c['buildbotNetUsageData'] = None
c['db'] = {{'db_url': 'sqlite:///state.sqlite'}}
c['protocols'] = {{'pb': {{'port': 'tcp:{pb}'}}}}
c['www'] = {{'port': 'tcp:{www}:interface=127.0.0.1', 'plugins': {{}}}}
c['workers'] = [worker.Worker(name, 'pass-' + name) for name in {workers:?}]
c['builders'] = []

def builder(name, branch, env):
    f = util.BuildFactory()
    f.addStep(steps.Git(repourl={repo:?}, branch=branch, mode='full', method='clobber'))
    f.addStep(ContractorBuild(contractor={contractor:?}, env=env))
    dest = util.Interpolate('artifacts/%(prop:buildername)s/%(prop:buildnumber)s')
    f.addStep(steps.DirectoryUpload(workersrc='.contractor/latest/artifacts', masterdest=dest))
    f.addStep(steps.FileUpload(
        workersrc='.contractor/latest/result.json',
        masterdest=util.Interpolate('%(kw:dest)s/result.json', dest=dest)))
    c['builders'].append(util.BuilderConfig(
        name=name, workernames={workers:?}, factory=f, collapseRequests=False))

{builders}
c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames={names:?})]
"#,
        contrib = contrib.to_string_lossy(),
        contractor = contractor.to_string_lossy(),
        repo = format!("file://{}", repo.display()),
        workers = WORKERS,
        names = BUILDERS.map(|b| b.0),
    )
}

/// A master with its two workers, each in a namespace of its own.
struct Fleet {
    api: String,
    // Dropped in this order: workers, master, the namespaces, the directory.
    workers: Vec<Daemon>,
    _master: Daemon,
    hosts: Vec<Host>,
    dir: tempfile::TempDir,
}

impl Fleet {
    fn start() -> Fleet {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::tempdir().expect("temp dir");
        let repo = repository(dir.path());
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let hosts: Vec<Host> = (0..2).map(|i| Host::new(n * 2 + i)).collect();
        // The master listens on the first link's address; the second host reaches it
        // through its own link (this machine answers for all its addresses).
        let master_address = hosts[0].gateway.clone();
        for host in &hosts {
            host.route_to(&master_address);
        }
        let pb = free_port(&master_address);
        let www = free_port("127.0.0.1");
        let basedir = dir.path().join("master");
        run(
            "buildbot",
            &["create-master", "--quiet", &basedir.to_string_lossy()],
        );
        std::fs::write(
            basedir.join("master.cfg"),
            master_cfg(&format!("{pb}:interface={master_address}"), www, &repo),
        )
        .expect("master.cfg");
        run("buildbot", &["checkconfig", &basedir.to_string_lossy()]);
        let master = Daemon(
            Command::new("buildbot")
                .args(["start", "--nodaemon"])
                .arg(&basedir)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(dir.path().join("master.out")).expect("out"))
                .stderr(std::fs::File::create(dir.path().join("master.err")).expect("err"))
                .process_group(0)
                .spawn()
                .expect("start the master"),
        );
        let mut fleet = Fleet {
            api: format!("http://127.0.0.1:{www}/api/v2"),
            dir,
            workers: Vec::new(),
            _master: master,
            hosts,
        };
        fleet.wait_for("the master's REST API", |f| f.try_get("/workers").is_some());
        for (name, host) in WORKERS.iter().zip(&fleet.hosts) {
            let basedir = fleet.dir.path().join(format!("worker-{name}"));
            run(
                "buildbot-worker",
                &[
                    "create-worker",
                    "--quiet",
                    &basedir.to_string_lossy(),
                    &format!("{master_address}:{pb}"),
                    name,
                    &format!("pass-{name}"),
                ],
            );
            let log = |suffix: &str| {
                std::fs::File::create(fleet.dir.path().join(format!("worker-{name}.{suffix}")))
                    .expect("worker log")
            };
            fleet.workers.push(Daemon(
                Command::new("ip")
                    .args(["netns", "exec", &host.namespace])
                    .args(["buildbot-worker", "start", "--nodaemon"])
                    .arg(&basedir)
                    .stdin(Stdio::null())
                    .stdout(log("out"))
                    .stderr(log("err"))
                    .process_group(0)
                    .spawn()
                    .expect("start a worker"),
            ));
        }
        fleet.wait_for("both workers to connect", |f| {
            f.try_get("/workers").is_some_and(|v| {
                v["workers"].as_array().is_some_and(|workers| {
                    workers.len() == WORKERS.len()
                        && workers
                            .iter()
                            .all(|w| w["connected_to"].as_array().is_some_and(|c| !c.is_empty()))
                })
            })
        });
        fleet
    }

    /// Waits (at most a minute) until `ready`; fails with the master's log otherwise.
    fn wait_for(&self, what: &str, ready: impl Fn(&Fleet) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready(self) {
            assert!(
                Instant::now() < deadline,
                "waited a minute for {what}; the master's log:\n{}",
                self.master_log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn master_log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("master/twistd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(8000);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_string()
    }

    /// GET `path` of the REST API, or None if the master does not answer it (yet).
    fn try_get(&self, path: &str) -> Option<Value> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "10", &format!("{}{path}", self.api)])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn get(&self, path: &str) -> Value {
        self.try_get(path).unwrap_or_else(|| {
            panic!(
                "GET {path} failed; the master's log:\n{}",
                self.master_log()
            )
        })
    }

    /// The raw text of `path` of the REST API.
    fn get_text(&self, path: &str) -> String {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "10", &format!("{}{path}", self.api)])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A JSON-RPC call on `path`, as the web UI makes it (a control action).
    fn control(&self, path: &str, method: &str, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "method": method, "id": 1, "params": params});
        let out = Command::new("curl")
            .args([
                "-sf",
                "--max-time",
                "30",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
                &format!("{}{path}", self.api),
            ])
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "POST {path} {body} failed: {}; the master's log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            self.master_log()
        );
        let reply: Value = serde_json::from_slice(&out.stdout).expect("a JSON-RPC reply");
        assert!(reply.get("error").is_none(), "POST {path} {body}: {reply}");
        reply["result"].clone()
    }

    /// Forces a build of `builder`; its build request's id.
    fn force(&self, builder: &str) -> i64 {
        let result = self.control(
            "/forceschedulers/force",
            "force",
            json!({"builderNames": [builder], "reason": format!("test: {builder}")}),
        );
        // [buildsetid, {builderid: buildrequestid}]
        result[1]
            .as_object()
            .and_then(|requests| requests.values().next())
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("force {builder}: unexpected reply {result}"))
    }

    /// The build that took build request `request`, once it has started.
    fn build_of(&self, request: i64) -> Value {
        let deadline = Instant::now() + BUILD_DEADLINE;
        loop {
            let builds = self.get(&format!("/buildrequests/{request}/builds"));
            if let Some(build) = builds["builds"].as_array().and_then(|b| b.first()) {
                return build.clone();
            }
            assert!(
                Instant::now() < deadline,
                "build request {request} never started; the master's log:\n{}",
                self.master_log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits for build `buildid` to complete; the build.
    fn finished(&self, buildid: i64) -> Value {
        let deadline = Instant::now() + BUILD_DEADLINE;
        loop {
            let build = self.get(&format!("/builds/{buildid}"))["builds"][0].clone();
            if build["complete"] == true {
                return build;
            }
            assert!(
                Instant::now() < deadline,
                "build {buildid} did not finish: {build}\n{}",
                self.log(buildid)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The output of build `buildid`'s contractor step so far.
    fn log(&self, buildid: i64) -> String {
        self.get_text(&format!(
            "/builds/{buildid}/steps/contractor/logs/stdio/raw"
        ))
    }

    /// The result of build `buildid`'s step `name`.
    fn step_result(&self, buildid: i64, name: &str) -> Option<i64> {
        self.get(&format!("/builds/{buildid}/steps/{name}"))["steps"][0]["results"].as_i64()
    }

    /// The name of the worker that ran `build`.
    fn worker_of(&self, build: &Value) -> String {
        let id = build["workerid"].as_i64().expect("workerid");
        self.get(&format!("/workers/{id}"))["workers"][0]["name"]
            .as_str()
            .expect("worker name")
            .to_string()
    }

    /// The master's directory of build `number` of `builder`'s uploads.
    fn uploaded(&self, builder: &str, number: i64) -> PathBuf {
        self.dir
            .path()
            .join("master/artifacts")
            .join(builder)
            .join(number.to_string())
    }

    /// The worker's checkout of `builder`, where its `contractor build` ran.
    fn checkout(&self, worker: &str, builder: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("worker-{worker}"))
            .join(builder)
            .join("build")
    }
}

/// The VMs the build's progress names (`VM contractor-... started`) in `log`.
fn vm_names(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split("VM contractor-").nth(1))
        .filter_map(|r| r.split([' ', ',']).next())
        .map(|rest| format!("contractor-{rest}"))
        .collect()
}

/// Waits (at most `within`) until none of `vms` is left in libvirt; those left.
fn vms_left_after(vms: &[String], within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<String> = vms
            .iter()
            .filter(|vm| util::vm_left_behind(vm))
            .cloned()
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn buildbot_runs_contractor_builds_on_two_workers_with_failures_told_apart_and_stop() {
    let test = "buildbot_runs_contractor_builds_on_two_workers_with_failures_told_apart_and_stop";
    if skip(test) {
        return;
    }
    let fleet = Fleet::start();
    let mut all_vms = Vec::new();

    // Two builds of hello at once, and the one that cannot reach libvirt: each worker
    // takes one build of a builder at a time, so the two hello builds spread (a worker
    // whose builders were still being attached takes the second request the moment they
    // are, long before the first build ends).
    let hellos = [fleet.force("hello"), fleet.force("hello")];
    let no_libvirt = fleet.force("no-libvirt");
    let mut ran_on = Vec::new();
    let mut hello_ids = Vec::new();
    for request in hellos {
        let build = fleet.build_of(request);
        let buildid = build["buildid"].as_i64().expect("buildid");
        hello_ids.push(buildid);
        let build = fleet.finished(buildid);
        let log = fleet.log(buildid);
        assert_eq!(build["results"], SUCCESS, "{build}\n{log}");
        assert!(log.contains("hello from buildbot"), "{log}");
        all_vms.extend(vm_names(&log));
        // The record's artifact and result.json, uploaded to the master.
        let number = build["number"].as_i64().expect("number");
        let uploaded = fleet.uploaded("hello", number);
        let hello = std::fs::read(uploaded.join("hello")).expect("the artifact on the master");
        assert!(hello.starts_with(b"\x7fELF"), "not a program");
        let result: BuildResult = serde_json::from_slice(
            &std::fs::read(uploaded.join("result.json")).expect("result.json on the master"),
        )
        .expect("result.json matches the protocol");
        assert_eq!(result.outcome, Outcome::Success);
        let worker = fleet.worker_of(&build);
        let record = fleet
            .checkout(&worker, "hello")
            .join(".contractor/builds")
            .join(&result.id);
        assert_eq!(
            std::fs::read(record.join("artifacts/hello")).expect("the record's artifact"),
            hello,
            "the upload is not the record's artifact"
        );
        ran_on.push(worker);
    }
    ran_on.sort();
    ran_on.dedup();
    assert_eq!(
        ran_on.len(),
        WORKERS.len(),
        "builds did not spread: {ran_on:?}"
    );
    // The same, as the master's list of builds says it.
    let builds = fleet.get("/builds");
    let mut workers: Vec<i64> = builds["builds"]
        .as_array()
        .expect("builds")
        .iter()
        .filter(|b| {
            b["buildid"]
                .as_i64()
                .is_some_and(|id| hello_ids.contains(&id))
        })
        .filter(|b| b["results"] == SUCCESS)
        .filter_map(|b| b["workerid"].as_i64())
        .collect();
    workers.sort_unstable();
    workers.dedup();
    assert_eq!(workers.len(), WORKERS.len(), "/builds: {builds}");

    // libvirt unreachable: contractor's infrastructure code, an EXCEPTION, no upload.
    let build = fleet.build_of(no_libvirt);
    let buildid = build["buildid"].as_i64().expect("buildid");
    let build = fleet.finished(buildid);
    let log = fleet.log(buildid);
    assert_eq!(build["results"], EXCEPTION, "{build}\n{log}");
    assert_eq!(fleet.step_result(buildid, "contractor"), Some(EXCEPTION));
    assert!(log.contains("cannot connect to libvirt"), "{log}");
    assert!(log.contains("program finished with exit code 3"), "{log}");
    assert!(vm_names(&log).is_empty(), "a VM started:\n{log}");
    let number = build["number"].as_i64().expect("number");
    assert!(!fleet.uploaded("no-libvirt", number).exists());

    // The script fails (with 3, its own code): a FAILURE, not an EXCEPTION. The sleeping
    // build starts meanwhile.
    let fails = fleet.force("fails");
    let sleeps = fleet.force("sleeps");
    let build = fleet.build_of(fails);
    let buildid = build["buildid"].as_i64().expect("buildid");
    let build = fleet.finished(buildid);
    let log = fleet.log(buildid);
    assert_eq!(build["results"], FAILURE, "{build}\n{log}");
    assert_eq!(fleet.step_result(buildid, "contractor"), Some(FAILURE));
    assert!(log.contains("about to fail"), "{log}");
    assert!(log.contains("program finished with exit code 1"), "{log}");
    all_vms.extend(vm_names(&log));

    // Stopped from the master while its script sleeps: CANCELLED, and no VM is left.
    let build = fleet.build_of(sleeps);
    let buildid = build["buildid"].as_i64().expect("buildid");
    let deadline = Instant::now() + BUILD_DEADLINE;
    while !fleet.log(buildid).contains("\nsleeping now") {
        let build = fleet.get(&format!("/builds/{buildid}"))["builds"][0].clone();
        assert!(
            build["complete"] == false,
            "the sleeping build ended: {build}\n{}",
            fleet.log(buildid)
        );
        assert!(
            Instant::now() < deadline,
            "the script did not start:\n{}",
            fleet.log(buildid)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = fleet.log(buildid);
    let vms = vm_names(&log);
    assert_eq!(vms.len(), 1, "{log}");
    assert!(
        util::libvirt_domains().lines().any(|l| l.trim() == vms[0]),
        "VM {} is not running:\n{log}",
        vms[0]
    );
    fleet.control(
        &format!("/builds/{buildid}"),
        "stop",
        json!({"reason": "stopped by the test"}),
    );
    let build = fleet.finished(buildid);
    let log = fleet.log(buildid);
    assert_eq!(build["results"], CANCELLED, "{build}\n{log}");
    let left = vms_left_after(&vms, Duration::from_secs(30));
    assert!(left.is_empty(), "VM {left:?} left after stop:\n{log}");
    // contractor got SIGTERM (not only SIGKILL): it wrote its record as interrupted.
    let worker = fleet.worker_of(&build);
    let result: BuildResult = serde_json::from_slice(
        &std::fs::read(
            fleet
                .checkout(&worker, "sleeps")
                .join(".contractor/latest/result.json"),
        )
        .expect("the stopped build's result.json"),
    )
    .expect("result.json matches the protocol");
    assert_eq!(result.outcome, Outcome::Interrupted, "{log}");
    all_vms.extend(vms);

    assert_eq!(all_vms.len(), 4, "VMs: {all_vms:?}");
    let left = vms_left_after(&all_vms, Duration::from_secs(10));
    assert!(left.is_empty(), "VMs left: {left:?}");
}
