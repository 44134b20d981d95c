//! Snapshots of a booted builder: a VM saved (libvirt's `virDomainSave`) as its agent
//! waits for its job, and restored for later builds instead of booting.
//!
//! A snapshot belongs to one image and one VM shape, its *key*: the image's disk and agent
//! (sha256 from its manifest, and the size and modification time of its disk, kernel and
//! initrd), the kernel command line, the libvirt and QEMU versions, the machine type, the
//! accelerator, the CPUs, memory and build-disk size, the connection and (under
//! `qemu:///session`) the launcher and QEMU. The key is checked on every use; a missing,
//! stale or unreadable snapshot means a cold boot that saves a new one, and the reason is
//! reported ([`SnapshotReport`]), never a failed build.
//!
//! Layout, under the image's directory:
//!
//! ```text
//! snapshots/<key hash>-<slot>/snapshot.json   the key, the domain's UUID, the files' seals
//!                             state.save      libvirt's saved state (memory and devices)
//!                             root.qcow2      the root overlay as it was when saved
//!                             disk.raw        the build disk as it was when saved
//!                             console.log     the console of the boot that made it
//! snapshots/<key hash>-<slot>.lock            held by the VM restored from that slot (it
//!                                             says `releasing` while that VM is destroyed)
//! ```
//!
//! libvirt restores a saved domain only under the name and UUID it was saved with, so one
//! snapshot runs as at most one VM at a time: a key has up to [`SLOTS_PER_KEY`] slots,
//! each its own snapshot and domain name (`contractor-snap-<hash>-<slot>`), claimed with
//! `flock` for the life of the VM. A restored VM gets new overlays on the slot's root and
//! build disk (the slot's files are only ever read, and never handed to QEMU's user: see
//! [`crate::xml`]; they are sealed when made and checked before each restore, see
//! [`seal`]), new channel sockets, its own console
//! log and owner, and a new VM generation ID; its clock and randomness come with its job
//! (the agent sets them, see contractor-run's `guest::fresh`). An image keeps at most
//! [`MAX_SNAPSHOTS`] snapshots; making one more removes the least recently used one that is
//! not in use.
//!
//! libvirt does not autodestroy a restored domain when its creator's connection closes: the
//! holder (`contractor-vm create --hold`) destroys it, on SIGTERM too; a holder killed
//! with SIGKILL leaves it to the next claim of the slot (which destroys a domain of the
//! slot's name it finds running) or to `contractor-vm reap` (its owner is gone).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use contractor_protocol::agent::{GuestMessage, HostMessage};
use contractor_protocol::image::SnapshotInfo;
use contractor_protocol::vm::{Accel, SnapshotReport, VmInfo, VmSpec};
use contractor_protocol::PROTOCOL_VERSION;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use virt::connect::Connect;

use crate::accel::{is_local_uri, resolve};
use crate::lifecycle::{
    checked_spec, conn_uri, create, create_owned, destroy, destroy_vm, exists, info_from,
    launcher_for, libvirt, lookup, own_boot_files, planned_xml, Plan,
};
use crate::overlay::{
    build_disk_path, build_overlay_path, create_overlay_on, create_work_dir, delete_overlay,
    overlay_path, sized_chain,
};
use crate::owner::VmOwner;
use crate::xml::{DiskFormat, Disks, Identity, Layer};
use crate::VmError;

mod seal;

/// The layout version of a snapshot; part of its key. 2: its files are sealed
/// (`snapshot.json`'s `files`, see [`seal`]). 3: under KVM the guest's CPU hides vmx and
/// svm ([`crate::xml::HIDDEN_CPU_FEATURES`]), which a saved state must match.
pub const SNAPSHOT_LAYOUT: u32 = 3;
/// The most snapshots (and so restored VMs at once) of one image and shape: 16. A slot is
/// made only when a build finds every made one in use (that build boots cold and saves
/// it), so a shape has as many as the most builds of it that ran at once; a build past
/// the 16th boots cold without saving.
pub const SLOTS_PER_KEY: usize = 16;
/// The most snapshots an image keeps, of all shapes: 24 (each is about the guest's used
/// memory plus its root's changes, some 150-200 MiB for the Debian images: at most
/// 3.6-4.8 GiB an image, reached only by that many builds at once).
pub const MAX_SNAPSHOTS: usize = 24;
/// How long a claim waits for a slot whose VM is being destroyed before it takes a slot
/// without a snapshot (which costs a cold boot and a save): 10 s.
const RELEASING_WAIT: Duration = Duration::from_secs(10);
/// What a holder writes into its slot's lock file when it lets go of the VM.
const RELEASING_MARK: &[u8] = b"releasing\n";
/// The directory of an image that holds its snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// How long a cold boot that makes a snapshot may take until the agent answers: 300 s.
const AGENT_WAIT: Duration = Duration::from_secs(300);
/// How often `hello` is repeated until the agent answers.
const HELLO_REPEAT: Duration = Duration::from_secs(1);
/// The longest line read from the agent while waiting for its `hello`: 64 KiB.
const MAX_LINE: usize = 64 * 1024;
/// The biggest `snapshot.json` read: 64 KiB.
const MAX_RECORD: u64 = 64 * 1024;

