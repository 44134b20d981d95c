//! The `contractor-vm` command line: flags or a JSON request in, one JSON result out.
//!
//! The rule for input is simple: with `--json` the request is read from stdin (and no other
//! request flags are allowed); without it the request is built from flags. Either way the
//! tool prints exactly one `VmResult` object on stdout (`image …` one `ImageResult`, `check`
//! one `HostCheck`), messages and progress on stderr, and exits with a
//! `contractor_protocol::ExitCode` (2 for bad input, 3 when libvirt or the host fails).
//! With `--json-errors` an error is also written on stdout as one JSON object
//! (`{"type":"error","version":1,"code":...,"chain":[...]}`), so that a pipeline can read
//! why the tool failed; a bad JSON request is reported with its line, column and field.
//! Core modules never see clap types: this module turns them into a `VmRequest`.

use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use contractor_protocol::image::ImageResult;
use contractor_protocol::jsonl::{write_line, JsonlError};
use contractor_protocol::vm::{Accel, BootImage, VmRequest, VmResult, VmSpec};
use contractor_protocol::{ExitCode, PROTOCOL_VERSION};

use crate::image::ImageError;
use crate::lifecycle::{connect, default_uri, destroy_vm, exists, reap};
use crate::{generate_name, handle_owned, VmError, VmOwner};

const EXAMPLE: &str = r#"Examples:
  contractor-vm create --disk /images/base.qcow2 --kernel /images/vmlinuz \
      --initrd /images/initrd.img --work-dir /var/tmp/contractor --accel tcg --memory-mib 512
  contractor-vm status --name contractor-0123456789ab
  contractor-vm destroy --name contractor-0123456789ab
  echo '{"type":"list","version":1,"uri":"qemu:///system"}' | contractor-vm list --json
  contractor-vm check
  contractor-vm image build debian-12-build | jq -c .image.boot
  contractor-vm image list

A JSON create request (`contractor-vm create --json < request.json`):
  {"type": "create", "version": 1, "uri": "qemu:///system",
   "spec": {"image": {"disk": "/images/base.qcow2", "kernel": "/images/vmlinuz",
                      "initrd": "/images/initrd.img",
                      "cmdline": "console=ttyS0 root=/dev/vda rw"},
            "cpus": 1, "memory_mib": 512, "disk_gib": 8, "accel": "auto",
            "console_log": "/var/tmp/contractor/console.log",
            "work_dir": "/var/tmp/contractor"}}

The answer on stdout (one line; `create` and `status` answer with a "vm" object):
  {"type":"vm","version":1,"vm":{"name":"contractor-6a09fb207ea6","uri":"qemu:///system",
   "state":"running","control_socket":"/var/lib/libvirt/qemu/channel/target/domain-29-contractor-6a09fb207/org.contractor.control",
   "tunnel_socket":"/var/lib/libvirt/qemu/channel/target/domain-29-contractor-6a09fb207/org.contractor.tunnel",
   "overlay":"/var/lib/contractor/vms/contractor-6a09fb207ea6.qcow2","accel":"tcg"}}

With --json-errors, a failure is also written on stdout as one JSON object:
  {"type":"error","version":1,"code":"libvirt_unreachable","chain":["cannot connect to libvirt at qemu:///system: ...","..."]}

