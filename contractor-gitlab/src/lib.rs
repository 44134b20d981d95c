//! Contractor as GitLab Runner's custom executor (`contractor-gitlab-executor
//! config|prepare|run|cleanup`; docs/ci.md has the runner's `config.toml`).
//!
//! The runner calls `run SCRIPT STAGE` once per stage of a job, with a bash script it
//! generated. The stages that run code the job supplies (`step_script`, `build_script`,
//! `step_*`, `after_script`) each become one `contractor build` of the job's directory
//! (`CUSTOM_ENV_CI_PROJECT_DIR`, as `get_sources` left it), a child process found beside
//! this executable, whose script is the runner's (`--script-file`): a builder VM with no
//! NIC, the proxy's allow list from the project's `contractor.toml` plus `CONTRACTOR_ALLOW`
//! (`--allow`), the record in `.contractor/builds/<id>/`, and the spec's artifacts copied
//! back into the job's directory, where the runner's artifact and cache stages find them.
//! The runner's own stages (`prepare_script`, `get_sources`, the cache and artifact stages,
//! `cleanup_file_variables`) run on this host with bash, as the shell executor runs them.
//! The invariant: no VM outlives the `run` that created it. SIGTERM (or SIGINT) from the
//! runner is forwarded once to the child, which ends the build as interrupted and destroys
//! the VM, and `run` waits for it, so a cancelled job leaves none.
//!
//! Outcomes map onto the runner's: a script that fails (or times out, is cancelled, or a
//! broken `contractor.toml`) exits with `BUILD_FAILURE_EXIT_CODE`; the machinery failing
//! (libvirt, the VM, a tool that cannot start) with `SYSTEM_FAILURE_EXIT_CODE`.

pub mod artifacts;
pub mod child;
pub mod script;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use contractor_protocol::tool::{Locator, ToolError};

/// The largest stage script accepted (the runner's scripts are some kilobytes; this one
/// travels base64-encoded in `contractor build --script-file`, whose limit is 3 MiB).
pub const MAX_STAGE_SCRIPT_BYTES: u64 = 2 << 20;

/// The largest `contractor.toml` a job's directory may have (the project is the job's: the
/// file is read on the host, and its parse errors go to the job's log).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// The job variable that adds entries to the proxy's allow list (comma- or
/// space-separated host names, `*.host` or URL rules, as in `[network] allow`).
pub const ALLOW_VARIABLE: &str = "CONTRACTOR_ALLOW";

/// The front end, found as the front end finds its tools: in `$CONTRACTOR_BIN`, else beside
/// this executable.
pub const FRONT_END: &str = "contractor";

/// What a job's build needs beside this executable: the front end and the tools it runs.
pub const NEEDED: [&str; 5] = [
    FRONT_END,
    "contractor-store",
    "contractor-proxy",
    "contractor-vm",
    "contractor-run",
];

/// Where a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    /// The runner's own work (sources, caches, artifacts): on this host, with bash.
    Host,
    /// Code the job supplies: in a builder VM.
    Job,
}

/// Where the runner's stage `name` runs: the job's scripts in a VM, the rest on the host.
pub fn stage_kind(name: &str) -> StageKind {
    match name {
        "build_script" | "after_script" => StageKind::Job,
        _ if name.starts_with("step_") => StageKind::Job,
        _ => StageKind::Host,
    }
}