const RECORD_FILE: &str = "snapshot.json";
const STATE_FILE: &str = "state.save";
const ROOT_FILE: &str = "root.qcow2";
const DISK_FILE: &str = "disk.raw";
const CONSOLE_FILE: &str = "console.log";

/// What a snapshot is valid for. Two keys that differ in any field name different
/// snapshots; a slot whose recorded key differs from the one wanted is stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Key {
    layout: u32,
    /// The image's directory.
    image: PathBuf,
    disk_sha256: String,
    agent_sha256: String,
    /// The disk, kernel and initrd as found on this host.
    files: Vec<FileStamp>,
    cmdline: String,
    uri: String,
    libvirt_version: u32,
    qemu_version: u32,
    machine: String,
    /// Under `qemu:///session`: the launcher and the QEMU it executes.
    emulator: Option<(PathBuf, PathBuf)>,
    accel: Accel,
    /// Under KVM, where the guest's CPU is the host's (`host-passthrough`): the sha256 of
    /// libvirt's description of the host CPU (model, vendor, microcode, features;
    /// [`host_cpu_signature`]), so that a state saved on one CPU, or before a microcode or
    /// kernel update changed what the host offers, is never restored onto another. None
    /// under TCG, whose CPU is QEMU's (its version is above).
    host_cpu: Option<String>,
    cpus: u32,
    memory_mib: u64,
    disk_gib: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStamp {
    path: PathBuf,
    size: u64,
    modified_ns: u128,
}

/// `snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    key: Key,
    /// The saved domain's UUID and VM generation ID, which libvirt requires on restore.
    uuid: String,
    genid: String,
    /// When it was made, seconds since the Unix epoch.
    created: u64,
    /// Its saved state, root and build disk, as they were made ([`seal`]).
    files: Vec<seal::SealedFile>,
}

/// A claimed slot: its directory and domain name, and the lock that keeps it ours.
pub struct Slot {
    dir: PathBuf,
    name: String,
    _lock: std::fs::File,
}

impl Slot {
    /// Marks the slot, in its lock file, as being let go: its VM is being destroyed, and a
    /// claim made meanwhile waits for it ([`claim`]). Best effort.
    pub fn mark_releasing(&self) {
        use std::os::unix::fs::FileExt;
        let _ = self._lock.write_all_at(RELEASING_MARK, 0);
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .finish()
    }
}

/// Creates a VM held by the caller: from a snapshot when `spec.snapshot` asks for one (and
/// the connection is local), else booted cold. The returned slot, if any, must be kept
/// until the VM is destroyed.
pub fn create_held(conn: &Connect, spec: &VmSpec) -> Result<(VmInfo, Option<Slot>), VmError> {
    if !spec.snapshot {
        return create(conn, spec, true).map(|vm| (vm, None));
    }
    let owner = VmOwner::current();
    let uri = conn_uri(conn);
    if !is_local_uri(&uri) {
        return cold(
            conn,
            spec,
            &owner,
            "snapshots are kept only for a local libvirt".into(),
        );
    }
    let spec = checked_spec(spec, true)?;
    let accel = resolve(spec.accel, &uri, || conn.capabilities().ok())?;
    let launcher = launcher_for(conn, &uri)?;
    let key = match key_of(conn, &spec, accel, &uri, launcher.as_ref()) {
        Ok(key) => key,
        Err(reason) => return cold(conn, &spec, &owner, reason),
    };
    let root = key.image.join(SNAPSHOTS_DIR);
    if let Err(err) = create_work_dir(&root) {
        return cold(
            conn,
            &spec,
            &owner,
            format!("cannot create {}: {err}", root.display()),
        );
    }
    let Some(slot) = claim(conn, &root, &key) else {
        return cold(
            conn,
            &spec,
            &owner,
            format!("all {SLOTS_PER_KEY} snapshots of this image and shape are in use"),
        );
    };
    let restore_slot =
        |record: &Record| restore(conn, &spec, accel, &slot, record, &owner, launcher.as_ref());
    let reason = match read_record(&slot.dir) {
        Ok(Some(record)) if record.key == key => match checked(&slot.dir, record) {
            Ok(record) => match restore_slot(&record) {
                Ok(vm) => {
                    touch(&slot.dir.join(RECORD_FILE));
                    return Ok((with_report(vm, true, false, None, &slot), Some(slot)));
                }
                Err(err) => format!(
                    "the snapshot could not be restored: {}",
                    contractor_protocol::result::joined_chain(&err)
                ),
            },
            Err(why) => why,
        },
        Ok(Some(record)) => format!("the snapshot is stale: {}", difference(&record.key, &key)),
        Ok(None) => "no snapshot of this image and shape yet".to_string(),
        Err(err) => format!("the snapshot is unreadable: {err}"),
    };
    evict(&root, &slot);
    match make(conn, &spec, &slot, &key, &owner) {
        Made::Saved(record) => match restore_slot(&record) {
            Ok(vm) => Ok((with_report(vm, true, true, Some(reason), &slot), Some(slot))),
            Err(err) => {
                let _ = std::fs::remove_dir_all(&slot.dir);
                let why = format!(
                    "{reason}; the new snapshot could not be restored: {}",
                    contractor_protocol::result::joined_chain(&err)
                );
                cold(conn, &spec, &owner, why)
            }
        },
        // The VM booted and its agent answered, but it could not be saved: it is the VM.
        Made::Running(vm, err) => {
            let why = format!("{reason}; it could not be saved: {err}");
            Ok((with_report(vm, false, false, Some(why), &slot), Some(slot)))
        }
        Made::Failed(err) => {
            let why = format!("{reason}; none could be made: {err}");
            cold(conn, &spec, &owner, why)
        }
    }
}