Input: with --json the request is read from stdin, otherwise it is built from flags. A bad
request is reported with its line, column and field.
Output: exactly one JSON object on stdout ({"type":"vm"|"destroyed"|"list",...}; for image
{"type":"image"|"images"|"removed",...}; for check {"type":"check",...}); with
--json-errors, an "error" object when the tool fails.
Exit codes: 0 done, 2 bad input (flags, JSON, names, missing files), 3 libvirt or host
failure (an image tool failed), 130 a held VM was ended by SIGINT/SIGTERM/SIGHUP.
Images live in $CONTRACTOR_DATA_DIR/images (default ~/.local/share/contractor/images, or
/var/lib/contractor/images for root); the guest agent is $CONTRACTOR_AGENT, else
contractor-agent beside this program.
The URI defaults to $CONTRACTOR_LIBVIRT_URI, else qemu:///system for root and
qemu:///session for other users.
Ownership: a VM made by `create` belongs to the calling process (this tool's parent) and
`reap` destroys it once that process has exited; with --hold it belongs to this process."#;

/// Create, inspect and destroy Contractor's builder VMs (libvirt, no network interface).
#[derive(Debug, Parser)]
#[command(name = "contractor-vm", version, after_long_help = EXAMPLE)]
pub struct Cli {
    /// On failure, also write the error on stdout as one JSON object
    /// ({"type":"error","version":1,"code":...,"chain":[...]}).
    #[arg(long, global = true)]
    pub json_errors: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and start a transient VM on a fresh overlay of a base image.
    Create(CreateArgs),
    /// Report a VM's state and channel sockets.
    Status(NameArgs),
    /// Destroy a VM and delete its overlay.
    Destroy(NameArgs),
    /// List Contractor's VMs (domains named contractor-*).
    List(UriArgs),
    /// Destroy VMs whose owning process on this host has exited (prints them as a list).
    Reap(ReapArgs),
    /// Check that this host can run builder VMs: libvirt, KVM, the guest agent, the default
    /// image ({"type":"check",...}: the facts, and each judged as a finding with its fix).
    Check(ReapArgs),
    /// Report what this host has room for: free memory, CPUs, Contractor VMs running
    /// ({"type":"capacity",...}; `contractor build` with several build hosts asks each).
    Capacity(ReapArgs),
    /// Build, import, list and remove builder images (under $CONTRACTOR_DATA_DIR/images).
    #[command(subcommand)]
    Image(ImageCommand),
}

/// The subcommands of `image`. Each prints one JSON object
/// (`contractor_protocol::image::ImageResult`) and its progress on stderr.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an image if it is missing or carries another agent, else return it.
    #[command(
        after_help = "Example:\n  contractor-vm image build debian-12-build\n  contractor-vm image build --base debian-12 --package python3-pytest --package nodejs",
        group = clap::ArgGroup::new("which").required(true).args(["name", "base"])
    )]
    Build {
        /// Image name: debian-12-build, debian-13-build, or an imported image.
        name: Option<String>,
        /// Derive an image from this base (debian-12, debian-13, debian-unstable) with the
        /// --package packages; it is named by that definition and shared by every project.
        #[arg(long, conflicts_with = "name")]
        base: Option<String>,
        /// A Debian package the derived image adds (repeatable).
        #[arg(long = "package", requires = "base")]
        packages: Vec<String>,
        /// Build the derived image without checking the mirror's Release files against
        /// their Valid-Until date (a snapshot or stale mirror); recorded in its manifest and
        /// part of its name.
        #[arg(long, requires = "base")]
        no_check_valid_until: bool,
    },
    /// Make a builder image of your own disk (any Linux with an ext2/3/4 root file system:
    /// a partitioned cloud image, or a file system on the whole disk with --kernel/--initrd).
    #[command(
        after_help = "Examples:\n  contractor-vm image import my-distro --disk debian-12-genericcloud-amd64.qcow2\n  \
contractor-vm image import my-distro --disk root.qcow2 --kernel vmlinuz --initrd initrd.img"
    )]
    Import {
        /// The image name.
        name: String,
        /// The disk: qcow2 or raw; partitioned (GPT or MBR, an ext2/3/4 root partition) or
        /// one ext2/3/4 file system on the whole disk.
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
    /// List the images, by name.
    List,
    /// Remove an image (running VMs keep their open base until they end).
    Rm {
        /// Image name.
        name: String,
    },
    /// Remove the derived images (`--base`) that no build has used for --days days.
    #[command(after_help = "Example:\n  contractor-vm image gc --days 30")]
    Gc {
        /// Days since a build last used an image, after which it is removed.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
}

/// Accelerator names on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccelArg {
    /// KVM where it can work (vmx/svm, /dev/kvm open to QEMU's user, libvirt offers it),
    /// else TCG.
    Auto,
    /// Hardware virtualisation; refused (exit 2, `kvm_unusable`) where it cannot work.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl From<AccelArg> for Accel {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        }
    }
}

