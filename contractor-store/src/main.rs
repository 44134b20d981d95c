//! `contractor-store`: `serve` a store directory over HTTP (one `ready` line on stdout,
//! stops on SIGTERM or SIGINT), write a build's artifact `index`, collect garbage (`gc`),
//! make a build `token`, `pack` a project's source into a record, keep a project's build
//! `cache`, or `record open|close` a build's record, `record follow|receive` a build host's
//! stream and record, close abandoned ones, and `record list|show|downloads|log` read them
//! back. Flags map onto library calls; errors become
//! exit codes here only.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};
use contractor_protocol::error::ToolCode;
use contractor_protocol::result::{ErrorInfo, Limit, Outcome};
use contractor_protocol::service::{Confinement, Ready, ReadyOut};
use contractor_protocol::store::{
    CacheCleared, CacheKept, CacheList, CachePrepared, KeptVm, KeptVmForgotten, RecordClosed,
    RecordList, RecordOpened, RecordReceived, RecordsClosed, MAX_KEPT_VM_BYTES,
};
use contractor_protocol::units::{parse_duration, parse_size};
use contractor_protocol::ExitCode;
use contractor_store::cache::CacheError;
use contractor_store::confinement::Needs;
use contractor_store::follow::{self, FollowError};
use contractor_store::pack::MAX_SOURCE_ENTRIES;
use contractor_store::reading;
use contractor_store::receipt::ReceiptError;
use contractor_store::sourcing;
use contractor_store::{GcOptions, Store, StoreConfig, TokenTable};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "contractor-store",
    version,
    about = "Serves a store directory over HTTP"
)]
struct Cli {
    /// When a command fails, also print one error object on stdout:
    /// {"type":"error","version":1,"code":"bad_root","chain":[...]}.
    #[arg(long, global = true)]
    json_errors: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a directory: GET and HEAD anywhere in it, PUT under builds/<id>/artifacts/ and
    /// to cas/sha256/<hash>.
    #[command(
        after_help = "Example:\n  contractor-store serve --root .contractor --only-build 20261125-141502-3fa2c1\n\n\
Output on stdout, once it listens:\n  \
{\"type\":\"ready\",\"version\":1,\"service\":\"store\",\"addr\":\"127.0.0.1:40124\"}\n\n\
Exit codes: 0 stopped by SIGTERM/SIGINT, 2 bad root or flags, 3 cannot serve.\n\
With --json-errors a failure is also one {\"type\":\"error\",...} object on stdout."
    )]
    Serve(ServeArgs),
    /// Write builds/ID/artifacts.json listing every artifact with its size and SHA-256, and
    /// print it.
    Index {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The build.
        #[arg(long, value_name = "ID")]
        build: String,
    },
    /// Remove old builds (never a running one) and unreferenced blobs; print a JSON summary.
    Gc {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// Keep the newest N finished builds.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Remove only builds older than AGE (30m, 12h, 7d, 2w).
        #[arg(long, value_name = "AGE", value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Report what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a random token for a build, append '<build-id> <token>' to FILE, print the token.
    Token {
        /// The build the token is for.
        #[arg(long, value_name = "ID")]
        build: String,
        /// The token file a store reads (created if missing).
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
    },
    /// Pack a project's source tree into a tar (links stay links; .git, .contractor and
    /// .gitignored paths are left out; FIFOs, sockets and devices are skipped with a
    /// warning) and print what was packed.
    #[command(
        after_help = "Example:\n  contractor-store pack --project . --out .contractor/builds/ID/source.tar\n\n\
Output on stdout:\n  \
{\"type\":\"packed\",\"version\":1,\"entries\":4,\"bytes\":10240,\"warnings\":[]}\n\n\
Exit codes: 0 packed; 2 the project cannot be packed as it is (error code\n\
source_too_many_entries or source_unreadable); 3 the tar cannot be written (source_pack).\n\
With --json-errors a failure is also one {\"type\":\"error\",...} object on stdout."
    )]
    Pack {
        /// The project directory.
        #[arg(long, value_name = "DIR")]
        project: PathBuf,
        /// The tar to write (replaced if it exists).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Most entries (files, directories, links) to pack; more is an error.
        #[arg(long, value_name = "N", default_value_t = MAX_SOURCE_ENTRIES as u64,
              value_parser = clap::value_parser!(u64).range(1..=MAX_SOURCE_ENTRIES as u64))]
        max_entries: u64,
    },
    /// A project's build cache, kept under ROOT/cache/: prepare a build's, keep what the
    /// build uploaded, list or clear them.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// A build's record: open one, close one that ran, receive one from a build host, close
    /// abandoned ones; list the builds, show one, its downloads or its log.
    #[command(subcommand)]
    Record(RecordCommand),
}

