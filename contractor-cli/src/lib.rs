//! The `contractor` front end: reads `contractor.toml`, has contractor-vm prepare the image,
//! and composes the store, the proxy, the VM and the run into one build.

#![warn(missing_docs)]

pub use contractor_spec::allow;
pub mod app;
pub mod build;
pub mod cache;
pub mod display;
pub mod doctor;
pub mod downloads;
pub mod image;
pub use contractor_spec::init;
pub use contractor_spec::lock;
pub use contractor_spec::overrides;
pub mod paths;
pub mod provenance;
pub mod rebuild;
pub mod records;
pub mod remote;
pub mod shell;
pub mod source;
pub mod spec;
pub mod sys;
pub mod tools;
