//! The `contractor` command line (also installed as `contractor-cli`): build a project
//! inside a throwaway VM.

use std::path::{Path, PathBuf};

use crate::build::{self, BuildOptions};
use crate::display::human_bytes;
use crate::display::{escape, escape_capped, escape_path, Display, Mode, MAX_SHOWN_MESSAGE_BYTES};
use crate::{image, records, spec};
use clap::{Parser, Subcommand, ValueEnum};
use contractor_protocol::agent::Keep;
use contractor_protocol::error::{ErrorObject, ToolCode};
use contractor_protocol::proxy::Download;
use contractor_protocol::result::error_chain;
use contractor_protocol::result::{BuildCode, BuildResult, Outcome};
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
    #[command(after_help = "Examples:\n  cd examples/hello && contractor build\n  \
contractor build --json | jq -c 'select(.type == \"finished\") | .result.outcome'\n\n\
Exit codes: 0 the build succeeded, 1 it failed (script or timeout), 2 bad input\n\
(contractor.toml), 3 infrastructure failure (libvirt, VM, agent), 130 interrupted.")]
    Build(Box<BuildArgs>),
    /// Open a shell in a kept VM (`build --keep`), in the build's working directory with its
    /// environment; without an id, in a fresh VM with the source. Exiting destroys the VM.
    #[command(
        after_help = "Examples:\n  contractor build --keep || contractor shell 20261125-141502-3fa2c1\n  \
contractor shell                # a fresh VM with this project's source\n\n\
Exit codes: 0 the shell ended, 1 the fresh VM could not start its agent, 2 no such build\n\
or no kept VM, 3 the VM could not be reached."
    )]
    Shell {
        /// The build whose kept VM to enter (default: a fresh VM).
        id: Option<String>,
        #[command(flatten)]
        file: SpecFile,
        /// libvirt connection URI for a fresh VM (default as for `build`).
        #[arg(long)]
        uri: Option<String>,
    },
    /// List the builds of this project: id, start, result, duration.
    #[command(after_help = "Example:\n  contractor builds")]
    Builds {
        #[command(flatten)]
        file: SpecFile,
    },
    /// Print the public key (PEM, SubjectPublicKeyInfo) that signs builds' provenance,
    /// making the key (the data directory's `signing-key`, mode 0600) on first use.
    #[command(after_help = "Examples:\n  contractor key > contractor.pub\n  \
CONTRACTOR_SIGNING_KEY=team-key.pem contractor key\n\n\
The key is $CONTRACTOR_SIGNING_KEY (a PKCS#8 PEM ed25519 key) when set, else\n\
signing-key in the data directory. See docs/provenance.md.")]
    Key,
    /// Verify a build's signed provenance: the signature, each artifact against its
    /// subject, and the record's downloads.jsonl against the statement.
    #[command(
        after_help = "Examples:\n  contractor verify                       # the newest build\n  \
contractor verify 20261125-141502-3fa2c1\n  \
contractor verify path/to/provenance.json --key contractor.pub\n\n\
Exit codes: 0 verified, 1 does not verify (what differs is named), 2 bad input."
    )]
    Verify {
        /// Build id (default: the newest), or a provenance.json file (its record is its
        /// directory).
        target: Option<String>,
        /// The signer's public key (PEM); default: this user's key (`contractor key`).
        #[arg(long = "key")]
        key: Option<PathBuf>,
        #[command(flatten)]
        file: SpecFile,
    },
    /// Build a recorded build's own source again in a fresh VM from the same image,
    /// offline (every download from the download cache by the SHA-256 its statement
    /// lists), and compare the artifacts bit for bit. Both records are kept.
    #[command(
        after_help = "Examples:\n  contractor build && contractor rebuild      # the newest build\n  \
contractor rebuild 20261125-141502-3fa2c1\n  \
contractor rebuild --any-image 20261125-141502-3fa2c1   # the image was rebuilt since\n\n\
Exit codes: 0 every artifact identical, 1 an artifact differs or is missing (or the rebuild\n\
did not end as the original did), 2 bad input (no such build or statement, contractor.toml\n\
changed, the recorded image gone or changed without --any-image), 3 infrastructure failure."
    )]
    Rebuild {
        /// Build id (default: the newest).
        id: Option<String>,
        /// Go on when the recorded image is gone or has changed, with the current one (the
        /// report names the inputs that differ).
        #[arg(long)]
        any_image: bool,
        /// libvirt connection URI (default as for `build`).
        #[arg(long)]
        uri: Option<String>,
        /// Accelerator: auto uses KVM where it can work (vmx/svm, /dev/kvm open to QEMU's
        /// user, libvirt offers it), TCG otherwise; kvm where it cannot is refused.
        /// Default: $CONTRACTOR_ACCEL, else auto.
        #[arg(long, value_enum)]
        accel: Option<AccelArg>,
        /// Boot the VM cold instead of restoring a saved builder.
        #[arg(long)]
        cold: bool,
        #[command(flatten)]
        file: SpecFile,
    },
    /// Show a build's result: outcome, log, artifacts with sha256, refused hosts.
    #[command(
        after_help = "Example:\n  contractor show               # the newest build\n  contractor show 20261125-141502-3fa2c1"
    )]
    Show {
        /// Build id (default: the newest).
        id: Option<String>,
        #[command(flatten)]
        file: SpecFile,
    },
    /// Pin what a successful build downloaded: write contractor.lock beside the spec (URL →
    /// SHA-256 of every complete GET answered 200), which later builds must then match byte
    /// for byte.
    #[command(
        after_help = "Example:\n  contractor build && contractor pin      # the newest build\n  contractor pin 20261125-141502-3fa2c1"
    )]
    Pin {
        /// Build id (default: the newest).
        id: Option<String>,
        #[command(flatten)]
        file: SpecFile,
    },
    /// List what a build downloaded through its proxy: status, size, SHA-256 and URL of
    /// each response (downloads.jsonl of its record).
    #[command(
        after_help = "Example:\n  contractor downloads               # the newest build's\n  contractor downloads --json 20261125-141502-3fa2c1"
    )]
    Downloads {
        /// Build id (default: the newest).
        id: Option<String>,
        /// Print the record's download lines as JSON, one per response (checked by the
        /// store: a damaged line and the cut marker are left out).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        file: SpecFile,
    },
    /// Print a build's log (or, with --console, its VM's serial console).
    #[command(
        after_help = "Example:\n  contractor log               # the newest build's output\n  contractor log --console 20261125-141502-3fa2c1"
    )]
    Log {
        /// Build id (default: the newest).
        id: Option<String>,
        /// Print the VM's serial console instead of the build's output.
        #[arg(long)]
        console: bool,
        #[command(flatten)]
        file: SpecFile,
    },
    /// Check everything a build needs, and say how to fix each problem.
    #[command(
        after_help = "Example:\n  contractor doctor\n\nExit codes: 0 every check passed or only warned, 3 a check failed."
    )]
    Doctor {
        /// libvirt connection URI to check (default as for `build`).
        #[arg(long)]
        uri: Option<String>,
        /// Check this build host instead ([ssh://][user@]host[:port]): its VM host's facts
        /// and images, asked of its contractor-vm over ssh.
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
    },
    /// List the build hosts (`--host`, else those of ~/.config/contractor/config.toml) with
    /// their room for this project's build and the Contractor VMs running there.
    #[command(after_help = "Example:\n  contractor hosts\n\n\
