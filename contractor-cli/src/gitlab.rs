//! `contractor-cli gitlab-executor config|prepare|run|cleanup`: Contractor as GitLab Runner's
//! custom executor (docs/ci.md has the runner's `config.toml`).
//!
//! The runner calls `run SCRIPT STAGE` once per stage of a job, with a bash script it
//! generated. The stages that run code the job supplies (`step_script`, `build_script`,
//! `step_*`, `after_script`) each become one `contractor build` of the job's directory
//! (`CUSTOM_ENV_CI_PROJECT_DIR`, as `get_sources` left it) whose script is the runner's: a
//! builder VM with no NIC, the proxy's allow list from the project's `contractor.toml` (plus
//! `CONTRACTOR_ALLOW`), the record in `.contractor/builds/<id>/`, and the spec's artifacts
//! copied back into the job's directory, where the runner's artifact and cache stages find
//! them. The runner's own stages (`prepare_script`, `get_sources`, the cache and artifact
//! stages, `cleanup_file_variables`) run on this host with bash, as the shell executor
//! runs them. The invariant: no VM outlives the `run` that created it (SIGTERM from the
//! runner ends the build as interrupted and destroys the VM), so a cancelled job leaves none.
//!
//! Outcomes map onto the runner's: a script that fails (or times out, or a broken
//! `contractor.toml`) exits with `BUILD_FAILURE_EXIT_CODE`; the machinery failing (libvirt,
//! the VM, a tool that cannot start) with `SYSTEM_FAILURE_EXIT_CODE`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use contractor_protocol::result::{error_chain, Outcome};
use contractor_protocol::vm::Accel;

use crate::build::{self, BuildOptions};
use crate::display::{Display, Mode};
use crate::spec::{self, BuildSpec};

/// The largest stage script accepted (the runner's scripts are some kilobytes; this one
/// travels base64-encoded inside the job line, whose limit is 4 MiB).
pub const MAX_STAGE_SCRIPT_BYTES: u64 = 2 << 20;

/// The largest `contractor.toml` a job's directory may have (the project is the job's: the
/// file is read on the host, and its parse errors go to the job's log).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

/// The job variable that adds entries to the proxy's allow list (comma- or
/// space-separated host names, `*.host` or URL rules, as in `[network] allow`).
pub const ALLOW_VARIABLE: &str = "CONTRACTOR_ALLOW";

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

