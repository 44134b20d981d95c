//! `contractor-gitlab-executor config|prepare|run|cleanup`: GitLab Runner's custom executor
//! (docs/ci.md); the work is in the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use contractor_gitlab::{chain, RunnerCodes};

/// Contractor as GitLab Runner's custom executor: each job script in a builder VM.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    stage: Stage,
}

/// The stages of GitLab Runner's custom executor.
#[derive(Subcommand)]
enum Stage {
    /// config_exec: print the executor's JSON settings for the runner.
    Config {
        /// The base directory of the jobs' directories (default: the runner's builds_dir).
        #[arg(long)]
        builds_dir: Option<PathBuf>,
        /// The base directory of the runner's local cache (default: its cache_dir).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// prepare_exec: check that `contractor` and the tools a job's build needs are here.
    Prepare,
    /// run_exec: run one stage's script: the job's scripts (step_*, build_script,
    /// after_script) in a builder VM with `contractor build`, the runner's own stages on
    /// this host.
    #[command(
        after_help = "Exit codes: 0 the stage succeeded, $BUILD_FAILURE_EXIT_CODE the job's script\n\
failed (or timed out, was cancelled, or contractor.toml is wrong), $SYSTEM_FAILURE_EXIT_CODE\n\
the machinery failed (libvirt, the VM, a tool), 2 not run by GitLab Runner."
    )]
    Run {
        /// libvirt connection URI (default as for `contractor build`).
        #[arg(long)]
        uri: Option<String>,
        /// The script the runner generated for this stage.
        script: PathBuf,
        /// The stage's name (get_sources, step_script, ...).
        stage: String,
    },
    /// cleanup_exec: say that nothing is left (each stage's VM ends with its stage).
    Cleanup,
}

fn main() -> std::process::ExitCode {
    let stage = Cli::parse().stage;
    let (uri, script, name) = match stage {
        Stage::Config {
            builds_dir,
            cache_dir,
        } => {
            let config =
                contractor_gitlab::config_json(builds_dir.as_deref(), cache_dir.as_deref());
            println!("{config}");
            return std::process::ExitCode::SUCCESS;
        }
        Stage::Cleanup => {
            contractor_gitlab::cleanup();
            return std::process::ExitCode::SUCCESS;
        }
        Stage::Prepare => (None, None, None),
        Stage::Run { uri, script, stage } => (uri, Some(script), Some(stage)),
    };
    let vars: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let codes = match RunnerCodes::from_vars(&vars) {
        Ok(codes) => codes,
        Err(err) => {
            eprintln!("contractor-gitlab-executor: {}", chain(&err));
            return std::process::ExitCode::from(2);
        }
    };
    let done = match (script, name) {
        (Some(script), Some(name)) => contractor_gitlab::run(&script, &name, uri, &vars),
        _ => contractor_gitlab::prepare().map(|()| 0),
    };
    match done {
        Ok(code) => std::process::ExitCode::from(code),
        Err(err) => {
            eprintln!("contractor-gitlab-executor: {}", chain(&err));
            std::process::ExitCode::from(codes.of(&err))
        }
    }
}