Room is counted for builds of the spec's shape (`[vm] cpus`, `memory`; 2 CPUs, 2 GiB when\n\
the file is missing).\n\nExit codes: 0 a host answered (or none is configured), 2 a bad host or contractor.toml, 3 no host answered.")]
    Hosts {
        /// List this build host ([ssh://][user@]host[:port]; repeat for more) instead.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
        #[command(flatten)]
        file: SpecFile,
    },
    /// Write a commented contractor.toml for the project in this directory.
    #[command(after_help = "Example:\n  cd my-project && contractor init && contractor build")]
    Init,
    /// Manage builder images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage this project's build cache (the `[cache] paths` kept between builds).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Add hosts to contractor.toml's `[network] allow`: those named, or those the newest
    /// build was refused (--from-last). Shows the change and, on a terminal, asks first;
    /// comments and layout are kept.
    #[command(
        after_help = "Example:\n  contractor allow --from-last        # what the last build was refused\n  contractor allow deb.debian.org '*.crates.io'\n  contractor allow --from-last --yes  # in a script",
        group = clap::ArgGroup::new("what").required(true).multiple(true).args(["hosts", "from_last"])
    )]
    Allow {
        /// Hosts to allow (`deb.debian.org`, or `*.crates.io` for its subdomains).
        hosts: Vec<String>,
        /// Add the hosts the newest build was refused.
        #[arg(long)]
        from_last: bool,
        /// Write the change without asking (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        file: SpecFile,
    },
}

/// `-f/--file`, the same in every command that reads a project.
#[derive(clap::Args)]
struct SpecFile {
    /// The project's spec file (the project is its directory).
    #[arg(short = 'f', long = "file", default_value = "contractor.toml")]
    file: PathBuf,
}

impl std::ops::Deref for SpecFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.file
    }
}

/// `contractor build`'s flags, as given; [`build_command`] turns them into one checked
/// [`BuildOptions`] and the display mode.
#[derive(clap::Args)]
struct BuildArgs {
    #[command(flatten)]
    file: SpecFile,
    /// libvirt connection URI (default: qemu:///system as root, qemu:///session otherwise;
    /// or $CONTRACTOR_LIBVIRT_URI).
    #[arg(long)]
    uri: Option<String>,
    /// Accelerator: auto uses KVM where it can work (vmx/svm, /dev/kvm open to QEMU's
    /// user, libvirt offers it), TCG otherwise; kvm where it cannot is refused.
    /// Default: $CONTRACTOR_ACCEL, else auto.
    #[arg(long, value_enum)]
    accel: Option<AccelArg>,
    /// Show nothing while the build runs, and the summary only if it does not succeed.
    #[arg(short, long, conflicts_with = "json")]
    quiet: bool,
    /// Print the build's events as JSON Lines on stdout instead (docs/protocol.md); the
    /// last is `finished` with the build's result.json. Errors before the build are one
    /// JSON error object.
    #[arg(long)]
    json: bool,
    /// Keep the VM when the build fails, for `contractor shell ID`.
    #[arg(long)]
    keep: bool,
    /// Boot the VM cold instead of restoring the saved, booted builder of this image
    /// and shape (a build with --keep always boots cold).
    #[arg(long)]
    cold: bool,
    /// Use no network: the proxy serves the URLs contractor.lock pins from the download
    /// cache and refuses everything else (needs contractor.lock; `contractor pin`).
    #[arg(long)]
    offline: bool,
    /// Run the VM on this build host over SSH ([ssh://][user@]host[:port]; the system's
    /// ssh, with your keys and known_hosts), instead of the hosts named in
    /// ~/.config/contractor/config.toml. The record lands here as for a local build.
    #[arg(long = "host", value_name = "HOST", conflicts_with = "local")]
    hosts: Vec<String>,
    /// Build on this machine even when the configuration names build hosts.
    #[arg(long)]
    local: bool,
    /// Run the script in FILE (`-`: stdin; at most 3 MiB) instead of `[build] script`;
    /// contractor.toml may then be missing (the defaults apply).
    #[arg(long, value_name = "FILE", conflicts_with = "hosts")]
    script_file: Option<PathBuf>,
    /// Also allow RULE, as in `[network] allow` (repeat for more).
    #[arg(long = "allow", value_name = "RULE", conflicts_with = "hosts")]
    allow: Vec<String>,
    /// The build's timeout instead of `[build] timeout` (90s, 10m, 1h).
    #[arg(long, value_name = "DURATION", conflicts_with = "hosts")]
    timeout: Option<String>,
    /// Collect no artifacts (`[build] artifacts` is ignored).
    #[arg(long, conflicts_with = "hosts")]
    no_artifacts: bool,
    /// The build's id, chosen by the front end that hosts it here (contractor-host).
    #[arg(long, hide = true, requires = "packed_source", value_parser = parse_build_id)]
    id: Option<String>,
    /// The source as the front end that hosts the build here packed it (contractor-host):
    /// a tar on this file system, taken instead of packing the project directory.
    #[arg(long, hide = true, requires_all = ["id", "source_entries", "local"])]
    packed_source: Option<PathBuf>,
    /// With --packed-source, its entries as its packer counted them.
    #[arg(long, hide = true, requires = "packed_source")]
    source_entries: Option<u64>,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List the project's caches: size, the build that saved it, the paths it holds.
    #[command(after_help = "Example:\n  contractor cache list")]
    List {
        #[command(flatten)]
        file: SpecFile,
    },
    /// Delete the project's caches; the next build starts without one. With --downloads,
    /// empty the download cache all builds share instead.
    #[command(
        after_help = "Examples:\n  contractor cache clear\n  contractor cache clear --downloads"
    )]
    Clear {
        #[command(flatten)]
        file: SpecFile,
        /// Empty the download cache (every build's downloads by SHA-256) instead.
        #[arg(long)]
        downloads: bool,
    },
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
    /// List the built images: name, size, date, sha256, agent version.
    #[command(after_help = "Example:\n  contractor image list")]
    List,
    /// Make a builder image of your own disk (any Linux with an ext2/3/4 root file system:
    /// a partitioned cloud image as distributions publish them, or a file system on the
    /// whole disk with --kernel and --initrd); docs/configuration.md says what it needs.
    #[command(
        after_help = "Examples:\n  contractor image import my-distro --disk debian-12-genericcloud-amd64.qcow2\n  \
contractor image import my-distro --disk root.qcow2 --kernel vmlinuz --initrd initrd.img\n  \
# then, in contractor.toml: [build] image = \"my-distro\""
    )]
    Import {
        /// The name to build with (`[build] image = "NAME"`).
        name: String,
        /// The disk: qcow2 or raw; partitioned (GPT or MBR, the root on an ext2/3/4
        /// partition) or one ext2/3/4 file system on the whole disk.
        #[arg(long)]
        disk: PathBuf,
        /// The kernel (bzImage); by default the newest in the disk's /boot.
        #[arg(long, requires = "initrd")]
        kernel: Option<PathBuf>,
        /// The initrd that mounts root=/dev/vda and starts init=; by default the one of the
        /// kernel found.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
    },
    /// Remove a built image (the next build that needs it builds it again).
    #[command(after_help = "Example:\n  contractor image rm debian-12-build")]
    Rm {
        /// Image name.
        name: String,
    },
    /// Remove the derived images (`[image] base/packages`) that no build has used for
    /// --days days; the next build that needs one builds it again.
    #[command(after_help = "Example:\n  contractor image gc --days 30")]
    Gc {
        /// Days since a build last used an image, after which it is removed.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

/// `--accel` as given, else `$CONTRACTOR_ACCEL`, else auto; a bad variable is the
/// problem's words.
fn accel_of(given: Option<AccelArg>) -> Result<Accel, String> {
    match given {
        Some(arg) => Ok(arg.into()),
        None => contractor_protocol::vm::default_accel(),
    }
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

/// Runs the command line of this process and returns its exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Build(args) => build_command(*args),
        Command::Shell { id, file, uri } => ended(shell(&file, id.as_deref(), uri)),
        Command::Builds { file } => report(list_builds(&file)),
        Command::Doctor { uri, host } => ended(
            host.map(|h| crate::remote::resolve(&[h]))
                .transpose()
                .map(|host| doctor(uri.as_deref(), host.and_then(|h| h.0.first().cloned())))
                .map_err(Failure::setting),
        ),
        Command::Hosts { hosts, file } => list_hosts(&hosts, &file).into(),
        Command::Init => report(
            crate::init::write(Path::new("."))
                .map(|(path, kind)| {
                    eprintln!(
                        "contractor: wrote {} for {}; edit it, then run `contractor build`",
                        path.display(),
                        kind.described()
                    )
                })
                .map_err(|e| Failure::judged(matches!(e, crate::init::InitError::Exists(_)), e)),
        ),
        Command::Key => report(print_key()),
        Command::Verify { target, key, file } => {
            report(verify_provenance(&file, target.as_deref(), key.as_deref()))
        }
        Command::Rebuild {
            id,
            any_image,
            uri,
            accel,
            cold,
            file,
        } => match accel_of(accel) {
            Ok(accel) => ended(rebuild(
                &file,
                id.as_deref(),
                any_image,
                BuildOptions::new(uri, accel, None, !cold, true),
            )),
            Err(problem) => report(Err(Failure::setting(problem))),
        },
        Command::Show { id, file } => report(show_build(&file, id.as_deref())),
        Command::Allow {
            hosts,
            from_last,
            yes,
            file,
        } => report(allow_hosts(&file, &hosts, from_last, yes)),
        Command::Log { id, console, file } => report(print_log(&file, id.as_deref(), console)),
        Command::Pin { id, file } => report(pin_downloads(&file, id.as_deref())),
        Command::Downloads { id, json, file } => {
            report(print_downloads(&file, id.as_deref(), json))
        }
        Command::Image(command) => image_command(command),
        Command::Cache(command) => cache_command(command),
    }
}

