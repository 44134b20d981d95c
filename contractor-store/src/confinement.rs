//! What a serving store may still reach once it confines itself ([`policy`]): the one
//! build's record read-write (`--only-build`; that is where it reads the source, the inputs
//! and the cache tar, and writes artifacts) or, when it serves the whole root, the root
//! read-write (builds and `cas/` blobs beneath it); the token file read-only, since it is
//! read again when it changes; TCP bind only to the port it already listens on, and no TCP
//! connect at all. Nothing else on the host: not the user's home, not the rest of the store.
//! `record receive` and `record follow` ([`receipt_policy`]), which read a build host's
//! stream, may write only that one record, and make no socket at all. `record
//! list|show|downloads|log` ([`reading_policy`]) may only read `ROOT/builds/`.

use std::path::{Path, PathBuf};

use contractor_confine::Policy;

/// The most files a serving store holds open (connections, uploads, reads).
pub const MAX_OPEN_FILES: u64 = 8192;

/// What the store needs to serve, all of it known before the first client connects.
#[derive(Debug, Clone)]
pub struct Needs<'a> {
    /// The canonical store root.
    pub root: &'a Path,
    /// `--only-build`: the one build it serves.
    pub only_build: Option<&'a str>,
    /// `--token-file`.
    pub token_file: Option<&'a Path>,
    /// The port it listens on.
    pub port: u16,
}

/// The confinement policy of a store that serves `needs`.
pub fn policy(needs: &Needs<'_>) -> Policy {
    let writable: Vec<PathBuf> = match needs.only_build {
        Some(id) if crate::path::is_build_id(id) => vec![needs.root.join("builds").join(id)],
        Some(_) => Vec::new(),
        None => vec![needs.root.to_path_buf()],
    };
    let read = needs
        .token_file
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    // It accepts on the socket it listens on and makes none. No RLIMIT_FSIZE: the store's
    // own limits bound every upload.
    Policy {
        bind_ports: vec![needs.port],
        ..Policy::offline(read, writable, MAX_OPEN_FILES)
    }
}

/// The most files `record receive` holds open (its streams, one file, the directories).
pub const RECEIPT_OPEN_FILES: u64 = 64;

/// The confinement policy of `record receive` into the record directory `record`
/// (canonical): that directory read-write, nothing else; no TCP, no new socket, no exec.
pub fn receipt_policy(record: &Path) -> Policy {
    // No RLIMIT_FSIZE: the receipt charges every file against the record's limit.
    Policy::offline(Vec::new(), vec![record.to_path_buf()], RECEIPT_OPEN_FILES)
}

/// The confinement policy of `record list|show|downloads|log` beneath `builds` (canonical
/// `ROOT/builds`): that directory read-only, nothing else; no TCP, no new socket, no exec.
pub fn reading_policy(builds: &Path) -> Policy {
    Policy::offline(vec![builds.to_path_buf()], Vec::new(), RECEIPT_OPEN_FILES)
}