/// `contractor-store serve`'s flags.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The store directory; it must exist.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serve only /builds/ID/... (one build's inputs and artifacts); refuse the rest.
    #[arg(long, value_name = "ID")]
    only_build: Option<String>,
    /// Require build tokens: FILE holds '<build-id> <token>' lines and is read again
    /// when it changes.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Require a build token made here for the --only-build build, given in the ready line
    /// ("token") and kept in memory only: no file holds it.
    #[arg(long, requires = "only_build", conflicts_with = "token_file")]
    own_token: bool,
    /// Largest single upload (bytes, or with K/M/G/T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_artifact_bytes: Option<u64>,
    /// Largest total of one build's artifacts (bytes, or with K/M/G/T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_build_bytes: Option<u64>,
    /// Cut an upload whose body sends nothing for this long (30s, 5m, ...; at least
    /// 1s): it is answered 408 and nothing of it is kept.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_idle_timeout)]
    body_idle_timeout: Duration,
    /// Most connections served at once; each one over it is answered 503 and closed.
    #[arg(long, value_name = "N", default_value_t = contractor_store::DEFAULT_MAX_CONNECTIONS as u64,
          value_parser = clap::value_parser!(u64).range(1..=MAX_CONNECTIONS))]
    max_connections: u64,
    /// Do not log each request on stderr.
    #[arg(long)]
    no_access_log: bool,
    /// Do not confine the store (Landlock, seccomp, rlimits): for debugging only; the
    /// ready line then says `"enforced":false`.
    #[arg(long)]
    no_confine: bool,
    /// Write the ready line on descriptor N (inherited, e.g. `3>FILE` in sh) instead of
    /// stdout, and close it after the line.
    #[arg(long, value_name = "N")]
    ready_fd: Option<i32>,
    /// Threads that serve requests (default: one per CPU core). Large-file reads,
    /// uploads and fsyncs run on extra threads of their own.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
}

/// `record receive`'s and `record follow`'s flags: where the record goes, and its bound.
#[derive(Debug, clap::Args)]
struct Receipt {
    /// The store directory.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// The build.
    #[arg(long, value_name = "ID")]
    build: String,
    /// The most bytes the record may take, each file and directory counted as at least
    /// 4096 (bytes, or with K/M/G/T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_bytes: u64,
    /// Do not confine the receipt (Landlock, seccomp, rlimits): for debugging only.
    #[arg(long)]
    no_confine: bool,
}

