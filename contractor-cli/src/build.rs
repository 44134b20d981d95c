//! `contractor build`: one build, start to finish.
//!
//! Read the spec, make sure the image exists, create the build record, pack the source,
//! start the store and the proxy (in this process, on loopback, ephemeral ports), create
//! the VM (autodestroyed with this process's libvirt connection, so a killed `contractor`
//! leaves no VM), run the job, destroy the VM, write `result.json`, print the summary.
//! Every outcome after the record exists, failures included, ends in `result.json`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use contractor_protocol::agent::{Job, Keep};
use contractor_protocol::build::BuildEvent;
use contractor_protocol::proxy::{Decision, Verdict};
use contractor_protocol::result::{BuildResult, ErrorInfo, Limit, Outcome};
use contractor_protocol::run::{RunEvent, RunRequest};
use contractor_protocol::vm::{Accel, VmSpec};
use contractor_protocol::PROTOCOL_VERSION;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::display::Display;
use crate::image;
use crate::paths;
use crate::source;
use crate::spec::BuildSpec;

/// Options of `contractor build` beyond the spec.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// libvirt URI.
    pub uri: String,
    /// Accelerator.
    pub accel: Accel,
    /// When to keep the VM for `contractor shell` instead of destroying it.
    pub keep: Option<Keep>,
}

/// A VM kept after its build for `contractor shell`: `vm.json` in the build record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptVm {
    /// The VM's name.
    pub name: String,
    /// The libvirt connection it runs under.
    pub uri: String,
    /// The host end of its control channel.
    pub control_socket: PathBuf,
}

/// The file in a build record that names its kept VM.
pub const KEPT_VM_FILE: &str = "vm.json";