/// Flags of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Read the request (type "create") from stdin instead of flags.
    #[arg(long)]
    pub json: bool,
    /// After printing the result, keep the VM until stdin reaches EOF or SIGINT, SIGTERM
    /// or SIGHUP arrives (or the VM stops), then leave the caller's session and destroy it
    /// and delete its overlay, even if the caller exits meanwhile. The VM also dies if this
    /// process is killed.
    #[arg(long)]
    pub hold: bool,
    /// With --hold: start from a saved, booted builder of this image and shape when there
    /// is one, and save one when there is not (the result's `snapshot` says which).
    #[arg(long, requires = "hold", conflicts_with = "json")]
    pub snapshot: bool,
    /// libvirt connection URI.
    #[arg(long, conflicts_with = "json")]
    pub uri: Option<String>,
    /// VM name (contractor-[a-z0-9-]{1,50}); generated when absent.
    #[arg(long, conflicts_with = "json")]
    pub name: Option<String>,
    /// The base disk (qcow2 or raw); never written.
    #[arg(long, required_unless_present = "json", conflicts_with = "json")]
    pub disk: Option<PathBuf>,
    /// The kernel to boot.
    #[arg(long, required_unless_present = "json", conflicts_with = "json")]
    pub kernel: Option<PathBuf>,
    /// The initrd, if the kernel needs one.
    #[arg(long, conflicts_with = "json")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(
        long,
        default_value = "console=ttyS0 root=/dev/vda rw",
        conflicts_with = "json"
    )]
    pub cmdline: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, conflicts_with = "json")]
    pub cpus: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 1024, conflicts_with = "json")]
    pub memory_mib: u64,
    /// Size in GiB of the build disk (vdb: an empty ext4 the guest agent writes on).
    #[arg(long, conflicts_with = "json")]
    pub disk_gib: Option<u64>,
    /// Where the serial console is logged [default: WORK_DIR/NAME.console.log].
    #[arg(long, conflicts_with = "json")]
    pub console_log: Option<PathBuf>,
    /// Directory for the overlay (created with mode 0755).
    #[arg(long, required_unless_present = "json", conflicts_with = "json")]
    pub work_dir: Option<PathBuf>,
    /// Accelerator.
    #[arg(long, value_enum, default_value = "auto", conflicts_with = "json")]
    pub accel: AccelArg,
}

/// Flags of `status` and `destroy`.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Read the request from stdin instead of flags.
    #[arg(long)]
    pub json: bool,
    /// libvirt connection URI.
    #[arg(long, conflicts_with = "json")]
    pub uri: Option<String>,
    /// VM name.
    #[arg(long, required_unless_present = "json", conflicts_with = "json")]
    pub name: Option<String>,
}

/// Flags of `list`.
#[derive(Debug, Args)]
pub struct UriArgs {
    /// Read the request from stdin instead of flags.
    #[arg(long)]
    pub json: bool,
    /// libvirt connection URI.
    #[arg(long, conflicts_with = "json")]
    pub uri: Option<String>,
}

/// Flags of `reap` and `check` (which have no JSON request type in the protocol yet).
#[derive(Debug, Args)]
pub struct ReapArgs {
    /// libvirt connection URI.
    #[arg(long)]
    pub uri: Option<String>,
}