fn with_report(
    mut vm: VmInfo,
    restored: bool,
    created: bool,
    reason: Option<String>,
    slot: &Slot,
) -> VmInfo {
    vm.snapshot = Some(SnapshotReport {
        restored,
        created,
        reason,
        dir: Some(slot.dir.clone()),
    });
    vm
}

/// A cold boot, saying why it is one.
fn cold(
    conn: &Connect,
    spec: &VmSpec,
    owner: &VmOwner,
    reason: String,
) -> Result<(VmInfo, Option<Slot>), VmError> {
    let mut vm = create_owned(conn, spec, true, owner.clone())?;
    vm.snapshot = Some(SnapshotReport {
        restored: false,
        created: false,
        reason: Some(reason),
        dir: None,
    });
    Ok((vm, None))
}

fn key_of(
    conn: &Connect,
    spec: &VmSpec,
    accel: Accel,
    uri: &str,
    launcher: Option<&(PathBuf, PathBuf)>,
) -> Result<Key, String> {
    let image_dir = spec
        .image
        .disk
        .parent()
        .ok_or_else(|| "the base disk is not in an image directory".to_string())?;
    let image = crate::image::load(image_dir)
        .map_err(|e| format!("cannot read the image's manifest: {e}"))?
        .ok_or_else(|| {
            format!(
                "{} has no manifest.json: snapshots are kept for images of contractor-vm",
                image_dir.display()
            )
        })?;
    let mut files = vec![stamp(&spec.image.disk)?, stamp(&spec.image.kernel)?];
    if let Some(initrd) = &spec.image.initrd {
        files.push(stamp(initrd)?);
    }
    Ok(Key {
        layout: SNAPSHOT_LAYOUT,
        image: image.dir.clone(),
        disk_sha256: image.manifest.disk_sha256.clone(),
        agent_sha256: image.manifest.agent_sha256.clone(),
        files,
        cmdline: crate::xml::kernel_cmdline(&spec.image.cmdline, accel),
        uri: uri.to_string(),
        libvirt_version: conn
            .lib_version()
            .map_err(|e| format!("cannot read libvirt's version: {e}"))?,
        qemu_version: conn
            .hyp_version()
            .map_err(|e| format!("cannot read QEMU's version: {e}"))?,
        machine: crate::xml::MACHINE.to_string(),
        emulator: launcher.cloned(),
        accel,
        host_cpu: match accel {
            Accel::Kvm => Some(
                conn.capabilities()
                    .ok()
                    .as_deref()
                    .and_then(host_cpu_signature)
                    .ok_or("libvirt's capabilities describe no host CPU")?,
            ),
            Accel::Tcg | Accel::Auto => None,
        },
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
    })
}

/// The sha256 (hex) of the `<cpu>` element of the `<host>` in a libvirt capabilities
/// document, as written: what KVM's `host-passthrough` gives a guest follows from it. None
/// when the document has no such element.
fn host_cpu_signature(capabilities: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(capabilities).ok()?;
    let cpu = doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("host"))?
        .children()
        .find(|n| n.has_tag_name("cpu"))?;
    Some(crate::image::hex(&Sha256::digest(
        &capabilities.as_bytes()[cpu.range()],
    )))
}

fn stamp(path: &Path) -> Result<FileStamp, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(FileStamp {
        path: path.to_owned(),
        size: meta.len(),
        modified_ns,
    })
}

fn key_hash(key: &Key) -> String {
    let text = serde_json::to_vec(key).unwrap_or_default();
    crate::image::hex(&Sha256::digest(text))[..12].to_string()
}