/// Why the executor could not do a stage; [`RunnerCodes::of`] says which of the runner's
/// codes it is.
#[derive(Debug, thiserror::Error)]
pub enum GitlabError {
    /// A variable the runner sets is missing or malformed: not run by a runner.
    #[error("{name} is {problem}: `contractor-gitlab-executor` is run by GitLab Runner's custom executor (docs/ci.md)")]
    Runner {
        /// The variable.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The stage script could not be read or is too big.
    #[error("cannot use the stage script {}: {problem}", path.display())]
    Script {
        /// The script.
        path: PathBuf,
        /// Why.
        problem: String,
    },
    /// The job's contractor.toml is not a regular file of at most [`MAX_SPEC_BYTES`]: it
    /// is not opened (a link could point at a host file, whose lines a parse error would
    /// show in the job's log).
    #[error("{}: {problem}; it must be a regular file of at most {MAX_SPEC_BYTES} bytes in the repository", path.display())]
    SpecFile {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        problem: String,
    },
    /// An executable the build needs is missing.
    #[error("{name} is missing: {} is not an executable file ({hint})", path.display())]
    Missing {
        /// The executable.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to fix it.
        hint: &'static str,
    },
    /// A process could not be started or waited for.
    #[error("cannot run {} for the stage {stage}", program.display())]
    Start {
        /// bash or contractor.
        program: PathBuf,
        /// The stage.
        stage: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The script for `contractor build` could not be written to a temporary file.
    #[error("cannot write the stage's script to a temporary file")]
    Temporary(#[source] std::io::Error),
}

/// The runner's exit codes for this job (`BUILD_FAILURE_EXIT_CODE`,
/// `SYSTEM_FAILURE_EXIT_CODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerCodes {
    /// The job's script failed.
    pub build_failure: u8,
    /// The executor or the machinery failed.
    pub system_failure: u8,
}

impl RunnerCodes {
    /// Reads the codes from `vars` (the environment).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<RunnerCodes, GitlabError> {
        let code = |name: &str| -> Result<u8, GitlabError> {
            let value = vars.get(name).ok_or_else(|| GitlabError::Runner {
                name: name.to_string(),
                problem: "not set".into(),
            })?;
            value
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&c| c != 0)
                .ok_or_else(|| GitlabError::Runner {
                    name: name.to_string(),
                    problem: format!("{value:?}, not an exit code from 1 to 255"),
                })
        };
        Ok(RunnerCodes {
            build_failure: code("BUILD_FAILURE_EXIT_CODE")?,
            system_failure: code("SYSTEM_FAILURE_EXIT_CODE")?,
        })
    }

    /// The exit code for `failure`.
    pub fn of(&self, failure: &GitlabError) -> u8 {
        match failure {
            GitlabError::SpecFile { .. } | GitlabError::Script { .. } => self.build_failure,
            _ => self.system_failure,
        }
    }

    /// The exit code for a `contractor build` that exited with `code` (None: killed by a
    /// signal). Its codes (README, "Exit codes"): 1 the script failed or timed out, 2 bad
    /// input (contractor.toml, an `--allow` rule), 130 interrupted (the runner cancelled or
    /// timed the job out: it is the job that ended) are the job's; 3 (infrastructure),
    /// anything else and a signal are the system's.
    pub fn of_build(&self, code: Option<i32>) -> u8 {
        use contractor_protocol::ExitCode;
        match code {
            Some(0) => 0,
            Some(c)
                if c == ExitCode::BuildFailed.code()
                    || c == ExitCode::BadInput.code()
                    || c == ExitCode::Interrupted.code() =>
            {
                self.build_failure
            }
            _ => self.system_failure,
        }
    }
}

/// The job as the runner describes it to a `run` of a job stage, read in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStage {
    /// `CUSTOM_ENV_CI_PROJECT_DIR`: the job's directory on this host (absolute).
    pub project_dir: PathBuf,
    /// `CUSTOM_ENV_CONTRACTOR_ALLOW`, split.
    pub extra_allow: Vec<String>,
    /// `CUSTOM_ENV_CI_JOB_TIMEOUT`: the job's timeout, which replaces `[build] timeout`
    /// (the runner stops the job then anyway).
    pub timeout: Option<std::time::Duration>,
}

impl JobStage {
    /// Reads the job from `vars` (the environment).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<JobStage, GitlabError> {
        let name = "CUSTOM_ENV_CI_PROJECT_DIR";
        let dir = vars.get(name).ok_or_else(|| GitlabError::Runner {
            name: name.into(),
            problem: "not set".into(),
        })?;
        let project_dir = PathBuf::from(dir);
        let plain = project_dir.is_absolute()
            && project_dir.components().count() > 1
            && project_dir
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !plain {
            return Err(GitlabError::Runner {
                name: name.into(),
                problem: format!("{dir:?}, not an absolute path without `.` or `..` below /"),
            });
        }
        let extra_allow = vars
            .get(&format!("CUSTOM_ENV_{ALLOW_VARIABLE}"))
            .map(|v| {
                v.split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let name = "CUSTOM_ENV_CI_JOB_TIMEOUT";
        let timeout = match vars.get(name) {
            None => None,
            Some(secs) => Some(
                secs.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&s| s > 0)
                    .map(std::time::Duration::from_secs)
                    .ok_or_else(|| GitlabError::Runner {
                        name: name.into(),
                        problem: format!("{secs:?}, not a number of seconds"),
                    })?,
            ),
        };
        Ok(JobStage {
            project_dir,
            extra_allow,
            timeout,
        })
    }