/// Failures before the build could run. After the VM starts, failures are outcomes.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The image could not be built or found.
    #[error("cannot prepare the builder image")]
    Image(#[source] image::ImageError),
    /// The build record could not be created.
    #[error("cannot create the build record {path}")]
    Record {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source could not be packed.
    #[error("cannot pack the source")]
    Source(#[source] source::SourceError),
    /// The build cache could not be prepared.
    #[error("cannot prepare the build cache in {path}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A local service could not start.
    #[error("cannot start the {0}")]
    Service(&'static str, #[source] std::io::Error),
    /// The data directory is unknown.
    #[error("{0}")]
    DataDir(String),
    /// The project's store directory is not one Contractor may write into.
    #[error("cannot keep the build record in this project")]
    StoreDir(#[source] paths::StoreDirError),
}

impl BuildError {
    /// How a build that failed with this error ended, and its code in `result.json`: `failed`
    /// when the project is at fault, `infrastructure` otherwise.
    pub fn outcome(&self) -> (Outcome, &'static str) {
        match self {
            BuildError::Source(source::SourceError::TooManyEntries { .. }) => {
                (Outcome::Failed, "source_too_many_entries")
            }
            BuildError::Source(err) if err.is_project_error() => {
                (Outcome::Failed, "source_unreadable")
            }
            BuildError::Source(_) => (Outcome::Infrastructure, "source_pack"),
            BuildError::Image(_) => (Outcome::Infrastructure, "image"),
            BuildError::Record { .. } => (Outcome::Infrastructure, "record"),
            BuildError::Cache { .. } => (Outcome::Infrastructure, "cache_prepare"),
            BuildError::Service(..) => (Outcome::Infrastructure, "service_start"),
            BuildError::DataDir(_) => (Outcome::Infrastructure, "data_dir"),
            BuildError::StoreDir(_) => (Outcome::Failed, "store_dir"),
        }
    }
}

/// Closes the record of build `id` that failed with `err` before its VM ran: writes its
/// `result.json` (the error's outcome and code, its chain) and drops its owner file.
/// Returns `err` for the caller to report.
fn close_failed_record(record: &Path, id: &str, started: Instant, err: BuildError) -> BuildError {
    let (outcome, code) = err.outcome();
    let result = BuildResult {
        version: PROTOCOL_VERSION,
        id: id.to_string(),
        outcome,
        exit_code: None,
        duration_secs: started.elapsed().as_secs_f64(),
        log: record.join("build.log"),
        console_log: record.join("console.log"),
        artifacts: Vec::new(),
        refused_hosts: Vec::new(),
        limit: None,
        error: Some(ErrorInfo::from_error(code, &err)),
    };
    let path = record.join("result.json");
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    if let Err(write) = std::fs::write(&path, text + "\n") {
        eprintln!("contractor: cannot write {}: {write}", path.display());
    }
    let _ = std::fs::remove_file(record.join(OWNER_FILE));
    err
}

/// What the build produced.
pub struct BuildReport {
    /// The record, as written to result.json.
    pub result: BuildResult,
    /// The VM kept for a shell, if any (also in the record's `vm.json`).
    pub kept: Option<KeptVm>,
}

/// Runs one build.
pub async fn build(
    spec: &BuildSpec,
    options: &BuildOptions,
    display: &Display,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let image =
        tokio::task::block_in_place(|| image::ensure(&spec.image)).map_err(BuildError::Image)?;

    let store_root = paths::checked_store_dir(&spec.project_dir).map_err(BuildError::StoreDir)?;
    close_abandoned_records(&store_root);
    let id = new_build_id();
    let record = store_root.join("builds").join(&id);
    paths::create_dir_world_readable(&record).map_err(|source| BuildError::Record {
        path: record.clone(),
        source,
    })?;
    // From here on, every failure also closes the record with a result.json.
    let close = |err: BuildError| close_failed_record(&record, &id, started, err);
    let packed =
        tokio::task::block_in_place(|| source::pack(&spec.project_dir, &record.join("source.tar")))
            .map_err(BuildError::Source)
            .map_err(close)?;
    display.event(&BuildEvent::Started {
        version: PROTOCOL_VERSION,
        id: id.clone(),
        record: record.clone(),
    });
    display.event(&BuildEvent::ImageReady {
        name: spec.image.clone(),
    });
    display.event(&BuildEvent::SourcePacked {
        entries: packed.entries as u64,
        bytes: packed.bytes,
    });
    for warning in &packed.warnings {
        display.warning(warning);
    }
    update_latest(&store_root, &id);
    let owner_file = record.join(OWNER_FILE);
    let owner = serde_json::json!({
        "pid": std::process::id(),
        "start": contractor_vm::owner::process_start(std::process::id()),
    });
    std::fs::write(&owner_file, owner.to_string())
        .map_err(|source| BuildError::Record {
            path: owner_file.clone(),
            source,
        })
        .map_err(close)?;

    let (stop_services, services_stopped) = tokio::sync::watch::channel(false);
    let store_token = contractor_store::generate_token()
        .map_err(|e| BuildError::Service("store", std::io::Error::other(e)))
        .map_err(close)?;
    let cache_job = crate::cache::prepare(
        &store_root,
        &record,
        &id,
        &spec.cache_paths,
        spec.cache_max_bytes,
    )
    .map_err(|source| BuildError::Cache {
        path: record.join("inputs"),
        source,
    })
    .map_err(close)?;
    // The new cache travels through the artifacts; it has its own limit.
    let store_limit = match &cache_job {
        Some(cache) => spec.max_artifacts_bytes.saturating_add(cache.max_bytes),
        None => spec.max_artifacts_bytes,
    };
    let store_addr = start_store(
        &store_root,
        &id,
        &store_token,
        store_limit,
        services_stopped.clone(),
    )
    .await
    .map_err(close)?;
    let refused = Arc::new(Mutex::new(BTreeSet::new()));
    let proxy_addr = start_proxy(
        spec,
        &record.join("proxy.jsonl"),
        refused.clone(),
        services_stopped,
    )
    .await
    .map_err(close)?;

    let log = record.join("build.log");
    let console_log = record.join("console.log");
    let vm_spec = VmSpec {
        name: None,
        image: image.boot(),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_gib: Some(spec.disk_gib),
        accel: options.accel,
        console_log: console_log.clone(),
        work_dir: paths::data_dir()
            .map_err(BuildError::DataDir)
            .map_err(close)?
            .join("vms"),
    };
    let mut env = spec.env.clone();
    env.insert("CONTRACTOR_BUILD_ID".into(), id.clone());
    let job = Job {
        script: spec.script.clone(),
        env,
        source: format!("/builds/{id}/source.tar"),
        artifacts: spec.artifacts.clone(),
        artifacts_dest: format!("/builds/{id}/artifacts/"),
        store_token: Some(store_token),
        cache: cache_job,
        keep: options.keep,
    };

    let limits = RunLimits {
        timeout_secs: spec.timeout.as_secs(),
        max_log_bytes: spec.max_log_bytes,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
    };
    let ran = run_in_vm(
        &options.uri,
        vm_spec,
        job,
        Services {
            proxy: proxy_addr,
            store: store_addr,
        },
        &log,
        limits,
        display.clone(),
    )
    .await;
    let _ = stop_services.send(true);

    let cache_saved = crate::cache::keep(
        &store_root,
        &record,
        &id,
        &spec.cache_paths,
        ran.outcome == Outcome::Success,
    );
    if let Err(err) = &cache_saved {
        eprintln!("contractor: cannot keep the build cache: {err}");
    }
    let mut ran = ran;
    if ran.outcome == Outcome::Success {
        // The host checks what it can know itself: the guest's word is not enough.
        if let Some(pattern) = missing_artifacts(&record.join("artifacts"), &spec.artifacts) {
            ran.outcome = Outcome::Failed;
            ran.error = Some(ErrorInfo {
                code: "artifact_missing".into(),
                chain: vec![format!(
                    "no stored artifact matches the declared artifact {pattern:?} ([build] artifacts), although the guest reported success"
                )],
            });
        }
    }
    let artifacts = collect_artifacts(&record.join("artifacts"));
    let refused_hosts: Vec<String> = refused
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default();
    let result = BuildResult {
        version: PROTOCOL_VERSION,
        id,
        outcome: ran.outcome,
        exit_code: ran.exit_code,
        duration_secs: started.elapsed().as_secs_f64(),
        log,
        console_log,
        artifacts,
        refused_hosts,
        limit: ran.limit,
        error: ran.error.map(|e| ErrorInfo::capped(&e.code, &e.chain)),
    };
    let result_path = record.join("result.json");
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    if let Err(err) = std::fs::write(&result_path, text + "\n") {
        eprintln!("contractor: cannot write {}: {err}", result_path.display());
    }
    let _ = std::fs::remove_file(&owner_file);
    if let Some(kept) = &ran.kept {
        let path = record.join(KEPT_VM_FILE);
        let text = serde_json::to_string_pretty(kept).unwrap_or_default();
        if let Err(err) = std::fs::write(&path, text + "\n") {
            eprintln!("contractor: cannot write {}: {err}", path.display());
        }
    }
    display.event(&BuildEvent::Finished {
        result: result.clone(),
    });
    Ok(BuildReport {
        result,
        kept: ran.kept,
    })
}

/// Where the build's proxy and store listen.
#[derive(Debug, Clone, Copy)]
struct Services {
    proxy: SocketAddr,
    store: SocketAddr,
}

/// The limits `contractor-run` enforces.
#[derive(Debug, Clone, Copy)]
struct RunLimits {
    timeout_secs: u64,
    max_log_bytes: u64,
    /// Named in the messages of the limits the guest reports.
    memory_mib: u64,
    disk_gib: u64,
}

/// How the run in the VM ended.
struct Ran {
    outcome: Outcome,
    exit_code: Option<i32>,
    error: Option<ErrorInfo>,
    limit: Option<Limit>,
    kept: Option<KeptVm>,
}

impl Ran {
    fn failed(outcome: Outcome, code: &str, message: String) -> Ran {
        Ran {
            outcome,
            exit_code: None,
            error: Some(ErrorInfo {
                code: code.into(),
                chain: vec![message],
            }),
            limit: None,
            kept: None,
        }
    }
}

/// Creates the VM, runs the job, destroys the VM. Every failure is an outcome here.
async fn run_in_vm(
    uri: &str,
    vm_spec: VmSpec,
    job: Job,
    services: Services,
    log: &Path,
    limits: RunLimits,
    display: Display,
) -> Ran {
    let infra = |code: &str, err: &(dyn std::error::Error + 'static)| Ran {
        outcome: Outcome::Infrastructure,
        exit_code: None,
        error: Some(contractor_run::host::error_info(code, err)),
        limit: None,
        kept: None,
    };
    if let Err(err) = paths::create_dir_world_readable(&vm_spec.work_dir) {
        return infra("vm_work_dir", &err);
    }
    let uri_owned = uri.to_string();
    // The connection stays open for the VM's lifetime: the VM is created with autodestroy,
    // so if this process dies, libvirt destroys the VM. A VM that may be kept for a shell
    // must outlive this process: it is made without (`contractor-vm reap` removes it when
    // this process died before deciding).
    let keep = job.keep;
    let created = tokio::task::block_in_place(|| {
        let conn = contractor_vm::connect(&uri_owned)?;
        let vm = contractor_vm::create(&conn, &vm_spec, keep.is_none())?;
        Ok::<_, contractor_vm::VmError>((conn, vm))
    });
    let (conn, vm) = match created {
        Ok(created) => created,
        Err(err) => return infra("vm_create", &err),
    };
    tokio::task::block_in_place(|| sweep_overlays(&conn, &vm_spec.work_dir));
    display.event(&BuildEvent::VmStarted {
        name: vm.name.clone(),
        accel: vm.accel.unwrap_or_default(),
    });
    let (Some(control_socket), Some(tunnel_socket)) =
        (vm.control_socket.clone(), vm.tunnel_socket.clone())
    else {
        let _ = tokio::task::block_in_place(|| contractor_vm::destroy_vm(&conn, &vm));
        return Ran::failed(
            Outcome::Infrastructure,
            "vm_channels",
            "libvirt did not report the VM's channel sockets".into(),
        );
    };
    let request_control = control_socket.clone();
    let request = RunRequest {
        version: PROTOCOL_VERSION,
        control_socket,
        tunnel_socket,
        proxy: services.proxy,
        store: services.store,
        log: log.to_path_buf(),
        timeout_secs: limits.timeout_secs,
        boot_timeout_secs: 300,
        max_log_bytes: Some(limits.max_log_bytes),
        memory_mib: Some(limits.memory_mib),
        disk_gib: Some(limits.disk_gib),
        job,
    };
    let (events, mut received) = contractor_run::host::event_channel();
    let printer = tokio::spawn(async move {
        while let Some(event) = received.recv().await {
            let shown = match event {
                RunEvent::AgentReady { agent_version } => BuildEvent::AgentReady { agent_version },
                RunEvent::Phase { phase } => BuildEvent::Phase { phase },
                RunEvent::Output { text } => BuildEvent::Output { text },
                RunEvent::Artifact { path, size } => BuildEvent::Artifact { path, size },
                _ => continue,
            };
            display.event(&shown);
        }
    });
    let finished = tokio::select! {
        finished = contractor_run::run(request, events) => Ok(finished),
        signal = interruption() => Err(signal),
    };
    // A VM is kept only where its agent waits for a shell: after it said done, so not
    // after a limit, an interruption or an infrastructure failure.
    let kept = match (&finished, keep) {
        (
            Ok(RunEvent::Finished {
                outcome,
                limit: None,
                ..
            }),
            Some(keep),
        ) if *outcome == Outcome::Failed
            || (*outcome == Outcome::Success && keep == Keep::Always) =>
        {
            Some(KeptVm {
                name: vm.name.clone(),
                uri: uri.to_string(),
                control_socket: request_control.clone(),
            })
        }
        _ => None,
    };
    // Destroy the VM first: until it is gone, a timed-out script may still hold its
    // output stream open, and with it the event channel.
    // The VM is usually gone already (the agent powers it off); its overlay is not.
    if kept.is_none() {
        if let Err(err) = tokio::task::block_in_place(|| contractor_vm::destroy_vm(&conn, &vm)) {
            eprintln!("contractor: cannot destroy VM {}: {err}", vm.name);
        }
    }
    drop(conn);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), printer).await;
    match finished {
        Ok(RunEvent::Finished {
            outcome,
            exit_code,
            error,
            limit,
            ..
        }) => Ran {
            outcome,
            exit_code,
            error,
            limit,
            kept,
        },
        Ok(_) => Ran::failed(
            Outcome::Infrastructure,
            "run",
            "contractor-run ended without a finished event".into(),
        ),
        Err(signal) => Ran::failed(
            Outcome::Interrupted,
            "interrupted",
            format!("the build was interrupted ({signal}); its VM was destroyed"),
        ),
    }
}

/// Resolves when the user interrupts the build (Ctrl-C) or it is asked to stop (SIGTERM),
/// with the signal's name.
async fn interruption() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without signal handling the default actions apply (the process dies and libvirt
        // destroys the VM with its connection).
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "Ctrl-C",
        _ = terminate.recv() => "SIGTERM",
    }
}

/// Starts the build's store: it serves only build `id`'s files, and only to requests with
/// `token` (the guest agent's), within the token's scope.
async fn start_store(
    root: &Path,
    id: &str,
    token: &str,
    max_artifacts_bytes: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<SocketAddr, BuildError> {
    let mut tokens = contractor_store::TokenTable::new();
    tokens
        .insert(id, token)
        .map_err(|e| BuildError::Service("store", std::io::Error::other(e)))?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| BuildError::Service("store", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BuildError::Service("store", e))?;
    let config = contractor_store::StoreConfig {
        root: root.to_path_buf(),
        access_log: false,
        only_build: Some(id.to_string()),
        max_build_bytes: Some(max_artifacts_bytes),
        tokens: Some(tokens),
        ..contractor_store::StoreConfig::new(root.to_path_buf())
    };
    let store = contractor_store::Store::open(&config)
        .map_err(|e| BuildError::Service("store", std::io::Error::other(e.to_string())))?;
    tokio::spawn(store.serve(listener, async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    }));
    Ok(addr)
}

async fn start_proxy(
    spec: &BuildSpec,
    decisions_path: &Path,
    refused: Arc<Mutex<BTreeSet<String>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<SocketAddr, BuildError> {
    let allowlist = contractor_proxy::Allowlist::parse(spec.allow.iter().map(String::as_str))
        .map_err(|e| BuildError::Service("proxy", std::io::Error::other(e.to_string())))?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| BuildError::Service("proxy", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BuildError::Service("proxy", e))?;
    let mut file =
        std::fs::File::create(decisions_path).map_err(|e| BuildError::Service("proxy", e))?;
    let (decisions_tx, mut decisions) = tokio::sync::mpsc::unbounded_channel::<Decision>();
    tokio::spawn(async move {
        while let Some(decision) = decisions.recv().await {
            let _ = contractor_protocol::jsonl::write_line(&mut file, &decision);
            if decision.decision == Verdict::Deny {
                if let Ok(mut refused) = refused.lock() {
                    refused.insert(decision.host.clone());
                }
            }
        }
    });
    let config = contractor_proxy::ProxyConfig::new(allowlist);
    let (_ready_tx, _ready) = oneshot::channel::<()>();
    tokio::spawn(contractor_proxy::serve(
        config,
        listener,
        decisions_tx,
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        },
    ));
    Ok(addr)
}

/// Deletes overlays and build disks left by builds that were killed: those whose VM no
/// longer exists. A file younger than a minute may belong to a build that is creating its VM
/// right now.
fn sweep_overlays(conn: &virt::connect::Connect, work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
            n.strip_suffix(".qcow2")
                .or_else(|| n.strip_suffix(".disk.raw"))
        }) else {
            continue;
        };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60));
        if old
            && contractor_vm::validate_name(name).is_ok()
            && !contractor_vm::lifecycle::exists(conn, name)
        {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The first of the declared artifact `patterns` that nothing stored under `dir` matches. A
/// pattern matches a stored file or a directory it lies in, with the agent's glob semantics
/// relative to the source root (`*` stays within a path component, `**` spans them). The
/// cache upload is not an artifact.
fn missing_artifacts(dir: &Path, patterns: &[String]) -> Option<String> {
    let stored: Vec<PathBuf> = collect_artifacts(dir)
        .into_iter()
        .filter_map(|path| path.strip_prefix(dir).ok().map(Path::to_path_buf))
        .filter(|path| path != Path::new(crate::cache::UPLOAD_NAME))
        .collect();
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    patterns
        .iter()
        .find(|pattern| {
            let Ok(glob) = glob::Pattern::new(pattern.trim_end_matches('/')) else {
                return true;
            };
            !stored.iter().any(|path| {
                path.ancestors()
                    .filter(|p| !p.as_os_str().is_empty())
                    .any(|p| glob.matches_path_with(p, options))
            })
        })
        .cloned()
}

fn collect_artifacts(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => found.push(path),
                _ => {}
            }
        }
    }
    found.sort();
    found
}

