//! `contractor-proxy --allow HOST... [--deny HOST...] [--config FILE] [...]`: a filtering
//! forward proxy. Prints one `ready` line with the bound address on stdout, then one
//! `decision` line per request; stops on SIGTERM or SIGINT, printing a `summary` line of
//! its counters last. `contractor-proxy cache list|clear --dir DIR` measures or empties a
//! download cache (`--cache DIR`) and prints one line.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread;

use anyhow::{anyhow, Context};
use clap::Parser;
use contractor_protocol::agent::Phase;
use contractor_protocol::error::ToolCode;
use contractor_protocol::jsonl::{encode_line, write_flushed, write_line, JsonlError};
use contractor_protocol::proxy::ProxyLine;
use contractor_protocol::service::{Confinement, Ready, ReadyOut};
use contractor_protocol::ExitCode;
use contractor_proxy::config::LimitsFile;
use contractor_proxy::record::Record;
use contractor_proxy::{AccessEntry, ConfigFile, Mode, ProxyConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

const AFTER_HELP: &str = "\
Clients reach allowed hosts with CONNECT (HTTPS) or absolute-URI HTTP requests. Anything \
else gets 403 with an X-Contractor-Proxy-Error header saying why, as does any host whose \
addresses are all loopback, private or link-local (unless --allow-net covers them). Stdout \
carries one JSON `ready` line, then one JSON `decision` line per request, and a `summary` \
line of the counters when it stops. List flags \
(--allow, --deny, --allow-net, --allow-port) add to the --config file's lists; the others \
replace its values. `contractor-proxy cache list|clear --dir DIR` measures or empties a \
download cache. See docs/proxy.md.

Example:
  contractor-proxy --allow deb.debian.org --listen 127.0.0.1:3128
  curl -x http://127.0.0.1:3128 https://deb.debian.org/

Output on stdout (JSON Lines):
  {\"type\":\"ready\",\"version\":1,\"service\":\"proxy\",\"addr\":\"127.0.0.1:3128\"}
  {\"type\":\"decision\",\"time\":1795615977.728,\"client\":\"127.0.0.1:54418\",\"method\":\"CONNECT\",\"host\":\"example.com\",\"port\":443,\"decision\":\"deny\",\"reason\":\"host not on the allowlist\"}
  {\"type\":\"summary\",\"allowed\":0,\"denied\":{\"host_not_allowed\":1},\"bytes_up\":0,\"bytes_down\":0,\"connections\":1,\"active_connections\":0}
With --record DIR the decisions and downloads go to DIR/proxy.jsonl and DIR/downloads.jsonl
instead, and the summary (also filed there) carries their tally.

Exit codes: 0 stopped by SIGTERM/SIGINT, 2 bad flags, rules or config file, 3 cannot serve.
With --json-errors a failure is also one {\"type\":\"error\",...} object on stdout.";

#[derive(Debug, Parser)]
#[command(
    name = "contractor-proxy",
    version,
    about = "Filtering HTTP/HTTPS forward proxy with a host allowlist",
    after_help = AFTER_HELP
)]
struct Cli {
    /// When the proxy cannot start, also print one error object on stdout:
    /// {"type":"error","version":1,"code":"bad_rule","chain":[...]}.
    #[arg(long)]
    json_errors: bool,
    /// A configuration file, TOML (*.toml) or JSON (*.json), with the same settings as
    /// these flags (listen, allow, deny, allow_net, allow_port, mode, limits, ...).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port [default: 127.0.0.1:0].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// A host clients may reach: `example.org` exactly, or `*.example.org` for its
    /// subdomains (not example.org itself), optionally with its own ports
    /// (`example.org:443,8443`); or some URLs of a host: `[METHOD ]http[s]://host[:port]/
    /// pattern`, `**` any text and `*` any text without `/` (`GET https://mirror.example.org/
    /// debian/pool/**`; https needs --inspect). Repeatable.
    #[arg(long, value_name = "RULE")]
    allow: Vec<String>,
    /// A host clients may not reach even if an --allow rule covers it; same syntax, and
    /// without ports it covers every port. Repeatable.
    #[arg(long, value_name = "HOST")]
    deny: Vec<String>,
    /// A network the proxy may connect to although its addresses are loopback, private or
    /// link-local, e.g. 127.0.0.0/8. Repeatable.
    #[arg(long, value_name = "CIDR")]
    allow_net: Vec<String>,
    /// A port requests may target, for rules without their own ports [default: 80 and
    /// 443]. Repeatable.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    allow_port: Vec<u16>,
    /// `enforce` refuses what the policy refuses; `report` lets everything through and logs
    /// "would be refused: ..." [default: enforce].
    #[arg(long, value_name = "MODE")]
    mode: Option<Mode>,
    /// Client connections served at once; more get 503 with Retry-After [default: 1024].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Largest request head in bytes, at least 8192 [default: 65536].
    #[arg(long, value_name = "BYTES")]
    max_header_bytes: Option<usize>,
    /// Seconds a client may take to send a request head [default: 10].
    #[arg(long, value_name = "SECS")]
    header_read_timeout: Option<f64>,
    /// Seconds a connection, tunnel or body may go without a byte either way [default: 300].
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<f64>,
    /// Seconds resolving and connecting to a host may take [default: 10].
    #[arg(long, value_name = "SECS")]
    connect_timeout: Option<f64>,
    /// Append one JSON line per finished request (status, bytes each way, duration) here.
    #[arg(long, value_name = "FILE")]
    access_log: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Write a `download` line (method, URL, status, size, SHA-256 of the body) on stdout
    /// for each response forwarded (to plain-HTTP requests, and to requests inside
    /// inspected TLS).
    #[arg(long)]
    record_downloads: bool,
    /// Inspect TLS to allowed DNS names: answer their CONNECTs with a certificate of a
    /// throwaway authority (made now, in memory, name-constrained to the allowed names; its
    /// certificate is in the ready line), and forward each request over the proxy's own
    /// TLS, verified against this host's trust store (SSL_CERT_FILE, else
    /// /etc/ssl/certs/ca-certificates.crt).
    #[arg(long)]
    inspect: bool,
    /// With --inspect, a host whose CONNECTs stay plain tunnels (for clients that pin
    /// certificates); same syntax as --allow. Repeatable.
    #[arg(long, value_name = "HOST", requires = "inspect")]
    tunnel: Vec<String>,
    /// With --record-downloads, a JSON object of URL → SHA-256 (lower-case hex): a download
    /// of such a URL is staged whole and served only if its bytes hash so (with
    /// Content-Length); otherwise it is answered 502 and its line says `"pinned"`. At most
    /// 16 MiB and 100000 URLs.
    #[arg(long, value_name = "FILE", requires = "record_downloads")]
    pins: Option<PathBuf>,
    /// With --record-downloads and --cache-project, a download cache directory shared by
    /// projects (made if missing, owner only): each complete GET answered 200 is kept there
    /// by the SHA-256 of its body, in the project's own index with its URL and headers; a
    /// GET of a pinned URL (--pins) is served from it only when the project fetched exactly
    /// the pinned bytes from that URL itself (hashed again first; a copy with other bytes is
    /// removed and answered 502, its line a mismatch).
    #[arg(long, value_name = "DIR", requires_all = ["record_downloads", "cache_project"])]
    cache: Option<PathBuf>,
    /// With --cache, the project served: 32 lower-case hex digits (`contractor` passes a
    /// hash of the machine id and the project directory). Only its own index is read for
    /// serving.
    #[arg(long, value_name = "KEY", requires = "cache")]
    cache_project: Option<String>,
    /// With --cache, the most bytes of new entries this run writes; a download past it is
    /// passed on but not kept, and counted in the summary [default: 4 GiB].
    #[arg(long, value_name = "BYTES", requires = "cache")]
    cache_max: Option<u64>,
    /// With --cache, the most bytes the cache holds: an entry that would pass it first makes
    /// room by removing the entries used longest ago that no project's lock pins
    /// [default: 10 GiB].
    #[arg(long, value_name = "BYTES", requires = "cache")]
    cache_size: Option<u64>,
    /// With --cache: resolve and dial nothing; serve GETs of pinned URLs from the cache and
    /// refuse everything else (403, a `deny` line naming the URL). Inspected hosts are still
    /// answered CONNECT; tunnels are refused.
    #[arg(long, requires = "cache")]
    offline: bool,
    /// File the decisions and downloads in a build's record directory DIR instead of
    /// stdout: `proxy.jsonl` and `downloads.jsonl`, appended to (made if missing, never
    /// through a link; at most 64 MiB each, then one `cut` line), tallied in the summary's
    /// `record` (the hosts refused, pin mismatches). Two proxies may write one record.
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// With --record, the build's phase this proxy serves, added to each line as
    /// `"phase"`: fetch or script.
    #[arg(long, value_name = "PHASE", requires = "record", value_parser = parse_phase)]
    record_phase: Option<Phase>,
    /// Write the ready line on descriptor N (inherited, e.g. `3>FILE` in sh) instead of
    /// stdout, and close it after the line; stdout then carries the decisions (and
    /// downloads) and the summary only.
    #[arg(long, value_name = "N")]
    ready_fd: Option<i32>,
    /// Do not confine the proxy (Landlock, seccomp, rlimits): for debugging a host whose
    /// name resolution needs files the proxy does not know; the ready line then says
    /// `"enforced":false`.
    #[arg(long)]
    no_confine: bool,
}

/// `contractor-proxy cache list|clear --dir DIR`: the download cache (`--cache DIR`) measured
/// or emptied by the tool that keeps it (`contractor cache list|clear --downloads` runs it).
#[derive(Debug, Parser)]
#[command(
    name = "contractor-proxy cache",
    about = "List or clear a download cache (--cache DIR): one JSON line on stdout, \
             {\"type\":\"download_cache\",\"version\":1,\"entries\":N,\"bytes\":N} \
             (clear: \"download_cache_cleared\", what was removed)"
)]
struct CacheCli {
    #[command(subcommand)]
    action: CacheAction,
}

#[derive(Debug, clap::Subcommand)]
enum CacheAction {
    /// How many entries and bytes the cache holds (a cache never made holds none).
    List(CacheArgs),
    /// Removes every entry, pinned or not, and every project's index.
    Clear(CacheArgs),
}

#[derive(Debug, clap::Args)]
struct CacheArgs {
    /// The cache directory.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// On failure, also print one error object on stdout.
    #[arg(long)]
    json_errors: bool,
}

fn cache_command(cli: CacheCli) -> std::process::ExitCode {
    use contractor_protocol::proxy::{DownloadCacheTag, DownloadCacheUsage};
    use contractor_proxy::cache::trim;
    let (args, kind, doing, done) = match &cli.action {
        CacheAction::List(args) => (
            args,
            DownloadCacheTag::DownloadCache,
            "read",
            trim::usage(&args.dir),
        ),
        CacheAction::Clear(args) => (
            args,
            DownloadCacheTag::DownloadCacheCleared,
            "clear",
            trim::clear(&args.dir),
        ),
    };
    JSON_ERRORS.store(args.json_errors, std::sync::atomic::Ordering::Relaxed);
    let usage = match done {
        Ok(usage) => usage,
        Err(e) => {
            let e = anyhow!(e).context(format!(
                "cannot {doing} the download cache {}",
                args.dir.display()
            ));
            return fail(ExitCode::Infrastructure, ToolCode::Cache, &e);
        }
    };
    let answer = DownloadCacheUsage::new(kind, usage.entries, usage.bytes);
    match write_line(&mut std::io::stdout().lock(), &answer) {
        Ok(()) => ExitCode::Success.into(),
        Err(e) => fail(ExitCode::Infrastructure, ToolCode::Stdout, &anyhow!(e)),
    }
}

impl Cli {
    fn into_settings(self) -> anyhow::Result<ConfigFile> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let flags = ConfigFile {
            listen: self.listen,
            allow: self.allow,
            deny: self.deny,
            allow_net: self.allow_net,
            allow_port: self.allow_port,
            mode: self.mode,
            limits: LimitsFile {
                max_connections: self.max_connections,
                max_header_bytes: self.max_header_bytes,
                header_read_timeout_secs: self.header_read_timeout,
                idle_timeout_secs: self.idle_timeout,
                connect_timeout_secs: self.connect_timeout,
            },
            access_log: self.access_log,
            metrics: self.metrics,
        };
        Ok(file.overlay(flags))
    }
}

