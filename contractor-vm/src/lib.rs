//! contractor-vm: the builder VM's lifecycle through libvirt.
//!
//! A builder VM is a transient libvirt domain booted directly from a kernel (and initrd)
//! on a fresh qcow2 overlay of a base image, with no network interface: its only links to
//! the host are two virtio-serial channels (control and tunnel), exposed as Unix sockets.
//! This crate creates such VMs, reports on them, destroys them with their overlays, lists
//! them and reaps those whose owning process died. It also builds and imports the images
//! they boot ([`image`]). Everything is addressed by a libvirt
//! connection URI, so the same calls work against a remote host.
//!
//! The invariant kept across the crate: it only ever touches domains named
//! `contractor-[a-z0-9-]{1,50}`, and only ever deletes VM files named `<that name>.qcow2` or
//! `<that name>.disk.raw` (and image directories under `<data>/images/`).
//!
//! [`handle`] carries out one [`VmRequest`]; the `contractor-vm` binary is a thin shell
//! around it (see [`cli`]). The crate's second binary, `contractor-qemu` ([`launcher`]), is
//! the emulator libvirt runs for a builder under `qemu:///session`: it confines itself and
//! then executes the real QEMU.

#![warn(missing_docs)]

pub mod accel;
pub mod check;
pub mod cli;
pub mod image;
pub mod launcher;
pub mod lifecycle;
pub mod name;
pub mod overlay;
pub mod owner;
pub mod snapshot;
pub mod xml;

use std::path::PathBuf;

use contractor_protocol::vm::{VmRequest, VmResult};
use contractor_protocol::{ExitCode, PROTOCOL_VERSION};

use crate::accel::KvmUnusable;

pub use lifecycle::{
    connect, create, create_owned, default_uri, destroy, destroy_vm, list, reap, status, URI_ENV,
};
pub use name::{generate_name, validate_name, NameError};
pub use overlay::OverlayError;
pub use owner::VmOwner;
pub use xml::{domain_xml, Disks, XmlError};

/// Everything that can go wrong handling a request.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM name is not valid.
    #[error("bad VM name")]
    Name(#[from] NameError),
    /// The spec asks for something impossible.
    #[error("invalid VM spec: {reason}")]
    BadSpec {
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// A file the VM needs does not exist.
    #[error("the {what} {} does not exist (or cannot be read)", path.display())]
    MissingFile {
        /// Which file (`kernel`, `initrd`, `base disk`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// libvirt cannot be reached.
    #[error(
        "cannot connect to libvirt at {uri}: is the daemon running? As root without systemd \
         start it with `mkdir -p /var/log/libvirt /var/run/libvirt; virtlogd -d; libvirtd -d`; \
         with systemd `systemctl start libvirtd`; qemu:///session (non-root) needs the \
         libvirt-daemon package installed; another URI can be chosen with --uri or \
         CONTRACTOR_LIBVIRT_URI"
    )]
    Connect {
        /// The URI tried.
        uri: String,
        /// What libvirt said.
        #[source]
        source: virt::error::Error,
    },
    /// No Contractor VM of that name exists.
    #[error("no VM named {name} at {uri} (`contractor-vm list` shows the VMs)")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The URI searched.
        uri: String,
    },
    /// The overlay disk could not be made or removed.
    #[error("overlay disk")]
    Overlay(#[from] OverlayError),
    /// libvirt's XML could not be read.
    #[error("domain XML")]
    Xml(#[from] XmlError),
    /// libvirt refused an operation.
    #[error("libvirt could not {action}")]
    Libvirt {
        /// What was attempted, e.g. `start domain contractor-1a2b`.
        action: String,
        /// What libvirt said.
        #[source]
        source: virt::error::Error,
    },
    /// Under `qemu:///session` QEMU is started through the launcher, which is missing.
    #[error(
        "the QEMU launcher {} is missing or not executable: under qemu:///session QEMU is \
         started confined through it; it is built with contractor-vm (cargo build -p \
         contractor-vm) and looked for beside contractor-vm, or in $CONTRACTOR_BIN when set",
        path.display()
    )]
    MissingLauncher {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// No real QEMU for the launcher to execute.
    #[error(
        "no QEMU found for the launcher: libvirt names no x86_64 emulator and none of {} \
         exists; install qemu-system-x86",
        launcher::QEMU_CANDIDATES.join(", ")
    )]
    NoQemu,
    /// KVM was asked for explicitly (`accel: kvm`) where it cannot work.
    #[error("cannot use KVM: {reason}; or use --accel tcg (software emulation, slower)")]
    KvmUnusable {
        /// Why, with what would make it work.
        reason: KvmUnusable,
    },
    /// This build of contractor-vm does not support the request.
    #[error("unsupported request: {reason}")]
    Unsupported {
        /// What and why.
        reason: String,
    },
}

