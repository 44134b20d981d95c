//! Creating, inspecting and destroying builder domains through a libvirt connection.
//!
//! Every domain is transient (`virDomainCreateXML`): it disappears from libvirt when it
//! stops, and with autodestroy it also dies when the connection that created it closes, so
//! a caller killed with SIGKILL leaves no running VM behind. Only domains with Contractor
//! names are ever listed, reaped or destroyed.
//!
//! What runs where: the overlay is made with the local `qemu-img`, and files are checked and
//! deleted on the local file system. With a remote URI (`qemu+ssh://host/system`) the base
//! image, work directory and console log paths must therefore name the same files on both
//! hosts (a shared file system); overlays of remote VMs are not deleted by `destroy`.

use std::path::{Path, PathBuf};

use contractor_protocol::agent::{CONTROL_PORT, TUNNEL_PORT};
use contractor_protocol::vm::{Accel, VmInfo, VmSpec};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use crate::accel::{is_local_uri, resolve};
use crate::launcher::policy::{overlay_max_bytes, WritableFile, POLICY_VERSION};
use crate::launcher::{launcher_path, QemuPolicy, QEMU_CANDIDATES};
use crate::name::{generate_name, is_contractor_name, validate_name};
use crate::overlay::{
    backing_chain, copy_boot_file, create_build_disk, create_overlay, delete_overlay, BOOT_COPIES,
};
use crate::owner::VmOwner;
use crate::xml::{domain_xml, parse_domain, DiskFormat, Disks, DomainFacts, Emulator, Identity};
use crate::VmError;

pub use contractor_protocol::vm::{default_uri, URI_ENV};

/// `VIR_DOMAIN_START_AUTODESTROY`: the domain dies when its creating connection closes.
const START_AUTODESTROY: u32 = virt::sys::VIR_DOMAIN_START_AUTODESTROY;

/// Opens a connection to `uri`. libvirt's own printing of errors to stderr is switched
/// off: errors come back as values.
pub fn connect(uri: &str) -> Result<Connect, VmError> {
    virt::error::clear_error_callback();
    Connect::open(Some(uri)).map_err(|source| VmError::Connect {
        uri: uri.to_owned(),
        source,
    })
}

fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
    e.code() == Enum::Known(code)
}

pub(crate) fn conn_uri(conn: &Connect) -> String {
    conn.uri().unwrap_or_else(|_| String::from("(unknown URI)"))
}

pub(crate) fn libvirt(action: String) -> impl FnOnce(virt::error::Error) -> VmError {
    move |source| VmError::Libvirt { action, source }
}

/// libvirt's name for a domain state.
pub fn state_name(state: Enum<DomainState, u32>) -> &'static str {
    match state {
        Enum::Known(DomainState::NoState) => "nostate",
        Enum::Known(DomainState::Running) => "running",
        Enum::Known(DomainState::Blocked) => "blocked",
        Enum::Known(DomainState::Paused) => "paused",
        Enum::Known(DomainState::Shutdown) => "shutdown",
        Enum::Known(DomainState::Shutoff) => "shutoff",
        Enum::Known(DomainState::Crashed) => "crashed",
        Enum::Known(DomainState::PMSuspended) => "pmsuspended",
        Enum::Unknown(_) => "unknown",
    }
}

fn absolute(path: &Path, what: &str) -> Result<PathBuf, VmError> {
    let abs = std::path::absolute(path).map_err(|e| VmError::BadSpec {
        reason: format!("{what} {}: {e}", path.display()),
    })?;
    if abs.to_str().is_none() {
        return Err(VmError::BadSpec {
            reason: format!("{what} {} is not valid UTF-8", abs.display()),
        });
    }
    Ok(abs)
}

fn check_file(what: &'static str, path: &Path) -> Result<(), VmError> {
    if std::fs::File::open(path).is_ok_and(|f| f.metadata().is_ok_and(|m| m.is_file())) {
        Ok(())
    } else {
        Err(VmError::MissingFile {
            what,
            path: path.to_owned(),
        })
    }
}