#[derive(Debug, Subcommand)]
#[command(
    after_help = "Exit codes: 0 done; 2 a bad build id or owner, a record that exists (open) or is\n\
closed (close), no such record or no records (show, downloads, log), no kept VM (show\n\
--kept-vm), or a refused record stream; 3 the record could not be made, read or written.\n\
With --json-errors a failure is also one {\"type\":\"error\",...} object on stdout."
)]
enum RecordCommand {
    /// Receive the record of a build run on a build host (the stream after its `finished`
    /// event: `file` lines each followed by its bytes, then `end`) from stdin into
    /// ROOT/builds/ID/, which must exist, confined to that directory; write its
    /// artifacts.json and print
    /// {"type":"record_received","version":1,"files":N,"charged_bytes":B,"artifacts":A}.
    Receive(Receipt),
    /// Follow the whole stream of a build run on a build host (`contractor-host build`'s
    /// stdout) from stdin, confined to ROOT/builds/ID/ (which must exist): check its hello,
    /// events and error, and write each one on, re-encoded ({"type":"host_hello",...}, the
    /// build events, {"type":"host_failed",...}); after `finished`, receive the record as
    /// `receive` does and print its {"type":"record_received",...}.
    Follow(Receipt),
    /// Give every abandoned build (no result.json; its owner.json names a process that is
    /// gone, or, with no owner, unchanged for an hour) a result.json saying it was
    /// interrupted; print {"type":"records_closed","version":1,"closed":[ID...]}.
    CloseAbandoned {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
    },
    /// Open the record of a new build: close abandoned ones (as close-abandoned does), make
    /// ROOT/builds/ID/ (ID new, or --id checked: one that has a record is refused), write its
    /// owner.json naming --owner, point ROOT/latest at it, and print
    /// {"type":"record_opened","version":1,"id":ID,"dir":DIR}.
    Open {
        /// The store directory (created if missing).
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The build's id (YYYYMMDD-HHMMSS-xxxxxx), when the caller chose it; default: a new one.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// The process the build lives as long as (the front end, the script: `$$`); once it
        /// is gone without closing the record, the build is abandoned.
        #[arg(long, value_name = "PID")]
        owner: u32,
    },
    /// List the builds, oldest first (the newest 100000): print
    /// {"type":"record_list","version":1,"builds":N,"left_out":M}, then N lines
    /// {"type":"record_entry","id":ID,"started":"YYYY-MM-DD HH:MM:SS","outcome":O|null,"duration_secs":S|null}.
    List {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
    },
    /// Show a build's record (default: the newest): print
    /// {"type":"record_shown","version":1,"id":ID,"dir":DIR,"started":...,"result":{...}|null,
    /// "artifacts":[{"path":P,"size":N|null,"sha256":H|null}],"downloads":N,"from_cache":M}.
    Show {
        #[command(flatten)]
        reading: Reading,
        /// Also answer the build's kept VM (its vm.json, at most 64 KiB) as
        /// "kept_vm":{"name":...,"uri":...,"control_socket":...}; a record without one is
        /// `no_kept_vm` (exit 2).
        #[arg(long)]
        kept_vm: bool,
    },
    /// A build's downloads (default: the newest's): print
    /// {"type":"record_downloads","version":1,"id":ID,"downloads":N,"skipped":M}, then N
    /// download lines of its downloads.jsonl (at most 65 MiB read), checked and typed.
    Downloads(Reading),
    /// A build's log (default: the newest's): print
    /// {"type":"record_log","version":1,"id":ID,"path":FILE,"bytes":N}, then exactly N bytes
    /// of build.log (console.log with --console; at most 16 GiB).
    Log {
        #[command(flatten)]
        reading: Reading,
        /// The VM's console log instead of the build log.
        #[arg(long)]
        console: bool,
        /// Only its last LINES lines (1 to 1000; found in its last 64 KiB).
        #[arg(long, value_name = "LINES", value_parser = clap::value_parser!(u32).range(1..=1000))]
        tail: Option<u32>,
    },
    /// Copy a build's packed source (default: the newest's) to TAR, a new file (never over
    /// an existing one), for `contractor rebuild`; print
    /// {"type":"record_source","version":1,"id":ID,"path":TAR,"bytes":N}. A failed copy
    /// leaves TAR for the caller to remove.
    Source {
        #[command(flatten)]
        reading: Reading,
        /// The new file to write.
        #[arg(long, value_name = "TAR")]
        to: PathBuf,
    },
    /// Close the record of a build that ran: read contractor-run's events on stdin (or take
    /// how it ended from --outcome and its flags), write ROOT/builds/ID/artifacts.json and
    /// result.json (the `finished` event's outcome, the stored artifacts, each declared one
    /// checked, the refusals of proxy.jsonl, a download that did not match its pin failed
    /// from the proxies' summaries there), remove owner.json, and print
    /// {"type":"record_closed","version":1,"result":{...}}.
    Close {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The build.
        #[arg(long, value_name = "ID")]
        build: String,
        /// When the build started, in seconds since the Unix epoch (`date +%s.%N`).
        #[arg(long, value_name = "SECS", value_parser = parse_started)]
        started: SystemTime,
        /// A declared artifact (`[build] artifacts`: a path or glob); a success that stored
        /// nothing it matches is failed (`artifact_missing`). Repeatable.
        #[arg(long = "artifact", value_name = "PATTERN")]
        artifacts: Vec<String>,
        #[command(flatten)]
        ended: EndedArgs,
        /// The VM kept for `contractor shell`, written as the record's vm.json: its JSON
        /// ({"name":...,"uri":...,"control_socket":...}) or a file holding it (at most
        /// 64 KiB).
        #[arg(long, value_name = "JSON|FILE", value_parser = parse_kept_vm)]
        kept_vm: Option<KeptVm>,
        /// Do not confine the close (Landlock, seccomp, rlimits): for debugging only.
        #[arg(long)]
        no_confine: bool,
    },
    /// Remove a build's vm.json once its kept VM is gone (a record without one is fine),
    /// confined to ROOT/builds/ID/; print {"type":"kept_vm_forgotten","version":1,"id":ID}.
    ForgetVm {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The build.
        #[arg(long, value_name = "ID")]
        build: String,
        /// Do not confine the removal (Landlock, seccomp, rlimits): for debugging only.
        #[arg(long)]
        no_confine: bool,
    },
}

/// `record show|downloads|log`'s flags: which record.
#[derive(Debug, clap::Args)]
struct Reading {
    /// The store directory.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// The build (default: the newest).
    #[arg(long, value_name = "ID")]
    build: Option<String>,
}

/// `record close`'s flags that say how the build ended, when its caller decided that (stdin
/// is then not read).
#[derive(Debug, clap::Args)]
struct EndedArgs {
    /// How the build ended: success, failed, timeout, infrastructure or interrupted; stdin
    /// is then not read. A success whose declared artifact is missing is still failed.
    #[arg(long, value_name = "OUTCOME", value_parser = parse_outcome)]
    outcome: Option<Outcome>,
    /// The script's exit code.
    #[arg(
        long,
        value_name = "N",
        requires = "outcome",
        allow_negative_numbers = true
    )]
    exit_code: Option<i32>,
    /// The limit the build hit: timeout, max_log, max_artifacts, memory or disk.
    #[arg(long, value_name = "LIMIT", requires = "outcome", value_parser = parse_limit)]
    limit: Option<Limit>,
    /// The error's code (a-z 0-9 _).
    #[arg(long, value_name = "CODE", requires = "outcome")]
    error_code: Option<String>,
    /// The error's messages, outermost first (repeatable; a message may begin with `-`).
    #[arg(
        long = "error",
        value_name = "MESSAGE",
        requires = "error_code",
        allow_hyphen_values = true
    )]
    error: Vec<String>,
}

impl EndedArgs {
    /// How the build ended, when `--outcome` said it.
    fn ended(self) -> Option<contractor_store::closing::Ended> {
        let outcome = self.outcome?;
        Some(contractor_store::closing::Ended {
            outcome,
            exit_code: self.exit_code,
            limit: self.limit,
            error: self.error_code.map(|code| ErrorInfo {
                code,
                chain: self.error,
            }),
        })
    }
}

