//! What `contractor-attest` may still reach once it has read its key and opened the one
//! file it writes: the record it states or checks (and, to state the source, the project's
//! `.git`), read-only. No other file, no socket, no new process. The key is read before
//! this, so a record's hostile bytes are parsed by a process that can no longer reach it.

use std::path::PathBuf;

use contractor_confine::Policy;

/// The most files it holds open (a record walk, one file at a time, and its standard streams).
pub const MAX_OPEN_FILES: u64 = 64;

/// The policy of a process that reads only `read`. The statement is written through a file
/// opened before confinement; no other.
pub fn policy(read: Vec<PathBuf>) -> Policy {
    Policy::offline(read, Vec::new(), MAX_OPEN_FILES)
}
