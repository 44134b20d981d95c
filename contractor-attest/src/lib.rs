//! contractor-attest: the signed provenance of a build record, and its check.
//!
//! The statement is an in-toto Statement v1 with the SLSA provenance v1 predicate, wrapped
//! in a DSSE envelope signed with ed25519 over DSSE's pre-authentication encoding (PAE), so
//! that tools we did not write can check it (docs/provenance.md). The invariant: the signing
//! key is read only by this tool, before it confines itself to reading the one record (and
//! the project's `.git`) and writing that record's `provenance.json` (or, comparing a
//! rebuild, its `rebuild.json`); the front end never holds the key, and never parses a
//! record's files to state, check or compare them.

#![warn(missing_docs)]

pub mod cli;
pub mod confinement;
pub mod digest;
pub mod dsse;
pub mod fixture;
pub mod key;
pub mod rebuild;
pub mod statement;
pub mod verify;

use std::path::PathBuf;

/// Why provenance could not be written, checked, or a key not made or read.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// A file could not be read or written.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file is not an ed25519 key in the expected PEM.
    #[error(
        "{path} is not an ed25519 {what} in PEM ({detail}); `contractor key` prints the public key"
    )]
    BadKey {
        /// The file.
        path: PathBuf,
        /// `private key (PKCS#8)` or `public key (SubjectPublicKeyInfo)`.
        what: &'static str,
        /// The parser's word.
        detail: String,
    },
    /// The record holds more artifacts than a statement lists.
    #[error("{0} holds more than {max} artifacts", max = digest::MAX_SUBJECTS)]
    TooManyArtifacts(PathBuf),
    /// The record to rebuild has no readable `provenance.json`.
    #[error("cannot read {path}: a rebuild needs the record's signed statement (a build that ran its script has one)")]
    NoStatement {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The spec says something else than the statement's `externalParameters` (a rebuild
    /// builds what the record states).
    #[error("{file} is not what build {id} was built with: {} differ ({}); restore it (e.g. `git checkout` the commit of that build) to rebuild", fields.len(), fields.join(", "))]
    SpecChanged {
        /// The spec file.
        file: PathBuf,
        /// The build.
        id: String,
        /// The fields that differ (`externalParameters.<name>`, `vm.<name>`).
        fields: Vec<String>,
    },
    /// The stated image is gone from this host or has other bytes, and the rebuild was not
    /// asked to go on with the current one: how it differs.
    #[error("{0}; `contractor rebuild --any-image` rebuilds with the current image (and says which inputs differ)")]
    ImageChanged(String),
    /// A key could not be encoded.
    #[error("cannot encode the key: {0}")]
    Encode(String),
    /// The envelope to check is not one of ours.
    #[error(transparent)]
    Statement(#[from] contractor_protocol::attest::StatementError),
}

impl AttestError {
    /// True when the input is at fault (a bad key file, a bad envelope): exit code 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            AttestError::BadKey { .. }
                | AttestError::Statement(_)
                | AttestError::Io { .. }
                | AttestError::NoStatement { .. }
                | AttestError::SpecChanged { .. }
                | AttestError::ImageChanged(_)
        )
    }
}

pub(crate) fn io(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> AttestError {
    let path = path.to_path_buf();
    move |source| AttestError::Io {
        action,
        path,
        source,
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