/// `--outcome`: an outcome as `result.json` writes it.
fn parse_outcome(text: &str) -> Result<Outcome, String> {
    serde_json::from_value(serde_json::Value::from(text)).map_err(|_| {
        format!("{text:?} is not an outcome; give success, failed, timeout, infrastructure or interrupted")
    })
}

/// `--kept-vm`: a kept VM's JSON (text beginning with `{`) or a file holding it, read
/// before the close confines itself, at most `MAX_KEPT_VM_BYTES`.
fn parse_kept_vm(text: &str) -> Result<KeptVm, String> {
    let (bytes, what) = if text.trim_start().starts_with('{') {
        (text.as_bytes().to_vec(), "the JSON".to_string())
    } else {
        let path = std::path::Path::new(text);
        let bytes = contractor_protocol::file::read_regular(path, MAX_KEPT_VM_BYTES)
            .map_err(|e| format!("cannot read {text}: {e} (give the kept VM's JSON or a file of at most {MAX_KEPT_VM_BYTES} bytes)"))?;
        (bytes, text.to_string())
    };
    if bytes.len() as u64 > MAX_KEPT_VM_BYTES {
        return Err(format!(
            "the kept VM's JSON is over {MAX_KEPT_VM_BYTES} bytes"
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        format!("{what} is not a kept VM ({e}); give {{\"name\":...,\"uri\":...,\"control_socket\":...}}")
    })
}

/// `--limit`: a limit as `result.json` writes it.
fn parse_limit(text: &str) -> Result<Limit, String> {
    serde_json::from_value(serde_json::Value::from(text)).map_err(|_| {
        format!("{text:?} is not a limit; give timeout, max_log, max_artifacts, memory or disk")
    })
}

/// `--started`: seconds since the Unix epoch, fractions allowed.
fn parse_started(text: &str) -> Result<SystemTime, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
        }
        _ => Err(format!(
            "{text:?} is not a time; give seconds since the Unix epoch (date +%s.%N)"
        )),
    }
}

#[derive(Debug, Subcommand)]
#[command(
    after_help = "Exit codes: 0 done; 2 a bad build id or cache path; 3 the cache could not be\n\
read or written. With --json-errors a failure is also one {\"type\":\"error\",...} object on stdout."
)]
enum CacheCommand {
    /// Link the cache for PATHs (if there is one) into builds/ID/inputs/cache.tar and print
    /// the job's cache: {"type":"cache_prepared","version":1,"cache":{...}|null,"warnings":[]}.
    Prepare {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The build.
        #[arg(long, value_name = "ID")]
        build: String,
        /// An absolute guest directory to keep (repeat for more; none: no cache).
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// Largest cache tar the agent may save (bytes, or with K/M/G/T).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_bytes: u64,
    },
    /// After the build: move the cache it uploaded (artifacts/.contractor-cache.tar) into the
    /// cache if it succeeded, drop it otherwise; print
    /// {"type":"cache_kept","version":1,"bytes":N|null}.
    Keep {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The build.
        #[arg(long, value_name = "ID")]
        build: String,
        /// The guest directories the build kept (as given to prepare).
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// The build succeeded; without it the upload is dropped.
        #[arg(long)]
        success: bool,
    },
    /// Print the caches: {"type":"cache_list","version":1,"caches":[...]}.
    List {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
    },
    /// Delete the caches: {"type":"cache_cleared","version":1,"freed_bytes":N}.
    Clear {
        /// The store directory.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
    },
}

/// The most `--max-connections` accepts: half the open files a confined store may hold.
const MAX_CONNECTIONS: u64 = contractor_store::confinement::MAX_OPEN_FILES / 2;

/// `--body-idle-timeout`: a duration of at least one second.
fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(d),
        Ok(_) => Err(format!("{text:?} is too short; give at least 1s")),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    JSON_ERRORS.store(cli.json_errors, std::sync::atomic::Ordering::Relaxed);
    // `--ready-fd N` is taken before this process opens anything (ReadyOut::open).
    let ready_out = match &cli.command {
        Command::Serve(args) => ReadyOut::open(args.ready_fd),
        _ => Ok(ReadyOut::Stdout),
    };
    let ready_out = match ready_out {
        Ok(out) => out,
        Err(e) => {
            return fail(
                ExitCode::BadInput,
                ToolCode::BadReadyFd,
                &anyhow::Error::new(e),
            )
        }
    };
    // This thread waits for signals; `serve` answers requests on worker threads of its own.
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command(cli, ready_out)),
        Err(e) => fail(
            ExitCode::Infrastructure,
            ToolCode::Runtime,
            &anyhow::Error::new(e).context("cannot start the async runtime"),
        ),
    }
}