/// While a build runs, its record holds this file naming the `contractor` process (pid and
/// start time); it is removed when `result.json` is written.
const OWNER_FILE: &str = "owner.json";

/// Most bytes read of an `owner.json` (ours have about 50).
const MAX_OWNER_BYTES: u64 = 4096;

/// Gives every record whose `contractor` process died without finishing (SIGKILL, power
/// loss) a `result.json` saying the build was interrupted. Records of live builds are left
/// alone.
fn close_abandoned_records(store_root: &Path) {
    let Ok(entries) = std::fs::read_dir(store_root.join("builds")) else {
        return;
    };
    for entry in entries.flatten() {
        // Only real directories: what a project ships there is never followed or opened
        // unless it is a regular file.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let record = entry.path();
        let owner_file = record.join(OWNER_FILE);
        if std::fs::symlink_metadata(record.join("result.json")).is_ok() {
            continue;
        }
        let Ok(text) = source::read_regular(&owner_file, MAX_OWNER_BYTES) else {
            continue;
        };
        let owner: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
        let pid = owner["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
        let alive = pid.is_some_and(|pid| {
            let start = contractor_vm::owner::process_start(pid);
            start.is_some() && start == owner["start"].as_u64()
        });
        if alive {
            continue;
        }
        let id = entry.file_name().to_string_lossy().into_owned();
        let result = BuildResult {
            version: PROTOCOL_VERSION,
            id,
            outcome: Outcome::Interrupted,
            exit_code: None,
            duration_secs: 0.0,
            log: record.join("build.log"),
            console_log: record.join("console.log"),
            artifacts: collect_artifacts(&record.join("artifacts")),
            refused_hosts: Vec::new(),
            limit: None,
            error: Some(ErrorInfo {
                code: "abandoned".into(),
                chain: vec![format!(
                    "the contractor process (pid {}) ended before the build finished; libvirt destroyed its VM",
                    pid.map_or("unknown".to_string(), |p| p.to_string())
                )],
            }),
        };
        let text = serde_json::to_string_pretty(&result).unwrap_or_default();
        if std::fs::write(record.join("result.json"), text + "\n").is_ok() {
            let _ = std::fs::remove_file(&owner_file);
        }
    }
}

/// `latest` → the newest build, so `.contractor/latest/build.log` is always at hand.
fn update_latest(store_root: &Path, id: &str) {
    let link = store_root.join("latest");
    let temp = store_root.join(format!(".latest-{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    if std::os::unix::fs::symlink(Path::new("builds").join(id), &temp).is_ok() {
        let _ = std::fs::rename(&temp, &link);
    }
}

/// `20261125-130501-3f2a9c`: sortable by time, unique across concurrent builds.
fn new_build_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let mut tm: libc::tm = unsafe_zeroed_tm();
    // SAFETY: gmtime_r writes into our tm from a valid time_t.
    unsafe { libc::gmtime_r(&secs, &mut tm) };
    let mut random = [0u8; 3];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut urandom, &mut random);
    }
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}-{}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        image::hex(&random)
    )
}