/// `contractor image …`.
fn image_command(command: ImageCommand) -> std::process::ExitCode {
    match command {
        ImageCommand::List => report(list_images()),
        ImageCommand::Import {
            name,
            disk,
            kernel,
            initrd,
        } => report(
            image::import(&name, &disk, kernel.as_deref().zip(initrd.as_deref()))
                .map(|image| println!("{}", image.dir.display()))
                .map_err(|e| Failure::doing(e.exit_code(), format!("cannot import {name}"), e)),
        ),
        ImageCommand::Rm { name } => report(image::remove(&name).map_err(Failure::image)),
        ImageCommand::Gc { days } => report(
            image::gc(days)
                .map(|removed| {
                    if removed.is_empty() {
                        println!("no derived image went unused for {days} days");
                    }
                    for name in removed {
                        println!("removed image {}", escape(&name));
                    }
                })
                .map_err(Failure::image),
        ),
        // contractor-vm refuses an unknown name, naming it and the images it builds.
        ImageCommand::Build { name } => report(
            image::ensure(&name)
                .map(|image| println!("{}", image.dir.display()))
                .map_err(Failure::image),
        ),
    }
}

/// `contractor cache …`.
fn cache_command(command: CacheCommand) -> std::process::ExitCode {
    match command {
        CacheCommand::List { file } => report(list_caches(&file)),
        CacheCommand::Clear {
            downloads: true, ..
        } => report(clear_downloads()),
        CacheCommand::Clear {
            file,
            downloads: false,
        } => report(
            crate::cache::clear(&store_of(&file))
                .map(|freed| eprintln!("contractor: cache cleared ({} freed)", human_bytes(freed)))
                .map_err(|e| {
                    Failure::tool(
                        format!("cannot clear the cache in {}", store_of(&file).display()),
                        e,
                    )
                }),
        ),
    }
}

/// `contractor hosts`: each build host's room for the build of `file` (if it exists), on
/// stdout.
fn list_hosts(given: &[String], file: &Path) -> ExitCode {
    let (hosts, config) = match crate::remote::resolve(given) {
        Ok(resolved) => resolved,
        Err(problem) => {
            eprintln!("contractor: {}", escape(&problem));
            return ExitCode::BadInput;
        }
    };
    if hosts.is_empty() {
        let config = config
            .map(|p| escape_path(&p))
            .unwrap_or_else(|| "~/.config/contractor/config.toml".into());
        eprintln!(
            "contractor: no build hosts are configured: name them in {config} (hosts = [\"…\"]) or with --host"
        );
        return ExitCode::Success;
    }
    let (cpus, memory_mib) = match file.exists() {
        true => match spec::load(file) {
            Ok(spec) => (spec.cpus, spec.memory_mib),
            Err(err) => {
                eprintln!("contractor: {}", escape(&err.to_string()));
                return ExitCode::BadInput;
            }
        },
        false => (spec::DEFAULT_CPUS, spec::DEFAULT_MEMORY_MIB),
    };
    let fleet = match crate::remote::fleet(&hosts, cpus, memory_mib) {
        Ok(fleet) => fleet,
        Err(err) => {
            eprintln!("contractor: {}", escape(&error_chain(&err).join(": ")));
            return ExitCode::Infrastructure;
        }
    };
    let width = fleet.hosts.iter().map(|h| h.host.len()).max().unwrap_or(0);
    for probe in &fleet.hosts {
        let name = &probe.host;
        let line = match (&probe.room, &probe.unavailable) {
            (Some(room), _) => format!(
                "{name:width$}  room {}  running {}  ({} MiB free, {} CPUs)",
                room.builds, room.running, room.free_memory_mib, room.cpus
            ),
            (None, why) => format!(
                "{name:width$}  unavailable: {}",
                why.as_deref().unwrap_or("")
            ),
        };
        println!("{}", escape(&line));
    }
    println!(
        "(room: builds of {cpus} CPU(s) and {memory_mib} MiB that fit now; waiting in line here: {})",
        fleet.waiting
    );
    match fleet.hosts.iter().any(|h| h.room.is_some()) {
        true => ExitCode::Success,
        false => ExitCode::Infrastructure,
    }
}