/// Errors of the command line layer.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// stdin could not be read.
    #[error("cannot read the request from stdin")]
    Stdin(#[source] io::Error),
    /// stdin held no request.
    #[error("--json was given but stdin is empty: pipe one JSON request into it")]
    NoRequest,
    /// stdin held invalid JSON or an invalid request.
    #[error("bad JSON request on stdin{at}: {detail}")]
    Json {
        /// ` at line L, column C, in `field``, as far as it is known.
        at: String,
        /// What serde found wrong.
        detail: String,
    },
    /// The request's type does not match the subcommand.
    #[error("stdin holds a `{got}` request but the subcommand is `{expected}`")]
    WrongType {
        /// The subcommand.
        expected: &'static str,
        /// The request's type.
        got: &'static str,
    },
    /// The request failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The result could not be written.
    #[error("cannot write the result to stdout")]
    Output(#[source] JsonlError),
    /// An image request failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl CliError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Json { .. } | CliError::NoRequest | CliError::WrongType { .. } => {
                ExitCode::BadInput
            }
            CliError::Vm(e) => e.exit_code(),
            CliError::Image(e) => e.exit_code(),
            CliError::Stdin(_) | CliError::Output(_) => ExitCode::Infrastructure,
        }
    }

    /// The machine-readable `code` of the error object `--json-errors` prints.
    pub fn code(&self) -> ToolCode {
        match self {
            CliError::Stdin(_) => ToolCode::Stdin,
            CliError::NoRequest => ToolCode::NoRequest,
            CliError::Json { .. } => ToolCode::BadJson,
            CliError::WrongType { .. } => ToolCode::WrongRequestType,
            CliError::Output(_) => ToolCode::Stdout,
            CliError::Image(e) => e.code(),
            CliError::Vm(e) => match e {
                VmError::Name(_) => ToolCode::BadName,
                VmError::BadSpec { .. } => ToolCode::BadSpec,
                VmError::MissingFile { .. } => ToolCode::MissingFile,
                VmError::Connect { .. } => ToolCode::LibvirtUnreachable,
                VmError::NotFound { .. } => ToolCode::NotFound,
                VmError::Overlay(_) => ToolCode::Overlay,
                VmError::Xml(_) => ToolCode::DomainXml,
                VmError::Libvirt { .. } => ToolCode::Libvirt,
                VmError::Unsupported { .. } => ToolCode::Unsupported,
                VmError::MissingLauncher { .. } => ToolCode::MissingLauncher,
                VmError::NoQemu => ToolCode::NoQemu,
                VmError::KvmUnusable { .. } => ToolCode::KvmUnusable,
            },
        }
    }
}

/// The error object of `--json-errors`, shared by every tool, and its code.
pub use contractor_protocol::error::{ErrorObject, ToolCode};

/// The error for a request that did not parse, with its line, column and field. Inside a
/// tagged request (`VmRequest`) serde gives no position, so each top-level member is parsed
/// again as its own type to find it.
fn json_error(text: &str, e: serde_json::Error) -> CliError {
    let located = contractor_protocol::locate::locate_tagged(text, &e, |key, value| match key {
        "spec" => serde_json::from_str::<VmSpec>(value).err(),
        "version" => serde_json::from_str::<u32>(value).err(),
        "type" | "uri" | "name" => serde_json::from_str::<String>(value).err(),
        _ => None,
    });
    CliError::Json {
        at: located.at(),
        detail: located.detail,
    }
}

/// Reads stdin up to the end of its first JSON value (a request object), leaving the rest
/// unread.
fn read_first_value<R: BufRead>(input: R) -> Result<String, CliError> {
    let text = contractor_protocol::locate::read_first_value(input).map_err(CliError::Stdin)?;
    String::from_utf8(text).map_err(|e| CliError::Json {
        at: String::new(),
        detail: format!("the request is not UTF-8 ({e})"),
    })
}

/// The `type` tag of a request.
pub fn request_type(request: &VmRequest) -> &'static str {
    match request {
        VmRequest::Create { .. } => "create",
        VmRequest::Status { .. } => "status",
        VmRequest::Destroy { .. } => "destroy",
        VmRequest::List { .. } => "list",
    }
}

/// Parses one JSON request and checks its type is `expected`. Trailing data after the
/// object is left unread only when `rest_allowed` (for `create --hold`, whose stdin stays
/// open to hold the VM).
pub fn parse_request<R: BufRead>(
    input: R,
    expected: &'static str,
    rest_allowed: bool,
) -> Result<VmRequest, CliError> {
    let text = if rest_allowed {
        read_first_value(input)?
    } else {
        let mut text = String::new();
        let mut input = input;
        input.read_to_string(&mut text).map_err(CliError::Stdin)?;
        text
    };
    if text.trim().is_empty() {
        return Err(CliError::NoRequest);
    }
    let request: VmRequest = serde_json::from_str(&text).map_err(|e| json_error(&text, e))?;
    let got = request_type(&request);
    if got == expected {
        Ok(request)
    } else {
        Err(CliError::WrongType { expected, got })
    }
}