    /// The arguments of the `contractor build` that runs `stage` with the script in
    /// `script_file`: this job's directory and allow list and timeout, on this machine
    /// (`--local`: the old in-process build never went to a build host), and no artifacts
    /// for `after_script` (it runs after they came out, and even when the script failed).
    pub fn build_args(&self, stage: &str, script_file: &Path, uri: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "build".to_string(),
            "--local".into(),
            "-f".into(),
            self.project_dir
                .join("contractor.toml")
                .display()
                .to_string(),
            "--script-file".into(),
            script_file.display().to_string(),
        ];
        for rule in &self.extra_allow {
            args.extend(["--allow".to_string(), rule.clone()]);
        }
        if let Some(timeout) = self.timeout {
            args.extend(["--timeout".to_string(), format!("{}s", timeout.as_secs())]);
        }
        if stage == "after_script" {
            args.push("--no-artifacts".into());
        }
        if let Some(uri) = uri {
            args.extend(["--uri".to_string(), uri.to_string()]);
        }
        args
    }
}

/// What `config` prints: the JSON the runner reads from `config_exec`. The job directory is
/// on this host, where jobs run side by side, so it is shared.
pub fn config_json(builds_dir: Option<&Path>, cache_dir: Option<&Path>) -> serde_json::Value {
    let mut config = serde_json::json!({
        "builds_dir_is_shared": true,
        "driver": {
            "name": "contractor",
            "version": env!("CARGO_PKG_VERSION"),
        },
    });
    if let Some(dir) = builds_dir {
        config["builds_dir"] = dir.display().to_string().into();
    }
    if let Some(dir) = cache_dir {
        config["cache_dir"] = dir.display().to_string().into();
    }
    config
}

/// Where `contractor` and the tools are taken from: `$CONTRACTOR_BIN` when set, else this
/// executable's directory.
const TOOLS: Locator = Locator {
    unit_test: cfg!(test),
    hint_env: "CONTRACTOR_BIN names the directory holding contractor and its tools",
    hint_beside: "contractor and its tools are looked for beside contractor-gitlab-executor; \
                  set CONTRACTOR_BIN to their directory, or install them together \
                  (scripts/install)",
};

/// The executable `name` (one of [`NEEDED`]).
pub fn locate(name: &'static str) -> Result<PathBuf, GitlabError> {
    TOOLS.locate(name).map_err(|err| match err {
        ToolError::Missing { name, path, hint } => GitlabError::Missing { name, path, hint },
        _ => GitlabError::Missing {
            name,
            path: PathBuf::from(name),
            hint: TOOLS.hint_beside,
        },
    })
}

/// `prepare`: checks that what a job's build needs is here, so that a runner without it
/// fails the job as a system failure before cloning anything. The VM itself starts with
/// each job stage, once the sources are there.
pub fn prepare() -> Result<(), GitlabError> {
    for name in NEEDED {
        locate(name)?;
    }
    eprintln!(
        "contractor: job scripts run in a builder VM with no network interface; sources, caches and artifacts stay on this host"
    );
    Ok(())
}

/// `run SCRIPT STAGE`: runs one stage and returns the process's exit code.
pub fn run(
    script: &Path,
    stage: &str,
    uri: Option<String>,
    vars: &BTreeMap<String, String>,
) -> Result<u8, GitlabError> {
    let codes = RunnerCodes::from_vars(vars)?;
    match stage_kind(stage) {
        StageKind::Host => run_on_host(script, stage, &codes),
        StageKind::Job => {
            let job = JobStage::from_vars(vars)?;
            run_in_vm(script, stage, &job, uri.as_deref(), &codes)
        }
    }
}

/// A runner stage on this host: `bash SCRIPT`, its failure the job's.
fn run_on_host(script: &Path, stage: &str, codes: &RunnerCodes) -> Result<u8, GitlabError> {
    let mut bash = Command::new("bash");
    bash.arg(script);
    let status = start(&mut bash, Path::new("bash"), stage)?;
    Ok(if status.success() {
        0
    } else {
        codes.build_failure
    })
}

