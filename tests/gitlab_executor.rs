//! End-to-end: `contractor-gitlab-executor` driven exactly as GitLab Runner's custom
//! executor contract says (config_exec, prepare_exec, run_exec once per stage in order,
//! cleanup_exec; the job's variables as `CUSTOM_ENV_*`; `BUILD_FAILURE_EXIT_CODE` and
//! `SYSTEM_FAILURE_EXIT_CODE`; SIGTERM to the process group on cancel), with bash stage
//! scripts generated here the way the runner generates them, against a bare git repository
//! made at test time. GitLab Runner itself cannot be installed on these machines.
//!
//! VMs: three job stages boot one each (a compile, a failing script, its after_script)
//! and a cancelled one a fourth, all of one shape restored from one snapshot.

mod util;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The runner's codes for this test: not GitLab's usual 1 and 2 (nor Contractor's own exit
/// codes), so that an executor that hard-coded either would fail here.
const BUILD_FAILURE: i32 = 41;
const SYSTEM_FAILURE: i32 = 42;

const HELLO_C: &str =
    "#include <stdio.h>\nint main(void) { puts(\"hello from the job\"); return 0; }\n";

/// A repository on "GitLab" (a bare repository here) and a runner's directories.
struct Runner {
    dir: tempfile::TempDir,
    /// Commit ids by name.
    commits: BTreeMap<&'static str, String>,
}

impl Runner {
    /// A bare repository with two commits: `good` (hello.c and a contractor.toml that
    /// collects `hello`) and `broken` (a contractor.toml with a bad field value).
    fn new() -> Runner {
        let dir = tempfile::tempdir().expect("temp dir");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("work");
        let git = |args: &[&str]| util::git(&work, args);
        git(&["init", "-q", "-b", "main"]);
        std::fs::write(work.join("hello.c"), HELLO_C).expect("hello.c");
        std::fs::write(
            work.join("contractor.toml"),
            "[build]\nscript = \"echo replaced by the job's script\"\nartifacts = [\"hello\"]\n\
             [vm]\ncpus = 1\nmemory = \"768MiB\"\n",
        )
        .expect("spec");
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "good"]);
        let good = git(&["rev-parse", "HEAD"]);
        std::fs::write(
            work.join("contractor.toml"),
            "[build]\nscript = \"true\"\n[vm]\ncpus = \"many\"\n",
        )
        .expect("spec");
        git(&["commit", "-q", "-am", "broken"]);
        let broken = git(&["rev-parse", "HEAD"]);
        let bare = dir.path().join("origin.git");
        let out = Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(&bare)
            .output()
            .expect("git clone --bare");
        assert!(out.status.success());
        std::fs::create_dir_all(dir.path().join("uploaded")).expect("uploaded");
        Runner {
            dir,
            commits: BTreeMap::from([("good", good), ("broken", broken)]),
        }
    }

    fn builds_dir(&self) -> PathBuf {
        self.dir.path().join("builds")
    }

    /// The job's directory, as the runner makes it: builds_dir/<concurrent id>/<path>.
    fn project_dir(&self) -> PathBuf {
        self.builds_dir().join("0/group/project")
    }

    fn uploaded(&self) -> PathBuf {
        self.dir.path().join("uploaded")
    }

    /// The job's variables, as the runner passes them to the driver.
    fn env(&self, job: u32, commit: &str) -> Vec<(String, String)> {
        let vars = [
            ("CI_JOB_ID", job.to_string()),
            ("CI_PROJECT_DIR", self.project_dir().display().to_string()),
            ("CI_BUILDS_DIR", self.builds_dir().display().to_string()),
            ("CI_PROJECT_PATH", "group/project".to_string()),
            ("CI_CONCURRENT_PROJECT_ID", "0".to_string()),
            (
                "CI_REPOSITORY_URL",
                format!("file://{}", self.dir.path().join("origin.git").display()),
            ),
            ("CI_COMMIT_SHA", self.commits[commit].clone()),
            ("CI_JOB_TIMEOUT", "900".to_string()),
        ];
        let mut env: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.clone()))
            .collect();
        env.push(("BUILD_FAILURE_EXIT_CODE".into(), BUILD_FAILURE.to_string()));
        env.push((
            "SYSTEM_FAILURE_EXIT_CODE".into(),
            SYSTEM_FAILURE.to_string(),
        ));
        env
    }

    /// The bash script the runner writes for a stage: strict mode, the job's variables
    /// exported (a file variable written next to the job's directory, as the runner
    /// does), then `body`.
    fn script(&self, job: u32, commit: &str, stage: &str, body: &str) -> PathBuf {
        let mut text = String::from("#!/usr/bin/env bash\n\nset -eo pipefail\nset +o noclobber\n");
        for (name, value) in self.env(job, commit) {
            if let Some(name) = name.strip_prefix("CUSTOM_ENV_") {
                text.push_str(&format!("export {name}='{value}'\n"));
            }
        }
        text.push_str("mkdir -p \"$CI_PROJECT_DIR.tmp\"\n");
        text.push_str("printf '%s' 'file variable content' > \"$CI_PROJECT_DIR.tmp/SETTINGS\"\n");
        text.push_str("export SETTINGS=\"$CI_PROJECT_DIR.tmp/SETTINGS\"\n");
        text.push_str(body);
        text.push_str("\nexit 0\n");
        let dir = self.dir.path().join(format!("scripts-{job}"));
        std::fs::create_dir_all(&dir).expect("script dir");
        let path = dir.join(format!("script-{stage}"));
        std::fs::write(&path, text).expect("script");
        path
    }

    /// The driver, run as the runner runs it: in a temp directory, in its own process
    /// group, with the job's variables; `args` then the stage's arguments.
    fn driver(&self, job: u32, commit: &str, args: &[&Path]) -> Command {
        let mut command = Command::new(util::bin_dir().join("contractor-gitlab-executor"));
        command
            .args(args)
            .envs(self.env(job, commit))
            .current_dir(self.dir.path())
            .process_group(0);
        command
    }

    /// `run_exec SCRIPT STAGE`: its exit code and output (stdout then stderr).
    fn run(&self, job: u32, commit: &str, stage: &str, body: &str) -> (Option<i32>, String) {
        let script = self.script(job, commit, stage, body);
        let out = self
            .driver(job, commit, &[Path::new("run"), &script, Path::new(stage)])
            .output()
            .expect("run the driver");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// A stage that must end with `expected`; returns its output.
    fn stage(&self, job: u32, commit: &str, stage: &str, body: &str, expected: i32) -> String {
        let (code, text) = self.run(job, commit, stage, body);
        assert_eq!(code, Some(expected), "job {job} stage {stage}:\n{text}");
        text
    }

    /// config_exec then prepare_exec.
    fn start_job(&self, job: u32, commit: &str) {
        let out = self
            .driver(job, commit, &[Path::new("config")])
            .output()
            .expect("config");
        assert!(out.status.success());
        let config: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("config_exec prints JSON");
        assert_eq!(config["driver"]["name"], "contractor");
        assert_eq!(config["builds_dir_is_shared"], true);
        let out = self
            .driver(job, commit, &[Path::new("prepare")])
            .output()
            .expect("prepare");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The runner's stages before the job's script: prepare_script, get_sources (a fetch
    /// into the job's directory, then a checkout and clean), restore_cache,
    /// download_artifacts.
    fn stages_before_script(&self, job: u32, commit: &str) {
        self.stage(
            job,
            commit,
            "prepare_script",
            "echo \"Running on $(hostname)...\"",
            0,
        );
        let get_sources = "mkdir -p \"$CI_PROJECT_DIR\"\ncd \"$CI_PROJECT_DIR\"\n\
            [ -d .git ] || git init -q\n\
            git fetch -q \"$CI_REPOSITORY_URL\" +refs/heads/*:refs/remotes/origin/*\n\
            git checkout -q -f \"$CI_COMMIT_SHA\"\ngit clean -q -ffdx\n\
            echo \"Checked out $CI_COMMIT_SHA\"";
        let text = self.stage(job, commit, "get_sources", get_sources, 0);
        assert!(text.contains("Checked out"), "{text}");
        self.stage(
            job,
            commit,
            "restore_cache",
            "echo 'no cache to restore'",
            0,
        );
        self.stage(
            job,
            commit,
            "download_artifacts",
            "echo 'no artifacts to download'",
            0,
        );
    }

    /// cleanup_file_variables and cleanup_exec.
    fn end_job(&self, job: u32, commit: &str) {
        self.stage(
            job,
            commit,
            "cleanup_file_variables",
            "rm -rf \"$CI_PROJECT_DIR.tmp\"",
            0,
        );
        assert!(!PathBuf::from(format!("{}.tmp", self.project_dir().display())).exists());
        let out = self
            .driver(job, commit, &[Path::new("cleanup")])
            .output()
            .expect("cleanup");
        assert!(out.status.success());
    }
}

/// The step_script body: the job's commands, each echoed as the runner does.
fn step(commands: &[&str]) -> String {
    let mut body = String::from("cd \"$CI_PROJECT_DIR\"\n");
    for command in commands {
        body.push_str(&format!(
            "echo '$ {}'\n{command}\n",
            command.replace('\'', "")
        ));
    }
    body
}

/// The VMs named in `output` still in libvirt (or their overlays on disk) after
/// `util::VM_GONE` (a snapshot slot's name reused by another running build does not count).
fn vms_left(output: &str) -> Vec<String> {
    vm_names(output)
        .into_iter()
        .filter(|name| !util::wait_vm_gone(name))
        .collect()
}

/// The VMs the build's progress names (`VM contractor-...`) in `output`.
fn vm_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.split("VM contractor-").nth(1))
        .filter_map(|r| r.split([' ', ',']).next())
        .map(|rest| format!("contractor-{rest}"))
        .collect()
}