/// Builds a create request from flags (generating the name, so that the console log's
/// default path can include it).
pub fn create_request(args: &CreateArgs) -> Result<VmRequest, CliError> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => generate_name().map_err(VmError::from)?,
    };
    // clap guarantees these without --json; the fallbacks only satisfy the types.
    let work_dir = args.work_dir.clone().unwrap_or_default();
    let console_log = args
        .console_log
        .clone()
        .unwrap_or_else(|| work_dir.join(format!("{name}.console.log")));
    Ok(VmRequest::Create {
        version: PROTOCOL_VERSION,
        uri: args.uri.clone().unwrap_or_else(default_uri),
        spec: VmSpec {
            name: Some(name),
            image: BootImage {
                disk: args.disk.clone().unwrap_or_default(),
                kernel: args.kernel.clone().unwrap_or_default(),
                initrd: args.initrd.clone(),
                cmdline: args.cmdline.clone(),
            },
            cpus: args.cpus,
            memory_mib: args.memory_mib,
            disk_gib: args.disk_gib,
            accel: args.accel.into(),
            console_log,
            work_dir,
            snapshot: args.snapshot,
        },
    })
}

fn print_result(result: &VmResult) -> Result<(), CliError> {
    write_line(&mut io::stdout().lock(), result).map_err(CliError::Output)
}

/// Runs the tool with the process's arguments and returns its exit code.
pub fn run() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::Success.into();
            }
            if std::env::args_os().any(|a| a == "--json-errors") {
                let rendered = e.render().to_string();
                let message = rendered.lines().next().unwrap_or_default();
                let object = ErrorObject::with_chain(
                    ToolCode::Usage,
                    vec![message.trim_start_matches("error: ").to_string()],
                );
                // Best effort: stdout may be what failed. clap has printed the message.
                let _ = write_line(&mut io::stdout().lock(), &object);
            }
            return ExitCode::BadInput.into();
        }
    };
    match execute(cli.command) {
        Ok(code) => code.into(),
        Err(e) => {
            let chain = contractor_protocol::result::error_chain(&e);
            ErrorObject::report("contractor-vm", e.code(), chain, cli.json_errors);
            e.exit_code().into()
        }
    }
}

/// Carries out one parsed command line.
pub fn execute(command: Command) -> Result<ExitCode, CliError> {
    let stdin = || io::stdin().lock();
    let (request, hold) = match command {
        Command::Create(args) if args.json => {
            (parse_request(stdin(), "create", args.hold)?, args.hold)
        }
        Command::Create(args) => (create_request(&args)?, args.hold),
        Command::Status(a) if a.json => (parse_request(stdin(), "status", false)?, false),
        Command::Destroy(a) if a.json => (parse_request(stdin(), "destroy", false)?, false),
        Command::Status(a) => (
            VmRequest::Status {
                version: PROTOCOL_VERSION,
                uri: a.uri.unwrap_or_else(default_uri),
                name: a.name.unwrap_or_default(),
            },
            false,
        ),
        Command::Destroy(a) => (
            VmRequest::Destroy {
                version: PROTOCOL_VERSION,
                uri: a.uri.unwrap_or_else(default_uri),
                name: a.name.unwrap_or_default(),
            },
            false,
        ),
        Command::List(a) if a.json => (parse_request(stdin(), "list", false)?, false),
        Command::List(a) => (
            VmRequest::List {
                version: PROTOCOL_VERSION,
                uri: a.uri.unwrap_or_else(default_uri),
            },
            false,
        ),
        Command::Reap(a) => {
            let uri = a.uri.unwrap_or_else(default_uri);
            let conn = connect(&uri)?;
            let vms = reap(&conn)?;
            for vm in &vms {
                let _ = writeln!(io::stderr(), "contractor-vm: reaped {}", vm.name);
            }
            print_result(&VmResult::List {
                version: PROTOCOL_VERSION,
                vms,
            })?;
            return Ok(ExitCode::Success);
        }
        Command::Capacity(a) => {
            let conn = connect(&a.uri.unwrap_or_else(default_uri))?;
            let report = crate::lifecycle::capacity(&conn)?;
            write_line(&mut io::stdout().lock(), &report).map_err(CliError::Output)?;
            return Ok(ExitCode::Success);
        }
        Command::Check(a) => {
            let check = crate::check::host_check(a.uri.unwrap_or_else(default_uri));
            write_line(&mut io::stdout().lock(), &check).map_err(CliError::Output)?;
            return Ok(ExitCode::Success);
        }
        Command::Image(command) => {
            let result = image_command(command)?;
            write_line(&mut io::stdout().lock(), &result).map_err(CliError::Output)?;
            return Ok(ExitCode::Success);
        }
    };
    if hold {
        return create_and_hold(request);
    }
    // A VM made here outlives this process: it belongs to whoever called us.
    let result = handle_owned(request, VmOwner::parent())?;
    print_result(&result)?;
    Ok(ExitCode::Success)
}