fn main() -> std::process::ExitCode {
    if contractor_proxy::dialer::is_requested(std::env::args_os().nth(1).as_deref()) {
        return match contractor_proxy::dialer::serve() {
            Ok(()) => ExitCode::Success.into(),
            Err(e) => fail(ExitCode::Infrastructure, ToolCode::Dialer, &anyhow!(e)),
        };
    }
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("cache")) {
        return cache_command(CacheCli::parse_from(std::env::args_os().skip(1)));
    }
    let cli = Cli::parse();
    JSON_ERRORS.store(cli.json_errors, std::sync::atomic::Ordering::Relaxed);
    // `--ready-fd N` is taken before this process opens anything (ReadyOut::open).
    let ready_out = match ReadyOut::open(cli.ready_fd) {
        Ok(out) => out,
        Err(e) => return fail(ExitCode::BadInput, ToolCode::BadReadyFd, &anyhow!(e)),
    };
    let no_confine = cli.no_confine;
    let record = cli.record.clone().map(|dir| RecordTo {
        dir,
        phase: cli.record_phase,
        pinned: cli.pins.is_some(),
    });
    let (config, access_log, metrics_addr) = match configure(cli) {
        Ok(configured) => configured,
        Err((code, name, e)) => return fail(code, name, &e),
    };
    // Bound and confined before any thread starts: Landlock (before ABI 8) holds only the
    // thread that asks and the threads it starts afterwards, the runtime's workers among them.
    let prepared = match prepare(config, access_log, record, metrics_addr, no_confine) {
        Ok(prepared) => prepared,
        Err(e) => return fail(ExitCode::Infrastructure, ToolCode::Serve, &e),
    };
    serve(prepared, ready_out)
}

