//! `contractor build --host`: the same build, its VM on a build host reached over SSH.
//!
//! The source is packed here into the local record; `ssh HOST contractor-host build`
//! (the contractor-host crate, and `contractor_protocol::hosted`) receives it, runs the build
//! there with `contractor build` (VM, relay, proxy and store under that user's libvirt), and streams its events
//! back, then its record. This process never reads that stream: `ssh`'s stdout is the
//! stdin of `contractor-store record follow` (confined to the local
//! `.contractor/builds/<id>/`), which checks each line, writes the events on re-encoded
//! (shown here as a local build's) and receives the record; the host is named in
//! `result.json`. SSH is the system's
//! `ssh` (or `$CONTRACTOR_SSH`): the user's keys, `known_hosts` and agent, in batch mode
//! (it never asks for a password or to accept a host key). Ctrl-C or SIGTERM closes the
//! session's stdin, which interrupts the build there (its record still comes back); a
//! killed front end takes `ssh` with it (parent-death signal), and the build host ends the
//! build when its session ends, so no VM outlives the session.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contractor_protocol::build::BuildEvent;
use contractor_protocol::error::ErrorObject;
use contractor_protocol::error::ToolCode;
use contractor_protocol::hosted::{
    FollowedLine, HostedRequest, HOSTED_COMMAND, RECORD_OVERHEAD_BYTES,
};
use contractor_protocol::result::{BuildCode, BuildResult, ErrorInfo, Outcome};
use contractor_protocol::PROTOCOL_VERSION;

use crate::build::{self, BuildError, BuildOptions, BuildReport, PendingRelease};
use crate::display::Display;
/// This release, as `contractor --version` names it: a build host must run the same.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");
use crate::{lock, paths, source, spec};

/// The executable the build host runs for a hosted build (found on its `PATH`;
/// `contractor` and the tools it composes are taken from beside it).
pub const REMOTE_TOOL: &str = "contractor-host";

/// The environment variable naming the `ssh` program to use (default `ssh`).
pub const SSH_ENV: &str = "CONTRACTOR_SSH";

/// How long `ssh` may take to connect.
pub const CONNECT_TIMEOUT_SECS: u32 = 10;

/// A build host that stops answering is given up after this many seconds (ssh's
/// keep-alives: 3 unanswered, 5 s apart).
pub const KEEPALIVE_SECS: u32 = 5;

/// After Ctrl-C, how long the build host has to end the build and send its record back
/// before the session is cut.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(20);

/// A build host: `[ssh://][user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildHost {
    /// The login name, when given (else ssh's own choice: its config, then the local user).
    pub user: Option<String>,
    /// The host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// The port, when given.
    pub port: Option<u16>,
}

/// What a build host name may look like, for error messages.
pub const HOST_FORM: &str = "[ssh://][user@]host[:port], for example builder@big-box or \
ssh://ci@10.0.0.5:2222 (user: letters, digits, '.', '_', '-'; host: a DNS name, an IPv4 \
address or an [IPv6] address)";

