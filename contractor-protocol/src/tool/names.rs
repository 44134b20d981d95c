//! The tools' program names: each as it is installed, looked for ([`super::Locator`]) and
//! named in errors. One place, for every program that starts another.

/// The store tool.
pub const STORE: &str = "contractor-store";
/// The proxy tool.
pub const PROXY: &str = "contractor-proxy";
/// The VM tool.
pub const VM: &str = "contractor-vm";
/// The run tool.
pub const RUN: &str = "contractor-run";
/// The provenance tool (signs, verifies, holds the key).
pub const ATTEST: &str = "contractor-attest";
/// The build hosts' tool (`send` runs a session with a build host, `hosts` reports them;
/// on a build host, `build` runs a hosted build).
pub const HOST: &str = "contractor-host";
/// The launcher that confines QEMU under `qemu:///session` (started by libvirt, found by
/// `contractor-vm`).
pub const QEMU_LAUNCHER: &str = "contractor-qemu";