/// `--record-phase`'s value.
fn parse_phase(value: &str) -> Result<Phase, String> {
    match value {
        "fetch" => Ok(Phase::Fetch),
        "script" => Ok(Phase::Script),
        _ => Err(format!("{value:?} is not a phase; use fetch or script")),
    }
}

/// `--record DIR`, with its phase, and whether `--pins` was given.
struct RecordTo {
    dir: PathBuf,
    phase: Option<Phase>,
    pinned: bool,
}

/// Why the proxy cannot start: its exit code, its error code and the error.
type Failure = (ExitCode, ToolCode, anyhow::Error);

/// Turns the flags and the `--config` file into the proxy's configuration, with its pins,
/// tunnel hosts, download cache and inspection; also the access log's path and the
/// metrics address, which `prepare` opens and binds.
fn configure(cli: Cli) -> Result<(ProxyConfig, Option<PathBuf>, Option<SocketAddr>), Failure> {
    let (cache_dir, cache_max, offline) = (cli.cache.clone(), cli.cache_max, cli.offline);
    let (cache_project, cache_size) = (cli.cache_project.clone(), cli.cache_size);
    let record_downloads = cli.record_downloads;
    let inspect = cli.inspect;
    let pins = match cli.pins.as_deref().map(read_pins).transpose() {
        Ok(pins) => pins.unwrap_or_default(),
        Err(e) => return Err((ExitCode::BadInput, ToolCode::BadPins, e)),
    };
    let tunnel = contractor_proxy::Allowlist::parse(&cli.tunnel)
        .map_err(|e| (ExitCode::BadInput, ToolCode::BadRule, anyhow!(e)))?;
    let settings = cli
        .into_settings()
        .map_err(|e| (ExitCode::BadInput, ToolCode::BadConfig, e))?;
    let access_log = settings.access_log.clone();
    let metrics_addr = settings.metrics;
    let mut config = settings
        .into_config()
        .map_err(|e| (ExitCode::BadInput, ToolCode::BadRule, anyhow!(e)))?;
    config.record_downloads = record_downloads;
    config.tunnel = tunnel;
    config.pins = std::sync::Arc::new(pins);
    config.offline = offline;
    if let Some(dir) = &cache_dir {
        let cache = open_cache(
            &config,
            dir,
            cache_project.as_deref(),
            cache_max,
            cache_size,
        )?;
        config.cache = Some(std::sync::Arc::new(cache));
    }
    set_inspection(&mut config, inspect)?;
    Ok((config, access_log, metrics_addr))
}