impl BuildHost {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<BuildHost, String> {
        let rest = text.strip_prefix("ssh://").unwrap_or(text);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (user, rest) = match rest.rsplit_once('@') {
            Some((user, rest)) => (Some(user), rest),
            None => (None, rest),
        };
        if let Some(user) = user {
            let valid = !user.is_empty()
                && user.len() <= 64
                && !user.starts_with('-')
                && user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid {
                return Err(format!("the user {user:?} is not a valid login name"));
            }
        }
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (address, after) = inner
                .split_once(']')
                .ok_or_else(|| format!("{rest:?} opens an [IPv6] address but does not close it"))?;
            if address.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{address:?} is not an IPv6 address"));
            }
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| format!("{after:?} after the address is not :port"))?,
                ),
            };
            (address.to_string(), port)
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (rest.to_string(), None),
            }
        };
        let port = match port {
            None => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("the port {port:?} is not a number from 1 to 65535"))?,
            ),
        };
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && !host.starts_with('-')
            && !host.starts_with('.')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b));
        if !name_ok && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "the host {host:?} is not a host name or an address"
            ));
        }
        Ok(BuildHost {
            user: user.map(String::from),
            host,
            port,
        })
    }

    /// The `ssh` command that runs `command` (the remote tool's arguments) on this host.
    pub fn ssh(&self, command: &[&str]) -> Command {
        let program = std::env::var_os(SSH_ENV)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "ssh".into());
        let mut ssh = Command::new(program);
        ssh.args(["-T", "-e", "none", "-o", "BatchMode=yes"])
            .arg(format!("-oConnectTimeout={CONNECT_TIMEOUT_SECS}"))
            .arg(format!("-oServerAliveInterval={KEEPALIVE_SECS}"))
            .arg("-oServerAliveCountMax=3");
        if let Some(path) = control_path(self) {
            // One connection per host, shared by every session and probe, and kept
            // `PERSIST_SECS` after the last ends.
            ssh.arg("-oControlMaster=auto")
                .arg(format!("-oControlPath={path}"))
                .arg(format!("-oControlPersist={PERSIST_SECS}"));
        }
        if let Some(port) = self.port {
            ssh.arg("-p").arg(port.to_string());
        }
        if let Some(user) = &self.user {
            ssh.arg("-l").arg(user);
        }
        ssh.arg("--").arg(&self.host).args(command);
        ssh
    }
}

/// How long the shared connection to a build host stays open after its last session ends
/// (ssh's `ControlPersist`).
pub const PERSIST_SECS: u32 = 120;

/// The longest control socket path used: ssh binds it with a 17-character temporary suffix
/// first, and a Unix socket's path holds at most 107 bytes.
const MAX_CONTROL_PATH: usize = 90;

/// Contractor's directory for sockets and the line: `$XDG_RUNTIME_DIR/contractor`, else
/// the data directory.
pub fn runtime_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .map(|d| d.join("contractor"))
        .or_else(|| paths::data_dir().ok())
}

/// The directory of the shared connections' sockets, `<runtime dir>/ssh` (see
/// [`runtime_dir`]).
pub fn control_dir() -> Option<PathBuf> {
    private_dir(&runtime_dir()?.join("ssh"))
}

/// `dir`, made if missing (its parents world-readable, itself mode 0700), when it is a
/// directory (not a link) of this user's that nobody else may enter: a socket or ticket
/// another user could place there would be trusted.
pub fn private_dir(dir: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent() {
        paths::create_dir_world_readable(parent).ok()?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let meta = std::fs::symlink_metadata(dir).ok()?;
    let own =
        meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o077 == 0;
    own.then(|| dir.to_path_buf())
}

/// The control socket of `host`'s shared connection (named by a digest of `[user@]host[:port]`),
/// or none when its path would be too long or not plain enough for ssh's option syntax: then
/// each ssh connects on its own.
fn control_path(host: &BuildHost) -> Option<String> {
    use sha2::Digest;
    let dir = control_dir()?;
    let digest = sha2::Sha256::digest(host.to_string().as_bytes());
    let name: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path = dir.join(name).into_os_string().into_string().ok()?;
    let plain = path
        .chars()
        .all(|c| !c.is_whitespace() && !c.is_control() && !"%\"'\\".contains(c));
    (plain && path.len() <= MAX_CONTROL_PATH).then_some(path)
}

impl std::fmt::Display for BuildHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        match (self.host.contains(':'), self.port) {
            (true, Some(port)) => write!(f, "[{}]:{port}", self.host),
            (false, Some(port)) => write!(f, "{}:{port}", self.host),
            (_, None) => f.write_str(&self.host),
        }
    }
}

/// The user's configuration file: `$CONTRACTOR_CONFIG`, else
/// `$XDG_CONFIG_HOME/contractor/config.toml`, else `~/.config/contractor/config.toml`.
pub fn config_file() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("CONTRACTOR_CONFIG")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("contractor/config.toml")))
        .or_else(|| var("HOME").map(|d| d.join(".config/contractor/config.toml")))
}