/// `contractor build`: its flags, the build hosts configured and contractor.toml made into
/// one checked build ([`Checked::new`]), then [`run_build`].
fn build_command(args: BuildArgs) -> std::process::ExitCode {
    let mode = match (args.quiet, args.json) {
        (_, true) => Mode::Json,
        (true, false) => Mode::Quiet,
        (false, false) => Mode::Auto,
    };
    match Checked::new(args) {
        Ok(build) => run_build(build, mode).into(),
        Err(problem) => {
            fail(
                mode == Mode::Json,
                BuildCode::BadSpec.as_str(),
                vec![problem],
            );
            ExitCode::BadInput.into()
        }
    }
}

/// `--id`'s value: a build id as the front end makes them.
fn parse_build_id(value: &str) -> Result<String, String> {
    match contractor_protocol::hosted::is_build_id(value) {
        true => Ok(value.to_string()),
        false => Err(format!(
            "{value:?} is not a build id (YYYYMMDD-HHMMSS-xxxxxx)"
        )),
    }
}

/// A build as `contractor build`'s flags ask for it, checked in one place against each
/// other, the build hosts configured and the spec (ripgrep's LowArgs→HiArgs: [`BuildArgs`]
/// as given, this as used).
struct Checked {
    /// The spec file.
    file: PathBuf,
    /// The spec, with `--script-file`, `--allow`, `--timeout` and `--no-artifacts` applied.
    spec: spec::BuildSpec,
    /// The build's options.
    options: BuildOptions,
    /// The build hosts to choose from (`--host`'s, else none with `--local`, else the
    /// configuration's); none builds here.
    hosts: Vec<String>,
}

impl Checked {
    /// Checks `args`; the error is the one message of a `bad_spec` failure (exit code 2).
    fn new(args: BuildArgs) -> Result<Checked, String> {
        let overrides = crate::overrides::Overrides {
            script_file: args.script_file,
            allow: args.allow,
            timeout: args.timeout,
            no_artifacts: args.no_artifacts,
        };
        let options = BuildOptions {
            id: args.id,
            packed: args.packed_source.map(|tar| crate::build::PackedSource {
                tar,
                entries: args.source_entries.unwrap_or_default(),
            }),
            ..BuildOptions::new(
                args.uri,
                accel_of(args.accel)?,
                args.keep.then_some(Keep::OnFailure),
                !args.cold,
                args.offline,
            )
        };
        let hosts = match args.local {
            true => Vec::new(),
            false => crate::remote::resolve(&args.hosts)?.0,
        };
        if !hosts.is_empty() && !overrides.is_empty() {
            return Err("--script-file, --allow, --timeout and --no-artifacts apply to builds on this machine: add --local".to_string());
        }
        let file = args.file.file;
        let spec = overrides
            .load(&file, &spec::imported_images())
            .map_err(|err| err.to_string())?;
        if options.offline && spec.lock.is_none() {
            let lock = spec.project_dir.join(crate::lock::LOCK_FILE);
            return Err(format!(
                "--offline builds from the downloads {} pins, and there is no such file; build \
                 once with the network, then `contractor pin`",
                lock.display()
            ));
        }
        if !hosts.is_empty() && options.keep.is_some() {
            return Err("--keep keeps the VM for `contractor shell`, which reaches only VMs on this machine: build with --local".to_string());
        }
        Ok(Checked {
            file,
            spec,
            options,
            hosts,
        })
    }
}

/// Reports a failure of `contractor build` before or instead of its result: one error
/// object, as JSON with `json`, else as text (escaped: it goes to a terminal).
fn fail(json: bool, code: &str, chain: Vec<String>) {
    let chain = if json {
        chain
    } else {
        chain.iter().map(|m| escape(m).into_owned()).collect()
    };
    ErrorObject::report("contractor", ToolCode::parse(code), chain, json);
}

/// `contractor build` of a checked build, shown in `mode`.
fn run_build(build: Checked, mode: Mode) -> ExitCode {
    let Checked {
        file,
        spec,
        options,
        hosts,
    } = build;
    let json = mode == Mode::Json;
    let chosen = match hosts.is_empty() {
        true => None,
        false => {
            match crate::remote::choose(&hosts, spec.cpus, spec.memory_mib, mode != Mode::Quiet) {
                Ok(taken) => Some(taken),
                Err(chain) => {
                    fail(json, BuildCode::BuildHost.as_str(), chain);
                    return ExitCode::Infrastructure;
                }
            }
        }
    };
    let report = match build_here(&spec, &options, mode, chosen.map(|s| (s, file.as_path()))) {
        Ok(report) => report,
        Err((code, chain, exit)) => {
            fail(json, code, chain);
            return exit;
        }
    };
    let result = &report.result;
    if let Some(kept) = &report.kept {
        if !json && options.keep == Some(Keep::OnFailure) {
            eprintln!(
                "contractor: VM {} kept: `contractor shell {}` opens a shell in it",
                kept.name, result.id
            );
        }
    }
    // `--json` ended with the result; `--quiet` speaks only of failure.
    if json || (mode == Mode::Quiet && result.outcome == Outcome::Success) {
        return result.outcome.exit_code();
    }
    print_summary(result, &spec, &file);
    result.outcome.exit_code()
}

/// The summary of a build on stderr: how it ended and why, its log, artifacts, and the
/// hosts refused or failed (with the allow line to paste when the allow list lacked them).
fn print_summary(result: &BuildResult, spec: &spec::BuildSpec, file: &std::path::Path) {
    let verdict = match result.outcome {
        Outcome::Success => "succeeded".to_string(),
        Outcome::Failed => match result.exit_code {
            Some(code) if code != 0 => format!("FAILED (the script exited with {code})"),
            _ => "FAILED".to_string(),
        },
        Outcome::Timeout => "TIMED OUT".to_string(),
        Outcome::Infrastructure => "could not run (infrastructure failure)".to_string(),
        Outcome::Interrupted => "was interrupted".to_string(),
    };
    eprintln!();
    eprintln!(
        "build {} {verdict} in {:.1}s",
        escape(&result.id),
        result.duration_secs
    );
    if let Some(error) = &result.error {
        eprintln!("  reason:    {}", shown_chain(&error.chain));
    }
    if let Some(limit) = result.limit {
        eprintln!(
            "  limit:     {} (raise it in contractor.toml)",
            limit.field()
        );
    }
    eprintln!("  log:       {}", escape_path(&result.log));
    if result.outcome == Outcome::Infrastructure {
        eprintln!("  console:   {}", escape_path(&result.console_log));
        for line in console_tail(&result.console_log) {
            eprintln!("    | {}", escape(&line));
        }
    }
    for artifact in &result.artifacts {
        let size = std::fs::metadata(artifact)
            .map(|m| human_bytes(m.len()))
            .unwrap_or_default();
        eprintln!("  artifact:  {} ({size})", escape_path(artifact));
    }
    if !result.refused_hosts.is_empty() {
        eprintln!(
            "  refused:   {} (add to [network] allow to permit)",
            escape(&result.refused_hosts.join(", "))
        );
        let (fresh, _) = crate::allow::new_hosts(&spec.allow, &result.refused_hosts);
        if result.outcome != Outcome::Success && !fresh.is_empty() {
            eprintln!(
                "  to allow:  {}   (under [network] in {}, or run: contractor allow --from-last)",
                crate::allow::allow_line(&spec.allow, &fresh),
                escape_path(file)
            );
        }
    }
    if !result.refused_offline.is_empty() {
        eprintln!(
            "  refused:   {} (asked for by the script, which runs with no network after build.fetch: fetch what it needs there)",
            escape(&result.refused_offline.join(", "))
        );
    }
    for line in upstream_failure_lines(result) {
        eprintln!("  {line}");
    }
}