/// A slot of `key` nobody holds, claimed: the first one with a snapshot made, else the
/// first one without. While no made slot is free but one is being let go (its holder has
/// marked it, [`Slot::mark_releasing`]), the claim waits for that one, up to
/// [`RELEASING_WAIT`], rather than make a snapshot in another (a cold boot and a save): a
/// build that starts as the one before it ends finds its slot. A domain of the slot's name
/// still running (its holder was killed) is destroyed first.
fn claim(conn: &Connect, root: &Path, key: &Key) -> Option<Slot> {
    let hash = key_hash(key);
    let deadline = Instant::now() + RELEASING_WAIT;
    loop {
        let mut spare = None;
        let mut releasing = false;
        for n in 0..SLOTS_PER_KEY {
            let dir = root.join(format!("{hash}-{n}"));
            let made = dir.join(RECORD_FILE).exists();
            let lock_path = root.join(format!("{hash}-{n}.lock"));
            match try_lock(&lock_path) {
                Some(lock) if made => {
                    if let Some(slot) = take(conn, &hash, n, dir, lock) {
                        return Some(slot);
                    }
                }
                Some(lock) => {
                    if spare.is_none() {
                        spare = Some((n, dir, lock));
                    }
                }
                None => releasing |= made && is_releasing(&lock_path),
            }
        }
        if !releasing || Instant::now() >= deadline {
            return spare.and_then(|(n, dir, lock)| take(conn, &hash, n, dir, lock));
        }
        drop(spare);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Slot `n` of `hash`, whose lock is held: its stale releasing mark cleared, a domain of its
/// name still running destroyed; `None` if that domain cannot be destroyed.
fn take(conn: &Connect, hash: &str, n: usize, dir: PathBuf, lock: std::fs::File) -> Option<Slot> {
    let name = format!("{}snap-{hash}-{n}", crate::name::NAME_PREFIX);
    if exists(conn, &name) && destroy(conn, &name).is_err() {
        return None;
    }
    let _ = lock.set_len(0);
    Some(Slot {
        dir,
        name,
        _lock: lock,
    })
}

/// Whether the slot lock file at `path` holds the releasing mark (at most its length read).
fn is_releasing(path: &Path) -> bool {
    use std::io::Read;
    let mut mark = Vec::with_capacity(RELEASING_MARK.len());
    std::fs::File::open(path)
        .and_then(|file| {
            file.take(RELEASING_MARK.len() as u64)
                .read_to_end(&mut mark)
        })
        .is_ok()
        && mark == RELEASING_MARK
}

/// The lock file at `path`, locked (`flock`, exclusive) if nobody else holds it.
fn try_lock(path: &Path) -> Option<std::fs::File> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    // SAFETY: flock on a descriptor we own.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    locked.then_some(lock)
}

fn read_record(dir: &Path) -> Result<Option<Record>, String> {
    use std::io::Read;
    let path = dir.join(RECORD_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut text = Vec::new();
    file.take(MAX_RECORD)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let record: Record =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for file in [STATE_FILE, ROOT_FILE] {
        if !dir.join(file).is_file() {
            return Err(format!("{} is missing", dir.join(file).display()));
        }
    }
    if record.key.disk_gib.is_some() && !dir.join(DISK_FILE).is_file() {
        return Err(format!("{} is missing", dir.join(DISK_FILE).display()));
    }
    Ok(Some(record))
}

/// `record` once its files are found as they were sealed (a file whose identity changed is
/// hashed again and, unchanged, recorded with its new identity); `Err` says which changed.
fn checked(dir: &Path, mut record: Record) -> Result<Record, String> {
    let mut wanted = vec![STATE_FILE, ROOT_FILE];
    if record.key.disk_gib.is_some() {
        wanted.push(DISK_FILE);
    }
    if let Some(missing) = wanted
        .iter()
        .find(|name| !record.files.iter().any(|f| f.name == **name))
    {
        return Err(format!(
            "the snapshot was discarded, not restored: {} has no seal of {missing}",
            dir.join(RECORD_FILE).display()
        ));
    }
    match seal::check(dir, &record.files) {
        Ok(seal::Checked::Unchanged) => Ok(record),
        Ok(seal::Checked::Resealed(files)) => {
            record.files = files;
            write_record(dir, &record)?;
            Ok(record)
        }
        Err(why) => Err(format!("the snapshot was discarded, not restored: {why}")),
    }
}

/// Which fields of the key differ, with both values.
fn difference(saved: &Key, wanted: &Key) -> String {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(wanted))
    else {
        return "its key differs".to_string();
    };
    let fields: Vec<String> = b
        .iter()
        .filter(|(field, value)| a.get(*field) != Some(value))
        .map(|(field, value)| {
            let was = a.get(field).map_or("none".to_string(), |v| v.to_string());
            format!("{field} was {was}, is {value}")
        })
        .collect();
    if fields.is_empty() {
        "its key differs".to_string()
    } else {
        fields.join("; ")
    }
}

/// Marks a snapshot as used now (eviction removes the least recently used).
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Makes room for one more snapshot under `root`: while there are [`MAX_SNAPSHOTS`] or more
/// besides `slot`, removes the least recently used one nobody holds.
fn evict(root: &Path, slot: &Slot) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut snapshots: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && *p != slot.dir)
        .map(|p| {
            let used = std::fs::metadata(p.join(RECORD_FILE))
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            (used, p)
        })
        .collect();
    snapshots.sort();
    let mut count = snapshots.len();
    for (_, dir) in snapshots {
        if count < MAX_SNAPSHOTS {
            break;
        }
        let lock = try_lock(&dir.with_extension("lock"));
        if lock.is_some() && std::fs::remove_dir_all(&dir).is_ok() {
            count -= 1;
        }
    }
}