/// The most bytes of the configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The most build hosts a configuration or command line may name.
pub const MAX_HOSTS: usize = 64;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    host: Option<HostTable>,
    hosts: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HostTable {
    name: String,
}

/// The build hosts the user's configuration names (`[host] name = "…"`, or `hosts =
/// ["…", …]`), none when there is no configuration file.
pub fn configured_hosts() -> Result<Vec<BuildHost>, String> {
    let Some(path) = config_file() else {
        return Ok(Vec::new());
    };
    let text = match source::read_regular(&path, MAX_CONFIG_BYTES) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(format!("cannot read {}: {err}", path.display())),
    };
    let text =
        String::from_utf8(text).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let config: Config =
        toml::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))?;
    let names = match (config.host, config.hosts) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{}: name either [host] name or hosts, not both",
                path.display()
            ))
        }
        (Some(table), None) => vec![table.name],
        (None, Some(hosts)) => hosts,
        (None, None) => Vec::new(),
    };
    let field = |i: usize| match names.len() {
        1 => "the build host".to_string(),
        _ => format!("hosts[{i}]"),
    };
    if names.len() > MAX_HOSTS {
        return Err(format!(
            "{}: {} build hosts; at most {MAX_HOSTS} are accepted",
            path.display(),
            names.len()
        ));
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            BuildHost::parse(name).map_err(|why| {
                format!(
                    "{}: {} {name:?}: {why}; a build host is {HOST_FORM}",
                    path.display(),
                    field(i)
                )
            })
        })
        .collect()
}

/// The longest a build host may take to answer how much room it has.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The most bytes of a probe's answer read.
const MAX_PROBE_BYTES: u64 = 64 * 1024;

/// What one build host said of its room for a build of a given shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// How many more builds of that shape fit there now.
    pub builds: u64,
    /// Its free memory, in MiB.
    pub free_memory_mib: u64,
    /// Its CPUs.
    pub cpus: u32,
    /// Contractor VMs running there.
    pub running: u32,
}

impl std::fmt::Display for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "room for {} more build(s) ({} MiB free, {} CPUs, {} Contractor VM(s) running)",
            self.builds, self.free_memory_mib, self.cpus, self.running
        )
    }
}

/// What a probe of one build host found: its room, or why it cannot take the build.
pub type Probe = Result<Room, String>;

/// Asks each of `hosts` (`contractor-vm capacity` over its shared connection, all at once)
/// how many builds of `cpus` CPUs and `memory_mib` MiB it has room for; one answer per
/// host, in order, an error saying why for one that cannot be reached, runs another
/// release, or does not answer within [`PROBE_TIMEOUT`].
pub fn probe_all(hosts: &[BuildHost], cpus: u32, memory_mib: u64) -> Vec<Probe> {
    let (tx, rx) = mpsc::channel::<(usize, Probe)>();
    let pids = Arc::new(Mutex::new(Vec::<u32>::new()));
    for (i, host) in hosts.iter().enumerate() {
        let (tx, host, pids) = (tx.clone(), host.clone(), pids.clone());
        std::thread::spawn(move || {
            let _ = tx.send((i, probe(&host, cpus, memory_mib, &pids)));
        });
    }
    drop(tx);
    let mut probes: Vec<Option<Probe>> = vec![None; hosts.len()];
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while probes.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, probe)) => probes[i] = Some(probe),
            Err(_) => break,
        }
    }
    for pid in pids.lock().map(|p| p.clone()).unwrap_or_default() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    probes
        .into_iter()
        .map(|probe| {
            probe.unwrap_or_else(|| Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())))
        })
        .collect()
}

