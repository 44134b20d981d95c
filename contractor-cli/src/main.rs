//! `contractor`: build a project inside a throwaway VM.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use contractor_cli::build::{self, human_bytes, BuildOptions};
use contractor_cli::{image, spec};
use contractor_protocol::result::Outcome;
use contractor_protocol::vm::Accel;
use contractor_protocol::ExitCode;

/// Build untrusted code inside a throwaway virtual machine.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the project described by contractor.toml in a fresh VM.
    #[command(after_help = "Example:\n  cd examples/hello && contractor build\n\n\
Exit codes: 0 the build succeeded, 1 it failed (script or timeout), 2 bad input\n\
(contractor.toml), 3 infrastructure failure (libvirt, VM, agent), 130 interrupted.")]
    Build {
        /// The spec file.
        #[arg(short = 'f', long = "file", default_value = "contractor.toml")]
        file: PathBuf,
        /// libvirt connection URI (default: qemu:///system as root, qemu:///session otherwise;
        /// or $CONTRACTOR_LIBVIRT_URI).
        #[arg(long)]
        uri: Option<String>,
        /// Accelerator: auto uses KVM when the CPU has vmx/svm, TCG otherwise.
        #[arg(long, value_enum, default_value = "auto")]
        accel: AccelArg,
    },
    /// Manage builder images.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build an image (or make sure it is built and current).
    #[command(after_help = "Example:\n  contractor image build debian-12-build")]
    Build {
        /// Image name.
        #[arg(default_value = spec::DEFAULT_IMAGE)]
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

impl From<AccelArg> for Accel {
    fn from(arg: AccelArg) -> Accel {
        match arg {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Build { file, uri, accel } => run_build(&file, uri, accel.into()).into(),
        Command::Image(ImageCommand::Build { name }) => {
            if !spec::KNOWN_IMAGES.contains(&name.as_str()) {
                eprintln!(
                    "contractor: unknown image {name:?}; known images: {}",
                    spec::KNOWN_IMAGES.join(", ")
                );
                return ExitCode::BadInput.into();
            }
            match image::ensure(&name) {
                Ok(image) => {
                    println!("{}", image.dir.display());
                    ExitCode::Success.into()
                }
                Err(err) => {
                    eprintln!("contractor: {}", chain(&err));
                    ExitCode::Infrastructure.into()
                }
            }
        }
    }
}

fn run_build(file: &std::path::Path, uri: Option<String>, accel: Accel) -> ExitCode {
    let spec = match spec::load(file) {
        Ok(spec) => spec,
        Err(err) => {
            eprintln!("contractor: {err}");
            return ExitCode::BadInput;
        }
    };
    let options = BuildOptions {
        uri: uri.unwrap_or_else(contractor_vm::default_uri),
        accel,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("contractor: cannot start the async runtime: {err}");
            return ExitCode::Infrastructure;
        }
    };
    let report = match runtime.block_on(build::build(&spec, &options)) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("contractor: {}", chain(&err));
            return ExitCode::Infrastructure;
        }
    };
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let result = &report.result;
    let verdict = match result.outcome {
        Outcome::Success => "succeeded".to_string(),
        Outcome::Failed => match result.exit_code {
            Some(code) => format!("FAILED (the script exited with {code})"),
            None => "FAILED".to_string(),
        },
        Outcome::Timeout => "TIMED OUT".to_string(),
        Outcome::Infrastructure => "could not run (infrastructure failure)".to_string(),
        Outcome::Interrupted => "was interrupted".to_string(),
    };
    eprintln!();
    eprintln!(
        "build {} {verdict} in {:.1}s",
        result.id, result.duration_secs
    );
    if let Some(error) = &result.error {
        eprintln!("  reason:    {}", error.chain.join(": "));
    }
    if let Some(limit) = result.limit {
        eprintln!(
            "  limit:     {} (raise it in contractor.toml)",
            limit.field()
        );
    }
    eprintln!("  log:       {}", result.log.display());
    if result.outcome == Outcome::Infrastructure {
        eprintln!("  console:   {}", result.console_log.display());
        for line in console_tail(&result.console_log) {
            eprintln!("    | {line}");
        }
    }
    for artifact in &result.artifacts {
        let size = std::fs::metadata(artifact)
            .map(|m| human_bytes(m.len()))
            .unwrap_or_default();
        eprintln!("  artifact:  {} ({size})", artifact.display());
    }
    if !result.refused_hosts.is_empty() {
        eprintln!(
            "  refused:   {} (add to [network] allow to permit)",
            result.refused_hosts.join(", ")
        );
    }
    result.outcome.exit_code()
}

fn console_tail(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[lines.len().saturating_sub(10)..].to_vec()
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}