/// One line per allowed host the proxy could not reach: `failed:    HOST: REASON (N
/// requests; allowed, but resolving or connecting failed)` — not the allow list's doing.
fn upstream_failure_lines(result: &BuildResult) -> Vec<String> {
    result
        .upstream_failures
        .iter()
        .map(|f| {
            let times = match f.count {
                1 => "1 request".to_string(),
                n => format!("{n} requests"),
            };
            format!(
                "failed:    {}: {} ({times}; allowed, but resolving or connecting failed)",
                escape(&f.host),
                escape(&f.reason)
            )
        })
        .collect()
}

/// Runs one build on this (the main) thread, showing it in `mode`. A failure before the
/// build could run is its error code and chain of messages.
fn build_here(
    spec: &spec::BuildSpec,
    options: &BuildOptions,
    mode: Mode,
    host: Option<(crate::remote::Sender, &Path)>,
) -> Result<build::BuildReport, (&'static str, Vec<String>, ExitCode)> {
    let display = Display::new(mode);
    let built = match host {
        Some((sender, file)) => crate::remote::build_on(sender, spec, file, options, &display),
        None => build::build(spec, options, &display),
    };
    display.close();
    built.map_err(|err| {
        // An image the spec asks for that cannot be (a package the mirror lacks) is the
        // spec's fault; the rest is the host's.
        let exit = match &err {
            build::BuildError::Image(e) => e.exit_code(),
            build::BuildError::Setting(_) => ExitCode::BadInput,
            build::BuildError::Interrupted(_) => {
                return (
                    BuildCode::Interrupted.as_str(),
                    error_chain(&err),
                    ExitCode::Interrupted,
                )
            }
            _ => ExitCode::Infrastructure,
        };
        (BuildCode::BuildSetup.as_str(), error_chain(&err), exit)
    })
}

/// `contractor shell [ID]`.
fn shell(file: &Path, id: Option<&str>, uri: Option<String>) -> Result<ExitCode, Failure> {
    let (record, kept) = match id {
        Some(id) => records::kept_vm(&store_of(file), id).map_err(Failure::input)?,
        None => {
            // A fresh VM with the source: a build whose script does nothing, kept.
            let mut spec = spec::load(file).map_err(|e| Failure::setting(e.to_string()))?;
            spec.script = "true".into();
            spec.artifacts.clear();
            spec.cache_paths.clear();
            let accel = contractor_protocol::vm::default_accel().map_err(Failure::setting)?;
            let options = BuildOptions::new(uri, accel, Some(Keep::Always), false, false);
            let built = build_here(&spec, &options, Mode::Auto, None);
            match built {
                Ok(build::BuildReport {
                    kept: Some(kept),
                    result,
                    ..
                }) => (
                    crate::paths::store_dir(&spec.project_dir)
                        .join("builds")
                        .join(&result.id),
                    kept,
                ),
                Ok(report) => {
                    let reason = report
                        .result
                        .error
                        .map(|e| shown_chain(&e.chain))
                        .unwrap_or_else(|| report.result.outcome.as_str().to_string());
                    eprintln!("contractor: the VM for the shell did not start: {reason}");
                    return Ok(ExitCode::BuildFailed);
                }
                Err((code, chain, exit)) => {
                    ErrorObject::report("contractor", ToolCode::parse(code), chain, false);
                    return Ok(exit);
                }
            }
        }
    };
    crate::shell::attach(&kept, &record).map_err(Failure::host)?;
    Ok(ExitCode::Success)
}

fn doctor(uri: Option<&str>, host: Option<String>) -> ExitCode {
    use crate::doctor::Status;
    if let Some(host) = &host {
        println!("build host {host}:");
    }
    let findings = crate::doctor::check(uri, host.as_deref());
    for finding in &findings {
        println!("{}", escape(&finding.to_string()));
    }
    if findings.iter().any(|f| f.status == Status::Fail) {
        ExitCode::Infrastructure
    } else {
        ExitCode::Success
    }
}

/// Why a command failed: its error with its whole chain of causes, and the exit code that
/// means (contractor-protocol's `ExitCode`: 2 for the user's input, 3 for the host).
#[derive(Debug)]
struct Failure {
    exit: ExitCode,
    error: Box<dyn std::error::Error>,
}

/// An error with what was being done when it happened; the error stays its source.
#[derive(Debug, thiserror::Error)]
#[error("{doing}")]
struct Context {
    doing: String,
    #[source]
    source: Box<dyn std::error::Error>,
}

impl Failure {
    /// The user's input was at fault.
    fn input(error: impl std::error::Error + 'static) -> Failure {
        Failure {
            exit: ExitCode::BadInput,
            error: Box::new(error),
        }
    }

    /// The host or a tool failed.
    fn host(error: impl std::error::Error + 'static) -> Failure {
        Failure {
            exit: ExitCode::Infrastructure,
            error: Box::new(error),
        }
    }

    /// A tool failed while doing `doing`: bad input when the tool refused its input.
    fn tool(doing: String, error: crate::tools::ToolError) -> Failure {
        Failure::doing(error.exit_code(), doing, error)
    }

    /// `error` happened while doing `doing`, and means `exit`.
    fn doing(
        exit: ExitCode,
        doing: impl Into<String>,
        error: impl std::error::Error + 'static,
    ) -> Failure {
        Failure {
            exit,
            error: Box::new(Context {
                doing: doing.into(),
                source: Box::new(error),
            }),
        }
    }

    /// A setting is invalid; `problem` names it and what would be accepted.
    fn setting(problem: String) -> Failure {
        Failure {
            exit: ExitCode::BadInput,
            error: problem.into(),
        }
    }

    /// An image command failed.
    fn image(error: image::ImageError) -> Failure {
        Failure {
            exit: error.exit_code(),
            error: Box::new(error),
        }
    }

