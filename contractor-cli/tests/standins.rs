//! `contractor build` driven with stand-in tools: every failure and interruption path of the
//! front end, without libvirt or a VM.
//!
//! `CONTRACTOR_BIN` points at a directory holding `standins/tool.sh` under each tool's name;
//! the script answers as the real tool does (docs/protocol.md) unless `STANDIN_<STEP>` tells
//! one step to die, be killed, write garbage, or hang (see the script). Each test checks
//! what the user and a CI engine see: the exit code, the message on stderr (naming the tool
//! and what happened), the record's `result.json`, and that no tool outlived the front end.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use contractor_protocol::result::{BuildResult, Outcome};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The tools the front end composes, each a copy of the stand-in script.
const TOOLS: [&str; 4] = [
    "contractor-vm",
    "contractor-store",
    "contractor-proxy",
    "contractor-run",
];

/// How long a front end may take before the test calls it hung (a guard against a test
/// that never ends, not a measurement: a sound run takes well under a second, one that
/// waits out a tool's 15 s grace and then stops it about 15 s).
const HUNG: Duration = Duration::from_secs(60);

/// The binary `name` of this workspace, built beside this test (`cargo build` builds them
/// all; a test runs only the real tools that need no VM: the signer, the store's record
/// requests).
fn built(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .ok()
        .and_then(|test| Some(test.parent()?.parent()?.join(name)))
        .expect("target directory");
    assert!(
        path.is_file(),
        "{} is not built: run cargo build first",
        path.display()
    );
    path
}

/// A project, a data directory and a directory of stand-in tools, all in one temp dir.
struct Bench {
    dir: tempfile::TempDir,
    behaviours: Vec<(String, String)>,
}

