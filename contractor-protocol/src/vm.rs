//! Requests to and results from `contractor-vm`: one request enum (create, status, destroy,
//! list, reap), one result per request. What the user asked for (`VmSpec`) is kept apart
//! from what exists at run time (`VmInfo`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The environment variable that overrides [`default_uri`].
pub const URI_ENV: &str = "CONTRACTOR_LIBVIRT_URI";

/// The libvirt URI to use when none is given: `$CONTRACTOR_LIBVIRT_URI` if set, else
/// `qemu:///system` for root and `qemu:///session` for everyone else.
pub fn default_uri() -> String {
    if let Some(uri) = std::env::var(URI_ENV).ok().filter(|u| !u.is_empty()) {
        return uri;
    }
    if nix::unistd::geteuid().is_root() {
        String::from("qemu:///system")
    } else {
        String::from("qemu:///session")
    }
}

/// The environment variable that sets the accelerator when no `--accel` is given: `auto`,
/// `kvm` or `tcg` ([`default_accel`]); for a machine or a runner whose `auto` should be
/// overridden without changing every command line.
pub const ACCEL_ENV: &str = "CONTRACTOR_ACCEL";

/// The accelerator to use when none is given: `$CONTRACTOR_ACCEL` if set and not empty, else
/// [`Accel::Auto`]; any other value is refused, naming the variable and what it takes.
pub fn default_accel() -> Result<Accel, String> {
    match std::env::var(ACCEL_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(Accel::Auto),
        Ok(value) => match value.as_str() {
            "" | "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!(
                "{ACCEL_ENV} is {value:?}: it takes auto, kvm or tcg (or unset it)"
            )),
        },
        Err(std::env::VarError::NotUnicode(value)) => Err(format!(
            "{ACCEL_ENV} is {value:?}: it takes auto, kvm or tcg (or unset it)"
        )),
    }
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// KVM where it can work (the CPU has the vmx or svm flag, the user QEMU runs as can
    /// open `/dev/kvm`, libvirt offers it), otherwise TCG.
    #[default]
    Auto,
    /// Hardware virtualisation; contractor-vm refuses it where KVM cannot work
    /// (`kvm_unusable`).
    Kvm,
    /// Software emulation; works everywhere, slower.
    Tcg,
}

/// The boot files of a builder image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootImage {
    /// The qcow2 base disk; never written: each VM gets an overlay on it.
    pub disk: PathBuf,
    /// The kernel for direct kernel boot.
    pub kernel: PathBuf,
    /// The initrd, if the kernel needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// What the caller asks for when creating a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Domain name; must start with `contractor-`. Generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The image to boot.
    pub image: BootImage,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Size in GiB of the VM's build disk (`vdb`, an empty ext4 the guest agent puts the
    /// writable layer of its root on); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// Accelerator choice.
    #[serde(default)]
    pub accel: Accel,
    /// Where the serial console is logged.
    pub console_log: PathBuf,
    /// Directory for the overlay and build disk (deleted with the VM).
    pub work_dir: PathBuf,
    /// Start from a saved, booted builder of this image and shape when there is one, and
    /// save one when there is not (`create --hold` only; a VM that outlives its creator
    /// always boots cold). What the VM came from is its `snapshot` report.
    #[serde(default, skip_serializing_if = "is_false")]
    pub snapshot: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A request to `contractor-vm`, on stdin or built from flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmRequest {
    /// Create and start a transient VM.
    Create {
        /// Protocol version, 1.
        version: u32,
        /// libvirt connection URI.
        uri: String,
        /// What to create.
        spec: VmSpec,
    },
    /// Report one VM's state.
    Status {
        /// Protocol version, 1.
        version: u32,
        /// libvirt connection URI.
        uri: String,
        /// Domain name.
        name: String,
    },
    /// Destroy a VM and delete its overlay.
    Destroy {
        /// Protocol version, 1.
        version: u32,
        /// libvirt connection URI.
        uri: String,
        /// Domain name.
        name: String,
    },
    /// List Contractor's VMs.
    List {
        /// Protocol version, 1.
        version: u32,
        /// libvirt connection URI.
        uri: String,
    },
}