/// Asks `host` for its capacity; `pids` gets the ssh process while it runs.
fn probe(host: &BuildHost, cpus: u32, memory_mib: u64, pids: &Mutex<Vec<u32>>) -> Probe {
    use contractor_protocol::hosted::{room, CapacityReport};
    let mut ssh = host.ssh(&["contractor-vm", "capacity", "--json-errors"]);
    ssh.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = crate::tools::start(&mut ssh).map_err(|e| format!("cannot run ssh: {e}"))?;
    if let Ok(mut pids) = pids.lock() {
        pids.push(child.id());
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_PROBE_BYTES).read_to_end(&mut out);
    }
    if let Some(stderr) = child.stderr.take() {
        let _ = stderr.take(MAX_PROBE_BYTES).read_to_end(&mut err);
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for ssh: {e}"))?;
    let said = String::from_utf8_lossy(&err);
    let said = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    let first = out.split(|b| *b == b'\n').next().unwrap_or_default();
    match serde_json::from_slice::<CapacityReport>(first) {
        Ok(CapacityReport::Capacity {
            contractor,
            version,
            ..
        }) if contractor != RELEASE || version != PROTOCOL_VERSION => Err(format!(
            "it runs contractor {contractor} (protocol {version}), this is contractor {RELEASE} (protocol {PROTOCOL_VERSION}): install one release on both"
        )),
        Ok(CapacityReport::Capacity {
            free_memory_mib,
            cpus: host_cpus,
            running,
            ..
        }) => Ok(Room {
            builds: room(free_memory_mib, host_cpus, running, cpus, memory_mib),
            free_memory_mib,
            cpus: host_cpus,
            running,
        }),
        Err(_) => match serde_json::from_slice::<ErrorObject>(first) {
            Ok(error) => Err(format!("contractor-vm failed there: {}", error.chain.join(": "))),
            Err(_) => Err(match status.code() {
                Some(255) => format!("cannot be reached: {said}"),
                Some(127) => format!("contractor-vm is not on its PATH: install Contractor {RELEASE} there"),
                code => format!(
                    "no capacity answer (ssh {}){}",
                    code.map_or("killed".to_string(), |c| format!("exit {c}")),
                    if said.is_empty() { String::new() } else { format!(": {said}") }
                ),
            }),
        },
    }
}

/// The sha256 of the file at `path`, in lowercase hex.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path)?;
    let mut hash = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hash)?;
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Why a remote build failed, as the record's error.
fn host_error(chain: Vec<String>) -> ErrorInfo {
    ErrorInfo {
        code: BuildCode::BuildHost.as_str().into(),
        chain,
    }
}

/// Runs one build of `spec` (read from `file`) on `host`. The same outcomes as
/// [`build::build`]: a failure before the record exists is an error, everything after it a
/// result in the local record. Call it from the main thread (`ssh` dies with it).
pub fn build_on(
    host: &BuildHost,
    spec: &spec::BuildSpec,
    file: &Path,
    options: &BuildOptions,
    ticket: Option<crate::fleet::Ticket>,
    display: &Display,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let started_on = std::time::SystemTime::now();
    let store_root = paths::checked_store_dir(&spec.project_dir).map_err(BuildError::StoreDir)?;
    build::close_abandoned_records(&store_root);
    let id = build::new_build_id();
    let record = store_root.join("builds").join(&id);
    paths::create_dir_world_readable(&record).map_err(|source| BuildError::Record {
        path: record.clone(),
        source,
    })?;
    let close = |err: BuildError| build::close_failed_record(&record, &id, started, err);
    let spec_text = std::fs::read_to_string(file)
        .map_err(|source| BuildError::Record {
            path: file.to_path_buf(),
            source,
        })
        .map_err(close)?;
    let lock_path = spec.project_dir.join(lock::LOCK_FILE);
    let lock_text = match spec.lock {
        Some(_) => Some(
            source::read_regular(&lock_path, lock::MAX_LOCK_BYTES)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .map_err(|source| BuildError::Record {
                    path: lock_path.clone(),
                    source,
                })
                .map_err(close)?,
        ),
        None => None,
    };
    let tar = record.join("source.tar");
    let packed = source::pack(&spec.project_dir, &tar)
        .map_err(BuildError::Source)
        .map_err(close)?;
    display.event(&BuildEvent::Started {
        version: PROTOCOL_VERSION,
        id: id.clone(),
        record: record.clone(),
    });
    for warning in &packed.warnings {
        display.warning(warning);
    }
    build::update_latest(&store_root, &id);
    let owner_file = build::write_owner(&record).map_err(close)?;
    let request = HostedRequest {
        version: PROTOCOL_VERSION,
        contractor: RELEASE.into(),
        id: id.clone(),
        project: crate::paths::project_key(&spec.project_dir),
        spec: spec_text,
        lock: lock_text,
        source_entries: packed.entries as u64,
        source_bytes: packed.bytes,
        source_sha256: sha256_of(&tar).ok(),
        accel: options.accel,
        snapshot: options.snapshot,
        offline: options.offline,
        uri: None,
    };
    let limit = spec
        .max_artifacts_bytes
        .saturating_add(spec.max_log_bytes)
        .saturating_add(RECORD_OVERHEAD_BYTES);
    let session = Session::start(host, &request, &tar);
    // The build host releases its VM after the record is sent: waited for after the
    // summary, as a local build's release is.
    let mut release = PendingRelease::default();
    let ran = match session {
        Ok(mut session) => {
            let ran = session.follow(host, &record, limit, ticket, display);
            release = PendingRelease::later(move || session.end());
            ran
        }
        Err(err) => Err(RemoteEnd::Failed(host_error(vec![format!(
            "cannot run ssh for {host}: {err}"
        )]))),
    };
    let mut result = result_of(ran, host, &record);
    result.id = id;
    result.duration_secs = started.elapsed().as_secs_f64();
    build::write_result(&record, &result);
    sign_here(host, spec, options, &record, &result, started_on, display);
    let _ = std::fs::remove_file(&owner_file);
    display.event(&BuildEvent::Finished {
        result: result.clone(),
    });
    Ok(BuildReport {
        result,
        kept: None,
        release,
    })
}

