//! contractor-store: the artifact store. It serves an ordinary host directory over HTTP/1.1
//! so that a build VM can fetch its sources (`GET /builds/<id>/source.tar`) and upload its
//! artifacts (`PUT /builds/<id>/artifacts/<path>`).
//!
//! The invariant every module keeps: no request reads or writes outside the root, and a
//! client can write only beneath a build's `artifacts/` directory, one whole file at a time.
//! [`path`] checks request paths without touching the disk, [`access`] decides what a build
//! token allows, [`files`] does the disk work with symlinks in mind, [`digest`] hashes,
//! [`limits`] keeps uploads within their size limits, [`range`] reads conditional and
//! partial GETs, [`records`] writes artifact indexes and collects garbage, [`opening`] makes a build's record
//! and [`closing`] writes its `result.json`, and [`server`]
//! speaks HTTP; [`confinement`] says what a serving store may still reach once it confines
//! itself (before its first read from a client); [`receipt`] receives the record of a build
//! run on a build host, confined to that record; [`reading`] reads records back for the front end. Off the wire, [`pack`] packs a project's tree into a record's `source.tar`
//! and [`cache`] keeps a project's build cache in the store directory.

#![warn(missing_docs)]

pub mod access;
pub mod cache;
pub mod closing;
pub mod confinement;
pub mod digest;
pub mod files;
pub mod follow;
pub mod limits;
pub mod opening;
pub mod pack;
pub mod path;
pub mod range;
pub mod reading;
pub mod receipt;
pub mod records;
pub mod server;
pub mod sourcing;
mod sys;
pub mod worktree;

pub use access::{generate_token, TokenTable};
pub use path::{resolve, PathError, StorePath};
pub use records::{collect_garbage, write_artifact_index, ArtifactIndex, GcOptions, GcSummary};
pub use server::{
    serve, Store, StoreConfig, StoreError, DEFAULT_BODY_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    SHUTDOWN_GRACE,
};