/// Why the executor could not do a stage; [`Failure::exit_code`] says which of the
/// runner's codes it is.
#[derive(Debug, thiserror::Error)]
pub enum GitlabError {
    /// A variable the runner sets is missing or malformed: not run by a runner.
    #[error("{name} is {problem}: `contractor-cli gitlab-executor` is run by GitLab Runner's custom executor (docs/ci.md)")]
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
    /// bash could not be started for a host stage.
    #[error("cannot start bash for the stage {stage}")]
    Bash {
        /// The stage.
        stage: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The project's contractor.toml is wrong.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
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
    /// `CONTRACTOR_ALLOW` has an entry that is not an allow rule.
    #[error(
        "CUSTOM_ENV_{ALLOW_VARIABLE}: {entry:?} is not a host name, *.host or URL rule ({problem})"
    )]
    Allow {
        /// The entry.
        entry: String,
        /// Why.
        problem: String,
    },
    /// A tool the build needs is missing.
    #[error(transparent)]
    Tool(#[from] crate::tools::ToolError),
    /// The build could not run (libvirt, the VM, the store or the proxy).
    #[error("the build could not run")]
    Build(#[source] build::BuildError),
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
            GitlabError::Spec(_)
            | GitlabError::SpecFile { .. }
            | GitlabError::Allow { .. }
            | GitlabError::Script { .. } => self.build_failure,
            _ => self.system_failure,
        }
    }

    /// The exit code for a build that ended with `outcome`.
    pub fn of_outcome(&self, outcome: Outcome) -> u8 {
        match outcome {
            Outcome::Success => 0,
            // The runner cancelled or timed the job out: it is the job that ended.
            Outcome::Failed | Outcome::Timeout | Outcome::Interrupted => self.build_failure,
            Outcome::Infrastructure => self.system_failure,
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

/// `prepare`: checks that the tools a job's build needs are here, so that a runner without
/// them fails the job as a system failure before cloning anything. The VM itself starts
/// with each job stage, once the sources are there.
pub fn prepare() -> Result<(), GitlabError> {
    for tool in [
        crate::tools::STORE,
        crate::tools::PROXY,
        crate::tools::VM,
        crate::tools::RUN,
    ] {
        crate::tools::locate(tool)?;
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
            run_in_vm(script, stage, &job, uri, &codes)
        }
    }
}

/// A runner stage on this host: `bash SCRIPT`, its failure the job's.
fn run_on_host(script: &Path, stage: &str, codes: &RunnerCodes) -> Result<u8, GitlabError> {
    let status = std::process::Command::new("bash")
        .arg(script)
        .status()
        .map_err(|source| GitlabError::Bash {
            stage: stage.to_string(),
            source,
        })?;
    Ok(if status.success() {
        0
    } else {
        codes.build_failure
    })
}

/// A job stage in a builder VM: one build of the job's directory.
fn run_in_vm(
    script: &Path,
    stage: &str,
    job: &JobStage,
    uri: Option<String>,
    codes: &RunnerCodes,
) -> Result<u8, GitlabError> {
    let text = read_stage_script(script)?;
    let mut spec = job_spec(job)?;
    spec.script = vm_script(&job.project_dir, &text);
    // after_script runs after the artifacts came out (and even when the script failed):
    // it is not asked for them again.
    if stage == "after_script" {
        spec.artifacts.clear();
    }
    let options = BuildOptions::new(uri, Accel::Auto, None, true, false);
    eprintln!(
        "contractor: {stage} runs in a builder VM (image {}, allowed hosts: {})",
        spec.image,
        if spec.allow.is_empty() {
            "none".to_string()
        } else {
            spec.allow.join(", ")
        }
    );
    let display = Display::new(Mode::Auto);
    let built = build::build(&spec, &options, &display);
    display.close();
    let report = match built {
        Ok(report) => report,
        Err(build::BuildError::Interrupted(why)) => {
            eprintln!("contractor: {stage} stopped: {why}");
            return Ok(codes.of_outcome(Outcome::Interrupted));
        }
        Err(build::BuildError::Setting(problem)) => {
            eprintln!("contractor: {problem}");
            return Ok(codes.build_failure);
        }
        Err(err) => return Err(GitlabError::Build(err)),
    };
    let result = &report.result;
    let record = result.log.parent().unwrap_or(Path::new("."));
    eprintln!(
        "contractor: {stage}: build {} {} in {:.1}s; record {}",
        result.id,
        format!("{:?}", result.outcome).to_lowercase(),
        result.duration_secs,
        record.display()
    );
    if let Some(error) = &result.error {
        eprintln!("contractor: {}", error.chain.join(": "));
    }
    let copied = copy_artifacts(
        &record.join("artifacts"),
        &result.artifacts,
        &job.project_dir,
    );
    for line in copied {
        eprintln!("contractor: {line}");
    }
    Ok(codes.of_outcome(result.outcome))
}

/// The stage script's text, at most [`MAX_STAGE_SCRIPT_BYTES`].
fn read_stage_script(path: &Path) -> Result<Vec<u8>, GitlabError> {
    let problem = |problem: String| GitlabError::Script {
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| problem(e.to_string()))?;
    let mut text = Vec::new();
    file.take(MAX_STAGE_SCRIPT_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| problem(e.to_string()))?;
    if text.len() as u64 > MAX_STAGE_SCRIPT_BYTES {
        return Err(problem(format!(
            "it is over {MAX_STAGE_SCRIPT_BYTES} bytes, the most a stage script may have"
        )));
    }
    Ok(text)
}

/// The spec of a job stage's build: the project's `contractor.toml` when it has one (else
/// the defaults), with `CONTRACTOR_ALLOW` added to its allow list and the job's timeout.
pub fn job_spec(job: &JobStage) -> Result<BuildSpec, GitlabError> {
    let file = job.project_dir.join("contractor.toml");
    let found = match std::fs::symlink_metadata(&file) {
        Ok(meta) if meta.file_type().is_symlink() => Some(Err("it is a link")),
        Ok(meta) if !meta.is_file() => Some(Err("it is not a regular file")),
        Ok(meta) if meta.len() > MAX_SPEC_BYTES => Some(Err("it is too big")),
        Ok(_) => Some(Ok(())),
        Err(_) => None,
    };
    let mut spec = if let Some(found) = found {
        found.map_err(|problem| GitlabError::SpecFile {
            path: file.clone(),
            problem: problem.into(),
        })?;
        spec::load(&file)?
    } else {
        let mut spec = spec::parse_installed(&file, "[build]\nscript = \"true\"\n")?;
        spec.project_dir = job.project_dir.clone();
        spec
    };
    if let Some(timeout) = job.timeout {
        spec.timeout = timeout;
    }
    for entry in &job.extra_allow {
        let problem = if entry.contains("://") {
            spec::url_rule_problem(entry)
        } else if spec::is_allow_rule(&entry.to_ascii_lowercase()) {
            None
        } else {
            Some("write a host name like deb.debian.org or *.example.org".into())
        };
        if let Some(problem) = problem {
            return Err(GitlabError::Allow {
                entry: entry.clone(),
                problem,
            });
        }
        if !spec.allow.contains(entry) {
            spec.allow.push(entry.clone());
        }
    }
    Ok(spec)
}

/// The script the VM runs (with `sh -e` in the source's directory): the job's directory
/// path on the host made to lead there (the runner's script `cd`s to it), then the runner's
/// script, carried base64-encoded, run with bash.
pub fn vm_script(project_dir: &Path, stage_script: &[u8]) -> String {
    let dir = shell_quote(&project_dir.display().to_string());
    format!(
        "job_dir={dir}\n\
         if [ \"$job_dir\" != \"$PWD\" ]; then\n\
         \x20 if [ -e \"$job_dir\" ] && [ ! -L \"$job_dir\" ]; then\n\
         \x20   echo \"contractor: $job_dir exists in the builder image; set another builds_dir\" >&2; exit 1\n\
         \x20 fi\n\
         \x20 mkdir -p \"$(dirname \"$job_dir\")\" && ln -sfn \"$PWD\" \"$job_dir\"\n\
         fi\n\
         stage_script=$(mktemp)\n\
         base64 -d > \"$stage_script\" <<'CONTRACTOR_STAGE_SCRIPT'\n\
         {}CONTRACTOR_STAGE_SCRIPT\n\
         exec bash \"$stage_script\"\n",
        base64_lines(stage_script)
    )
}

/// `text` in single quotes for sh.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Copies the build's artifacts (files under `artifacts_dir`, the record's) to the same
/// relative paths in the job's directory, where the runner's upload stage finds them.
/// Nothing is written through a link: a path whose directory in the job's directory is a
/// link (the project's own, made by the clone) is left out and named. Returns one line per
/// artifact left out.
fn copy_artifacts(artifacts_dir: &Path, artifacts: &[PathBuf], project_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for artifact in artifacts {
        let Ok(relative) = artifact.strip_prefix(artifacts_dir) else {
            continue;
        };
        if let Err(problem) = copy_artifact(artifact, relative, project_dir) {
            problems.push(format!(
                "artifact {} not copied into the job's directory: {problem}",
                relative.display()
            ));
        }
    }
    problems
}

/// Copies one artifact to `project_dir/relative`, creating directories, never following a
/// link.
fn copy_artifact(from: &Path, relative: &Path, project_dir: &Path) -> Result<(), String> {
    let mut at = project_dir.to_path_buf();
    let parts: Vec<_> = relative.components().collect();
    let Some((name, dirs)) = parts.split_last() else {
        return Err("empty path".into());
    };
    for part in dirs {
        let Component::Normal(part) = part else {
            return Err("not a plain relative path".into());
        };
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(_) => std::fs::create_dir(&at).map_err(|e| format!("{}: {e}", at.display()))?,
        }
    }
    let Component::Normal(name) = name else {
        return Err("not a plain relative path".into());
    };
    at.push(name);
    if let Ok(meta) = std::fs::symlink_metadata(&at) {
        if meta.is_dir() {
            return Err(format!("{} is a directory", at.display()));
        }
        std::fs::remove_file(&at).map_err(|e| format!("{}: {e}", at.display()))?;
    }
    let mut source = std::fs::File::open(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let mode = source
        .metadata()
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap_or(0o644);
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&at)
        .map_err(|e| format!("{}: {e}", at.display()))?;
    std::io::copy(&mut source, &mut target).map_err(|e| format!("{}: {e}", at.display()))?;
    std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| format!("{}: {e}", at.display()))
}