async fn command(cli: Cli, ready_out: ReadyOut) -> std::process::ExitCode {
    match cli.command {
        Command::Serve(args) => serve(args, ready_out).await,
        Command::Index { root, build } => {
            match contractor_store::write_artifact_index(&root, &build) {
                Ok(index) => print_json(&index),
                Err(e) => fail(ExitCode::BadInput, ToolCode::Index, &anyhow::Error::new(e)),
            }
        }
        Command::Gc {
            root,
            keep,
            older_than,
            dry_run,
        } => {
            let options = GcOptions {
                keep,
                older_than,
                dry_run,
                now: SystemTime::now(),
            };
            match contractor_store::collect_garbage(&root, &options) {
                Ok(summary) => print_json(&summary),
                Err(e) => fail(ExitCode::BadInput, ToolCode::Gc, &anyhow::Error::new(e)),
            }
        }
        Command::Token { build, token_file } => match add_token(&build, &token_file) {
            Ok(token) => {
                println!("{token}");
                ExitCode::Success.into()
            }
            Err(e) => fail(ExitCode::BadInput, ToolCode::Token, &e),
        },
        Command::Pack {
            project,
            out,
            max_entries,
        } => {
            let max_entries = usize::try_from(max_entries).unwrap_or(MAX_SOURCE_ENTRIES);
            match contractor_store::pack::pack_at_most(&project, &out, max_entries) {
                Ok(packed) => print_json(&packed),
                Err(e) => {
                    let exit = if e.is_project_error() {
                        ExitCode::BadInput
                    } else {
                        ExitCode::Infrastructure
                    };
                    fail(exit, e.code(), &anyhow::Error::new(e))
                }
            }
        }
        Command::Cache(command) => cache(command),
        Command::Record(command) => record(command),
    }
}

/// `contractor-store serve`: opens the store (with its token file, if any) and serves it
/// until SIGTERM or SIGINT.
async fn serve(args: ServeArgs, ready_out: ReadyOut) -> std::process::ExitCode {
    let ServeArgs {
        root,
        listen,
        only_build,
        token_file,
        own_token,
        max_artifact_bytes,
        max_build_bytes,
        body_idle_timeout,
        max_connections,
        no_access_log,
        no_confine,
        ready_fd: _,
        workers,
    } = args;
    let own = match only_build
        .as_deref()
        .filter(|_| own_token)
        .map(own_build_token)
    {
        Some(Ok((table, token))) => Some((table, token)),
        Some(Err(e)) => {
            let exit = match e {
                contractor_store::access::TokenError::Random(_) => ExitCode::Infrastructure,
                _ => ExitCode::BadInput,
            };
            return fail(exit, ToolCode::Token, &anyhow::Error::new(e));
        }
        None => None,
    };
    let (own_tokens, token) = own.unzip();
    let tokens = match token_file.as_deref().map(TokenTable::load).transpose() {
        Ok(tokens) => tokens.or(own_tokens),
        Err(e) => {
            return fail(
                ExitCode::BadInput,
                ToolCode::BadTokenFile,
                &anyhow::Error::new(e),
            )
        }
    };
    let confine = Confine {
        enabled: !no_confine,
        only_build: only_build.clone(),
        token_file: token_file.clone(),
    };
    let config = StoreConfig {
        access_log: !no_access_log,
        only_build,
        tokens,
        max_artifact_bytes,
        max_build_bytes,
        body_idle_timeout,
        max_connections: usize::try_from(max_connections)
            .unwrap_or(contractor_store::DEFAULT_MAX_CONNECTIONS),
        ..StoreConfig::new(root)
    };
    let store = match Store::open(&config) {
        Ok(store) => store,
        Err(e) => {
            return fail(
                ExitCode::BadInput,
                ToolCode::BadRoot,
                &anyhow::Error::new(e),
            )
        }
    };
    let workers = workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    match run(store, listen, workers, &confine, ready_out, token).await {
        Ok(()) => ExitCode::Success.into(),
        Err(e) => fail(ExitCode::Infrastructure, ToolCode::Serve, &e),
    }
}