enum Made {
    Saved(Record),
    /// Booted and answering, not saved: the VM to use.
    Running(VmInfo, String),
    Failed(String),
}

/// Boots the slot's domain cold, waits for its agent, saves it into the slot.
fn make(conn: &Connect, spec: &VmSpec, slot: &Slot, key: &Key, owner: &VmOwner) -> Made {
    let _ = std::fs::remove_dir_all(&slot.dir);
    if let Err(err) = create_work_dir(&slot.dir) {
        return Made::Failed(err.to_string());
    }
    let mut boot = spec.clone();
    boot.name = Some(slot.name.clone());
    boot.console_log = slot.dir.join(CONSOLE_FILE);
    let vm = match create_owned(conn, &boot, true, owner.clone()) {
        Ok(vm) => vm,
        Err(err) => return Made::Failed(contractor_protocol::result::joined_chain(&err)),
    };
    // By the VM as created, not by name: a guest that died (its agent crashed, its kernel
    // panicked) leaves no domain to look up, and its overlay and copies would stay behind,
    // so that every later build found them and could not make this slot again.
    let fail = |why: String| {
        let _ = destroy_vm(conn, &vm);
        let _ = std::fs::remove_dir_all(&slot.dir);
        Made::Failed(why)
    };
    let Some(control) = vm.control_socket.clone() else {
        return fail("libvirt did not report the control channel's socket".into());
    };
    if let Err(err) = wait_for_agent(&control, AGENT_WAIT) {
        return fail(format!("its agent did not answer: {err}"));
    }
    let domain = match lookup(conn, &slot.name) {
        Ok(domain) => domain,
        Err(err) => return fail(err.to_string()),
    };
    let uuid = match domain.uuid_string() {
        Ok(uuid) => uuid,
        Err(err) => return Made::Running(vm, format!("cannot read the domain's UUID: {err}")),
    };
    let genid = match info_from(conn, &domain, &slot.name).map(|(_, facts)| facts.genid) {
        Ok(Some(genid)) => genid,
        Ok(None) => return Made::Running(vm, "libvirt gave the domain no genid".into()),
        Err(err) => return Made::Running(vm, err.to_string()),
    };
    let partial = slot.dir.join(format!("{STATE_FILE}.part"));
    if let Err(err) = save(&domain, &partial) {
        let _ = std::fs::remove_file(&partial);
        return Made::Running(vm, err.to_string());
    }
    // The domain is gone; its disks, as they were, become the snapshot's.
    let moved = [
        (
            overlay_path(&spec.work_dir, &slot.name),
            slot.dir.join(ROOT_FILE),
        ),
        (
            build_disk_path(&spec.work_dir, &slot.name),
            slot.dir.join(DISK_FILE),
        ),
    ]
    .into_iter()
    .filter(|(from, _)| from.exists())
    .try_for_each(|(from, to)| {
        std::fs::rename(&from, &to)
            .map_err(|e| format!("cannot move {} to {}: {e}", from.display(), to.display()))
    });
    // Its files become ours (libvirt may have left them QEMU's user's), read only, sealed;
    // the record, written last, makes it a snapshot.
    let finished = moved
        .and_then(|()| {
            std::fs::rename(&partial, slot.dir.join(STATE_FILE))
                .map_err(|e| format!("cannot rename {}: {e}", partial.display()))
        })
        .and_then(|()| {
            [STATE_FILE, ROOT_FILE, DISK_FILE]
                .into_iter()
                .filter(|name| slot.dir.join(name).exists())
                .map(|name| seal::seal(&slot.dir, name))
                .collect::<Result<Vec<_>, String>>()
        })
        .and_then(|files| {
            let record = Record {
                key: key.clone(),
                uuid,
                genid,
                created: std::time::SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                files,
            };
            write_record(&slot.dir, &record).map(|()| record)
        });
    match finished {
        Ok(record) => Made::Saved(record),
        Err(why) => {
            let _ = delete_overlay(&overlay_path(&spec.work_dir, &slot.name), &slot.name);
            let _ = std::fs::remove_dir_all(&slot.dir);
            Made::Failed(why)
        }
    }
}