/// Opens the download cache `dir` for the project `--cache-project` names, with the
/// `--cache-max` quota, the `--cache-size` bound and the configuration's pins.
fn open_cache(
    config: &ProxyConfig,
    dir: &std::path::Path,
    project: Option<&str>,
    max: Option<u64>,
    size: Option<u64>,
) -> Result<contractor_proxy::cache::DownloadCache, Failure> {
    use contractor_proxy::cache::{self, index::ProjectKey, CacheSettings};
    let project = ProjectKey::parse(project.unwrap_or_default()).map_err(|e| {
        let e = anyhow!(e).context("--cache-project");
        (ExitCode::BadInput, ToolCode::BadCacheProject, e)
    })?;
    let settings = CacheSettings {
        project,
        quota: max.unwrap_or(cache::DEFAULT_MAX_WRITTEN),
        size: size.unwrap_or(cache::DEFAULT_SIZE),
        pins: config.pins.values().cloned().collect(),
    };
    cache::DownloadCache::open(dir, settings).map_err(|e| {
        let e = anyhow!(e).context(format!("cannot open the download cache {}", dir.display()));
        (ExitCode::Infrastructure, ToolCode::Cache, e)
    })
}

/// With `--inspect`, makes the build authority for the hosts the configuration reaches;
/// without it, refuses an https:// URL rule (only an inspecting proxy can check one).
/// The trust store is read before the proxy is confined; the authority's key is made in
/// memory and never written.
fn set_inspection(config: &mut ProxyConfig, inspect: bool) -> Result<(), Failure> {
    if !inspect {
        if let Some(rule) = config
            .url_rules
            .iter()
            .find(|rule| rule.scheme == contractor_proxy::urlrule::Scheme::Https)
        {
            let e = anyhow!(
                "--allow {rule:?}: an https:// URL rule needs --inspect, which lets the proxy \
                 read the requests; without it allow the host ({})",
                rule.host
            );
            return Err((ExitCode::BadInput, ToolCode::BadRule, e));
        }
        return Ok(());
    }
    config.inspection = inspection(&config.reachable_hosts())
        .map_err(|e| (ExitCode::Infrastructure, ToolCode::Inspect, e))?;
    Ok(())
}

