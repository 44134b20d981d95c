//! Runs one build in a started builder VM.
//!
//! `host` is the host side (`contractor-run`): it talks to the guest agent over the VM's
//! control channel and relays the tunnel's streams to the proxy and the store. `guest` is
//! the agent itself, built into a static binary and installed in the builder image.
//! `tunnel` is the multiplexing both sides share, `control` the bounded reading of the
//! control channel's lines, `confinement` what the relay may still reach once it serves,
//! `shell` the conversation that opens a kept VM's interactive shell
//! (`contractor-run shell`).

#![warn(missing_docs)]

pub mod confinement;
pub mod control;
pub mod guest;
pub mod host;
pub mod shell;
mod sys;
pub mod text;
pub mod tunnel;

pub use host::{open_links, run, EventSink, Opened};