/// A job stage in a builder VM: one `contractor build` of the job's directory.
fn run_in_vm(
    script: &Path,
    stage: &str,
    job: &JobStage,
    uri: Option<&str>,
    codes: &RunnerCodes,
) -> Result<u8, GitlabError> {
    let text = script::read_stage_script(script)?;
    check_spec_file(&job.project_dir)?;
    let contractor = locate(FRONT_END)?;
    let mut file = tempfile::Builder::new()
        .prefix("contractor-gitlab-")
        .suffix(".sh")
        .tempfile()
        .map_err(GitlabError::Temporary)?;
    file.write_all(script::vm_script(&job.project_dir, &text).as_bytes())
        .map_err(GitlabError::Temporary)?;
    let store = job.project_dir.join(".contractor");
    let before = artifacts::latest_record(&store);
    eprintln!("contractor: {stage} runs in a builder VM with no network interface");
    let mut build = Command::new(&contractor);
    build
        .args(job.build_args(stage, file.path(), uri))
        .current_dir(&job.project_dir)
        .stdin(Stdio::null());
    let status = start(&mut build, &contractor, stage)?;
    drop(file);
    if stage != "after_script" {
        let after = artifacts::latest_record(&store);
        if let Some(record) = after.filter(|r| before.as_ref() != Some(r)) {
            for line in artifacts::copy_back(&record, &job.project_dir) {
                eprintln!("contractor: {line}");
            }
        }
    }
    Ok(codes.of_build(status.code()))
}

/// Runs `command` with the runner's signals forwarded ([`child::run`]).
fn start(command: &mut Command, program: &Path, stage: &str) -> Result<ExitStatus, GitlabError> {
    child::run(command).map_err(|source| GitlabError::Start {
        program: program.to_path_buf(),
        stage: stage.to_string(),
        source,
    })
}

/// Checks the job's `contractor.toml`, when it has one, before `contractor build` reads it:
/// a regular file of at most [`MAX_SPEC_BYTES`] (none: the defaults).
pub fn check_spec_file(project_dir: &Path) -> Result<(), GitlabError> {
    let file = project_dir.join("contractor.toml");
    let problem = match std::fs::symlink_metadata(&file) {
        Ok(meta) if meta.file_type().is_symlink() => "it is a link",
        Ok(meta) if !meta.is_file() => "it is not a regular file",
        Ok(meta) if meta.len() > MAX_SPEC_BYTES => "it is too big",
        Ok(_) | Err(_) => return Ok(()),
    };
    Err(GitlabError::SpecFile {
        path: file,
        problem: problem.into(),
    })
}

/// `cleanup`: a job's VMs end with the `run` that started them, so nothing is left to
/// destroy; this says so in the runner's log.
pub fn cleanup() {
    eprintln!(
        "contractor: nothing to clean up: each job stage's VM was destroyed when its stage ended"
    );
}