/// `cleanup`: a job's VMs end with the `run` that started them, so nothing is left to
/// destroy; this says so in the runner's log.
pub fn cleanup() {
    eprintln!(
        "contractor: nothing to clean up: each job stage's VM was destroyed when its stage ended"
    );
}

/// The error chain of a failure, for the job log.
pub fn chain(err: &GitlabError) -> String {
    error_chain(err).join(": ")
}

/// `bytes` in base64 (RFC 4648, with padding), in lines of 76 characters, each ending in a
/// newline, as `base64 -d` reads them.
fn base64_lines(bytes: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 76 + 1);
    for line in encoded.as_bytes().chunks(76) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out
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
        assert_eq!(codes.of_outcome(Outcome::Failed), 1);
        assert_eq!(codes.of_outcome(Outcome::Infrastructure), 2);
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
    fn a_contractor_toml_that_links_out_of_the_job_is_not_read() {
        let dir = tempfile::tempdir().expect("test setup");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "SECRET-LINE of a host file\n").expect("test setup");
        let project = dir.path().join("project");
        std::fs::create_dir(&project).expect("test setup");
        std::os::unix::fs::symlink(&secret, project.join("contractor.toml")).expect("test setup");
        let job = JobStage::from_vars(&vars(&[(
            "CUSTOM_ENV_CI_PROJECT_DIR",
            &project.display().to_string(),
        )]))
        .expect("test setup");
        let err = job_spec(&job).expect_err("a linked contractor.toml");
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
    }

    #[test]
    fn the_allow_variable_adds_to_the_spec_and_bad_entries_are_named() {
        let dir = tempfile::tempdir().expect("test setup");
        std::fs::write(
            dir.path().join("contractor.toml"),
            "[build]\nscript = \"make\"\n[network]\nallow = [\"deb.debian.org\"]\n",
        )
        .expect("test setup");
        let project = dir.path().display().to_string();
        let job = JobStage::from_vars(&vars(&[
            ("CUSTOM_ENV_CI_PROJECT_DIR", &project),
            ("CUSTOM_ENV_CONTRACTOR_ALLOW", "deb.debian.org *.crates.io"),
        ]))
        .expect("test setup");
        let spec = job_spec(&job).expect("test setup");
        assert_eq!(spec.allow, vec!["deb.debian.org", "*.crates.io"]);
        let job = JobStage::from_vars(&vars(&[
            ("CUSTOM_ENV_CI_PROJECT_DIR", &project),
            ("CUSTOM_ENV_CONTRACTOR_ALLOW", "http://localhost:8080"),
        ]))
        .expect("test setup");
        let err = job_spec(&job).expect_err("an error");
        assert!(
            err.to_string().contains("\"http://localhost:8080\""),
            "{err}"
        );
        assert_eq!(
            RunnerCodes {
                build_failure: 7,
                system_failure: 8
            }
            .of(&err),
            7
        );
    }

    #[test]
    fn base64_matches_the_rfc_examples() {
        let cases = [
            ("", ""),
            ("f", "Zg==\n"),
            ("fo", "Zm8=\n"),
            ("foo", "Zm9v\n"),
            ("foob", "Zm9vYg==\n"),
            ("fooba", "Zm9vYmE=\n"),
            ("foobar", "Zm9vYmFy\n"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64_lines(plain.as_bytes()), encoded);
        }
        let long = base64_lines(&[0u8; 60]);
        assert_eq!(long.lines().next().map(str::len), Some(76));
    }

    #[test]
    fn the_vm_script_recreates_the_job_directory_and_runs_the_stage_with_bash() {
        let dir = tempfile::tempdir().expect("test setup");
        let job = dir.path().join("it's here/p");
        let script = vm_script(&job, b"#!/usr/bin/env bash\ncd \"$JOB\" && pwd -P > out\n");
        let work = dir.path().join("work");
        std::fs::create_dir(&work).expect("test setup");
        let status = std::process::Command::new("sh")
            .args(["-e", "-c", &script])
            .current_dir(&work)
            .env("JOB", &job)
            .status()
            .expect("test setup");
        assert!(status.success());
        let out = std::fs::read_to_string(work.join("out")).expect("test setup");
        assert_eq!(
            out.trim(),
            work.canonicalize()
                .expect("test setup")
                .display()
                .to_string()
        );
    }

    #[test]
    fn artifacts_are_copied_but_never_through_a_link() {
        let dir = tempfile::tempdir().expect("test setup");
        let artifacts = dir.path().join("record/artifacts");
        std::fs::create_dir_all(artifacts.join("out")).expect("test setup");
        std::fs::create_dir_all(artifacts.join("bin")).expect("test setup");
        std::fs::write(artifacts.join("out/hello"), "binary").expect("test setup");
        std::fs::write(artifacts.join("bin/tool"), "tool").expect("test setup");
        let project = dir.path().join("project");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(&project).expect("test setup");
        std::fs::create_dir_all(&elsewhere).expect("test setup");
        std::os::unix::fs::symlink(&elsewhere, project.join("bin")).expect("test setup");
        let problems = copy_artifacts(
            &artifacts,
            &[artifacts.join("out/hello"), artifacts.join("bin/tool")],
            &project,
        );
        assert_eq!(
            std::fs::read_to_string(project.join("out/hello")).expect("test setup"),
            "binary"
        );
        assert!(!elsewhere.join("tool").exists());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("bin/tool"), "{problems:?}");
    }
}