fn write_record(dir: &Path, record: &Record) -> Result<(), String> {
    let path = dir.join(RECORD_FILE);
    let partial = dir.join(format!("{RECORD_FILE}.part"));
    let text = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `virDomainSave`: the domain's memory and devices to `path`; the domain stops.
fn save(domain: &virt::domain::Domain, path: &Path) -> Result<(), VmError> {
    let action = || format!("save the domain to {}", path.display());
    let text = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::BadSpec {
            reason: format!("{} contains a NUL byte", path.display()),
        }
    })?;
    // SAFETY: the domain pointer is valid while `domain` lives; the path is a C string.
    let saved = unsafe { virt::sys::virDomainSave(domain.as_ptr(), text.as_ptr()) };
    if saved == 0 {
        Ok(())
    } else {
        Err(libvirt(action())(virt::error::Error::last_error()))
    }
}

/// Says `hello` on the control socket (again each second) until the agent answers with its
/// own, within `wait`. The guest is ours until its job arrives; its lines are bounded all
/// the same.
fn wait_for_agent(socket: &Path, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(err) if Instant::now() >= deadline => {
                return Err(format!("cannot connect to {}: {err}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut hello = serde_json::to_vec(&HostMessage::Hello {
        version: PROTOCOL_VERSION,
    })
    .map_err(|e| e.to_string())?;
    hello.push(b'\n');
    stream
        .set_read_timeout(Some(HELLO_REPEAT))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut last_hello: Option<Instant> = None;
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no hello within {} s", wait.as_secs()));
        }
        if last_hello.is_none_or(|t| t.elapsed() >= HELLO_REPEAT) {
            writer
                .write_all(&hello)
                .map_err(|e| format!("cannot write to {}: {e}", socket.display()))?;
            last_hello = Some(Instant::now());
        }
        match reader.read_until(b'\n', &mut line) {
            // QEMU closed its end: the VM is gone (its kernel panicked, say).
            Ok(0) => return Err("the VM stopped before its agent answered".to_string()),
            Ok(_) if line.ends_with(b"\n") => {
                if let Ok(GuestMessage::Hello { .. }) = serde_json::from_slice(&line) {
                    return Ok(());
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("cannot read {}: {e}", socket.display())),
        }
        if line.len() > MAX_LINE {
            return Err(format!(
                "the agent wrote a line longer than {MAX_LINE} bytes"
            ));
        }
    }
}

/// The backing chain of the slot's `root` (it and what it stands on, the image's disk), as
/// the domain names it, and its size. Read from the headers, not with `qemu-img` (see
/// `crate::overlay::qcow2`): no process starts on the way to the VM.
fn chain_of(root: &Path) -> Result<(Vec<Layer>, u64), VmError> {
    let layers = sized_chain(root, "qcow2")?;
    let size = layers.first().map_or(0, |l| l.size);
    let chain = layers
        .into_iter()
        .map(|l| Layer {
            path: l.path,
            format: l.format,
        })
        .collect();
    Ok((chain, size))
}

/// A new overlay at `path` on the slot's build disk `disk` (raw), written directly, without
/// flushes.
fn build_overlay_on(disk: &Path, path: &Path) -> Result<PathBuf, crate::overlay::OverlayError> {
    let size = std::fs::metadata(disk)
        .map_err(|source| crate::overlay::OverlayError::Read {
            path: disk.to_path_buf(),
            source,
        })?
        .len();
    create_overlay_on(disk, "raw", size, path)?;
    Ok(path.to_path_buf())
}