/// The result of a build on `host` whose session ended so, its record in `record` (its
/// `id` and `duration_secs` are the caller's to set).
fn result_of(ran: Result<BuildResult, RemoteEnd>, host: &BuildHost, record: &Path) -> BuildResult {
    let mut result = BuildResult {
        version: PROTOCOL_VERSION,
        id: String::new(),
        outcome: Outcome::Infrastructure,
        exit_code: None,
        duration_secs: 0.0,
        log: record.join("build.log"),
        console_log: record.join("console.log"),
        artifacts: crate::records::stored_artifacts(record),
        refused_hosts: Vec::new(),
        refused_offline: Vec::new(),
        upstream_failures: Vec::new(),
        limit: None,
        error: None,
        host: Some(host.to_string()),
    };
    match ran {
        Ok(there) => {
            result.outcome = there.outcome;
            result.exit_code = there.exit_code;
            result.limit = there.limit;
            result.error = there.error;
            result.refused_hosts = there.refused_hosts;
            result.refused_offline = there.refused_offline;
        }
        Err(RemoteEnd::Interrupted(signal)) => {
            result.outcome = Outcome::Interrupted;
            result.error = Some(ErrorInfo {
                code: BuildCode::Interrupted.as_str().into(),
                chain: vec![format!(
                    "{signal} ended the session with the build host {host} before its record came back"
                )],
            });
        }
        Err(RemoteEnd::Failed(error)) => result.error = Some(error),
    }
    result
}

/// Signs the provenance of a build whose script ran on `host`, here, after its record came
/// back: the build host never holds the key.
fn sign_here(
    host: &BuildHost,
    spec: &spec::BuildSpec,
    options: &BuildOptions,
    record: &Path,
    result: &BuildResult,
    started_on: std::time::SystemTime,
    display: &Display,
) {
    if !crate::provenance::ran_script(result.outcome, result.exit_code) {
        return;
    }
    let host_name = host.to_string();
    let facts = crate::provenance::Facts {
        id: &result.id,
        spec,
        accel: options.accel,
        boot: match options.snapshot {
            true => "on the build host: restored from a snapshot if it keeps one, else cold".into(),
            false => "cold".into(),
        },
        offline: options.offline,
        image: None,
        host: Some(&host_name),
        started_on,
        finished_on: std::time::SystemTime::now(),
        outcome: result.outcome,
        exit_code: result.exit_code,
        rebuild_of: None,
        cache_restored: None,
    };
    if let Err(err) = crate::provenance::write_signed(record, &facts) {
        display.warning(&format!(
            "cannot write the signed provenance: {}",
            contractor_protocol::result::joined_chain(&err)
        ));
    }
}