impl From<KvmUnusable> for VmError {
    fn from(reason: KvmUnusable) -> VmError {
        VmError::KvmUnusable { reason }
    }
}

impl VmError {
    /// The exit code a tool reports for this error: `BadInput` for what the caller can fix
    /// in the request, `Infrastructure` for everything else.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            VmError::Name(_)
            | VmError::BadSpec { .. }
            | VmError::MissingFile { .. }
            | VmError::NotFound { .. }
            | VmError::Unsupported { .. } => ExitCode::BadInput,
            VmError::KvmUnusable {
                reason: KvmUnusable::NoCapabilities { .. },
            } => ExitCode::Infrastructure,
            VmError::KvmUnusable { .. } => ExitCode::BadInput,
            VmError::Connect { .. }
            | VmError::Overlay(_)
            | VmError::MissingLauncher { .. }
            | VmError::NoQemu
            | VmError::Xml(_)
            | VmError::Libvirt { .. } => ExitCode::Infrastructure,
        }
    }
}

/// Carries out one request, owned by the current process (see [`handle_owned`]).
///
/// A VM created here is not tied to the connection (no autodestroy), since the connection
/// closes when this returns: destroy it with a `Destroy` request, or `reap` it after the
/// current process exits.
pub fn handle(request: VmRequest) -> Result<VmResult, VmError> {
    handle_owned(request, VmOwner::current())
}

/// Carries out one request; a created VM records `owner` in its metadata, so that
/// [`reap`] destroys it once that process is gone.
pub fn handle_owned(request: VmRequest, owner: VmOwner) -> Result<VmResult, VmError> {
    check_version(&request)?;
    let version = PROTOCOL_VERSION;
    match request {
        VmRequest::Create { uri, spec, .. } => {
            let conn = connect(&uri)?;
            let vm = create_owned(&conn, &spec, false, owner)?;
            Ok(VmResult::Vm { version, vm })
        }
        VmRequest::Status { uri, name, .. } => {
            let conn = connect(&uri)?;
            Ok(VmResult::Vm {
                version,
                vm: status(&conn, &name)?,
            })
        }
        VmRequest::Destroy { uri, name, .. } => {
            let conn = connect(&uri)?;
            destroy(&conn, &name)?;
            Ok(VmResult::Destroyed { version, name })
        }
        VmRequest::List { uri, .. } => {
            let conn = connect(&uri)?;
            Ok(VmResult::List {
                version,
                vms: list(&conn)?,
            })
        }
    }
}

fn check_version(request: &VmRequest) -> Result<(), VmError> {
    let version = match request {
        VmRequest::Create { version, .. }
        | VmRequest::Status { version, .. }
        | VmRequest::Destroy { version, .. }
        | VmRequest::List { version, .. } => *version,
    };
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(VmError::Unsupported {
            reason: format!(
                "protocol version {version}; this contractor-vm speaks version {PROTOCOL_VERSION}"
            ),
        })
    }
}