    /// The user's input was at fault when `bad_input`, else the host or a tool.
    fn judged(bad_input: bool, error: impl std::error::Error + 'static) -> Failure {
        match bad_input {
            true => Failure::input(error),
            false => Failure::host(error),
        }
    }

    /// A build record could not be found or read: a missing build is the user's input.
    fn record(error: records::RecordError) -> Failure {
        Failure::judged(error.is_bad_input(), error)
    }
}

/// Prints a command's error, if any, with its chain, and turns it into the exit code.
fn report(result: Result<(), Failure>) -> std::process::ExitCode {
    ended(result.map(|()| ExitCode::Success))
}

/// A command's exit code, or its error printed with its chain and turned into the exit
/// code.
fn ended(result: Result<ExitCode, Failure>) -> std::process::ExitCode {
    match result {
        Ok(exit) => exit.into(),
        Err(failure) => {
            eprintln!("contractor: {}", escape(&chain(failure.error.as_ref())));
            failure.exit.into()
        }
    }
}

/// `contractor rebuild [ID]` (crate::rebuild): the exit code says whether every artifact
/// came out identical.
fn rebuild(
    file: &Path,
    id: Option<&str>,
    any_image: bool,
    mut options: BuildOptions,
) -> Result<ExitCode, Failure> {
    use crate::rebuild;
    let mut spec = spec::load(file).map_err(Failure::input)?;
    let store = store_of(file);
    let original = records::show(&store, id).map_err(Failure::input)?;
    let plan = rebuild_plan(&original.dir, file, &spec, any_image)?;
    for warning in &plan.warnings {
        eprintln!("contractor: warning: {}", escape(warning));
    }
    // The record's pins are the lock, offline; the build cache is left out: a rebuild
    // starts from the source alone.
    spec.lock = Some(rebuild::pins(&plan.downloads));
    spec.cache_paths.clear();
    let tar = store.join(format!(".rebuild-{}.tar", std::process::id()));
    rebuild::copy_source(&store, &original.id, &tar).map_err(Failure::input)?;
    options.packed = Some(build::PackedSource {
        tar: tar.clone(),
        entries: 0,
    });
    options.rebuild_of = Some(original.id.clone());
    eprintln!(
        "contractor: rebuilding build {} from its source.tar, offline, with {} pinned download(s)",
        escape(&original.id),
        spec.lock.as_ref().map_or(0, |l| l.downloads.len())
    );
    let built = build_here(&spec, &options, Mode::Auto, None);
    let _ = std::fs::remove_file(&tar);
    let report = match built {
        Ok(report) => report,
        Err((_, lines, exit)) => {
            eprintln!(
                "contractor: the rebuild could not run: {}",
                shown_chain(&lines)
            );
            return Ok(exit);
        }
    };
    let result = &report.result;
    let rebuilt = store.join("builds").join(&result.id);
    let compared = rebuild::compare(&original.dir, &rebuilt, &plan)
        .map_err(|e| Failure::doing(ExitCode::Infrastructure, "cannot compare the artifacts", e))?;
    Ok(rebuild_summary(result, &compared))
}

/// What `contractor-attest plan` says of the record in `dir`, weighed against `spec` (read
/// from `file`) and this host's images.
fn rebuild_plan(
    dir: &Path,
    file: &Path,
    spec: &spec::BuildSpec,
    any_image: bool,
) -> Result<crate::rebuild::RebuildPlan, Failure> {
    let images =
        image::list().map_err(|e| Failure::doing(e.exit_code(), "cannot list the images", e))?;
    let manifests: Vec<image::Manifest> = images.into_iter().map(|i| i.manifest).collect();
    crate::rebuild::plan(dir, file, spec, &manifests, any_image)
        .map_err(|e| Failure::judged(e.is_bad_input(), e))
}

/// The rebuild's report: each artifact's verdict on stdout, then how it ended and what
/// differs on stderr (`contractor-attest compare`'s summary); the exit code (0: every
/// artifact identical and the same ending).
fn rebuild_summary(result: &BuildResult, compared: &crate::rebuild::RebuildComparison) -> ExitCode {
    eprintln!();
    for line in crate::rebuild::report_lines(&compared.artifacts) {
        println!("{line}");
    }
    for line in &compared.summary {
        eprintln!("{}", escape(line));
    }
    match result.outcome {
        Outcome::Infrastructure => ExitCode::Infrastructure,
        Outcome::Interrupted => ExitCode::Interrupted,
        _ if compared.identical && compared.same_end => ExitCode::Success,
        _ => ExitCode::BuildFailed,
    }
}

/// `contractor key`: the public key that signs provenance, as PEM.
fn print_key() -> Result<(), Failure> {
    let pem = crate::provenance::public_key().map_err(|e| Failure::judged(e.is_bad_input(), e))?;
    print!("{pem}");
    Ok(())
}

/// A provenance statement that does not verify (exit 1).
#[derive(Debug, thiserror::Error)]
#[error("{path} does not verify ({} problem(s) named above)", problems.len())]
struct NotVerified {
    path: PathBuf,
    problems: Vec<String>,
}

/// `contractor verify`: the provenance of build `target` (the newest), or the file
/// `target`, checked with `key` (this user's key).
fn verify_provenance(file: &Path, target: Option<&str>, key: Option<&Path>) -> Result<(), Failure> {
    use crate::provenance;
    let path = match target {
        Some(t) if t.contains('/') || t.ends_with(".json") => PathBuf::from(t),
        _ => {
            // Every record error is the input's here: the record is what is checked.
            let record = records::show(&store_of(file), target).map_err(Failure::input)?;
            record.dir.join(provenance::PROVENANCE_FILE)
        }
    };
    let verdict =
        provenance::verify(&path, key).map_err(|e| Failure::judged(e.is_bad_input(), e))?;
    if !verdict.problems.is_empty() {
        for problem in &verdict.problems {
            eprintln!("contractor: {}", escape(problem));
        }
        return Err(Failure {
            exit: ExitCode::BuildFailed,
            error: Box::new(NotVerified {
                path,
                problems: verdict.problems,
            }),
        });
    }
    println!(
        "verified: {} (key {}): signature good, {} artifact(s) and {} download(s) as stated",
        escape_path(&path),
        verdict.key_id,
        verdict.artifacts,
        verdict.downloads
    );
    Ok(())
}

/// The store directory of the project whose spec is `file` (the spec need not be valid).
fn store_of(file: &Path) -> PathBuf {
    crate::paths::store_dir(&spec::project_dir_of(file))
}

/// `contractor cache clear --downloads`.
fn clear_downloads() -> Result<(), Failure> {
    let dir = crate::downloads::dir().map_err(Failure::host)?;
    let removed = crate::downloads::clear(&dir).map_err(|e| {
        Failure::tool(
            format!("cannot clear the download cache {}", dir.display()),
            e,
        )
    })?;
    eprintln!(
        "contractor: download cache cleared: {} download(s), {} freed",
        removed.entries,
        human_bytes(removed.bytes)
    );
    Ok(())
}