/// How a session ended without a complete record.
enum RemoteEnd {
    /// Ctrl-C or SIGTERM here.
    Interrupted(&'static str),
    /// The build host failed, refused, or went away.
    Failed(ErrorInfo),
}

impl From<ErrorInfo> for RemoteEnd {
    fn from(error: ErrorInfo) -> RemoteEnd {
        RemoteEnd::Failed(error)
    }
}

/// One `ssh … contractor-host build` session.
struct Session {
    child: Child,
    /// The build host's stream, for `record follow` to read.
    stdout: Option<ChildStdout>,
    /// Dropping (or sending on) it closes the session's stdin.
    close: Option<mpsc::Sender<()>>,
    /// The build host's answer whether it needs the source's bytes, for the writer.
    need: Option<mpsc::Sender<bool>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    interrupted: Arc<Mutex<Option<&'static str>>>,
    signals: Option<signal_hook::iterator::Handle>,
}

impl Session {
    /// Starts `ssh` and, on a thread, sends it `request` and the source `tar`, then holds
    /// its stdin open until [`Session::end`] or an interruption.
    fn start(host: &BuildHost, request: &HostedRequest, tar: &Path) -> std::io::Result<Session> {
        let mut ssh = host.ssh(&[REMOTE_TOOL, HOSTED_COMMAND]);
        ssh.stdin(Stdio::piped()).stdout(Stdio::piped());
        // Its own process group: Ctrl-C reaches this process, which ends the session in
        // order, not ssh, which would cut it.
        std::os::unix::process::CommandExt::process_group(&mut ssh, 0);
        let mut child = crate::tools::start(&mut ssh)?;
        let stdout = child.stdout.take();
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
        let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut source = std::fs::File::open(tar)?;
        let (close, closed) = mpsc::channel::<()>();
        let (need, needed) = mpsc::channel::<bool>();
        let ask = request.source_sha256.is_some();
        let writer = std::thread::spawn(move || {
            stdin.write_all(&line)?;
            stdin.flush()?;
            // With a digest the build host says whether it has that source already.
            if !ask || needed.recv().unwrap_or(false) {
                std::io::copy(&mut source, &mut stdin)?;
                stdin.flush()?;
            }
            // Held open until told (or until the session is dropped).
            let _ = closed.recv();
            drop(stdin);
            Ok(())
        });
        let interrupted = Arc::new(Mutex::new(None));
        let mut session = Session {
            child,
            stdout,
            close: Some(close),
            need: Some(need),
            writer: Some(writer),
            interrupted: interrupted.clone(),
            signals: None,
        };
        session.signals = watch_signals(
            session.close.clone(),
            interrupted,
            nix::unistd::Pid::from_raw(session.child.id() as i32),
        );
        Ok(session)
    }

    /// The signal that interrupted the session, if any.
    fn interruption(&self) -> Option<&'static str> {
        self.interrupted.lock().ok().and_then(|s| *s)
    }

    /// Follows the session to its end: the store's confined `record follow` reads the build
    /// host's stream (this process never does), checks it and receives the record into
    /// `record` (at most `limit` bytes); this process shows the checked events it writes on
    /// and returns the build host's result.
    fn follow(
        &mut self,
        host: &BuildHost,
        record: &Path,
        limit: u64,
        ticket: Option<crate::fleet::Ticket>,
        display: &Display,
    ) -> Result<BuildResult, RemoteEnd> {
        // Held until the VM runs there (and counts in the host's room), then the next in
        // line may go.
        let mut ticket = ticket;
        let Some(stream) = self.stdout.take() else {
            return Err(host_error(vec!["ssh has no stdout".into()]).into());
        };
        let (mut store, mut answers) =
            crate::records::follow(stream, record, limit).map_err(|err| {
                let mut chain = vec![format!("cannot follow the build on {host}")];
                chain.extend(contractor_protocol::result::error_chain(&err));
                RemoteEnd::Failed(host_error(chain))
            })?;
        let ended = self.followed(host, &mut answers, &mut ticket, display);
        if ended.is_err() {
            let _ = store.kill();
        }
        answers.drain();
        let _ = store.wait();
        ended
    }