/// Starts the async runtime and serves until SIGTERM or SIGINT.
fn serve(prepared: Prepared, ready_out: ReadyOut) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return fail(
                ExitCode::Infrastructure,
                ToolCode::Runtime,
                &anyhow::Error::new(e).context("cannot start the async runtime"),
            )
        }
    };
    match runtime.block_on(run(prepared, ready_out)) {
        Ok(()) => ExitCode::Success.into(),
        Err(e) => fail(ExitCode::Infrastructure, ToolCode::Serve, &e),
    }
}

/// What the proxy holds once it listens and is confined, before it serves.
struct Prepared {
    config: ProxyConfig,
    listener: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
    access_log: Option<std::fs::File>,
    record: Option<Record>,
    confinement: Confinement,
    /// The dialer process, started before the proxy confined itself.
    dialer: contractor_proxy::dialer::Spawned,
}

/// Opens the access log, binds the listeners, then confines the process.
fn prepare(
    mut config: ProxyConfig,
    access_log: Option<PathBuf>,
    record: Option<RecordTo>,
    metrics_addr: Option<SocketAddr>,
    no_confine: bool,
) -> anyhow::Result<Prepared> {
    let record = record
        .map(|to| {
            Record::open(&to.dir, to.phase, to.pinned)
                .with_context(|| format!("cannot open the record's files in {}", to.dir.display()))
        })
        .transpose()?;
    let access_log = access_log
        .map(|path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open the access log {}", path.display()))
        })
        .transpose()?;
    let listen = config.listen;
    let listener = bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let metrics = metrics_addr
        .map(|addr| bind(addr).with_context(|| format!("cannot serve metrics on {addr}")))
        .transpose()?;
    let port = |listener: &std::net::TcpListener| {
        listener
            .local_addr()
            .map(|addr| addr.port())
            .context("cannot read the bound address")
    };
    let listen_port = port(&listener)?;
    let metrics_port = metrics.as_ref().map(port).transpose()?;
    // The dialer makes every upstream connection, checking each address; it is started
    // (this very binary, again) while the proxy may still execute a program.
    let own: Vec<SocketAddr> = std::iter::once(&listener)
        .chain(metrics.as_ref())
        .map(std::net::TcpListener::local_addr)
        .collect::<Result<_, _>>()
        .context("cannot read the bound address")?;
    // The proxy refuses them first, so that its decision is the refusal the client gets.
    config.also_own = own.iter().skip(1).copied().collect();
    let settings = contractor_proxy::dialer::Settings::of(&config, &own, !no_confine);
    let dialer = contractor_proxy::dialer::spawn(std::path::Path::new("/proc/self/exe"), &settings)
        .context("cannot start the dialer")?;
    let confinement = if no_confine {
        contractor_confine::unconfined("contractor-proxy")
    } else {
        let policy = contractor_proxy::confinement::policy(&config, listen_port, metrics_port);
        contractor_confine::confine("contractor-proxy", &policy)
            .context("cannot confine the proxy")?
    };
    Ok(Prepared {
        config,
        listener,
        metrics,
        access_log,
        record,
        confinement,
        dialer,
    })
}