fn list_caches(file: &Path) -> Result<(), Failure> {
    let store = store_of(file);
    let entries = crate::cache::list(&store)
        .map_err(|e| Failure::tool(format!("cannot read the cache in {}", store.display()), e))?;
    println!("{:>10}  {:<24} PATHS", "SIZE", "SAVED BY");
    for entry in entries {
        let size = entry.bytes;
        let (build, paths) = match entry.info {
            Some(info) => (info.build, info.paths.join(" ")),
            None => ("?".to_string(), entry.tar.display().to_string()),
        };
        println!("{:>10}  {build:<24} {paths}", human_bytes(size));
    }
    let dir = crate::downloads::dir().map_err(Failure::host)?;
    let usage = crate::downloads::usage(&dir).map_err(|e| {
        Failure::tool(
            format!("cannot read the download cache {}", dir.display()),
            e,
        )
    })?;
    let max = crate::downloads::max_bytes().map_err(Failure::setting)?;
    println!(
        "downloads: {} in {} download(s), at most {} ({}), shared by all builds: {}",
        human_bytes(usage.bytes),
        usage.entries,
        human_bytes(max),
        crate::downloads::SIZE_VARIABLE,
        escape_path(&dir)
    );
    Ok(())
}

fn list_builds(file: &Path) -> Result<(), Failure> {
    let records = records::list(&store_of(file)).map_err(Failure::record)?;
    println!(
        "{:<24} {:<19} {:<14} {:>9}",
        "BUILD", "STARTED", "RESULT", "DURATION"
    );
    for record in records.iter().rev() {
        let (outcome, duration) = match (record.outcome, record.duration_secs) {
            (Some(outcome), Some(secs)) => (outcome.as_str().to_string(), format!("{secs:.1}s")),
            _ => ("running".to_string(), "-".to_string()),
        };
        println!(
            "{:<24} {:<19} {:<14} {:>9}",
            escape(&record.id),
            record.started.as_deref().unwrap_or("-"),
            outcome,
            duration
        );
    }
    Ok(())
}

fn list_images() -> Result<(), Failure> {
    let images = image::list().map_err(Failure::image)?;
    println!(
        "{:<22} {:>9} {:<19} {:<14} DISK SHA256",
        "IMAGE", "SIZE", "BUILT", "AGENT"
    );
    for image in images {
        println!(
            "{:<22} {:>9} {:<19} {:<14} {}",
            image.manifest.name,
            human_bytes(image.size),
            contractor_protocol::clock::format_utc(image.manifest.created),
            image.manifest.agent_version,
            image.manifest.disk_sha256
        );
        if let Some(base) = &image.manifest.base {
            println!(
                "{:<22} derived from {base} with {}",
                "",
                escape(&image.manifest.packages.join(", "))
            );
        }
        if let Some(source) = &image.manifest.source {
            println!("{:<22} imported: {}", "", escape(source));
        }
        for snapshot in &image.snapshots {
            let disk = snapshot
                .disk_gib
                .map_or(String::from("no disk"), |gib| format!("{gib} GiB disk"));
            println!(
                "{:<22} snapshot {:>9} {} CPU, {} MiB, {disk}, {:?}, saved {}",
                "",
                human_bytes(snapshot.bytes),
                snapshot.cpus,
                snapshot.memory_mib,
                snapshot.accel,
                contractor_protocol::clock::format_utc(snapshot.created)
            );
        }
    }
    Ok(())
}

fn show_build(file: &Path, id: Option<&str>) -> Result<(), Failure> {
    let record = records::show(&store_of(file), id).map_err(Failure::record)?;
    println!("build:     {}", escape(&record.id));
    println!("started:   {}", record.started.as_deref().unwrap_or("-"));
    let Some(result) = &record.result else {
        println!("result:    running (no result.json yet)");
        return Ok(());
    };
    println!("result:    {}", result.outcome.as_str());
    if let Some(code) = result.exit_code {
        println!("exit code: {code}");
    }
    println!("duration:  {:.1}s", result.duration_secs);
    if let Some(error) = &result.error {
        println!("reason:    {}", shown_chain(&error.chain));
    }
    if let Some(limit) = result.limit {
        println!("limit:     {}", limit.field());
    }
    println!("log:       {}", escape_path(&result.log));
    println!("console:   {}", escape_path(&result.console_log));
    // The store read them (a record may come with the project: only its regular files).
    for artifact in &record.artifacts {
        let size = artifact.size.map(human_bytes).unwrap_or_default();
        let sha = artifact.sha256.as_deref().unwrap_or("(missing)");
        println!(
            "artifact:  {} ({size}) sha256:{}",
            escape_path(&artifact.path),
            escape(sha)
        );
    }
    let (downloads, cached) = (record.downloads, record.from_cache);
    if downloads > 0 {
        println!(
            "downloads: {downloads}, {cached} from the download cache (`contractor downloads {}` lists them)",
            escape(&record.id)
        );
    }
    if !result.refused_hosts.is_empty() {
        println!("refused:   {}", escape(&result.refused_hosts.join(", ")));
    }
    if !result.refused_offline.is_empty() {
        println!(
            "refused in the offline script: {}",
            escape(&result.refused_offline.join(", "))
        );
    }
    for line in upstream_failure_lines(result) {
        println!("{line}");
    }
    Ok(())
}

/// `contractor allow`: the hosts named and (`from_last`) those the newest build was
/// refused, added to the spec `file` once shown and confirmed.
fn allow_hosts(file: &Path, hosts: &[String], from_last: bool, yes: bool) -> Result<(), Failure> {
    use crate::allow::{self, AllowError};
    let edit = allow::Edit::open(file, hosts, &spec::imported_images()).map_err(Failure::input)?;
    let mut candidates = hosts.to_vec();
    if from_last {
        let record = records::show(&store_of(file), None).map_err(Failure::record)?;
        let Some(result) = &record.result else {
            return Err(Failure::input(AllowError::Running(record.id)));
        };
        eprintln!(
            "contractor: build {} was refused {} host(s)",
            escape(&record.id),
            result.refused_hosts.len()
        );
        candidates.extend(result.refused_hosts.iter().take(allow::MAX_HOSTS).cloned());
    }
    let (fresh, rejected) = allow::new_hosts(&edit.allowed, &candidates);
    if !rejected.is_empty() {
        eprintln!(
            "contractor: left out, not host names: {}",
            escape(&rejected.join(", "))
        );
    }
    if fresh.is_empty() {
        eprintln!(
            "contractor: nothing to add: {} allows them already",
            escape_path(file)
        );
        return Ok(());
    }
    let new = edit.with(&fresh).map_err(Failure::input)?;
    eprintln!("contractor: {}:", escape_path(file));
    for line in edit.diff(&new).lines() {
        eprintln!("{}", escape(line));
    }
    if !yes {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return Err(Failure::input(AllowError::NotConfirmed));
        }
        eprint!("Write this change? [y/N] ");
        let mut answer = String::new();
        // One line from the terminal; anything but y/yes leaves the file as it is.
        let _ = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(std::io::Read::take(std::io::stdin(), 16)),
            &mut answer,
        );
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("contractor: {} unchanged", escape_path(file));
            return Ok(());
        }
    }
    allow::write_spec(file, &new).map_err(Failure::host)?;
    eprintln!(
        "contractor: {} now allows {}",
        escape_path(file),
        fresh.join(", ")
    );
    Ok(())
}