fn record(command: RecordCommand) -> std::process::ExitCode {
    match command {
        RecordCommand::Receive(Receipt {
            root,
            build,
            max_bytes,
            no_confine,
        }) => match receive(&root, &build, max_bytes, !no_confine) {
            Ok(received) => print_json(&received),
            Err(e) => {
                let (exit, code) = match e.downcast_ref::<ReceiptError>() {
                    Some(r) if r.is_bad_input() => (ExitCode::BadInput, r.code()),
                    Some(r) => (ExitCode::Infrastructure, r.code()),
                    None => (ExitCode::BadInput, ToolCode::RecordReceive),
                };
                fail(exit, code, &e)
            }
        },
        RecordCommand::Follow(Receipt {
            root,
            build,
            max_bytes,
            no_confine,
        }) => match follow(&root, &build, max_bytes, !no_confine) {
            Ok(Some(received)) => print_json(&received),
            Ok(None) => ExitCode::Success.into(),
            Err(e) => {
                let (exit, code) = match e.downcast_ref::<FollowError>() {
                    Some(f) if f.is_bad_input() => (ExitCode::BadInput, f.code()),
                    Some(f) => (ExitCode::Infrastructure, f.code()),
                    None => (ExitCode::BadInput, ToolCode::RecordReceive),
                };
                fail(exit, code, &e)
            }
        },
        RecordCommand::Close {
            root,
            build,
            started,
            artifacts,
            ended,
            kept_vm,
            no_confine,
        } => {
            let closing = contractor_store::closing::Closing {
                started,
                artifacts,
                ended: ended.ended(),
                kept_vm,
            };
            close_record(&root, &build, &closing, !no_confine)
        }
        RecordCommand::Open { root, id, owner } => open_record(&root, id.as_deref(), owner),
        RecordCommand::List { root } => read_record(&root, |root, out| {
            let (entries, left_out) = reading::list(root)?;
            write_line(out, &RecordList::new(entries.len() as u64, left_out))?;
            entries.iter().try_for_each(|entry| write_line(out, entry))
        }),
        RecordCommand::Show {
            reading: Reading { root, build },
            kept_vm,
        } => read_record(&root, |root, out| {
            write_line(out, &reading::show(root, build.as_deref(), kept_vm)?)
        }),
        RecordCommand::Downloads(Reading { root, build }) => read_record(&root, |root, out| {
            let (header, downloads) = reading::downloads(root, build.as_deref())?;
            write_line(out, &header)?;
            downloads.iter().try_for_each(|d| write_line(out, d))
        }),
        RecordCommand::Log {
            reading: Reading { root, build },
            console,
            tail,
        } => read_record(&root, |root, out| {
            copy_log(root, build.as_deref(), console, tail, out)
        }),
        RecordCommand::Source {
            reading: Reading { root, build },
            to,
        } => copy_source(&root, build.as_deref(), &to),
        RecordCommand::ForgetVm {
            root,
            build,
            no_confine,
        } => forget_vm(&root, &build, !no_confine),
        RecordCommand::CloseAbandoned { root } => {
            match contractor_store::records::close_abandoned(&root, SystemTime::now()) {
                Ok(closed) => print_json(&RecordsClosed::new(closed)),
                Err(e) => fail(
                    ExitCode::Infrastructure,
                    ToolCode::RecordClose,
                    &anyhow::Error::new(e),
                ),
            }
        }
    }
}

/// `record open`: closes the abandoned records first (a store that cannot still opens the
/// build's, saying so on stderr), then opens a new one owned by `owner`.
fn open_record(root: &Path, id: Option<&str>, owner: u32) -> std::process::ExitCode {
    if let Err(e) = contractor_store::records::close_abandoned(root, SystemTime::now()) {
        let e = anyhow::Error::new(e);
        eprintln!("contractor-store: warning: cannot close abandoned records: {e:#}");
    }
    match contractor_store::opening::open(root, id, owner) {
        Ok(opened) => print_json(&RecordOpened::new(opened.id, opened.dir)),
        Err(e) => {
            let exit = if e.is_bad_input() {
                ExitCode::BadInput
            } else {
                ExitCode::Infrastructure
            };
            fail(exit, e.code(), &anyhow::Error::new(e))
        }
    }
}

/// `record source`: TAR is made before the process confines itself to reading the records.
fn copy_source(root: &Path, build: Option<&str>, to: &Path) -> std::process::ExitCode {
    let mut file = match sourcing::create(to) {
        Ok(file) => file,
        Err(e) => return fail(ExitCode::Infrastructure, e.code(), &anyhow::Error::new(e)),
    };
    read_record(root, |root, out| {
        write_line(out, &sourcing::copy(root, build, &mut file, to)?)
    })
}

/// `record log`: its header line, then exactly the bytes it announces.
fn copy_log(
    root: &Path,
    build: Option<&str>,
    console: bool,
    tail: Option<u32>,
    out: &mut std::io::StdoutLock<'static>,
) -> anyhow::Result<()> {
    let (header, mut body) = reading::log(root, build, console, tail)?;
    write_line(out, &header)?;
    let copied = std::io::copy(&mut body, out).context("cannot write stdout")?;
    if copied != header.bytes {
        anyhow::bail!(
            "{} ended after {copied} of its {} bytes",
            header.path.display(),
            header.bytes
        );
    }
    Ok(())
}

/// `record list|show|downloads|log`: confines this process to `ROOT/builds/`, read-only,
/// then writes what `answer` reads on stdout. A record that is not there is exit 2; one
/// that cannot be read, exit 3.
fn read_record(
    root: &std::path::Path,
    answer: impl FnOnce(&std::path::Path, &mut std::io::StdoutLock<'static>) -> anyhow::Result<()>,
) -> std::process::ExitCode {
    let builds = root.join("builds");
    if let Ok(builds) = builds.canonicalize() {
        let policy = contractor_store::confinement::reading_policy(&builds);
        if let Err(e) = contractor_confine::confine("contractor-store", &policy) {
            let e = anyhow::Error::new(e).context("cannot confine the reading");
            return fail(ExitCode::Infrastructure, ToolCode::Confine, &e);
        }
    }
    let mut out = std::io::stdout().lock();
    match answer(root, &mut out).and_then(|()| out.flush().context("cannot write stdout")) {
        Ok(()) => ExitCode::Success.into(),
        Err(e) => match e.downcast_ref::<reading::ReadError>() {
            Some(r) if r.is_bad_input() => fail(ExitCode::BadInput, r.code(), &e),
            Some(r) => fail(ExitCode::Infrastructure, r.code(), &e),
            None => match e.downcast_ref::<sourcing::SourceError>() {
                Some(s) if s.is_bad_input() => fail(ExitCode::BadInput, s.code(), &e),
                Some(s) => fail(ExitCode::Infrastructure, s.code(), &e),
                None => fail(ExitCode::Infrastructure, ToolCode::Stdout, &e),
            },
        },
    }
}

/// Writes `value` as one JSON line.
fn write_line(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value).context("cannot write stdout")?;
    out.write_all(b"\n").context("cannot write stdout")
}