/// The spec with every path made absolute, checked as far as this host can tell.
pub(crate) fn checked_spec(spec: &VmSpec, local: bool) -> Result<VmSpec, VmError> {
    if spec.cpus == 0 {
        return Err(VmError::BadSpec {
            reason: String::from("cpus must be at least 1"),
        });
    }
    if spec.memory_mib < 64 {
        return Err(VmError::BadSpec {
            reason: format!("memory_mib is {}; a VM needs at least 64", spec.memory_mib),
        });
    }
    let mut spec = spec.clone();
    spec.image.disk = absolute(&spec.image.disk, "base disk")?;
    spec.image.kernel = absolute(&spec.image.kernel, "kernel")?;
    if let Some(initrd) = &spec.image.initrd {
        spec.image.initrd = Some(absolute(initrd, "initrd")?);
    }
    spec.console_log = absolute(&spec.console_log, "console log")?;
    spec.work_dir = absolute(&spec.work_dir, "work dir")?;
    if local {
        check_file("base disk", &spec.image.disk)?;
        check_file("kernel", &spec.image.kernel)?;
        if let Some(initrd) = &spec.image.initrd {
            check_file("initrd", initrd)?;
        }
    }
    Ok(spec)
}

pub(crate) fn info_from(
    conn: &Connect,
    domain: &Domain,
    name: &str,
) -> Result<(VmInfo, DomainFacts), VmError> {
    let (state, _) = domain
        .state()
        .map_err(libvirt(format!("read the state of {name}")))?;
    let xml = domain
        .xml_desc(0)
        .map_err(libvirt(format!("read the XML of {name}")))?;
    let facts = parse_domain(&xml)?;
    let info = VmInfo {
        name: name.to_owned(),
        uri: conn_uri(conn),
        state: state_name(state).to_owned(),
        control_socket: facts.control_socket.clone(),
        tunnel_socket: facts.tunnel_socket.clone(),
        overlay: facts.overlay.clone(),
        accel: facts.accel,
        snapshot: None,
    };
    Ok((info, facts))
}

/// Creates and starts a VM owned by the current process. See [`create_owned`].
pub fn create(conn: &Connect, spec: &VmSpec, autodestroy: bool) -> Result<VmInfo, VmError> {
    create_owned(conn, spec, autodestroy, VmOwner::current())
}

/// Creates and starts a transient VM from `spec`, recording `owner` in its metadata.
///
/// With `autodestroy` the VM dies when `conn` closes (keep `conn` open for as long as the VM
/// should live). The overlay `<name>.qcow2` is made in `spec.work_dir` (created with mode
/// 0755) and deleted again if the domain cannot start.
///
/// The caller must ensure that QEMU's user can read the kernel, initrd and base disk, and
/// search every directory above them and above the work directory (as root with
/// `qemu:///system` QEMU runs as `libvirt-qemu`). The base disk's backing chain is written
/// out with `relabel='no'` ([`crate::xml`]): libvirt hands only the overlay and the build
/// disk to QEMU's user. The console log's directory is created if missing.
///
/// Under `qemu:///session` QEMU would run with all of the caller's rights, so the domain's
/// emulator is the launcher `contractor-qemu` ([`crate::launcher`]), found beside this
/// executable or in `$CONTRACTOR_BIN` (missing: [`VmError::MissingLauncher`], before any
/// file is made), with this VM's [`QemuPolicy`] in its environment.
pub fn create_owned(
    conn: &Connect,
    spec: &VmSpec,
    autodestroy: bool,
    owner: VmOwner,
) -> Result<VmInfo, VmError> {
    let name = match &spec.name {
        Some(name) => {
            validate_name(name)?;
            name.clone()
        }
        None => generate_name()?,
    };
    let uri = conn_uri(conn);
    let local = is_local_uri(&uri);
    let mut spec = checked_spec(spec, local)?;
    match conn.lookup_domain_by_name(&name) {
        Ok(_) => {
            return Err(VmError::BadSpec {
                reason: format!("a VM named {name} exists already at {uri}"),
            })
        }
        Err(e) if is_code(&e, ErrorNumber::NoDomain) => {}
        Err(e) => return Err(libvirt(format!("look up domain {name}"))(e)),
    }
    let accel = resolve(spec.accel, &uri, || conn.capabilities().ok())?;
    // Under qemu:///session the launcher must exist before any file is made.
    let launcher = launcher_for(conn, &uri)?;
    if let Some(dir) = spec.console_log.parent() {
        crate::overlay::create_work_dir(dir)?;
    }
    // The image's disk and whatever it stands on: read only, never relabelled.
    let image_chain = backing_chain(&spec.image.disk)?;
    let overlay = create_overlay(&spec.image.disk, &spec.work_dir, &name)?;
    let build_disk = match spec.disk_gib {
        Some(gib) => match create_build_disk(&spec.work_dir, &name, gib) {
            Ok(disk) => Some(disk),
            Err(err) => {
                let _ = delete_overlay(&overlay, &name);
                return Err(err.into());
            }
        },
        None => None,
    };
    if let Err(err) = own_boot_files(&mut spec, &uri, launcher.as_ref(), &name) {
        let _ = delete_overlay(&overlay, &name);
        return Err(err);
    }
    let disks = Disks {
        overlay: &overlay,
        overlay_backing: &image_chain,
        build: build_disk.as_deref(),
        build_format: DiskFormat::Raw,
        build_backing: &[],
    };
    let plan = Plan {
        identity: Identity::named(&name),
        accel,
        disks,
        backing: Vec::new(),
        owner: &owner,
        launcher: launcher.as_ref(),
    };
    let flags = if autodestroy { START_AUTODESTROY } else { 0 };
    let started = planned_xml(&uri, &spec, &plan).and_then(|xml| {
        conn.create_domain_xml(&xml, flags)
            .map_err(libvirt(format!("start domain {name}")))
            .and_then(|domain| match info_from(conn, &domain, &name) {
                Ok((info, _)) => Ok(info),
                Err(e) => {
                    let _ = domain.destroy();
                    Err(e)
                }
            })
    });
    if started.is_err() {
        let _ = delete_overlay(&overlay, &name);
    } else if local {
        sweep_work_dir(conn, &spec.work_dir);
    }
    started
}

