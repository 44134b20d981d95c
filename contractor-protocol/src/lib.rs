//! The wire types every Contractor tool speaks.
//!
//! Each tool reads one request object (JSON) on stdin and writes either one result object or
//! a stream of JSON Lines events on stdout. Every message carries a `"type"` tag; the first
//! message of a stream carries `"version": 1`. Inputs reject unknown fields so a typo fails
//! loudly; event readers tolerate unknown message types (`Unknown`) so that adding a message
//! type is a compatible change. docs/protocol.md shows an example of every message.

#![warn(missing_docs)]

pub mod agent;
pub mod attest;
pub mod build;
pub mod clock;
pub mod confinement;
pub mod downloads;
pub mod error;
pub mod exit;
pub mod file;
pub mod fleet;
pub mod hosted;
pub mod image;
pub mod jsonl;
pub mod limits;
pub mod locate;
pub mod process;
pub mod proxy;
pub mod result;
pub mod run;
pub mod service;
pub mod store;
mod sys;
pub mod tool;
pub mod units;
pub mod vm;

pub use exit::ExitCode;

/// The protocol version carried by the first message of every stream.
pub const PROTOCOL_VERSION: u32 = 1;