/// `record close`: closes the record ([`close_confined`]) and answers what it wrote.
fn close_record(
    root: &std::path::Path,
    build: &str,
    closing: &contractor_store::closing::Closing,
    confine: bool,
) -> std::process::ExitCode {
    match close_confined(root, build, closing, confine) {
        Ok(result) => print_json(&RecordClosed::new(result)),
        Err(e) if e.is_bad_input() => fail(ExitCode::BadInput, ToolCode::RecordNotOpen, &e.into()),
        Err(e) => fail(ExitCode::Infrastructure, ToolCode::RecordClose, &e.into()),
    }
}

/// Confines this process to the record (as `record receive` does: what it reads, the run's
/// events and `proxy.jsonl`, carries the guest's words), then closes it.
fn close_confined(
    root: &std::path::Path,
    build: &str,
    closing: &contractor_store::closing::Closing,
    confine: bool,
) -> Result<contractor_protocol::result::BuildResult, contractor_store::closing::CloseError> {
    use contractor_store::closing::CloseError;
    let record = root.join("builds").join(build);
    if confine && contractor_store::path::is_build_id(build) {
        if let Ok(record) = record.canonicalize() {
            let policy = contractor_store::confinement::receipt_policy(&record);
            contractor_confine::confine("contractor-store", &policy)
                .map_err(CloseError::Confine)?;
        }
    }
    contractor_store::closing::close(root, build, std::io::stdin().lock(), closing)
}

/// `record forget-vm`: confines this process to the record, then removes its `vm.json`. A
/// build id that is not one, or no such record, is the caller's input (exit 2).
fn forget_vm(root: &std::path::Path, build: &str, confine: bool) -> std::process::ExitCode {
    let forgotten = confined_record(root, build, confine)
        .and_then(|_| Ok(contractor_store::closing::forget_kept_vm(root, build)?));
    match forgotten {
        Ok(()) => print_json(&KeptVmForgotten::new(build.to_string())),
        Err(e)
            if !contractor_store::path::is_build_id(build)
                || !root.join("builds").join(build).is_dir() =>
        {
            fail(ExitCode::BadInput, ToolCode::RecordNotOpen, &e)
        }
        Err(e) => fail(ExitCode::Infrastructure, ToolCode::RecordClose, &e),
    }
}

/// `record receive`: confines this process to the record, then receives the stream on
/// stdin into it and indexes its artifacts.
/// The record directory of `build` under `root`, canonical; confined to it unless `confine`
/// is false.
fn confined_record(
    root: &std::path::Path,
    build: &str,
    confine: bool,
) -> anyhow::Result<std::path::PathBuf> {
    if !contractor_store::path::is_build_id(build) {
        anyhow::bail!("build id {build:?} is not valid; use A-Z a-z 0-9 . _ - only");
    }
    let record = root.join("builds").join(build);
    let record = record
        .canonicalize()
        .with_context(|| format!("the record {} must exist", record.display()))?;
    if confine {
        let policy = contractor_store::confinement::receipt_policy(&record);
        contractor_confine::confine("contractor-store", &policy)
            .context("cannot confine the receipt")?;
    }
    Ok(record)
}

/// `record follow`: the answer once the record is received; `None` when the build host
/// could not run the build (its failure is written).
fn follow(
    root: &std::path::Path,
    build: &str,
    max_bytes: u64,
    confine: bool,
) -> anyhow::Result<Option<RecordReceived>> {
    let record = confined_record(root, build, confine)?;
    let input = std::io::stdin().lock();
    let mut out = std::io::stdout().lock();
    let received = match follow::follow(input, &mut out, &record, max_bytes)? {
        follow::Followed::Received(received) => received,
        follow::Followed::HostFailed => return Ok(None),
    };
    let index = contractor_store::write_artifact_index(root_of(&record, root), build)?;
    Ok(Some(RecordReceived::new(
        received.files,
        received.charged_bytes,
        index.artifacts.len() as u64,
    )))
}

/// The store root above the record directory `record` (`root` if it has none).
fn root_of<'a>(record: &'a std::path::Path, root: &'a std::path::Path) -> &'a std::path::Path {
    record
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap_or(root)
}

fn receive(
    root: &std::path::Path,
    build: &str,
    max_bytes: u64,
    confine: bool,
) -> anyhow::Result<RecordReceived> {
    let record = confined_record(root, build, confine)?;
    let input = std::io::stdin().lock();
    let received = contractor_store::receipt::receive(input, &record, max_bytes)?;
    let index = contractor_store::write_artifact_index(root_of(&record, root), build)?;
    Ok(RecordReceived::new(
        received.files,
        received.charged_bytes,
        index.artifacts.len() as u64,
    ))
}

