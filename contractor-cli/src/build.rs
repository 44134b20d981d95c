//! `contractor build`: one build, start to finish, composed of the tools' processes.
//!
//! Read the spec, make sure the image exists, create the build record, pack the source,
//! start `contractor-store` and `contractor-proxy` (loopback, ephemeral ports, each answers
//! with a `ready` line), have `contractor-vm create --hold` create the VM and hold it for as
//! long as its stdin stays open, feed `contractor-run` the job and show its events, release
//! the VM, stop the services, write `result.json`, print the summary. The front end speaks
//! to the tools only in their JSON (docs/protocol.md), exactly as examples/pipeline.sh
//! does. Every outcome after the record exists, failures included, ends in `result.json`.
//! Every tool dies with this process (`tools::start`), and the VM with its holder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use contractor_protocol::agent::{Job, Keep, Phase};
use contractor_protocol::build::BuildEvent;
use contractor_protocol::error::ToolCode;
use contractor_protocol::proxy::Summary;
use contractor_protocol::result::{BuildCode, BuildResult, ErrorInfo, Limit, Outcome};
use contractor_protocol::run::{RunEvent, RunRequest};
use contractor_protocol::store::KeptVm;
use contractor_protocol::tool::{
    child_pid, handed_over, stop_child, wait_or_stop, Service, SignalWatch, STOP_GRACE,
};
use contractor_protocol::vm::{Accel, VmInfo, VmRequest, VmResult, VmSpec};
use contractor_protocol::PROTOCOL_VERSION;
use nix::sys::signal::{kill, Signal};

use crate::display::Display;
use crate::image;
use crate::paths;
use crate::source;
use crate::spec::BuildSpec;
use crate::tools::{self, Answers, Reply, ToolError};

/// Options of `contractor build` beyond the spec.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// libvirt URI.
    pub uri: String,
    /// Accelerator.
    pub accel: Accel,
    /// When to keep the VM for `contractor shell` instead of destroying it.
    pub keep: Option<Keep>,
    /// Start from a snapshot of a booted builder (`contractor-vm create --hold` with
    /// `spec.snapshot`); never for a VM that is kept.
    pub snapshot: bool,
    /// Use no network: the proxy serves pinned URLs from the download cache only.
    pub offline: bool,
    /// The build's id, when it was chosen elsewhere (a front end that hosts the build here).
    pub id: Option<String>,
    /// The source, when it arrived packed (from a front end that hosts the build here)
    /// instead of being packed from the project directory.
    pub packed: Option<PackedSource>,
    /// The build this one rebuilds (`contractor rebuild`): its `source.tar` is `packed`,
    /// and this front end signs the record as usual, saying which build it rebuilt.
    pub rebuild_of: Option<String>,
}

impl BuildOptions {
    /// The options of a build, in one place for every way one is asked for (`contractor
    /// build`'s flags, `contractor rebuild`'s, a front end's hosted request): `uri` (else
    /// the default for this user), the accelerator, whether to keep the VM (never restored
    /// from a snapshot then), and whether to build offline. The id, a packed source and the
    /// build rebuilt are none; the callers that have them set them.
    pub fn new(
        uri: Option<String>,
        accel: Accel,
        keep: Option<Keep>,
        snapshot: bool,
        offline: bool,
    ) -> BuildOptions {
        BuildOptions {
            uri: uri.unwrap_or_else(contractor_protocol::vm::default_uri),
            accel,
            keep,
            snapshot: snapshot && keep.is_none(),
            offline,
            id: None,
            packed: None,
            rebuild_of: None,
        }
    }
}

/// A source tar packed elsewhere: moved into the build record instead of packing the
/// project directory.
#[derive(Debug, Clone)]
pub struct PackedSource {
    /// The tar file (on the file system of the build record, so that it can be moved).
    pub tar: PathBuf,
    /// Its entries, as its packer counted them.
    pub entries: u64,
}