/// Carries out one `image` subcommand.
pub fn image_command(command: ImageCommand) -> Result<ImageResult, ImageError> {
    let version = PROTOCOL_VERSION;
    Ok(match command {
        ImageCommand::Build {
            name,
            base,
            packages,
            no_check_valid_until,
        } => {
            let image = match (name, base) {
                (_, Some(base)) => {
                    crate::image::ensure_derived(&base, &packages, !no_check_valid_until)?
                }
                (Some(name), None) => crate::image::ensure(&name)?,
                // clap requires one of the two.
                (None, None) => return Err(crate::image::ImageError::BadBase(String::new())),
            };
            ImageResult::Image {
                version,
                image: Box::new(image.info()),
            }
        }
        ImageCommand::Import {
            name,
            disk,
            kernel,
            initrd,
        } => ImageResult::Image {
            version,
            image: Box::new(
                crate::image::import::import(
                    &name,
                    &disk,
                    kernel.as_deref().zip(initrd.as_deref()),
                )?
                .info(),
            ),
        },
        ImageCommand::List => ImageResult::Images {
            version,
            images: crate::image::list()?.iter().map(|i| i.info()).collect(),
        },
        ImageCommand::Gc { days } => {
            let removed = crate::image::gc(Duration::from_secs(u64::from(days) * 86_400))?;
            for name in &removed {
                let _ = writeln!(io::stderr(), "contractor-vm: removed image {name}");
            }
            ImageResult::Collected { version, removed }
        }
        ImageCommand::Rm { name } => {
            crate::image::remove(&name)?;
            let _ = writeln!(io::stderr(), "contractor-vm: removed image {name}");
            ImageResult::Removed { version, name }
        }
    })
}

/// Why a held VM was let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    StdinClosed,
    Signal,
    VmStopped,
}

/// Makes the destroy of a released VM this process's alone to finish: it leaves its
/// caller's session (no signal sent to the caller's terminal or process group reaches it
/// any more) and drops the parent-death signal its caller may have set, so that the caller
/// can exit at once (`contractor build` returns as soon as its holder leads a session of
/// its own). SIGTERM, SIGINT and SIGHUP are caught for the life of the process anyway.
/// Best effort: a process that leads its process group cannot start a session, and then
/// stays where it is.
fn detach() {
    let _ = nix::sys::prctl::set_pdeathsig(None);
    let _ = nix::unistd::setsid();
}

