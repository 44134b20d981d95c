//! Raising the soft limit of open files to the hard limit, for every tool: a build may hold
//! many tunnel streams, connections and files at once, and running out of descriptors must
//! not stop a relay, the agent or the front end. The hard limit is never changed.

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the soft limit now in force.
pub fn raise_open_files() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(soft.max(hard))
}

#[cfg(test)]
mod tests {
    use nix::sys::resource::{getrlimit, Resource};

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let raised = super::raise_open_files().expect("raise");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!((raised, soft), (hard, hard));
    }
}