/// The most bytes of a `--pins` file, and the most URLs in it.
const MAX_PINS_FILE: u64 = 16 << 20;
const MAX_PINS: usize = 100_000;

/// The `--pins` file: a JSON object of URL → lower-case hex SHA-256.
fn read_pins(path: &std::path::Path) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let bytes =
        contractor_protocol::file::read_regular(path, MAX_PINS_FILE).with_context(|| {
            format!(
                "cannot read the pins {} (at most {MAX_PINS_FILE} bytes)",
                path.display()
            )
        })?;
    let pins: std::collections::HashMap<String, String> = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a JSON object of URL to SHA-256", path.display()))?;
    if pins.len() > MAX_PINS {
        anyhow::bail!(
            "{} pins {} URLs; at most {MAX_PINS} are read",
            path.display(),
            pins.len()
        );
    }
    if let Some((url, sha)) = pins.iter().find(|(_, sha)| {
        sha.len() != 64
            || !sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }) {
        anyhow::bail!(
            "{}: the pin of {url:?} is {sha:?}; use 64 lower-case hex digits (a SHA-256)",
            path.display()
        );
    }
    Ok(pins)
}

/// The authority and upstream TLS for `--inspect`; `None` when the allow list names no DNS
/// name (nothing to inspect).
fn inspection(
    allowlist: &contractor_proxy::Allowlist,
) -> anyhow::Result<Option<contractor_proxy::inspect::Inspection>> {
    use contractor_proxy::inspect;
    let Some(authority) = inspect::Authority::new(allowlist)? else {
        return Ok(None);
    };
    let roots = inspect::load_roots()?;
    Ok(Some(inspect::Inspection {
        authority: std::sync::Arc::new(authority),
        upstream: std::sync::Arc::new(inspect::client_config(roots)),
    }))
}

/// A non-blocking listener on `addr`, for the runtime to take over.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

