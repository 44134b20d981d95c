//! `record open`: a build's record made by the store, so that the front end and a script
//! (examples/pipeline.sh) open one alike: the id (a new one, or the caller's checked), the
//! directory `ROOT/builds/<id>/` (mode 0755: libvirt's QEMU user reads the console log's
//! directory), its `owner.json`, and the `latest` link.
//!
//! The invariant: a record is opened once, and owned from its first moment. Its directory is
//! made with `mkdir` (never a directory that exists: a given id already there is refused, a
//! new id that collides is drawn again), and `owner.json` names the process whose death
//! abandons the build (`--owner`, by pid and start time): [`crate::records::liveness`], the
//! one rule, decides from it alone.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use contractor_protocol::hosted::{is_build_id, new_build_id};
use contractor_protocol::process::{Owner, OWNER_FILE};

/// How many fresh ids are drawn before a collision is an error (three random bytes per
/// second: a second collision means something else is wrong).
const NEW_ID_TRIES: usize = 4;

/// Why a record could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The id given is not one the front end makes.
    #[error("build id {0:?} is not valid; give YYYYMMDD-HHMMSS- and six lowercase hex digits, e.g. 20261125-141502-3fa2c1")]
    BadId(String),
    /// The id given has a record already.
    #[error("build {id} has a record already: {path} exists")]
    Exists {
        /// The id.
        id: String,
        /// Its record.
        path: PathBuf,
    },
    /// `--owner` names no running process.
    #[error("--owner {0} names no running process; give the pid of the process the build lives as long as")]
    NoOwner(u32),
    /// The file system failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    /// The error code of this failure.
    pub fn code(&self) -> contractor_protocol::error::ToolCode {
        use contractor_protocol::error::ToolCode;
        match self {
            OpenError::BadId(_) => ToolCode::BadBuild,
            OpenError::Exists { .. } => ToolCode::RecordExists,
            OpenError::NoOwner(_) => ToolCode::BadOwner,
            OpenError::Io { .. } => ToolCode::RecordOpen,
        }
    }

    /// True when the caller asked for something that cannot be (exit 2).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, OpenError::Io { .. })
    }
}

/// A record opened: the build's id and its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The build's id.
    pub id: String,
    /// `root/builds/<id>`, absolute (the links above it resolved).
    pub dir: PathBuf,
}

/// Opens the record of a new build under `root` (created if missing): `id`, or a new id,
/// its directory, its `owner.json` naming process `owner`, and `root/latest` pointing at it.
/// Blocking.
pub fn open(root: &Path, id: Option<&str>, owner: u32) -> Result<Opened, OpenError> {
    let owner = Owner {
        pid: owner,
        start: contractor_protocol::process::start_time(owner),
    };
    if owner.start.is_none() {
        return Err(OpenError::NoOwner(owner.pid));
    }
    if let Some(id) = id.filter(|id| !is_build_id(id)) {
        return Err(OpenError::BadId(id.to_string()));
    }
    let builds = root.join("builds");
    let builds = contractor_protocol::file::create_dir_world_readable(&builds)
        .and_then(|()| builds.canonicalize())
        .map_err(|source| OpenError::Io {
            action: "create",
            path: builds.clone(),
            source,
        })?;
    let opened = match id {
        Some(id) => make_record(&builds, id)?,
        None => new_record(&builds)?,
    };
    write_owner(&opened.dir, &owner)?;
    point_latest(root, &opened.id);
    Ok(opened)
}

/// The record of a new id: drawn again while one exists.
fn new_record(builds: &Path) -> Result<Opened, OpenError> {
    let mut tries = 1;
    loop {
        match make_record(builds, &new_build_id()) {
            Err(OpenError::Exists { .. }) if tries < NEW_ID_TRIES => tries += 1,
            made => return made,
        }
    }
}

/// `builds/<id>`, made now (mode 0755 less the umask); one that exists is refused.
fn make_record(builds: &Path, id: &str) -> Result<Opened, OpenError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = builds.join(id);
    match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
        Ok(()) => Ok(Opened {
            id: id.to_string(),
            dir,
        }),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(OpenError::Exists {
            id: id.to_string(),
            path: dir,
        }),
        Err(source) => Err(OpenError::Io {
            action: "create",
            path: dir,
            source,
        }),
    }
}

/// Writes the record's `owner.json`: `{"pid":4242,"start":98765}`.
fn write_owner(dir: &Path, owner: &Owner) -> Result<(), OpenError> {
    let path = dir.join(OWNER_FILE);
    let written = (|| {
        let mut file = std::fs::File::create(&path)?;
        serde_json::to_writer(&mut file, owner).map_err(io::Error::other)?;
        file.flush()
    })();
    written.map_err(|source| OpenError::Io {
        action: "write",
        path,
        source,
    })
}

/// `root/latest` → `builds/<id>`, replaced whole (a link made aside, then renamed); a
/// failure leaves the old link, which only a person reads.
fn point_latest(root: &Path, id: &str) {
    let link = root.join("latest");
    let temp = root.join(format!(".latest-{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    if std::os::unix::fs::symlink(Path::new("builds").join(id), &temp).is_ok() {
        let _ = std::fs::rename(&temp, &link);
    }
}
