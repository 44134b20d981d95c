//! The Landlock part of a [`Policy`]: every file-system access right the crate knows is
//! handled (so denied unless a rule grants it), TCP bind and connect are handled where the
//! kernel has them (ABI 4), and so are abstract UNIX sockets and signals to processes
//! outside the sandbox (ABI 6). Best effort against the running kernel, with a warning for
//! every part the kernel cannot enforce.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use crate::{ConfineError, Policy};

/// The newest ABI this crate's rules are written for.
const TARGET: ABI = ABI::V6;

/// What Landlock enforces after [`apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enforced {
    /// The kernel's ABI version, 0 without Landlock.
    pub kernel_abi: u32,
    /// File-system rules hold.
    pub fs: bool,
    /// TCP rules hold.
    pub net: bool,
}

/// The running kernel's Landlock ABI version, 0 when it has none (or it is disabled).
pub fn kernel_abi() -> u32 {
    crate::sys::landlock_abi()
}

/// Restricts the calling thread (and the threads it starts afterwards) to `policy`.
pub fn apply(policy: &Policy, warnings: &mut Vec<String>) -> Result<Enforced, ConfineError> {
    let kernel_abi = kernel_abi();
    if kernel_abi == 0 {
        warnings.push(
            "this kernel has no Landlock (or it is disabled): the file system and TCP are \
             NOT confined"
                .to_string(),
        );
        return Ok(Enforced {
            kernel_abi,
            fs: false,
            net: false,
        });
    }
    let read = AccessFs::from_read(TARGET);
    let all = AccessFs::from_all(TARGET);
    let net_access = if policy.connect_ports.is_some() {
        AccessNet::from_all(TARGET)
    } else {
        BitFlags::from(AccessNet::BindTcp)
    };
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .and_then(|r| r.handle_access(net_access))
        .and_then(|r| r.scope(Scope::from_all(TARGET)))
        .and_then(|r| r.create())
        .map_err(ConfineError::Landlock)?;
    for (paths, access) in [(&policy.read, read), (&policy.read_write, all)] {
        for path in with_targets(paths) {
            // A path that does not exist cannot be reached: nothing to grant.
            let Ok(fd) = PathFd::new(&path) else { continue };
            let access = if path.is_dir() {
                access
            } else {
                access & AccessFs::from_file(TARGET)
            };
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(ConfineError::Landlock)?;
        }
    }
    for (ports, access) in [
        (policy.bind_ports.as_slice(), AccessNet::BindTcp),
        (
            policy.connect_ports.as_deref().unwrap_or_default(),
            AccessNet::ConnectTcp,
        ),
    ] {
        for &port in ports {
            ruleset = ruleset
                .add_rule(NetPort::new(port, BitFlags::from(access)))
                .map_err(ConfineError::Landlock)?;
        }
    }
    let status = ruleset.restrict_self().map_err(ConfineError::Landlock)?;
    let fs = status.ruleset != RulesetStatus::NotEnforced;
    let net = fs && kernel_abi >= 4;
    if !fs {
        warnings.push(format!(
            "Landlock (ABI {kernel_abi}) did not enforce the rules: the file system and TCP \
             are NOT confined"
        ));
    } else if !net {
        warnings.push(format!(
            "this kernel's Landlock (ABI {kernel_abi}) has no TCP rules (they need ABI 4): \
             TCP bind and connect are NOT confined"
        ));
    }
    if net && policy.connect_ports.is_none() {
        warnings.push("TCP connect is NOT confined (any port): only bind is".to_string());
    }
    Ok(Enforced {
        kernel_abi,
        fs,
        net,
    })
}

/// `paths`, each followed by what it resolves to when that differs (Landlock checks the
/// object reached, so `/etc/resolv.conf -> /run/.../stub-resolv.conf` needs both).
fn with_targets(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut all = Vec::with_capacity(paths.len() * 2);
    for path in paths {
        all.push(path.clone());
        if let Ok(target) = Path::new(path).canonicalize() {
            if &target != path {
                all.push(target);
            }
        }
    }
    all
}