/// What a domain's XML is made of besides its spec.
pub(crate) struct Plan<'a> {
    pub(crate) identity: Identity<'a>,
    pub(crate) accel: Accel,
    pub(crate) disks: Disks<'a>,
    /// Read-only files behind the disks besides the image (a snapshot's).
    pub(crate) backing: Vec<PathBuf>,
    pub(crate) owner: &'a VmOwner,
    /// Under `qemu:///session`: the launcher, and the QEMU it executes.
    pub(crate) launcher: Option<&'a (PathBuf, PathBuf)>,
}

/// Under a local `qemu:///system` (no launcher): points `spec` at VM `name`'s own copies of
/// the kernel and initrd in its work directory ([`copy_boot_file`]). libvirt's DAC driver
/// hands a domain's `<kernel>` and `<initrd>` to QEMU's user while it runs, and unlike a
/// disk's layers they take no `<seclabel>`: the copies are what QEMU may then write, never
/// the image's files. Under `qemu:///session` QEMU runs as the user, confined to reading
/// them by the launcher, and nothing is copied.
pub(crate) fn own_boot_files(
    spec: &mut VmSpec,
    uri: &str,
    launcher: Option<&(PathBuf, PathBuf)>,
    name: &str,
) -> Result<(), VmError> {
    if launcher.is_some() || !is_local_uri(uri) {
        return Ok(());
    }
    let [kernel, initrd] = BOOT_COPIES;
    spec.image.kernel = copy_boot_file(&spec.image.kernel, &spec.work_dir, name, kernel)?;
    if let Some(from) = &spec.image.initrd {
        spec.image.initrd = Some(copy_boot_file(from, &spec.work_dir, name, initrd)?);
    }
    Ok(())
}

/// Under `qemu:///session`, the launcher and QEMU ([`session_emulator`]); none otherwise.
pub(crate) fn launcher_for(
    conn: &Connect,
    uri: &str,
) -> Result<Option<(PathBuf, PathBuf)>, VmError> {
    if is_session(uri) {
        session_emulator(conn).map(Some)
    } else {
        Ok(None)
    }
}