    /// Reads what `record follow` writes: the build host's checked hello, the build's
    /// events (shown), its result, and the store's answer once the record is received.
    fn followed(
        &mut self,
        host: &BuildHost,
        answers: &mut crate::tools::Answers,
        ticket: &mut Option<crate::fleet::Ticket>,
        display: &Display,
    ) -> Result<BuildResult, RemoteEnd> {
        let mut finished = None;
        loop {
            let line = match answers.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => {
                    let why = "contractor-store record follow ended without an answer";
                    return Err(self.lost(host, Some(why.into())));
                }
                Err(err) => return Err(self.lost(host, Some(err.to_string()))),
            };
            let value: serde_json::Value = serde_json::from_slice(&line).map_err(|err| {
                host_error(vec![format!(
                    "contractor-store record follow wrote bad JSON: {err}"
                )])
            })?;
            let kind = value["type"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "host_hello" | "host_failed" | "host_source" => {
                    match serde_json::from_value(value) {
                        Ok(line) => self.host_said(host, line)?,
                        Err(err) => {
                            return Err(host_error(vec![format!("bad {kind:?} line: {err}")]).into())
                        }
                    }
                }
                "error" => return Err(self.store_failed(host, value)),
                "record_received" => {
                    return finished.ok_or_else(|| {
                        self.lost(
                            host,
                            Some("the record came before the build finished".into()),
                        )
                    })
                }
                _ => match serde_json::from_value::<BuildEvent>(value) {
                    // This front end announced the build, and announces its end.
                    Ok(BuildEvent::Started { .. }) => {}
                    Ok(event @ BuildEvent::VmStarted { .. }) => {
                        drop(ticket.take());
                        display.event(&event);
                    }
                    Ok(BuildEvent::Finished { result }) => finished = Some(result),
                    Ok(event) => display.event(&event),
                    Err(err) => {
                        return Err(host_error(vec![format!("bad {kind:?} event: {err}")]).into())
                    }
                },
            }
        }
    }

    /// The build host's hello (its release must be this one) or its failure.
    fn host_said(&mut self, host: &BuildHost, line: FollowedLine) -> Result<(), RemoteEnd> {
        match line {
            FollowedLine::HostHello {
                version,
                contractor,
            } if version == PROTOCOL_VERSION && contractor == RELEASE => Ok(()),
            FollowedLine::HostHello {
                version,
                contractor,
            } => Err(host_error(vec![format!(
                "the build host {host} runs contractor {contractor} (protocol {version}), \
                 this is contractor {RELEASE} (protocol {PROTOCOL_VERSION}): install one release on both"
            )])
            .into()),
            FollowedLine::HostSource { need } => {
                if let Some(writer) = self.need.take() {
                    let _ = writer.send(need);
                }
                Ok(())
            }
            FollowedLine::HostFailed { code, chain: said } => {
                let mut chain = vec![format!("the build host {host} could not run the build")];
                chain.extend(said);
                Err(RemoteEnd::Failed(ErrorInfo { code, chain }))
            }
        }
    }

    /// The store's own error object: the stream broke off or broke the protocol (the build
    /// host's failure), or the record cannot be kept here.
    fn store_failed(&mut self, host: &BuildHost, value: serde_json::Value) -> RemoteEnd {
        let error = match serde_json::from_value::<ErrorObject>(value) {
            Ok(error) => error,
            Err(err) => return host_error(vec![format!("bad error line: {err}")]).into(),
        };
        match error.code {
            ToolCode::HostedCut => self.lost(host, None),
            ToolCode::HostedStream | ToolCode::RecordCut => {
                self.lost(host, Some(error.chain.join(": ")))
            }
            _ => {
                let mut chain = vec![format!(
                    "the record from the build host {host} cannot be kept"
                )];
                chain.extend(error.chain);
                RemoteEnd::Failed(host_error(chain))
            }
        }
    }

    /// The session ended (or broke) before the record was complete: an interruption here,
    /// or the build host's failure, with `why` if the stream said more.
    fn lost(&mut self, host: &BuildHost, why: Option<String>) -> RemoteEnd {
        if let Some(signal) = self.interruption() {
            return RemoteEnd::Interrupted(signal);
        }
        drop(self.close.take());
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        let how = match status.and_then(|s| s.code()) {
            Some(255) => {
                "ssh could not reach it or lost the connection (exit 255; its message is above)"
                    .to_string()
            }
            Some(127) => format!(
                "{REMOTE_TOOL} is not on its PATH (exit 127): install Contractor {RELEASE} there"
            ),
            Some(code) => format!("ssh exited with {code}"),
            None => "ssh was killed".to_string(),
        };
        let mut chain = vec![format!(
            "the build host {host} went away before the build finished: {how}"
        )];
        chain.extend(why);
        RemoteEnd::Failed(host_error(chain))
    }

    /// Closes the session and waits for ssh.
    fn end(mut self) {
        if let Some(handle) = self.signals.take() {
            handle.close();
        }
        drop(self.close.take());
        drop(self.need.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        let _ = self.child.wait();
    }
}