/// Restores the slot's snapshot as this build's VM.
fn restore(
    conn: &Connect,
    spec: &VmSpec,
    accel: Accel,
    slot: &Slot,
    record: &Record,
    owner: &VmOwner,
    launcher: Option<&(PathBuf, PathBuf)>,
) -> Result<VmInfo, VmError> {
    let name = slot.name.as_str();
    if let Some(dir) = spec.console_log.parent() {
        create_work_dir(dir)?;
    }
    create_work_dir(&spec.work_dir)?;
    let overlay = overlay_path(&spec.work_dir, name);
    let root = slot.dir.join(ROOT_FILE);
    let disk = slot.dir.join(DISK_FILE);
    // The slot's root and what it stands on (the image's disk), and its build disk: read
    // only, never relabelled.
    let (root_chain, root_size) = chain_of(&root)?;
    let disk_chain = [Layer {
        path: disk.clone(),
        format: "raw".to_string(),
    }];
    create_overlay_on(&root, "qcow2", root_size, &overlay)?;
    let mut spec = spec.clone();
    if let Err(err) = own_boot_files(&mut spec, &conn_uri(conn), launcher, name) {
        let _ = delete_overlay(&overlay, name);
        return Err(err);
    }
    let spec = &spec;
    let build = match spec.disk_gib {
        Some(_) => match build_overlay_on(&disk, &build_overlay_path(&spec.work_dir, name)) {
            Ok(path) => Some(path),
            Err(err) => {
                let _ = delete_overlay(&overlay, name);
                return Err(err.into());
            }
        },
        None => None,
    };
    let plan = Plan {
        identity: Identity {
            name,
            uuid: Some(&record.uuid),
            genid: Some(&record.genid),
        },
        accel,
        disks: Disks {
            overlay: &overlay,
            overlay_backing: &root_chain,
            build: build.as_deref(),
            build_format: DiskFormat::Qcow2,
            build_backing: &disk_chain,
        },
        backing: if build.is_some() {
            vec![root, disk]
        } else {
            vec![root]
        },
        owner,
        launcher,
    };
    let uri = conn_uri(conn);
    let state = slot.dir.join(STATE_FILE);
    let restored = planned_xml(&uri, spec, &plan).and_then(|xml| {
        conn.restore_domain_flags(
            &state.to_string_lossy(),
            Some(&xml),
            virt::sys::VIR_DOMAIN_SAVE_RUNNING,
        )
        .map_err(libvirt(format!(
            "restore {} from {}",
            name,
            state.display()
        )))?;
        let domain = lookup(conn, name)?;
        match info_from(conn, &domain, name) {
            Ok((info, _)) => Ok(info),
            Err(err) => {
                let _ = domain.destroy();
                Err(err)
            }
        }
    });
    if restored.is_err() {
        let _ = delete_overlay(&overlay, name);
    }
    restored
}

/// The snapshots kept for the image in `image_dir`, for `image list`.
pub fn list(image_dir: &Path) -> Vec<SnapshotInfo> {
    let Ok(entries) = std::fs::read_dir(image_dir.join(SNAPSHOTS_DIR)) else {
        return Vec::new();
    };
    let mut found: Vec<SnapshotInfo> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let dir = e.path();
            let record = read_record(&dir).ok().flatten()?;
            Some(SnapshotInfo {
                bytes: allocated(&dir),
                cpus: record.key.cpus,
                memory_mib: record.key.memory_mib,
                disk_gib: record.key.disk_gib,
                accel: record.key.accel,
                created: record.created,
                dir,
            })
        })
        .collect();
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    found
}