/// The domain XML of `plan` at `uri`: with its socket directory and, under
/// `qemu:///session`, the launcher and the policy it confines QEMU to.
pub(crate) fn planned_xml(uri: &str, spec: &VmSpec, plan: &Plan) -> Result<String, VmError> {
    let socket_dir = session_socket_dir(uri)?;
    let policy = match plan.launcher {
        Some((_, qemu)) => {
            let mut policy = qemu_policy(spec, plan.accel, &plan.disks, qemu)?;
            policy.backing.clone_from(&plan.backing);
            Some(policy)
        }
        None => None,
    };
    let emulator = plan
        .launcher
        .zip(policy.as_ref())
        .map(|((launcher, _), policy)| Emulator { launcher, policy });
    Ok(domain_xml(
        &plan.identity,
        spec,
        plan.accel,
        &plan.disks,
        plan.owner,
        socket_dir.as_deref(),
        emulator.as_ref(),
    ))
}

fn is_session(uri: &str) -> bool {
    uri.starts_with("qemu:///session")
}

/// Under `qemu:///session`: the launcher QEMU is started through, and the real QEMU it
/// executes (libvirt's x86_64 emulator, else the first of [`QEMU_CANDIDATES`] that exists).
fn session_emulator(conn: &Connect) -> Result<(PathBuf, PathBuf), VmError> {
    let launcher = executable_launcher(
        launcher_path().unwrap_or_else(|| PathBuf::from(crate::launcher::LAUNCHER_NAME)),
    )?;
    let qemu = conn
        .capabilities()
        .ok()
        .and_then(|caps| crate::xml::default_emulator(&caps))
        .filter(|path| path.is_absolute() && path.exists() && *path != launcher)
        .or_else(|| {
            QEMU_CANDIDATES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .ok_or(VmError::NoQemu)?;
    Ok((launcher, qemu))
}

/// Under `qemu:///session`, the launcher a VM's QEMU would be started through, or why there
/// is none (what `check` reports); None under another URI, where libvirt starts QEMU.
pub(crate) fn session_launcher(uri: &str) -> Option<Result<PathBuf, VmError>> {
    is_session(uri).then(|| {
        executable_launcher(
            launcher_path().unwrap_or_else(|| PathBuf::from(crate::launcher::LAUNCHER_NAME)),
        )
    })
}

/// `path` if it is an executable file, else the error naming it.
fn executable_launcher(path: PathBuf) -> Result<PathBuf, VmError> {
    let executable = std::fs::metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.is_file() && m.permissions().mode() & 0o111 != 0
    });
    if executable {
        Ok(path)
    } else {
        Err(VmError::MissingLauncher { path })
    }
}

/// What the launcher confines this VM's QEMU to (see [`crate::launcher::policy`]).
fn qemu_policy(
    spec: &VmSpec,
    accel: Accel,
    disks: &Disks,
    qemu: &Path,
) -> Result<QemuPolicy, VmError> {
    let overlay_size = crate::overlay::image_info(disks.overlay)?.virtual_size;
    Ok(QemuPolicy {
        version: POLICY_VERSION,
        qemu: qemu.to_owned(),
        accel: match accel {
            Accel::Kvm => Accel::Kvm,
            Accel::Tcg | Accel::Auto => Accel::Tcg,
        },
        memory_mib: spec.memory_mib,
        image_disk: spec.image.disk.clone(),
        kernel: spec.image.kernel.clone(),
        initrd: spec.image.initrd.clone(),
        overlay: WritableFile {
            path: disks.overlay.to_owned(),
            max_bytes: overlay_max_bytes(overlay_size),
        },
        build_disk: match (disks.build, spec.disk_gib) {
            (Some(path), Some(gib)) => Some(WritableFile {
                path: path.to_owned(),
                max_bytes: match disks.build_format {
                    DiskFormat::Raw => gib.saturating_mul(1 << 30),
                    // An overlay holds the disk's blocks and qcow2's tables.
                    DiskFormat::Qcow2 => overlay_max_bytes(gib.saturating_mul(1 << 30)),
                },
            }),
            _ => None,
        },
        backing: Vec::new(),
    })
}