fn cache(command: CacheCommand) -> std::process::ExitCode {
    use contractor_store::cache;
    let answered = match command {
        CacheCommand::Prepare {
            root,
            build,
            paths,
            max_bytes,
        } => {
            let mut warnings = Vec::new();
            cache::prepare(&root, &build, &paths, max_bytes, &mut warnings)
                .map(|job| print_json(&CachePrepared::new(job, warnings)))
        }
        CacheCommand::Keep {
            root,
            build,
            paths,
            success,
        } => cache::keep(&root, &build, &paths, success)
            .map(|kept| print_json(&CacheKept::new(kept))),
        CacheCommand::List { root } => {
            cache::list(&root).map(|caches| print_json(&CacheList::new(caches)))
        }
        CacheCommand::Clear { root } => {
            cache::clear(&root).map(|freed| print_json(&CacheCleared::new(freed)))
        }
    };
    answered.unwrap_or_else(|e: CacheError| {
        let exit = if e.is_bad_input() {
            ExitCode::BadInput
        } else {
            ExitCode::Infrastructure
        };
        fail(exit, e.code(), &anyhow::Error::new(e))
    })
}

/// `serve --own-token`: a new token for `build`, and the table that accepts only it
/// (held in memory, never written). The error: no randomness, or `build` is no build id.
fn own_build_token(
    build: &str,
) -> Result<(TokenTable, String), contractor_store::access::TokenError> {
    let token = contractor_store::generate_token()?;
    let mut table = TokenTable::new();
    table.insert(build, &token)?;
    Ok((table, token))
}

/// Makes a token for `build` and appends it to `file` (mode 0600 when created).
fn add_token(build: &str, file: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let token = contractor_store::generate_token()?;
    // Check the pair the way the server will read it.
    TokenTable::new().insert(build, &token)?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot open token file {}", file.display()))?;
    writeln!(out, "{build} {token}")
        .with_context(|| format!("cannot write token file {}", file.display()))?;
    Ok(token)
}

fn print_json(value: &impl serde::Serialize) -> std::process::ExitCode {
    let mut stdout = std::io::stdout();
    match serde_json::to_writer(&mut stdout, value)
        .map_err(anyhow::Error::new)
        .and_then(|()| writeln!(stdout).map_err(anyhow::Error::new))
    {
        Ok(()) => ExitCode::Success.into(),
        Err(e) => fail(
            ExitCode::Infrastructure,
            ToolCode::Stdout,
            &e.context("cannot write stdout"),
        ),
    }
}

/// How `serve` confines itself once it listens.
struct Confine {
    enabled: bool,
    only_build: Option<String>,
    token_file: Option<PathBuf>,
}

impl Confine {
    /// Confines this process (before any worker thread starts, so that every one of them
    /// inherits the Landlock rules) and reports what holds.
    fn apply(&self, store: &Store, port: u16) -> anyhow::Result<Confinement> {
        if !self.enabled {
            return Ok(contractor_confine::unconfined("contractor-store"));
        }
        let token_file = self
            .token_file
            .as_deref()
            .map(|f| f.canonicalize().unwrap_or_else(|_| f.to_path_buf()));
        if let Some(id) = self
            .only_build
            .as_deref()
            .filter(|id| contractor_store::path::is_build_id(id))
        {
            // The one directory it may write must exist before the rule can name it (an id
            // that is no build id names nothing the store would serve: no rule, no write).
            let record = store.root().join("builds").join(id);
            std::fs::create_dir_all(&record)
                .with_context(|| format!("cannot create the build record {}", record.display()))?;
        }
        let policy = contractor_store::confinement::policy(&Needs {
            root: store.root(),
            only_build: self.only_build.as_deref(),
            token_file: token_file.as_deref(),
            port,
        });
        contractor_confine::confine("contractor-store", &policy).context("cannot confine the store")
    }
}

async fn run(
    store: Store,
    listen: SocketAddr,
    workers: usize,
    confine: &Confine,
    ready_out: ReadyOut,
    token: Option<String>,
) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let confinement = confine.apply(&store, addr.port())?;
    ready_out
        .write(
            &Ready::new("store", addr)
                .confined(confinement)
                .with_token(token),
        )
        .context("cannot write the ready line")?;
    eprintln!(
        "contractor-store: serving {} on http://{addr}",
        store.root().display()
    );
    let shutdown = async {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("contractor-store: stopping");
    };
    store
        .serve_on_threads(listener, workers, shutdown)
        .await
        .context("cannot start the worker threads")
}

/// Set from `--json-errors` before anything can fail.
static JSON_ERRORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reports `error` on stderr (and, with `--json-errors`, as an error object on stdout).
fn fail(code: ExitCode, name: ToolCode, error: &anyhow::Error) -> std::process::ExitCode {
    let chain = error.chain().map(|e| e.to_string()).collect();
    let json = JSON_ERRORS.load(std::sync::atomic::Ordering::Relaxed);
    contractor_protocol::error::ErrorObject::report("contractor-store", name, chain, json);
    code.into()
}
