//! The rlimits of a [`Policy`]: open files lowered (never raised), the largest file the
//! process may write, the address space it may map, and no core dumps (a core would hold guest data and secrets).

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::{ConfineError, Policy};

/// Sets the rlimits `policy` asks for, and `RLIMIT_CORE` to 0.
pub fn apply(policy: &Policy) -> Result<(), ConfineError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| ConfineError::Rlimit("RLIMIT_CORE", e))?;
    if let Some(max) = policy.max_open_files {
        lower(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", max)?;
    }
    if let Some(max) = policy.max_file_size {
        lower(Resource::RLIMIT_FSIZE, "RLIMIT_FSIZE", max)?;
    }
    if let Some(max) = policy.max_address_space {
        lower(Resource::RLIMIT_AS, "RLIMIT_AS", max)?;
    }
    Ok(())
}

/// Sets both limits of `resource` to `max`, or leaves a lower hard limit as it is.
fn lower(resource: Resource, name: &'static str, max: u64) -> Result<(), ConfineError> {
    let (_, hard) = getrlimit(resource).map_err(|e| ConfineError::Rlimit(name, e))?;
    let limit = max.min(hard);
    setrlimit(resource, limit, limit).map_err(|e| ConfineError::Rlimit(name, e))
}