/// Failures before the build could run. After the VM starts, failures are outcomes.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The image could not be built or found.
    #[error("cannot prepare the builder image")]
    Image(#[source] image::ImageError),
    /// The store could not open the build record (`contractor-store record open`).
    #[error("cannot open the build record")]
    Open(#[source] ToolError),
    /// The store could not close the build record (`contractor-store record close`).
    #[error("cannot close the build record")]
    Close(#[source] ToolError),
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
    Service(&'static str, #[source] ToolError),
    /// The build's private directory (contractor.lock's pins for the proxy) could not be
    /// made.
    #[error("cannot create the build's private directory {path}")]
    Private {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data directory is unknown.
    #[error("cannot tell the data directory")]
    DataDir(#[source] contractor_protocol::image::NoDataDir),
    /// The project's store directory is not one Contractor may write into.
    #[error("cannot keep the build record in this project")]
    StoreDir(#[source] paths::StoreDirError),
    /// A setting of the environment is invalid (`CONTRACTOR_DOWNLOAD_CACHE_SIZE`).
    #[error("{0}")]
    Setting(String),
    /// Ctrl-C or SIGTERM (named) came before the build could run.
    #[error("the build was interrupted ({0}) before it could run")]
    Interrupted(&'static str),
}

impl BuildError {
    /// How a build that failed with this error ended, and its code in `result.json`: `failed`
    /// when the project is at fault, `infrastructure` otherwise.
    pub fn outcome(&self) -> (Outcome, BuildCode) {
        match self {
            BuildError::Source(source::SourceError::TooManyEntries { .. }) => {
                (Outcome::Failed, BuildCode::SourceTooManyEntries)
            }
            BuildError::Source(err) if err.is_project_error() => {
                (Outcome::Failed, BuildCode::SourceUnreadable)
            }
            BuildError::Source(_) => (Outcome::Infrastructure, BuildCode::SourcePack),
            BuildError::Image(_) => (Outcome::Infrastructure, BuildCode::Image),
            BuildError::Record { .. } | BuildError::Open(_) | BuildError::Close(_) => {
                (Outcome::Infrastructure, BuildCode::Record)
            }
            BuildError::Cache { .. } => (Outcome::Infrastructure, BuildCode::CachePrepare),
            BuildError::Service(..) => (Outcome::Infrastructure, BuildCode::ServiceStart),
            BuildError::Private { .. } => (Outcome::Infrastructure, BuildCode::PrivateDir),
            BuildError::DataDir(_) => (Outcome::Infrastructure, BuildCode::DataDir),
            BuildError::StoreDir(_) => (Outcome::Failed, BuildCode::StoreDir),
            BuildError::Setting(_) => (Outcome::Failed, BuildCode::BuildSetup),
            BuildError::Interrupted(_) => (Outcome::Interrupted, BuildCode::Interrupted),
        }
    }
}

/// Closes the record of build `id` that failed with `err` before its VM ran: writes its
/// `result.json` (the error's outcome and code, its chain) and drops its owner file.
/// Returns `err` for the caller to report.
pub fn close_failed_record(
    record: &Path,
    id: &str,
    started: Instant,
    err: BuildError,
) -> BuildError {
    failed_result(record, id, started.elapsed().as_secs_f64(), &err);
    err
}

/// Writes and returns the `result.json` of build `id` (its record `record`), which failed
/// with `err` after `duration_secs`, and drops the record's owner file: how the front end
/// closes a record itself, when the build failed before its VM ran or the store could not
/// close it (the store may be what failed).
fn failed_result(record: &Path, id: &str, duration_secs: f64, err: &BuildError) -> BuildResult {
    let (outcome, code) = err.outcome();
    let error = Some(ErrorInfo::from_error(code.as_str(), err));
    let result = BuildResult {
        duration_secs,
        ..BuildResult::ended(id, record, outcome, error)
    };
    write_result(record, &result);
    let _ = std::fs::remove_file(record.join(OWNER_FILE));
    result
}

/// What the build produced.
pub struct BuildReport {
    /// The record, as written to result.json.
    pub result: BuildResult,
    /// The VM kept for a shell, if any (also in the record's `vm.json`).
    pub kept: Option<KeptVm>,
    /// The VM's destruction, begun when its last result was in: dropping the report waits
    /// until it is sure (the holder carries it out alone), not for libvirt's confirmation.
    pub release: PendingRelease,
}

/// A VM being destroyed by its holder; dropping this waits until its end is sure.
#[derive(Default)]
pub struct PendingRelease(Option<Releasing>);

impl PendingRelease {
    /// A release that is `work`, done when the report is dropped (after the summary).
    pub fn later(work: impl FnOnce() + 'static) -> PendingRelease {
        PendingRelease(Some(Releasing::Later(Box::new(work))))
    }
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        if let Some(releasing) = self.0.take() {
            if let Err(err) = releasing.wait() {
                eprintln!(
                    "contractor: warning: cannot release VM: {}",
                    contractor_protocol::result::joined_chain(&err)
                );
            }
        }
    }
}

/// Runs one build. Tools are started from the calling thread, which must live until the
/// build ends (see `contractor_protocol::process::die_with_parent`): call it from the main thread.
///
/// Its phases: [`Setup`] (the image, the record opened by the store: its directory, its
/// owner, `latest`), the source packed, the [`Session`] started (cache, token, VM, store,
/// proxies), the run in the VM, the services stopped ([`Stopped::stop`]), and the record
/// closed ([`close_record`]: the cache kept, `result.json` written by the store, the
/// provenance signed). From the record's directory on, a failure closes the record too.
pub fn build(
    spec: &BuildSpec,
    options: &BuildOptions,
    display: &Display,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    let started_on = std::time::SystemTime::now();
    let setup = Setup::new(spec, options)?;
    // From here on, every failure also closes the record with a result.json, and Ctrl-C
    // or SIGTERM stops the tools the build waits for and ends it as interrupted.
    let interruption = Interruption::watch();
    let close = |err: BuildError| {
        close_failed_record(&setup.record, &setup.id, started, interruption.over(err))
    };
    let packed = pack_source(spec, options, &setup.record).map_err(close)?;
    announce(display, spec, &setup, &packed);
    let session = Session::start(spec, options, &setup, display, &interruption).map_err(close)?;
    let mut ran = run_in_vm(
        &options.uri,
        session.vm,
        session.job,
        Services {
            proxy: session.proxy.addr,
            script_proxy: session.script_proxy.as_ref().map(|p| p.addr),
            store: session.store.addr,
        },
        &session.log,
        RunLimits {
            timeout_secs: spec.timeout.as_secs(),
            max_log_bytes: spec.max_log_bytes,
            memory_mib: spec.memory_mib,
            disk_gib: spec.disk_gib,
        },
        display,
        &session.tools_log,
        &interruption,
    );
    let stopped = Stopped::stop(
        session.proxy,
        session.script_proxy,
        session.store,
        session.private,
        display,
    );
    let release = PendingRelease(ran.releasing.take());
    stopped.warn(display, setup.download_cache_max);
    let how = Started {
        setup: &setup,
        snapshot: session.snapshot,
        started_on,
        cache_restored: session.cache_restored,
    };
    let (result, kept) = close_record(spec, options, &how, ran, display);
    display.event(&BuildEvent::Finished {
        result: result.clone(),
    });
    Ok(BuildReport {
        result,
        kept,
        release,
    })
}

/// What a build needs before its record can be closed on failure: the image, the download
/// cache, and the record (`<store>/builds/<id>`), opened here by the store
/// (`contractor-store record open`, which also closes abandoned ones first).
struct Setup {
    image: crate::image::ImageInfo,
    download_cache: PathBuf,
    download_cache_max: u64,
    store_root: PathBuf,
    id: String,
    record: PathBuf,
}

impl Setup {
    fn new(spec: &BuildSpec, options: &BuildOptions) -> Result<Setup, BuildError> {
        let image = match &spec.derived {
            Some(derived) => {
                image::ensure_derived(&derived.base, &derived.packages, derived.check_valid_until)
            }
            None => image::ensure(&spec.image),
        }
        .map_err(BuildError::Image)?;
        let download_cache = crate::downloads::dir().map_err(BuildError::DataDir)?;
        let download_cache_max = crate::downloads::max_bytes().map_err(BuildError::Setting)?;
        let store_root =
            paths::checked_store_dir(&spec.project_dir).map_err(BuildError::StoreDir)?;
        let id = crate::records::open_new(&store_root, options.id.as_deref())
            .map_err(BuildError::Open)?;
        let record = store_root.join("builds").join(&id);
        Ok(Setup {
            image,
            download_cache,
            download_cache_max,
            store_root,
            id,
            record,
        })
    }
}

/// The project packed into the record's `source.tar`, or the tar packed already
/// (`options.packed`: a hosted build, a rebuild) moved there.
fn pack_source(
    spec: &BuildSpec,
    options: &BuildOptions,
    record: &Path,
) -> Result<source::Packed, BuildError> {
    let tar = record.join("source.tar");
    match &options.packed {
        None => source::pack(&spec.project_dir, &tar).map_err(BuildError::Source),
        Some(packed) => std::fs::rename(&packed.tar, &tar)
            .and_then(|()| std::fs::metadata(&tar))
            .map(|meta| source::Packed {
                entries: usize::try_from(packed.entries).unwrap_or(usize::MAX),
                bytes: meta.len(),
                warnings: Vec::new(),
                selection: None,
            })
            .map_err(|source| BuildError::Record { path: tar, source }),
    }
}

/// The build's first events: started, its image, its source.
fn announce(display: &Display, spec: &BuildSpec, setup: &Setup, packed: &source::Packed) {
    display.event(&BuildEvent::Started {
        version: PROTOCOL_VERSION,
        id: setup.id.clone(),
        record: setup.record.clone(),
    });
    display.event(&BuildEvent::ImageReady {
        name: spec.image.clone(),
    });
    display.event(&BuildEvent::SourcePacked {
        entries: packed.entries as u64,
        bytes: packed.bytes,
        selection: packed.selection,
    });
    for warning in &packed.warnings {
        display.warning(warning);
    }
}

/// A build's running parts: the VM being started, the store, the proxies, and the job the
/// agent is to run.
struct Session {
    vm: Result<Spawned, Ran>,
    job: Job,
    store: Service<()>,
    proxy: ProxyService,
    script_proxy: Option<ProxyService>,
    private: Private,
    tools_log: ToolsLog,
    log: PathBuf,
    /// Whether the VM may be restored from a snapshot.
    snapshot: bool,
    cache_restored: Option<bool>,
}

impl Session {
    /// Prepares the build cache and the store's token, then starts the VM (it boots or is
    /// restored while the services start; `run_in_vm` waits for it), the store and the
    /// proxies. A VM that may be kept for a shell must outlive this process: it is not
    /// held, and `contractor-vm reap` removes it when this process died before deciding.
    fn start(
        spec: &BuildSpec,
        options: &BuildOptions,
        setup: &Setup,
        display: &Display,
        interruption: &Interruption,
    ) -> Result<Session, BuildError> {
        let (record, id) = (&setup.record, &setup.id);
        let cache_job = crate::cache::prepare(
            &setup.store_root,
            id,
            &spec.cache_paths,
            spec.cache_max_bytes,
        )
        .map_err(|source| BuildError::Cache {
            path: record.join("inputs"),
            source,
        })?;
        // The new cache travels through the artifacts; it has its own limit.
        let cache_restored = cache_job.as_ref().map(|c| c.restore.is_some());
        let store_limit = match &cache_job {
            Some(cache) => spec.max_artifacts_bytes.saturating_add(cache.max_bytes),
            None => spec.max_artifacts_bytes,
        };
        let private = Private::create(id)?;
        let tools_log = ToolsLog::open(&record.join(TOOLS_LOG))?;
        let console_log = record.join("console.log");
        let (vm, snapshot) =
            spawn_vm(spec, options, setup, &console_log, &tools_log, interruption)?;
        let store = start_store(&setup.store_root, id, store_limit, &tools_log, interruption)
            .map_err(|e| BuildError::Service("store", e))?;
        // Asked for (`--own-token`), so a store of another release that gives none is one
        // the build cannot use.
        let store_token = store.token.clone().ok_or_else(|| {
            let why = "its ready line carries no build token (a store of another release?)";
            let source = std::io::Error::other(why);
            BuildError::Service(
                "store",
                ToolError::Io {
                    name: tools::STORE,
                    source,
                },
            )
        })?;
        let (proxy, script_proxy) =
            start_proxies(spec, options, setup, &private, &tools_log, interruption)?;
        // A service that could not confine itself fully says so; the user must hear it.
        show_confinement(display, tools::STORE, store.confinement.as_ref());
        show_confinement(display, tools::PROXY, proxy.confinement.as_ref());
        let mut env = spec.env.clone();
        env.insert("CONTRACTOR_BUILD_ID".into(), id.clone());
        let job = Job {
            script: spec.script.clone(),
            fetch: spec.fetch.clone(),
            env,
            source: format!("/builds/{id}/source.tar"),
            artifacts: spec.artifacts.clone(),
            artifacts_dest: format!("/builds/{id}/artifacts/"),
            store_token: Some(store_token),
            cache: cache_job,
            host_time: None,
            entropy: None,
            keep: options.keep,
            ca_certificate: proxy.ca_certificate.clone(),
        };
        Ok(Session {
            vm,
            job,
            store,
            proxy,
            script_proxy,
            private,
            tools_log,
            log: record.join("build.log"),
            snapshot,
            cache_restored,
        })
    }
}

/// Starts the build's VM (`contractor-vm create`, a snapshot restored where one fits); the
/// VM and whether it may be restored from a snapshot. A failure to start is the run's.
fn spawn_vm(
    spec: &BuildSpec,
    options: &BuildOptions,
    setup: &Setup,
    console_log: &Path,
    tools_log: &ToolsLog,
    interruption: &Interruption,
) -> Result<(Result<Spawned, Ran>, bool), BuildError> {
    let vm_spec = VmSpec {
        name: None,
        image: setup.image.boot.clone(),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_gib: Some(spec.disk_gib),
        accel: options.accel,
        console_log: console_log.to_path_buf(),
        work_dir: paths::data_dir().map_err(BuildError::DataDir)?.join("vms"),
        snapshot: options.snapshot && options.keep.is_none(),
    };
    let vm = match paths::create_dir_world_readable(&vm_spec.work_dir) {
        Err(err) => Err(Ran::infrastructure(BuildCode::VmWorkDir, &err)),
        Ok(()) => Vm::spawn(
            &options.uri,
            &vm_spec,
            options.keep.is_none(),
            tools_log,
            interruption,
        )
        .map_err(|err| Ran::infrastructure(BuildCode::VmCreate, &err)),
    };
    Ok((vm, vm_spec.snapshot))
}

/// The build's proxy (with the pins of contractor.lock, written for it) and, with a fetch
/// phase, the script's: it serves the fetch, and the second, allowing nothing, takes the
/// script's requests (to refuse and record them).
fn start_proxies(
    spec: &BuildSpec,
    options: &BuildOptions,
    setup: &Setup,
    private: &Private,
    tools_log: &ToolsLog,
    interruption: &Interruption,
) -> Result<(ProxyService, Option<ProxyService>), BuildError> {
    let phased = spec.fetch.is_some();
    let pins = match &spec.lock {
        Some(lock) => {
            let path = private.pins_file();
            std::fs::write(&path, crate::lock::pins_json(lock)).map_err(|source| {
                BuildError::Record {
                    path: path.clone(),
                    source,
                }
            })?;
            Some(path)
        }
        None => None,
    };
    let proxy = start_proxy(
        &ProxyPolicy {
            allow: &spec.allow,
            inspect: spec.inspect.then_some(spec.tunnel.as_slice()),
            pins: pins.as_deref(),
            cache: Some(DownloadCachePolicy {
                dir: &setup.download_cache,
                project: crate::paths::project_key(&spec.project_dir),
                size: setup.download_cache_max,
            }),
            offline: options.offline,
        },
        &setup.record,
        phased.then_some(Phase::Fetch),
        tools_log,
        interruption,
    )
    .map_err(|e| BuildError::Service("proxy", e))?;
    let script_proxy = match phased {
        true => Some(
            start_proxy(
                &ProxyPolicy {
                    allow: &[],
                    inspect: None,
                    pins: None,
                    cache: None,
                    offline: false,
                },
                &setup.record,
                Some(Phase::Script),
                tools_log,
                interruption,
            )
            .map_err(|e| BuildError::Service("proxy", e))?,
        ),
        false => None,
    };
    Ok((proxy, script_proxy))
}

/// What the build's proxy said when the services stopped (the hosts it and the script's
/// proxy refused are in the record's `proxy.jsonl`, which the store tallies when it closes
/// the record).
struct Stopped {
    proxy: Result<Option<Summary>, ToolError>,
}

impl Stopped {
    /// Stops the proxies and the store (a service that did not stop cleanly is a warning),
    /// and removes the build's private files.
    fn stop(
        proxy: ProxyService,
        script_proxy: Option<ProxyService>,
        store: Service<()>,
        private: Private,
        display: &Display,
    ) -> Stopped {
        let proxy_stopped = proxy.stop();
        let script_proxy_stopped = script_proxy.map(Service::stop);
        let store_stopped = store.stop();
        drop(private);
        let stop_errors = [
            ("proxy", proxy_stopped.as_ref().err()),
            (
                "script phase's proxy",
                script_proxy_stopped.as_ref().and_then(|s| s.as_ref().err()),
            ),
            ("store", store_stopped.as_ref().err()),
        ];
        for (service, err) in stop_errors {
            if let Some(err) = err {
                display.warning(&format!(
                    "the {service} did not stop cleanly: {}",
                    contractor_protocol::result::joined_chain(err)
                ));
            }
        }
        Stopped {
            proxy: proxy_stopped,
        }
    }

    /// Warnings for what the build's proxy saw: downloads not pinned or not kept in the
    /// download cache. (A download that did not match contractor.lock fails the build: the
    /// store decides that when it closes the record, from what the proxy filed there.)
    fn warn(self, display: &Display, download_cache_max: u64) {
        // A proxy that wrote no summary (or did not stop cleanly) reports nothing.
        let summary = self.proxy.ok().flatten();
        let cache_not_kept = summary.as_ref().map_or(0, |s| s.cache_not_kept);
        let filed = summary.and_then(|s| s.record).unwrap_or_default();
        if filed.unpinned > 0 {
            display.warning(&format!(
                "{} download(s) are not in contractor.lock (`contractor downloads` lists them, `contractor pin` pins them)",
                filed.unpinned
            ));
        }
        if cache_not_kept > 0 {
            display.warning(&format!(
                "{} download(s) were passed on but not kept in the download cache: a build adds at \
                 most half of {} bytes ({}), and entries other projects' locks pin are never removed \
                 to make room",
                cache_not_kept,
                download_cache_max,
                crate::downloads::SIZE_VARIABLE
            ));
        }
    }
}

/// How a build was started, as its provenance says.
struct Started<'a> {
    setup: &'a Setup,
    snapshot: bool,
    started_on: std::time::SystemTime,
    cache_restored: Option<bool>,
}

/// Closes the record of a build that ran: keeps its build cache, has the store close the
/// record (`contractor-store record close`: the artifacts indexed, each declared one checked,
/// the proxies' refusals tallied, a download that did not match its pin failed, a kept VM's
/// `vm.json` and `result.json` written) with the end decided here, and signs the
/// provenance (when this front end packed the source). A record
/// the store cannot close is closed here, as an infrastructure failure (code `record`).
fn close_record(
    spec: &BuildSpec,
    options: &BuildOptions,
    how: &Started,
    ran: Ran,
    display: &Display,
) -> (BuildResult, Option<KeptVm>) {
    let (setup, record) = (how.setup, &how.setup.record);
    let cache_saved = crate::cache::keep(
        &setup.store_root,
        &setup.id,
        &spec.cache_paths,
        ran.outcome == Outcome::Success,
    );
    if let Err(err) = &cache_saved {
        display.warning(&format!("cannot keep the build cache: {err}"));
    }
    let ended = crate::records::Ended {
        started: how.started_on,
        artifacts: &spec.artifacts,
        outcome: ran.outcome,
        exit_code: ran.exit_code,
        limit: ran.limit,
        error: ran.error.as_ref(),
        kept_vm: ran.kept.as_ref(),
    };
    let result = crate::records::close(record, &ended).unwrap_or_else(|err| {
        let duration = how.started_on.elapsed().unwrap_or_default();
        failed_result(
            record,
            &setup.id,
            duration.as_secs_f64(),
            &BuildError::Close(err),
        )
    });
    sign(
        spec,
        options,
        how,
        ran.vm_started.as_ref(),
        &result,
        display,
    );
    (result, ran.kept)
}

/// Writes the record's `result.json` (a failure to is said, not fatal: the build is over).
pub(crate) fn write_result(record: &Path, result: &BuildResult) {
    let path = record.join("result.json");
    let text = serde_json::to_string_pretty(result).unwrap_or_default();
    if let Err(err) = std::fs::write(&path, text + "\n") {
        eprintln!("contractor: cannot write {}: {err}", path.display());
    }
}

/// Signs the provenance of a build whose script ran, when this front end packed its source:
/// a hosted build (its source packed by the front end that asked for it) is signed by that
/// front end when its record comes back (a build host signs nothing); a rebuild's source is
/// packed too, by this front end, which signs it.
fn sign(
    spec: &BuildSpec,
    options: &BuildOptions,
    how: &Started,
    vm_started: Option<&(Accel, Option<contractor_protocol::vm::SnapshotReport>)>,
    result: &BuildResult,
    display: &Display,
) {
    let signs_here = options.packed.is_none() || options.rebuild_of.is_some();
    if signs_here {
        let facts = |request| contractor_protocol::attest::SignRequest {
            accelerator: vm_started.map_or(options.accel, |v| v.0),
            snapshot: how.snapshot,
            snapshot_report: vm_started.and_then(|v| v.1.clone()),
            offline: options.offline,
            image: Some(how.setup.image.manifest.clone()),
            rebuild_of: options.rebuild_of.clone(),
            cache_restored: Some(how.cache_restored.unwrap_or(false)),
            ..request
        };
        let record = &how.setup.record;
        crate::provenance::sign(record, spec, result, how.started_on, facts, display);
    }
}

/// The record file the tools of a build write their messages to (their stderr); what they
/// report as failures also reaches `result.json` through their JSON error objects.
pub const TOOLS_LOG: &str = "tools.log";

/// The open `tools.log`, handed to each tool as its stderr.
struct ToolsLog(std::fs::File);

impl ToolsLog {
    fn open(path: &Path) -> Result<ToolsLog, BuildError> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(ToolsLog)
            .map_err(|source| BuildError::Record {
                path: path.to_path_buf(),
                source,
            })
    }

    /// A stderr for one tool (the same file, appended to).
    fn stderr(&self) -> Stdio {
        self.0
            .try_clone()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::inherit())
    }
}

/// A directory only this user can read, for the files of the build's tools that are no
/// record's: contractor.lock's pins for the proxy. Removed when dropped.
struct Private(PathBuf);

impl Private {
    fn create(id: &str) -> Result<Private, BuildError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("contractor-{id}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map(|()| Private(path.clone()))
            .map_err(|source| BuildError::Private { path, source })
    }

    /// The pins of contractor.lock, for the proxy.
    fn pins_file(&self) -> PathBuf {
        self.0.join("pins.json")
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the build's store: it serves only build `id`'s files, and only to requests with
/// the token it made for it (`--own-token`: given in its ready line, held in no file; the
/// guest agent's), within the token's scope.
fn start_store(
    root: &Path,
    id: &str,
    max_artifacts_bytes: u64,
    log: &ToolsLog,
    interruption: &Interruption,
) -> Result<Service<()>, ToolError> {
    let mut command = tools::command(tools::STORE)?;
    command
        .arg("serve")
        .arg("--root")
        .arg(root)
        .args(["--only-build", id, "--own-token", "--max-build-bytes"])
        .arg(max_artifacts_bytes.to_string())
        .args(["--no-access-log", "--json-errors"])
        .stderr(log.stderr());
    let track = |c: &Child| interruption.track(c);
    Service::start(tools::STORE, command, track, Answers::drain)
}

/// Starts a proxy of the build that allows `allow`, recording downloads, and with
/// `inspect` inspecting TLS to the allowed hosts but those it names (tunnelled). It files
/// its decisions and downloads in the build's `record` itself (`--record`, with `"phase"`
/// when the build has phases); its summary says what the result needs.
fn start_proxy(
    policy: &ProxyPolicy,
    record: &Path,
    phase: Option<Phase>,
    log: &ToolsLog,
    interruption: &Interruption,
) -> Result<ProxyService, ToolError> {
    let mut command = tools::command(tools::PROXY)?;
    command.args(["--record-downloads", "--json-errors", "--record"]);
    command.arg(record);
    if let Some(phase) = phase {
        command.args(["--record-phase", phase.as_str()]);
    }
    for host in policy.allow {
        command.arg("--allow").arg(host);
    }
    if let Some(tunnel) = policy.inspect.filter(|_| !policy.allow.is_empty()) {
        command.arg("--inspect");
        for host in tunnel {
            command.arg("--tunnel").arg(host);
        }
    }
    if let Some(pins) = policy.pins {
        command.arg("--pins").arg(pins);
    }
    if let Some(cache) = &policy.cache {
        command
            .arg("--cache")
            .arg(cache.dir)
            .arg("--cache-project")
            .arg(&cache.project)
            .arg("--cache-size")
            .arg(cache.size.to_string())
            .arg("--cache-max")
            .arg(crate::downloads::build_quota(cache.size).to_string());
        if policy.offline {
            command.arg("--offline");
        }
    }
    command.stderr(log.stderr());
    let track = |c: &Child| interruption.track(c);
    Service::start(tools::PROXY, command, track, |mut answers| {
        let mut last = None;
        while let Ok(Some(line)) = answers.next_line() {
            if let Ok(summary) = serde_json::from_slice::<Summary>(&line) {
                last = Some(summary);
            }
        }
        answers.drain();
        last
    })
}

/// What a build's proxy allows and how it gets what it serves.
struct ProxyPolicy<'a> {
    /// `[network] allow`.
    allow: &'a [String],
    /// Inspect TLS, but not for these hosts (`[network] tunnel`); `None`: tunnel all.
    inspect: Option<&'a [String]>,
    /// contractor.lock as the proxy's `--pins` file.
    pins: Option<&'a Path>,
    /// The download cache, as this project uses it.
    cache: Option<DownloadCachePolicy<'a>>,
    /// `--offline`: pinned URLs from the cache only, nothing from the network.
    offline: bool,
}

/// The download cache as a build's proxy uses it.
struct DownloadCachePolicy<'a> {
    /// The directory.
    dir: &'a Path,
    /// The project's key (`contractor-proxy --cache-project`): its own index in the cache.
    project: String,
    /// The most bytes the cache holds.
    size: u64,
}

/// A build's proxy: what it gives when stopped is its last `summary` (none from a proxy
/// that wrote none), which says what the build's warnings depend on ([`Stopped::warn`]).
type ProxyService = Service<Option<Summary>>;

/// Shows what a service's `ready` line said is missing from its confinement
/// ([`contractor_protocol::confinement::warning_lines`]).
fn show_confinement(
    display: &Display,
    name: &str,
    confinement: Option<&contractor_protocol::service::Confinement>,
) {
    for line in contractor_protocol::confinement::warning_lines(name, confinement) {
        display.warning(&line);
    }
}

/// Where the build's proxy and store listen.
#[derive(Debug, Clone, Copy)]
struct Services {
    proxy: SocketAddr,
    /// The proxy of the script phase, when the build has a fetch phase.
    script_proxy: Option<SocketAddr>,
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
    /// The VM being destroyed by its holder, waited for before the build ends.
    releasing: Option<Releasing>,
    /// The accelerator the VM ran with and how it booted, once it started.
    vm_started: Option<(Accel, Option<contractor_protocol::vm::SnapshotReport>)>,
}

impl Ran {
    /// A run that ended `outcome`, code `code`, saying `message`, with nothing else to report.
    fn failed(outcome: Outcome, code: BuildCode, message: String) -> Ran {
        Ran {
            outcome,
            exit_code: None,
            error: Some(ErrorInfo {
                code: code.as_str().into(),
                chain: vec![message],
            }),
            limit: None,
            kept: None,
            releasing: None,
            vm_started: None,
        }
    }

    /// An infrastructure failure (code `code`) whose chain is `err`'s.
    fn infrastructure(code: BuildCode, err: &(dyn std::error::Error + 'static)) -> Ran {
        Ran {
            error: Some(ErrorInfo::from_error(code.as_str(), err)),
            ..Ran::failed(Outcome::Infrastructure, code, String::new())
        }
    }

    fn interrupted(signal: &str) -> Ran {
        Ran::failed(
            Outcome::Interrupted,
            BuildCode::Interrupted,
            format!("the build was interrupted ({signal}); its VM was destroyed"),
        )
    }
}

/// How long a tool's death by a signal waits for this process's own Ctrl-C or SIGTERM to be
/// noted ([`Interruption::signal_behind`]).
const SIGNAL_NOTE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Ctrl-C and SIGTERM while the build runs ([`SignalWatch`]): remembered, and passed on as
/// SIGTERM to every tool running then (`tools::signal_running`) and to each tool of the
/// build started later ([tracked](Interruption::track)): `contractor-run` then ends without
/// `finished`, `contractor-vm` destroys the VM it creates or holds, a service stops, and
/// whatever the build waits for ends. A tool still running [`STOP_GRACE`] later, or at a
/// second signal, is killed (SIGKILL). The terminal sends Ctrl-C to every tool anyway; a CI
/// engine or `kill` signals only this process.
struct Interruption {
    watch: SignalWatch,
    /// Cleared when the build is over: a grace that ends later kills nothing.
    watching: Arc<AtomicBool>,
}

impl Interruption {
    fn watch() -> Interruption {
        let watching = Arc::new(AtomicBool::new(true));
        let on = watching.clone();
        let watch = SignalWatch::start(move |caught| {
            if !on.load(Ordering::SeqCst) {
                return;
            }
            if !caught.first {
                tools::signal_running(Signal::SIGKILL);
                return;
            }
            tools::signal_running(Signal::SIGTERM);
            let on = on.clone();
            std::thread::spawn(move || {
                std::thread::sleep(STOP_GRACE);
                if on.load(Ordering::SeqCst) {
                    tools::signal_running(Signal::SIGKILL);
                }
            });
        })
        .unwrap_or_else(|err| {
            eprintln!(
                "contractor: warning: cannot watch for Ctrl-C ({err}); an interrupted build is not recorded as such"
            );
            SignalWatch::default()
        });
        Interruption { watch, watching }
    }

    /// The signal that interrupted the build, if any.
    fn signal(&self) -> Option<&'static str> {
        self.watch.signal()
    }

    /// The signal behind `err`, a tool's failure: a tool killed by a signal is given
    /// [`SIGNAL_NOTE_WAIT`] for this process's own Ctrl-C to be noted.
    fn signal_behind(&self, err: &ToolError) -> Option<&'static str> {
        match err {
            ToolError::Failed {
                exit_code: None, ..
            } => self.watch.signal_within(SIGNAL_NOTE_WAIT),
            _ => self.signal(),
        }
    }

    /// Passes an interruption that came already on to `child`, a tool the build is about
    /// to wait for (one that comes later reaches it through `tools::signal_running`).
    fn track(&self, child: &Child) {
        if self.signal().is_some() {
            let _ = kill(child_pid(child), Signal::SIGTERM);
        }
    }

    /// `err`, or the interruption that caused it.
    fn over(&self, err: BuildError) -> BuildError {
        match self.signal() {
            Some(signal) => BuildError::Interrupted(signal),
            None => err,
        }
    }
}

impl Drop for Interruption {
    fn drop(&mut self) {
        self.watching.store(false, Ordering::SeqCst);
    }
}

/// The VM, from `contractor-vm create`: held by that process (destroyed when its stdin
/// closes, or when it dies) or, for a VM that may be kept for a shell, not held.
struct Vm {
    info: VmInfo,
    uri: String,
    holder: Option<Holder>,
}

/// A `contractor-vm create` process, its stdin (with `--hold`, the VM lives while it is
/// open) in its `Child`. Dropped, its stdin closes and it is waited for ([`wait_or_stop`]):
/// a holder destroys its VM then.
struct Holder(Option<Child>);

impl Holder {
    /// The process, which dropping this no longer waits for.
    fn take(mut self) -> Option<Child> {
        self.0.take()
    }

    /// Closes its stdin and stops it at once ([`stop_child`], which leaves one that has
    /// ended alone).
    fn stop(self) {
        if let Some(mut child) = self.take() {
            drop(child.stdin.take());
            stop_child(&mut child);
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            drop(child.stdin.take());
            let _ = wait_or_stop(&mut child);
        }
    }
}

impl Vm {
    /// Starts `contractor-vm create` for `spec` and hands it the request, without waiting
    /// for its answer ([`Spawned::finish`]): the VM boots (or is restored) while the
    /// services start. With `hold`, the tool holds the VM until [`Vm::release`].
    fn spawn(
        uri: &str,
        spec: &VmSpec,
        hold: bool,
        log: &ToolsLog,
        interruption: &Interruption,
    ) -> Result<Spawned, ToolError> {
        let name = tools::VM;
        let mut command = tools::command(name)?;
        command.args(["create", "--json", "--json-errors"]);
        if hold {
            command.arg("--hold");
        }
        command.stderr(log.stderr());
        let mut child = tools::spawn(name, command)?;
        interruption.track(&child);
        let request = VmRequest::Create {
            version: PROTOCOL_VERSION,
            uri: uri.to_string(),
            spec: spec.clone(),
        };
        match tools::send(name, &mut child, &request) {
            Ok(stdin) => child.stdin = hold.then_some(stdin),
            Err(err) => {
                stop_child(&mut child);
                return Err(err);
            }
        }
        Ok(Spawned {
            holder: Holder(Some(child)),
            uri: uri.to_string(),
            hold,
        })
    }
}

/// `contractor-vm create`, started and asked, not yet answered; dropped, it is never asked
/// for its VM: the holder destroys it once its stdin closes.
struct Spawned {
    holder: Holder,
    uri: String,
    hold: bool,
}

impl Spawned {
    /// Waits for the VM.
    fn finish(self) -> Result<Vm, ToolError> {
        let name = tools::VM;
        let Spawned {
            mut holder,
            uri,
            hold,
        } = self;
        let answered = match holder.0.as_mut() {
            Some(child) => Answers::of(name, child).and_then(|mut answers| {
                let answer: VmResult = answers.first(child)?;
                Ok((answers, answer))
            }),
            None => Err(ToolError::Io {
                name,
                source: std::io::Error::other("contractor-vm was already waited for"),
            }),
        };
        let (answers, vm) = match answered {
            Ok((answers, VmResult::Vm { vm, .. })) => (answers, vm),
            Ok(_) => {
                holder.stop();
                return Err(ToolError::Failed {
                    name,
                    exit_code: None,
                    error: Some(contractor_protocol::error::ErrorObject::with_chain(
                        ToolCode::WrongAnswer,
                        vec!["it answered create with something other than a vm".into()],
                    )),
                });
            }
            Err(err) => {
                holder.stop();
                return Err(err);
            }
        };
        // The holder writes nothing more; a thread keeps its stdout drained regardless.
        std::thread::spawn(move || answers.drain());
        Ok(Vm {
            info: vm,
            uri,
            // Not held: it has answered and ends now (waited for as the holder drops).
            holder: hold.then_some(holder),
        })
    }
}

impl Vm {
    /// Has the holder begin destroying the VM (its stdin closes) and returns at once; a VM
    /// that is not held is destroyed here with `contractor-vm destroy`.
    fn start_release(mut self) -> Releasing {
        match self.holder.take().and_then(Holder::take) {
            Some(mut holder) => {
                drop(holder.stdin.take());
                Releasing::Holder {
                    holder,
                    uri: self.uri.clone(),
                    name: self.info.name.clone(),
                }
            }
            None => Releasing::Done(destroy_vm(&self.uri, &self.info.name)),
        }
    }

    /// Destroys the VM and deletes its overlay, and waits until that is done.
    fn release(self) -> Result<(), ToolError> {
        self.start_release().wait()
    }
}

/// `contractor-vm destroy`: the VM `name` at `uri` is destroyed and its overlay deleted.
fn destroy_vm(uri: &str, name: &str) -> Result<(), ToolError> {
    tools::answer::<VmResult>(
        tools::VM,
        &["destroy", "--uri", uri, "--name", name].map(AsRef::as_ref),
    )
    .map(drop)
}

/// A VM on its way out ([`Vm::start_release`]).
enum Releasing {
    Holder {
        holder: Child,
        uri: String,
        name: String,
    },
    Done(Result<(), ToolError>),
    /// Work that ends the build elsewhere (a build host's session), done when waited for.
    Later(Box<dyn FnOnce()>),
}

impl Releasing {
    /// Waits until the VM's destruction is sure: done, or left to a holder that carries it
    /// out alone (one that has left this process's session, see [`handed_over`]), which
    /// finishes it even after this process has exited. A holder that died before it could
    /// (killed, say) leaves the VM to `contractor-vm destroy`: a VM restored from a
    /// snapshot is not autodestroyed by libvirt when its holder's connection closes.
    fn wait(self) -> Result<(), ToolError> {
        let tool = tools::VM;
        match self {
            Releasing::Holder {
                mut holder,
                uri,
                name,
            } => {
                let status = match handed_over(&mut holder) {
                    Ok(Some(status)) => status,
                    Ok(None) => return Ok(()),
                    Err(source) => return Err(ToolError::Io { name: tool, source }),
                };
                // 130: the holder was sent Ctrl-C (by the terminal) or SIGTERM (by this
                // front end's interruption) and has destroyed the VM, as it does on a close.
                let on_signal =
                    status.code() == Some(contractor_protocol::ExitCode::Interrupted.code());
                if status.success() || on_signal {
                    return Ok(());
                }
                match destroy_vm(&uri, &name) {
                    Ok(()) => Ok(()),
                    Err(ToolError::Failed {
                        error: Some(error), ..
                    }) if error.code == ToolCode::NotFound => {
                        Err(ToolError::exited(tool, status.code()))
                    }
                    Err(err) => Err(err),
                }
            }
            Releasing::Done(result) => result,
            Releasing::Later(work) => {
                work();
                Ok(())
            }
        }
    }
}

/// Creates the VM, runs the job, releases the VM. Every failure is an outcome here.
#[allow(clippy::too_many_arguments)]
fn run_in_vm(
    uri: &str,
    vm: Result<Spawned, Ran>,
    job: Job,
    services: Services,
    log: &Path,
    limits: RunLimits,
    display: &Display,
    tools_log: &ToolsLog,
    interruption: &Interruption,
) -> Ran {
    let keep = job.keep;
    let spawned = match vm {
        Ok(spawned) => spawned,
        Err(ran) => return ran,
    };
    if let Some(signal) = interruption.signal() {
        drop(spawned);
        return Ran::interrupted(signal);
    }
    let vm = match spawned.finish() {
        Ok(vm) => vm,
        Err(err) if interruption.signal_behind(&err).is_some() => {
            drop(err);
            return Ran::interrupted(interruption.signal().unwrap_or("Ctrl-C"));
        }
        Err(err) => return Ran::infrastructure(BuildCode::VmCreate, &err),
    };
    display.event(&BuildEvent::VmStarted {
        name: vm.info.name.clone(),
        accel: vm.info.accel.unwrap_or_default(),
        snapshot: vm.info.snapshot.clone(),
    });
    let vm_started = (vm.info.accel.unwrap_or_default(), vm.info.snapshot.clone());
    let (Some(control_socket), Some(tunnel_socket)) = (
        vm.info.control_socket.clone(),
        vm.info.tunnel_socket.clone(),
    ) else {
        let _ = vm.release();
        return Ran::failed(
            Outcome::Infrastructure,
            BuildCode::VmChannels,
            "libvirt did not report the VM's channel sockets".into(),
        );
    };
    let request_control = control_socket.clone();
    let request = RunRequest {
        version: PROTOCOL_VERSION,
        control_socket,
        tunnel_socket,
        proxy: services.proxy,
        script_proxy: services.script_proxy,
        store: services.store,
        log: log.to_path_buf(),
        timeout_secs: limits.timeout_secs,
        boot_timeout_secs: 300,
        max_log_bytes: Some(limits.max_log_bytes),
        memory_mib: Some(limits.memory_mib),
        disk_gib: Some(limits.disk_gib),
        job,
    };
    let finished = run(&request, display, tools_log, interruption);
    let kept = kept_vm(&finished, keep).then(|| KeptVm {
        name: vm.info.name.clone(),
        uri: uri.to_string(),
        control_socket: request_control.clone(),
    });
    // The VM is usually gone already (the agent powers it off); its overlay is not. The
    // holder destroys it while the services stop; `build` waits for it before it returns.
    let releasing = match kept {
        Some(_) => {
            drop(vm);
            None
        }
        None => Some(vm.start_release()),
    };
    Ran {
        kept,
        releasing,
        vm_started: Some(vm_started),
        ..ran_of(finished, interruption)
    }
}

/// Whether the VM of a run that ended so is kept for a shell: only where its agent waits
/// for one, after it said done, so not after a limit, an interruption or an
/// infrastructure failure; after a failure, or with `keep = always` after a success too.
fn kept_vm(finished: &Result<RunEvent, ToolError>, keep: Option<Keep>) -> bool {
    match (finished, keep) {
        (
            Ok(RunEvent::Finished {
                outcome,
                limit: None,
                ..
            }),
            Some(keep),
        ) => *outcome == Outcome::Failed || (*outcome == Outcome::Success && keep == Keep::Always),
        _ => false,
    }
}

/// How the run ended, from `contractor-run`'s `finished` (or its failure, or the
/// interruption behind that failure).
fn ran_of(finished: Result<RunEvent, ToolError>, interruption: &Interruption) -> Ran {
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
            kept: None,
            releasing: None,
            vm_started: None,
        },
        Ok(_) => Ran::failed(
            Outcome::Infrastructure,
            BuildCode::Run,
            "contractor-run ended without a finished event".into(),
        ),
        Err(err) => match interruption.signal_behind(&err) {
            Some(signal) => Ran::interrupted(signal),
            None => Ran::infrastructure(BuildCode::Run, &err),
        },
    }
}