fn unsafe_zeroed_tm() -> libc::tm {
    // SAFETY: libc::tm is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// `1.2 MiB`
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result_of(record: &Path) -> BuildResult {
        let text = std::fs::read_to_string(record.join("result.json")).expect("result.json");
        serde_json::from_str(&text).expect("a build result")
    }

    #[test]
    fn a_source_that_cannot_be_packed_still_closes_its_record() {
        let project = tempfile::tempdir().expect("tempdir");
        for f in ["a", "b"] {
            std::fs::write(project.path().join(f), "x").expect("write");
        }
        let record = tempfile::tempdir().expect("tempdir");
        let err = source::pack_at_most(project.path(), &record.path().join("source.tar"), 1)
            .map_err(BuildError::Source)
            .expect_err("too many entries");
        let err = close_failed_record(record.path(), "b1", Instant::now(), err);
        assert!(matches!(err, BuildError::Source(_)));
        let result = result_of(record.path());
        assert_eq!(
            (result.id.as_str(), result.outcome),
            ("b1", Outcome::Failed)
        );
        let error = result.error.expect("error");
        assert_eq!(error.code, "source_too_many_entries");
        assert_eq!(error.chain[0], "cannot pack the source");
        assert!(
            error.chain[1].contains("has more than 1 entries"),
            "{error:?}"
        );
    }

    #[test]
    fn a_declared_artifact_is_missing_unless_a_stored_file_or_its_directory_matches() {
        let record = tempfile::tempdir().expect("tempdir");
        let dir = record.path().join("artifacts");
        std::fs::create_dir_all(dir.join("target/debian")).expect("mkdir");
        std::fs::write(dir.join("hello"), "x").expect("write");
        std::fs::write(dir.join("target/debian/a.deb"), "x").expect("write");
        std::fs::write(dir.join(crate::cache::UPLOAD_NAME), "cache").expect("write");
        let check = |patterns: &[&str]| {
            let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
            missing_artifacts(&dir, &patterns)
        };
        assert_eq!(
            check(&["hello", "target/debian/*.deb", "target", "target/*"]),
            None
        );
        assert_eq!(check(&["**/*.deb", "target/**/a.deb", "h?llo"]), None);
        assert_eq!(check(&["hello", "gone"]), Some("gone".into()));
        assert_eq!(
            check(&["*.deb"]),
            Some("*.deb".into()),
            "* stays in one component"
        );
        assert_eq!(
            check(&[crate::cache::UPLOAD_NAME]),
            Some(crate::cache::UPLOAD_NAME.into()),
            "the cache is not an artifact"
        );
        assert_eq!(missing_artifacts(&record.path().join("none"), &[]), None);
    }

    #[test]
    fn a_service_that_cannot_start_is_an_infrastructure_outcome() {
        let record = tempfile::tempdir().expect("tempdir");
        let err = BuildError::Service("store", std::io::Error::other("no port"));
        close_failed_record(record.path(), "b2", Instant::now(), err);
        let result = result_of(record.path());
        assert_eq!(result.outcome, Outcome::Infrastructure);
        let error = result.error.expect("error");
        assert_eq!(error.code, "service_start");
        assert_eq!(error.chain, ["cannot start the store", "no port"]);
    }
}