#[test]
fn gitlab_jobs_run_through_every_stage_with_the_runners_exit_codes() {
    if util::skip_without_vm("gitlab_jobs_run_through_every_stage_with_the_runners_exit_codes") {
        return;
    }
    let runner = Runner::new();
    let project = runner.project_dir();

    // Job 1: echo, a compile and its program, in a VM; the artifact comes back for the
    // runner's upload stage, which runs on the host.
    runner.start_job(1, "good");
    runner.stages_before_script(1, "good");
    let text = runner.stage(
        1,
        "good",
        "step_script",
        &step(&[
            "echo \"job $CI_JOB_ID says hi\"",
            "cat \"$SETTINGS\"; echo",
            "echo \"interfaces: $(ls /sys/class/net | tr '\\n' ' ')\"",
            "cc -O2 -o hello hello.c",
            "./hello",
        ]),
        0,
    );
    assert!(text.contains("job 1 says hi"), "{text}");
    assert!(text.contains("file variable content"), "{text}");
    assert!(
        text.contains("interfaces: lo "),
        "not in a NIC-less VM:\n{text}"
    );
    assert!(text.contains("hello from the job"), "{text}");
    assert!(!vm_names(&text).is_empty(), "no VM named:\n{text}");
    assert!(vms_left(&text).is_empty(), "{text}");
    let record = project.join(".contractor/latest");
    assert!(record.join("result.json").is_file(), "no record:\n{text}");
    assert!(record.join("provenance.json").is_file());
    runner.stage(1, "good", "archive_cache", "echo 'no cache to archive'", 0);
    let upload = format!(
        "cd \"$CI_PROJECT_DIR\"\ncp hello {}/hello",
        runner.uploaded().display()
    );
    runner.stage(1, "good", "upload_artifacts_on_success", &upload, 0);
    let run = Command::new(runner.uploaded().join("hello"))
        .output()
        .expect("the uploaded artifact runs on the host");
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello from the job\n");
    runner.end_job(1, "good");

    // Job 2: a failing command fails the job (BUILD_FAILURE_EXIT_CODE) and stops the
    // script; after_script still runs, in a VM; the failure stages run on the host.
    runner.start_job(2, "good");
    runner.stages_before_script(2, "good");
    assert!(!project.join("hello").exists(), "get_sources did not clean");
    let text = runner.stage(
        2,
        "good",
        "step_script",
        &step(&[
            "echo before the failure",
            "ls /no/such/file",
            "echo after the failure",
        ]),
        BUILD_FAILURE,
    );
    assert!(text.contains("before the failure"), "{text}");
    assert!(
        !text.contains("\nafter the failure"),
        "the script went on:\n{text}"
    );
    let text = runner.stage(
        2,
        "good",
        "after_script",
        &step(&["echo \"after_script of job $CI_JOB_ID in $(pwd)\""]),
        0,
    );
    assert!(
        text.contains(&format!("after_script of job 2 in {}", project.display())),
        "{text}"
    );
    runner.stage(2, "good", "archive_cache_on_failure", "true", 0);
    runner.stage(2, "good", "upload_artifacts_on_failure", "true", 0);
    runner.end_job(2, "good");

    // Job 3: a broken contractor.toml is the job's failure, named; no VM starts.
    runner.start_job(3, "broken");
    runner.stages_before_script(3, "broken");
    let text = runner.stage(
        3,
        "broken",
        "step_script",
        &step(&["echo never"]),
        BUILD_FAILURE,
    );
    assert!(
        text.contains("contractor.toml") && text.contains("cpus = \"many\""),
        "{text}"
    );
    assert!(!text.contains("VM contractor-"), "a VM started:\n{text}");
    runner.end_job(3, "broken");

    // Job 4: the tools cannot start (not where the executor looks for them): prepare and
    // the job's script are system failures, and nothing starts.
    let empty = tempfile::tempdir().expect("empty dir");
    let mut prepare = runner.driver(4, "good", &[Path::new("prepare")]);
    let out = prepare
        .env("CONTRACTOR_BIN", empty.path())
        .output()
        .expect("prepare");
    assert_eq!(out.status.code(), Some(SYSTEM_FAILURE));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is missing"));
    runner.stages_before_script(4, "good");
    let script = runner.script(4, "good", "step_script", &step(&["echo never"]));
    let out = runner
        .driver(
            4,
            "good",
            &[Path::new("run"), &script, Path::new("step_script")],
        )
        .env("CONTRACTOR_BIN", empty.path())
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(SYSTEM_FAILURE),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    runner.end_job(4, "good");
}