fn create_and_hold(request: VmRequest) -> Result<ExitCode, CliError> {
    let VmRequest::Create { version, uri, spec } = request else {
        return Err(CliError::WrongType {
            expected: "create",
            got: request_type(&request),
        });
    };
    if version != PROTOCOL_VERSION {
        return Err(VmError::Unsupported {
            reason: format!(
                "protocol version {version}; this contractor-vm speaks {PROTOCOL_VERSION}"
            ),
        }
        .into());
    }
    let (tx, rx) = mpsc::channel();
    // Registered before the VM exists, so a signal during creation is not lost; kept for
    // the life of the process, so a signal during the destroy cannot end it half done.
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            .map_err(CliError::Stdin)?;
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        for _ in signals.forever() {
            let _ = signal_tx.send(Release::Signal);
        }
    });
    let conn = connect(&uri)?;
    // The snapshot slot a restored VM came from stays claimed until it is destroyed.
    let (vm, slot) = crate::snapshot::create_held(&conn, &spec)?;
    if let Err(e) = print_result(&VmResult::Vm {
        version: PROTOCOL_VERSION,
        vm: vm.clone(),
    }) {
        let _ = destroy_vm(&conn, &vm);
        return Err(e);
    }
    std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        let mut stdin = io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(Release::StdinClosed);
    });
    let release = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(release) => break release,
            Err(mpsc::RecvTimeoutError::Disconnected) => break Release::StdinClosed,
            Err(mpsc::RecvTimeoutError::Timeout) if !exists(&conn, &vm.name) => {
                break Release::VmStopped
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    let reason = match release {
        Release::StdinClosed => "stdin closed",
        Release::Signal => "signal received",
        Release::VmStopped => "the VM stopped",
    };
    detach();
    if let Some(slot) = &slot {
        slot.mark_releasing();
    }
    let _ = writeln!(
        io::stderr(),
        "contractor-vm: {reason}; destroying {}",
        vm.name
    );
    destroy_vm(&conn, &vm)?;
    Ok(if release == Release::Signal {
        ExitCode::Interrupted
    } else {
        ExitCode::Success
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("contractor-vm").chain(args.iter().copied()))
    }

    #[test]
    fn flags_build_the_same_request_as_json() {
        let cli = parse_args(&[
            "create",
            "--uri",
            "qemu:///system",
            "--name",
            "contractor-t1",
            "--disk",
            "/i/b.qcow2",
            "--kernel",
            "/i/k",
            "--initrd",
            "/i/i",
            "--cpus",
            "2",
            "--memory-mib",
            "512",
            "--disk-gib",
            "8",
            "--work-dir",
            "/w",
            "--accel",
            "tcg",
        ])
        .expect("flags parse");
        let Command::Create(args) = cli.command else {
            panic!("not create")
        };
        let from_flags = create_request(&args).expect("request");
        let json = r#"{"type":"create","version":1,"uri":"qemu:///system","spec":{
            "name":"contractor-t1","image":{"disk":"/i/b.qcow2","kernel":"/i/k","initrd":"/i/i",
            "cmdline":"console=ttyS0 root=/dev/vda rw"},"cpus":2,"memory_mib":512,"disk_gib":8,
            "accel":"tcg","console_log":"/w/contractor-t1.console.log","work_dir":"/w"}}"#;
        let from_json = parse_request(json.as_bytes(), "create", false).expect("json");
        assert_eq!(from_flags, from_json);
    }

    #[test]
    fn create_flags_need_disk_kernel_and_work_dir_unless_json() {
        assert!(parse_args(&["create", "--kernel", "/k", "--work-dir", "/w"]).is_err());
        assert!(parse_args(&["create", "--json"]).is_ok());
        assert!(
            parse_args(&["create", "--json", "--disk", "/d"]).is_err(),
            "flags conflict with --json"
        );
        assert!(parse_args(&["status"]).is_err());
        assert!(parse_args(&["reap", "--uri", "test:///default"]).is_ok());
    }

    #[test]
    fn generated_name_names_the_console_log() {
        let cli = parse_args(&[
            "create",
            "--disk",
            "/d",
            "--kernel",
            "/k",
            "--work-dir",
            "/w",
        ])
        .expect("flags parse");
        let Command::Create(args) = cli.command else {
            panic!("not create")
        };
        let VmRequest::Create { spec, .. } = create_request(&args).expect("request") else {
            panic!("not create")
        };
        let name = spec.name.expect("generated name");
        assert!(crate::validate_name(&name).is_ok());
        assert_eq!(
            spec.console_log,
            PathBuf::from(format!("/w/{name}.console.log"))
        );
        assert_eq!(spec.accel, Accel::Auto);
    }

    #[test]
    fn bad_json_is_bad_input_with_a_position() {
        let err = parse_request("{\n  \"type\": \"list\",\n  oops".as_bytes(), "list", false)
            .expect_err("bad json");
        assert_eq!(err.exit_code(), ExitCode::BadInput);
        assert!(err.to_string().contains("line 3"), "{err}");
        let unknown = r#"{"type":"list","version":1,"uri":"x","extra":1}"#;
        let err = parse_request(unknown.as_bytes(), "list", false).expect_err("unknown field");
        assert!(format!("{:?}", err).contains("extra"), "{err:?}");
        assert!(matches!(
            parse_request("  ".as_bytes(), "list", false),
            Err(CliError::NoRequest)
        ));
        let status = r#"{"type":"status","version":1,"uri":"x","name":"contractor-a"}"#;
        assert!(matches!(
            parse_request(status.as_bytes(), "destroy", false),
            Err(CliError::WrongType {
                expected: "destroy",
                got: "status"
            })
        ));
    }

    #[test]
    fn errors_inside_a_tagged_request_name_line_column_and_field() {
        let message = |text: &str| {
            parse_request(text.as_bytes(), "create", false)
                .expect_err("bad request")
                .to_string()
        };
        let kernel = "{\"type\":\"create\",\"version\":1,\"uri\":\"q\",\n \"spec\":{\"image\":{\"disk\":\"/d\",\n \"kernel\":5}}}";
        let m = message(kernel);
        assert!(
            m.contains("at line 3, column 11, in `spec.image.kernel`: invalid type"),
            "{m}"
        );
        let version = "{\"type\":\"create\",\n\"version\":\"1\"}";
        let m = message(version);
        assert!(m.contains("line 2, column 13, in `version`"), "{m}");
        let unknown = "{\"type\":\"create\",\n  \"extra\":1}";
        let m = message(unknown);
        assert!(
            m.contains("line 2, column 9, in `extra`: unknown field"),
            "{m}"
        );
    }

    #[test]
    fn the_first_value_ends_at_its_closing_brace() {
        let mut input: &[u8] = b"{\"a\":\"}\\\"{\",\"b\":[{}]} rest";
        let text = read_first_value(&mut input).expect("read");
        assert_eq!(text, "{\"a\":\"}\\\"{\",\"b\":[{}]}");
        assert_eq!(input, b" rest");
    }

    #[test]
    fn json_errors_object_has_the_documented_shape() {
        let err = CliError::NoRequest;
        let object = ErrorObject::from_error(err.code(), &err);
        let line = serde_json::to_string(&object).expect("serialize");
        assert_eq!(
            line,
            r#"{"type":"error","version":1,"code":"no_request","chain":["--json was given but stdin is empty: pipe one JSON request into it"]}"#
        );
    }

    #[test]
    fn held_requests_leave_the_rest_of_stdin_unread() {
        let mut input: &[u8] = b"{\"type\":\"list\",\"version\":1,\"uri\":\"x\"}\nkeep";
        let request = parse_request(&mut input, "list", true).expect("first object");
        assert_eq!(request_type(&request), "list");
        assert!(input.ends_with(b"keep"));
    }

    #[test]
    fn handle_lists_through_the_test_driver() {
        let request = VmRequest::List {
            version: 1,
            uri: String::from("test:///default"),
        };
        let result = crate::handle(request).expect("list");
        assert_eq!(
            result,
            VmResult::List {
                version: 1,
                vms: Vec::new()
            }
        );
        let future = VmRequest::List {
            version: 2,
            uri: String::from("test:///default"),
        };
        assert!(matches!(
            crate::handle(future),
            Err(VmError::Unsupported { .. })
        ));
    }
}
