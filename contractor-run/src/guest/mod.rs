//! The guest agent: the only Contractor code that runs inside the builder VM.
//!
//! It runs as the VM's init (PID 1), first as `/init` of Contractor's initramfs
//! (`initrd`: load the virtio modules, mount the root, switch to it), then on the root:
//! `init` prepares the minimum a build needs (mounts, loopback) and reaps orphans;
//! `agent` talks to the host over the virtio-serial ports found by `port`, runs the job
//! and reports. When the agent is done, init powers off.

pub mod agent;
pub mod fresh;
pub mod init;
pub mod initrd;
pub mod port;
pub mod shell;