/// One download of a record as `contractor downloads` shows it.
fn shown_download(download: &Download) -> String {
    let mut flags = Vec::new();
    if let Some(phase) = download.phase {
        flags.push(phase.as_str().to_string());
    }
    if !download.complete {
        flags.push("cut short".to_string());
    }
    if download.from_cache {
        flags.push("from the download cache".to_string());
    }
    let flags = match flags.is_empty() {
        true => String::new(),
        false => format!("  ({})", flags.join(", ")),
    };
    format!(
        "{:<6} {:>3} {:>10}  {}  {}{flags}",
        escape_capped(&download.method, 16),
        download.status,
        human_bytes(download.size),
        escape_capped(&download.sha256, 64),
        escape_capped(&download.url, 4096),
    )
}

/// `contractor pin`: contractor.lock from the downloads of build `id` (the newest).
fn pin_downloads(file: &Path, id: Option<&str>) -> Result<(), Failure> {
    use crate::lock::{self, LockError};
    let record = records::show(&store_of(file), id).map_err(Failure::record)?;
    if record.result.as_ref().map(|r| r.outcome) != Some(Outcome::Success) {
        return Err(Failure::input(LockError::NotSuccessful(record.id)));
    }
    let (_, downloads) =
        records::downloads(&store_of(file), Some(&record.id)).map_err(Failure::record)?;
    let pinned = lock::pin(&spec::project_dir_of(file), &record.id, &downloads)
        .map_err(|e| Failure::judged(e.is_bad_input(), e))?;
    eprintln!(
        "contractor: wrote {}: {} download(s) of build {} pinned ({} added, {} changed, {} removed)",
        escape_path(&pinned.path),
        pinned.pins,
        escape(&record.id),
        pinned.added,
        pinned.changed,
        pinned.removed
    );
    Ok(())
}

fn print_downloads(file: &Path, id: Option<&str>, json: bool) -> Result<(), Failure> {
    use std::io::Write;
    let (id, downloads) = records::downloads(&store_of(file), id).map_err(Failure::record)?;
    let mut out = Vec::new();
    if json {
        // One typed line each, as the store sent them.
        for download in &downloads {
            let _ = contractor_protocol::jsonl::encode_line(&mut out, download);
        }
    } else {
        let lines: Vec<String> = downloads.iter().map(shown_download).collect();
        if lines.is_empty() {
            eprintln!(
                "contractor: build {} downloaded nothing through its proxy",
                escape(&id)
            );
        } else {
            let _ = writeln!(
                out,
                "{:<6} {:>3} {:>10}  {:<64}  URL",
                "METHOD", "ST", "SIZE", "SHA256"
            );
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .map_err(|e| {
            Failure::host(Context {
                doing: "cannot write the downloads".into(),
                source: Box::new(e),
            })
        })
}

fn print_log(file: &Path, id: Option<&str>, console: bool) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    records::log(&store_of(file), id, console, None, &mut stdout).map_err(Failure::record)
}

/// The last 10 lines of the console log `path` of a record (`<store>/builds/<id>/`), as the
/// store reads them (`record log --console --tail 10`: the guest's bytes are read by the
/// confined store, never opened here); none when it cannot.
fn console_tail(path: &Path) -> Vec<String> {
    let (store, id) = records::store_and_id(path.parent().unwrap_or(path));
    let mut tail = Vec::new();
    match id
        .to_str()
        .map(|id| records::log(store, Some(id), true, Some(10), &mut tail))
    {
        Some(Ok(())) => String::from_utf8_lossy(&tail)
            .lines()
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// A result's error chain as shown: each message escaped and cut to
/// [`MAX_SHOWN_MESSAGE_BYTES`].
fn shown_chain(chain: &[String]) -> String {
    chain
        .iter()
        .map(|m| escape_capped(m, MAX_SHOWN_MESSAGE_BYTES))
        .collect::<Vec<_>>()
        .join(": ")
}

use contractor_protocol::result::joined_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_tail_is_the_stores_reading_of_the_logs_end() {
        // Runs the real contractor-store of this build (`cargo build -p contractor-store`).
        // The log is longer than the front end ever read itself (8 MiB; sparse here): its
        // end is the store's to find.
        use std::io::Write;
        let store = tempfile::tempdir().expect("tempdir");
        let record = store.path().join("builds/20261125-100000-aaaaaa");
        std::fs::create_dir_all(&record).expect("record");
        let path = record.join("console.log");
        let mut log = std::fs::File::create(&path).expect("log");
        log.set_len(9 << 20).expect("a long log");
        std::io::Seek::seek(&mut log, std::io::SeekFrom::End(0)).expect("its end");
        for n in 0..12 {
            writeln!(log, "line {n}").expect("a line");
        }
        let lines: Vec<String> = (2..12).map(|n| format!("line {n}")).collect();
        assert_eq!(console_tail(&path), lines);
        // No record there: no lines, no error.
        assert!(console_tail(&store.path().join("builds/x/console.log")).is_empty());
    }

    #[test]
    fn a_download_line_is_shown_with_its_hash_url_and_phase() {
        let download = |line: &str| -> Download { serde_json::from_str(line).expect("a download") };
        let line = r#"{"type":"download","time":1.0,"method":"GET","url":"http://deb.debian.org/x.deb","status":200,"size":2048,"sha256":"ab12","complete":false,"phase":"fetch"}"#;
        assert_eq!(
            shown_download(&download(line)),
            "GET    200    2.0 KiB  ab12  http://deb.debian.org/x.deb  (fetch, cut short)"
        );
        // A URL with control characters is shown escaped, never raw.
        let hostile = r#"{"type":"download","time":1.0,"method":"GET","url":"http://a/\u001b[2J","status":200,"size":1,"sha256":"ab","complete":true}"#;
        assert!(!shown_download(&download(hostile)).contains('\u{1b}'));
    }

    #[test]
    fn every_command_that_reads_a_project_takes_the_same_file_flag() {
        use clap::CommandFactory;
        fn file_flags(command: &clap::Command, found: &mut Vec<(String, String, String)>) {
            for arg in command.get_arguments().filter(|a| a.get_id() == "file") {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                let default = format!("{:?}", arg.get_default_values());
                let flags = format!("{:?} {:?}", arg.get_short(), arg.get_long());
                found.push((help, default, flags));
            }
            for sub in command.get_subcommands() {
                file_flags(sub, found);
            }
        }
        let mut found = Vec::new();
        file_flags(&Cli::command(), &mut found);
        assert_eq!(found.len(), 13, "{found:?}");
        assert!(found.iter().all(|f| f == &found[0]), "{found:#?}");
        assert_eq!(
            found[0].0,
            "The project's spec file (the project is its directory)"
        );
    }
}
