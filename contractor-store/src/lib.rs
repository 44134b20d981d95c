//! contractor-store: the artifact store. It serves an ordinary host directory over HTTP/1.1
//! so that a build VM can fetch its sources (`GET /builds/<id>/source.tar`) and upload its
//! artifacts (`PUT /builds/<id>/artifacts/<path>`).
//!
//! The invariant every module keeps: no request reads or writes outside the root, and a
//! client can write only beneath a build's `artifacts/` directory, one whole file at a time.
//! [`path`] checks request paths without touching the disk, [`files`] does the disk work
//! with symlinks in mind, and [`server`] speaks HTTP.

#![warn(missing_docs)]

pub mod files;
pub mod path;
pub mod server;

pub use path::{resolve, PathError, StorePath};
pub use server::{serve, Store, StoreConfig, StoreError, SHUTDOWN_GRACE};