/// The bytes the files in `dir` take on disk (their blocks: the build disk is sparse).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            layout: SNAPSHOT_LAYOUT,
            image: "/d/images/debian-12-build".into(),
            disk_sha256: "aa".into(),
            agent_sha256: "bb".into(),
            files: vec![FileStamp {
                path: "/d/images/debian-12-build/disk.qcow2".into(),
                size: 7,
                modified_ns: 9,
            }],
            cmdline: "console=ttyS0".into(),
            uri: "qemu:///system".into(),
            libvirt_version: 9_000_000,
            qemu_version: 7_002_000,
            machine: "q35".into(),
            emulator: None,
            accel: Accel::Tcg,
            host_cpu: None,
            cpus: 2,
            memory_mib: 2048,
            disk_gib: Some(8),
        }
    }

    #[test]
    fn a_stale_key_names_each_field_that_differs_with_both_values() {
        let mut now = key();
        now.qemu_version = 7_002_001;
        now.memory_mib = 4096;
        let text = difference(&key(), &now);
        assert!(
            text.contains("qemu_version was 7002000, is 7002001"),
            "{text}"
        );
        assert!(text.contains("memory_mib was 2048, is 4096"), "{text}");
        assert!(!text.contains("cpus"), "{text}");
    }

    #[test]
    fn under_kvm_the_key_follows_the_host_cpu_libvirt_describes() {
        let caps = |microcode: &str| {
            format!(
                "<capabilities><host><uuid>u</uuid><cpu><arch>x86_64</arch>\
                 <model>Skylake-Client-IBRS</model><vendor>Intel</vendor>\
                 <microcode version='{microcode}'/><feature name='vmx'/></cpu>\
                 <power_management/></host><guest><os_type>hvm</os_type></guest>\
                 </capabilities>"
            )
        };
        let before = host_cpu_signature(&caps("240")).expect("a host cpu");
        assert_eq!(before.len(), 64);
        assert_eq!(host_cpu_signature(&caps("240")), Some(before.clone()));
        let after = host_cpu_signature(&caps("248")).expect("a host cpu");
        assert_ne!(before, after, "a microcode update makes another key");
        assert_eq!(
            host_cpu_signature("<capabilities><host><uuid>u</uuid></host></capabilities>"),
            None
        );
        assert_eq!(host_cpu_signature("not xml"), None);
        let mut kvm = key();
        kvm.accel = Accel::Kvm;
        kvm.host_cpu = Some(before);
        let mut moved = kvm.clone();
        moved.host_cpu = Some(after);
        assert_ne!(key_hash(&kvm), key_hash(&moved));
        assert!(
            difference(&kvm, &moved).contains("host_cpu"),
            "{}",
            difference(&kvm, &moved)
        );
    }

    #[test]
    fn the_key_hash_names_the_shape_and_changes_with_it() {
        let mut other = key();
        other.cpus = 1;
        assert_eq!(key_hash(&key()).len(), 12);
        assert_eq!(key_hash(&key()), key_hash(&key()));
        assert_ne!(key_hash(&key()), key_hash(&other));
    }

    #[test]
    fn a_slot_is_claimed_by_one_holder_at_a_time_and_a_record_needs_its_files() {
        let conn = crate::lifecycle::connect("test:///default").expect("test driver");
        let dir = tempfile::tempdir().expect("tempdir");
        let first = claim(&conn, dir.path(), &key()).expect("slot 0");
        let second = claim(&conn, dir.path(), &key()).expect("slot 1");
        assert_ne!(first.dir, second.dir);
        assert_ne!(first.name, second.name);
        crate::name::validate_name(&first.name).expect("a contractor name");
        let dir0 = first.dir.clone();
        drop(first);
        let again = claim(&conn, dir.path(), &key()).expect("slot 0 is free again");
        assert_eq!(again.dir, dir0);

        std::fs::create_dir_all(&again.dir).expect("mkdir");
        assert!(read_record(&again.dir).expect("no record").is_none());
        let record = Record {
            key: key(),
            uuid: "u".into(),
            genid: "g".into(),
            created: 1,
            files: Vec::new(),
        };
        write_record(&again.dir, &record).expect("write");
        let err = read_record(&again.dir).expect_err("files missing");
        assert!(err.contains(STATE_FILE), "{err}");
        for file in [STATE_FILE, ROOT_FILE, DISK_FILE] {
            std::fs::write(again.dir.join(file), b"x").expect("write");
        }
        let read = read_record(&again.dir).expect("readable").expect("present");
        assert_eq!(read.key, key());
        let err = checked(&again.dir, read.clone()).expect_err("no seals");
        assert!(err.contains("no seal of state.save"), "{err}");
        let sealed = [STATE_FILE, ROOT_FILE, DISK_FILE]
            .into_iter()
            .map(|name| seal::seal(&again.dir, name).expect("seal"))
            .collect();
        let record = Record {
            files: sealed,
            ..read
        };
        assert!(checked(&again.dir, record.clone()).is_ok());
        std::fs::write(again.dir.join(ROOT_FILE), b"y").expect("write");
        let err = checked(&again.dir, record).expect_err("changed");
        assert!(err.contains("root.qcow2 changed"), "{err}");
        std::fs::write(again.dir.join(RECORD_FILE), b"{").expect("write");
        assert!(read_record(&again.dir).is_err(), "unparsable is unreadable");
    }

    #[test]
    fn eight_builds_at_once_each_get_a_slot_of_their_own() {
        let conn = crate::lifecycle::connect("test:///default").expect("test driver");
        let dir = tempfile::tempdir().expect("tempdir");
        let held: Vec<Slot> = (0..8)
            .map(|n| claim(&conn, dir.path(), &key()).unwrap_or_else(|| panic!("slot {n}")))
            .collect();
        let names: std::collections::BTreeSet<&str> =
            held.iter().map(|slot| slot.name.as_str()).collect();
        assert_eq!(names.len(), 8, "{names:?}");
    }

    #[test]
    fn a_claim_waits_for_a_made_slot_being_let_go_rather_than_make_another() {
        let conn = crate::lifecycle::connect("test:///default").expect("test driver");
        let dir = tempfile::tempdir().expect("tempdir");
        let first = claim(&conn, dir.path(), &key()).expect("slot 0");
        std::fs::create_dir_all(&first.dir).expect("mkdir");
        std::fs::write(first.dir.join(RECORD_FILE), b"{}").expect("made");
        let made = first.dir.clone();
        // Held and not being let go: the next claim takes another slot at once.
        let other = claim(&conn, dir.path(), &key()).expect("slot 1");
        assert_ne!(other.dir, made);
        drop(other);
        first.mark_releasing();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let next = claim(&conn, dir.path(), &key()).expect("a slot");
        holder.join().expect("holder");
        assert_eq!(next.dir, made, "the made slot, once let go");
        let lock = dir.path().join(format!("{}-0.lock", key_hash(&key())));
        assert!(!is_releasing(&lock), "a new holder clears the mark");
    }
}
