//! Stage 1 of the builder VM's boot: the agent as `/init` of Contractor's own initramfs.
//!
//! Debian's initrd (udev, scripts, a shell) takes seconds under TCG to do what a builder
//! needs in milliseconds: load the few driver modules that are not built into the kernel
//! (virtio PCI, block, console, rng), mount the root file system and hand over to the real
//! init. The image builder (contractor-vm's `image::initramfs`) writes an initramfs holding this
//! same static binary as `/init`, the modules in load order and [`MODULE_LIST`] naming
//! them. When the agent runs as PID 1 and finds that list, it is in stage 1: it loads the
//! modules, mounts `root=` from the kernel command line on `/root`, removes its own files,
//! makes `/root` the root and executes `init=` there, which is the agent again, now in
//! stage 2 ([`crate::guest::init`]). The invariant: stage 1 either executes the real init
//! or prints why not on the console and powers the VM off; it never returns.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use std::time::{Duration, Instant};

/// Contractor's files in the initramfs, and the list of modules to load (one initramfs path
/// a line, dependencies first) whose presence tells the agent that it is in stage 1; shared
/// with the image builder.
pub use contractor_protocol::image::{INITRAMFS_DIR, MODULE_LIST};
/// How long stage 1 waits for the root device to appear.
const ROOT_WAIT: Duration = Duration::from_secs(30);

/// Whether this process is `/init` of Contractor's initramfs.
pub fn is_stage1() -> bool {
    Path::new(MODULE_LIST).is_file()
}

/// What stage 1 takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    /// `root=`: the device to mount as the root (default `/dev/vda`).
    pub root: String,
    /// `rootfstype=` (default `ext4`, which also mounts ext2 and ext3).
    pub fstype: String,
    /// `init=`: the program to execute on the real root (default `/sbin/init`).
    pub init: String,
    /// `ro` given (default read-write).
    pub read_only: bool,
}

impl BootParams {
    /// Reads the parameters out of a kernel command line; the last of a repeated one wins,
    /// as in the kernel. Everything after `--` belongs to init and is ignored.
    pub fn parse(cmdline: &str) -> BootParams {
        let mut params = BootParams {
            root: "/dev/vda".into(),
            fstype: "ext4".into(),
            init: "/sbin/init".into(),
            read_only: false,
        };
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                _ if word == "--" => break,
                Some(("root", v)) => params.root = v.into(),
                Some(("rootfstype", v)) => params.fstype = v.into(),
                Some(("init", v)) => params.init = v.into(),
                None if word == "ro" => params.read_only = true,
                None if word == "rw" => params.read_only = false,
                _ => {}
            }
        }
        params
    }
}

/// Stage 1: loads the modules, mounts the root and executes the real init on it.
pub fn switch_to_root() -> ! {
    match prepare_root() {
        Ok(init) => {
            let err = exec(&init);
            eprintln!("contractor-agent: stage 1: cannot execute {init} on the root: {err}");
        }
        Err(err) => eprintln!("contractor-agent: stage 1: {err}"),
    }
    // As PID 1 we may power the machine off.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Everything up to the exec: returns the path of the real init.
fn prepare_root() -> Result<String, String> {
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::empty(),
        "mode=0755",
    )
    .map_err(|e| format!("cannot mount /dev: {e}"))?;
    mount("proc", "/proc", "proc", MsFlags::empty(), "")
        .map_err(|e| format!("cannot mount /proc: {e}"))?;
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let params = BootParams::parse(&cmdline);
    let started_at = uptime();

    let list = std::fs::read_to_string(MODULE_LIST)
        .map_err(|e| format!("cannot read {MODULE_LIST}: {e}"))?;
    for module in list.lines().filter(|l| !l.trim().is_empty()) {
        // A module that fails to load is reported; the root mount says whether it mattered.
        if let Err(err) = load_module(module) {
            eprintln!("contractor-agent: stage 1: cannot load {module}: {err}");
        }
    }

    let flags = if params.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    let started = Instant::now();
    // The device node appears when the driver has probed the disk; mounting can fail for a
    // moment after that while the partition scan finishes.
    loop {
        match mount(&params.root, "/root", &params.fstype, flags, "") {
            Ok(()) => break,
            Err(err) if started.elapsed() >= ROOT_WAIT => {
                return Err(format!(
                    "cannot mount the root {} ({}) within {} s: {err}",
                    params.root,
                    params.fstype,
                    ROOT_WAIT.as_secs()
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }

    // Read before /proc goes away, for the console line below.
    let mounted_at = uptime();

    // Free the initramfs' memory (it stays mounted, hidden under the new root) and leave
    // the real init a clean /dev and /proc to mount itself, as when booting without one.
    let _ = std::fs::remove_dir_all(INITRAMFS_DIR);
    let _ = std::fs::remove_file("/init");
    for target in ["/proc", "/dev"] {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
    }

    std::env::set_current_dir("/root").map_err(|e| format!("cannot enter /root: {e}"))?;
    mount(".", "/", "", MsFlags::MS_MOVE, "").map_err(|e| format!("cannot move the root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("cannot change root: {}", io::Error::from(e)))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter /: {e}"))?;
    // The console log tells how long the kernel and stage 1 took (guest uptime).
    eprintln!(
        "contractor-agent: stage 1: started at {started_at} s, root {} mounted at {mounted_at} s",
        params.root
    );
    Ok(params.init)
}

/// The guest's uptime in seconds as /proc/uptime says it, or `?`.
fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Loads one kernel module file (uncompressed `.ko`); one already loaded is fine.
pub(crate) fn load_module(path: &str) -> io::Result<()> {
    let file = File::open(path)?;
    match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// mount(2), creating `target` first; an empty `fstype` passes none (for moves).
pub(crate) fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let fstype = (!fstype.is_empty()).then_some(fstype);
    // A NUL in an argument is EINVAL (InvalidInput).
    nix::mount::mount(Some(source), target, fstype, flags, Some(data))?;
    Ok(())
}

/// Replaces this process with `init` (it stays PID 1).
fn exec(init: &str) -> io::Error {
    let Ok(path) = CString::new(init) else {
        return io::Error::new(io::ErrorKind::InvalidInput, "NUL in init=");
    };
    // execv only returns on failure.
    match nix::unistd::execv(&path, &[&path]) {
        Err(err) => err.into(),
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_parameters_come_from_the_command_line() {
        let p = BootParams::parse(
            "console=ttyS0 root=/dev/vda rw init=/usr/local/sbin/contractor-agent panic=-1\n",
        );
        assert_eq!(
            p,
            BootParams {
                root: "/dev/vda".into(),
                fstype: "ext4".into(),
                init: "/usr/local/sbin/contractor-agent".into(),
                read_only: false,
            }
        );
    }

    #[test]
    fn defaults_last_one_wins_and_init_arguments_are_ignored() {
        let p = BootParams::parse("quiet");
        assert_eq!(
            (p.root.as_str(), p.fstype.as_str(), p.init.as_str()),
            ("/dev/vda", "ext4", "/sbin/init")
        );
        let p = BootParams::parse("root=/dev/sda root=/dev/vdb ro rootfstype=xfs -- init=/x rw");
        assert_eq!(p.root, "/dev/vdb");
        assert_eq!(p.fstype, "xfs");
        assert_eq!(p.init, "/sbin/init");
        assert!(p.read_only);
    }
}
