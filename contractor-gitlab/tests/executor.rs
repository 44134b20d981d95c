//! `contractor-gitlab-executor` driven as GitLab Runner drives it, with a stand-in
//! `contractor` (a shell script in `CONTRACTOR_BIN`) in place of the front end, so that what
//! the executor hands `contractor build`, how it maps its exit codes, what it copies back
//! and how it passes on a cancel are checked without a VM (tests/gitlab_executor.rs at the
//! workspace root does the same with real builds).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUILD_FAILURE: i32 = 41;
const SYSTEM_FAILURE: i32 = 42;

/// The stand-in front end: notes its arguments and the script it was given, then does what
/// `STANDIN_DO` says: `record` (a record with one artifact, then exit `STANDIN_EXIT`),
/// `hang` (until SIGTERM, which it notes, then ends half a second later with 130), or
/// `exit` (`STANDIN_EXIT` at once).
const STANDIN: &str = r#"#!/bin/sh
printf '%s\n' "$@" >"$STANDIN_DIR/args"
while [ $# -gt 0 ]; do
	[ "$1" = --script-file ] && cp "$2" "$STANDIN_DIR/script"
	shift
done
case $STANDIN_DO in
record)
	id=20261205-070000-abcdef
	mkdir -p .contractor/builds/$id/artifacts/out
	echo built >.contractor/builds/$id/artifacts/out/hello
	sed "s|RECORD|$PWD/.contractor/builds/$id|g" "$STANDIN_DIR/result.json" >.contractor/builds/$id/result.json
	ln -sfn builds/$id .contractor/latest
	exit "$STANDIN_EXIT" ;;
hang)
	trap 'echo term >>"$STANDIN_DIR/terms"; sleep 0.5; : >"$STANDIN_DIR/ended"; exit 130' TERM
	: >"$STANDIN_DIR/started"
	while :; do sleep 0.1; done ;;
exit) exit "$STANDIN_EXIT" ;;
esac
"#;

const RESULT: &str = r#"{"version":1,"id":"20261205-070000-abcdef","outcome":"success","exit_code":0,
"duration_secs":1.0,"log":"RECORD/build.log","console_log":"RECORD/console.log",
"artifacts":["RECORD/artifacts/out/hello"],"refused_hosts":[]}"#;

struct Job {
    dir: tempfile::TempDir,
}

impl Job {
    fn new() -> Job {
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["bin", "standin", "builds/0/g/p"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let contractor = dir.path().join("bin/contractor");
        std::fs::write(&contractor, STANDIN).expect("stand-in");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&contractor, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(dir.path().join("standin/result.json"), RESULT).expect("result");
        std::fs::write(dir.path().join("script"), "echo the job's step\n").expect("script");
        Job { dir }
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// `contractor-gitlab-executor run SCRIPT STAGE` with the runner's environment, in a
    /// process group of its own as the runner starts it.
    fn run(&self, stage: &str, what: &str, exit: i32) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_contractor-gitlab-executor"));
        command
            .arg("run")
            .arg(self.path("script"))
            .arg(stage)
            .env("CONTRACTOR_BIN", self.path("bin"))
            .env("STANDIN_DIR", self.path("standin"))
            .env("STANDIN_DO", what)
            .env("STANDIN_EXIT", exit.to_string())
            .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
            .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
            .env("CUSTOM_ENV_CI_PROJECT_DIR", self.path("builds/0/g/p"))
            .env("CUSTOM_ENV_CONTRACTOR_ALLOW", "deb.debian.org,*.crates.io")
            .env("CUSTOM_ENV_CI_JOB_TIMEOUT", "900")
            .stdin(Stdio::null())
            .process_group(0);
        command
    }

    fn output(&self, stage: &str, what: &str, exit: i32) -> Output {
        self.run(stage, what, exit)
            .output()
            .expect("run the executor")
    }

    fn standin(&self, file: &str) -> String {
        std::fs::read_to_string(self.path("standin").join(file)).unwrap_or_default()
    }
}

#[test]
fn a_job_stage_is_one_contractor_build_of_the_jobs_directory_with_its_script() {
    let job = Job::new();
    let out = job.output("step_script", "record", 0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let project = job.path("builds/0/g/p");
    let args: Vec<String> = job.standin("args").lines().map(String::from).collect();
    let script_at = args
        .iter()
        .position(|a| a == "--script-file")
        .expect("--script-file")
        + 1;
    let expected = [
        "build".to_string(),
        "--local".into(),
        "-f".into(),
        project.join("contractor.toml").display().to_string(),
        "--script-file".into(),
        args[script_at].clone(),
        "--allow".into(),
        "deb.debian.org".into(),
        "--allow".into(),
        "*.crates.io".into(),
        "--timeout".into(),
        "900s".into(),
    ];
    assert_eq!(args, expected);
    assert!(
        !Path::new(&args[script_at]).exists(),
        "the script file was left behind"
    );
    let script = job.standin("script");
    // The stage script travels base64-encoded ("echo the job's step\n").
    assert!(script.contains("ZWNobyB0aGUgam9iJ3Mgc3RlcAo="), "{script}");
    assert_eq!(
        std::fs::read_to_string(project.join("out/hello")).expect("artifact copied back"),
        "built\n"
    );
}

#[test]
fn contractor_builds_exit_codes_become_the_runners() {
    let job = Job::new();
    for (exit, expected) in [(1, BUILD_FAILURE), (2, BUILD_FAILURE), (3, SYSTEM_FAILURE)] {
        let out = job.output("build_script", "exit", exit);
        assert_eq!(
            out.status.code(),
            Some(expected),
            "contractor exited {exit}"
        );
    }
    // after_script: no artifacts asked for, none copied back.
    let out = job.output("after_script", "record", 0);
    assert_eq!(out.status.code(), Some(0));
    assert!(job.standin("args").lines().any(|a| a == "--no-artifacts"));
    assert!(!job.path("builds/0/g/p/out/hello").exists());
    // A runner stage is bash on this host, not a build.
    std::fs::write(job.path("script"), "exit 5\n").expect("script");
    let out = job.output("get_sources", "exit", 0);
    assert_eq!(out.status.code(), Some(BUILD_FAILURE));
}

#[test]
fn a_cancel_reaches_contractor_once_and_the_executor_waits_for_it() {
    let job = Job::new();
    let mut child = job.run("step_script", "hang", 0).spawn().expect("run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job.path("standin/started").exists() {
        assert!(Instant::now() < deadline, "the stand-in never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The runner cancels: SIGTERM to the executor's process group.
    let group = nix::unistd::Pid::from_raw(-i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the executor did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert_eq!(status.code(), Some(BUILD_FAILURE), "{stderr}");
    assert!(
        job.path("standin/ended").exists(),
        "the executor ended before contractor did"
    );
    assert_eq!(
        job.standin("terms"),
        "term\n",
        "SIGTERM not passed on exactly once"
    );
}

#[test]
fn prepare_without_contractor_is_a_system_failure() {
    let job = Job::new();
    let out = Command::new(env!("CARGO_BIN_EXE_contractor-gitlab-executor"))
        .arg("prepare")
        .env("CONTRACTOR_BIN", job.path("standin"))
        .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
        .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
        .output()
        .expect("prepare");
    assert_eq!(out.status.code(), Some(SYSTEM_FAILURE));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("contractor is missing"), "{stderr}");
}