/// The error chain of a failure, for the job log, control characters escaped.
pub fn chain(err: &GitlabError) -> String {
    let chain = contractor_protocol::result::error_chain(err).join(": ");
    chain
        .chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn job_stages_run_in_the_vm_and_the_runners_on_the_host() {
        for stage in [
            "step_script",
            "build_script",
            "after_script",
            "step_release",
        ] {
            assert_eq!(stage_kind(stage), StageKind::Job, "{stage}");
        }
        for stage in [
            "prepare_script",
            "get_sources",
            "restore_cache",
            "download_artifacts",
            "archive_cache",
            "archive_cache_on_failure",
            "upload_artifacts_on_success",
            "upload_artifacts_on_failure",
            "cleanup_file_variables",
        ] {
            assert_eq!(stage_kind(stage), StageKind::Host, "{stage}");
        }
    }

    #[test]
    fn runner_codes_are_read_and_checked() {
        let codes = RunnerCodes::from_vars(&vars(&[
            ("BUILD_FAILURE_EXIT_CODE", "1"),
            ("SYSTEM_FAILURE_EXIT_CODE", "2"),
        ]))
        .expect("test setup");
        assert_eq!(codes.build_failure, 1);
        assert_eq!(codes.system_failure, 2);
        let missing = RunnerCodes::from_vars(&vars(&[("BUILD_FAILURE_EXIT_CODE", "1")]));
        assert!(missing
            .expect_err("an error")
            .to_string()
            .contains("SYSTEM_FAILURE_EXIT_CODE is not set"));
        let bad = RunnerCodes::from_vars(&vars(&[
            ("BUILD_FAILURE_EXIT_CODE", "300"),
            ("SYSTEM_FAILURE_EXIT_CODE", "2"),
        ]));
        assert!(bad.expect_err("an error").to_string().contains("\"300\""));
    }

    #[test]
    fn contractor_builds_exit_codes_map_onto_the_runners() {
        let codes = RunnerCodes {
            build_failure: 41,
            system_failure: 42,
        };
        // 0 success, 1 the script failed, 2 bad contractor.toml or --allow, 3 the
        // infrastructure, 130 cancelled; a signal or an unknown code is the system's.
        let cases = [
            (Some(0), 0),
            (Some(1), 41),
            (Some(2), 41),
            (Some(3), 42),
            (Some(130), 41),
            (Some(101), 42),
            (None, 42),
        ];
        for (exit, expected) in cases {
            assert_eq!(codes.of_build(exit), expected, "{exit:?}");
        }
    }

    #[test]
    fn the_job_directory_must_be_a_plain_absolute_path() {
        for bad in ["builds/x", "/", "/builds/../etc"] {
            let err = JobStage::from_vars(&vars(&[("CUSTOM_ENV_CI_PROJECT_DIR", bad)]));
            assert!(err.is_err(), "{bad}");
        }
        let job = JobStage::from_vars(&vars(&[
            ("CUSTOM_ENV_CI_PROJECT_DIR", "/builds/0/g/p"),
            ("CUSTOM_ENV_CONTRACTOR_ALLOW", "deb.debian.org, *.crates.io"),
            ("CUSTOM_ENV_CI_JOB_TIMEOUT", "3600"),
        ]))
        .expect("test setup");
        assert_eq!(job.timeout, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(job.project_dir, PathBuf::from("/builds/0/g/p"));
        assert_eq!(job.extra_allow, vec!["deb.debian.org", "*.crates.io"]);
        let bad = JobStage::from_vars(&vars(&[
            ("CUSTOM_ENV_CI_PROJECT_DIR", "/builds/0/g/p"),
            ("CUSTOM_ENV_CI_JOB_TIMEOUT", "1h"),
        ]));
        assert!(bad
            .expect_err("an error")
            .to_string()
            .contains("CUSTOM_ENV_CI_JOB_TIMEOUT"));
    }

    #[test]
    fn the_build_gets_the_jobs_script_allow_list_and_timeout() {
        let job = JobStage::from_vars(&vars(&[
            ("CUSTOM_ENV_CI_PROJECT_DIR", "/builds/0/g/p"),
            ("CUSTOM_ENV_CONTRACTOR_ALLOW", "deb.debian.org *.crates.io"),
            ("CUSTOM_ENV_CI_JOB_TIMEOUT", "900"),
        ]))
        .expect("test setup");
        let args = job.build_args("step_script", Path::new("/tmp/s.sh"), Some("qemu:///x"));
        let expected = "build --local -f /builds/0/g/p/contractor.toml --script-file /tmp/s.sh \
            --allow deb.debian.org --allow *.crates.io --timeout 900s --uri qemu:///x";
        assert_eq!(args.join(" "), expected);
        let args = job.build_args("after_script", Path::new("/tmp/s.sh"), None);
        assert!(args.contains(&"--no-artifacts".to_string()), "{args:?}");
    }

    #[test]
    fn a_contractor_toml_that_links_out_of_the_job_is_not_read() {
        let dir = tempfile::tempdir().expect("test setup");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "SECRET-LINE of a host file\n").expect("test setup");
        let project = dir.path().join("project");
        std::fs::create_dir(&project).expect("test setup");
        assert!(check_spec_file(&project).is_ok(), "none: the defaults");
        std::os::unix::fs::symlink(&secret, project.join("contractor.toml")).expect("test setup");
        let err = check_spec_file(&project).expect_err("a linked contractor.toml");
        let message = err.to_string();
        assert!(!message.contains("SECRET"), "{message}");
        assert!(
            message.contains("contractor.toml: it is a link"),
            "{message}"
        );
        let codes = RunnerCodes {
            build_failure: 7,
            system_failure: 8,
        };
        assert_eq!(codes.of(&err), 7);
        std::fs::remove_file(project.join("contractor.toml")).expect("test setup");
        std::fs::write(
            project.join("contractor.toml"),
            vec![b'#'; MAX_SPEC_BYTES as usize + 1],
        )
        .expect("test setup");
        let err = check_spec_file(&project).expect_err("too big");
        assert!(err.to_string().contains("too big"), "{err}");
    }
}