/// How old an overlay or build disk must be before [`sweep_work_dir`] deletes it: a younger
/// one may belong to a VM being created right now.
const SWEEP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes the overlays and build disks in `work_dir` left by VMs that no longer exist at
/// `conn` (their owner was killed before it could destroy them), older than a minute; returns
/// what it deleted. Only files named `<contractor name>.qcow2` or `<contractor name>.disk.raw`
/// are considered, and a VM whose existence cannot be told keeps its files.
pub fn sweep_work_dir(conn: &Connect, work_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return Vec::new();
    };
    let mut deleted = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
            n.strip_suffix(".disk.raw")
                .or_else(|| n.strip_suffix(".disk.qcow2"))
                .or_else(|| n.strip_suffix(".qcow2"))
                .or_else(|| n.strip_suffix(".vmlinuz"))
                .or_else(|| n.strip_suffix(".initrd"))
        }) else {
            continue;
        };
        let old = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > SWEEP_AGE);
        if old
            && validate_name(name).is_ok()
            && !exists(conn, name)
            && std::fs::remove_file(&path).is_ok()
        {
            deleted.push(path);
        }
    }
    deleted
}

pub(crate) fn lookup(conn: &Connect, name: &str) -> Result<Domain, VmError> {
    validate_name(name)?;
    conn.lookup_domain_by_name(name).map_err(|e| {
        if is_code(&e, ErrorNumber::NoDomain) {
            VmError::NotFound {
                name: name.to_owned(),
                uri: conn_uri(conn),
            }
        } else {
            libvirt(format!("look up domain {name}"))(e)
        }
    })
}

/// The VM `name` as it is now.
pub fn status(conn: &Connect, name: &str) -> Result<VmInfo, VmError> {
    let domain = lookup(conn, name)?;
    Ok(info_from(conn, &domain, name)?.0)
}

/// Destroys VM `name` (powering it off at once) and deletes its overlay, which is found
/// from the domain's disk and deleted only if it is named `<name>.qcow2` and the connection
/// is local. Fails with [`VmError::NotFound`] if no such domain exists; to clean up after a
/// VM that is already gone, use [`destroy_vm`] with the `VmInfo` from its creation.
pub fn destroy(conn: &Connect, name: &str) -> Result<(), VmError> {
    let domain = lookup(conn, name)?;
    let overlay = info_from(conn, &domain, name)
        .ok()
        .and_then(|(info, _)| info.overlay);
    stop(&domain, name)?;
    remove_overlay(conn, overlay.as_deref(), name)
}

/// Destroys the VM described by `vm` if it still exists, then deletes `vm.overlay` (same
/// rules as [`destroy`]). A VM that is already gone is not an error.
pub fn destroy_vm(conn: &Connect, vm: &VmInfo) -> Result<(), VmError> {
    validate_name(&vm.name)?;
    match conn.lookup_domain_by_name(&vm.name) {
        Ok(domain) => stop(&domain, &vm.name)?,
        Err(e) if is_code(&e, ErrorNumber::NoDomain) => {}
        Err(e) => return Err(libvirt(format!("look up domain {}", vm.name))(e)),
    }
    remove_overlay(conn, vm.overlay.as_deref(), &vm.name)
}

fn stop(domain: &Domain, name: &str) -> Result<(), VmError> {
    let persistent = domain.is_persistent().unwrap_or(false);
    if let Err(e) = domain.destroy() {
        // Not running (or gone in the meantime) is what we wanted.
        if !is_code(&e, ErrorNumber::OperationInvalid) && !is_code(&e, ErrorNumber::NoDomain) {
            return Err(libvirt(format!("destroy domain {name}"))(e));
        }
    }
    if persistent {
        domain
            .undefine()
            .map_err(libvirt(format!("undefine domain {name}")))?;
    }
    Ok(())
}

/// Under `qemu:///session` the channel sockets go to a short private directory,
/// `/tmp/contractor-<uid>` (libvirt's own choice, under the user's config directory, can pass
/// the 107-byte limit of a socket path). Under `qemu:///system` libvirt's default is used:
/// QEMU runs as another user there and must be able to create the sockets.
fn session_socket_dir(uri: &str) -> Result<Option<PathBuf>, VmError> {
    if !is_session(uri) {
        return Ok(None);
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = PathBuf::from(format!("/tmp/contractor-{uid}"));
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(VmError::BadSpec {
                reason: format!("cannot create the socket directory {}: {e}", dir.display()),
            })
        }
    }
    // Refuse a directory someone else made (it could hand our sockets to them).
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0 => Ok(Some(dir)),
        _ => Err(VmError::BadSpec {
            reason: format!(
                "{} must be a directory owned by uid {uid} with mode 0700; remove it and retry",
                dir.display()
            ),
        }),
    }
}