/// Feeds `request` to `contractor-run`, shows its events, and returns its `finished`.
fn run(
    request: &RunRequest,
    display: &Display,
    tools_log: &ToolsLog,
    interruption: &Interruption,
) -> Result<RunEvent, ToolError> {
    let name = tools::RUN;
    let mut command = tools::command(name)?;
    command.arg("--json-errors").stderr(tools_log.stderr());
    let mut child = tools::spawn(name, command)?;
    interruption.track(&child);
    let result = tools::send(name, &mut child, request).and_then(|stdin| {
        drop(stdin);
        read_events(&mut child, display)
    });
    stop_child(&mut child);
    result
}

fn read_events(child: &mut Child, display: &Display) -> Result<RunEvent, ToolError> {
    let name = tools::RUN;
    let mut answers = Answers::of(name, child)?;
    loop {
        match answers.next_reply::<RunEvent>()? {
            Some(Reply::Answer(event @ RunEvent::Finished { .. })) => {
                answers.drain();
                return Ok(event);
            }
            Some(Reply::Answer(RunEvent::Started { confinement, .. })) => {
                show_confinement(display, name, confinement.as_ref());
            }
            Some(Reply::Answer(event)) => {
                if let Some(shown) = BuildEvent::shown(event) {
                    display.event(&shown);
                }
            }
            Some(Reply::Error(error)) => {
                drop(answers);
                let exit_code = child.wait().ok().and_then(|s| s.code());
                return Err(ToolError::Failed {
                    name,
                    exit_code,
                    error: Some(error),
                });
            }
            None => {
                let exit_code = child.wait().ok().and_then(|s| s.code());
                return Err(ToolError::exited(name, exit_code));
            }
        }
    }
}

/// While a build runs, its record holds this file naming the `contractor` process (pid and
/// start time); it is removed when `result.json` is written.
pub const OWNER_FILE: &str = contractor_protocol::process::OWNER_FILE;

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
    fn a_service_that_cannot_start_is_an_infrastructure_outcome() {
        let record = tempfile::tempdir().expect("tempdir");
        let err = BuildError::Service(
            "store",
            ToolError::Io {
                name: tools::STORE,
                source: std::io::Error::other("no port"),
            },
        );
        close_failed_record(record.path(), "b2", Instant::now(), err);
        let result = result_of(record.path());
        assert_eq!(result.outcome, Outcome::Infrastructure);
        let error = result.error.expect("error");
        assert_eq!(error.code, "service_start");
        assert_eq!(
            error.chain,
            [
                "cannot start the store",
                "cannot talk to contractor-store",
                "no port"
            ]
        );
    }
}