async fn run(prepared: Prepared, ready_out: ReadyOut) -> anyhow::Result<()> {
    let Prepared {
        mut config,
        listener,
        metrics: metrics_listener,
        access_log,
        record,
        confinement,
        dialer,
    } = prepared;
    let dialer =
        contractor_proxy::dialer::Dialer::start(dialer.socket).context("cannot use the dialer")?;
    config.resolver = dialer.resolver();
    config.dialer = Some(dialer);
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let access_writer = access_log.map(|file| {
        let (entries, received) = mpsc::unbounded_channel();
        config.access_log = Some(entries);
        thread::spawn(move || write_entries(received, file))
    });
    let listener =
        tokio::net::TcpListener::from_std(listener).context("cannot serve on the listener")?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let metrics = std::sync::Arc::clone(&config.metrics);
    let cache = config.cache.clone();
    let (stop_metrics, mut metrics_stopped) = watch::channel(false);
    if let Some(metrics_listener) = metrics_listener {
        let metrics_listener = tokio::net::TcpListener::from_std(metrics_listener)
            .context("cannot serve metrics on the listener")?;
        let bound = metrics_listener
            .local_addr()
            .context("cannot read the metrics address")?;
        eprintln!("contractor-proxy: metrics at http://{bound}/metrics");
        tokio::spawn(contractor_proxy::serve_metrics(
            metrics_listener,
            std::sync::Arc::clone(&metrics),
            async move {
                let _ = metrics_stopped.wait_for(|stopped| *stopped).await;
            },
        ));
    }
    ready_out
        .write(
            &Ready::new("proxy", addr)
                .confined(confinement)
                .with_ca_certificate(
                    config
                        .inspection
                        .as_ref()
                        .map(|i| i.authority.certificate_pem().to_string()),
                ),
        )
        .context("cannot write the ready line")?;
    eprintln!(
        "contractor-proxy: listening on {addr}, {} allow and {} deny rules, {:?} mode",
        config.allowlist.rules().len(),
        config.denylist.rules().len(),
        config.mode,
    );
    let (decisions, received) = mpsc::unbounded_channel();
    let (writer_failed, failed) = oneshot::channel();
    let writer = thread::spawn(move || write_decisions(received, record, writer_failed));
    let shutdown = async {
        tokio::select! {
            _ = terminate.recv() => eprintln!("contractor-proxy: stopping"),
            _ = interrupt.recv() => eprintln!("contractor-proxy: stopping"),
            Ok(()) = failed => {}
        }
    };
    contractor_proxy::serve(config, listener, decisions, shutdown).await;
    let _ = stop_metrics.send(true);
    if let Some(access_writer) = access_writer {
        access_writer
            .join()
            .map_err(|_| anyhow!("the access log writer panicked"))?
            .context("cannot write the access log")?;
    }
    // Every connection is gone, so every decision has been sent; once the writer has
    // written them all, the summary is the last line.
    let filed = writer
        .join()
        .map_err(|_| anyhow!("the decision writer panicked"))?
        .context("cannot write the decisions")?;
    let mut summary = metrics.summary();
    summary.cache_not_kept = cache.map_or(0, |cache| cache.not_kept());
    if let Some(record) = filed {
        record
            .finish(&mut summary)
            .context("cannot file the summary in the record")?;
    }
    write_line(&mut std::io::stdout(), &summary).context("cannot write the summary to stdout")
}

/// Appends access log entries to `file` until every sender is gone.
fn write_entries(
    mut received: mpsc::UnboundedReceiver<AccessEntry>,
    mut file: std::fs::File,
) -> Result<(), JsonlError> {
    while let Some(entry) = received.blocking_recv() {
        write_line(&mut file, &entry)?;
    }
    Ok(())
}

/// Writes decisions to stdout, or with `--record` into the record (then handed back to
/// file the summary), until every sender is gone; on failure, says so on `failed` so that the
/// proxy stops rather than run unrecorded.
fn write_decisions(
    mut received: mpsc::UnboundedReceiver<ProxyLine>,
    mut record: Option<Record>,
    failed: oneshot::Sender<()>,
) -> Result<Option<Record>, JsonlError> {
    let mut stdout = std::io::stdout();
    let mut batch = Vec::new();
    while let Some(first) = received.blocking_recv() {
        let written = match &mut record {
            Some(record) => record.write(first),
            None => write_waiting(&mut stdout, &mut batch, first, &mut received),
        };
        if let Err(e) = written {
            let _ = failed.send(());
            return Err(e);
        }
    }
    Ok(record)
}

/// Writes `first` and the decisions already waiting behind it, whole lines up to
/// [`DECISION_BATCH`] bytes, in one write: under load that is one system call and one
/// wake-up for many requests, and a lone decision is still written at once.
fn write_waiting(
    out: &mut impl Write,
    batch: &mut Vec<u8>,
    first: ProxyLine,
    waiting: &mut mpsc::UnboundedReceiver<ProxyLine>,
) -> Result<(), JsonlError> {
    batch.clear();
    let mut next = Some(first);
    while let Some(decision) = next {
        encode_line(batch, &decision)?;
        next = if batch.len() < DECISION_BATCH {
            waiting.try_recv().ok()
        } else {
            None
        };
    }
    write_flushed(out, batch)
}

/// The most bytes of decision lines written at once.
const DECISION_BATCH: usize = 64 * 1024;

/// Set from `--json-errors` before anything can fail.
static JSON_ERRORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reports `error` on stderr (and, with `--json-errors`, as an error object on stdout).
fn fail(code: ExitCode, name: ToolCode, error: &anyhow::Error) -> std::process::ExitCode {
    let chain = error.chain().map(|e| e.to_string()).collect();
    let json = JSON_ERRORS.load(std::sync::atomic::Ordering::Relaxed);
    contractor_protocol::error::ErrorObject::report("contractor-proxy", name, chain, json);
    code.into()
}