fn remove_sockets(conn: &Connect, name: &str) {
    if let Ok(Some(dir)) = session_socket_dir(&conn_uri(conn)) {
        for port in [CONTROL_PORT, TUNNEL_PORT] {
            let _ = std::fs::remove_file(crate::xml::socket_path(&dir, name, port));
        }
    }
}

fn remove_overlay(conn: &Connect, overlay: Option<&Path>, name: &str) -> Result<(), VmError> {
    remove_sockets(conn, name);
    if let Some(path) = overlay {
        if is_local_uri(&conn_uri(conn)) {
            delete_overlay(path, name)?;
        }
    }
    Ok(())
}

/// Contractor's VMs (domains named `contractor-*`) at this connection, by name.
pub fn list(conn: &Connect) -> Result<Vec<VmInfo>, VmError> {
    Ok(list_with_facts(conn)?
        .into_iter()
        .map(|(info, _)| info)
        .collect())
}

/// What this host has room for: its free memory and CPUs (libvirt's node information) and
/// the Contractor VMs running now. libvirt's free memory leaves out the page cache, which
/// the kernel gives back on demand (on a busy build host it is most of the memory): on a
/// local connection the kernel's estimate of available memory (`MemAvailable` of
/// /proc/meminfo) counts instead when it is larger.
pub fn capacity(conn: &Connect) -> Result<contractor_protocol::hosted::CapacityReport, VmError> {
    let free = conn
        .free_memory()
        .map_err(libvirt(String::from("read the free memory")))?;
    let free = match is_local_uri(&conn_uri(conn)) {
        true => free.max(available_memory().unwrap_or(0)),
        false => free,
    };
    let node = conn
        .node_info()
        .map_err(libvirt(String::from("read the node information")))?;
    let running = conn
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(libvirt(String::from("list domains")))?
        .iter()
        .filter(|d| d.name().is_ok_and(|n| is_contractor_name(&n)))
        .count();
    Ok(contractor_protocol::hosted::CapacityReport::Capacity {
        version: contractor_protocol::PROTOCOL_VERSION,
        contractor: env!("CARGO_PKG_VERSION").to_string(),
        free_memory_mib: free >> 20,
        cpus: node.cpus,
        running: u32::try_from(running).unwrap_or(u32::MAX),
    })
}

/// The kernel's estimate of the memory available to new work, in bytes (`MemAvailable`
/// of /proc/meminfo, in KiB there).
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&meminfo)
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn list_with_facts(conn: &Connect) -> Result<Vec<(VmInfo, DomainFacts)>, VmError> {
    let domains = conn
        .list_all_domains(0)
        .map_err(libvirt(String::from("list domains")))?;
    let mut vms = Vec::new();
    for domain in domains {
        let Ok(name) = domain.name() else { continue };
        if !is_contractor_name(&name) {
            continue;
        }
        // A domain that vanished between listing and reading is simply not listed.
        if let Ok(found) = info_from(conn, &domain, &name) {
            vms.push(found);
        }
    }
    vms.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(vms)
}

/// Destroys every Contractor VM whose recorded owner ran on this host and has exited, and
/// deletes its overlay. Returns the reaped VMs with `state` set to `destroyed`. VMs without
/// owner metadata, or owned by processes on other hosts, are left alone.
pub fn reap(conn: &Connect) -> Result<Vec<VmInfo>, VmError> {
    let mut reaped = Vec::new();
    for (mut info, facts) in list_with_facts(conn)? {
        if facts
            .owner
            .as_ref()
            .is_some_and(VmOwner::is_gone_from_this_host)
        {
            destroy_vm(conn, &info)?;
            info.state = String::from("destroyed");
            reaped.push(info);
        }
    }
    Ok(reaped)
}