/// How one `contractor build` ended.
struct Ended {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/standins/tool.sh");
        for tool in TOOLS {
            let path = bin.join(tool);
            std::fs::copy(&script, &path).expect("copy the stand-in");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        // The signer is the real one: it needs no VM, and a build's record is its to sign.
        std::os::unix::fs::symlink(built("contractor-attest"), bin.join("contractor-attest"))
            .expect("link the signer");
        // So is the build hosts' tool: it answers that no build host is configured.
        std::os::unix::fs::symlink(built("contractor-host"), bin.join("contractor-host"))
            .expect("link the host tool");
        for sub in ["project", "data", "tmp", "home", "standin"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        std::fs::write(
            dir.path().join("project/contractor.toml"),
            "[build]\nscript = \"make\"\n",
        )
        .expect("spec");
        Bench {
            dir,
            behaviours: Vec::new(),
        }
    }

    /// Makes `step` of a stand-in behave as `how` (`die`, `error`, `killed`, `garbage`,
    /// `hang`, `deaf`).
    fn with(mut self, step: &str, how: &str) -> Bench {
        let name = format!("STANDIN_{}", step.to_uppercase().replace('-', "_"));
        self.behaviours.push((name, how.into()));
        self
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// Starts `contractor build` in the project.
    fn start(&self) -> Child {
        self.command().spawn().expect("start contractor")
    }

    /// `contractor build` in the project, with the stand-ins.
    fn command(&self) -> Command {
        self.contractor(&["build"])
    }

    /// `contractor ARGS` in the project, with the stand-ins.
    fn contractor(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_contractor"));
        command
            .args(args)
            .current_dir(self.path("project"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CONTRACTOR_BIN", self.path("bin"))
            .env("CONTRACTOR_DATA_DIR", self.path("data"))
            .env("TMPDIR", self.path("tmp"))
            .env("HOME", self.path("home"))
            .env("STANDIN_DIR", self.path("standin"))
            .env("STANDIN_STORE", built("contractor-store"))
            .envs(self.behaviours.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Starts `contractor build` in a process group of its own, waits until a stand-in
    /// reached `step`, and sends the whole group SIGINT, as a terminal does on Ctrl-C.
    fn ctrl_c_in_a_terminal_at(&self, step: &str) -> Ended {
        let mut command = self.command();
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("start contractor");
        self.wait_for(step);
        kill(Pid::from_raw(-pid_of(&child).as_raw()), Signal::SIGINT).expect("SIGINT");
        self.finish(child)
    }

    /// Waits until a stand-in reached `step`.
    fn wait_for(&self, step: &str) {
        let marker = self.path("standin").join(format!("reached-{step}"));
        let deadline = Instant::now() + HUNG;
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the build never reached {step}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The stand-in marks the step before it hangs; let the front end read what came
        // before it. (Not needed for correctness: an earlier SIGINT is an interruption too.)
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Runs `contractor build` to its end.
    fn build(&self) -> Ended {
        let child = self.start();
        self.finish(child)
    }

    /// Starts `contractor build`, waits until a stand-in reached `step`, sends the front end
    /// SIGINT (as Ctrl-C in a terminal would, but to it alone), and waits for its end.
    fn interrupt_at(&self, step: &str) -> Ended {
        self.interrupt_times_at(step, 1)
    }

    /// [`Bench::interrupt_at`] with `times` signals, half a second apart.
    fn interrupt_times_at(&self, step: &str, times: usize) -> Ended {
        let child = self.start();
        self.wait_for(step);
        for time in 0..times {
            if time > 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            kill(pid_of(&child), Signal::SIGINT).expect("SIGINT");
        }
        self.finish(child)
    }

    fn finish(&self, mut child: Child) -> Ended {
        let mut stderr = child.stderr.take().expect("stderr");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + HUNG;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.stop_standins();
                panic!("contractor build hung (killed after {HUNG:?})");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = reader.join().expect("stderr reader");
        use std::os::unix::process::ExitStatusExt;
        let ended = Ended {
            code: status.code(),
            signal: status.signal(),
            stderr,
        };
        self.assert_no_standin_left(&ended);
        ended
    }

    /// Every stand-in process has ended (they die with the front end, or are stopped by it).
    fn assert_no_standin_left(&self, ended: &Ended) {
        let deadline = Instant::now() + HUNG;
        loop {
            let alive = self.live_standins();
            if alive.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                self.stop_standins();
                panic!(
                    "stand-ins {alive:?} outlived the front end; {}",
                    ended.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn standin_pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path("standin/pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// The stand-ins of this bench still running: a recorded pid whose process is alive and
    /// has this bench's `STANDIN_DIR` in its environment. A pid alone is not enough: once a
    /// stand-in ended, its pid may be another process's (pids wrap at 32768 here, and a
    /// busy machine goes through them in a minute), which must be neither blamed nor killed.
    fn live_standins(&self) -> Vec<i32> {
        let mut mark = b"STANDIN_DIR=".to_vec();
        mark.extend_from_slice(self.path("standin").as_os_str().as_encoded_bytes());
        self.standin_pids()
            .into_iter()
            .filter(|pid| alive(*pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == mark.as_slice()))
            })
            .collect()
    }

    fn stop_standins(&self) {
        for pid in self.live_standins() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    fn reached(&self, step: &str) -> bool {
        self.path("standin")
            .join(format!("reached-{step}"))
            .exists()
    }

    /// The records of the project's builds.
    fn records(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.path("project/.contractor/builds")) else {
            return Vec::new();
        };
        entries.flatten().map(|e| e.path()).collect()
    }

    /// The one build's `result.json`.
    fn result(&self) -> BuildResult {
        let records = self.records();
        assert_eq!(records.len(), 1, "one record: {records:?}");
        let path = records[0].join("result.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            !records[0].join("owner.json").exists(),
            "a closed record has no owner"
        );
        serde_json::from_str(&text).expect("result.json is a BuildResult")
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop_standins();
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("pid"))
}

/// Whether `pid` runs (a zombie, already ended, counts as not running).
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

impl Ended {
    fn assert_exit(&self, code: i32) {
        assert_eq!(
            (self.code, self.signal),
            (Some(code), None),
            "exit code; stderr:\n{}",
            self.stderr
        );
    }

    fn assert_silent_about(&self, words: &str) {
        assert!(
            !self.stderr.contains(words),
            "stderr has {words:?}:\n{}",
            self.stderr
        );
    }

    fn assert_says(&self, words: &[&str]) {
        for word in words {
            assert!(
                self.stderr.contains(word),
                "stderr lacks {word:?}:\n{}",
                self.stderr
            );
        }
    }
}

/// The result's error code and its chain as one line.
fn error_of(result: &BuildResult) -> (String, String) {
    let error = result.error.as_ref().expect("an error in result.json");
    (error.code.clone(), error.chain.join(": "))
}

#[test]
fn the_standins_build_successfully() {
    let bench = Bench::new();
    let ended = bench.build();
    ended.assert_exit(0);
    ended.assert_says(&["succeeded"]);
    ended.assert_silent_about("warning");
    let result = bench.result();
    assert_eq!(result.outcome, Outcome::Success);
    assert_eq!(result.exit_code, Some(0));
    assert!(bench.reached("vm-destroy") || bench.reached("vm-hold"));
}

#[test]
fn a_script_file_allow_and_timeout_replace_the_specs_without_one() {
    let bench = Bench::new();
    std::fs::remove_file(bench.path("project/contractor.toml")).expect("no spec");
    let script = bench.path("job.sh");
    std::fs::write(&script, "echo the job's own script\n").expect("script");
    let mut command = bench.command();
    command.arg("--script-file").arg(&script).args([
        "--allow",
        "deb.debian.org",
        "--timeout",
        "77s",
        "--no-artifacts",
    ]);
    let ended = bench.finish(command.spawn().expect("start contractor"));
    ended.assert_exit(0);
    let request = std::fs::read_to_string(bench.path("standin/run-request")).expect("request");
    let request: serde_json::Value = serde_json::from_str(&request).expect("JSON");
    assert_eq!(request["job"]["script"], "echo the job's own script\n");
    assert_eq!(request["timeout_secs"], 77);
    assert_eq!(bench.result().outcome, Outcome::Success);

    let mut command = bench.command();
    command
        .arg("--script-file")
        .arg(&script)
        .args(["--allow", "localhost:8080/x"]);
    let ended = bench.finish(command.spawn().expect("start contractor"));
    ended.assert_exit(2);
    ended.assert_says(&["--allow \"localhost:8080/x\"", "*.host"]);
}

/// Runs a build whose stand-in `step` behaves as `how`, and checks that it ends with exit
/// code `exit`, a result.json of `outcome` with error code `code`, and `words` both on
/// stderr and in the result's error chain.
fn fails(step: &str, how: &str, exit: i32, outcome: Outcome, code: &str, words: &[&str]) {
    let bench = Bench::new().with(step, how);
    let ended = bench.build();
    ended.assert_exit(exit);
    ended.assert_says(words);
    let result = bench.result();
    assert_eq!(result.outcome, outcome, "{:?}", result.error);
    let (got, chain) = error_of(&result);
    assert_eq!(got, code, "{chain}");
    for word in words {
        assert!(
            chain.contains(word),
            "result.json's chain lacks {word:?}: {chain}"
        );
    }
}

/// Runs a build whose stand-in hangs at `step`, interrupts it there with SIGINT, and checks
/// that it ends as interrupted (exit code 130) with its record closed.
fn interrupted_at(step: &str, how: &str) {
    interrupted_times_at(step, how, 1);
}

fn interrupted_times_at(step: &str, how: &str, times: usize) {
    let bench = Bench::new().with(step, how);
    let ended = bench.interrupt_times_at(step, times);
    ended.assert_exit(130);
    ended.assert_says(&["was interrupted", "Ctrl-C"]);
    ended.assert_silent_about("cannot release VM");
    let result = bench.result();
    assert_eq!(result.outcome, Outcome::Interrupted, "{:?}", result.error);
    let (code, chain) = error_of(&result);
    assert_eq!(code, "interrupted", "{chain}");
}

const FAILED_3: &str = "failed (exit code 3)";
const KILLED: &str = "failed (killed by a signal)";
const GARBAGE: &str = "wrote something other than its documented JSON";
/// The refusal shows the start of the line the tool wrote.
const SHOWN: &str = ", starting \"stand-in garbage at";

// The image, before the record exists: no record, the tool's failure on stderr.

fn image_fails(how: &str, words: &[&str]) {
    let bench = Bench::new().with("vm-image", how);
    let ended = bench.build();
    ended.assert_exit(3);
    ended.assert_says(words);
    assert!(bench.records().is_empty(), "{:?}", bench.records());
}

#[test]
fn an_image_tool_that_fails_is_reported_with_its_messages() {
    image_fails(
        "error",
        &[
            "contractor-vm",
            FAILED_3,
            "stand-in failure at vm-image: the cause",
        ],
    );
}

#[test]
fn an_image_tool_that_dies_silently_is_reported() {
    image_fails("die", &["contractor-vm", FAILED_3, "it wrote no answer"]);
}

#[test]
fn an_image_tool_that_is_killed_is_reported() {
    image_fails("killed", &["contractor-vm", KILLED]);
}

#[test]
fn an_image_tool_that_answers_garbage_is_reported() {
    image_fails("garbage", &["contractor-vm", GARBAGE, SHOWN]);
}

#[test]
fn a_missing_tool_is_named_with_where_it_was_looked_for() {
    let bench = Bench::new();
    std::fs::remove_file(bench.path("bin/contractor-vm")).expect("rm");
    let ended = bench.build();
    ended.assert_exit(3);
    ended.assert_says(&["the tool contractor-vm is missing", "CONTRACTOR_BIN"]);
}

// Starting: the VM, the services (the store with the build's token).

#[test]
fn the_token_the_store_made_reaches_the_job() {
    let bench = Bench::new();
    bench.build().assert_exit(0);
    let request = std::fs::read_to_string(bench.path("standin/run-request")).expect("request");
    let request: serde_json::Value = serde_json::from_str(&request).expect("JSON");
    assert_eq!(request["job"]["store_token"], "standintoken0");
}

#[test]
fn a_store_whose_ready_line_gives_no_token_closes_the_record() {
    fails(
        "store-token-value",
        "",
        3,
        Outcome::Infrastructure,
        "service_start",
        &["contractor-store", "its ready line carries no build token"],
    );
}

#[test]
fn a_store_whose_token_is_not_one_closes_the_record() {
    fails(
        "store-token-value",
        "not-a-token",
        3,
        Outcome::Infrastructure,
        "service_start",
        &["contractor-store", GARBAGE, "not-a-token"],
    );
}

#[test]
fn a_vm_that_fails_to_start_is_an_infrastructure_failure() {
    fails(
        "vm-create",
        "error",
        3,
        Outcome::Infrastructure,
        "vm_create",
        &["contractor-vm", FAILED_3, "stand-in failure at vm-create"],
    );
}

#[test]
fn a_vm_tool_killed_while_creating_is_an_infrastructure_failure() {
    fails(
        "vm-create",
        "killed",
        3,
        Outcome::Infrastructure,
        "vm_create",
        &["contractor-vm", KILLED],
    );
}

#[test]
fn a_vm_tool_answering_garbage_is_an_infrastructure_failure() {
    fails(
        "vm-create",
        "garbage",
        3,
        Outcome::Infrastructure,
        "vm_create",
        &["contractor-vm", GARBAGE, SHOWN],
    );
}

#[test]
fn a_store_that_dies_before_ready_is_an_infrastructure_failure() {
    fails(
        "store-serve",
        "die",
        3,
        Outcome::Infrastructure,
        "service_start",
        &["contractor-store", FAILED_3],
    );
}

#[test]
fn a_store_answering_garbage_is_an_infrastructure_failure() {
    fails(
        "store-serve",
        "garbage",
        3,
        Outcome::Infrastructure,
        "service_start",
        &["contractor-store", GARBAGE, SHOWN],
    );
}

#[test]
fn a_proxy_that_fails_is_an_infrastructure_failure() {
    fails(
        "proxy-serve",
        "error",
        3,
        Outcome::Infrastructure,
        "service_start",
        &[
            "contractor-proxy",
            FAILED_3,
            "stand-in failure at proxy-serve",
        ],
    );
}

#[test]
fn a_proxy_killed_before_ready_is_an_infrastructure_failure() {
    fails(
        "proxy-serve",
        "killed",
        3,
        Outcome::Infrastructure,
        "service_start",
        &["contractor-proxy", KILLED],
    );
}

#[test]
fn a_vm_holder_that_dies_leaves_the_vm_to_contractor_vm_destroy() {
    let bench = Bench::new().with("vm-hold", "die");
    let ended = bench.build();
    ended.assert_exit(0);
    assert_eq!(bench.result().outcome, Outcome::Success);
    assert!(bench.reached("vm-destroy"), "{}", ended.stderr);
}

#[test]
fn the_front_end_returns_while_its_detached_holder_still_destroys_the_vm() {
    // The holder lets go of the VM (its stdin closed) and carries the destroy on alone, in
    // a session of its own, as long as libvirt takes: the build ends without waiting.
    let bench = Bench::new().with("vm-release", "detached");
    let mut child = bench.start();
    let deadline = Instant::now() + HUNG;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "contractor build hung");
        std::thread::sleep(Duration::from_millis(20));
    };
    let holders = bench.live_standins();
    bench.stop_standins();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(bench.reached("vm-release"), "{stderr}");
    assert!(
        !holders.is_empty(),
        "the front end waited until its holder ended; {stderr}"
    );
    assert!(!bench.reached("vm-destroy"), "no second destroy: {stderr}");
    assert!(!stderr.contains("cannot release VM"), "{stderr}");
    assert_eq!(bench.result().outcome, Outcome::Success);
}

// The run.

#[test]
fn a_relay_that_fails_before_starting_is_an_infrastructure_failure() {
    fails(
        "run-start",
        "error",
        3,
        Outcome::Infrastructure,
        "run",
        &["contractor-run", FAILED_3, "stand-in failure at run-start"],
    );
}

#[test]
fn a_relay_that_dies_silently_is_an_infrastructure_failure() {
    fails(
        "run-start",
        "die",
        3,
        Outcome::Infrastructure,
        "run",
        &["contractor-run", FAILED_3],
    );
}

#[test]
fn a_relay_killed_during_the_script_is_an_infrastructure_failure() {
    fails(
        "run-script",
        "killed",
        3,
        Outcome::Infrastructure,
        "run",
        &["contractor-run", KILLED],
    );
}

#[test]
fn a_relay_answering_garbage_is_an_infrastructure_failure() {
    fails(
        "run-script",
        "garbage",
        3,
        Outcome::Infrastructure,
        "run",
        &["contractor-run", GARBAGE, SHOWN],
    );
}

#[test]
fn a_relay_that_ends_without_finished_is_an_infrastructure_failure() {
    fails(
        "run-finish",
        "die",
        3,
        Outcome::Infrastructure,
        "run",
        &["contractor-run", FAILED_3],
    );
}

// Ctrl-C in each phase.

#[test]
fn ctrl_c_while_the_image_is_prepared_stops_the_image_tool() {
    let bench = Bench::new().with("vm-image", "hang");
    let ended = bench.interrupt_at("vm-image");
    assert!(
        ended.code == Some(130) || ended.signal == Some(2),
        "{:?} {:?}: {}",
        ended.code,
        ended.signal,
        ended.stderr
    );
    assert!(bench.records().is_empty(), "{:?}", bench.records());
}

#[test]
fn ctrl_c_while_the_vm_starts_is_an_interruption() {
    interrupted_at("vm-create", "hang");
}

#[test]
fn ctrl_c_while_the_store_starts_is_an_interruption() {
    interrupted_at("store-serve", "hang");
}

#[test]
fn ctrl_c_while_the_proxy_starts_is_an_interruption() {
    interrupted_at("proxy-serve", "hang");
}

#[test]
fn ctrl_c_while_the_relay_connects_is_an_interruption() {
    interrupted_at("run-start", "hang");
}

#[test]
fn ctrl_c_during_the_fetch_is_an_interruption() {
    interrupted_at("run-fetch", "hang");
}

#[test]
fn ctrl_c_during_the_script_is_an_interruption() {
    interrupted_at("run-script", "hang");
}

#[test]
fn ctrl_c_while_artifacts_are_stored_is_an_interruption() {
    interrupted_at("run-artifacts", "hang");
}

#[test]
fn ctrl_c_with_a_relay_that_ignores_sigterm_still_ends_the_build() {
    interrupted_at("run-script", "deaf");
}

#[test]
fn a_second_ctrl_c_kills_a_relay_that_ignores_sigterm() {
    interrupted_times_at("run-script", "deaf", 2);
}

#[test]
fn a_service_that_ignores_sigterm_at_the_end_is_killed_and_named() {
    let bench = Bench::new().with("store-serving", "deaf");
    let ended = bench.build();
    ended.assert_exit(0);
    ended.assert_says(&["the store did not stop cleanly", "contractor-store", KILLED]);
    assert_eq!(bench.result().outcome, Outcome::Success);
}

#[test]
fn a_vm_holder_that_never_lets_go_does_not_hold_the_front_end() {
    let bench = Bench::new().with("vm-hold", "hang");
    let ended = bench.build();
    ended.assert_exit(0);
    assert_eq!(bench.result().outcome, Outcome::Success);
}

#[test]
fn a_vm_tool_that_never_answers_does_not_hold_a_build_that_failed_elsewhere() {
    let bench = Bench::new()
        .with("vm-create", "hang")
        .with("store-serve", "die");
    let ended = bench.build();
    ended.assert_exit(3);
    ended.assert_says(&["contractor-store", FAILED_3]);
    assert_eq!(bench.result().outcome, Outcome::Infrastructure);
}

#[test]
fn ctrl_c_in_a_terminal_reaches_every_tool_and_the_released_vm_is_no_warning() {
    let bench = Bench::new().with("run-script", "hang");
    let ended = bench.ctrl_c_in_a_terminal_at("run-script");
    ended.assert_exit(130);
    ended.assert_says(&["was interrupted", "Ctrl-C"]);
    ended.assert_silent_about("cannot release VM");
    assert_eq!(bench.result().outcome, Outcome::Interrupted);
}

#[test]
fn ctrl_c_while_the_source_is_packed_is_an_interruption() {
    interrupted_at("store-pack", "hang");
}

#[test]
fn contractor_accel_sets_the_accelerator_unless_accel_is_given_and_a_bad_value_is_refused() {
    let accel_asked = |env: Option<&str>, flag: Option<&str>| {
        let bench = Bench::new();
        let mut command = bench.command();
        if let Some(value) = env {
            command.env("CONTRACTOR_ACCEL", value);
        }
        if let Some(value) = flag {
            command.args(["--accel", value]);
        }
        let ended = bench.finish(command.spawn().expect("start contractor"));
        ended.assert_exit(0);
        let request = std::fs::read_to_string(bench.path("standin/vm-request"))
            .expect("contractor-vm's request");
        let request: serde_json::Value = serde_json::from_str(&request).expect("json");
        request["spec"]["accel"]
            .as_str()
            .or(request["accel"].as_str())
            .map(String::from)
            .unwrap_or_else(|| panic!("no accel in {request}"))
    };
    assert_eq!(accel_asked(None, None), "auto");
    assert_eq!(accel_asked(Some("tcg"), None), "tcg");
    assert_eq!(accel_asked(Some(""), None), "auto");
    assert_eq!(accel_asked(Some("tcg"), Some("kvm")), "kvm", "--accel wins");

    let bench = Bench::new();
    let mut command = bench.command();
    command.env("CONTRACTOR_ACCEL", "fast");
    let ended = bench.finish(command.spawn().expect("start contractor"));
    ended.assert_exit(2);
    ended.assert_says(&["CONTRACTOR_ACCEL is \"fast\"", "auto, kvm or tcg"]);
    assert!(!bench.reached("vm-create"), "no VM was asked for");
}

#[test]
fn flags_that_cannot_go_together_or_with_the_spec_are_refused_before_a_build_starts() {
    let bench = Bench::new();
    let mut command = bench.command();
    command.arg("--offline");
    let ended = bench.finish(command.spawn().expect("start contractor"));
    ended.assert_exit(2);
    ended.assert_says(&[
        "--offline builds from the downloads",
        "contractor.lock pins, and there is no such file",
        "then `contractor pin`",
    ]);

    let config = bench.path("home/.config/contractor");
    std::fs::create_dir_all(&config).expect("config dir");
    std::fs::write(config.join("config.toml"), "hosts = [\"build.example\"]\n").expect("config");
    let mut command = bench.command();
    command.args(["--allow", "a.example"]);
    let ended = bench.finish(command.spawn().expect("start contractor"));
    ended.assert_exit(2);
    ended.assert_says(&["--script-file, --allow, --timeout and --no-artifacts apply to builds on this machine: add --local"]);
    let mut command = bench.command();
    command.arg("--keep");
    let ended = bench.finish(command.spawn().expect("start contractor"));
    ended.assert_exit(2);
    ended.assert_says(&[
        "--keep keeps the VM for `contractor shell`",
        "build with --local",
    ]);

    assert!(bench.records().is_empty(), "no build was started");
}

#[test]
fn a_bad_or_missing_spec_or_config_is_one_readable_line_saying_each_thing_once() {
    let bench = Bench::new();
    let spec = bench.path("project/contractor.toml");
    std::fs::write(&spec, "[build]\nscript = \"x\"\nfoo = 1\n").expect("spec");
    let commands: [&[&str]; 5] = [
        &["build"],
        &["allow", "a.example", "--yes"],
        &["rebuild"],
        &["shell"],
        &["hosts", "--host", "build.example"],
    ];
    for args in commands {
        let ended = bench.finish(bench.contractor(args).spawn().expect("start contractor"));
        ended.assert_exit(2);
        assert_eq!(
            ended.stderr,
            "contractor: contractor.toml: line 3, column 1, at `foo = 1`: unknown field `foo`, \
             expected one of `image`, `script`, `fetch`, `env`, `artifacts`, `timeout`, \
             `max_log`, `max_artifacts`\n",
            "contractor {args:?}"
        );
    }

    std::fs::remove_file(&spec).expect("remove the spec");
    for args in [&["build"][..], &["rebuild"], &["shell"]] {
        let ended = bench.finish(bench.contractor(args).spawn().expect("start contractor"));
        ended.assert_exit(2);
        assert_eq!(
            ended.stderr,
            "contractor: cannot read contractor.toml: No such file or directory (os error 2) \
             (run `contractor build` in a directory with a contractor.toml, or pass -f FILE)\n",
            "contractor {args:?}"
        );
    }

    std::fs::write(&spec, "[build]\nscript = \"x\"\n").expect("spec");
    let config = bench.path("home/.config/contractor/config.toml");
    std::fs::create_dir_all(config.parent().expect("its directory")).expect("config dir");
    std::fs::write(&config, "hosts = []\n[x\n").expect("config");
    let ended = bench.build();
    ended.assert_exit(2);
    assert_eq!(
        ended.stderr,
        format!(
            "contractor: {}: line 2, column 3, at `[x`: invalid table header; expected `.`, `]`\n",
            config.display()
        )
    );
    assert!(bench.records().is_empty(), "no build was started");
}