/// Sends `signal` to the process group `child` leads, as the runner does.
fn signal_group(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    let group = nix::unistd::Pid::from_raw(-i32::try_from(child.id()).expect("pid"));
    let _ = nix::sys::signal::kill(group, signal);
}

/// A driver process that a failing test still stops (SIGTERM to its group, then SIGKILL),
/// so that it leaves no VM.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            signal_group(&self.0, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            signal_group(&self.0, nix::sys::signal::Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_cancelled_gitlab_job_leaves_no_vm() {
    if util::skip_without_vm("a_cancelled_gitlab_job_leaves_no_vm") {
        return;
    }
    let runner = Runner::new();
    runner.start_job(5, "good");
    runner.stages_before_script(5, "good");
    let script = runner.script(
        5,
        "good",
        "step_script",
        &step(&["echo long step started", "sleep 600"]),
    );
    let log = runner.dir.path().join("job.log");
    let file = std::fs::File::create(&log).expect("job log");
    let mut running = Running(
        runner
            .driver(
                5,
                "good",
                &[Path::new("run"), &script, Path::new("step_script")],
            )
            .stdout(Stdio::from(file.try_clone().expect("log")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("run"),
    );
    let child = &mut running.0;
    let read = || {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    };
    let started = Instant::now();
    while !read().contains("\nlong step started") {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "run ended before the step started:\n{}",
            read()
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the step did not start:\n{}",
            read()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = read();
    let vm = vm_names(&text)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no VM named:\n{text}"));
    assert!(util::libvirt_domains().lines().any(|l| l.trim() == vm));

    // The runner cancels: SIGTERM to the driver's process group.
    signal_group(child, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            panic!("run did not end after SIGTERM:\n{}", read());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = read();
    assert_eq!(status.code(), Some(BUILD_FAILURE), "{text}");
    // The VM's holder finishes libvirt's destroy on its own after the build returns: gone,
    // with its overlay, within util::VM_GONE.
    assert!(
        util::wait_vm_gone(&vm),
        "VM {vm} or its overlay left after cancel:\n{text}"
    );
    runner.end_job(5, "good");
}