/// A VM as it exists at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// Domain name.
    pub name: String,
    /// libvirt connection URI.
    pub uri: String,
    /// libvirt's state: `running`, `shutoff`, ...
    pub state: String,
    /// Host end of the control channel (a Unix socket), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Host end of the tunnel channel (a Unix socket), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_socket: Option<PathBuf>,
    /// The VM's overlay disk, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
    /// The accelerator in use (`kvm` or `tcg`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// How the VM started when a snapshot was asked for (`spec.snapshot`); none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotReport>,
}

/// How a VM that could start from a snapshot started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReport {
    /// Restored from a saved, booted builder (false: booted cold).
    pub restored: bool,
    /// The snapshot was made by this create (it booted cold, saved, then restored).
    #[serde(default, skip_serializing_if = "is_false")]
    pub created: bool,
    /// Why there was no usable snapshot (missing, stale and why, unreadable, all in use),
    /// or why none could be made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The snapshot's directory, when one was used or made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// The single result object `contractor-vm` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmResult {
    /// A VM (after create or status).
    Vm {
        /// Protocol version, 1.
        version: u32,
        /// The VM.
        vm: VmInfo,
    },
    /// The VM is gone.
    Destroyed {
        /// Protocol version, 1.
        version: u32,
        /// Domain name.
        name: String,
    },
    /// Contractor's VMs.
    List {
        /// Protocol version, 1.
        version: u32,
        /// The VMs.
        vms: Vec<VmInfo>,
    },
}

/// What `contractor-vm check` prints: whether the host can run builder VMs, as raw facts
/// (for scripts) and as `findings`, each fact judged with its fix (what `contractor doctor`
/// prints).
/// `{"type":"check","version":1,"uri":"qemu:///session","libvirt":{"ok":true},
/// "cpu_virt":true,"dev_kvm":true,"agent":{"ok":true,"path":"/usr/lib/contractor/contractor-agent"},
/// "findings":[{"status":"ok","what":"libvirt","detail":"qemu:///session answers"}]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCheck {
    /// Always `check`.
    #[serde(rename = "type")]
    pub kind: CheckTag,
    /// Protocol version, 1.
    pub version: u32,
    /// The libvirt URI checked.
    pub uri: String,
    /// Whether libvirt answers at `uri`.
    pub libvirt: Probe,
    /// Whether the CPU has the vmx or svm flag (hardware virtualisation): this host's, or
    /// for a remote URI the host CPU of libvirt's capabilities there.
    pub cpu_virt: bool,
    /// Whether `/dev/kvm` exists on this host (false for a remote URI: not seen from here).
    pub dev_kvm: bool,
    /// Under `qemu:///session`: whether this user may read and write `/dev/kvm` (QEMU runs
    /// as this user there). Absent under another URI, and from an older contractor-vm's
    /// answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_kvm_yours: Option<bool>,
    /// Whether libvirt's capabilities offer the `kvm` domain type for x86_64 guests (it
    /// lists it only when the user it runs QEMU as can use KVM). Absent when they were not
    /// read (a local CPU without the flag) or libvirt did not answer, and from an older
    /// contractor-vm's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_kvm: Option<bool>,
    /// Whether the static guest agent that images are built with is there.
    pub agent: Probe,
    /// The programs the VM host needs (QEMU, qemu-img, mmdebstrap, e2fsprogs), each with
    /// where it was found. Absent from an older contractor-vm's answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramProbe>,
    /// Whether `/dev/kvm` is readable and writable by its group (without udev it may stay
    /// root-only: libvirt then re-probes QEMU on every call); absent without `/dev/kvm`,
    /// and for a remote URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_kvm_group_rw: Option<bool>,
    /// For a user other than root: whether they have subordinate uids (image builds run
    /// mmdebstrap in a user namespace). Absent for root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subuids: Option<SubuidProbe>,
    /// The free space where the images and VM disks live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<SpaceProbe>,
    /// Under `qemu:///session`: the launcher (`contractor-qemu`) QEMU is started confined
    /// through, found (`path`) or not (`error`). Absent under another URI, and from an older
    /// contractor-vm's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher: Option<Probe>,
    /// The facts above judged by the VM host's contractor-vm, plus whether the default
    /// builder image ([`crate::image::DEFAULT_IMAGE`]) is built there: one finding each, in
    /// the order `contractor doctor` prints them.
    pub findings: Vec<Finding>,
}