/// Watches for Ctrl-C and SIGTERM: the first closes the session's stdin (the build host
/// then interrupts the build and sends its record), and cuts the session if it has not
/// ended [`INTERRUPT_GRACE`] later; the second cuts it at once.
fn watch_signals(
    close: Option<mpsc::Sender<()>>,
    interrupted: Arc<Mutex<Option<&'static str>>>,
    ssh: nix::unistd::Pid,
) -> Option<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("contractor: warning: cannot watch for Ctrl-C ({err})");
            return None;
        }
    };
    let handle = signals.handle();
    std::thread::spawn(move || {
        let mut close = close;
        for number in signals.forever() {
            let name = if number == SIGINT {
                "Ctrl-C"
            } else {
                "SIGTERM"
            };
            let first = interrupted
                .lock()
                .map(|mut s| {
                    let first = s.is_none();
                    s.get_or_insert(name);
                    first
                })
                .unwrap_or(false);
            if first {
                if let Some(close) = close.take() {
                    let _ = close.send(());
                }
                std::thread::spawn(move || {
                    std::thread::sleep(INTERRUPT_GRACE);
                    let _ = nix::sys::signal::kill(ssh, nix::sys::signal::Signal::SIGTERM);
                });
            } else {
                let _ = nix::sys::signal::kill(ssh, nix::sys::signal::Signal::SIGTERM);
            }
        }
    });
    Some(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_hosts_parse_in_every_documented_form() {
        let host = |user: Option<&str>, name: &str, port: Option<u16>| BuildHost {
            user: user.map(String::from),
            host: name.into(),
            port,
        };
        assert_eq!(
            BuildHost::parse("ci@big-box"),
            Ok(host(Some("ci"), "big-box", None))
        );
        assert_eq!(
            BuildHost::parse("ssh://ci@10.0.0.5:2222"),
            Ok(host(Some("ci"), "10.0.0.5", Some(2222)))
        );
        assert_eq!(BuildHost::parse("big-box"), Ok(host(None, "big-box", None)));
        assert_eq!(
            BuildHost::parse("ssh://[fd00::1]:22"),
            Ok(host(None, "fd00::1", Some(22)))
        );
        assert_eq!(
            BuildHost::parse("ssh://[fd00::1]:22").map(|h| h.to_string()),
            Ok("[fd00::1]:22".to_string())
        );
        for bad in [
            "-oProxyCommand=x",
            "ci@",
            "@host",
            "a b@host",
            "host:0",
            "host:x",
            "",
            "[fd00::1",
            "ci@-host",
        ] {
            assert!(BuildHost::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