/// True while VM `name` exists at `conn`; a failed lookup for any reason other than "no
/// such domain" counts as existing.
pub fn exists(conn: &Connect, name: &str) -> bool {
    match conn.lookup_domain_by_name(name) {
        Ok(_) => true,
        Err(e) => !is_code(&e, ErrorNumber::NoDomain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo = "MemTotal:       24684000 kB\nMemFree:         2720000 kB\nMemAvailable:   23879000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(23_879_000 * 1024));
        assert_eq!(parse_mem_available("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
    }

    #[test]
    fn default_uri_honours_the_environment() {
        // Only this test touches the variable.
        std::env::set_var(URI_ENV, "test:///default");
        assert_eq!(default_uri(), "test:///default");
        std::env::remove_var(URI_ENV);
        let uri = default_uri();
        assert!(uri == "qemu:///system" || uri == "qemu:///session", "{uri}");
    }

    #[test]
    fn test_driver_lists_no_foreign_domains() {
        // test:///default has one domain, `test`, which is not ours.
        let conn = connect("test:///default").expect("test driver");
        assert!(list(&conn).expect("list").is_empty());
        assert!(reap(&conn).expect("reap").is_empty());
        assert!(matches!(
            status(&conn, "contractor-nope"),
            Err(VmError::NotFound { .. })
        ));
        assert!(matches!(destroy(&conn, "test"), Err(VmError::Name(_))));
        assert!(exists(&conn, "test"));
    }

    #[test]
    fn the_sweep_deletes_only_old_leftovers_of_contractor_vms() {
        let conn = connect("test:///default").expect("test driver");
        let dir = tempfile::tempdir().expect("tempdir");
        let old = std::time::SystemTime::now() - 2 * SWEEP_AGE;
        let make = |name: &str, age: Option<std::time::SystemTime>| {
            let path = dir.path().join(name);
            let file = std::fs::File::create(&path).expect("create");
            if let Some(age) = age {
                file.set_modified(age).expect("set mtime");
            }
            path
        };
        let leftover = make("contractor-gone1.qcow2", Some(old));
        let disk = make("contractor-gone1.disk.raw", Some(old));
        let young = make("contractor-young.qcow2", None);
        let foreign = make("test.qcow2", Some(old));
        let other = make("contractor-gone2.console.log", Some(old));
        let kernel = make("contractor-gone1.vmlinuz", Some(old));
        let initrd = make("contractor-gone1.initrd", Some(old));
        let mut deleted = sweep_work_dir(&conn, dir.path());
        deleted.sort();
        assert_eq!(
            deleted,
            vec![
                disk.clone(),
                initrd.clone(),
                leftover.clone(),
                kernel.clone()
            ]
        );
        assert!(!leftover.exists() && !disk.exists() && !kernel.exists() && !initrd.exists());
        assert!(young.exists() && foreign.exists() && other.exists());
    }

    #[test]
    fn a_missing_or_unexecutable_launcher_is_an_error_naming_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("contractor-qemu");
        let err = executable_launcher(path.clone()).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("CONTRACTOR_BIN"), "{text}");
        std::fs::write(&path, "#!/bin/sh\n").expect("write");
        assert!(executable_launcher(path.clone()).is_err(), "not executable");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(executable_launcher(path.clone()).expect("found"), path);
    }

    #[test]
    fn the_launcher_is_looked_for_beside_the_binaries() {
        // Only this test touches CONTRACTOR_BIN in this crate.
        std::env::set_var("CONTRACTOR_BIN", "/opt/contractor/bin");
        assert_eq!(
            launcher_path(),
            Some(PathBuf::from("/opt/contractor/bin/contractor-qemu"))
        );
        std::env::remove_var("CONTRACTOR_BIN");
        let beside = launcher_path().expect("path");
        let exe = std::env::current_exe().expect("exe");
        let profile = exe.parent().and_then(Path::parent).expect("target/debug");
        assert_eq!(beside, profile.join("contractor-qemu"));
    }

    #[test]
    fn unreachable_libvirt_says_what_to_do() {
        let err = connect("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
            .expect_err("no daemon there");
        let text = err.to_string();
        assert!(text.contains("libvirtd -d"), "{text}");
        assert!(text.contains("/nonexistent/libvirt-sock"), "{text}");
    }
}