/// One judged fact of a [`HostCheck`]: how it came out, what was checked, and what was
/// found (with the command or setting that fixes it when it is not ok).
/// `{"status":"fail","what":"mmdebstrap","detail":"not found; install it: sudo apt-get install mmdebstrap (or run scripts/setup)"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finding {
    /// How it came out.
    pub status: FindingStatus,
    /// What was checked, e.g. `libvirt`, `qemu-img`, `disk space`.
    pub what: String,
    /// What was found, and the fix when it is not ok.
    pub detail: String,
}

impl Finding {
    /// A finding about `what`.
    pub fn new(status: FindingStatus, what: &str, detail: impl Into<String>) -> Finding {
        Finding {
            status,
            what: what.to_string(),
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Finding {
    /// Its line in `contractor doctor`: `ok  `, `warn` or `FAIL`, what was checked (padded
    /// to 17 columns), and what was found.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.status {
            FindingStatus::Ok => "ok  ",
            FindingStatus::Warn => "warn",
            FindingStatus::Fail => "FAIL",
        };
        write!(f, "{status} {:<17} {}", self.what, self.detail)
    }
}

/// How a [`Finding`] came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingStatus {
    /// `"ok"`: fine.
    Ok,
    /// `"warn"`: works, but worth knowing (slower, or soon a problem).
    Warn,
    /// `"fail"`: a build cannot work until this is fixed.
    Fail,
}

/// A program of a [`HostCheck`]: found at `path`, or not (then `package` has it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramProbe {
    /// Its name, e.g. `qemu-img`.
    pub name: String,
    /// The Debian package that installs it.
    pub package: String,
    /// Where it is; absent when it is not on `PATH`, `/usr/sbin` or `/sbin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// The subordinate uids of a [`HostCheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubuidProbe {
    /// The user (`$USER`).
    pub user: String,
    /// Whether `/etc/subuid` gives them a range.
    pub has_range: bool,
}

/// The free space of a [`HostCheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpaceProbe {
    /// The data directory, or its nearest existing ancestor.
    pub path: PathBuf,
    /// Bytes free there for this user; absent when it cannot be told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
}

/// The `"type"` of a [`HostCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckTag {
    /// `"check"`
    Check,
}

/// One probe of a [`HostCheck`]: fine, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// Whether it is fine.
    pub ok: bool,
    /// What was found, when it is a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// When not fine: the error and its causes, outermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub error: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finding_is_one_doctor_line_with_its_status_in_four_columns() {
        let line =
            |status, what: &str, detail: &str| Finding::new(status, what, detail).to_string();
        assert_eq!(
            line(FindingStatus::Ok, "libvirt", "qemu:///system answers"),
            "ok   libvirt           qemu:///system answers"
        );
        assert_eq!(
            line(FindingStatus::Warn, "kvm", "absent: builds run under TCG"),
            "warn kvm               absent: builds run under TCG"
        );
        assert_eq!(
            line(FindingStatus::Fail, "a-longer-what-than-17", "x"),
            "FAIL a-longer-what-than-17 x"
        );
    }
}
