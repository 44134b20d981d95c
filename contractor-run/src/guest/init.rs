//! PID 1 in the builder VM: mount what a build expects, bring up loopback, start the agent
//! as a child, reap every orphan, and power off when the agent is done.
//!
//! Nothing here may return: if PID 1 exits, the kernel panics. Failures are printed on the
//! console (the host keeps its log) and the VM powers off.

use std::io;
use std::os::fd::AsFd;
use std::process::Command;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::unistd::Pid;

use crate::guest::initrd;

/// Runs as init; never returns.
pub fn run_as_init() -> ! {
    for (source, target, fstype, data) in [
        ("proc", "/proc", "proc", ""),
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
    ] {
        if let Err(err) = mount(source, target, fstype, data) {
            eprintln!("contractor-agent: cannot mount {target}: {err}");
        }
    }
    let on_build_disk = match root_on_build_disk() {
        Ok(on_disk) => on_disk,
        Err(err) => {
            // Going on without it would ignore the build's disk limit.
            eprintln!(
                "contractor-agent: cannot put the root on the build disk {BUILD_DISK}: {err}"
            );
            power_off()
        }
    };
    // Without a build disk, /tmp is memory; with one, it is on the disk with the rest.
    let fresh: &[(&str, &str)] = if on_build_disk {
        &[("/run", "mode=0755")]
    } else {
        &[("/tmp", "mode=1777")]
    };
    for (target, data) in fresh {
        if let Err(err) = mount("tmpfs", target, "tmpfs", data) {
            eprintln!("contractor-agent: cannot mount {target}: {err}");
        }
    }
    // Console output lands in the build record's console.log: say who is running.
    eprintln!(
        "contractor-agent {}: started as init",
        crate::guest::agent::AGENT_VERSION
    );
    if let Err(err) = loopback_up() {
        eprintln!("contractor-agent: cannot bring up the loopback interface: {err}");
    }
    set_hostname("builder");
    // The port driver may be a module that the initrd did not load.
    if !std::path::Path::new("/sys/class/virtio-ports").exists() {
        let _ = Command::new("modprobe").arg("virtio_console").status();
    }

    match Command::new("/proc/self/exe").arg("serve").spawn() {
        Ok(agent) => match i32::try_from(agent.id()) {
            Ok(pid) => reap_until(Pid::from_raw(pid)),
            Err(_) => eprintln!(
                "contractor-agent: the agent's pid {} is out of range",
                agent.id()
            ),
        },
        Err(err) => eprintln!("contractor-agent: cannot start the agent: {err}"),
    }
    power_off()
}

/// The disk the host gives a build to write on (empty ext4, made by `contractor-vm`).
const BUILD_DISK: &str = "/dev/vdb";

/// If the VM has a build disk, makes the root an overlay whose writable layer is on it and
/// moves into it (like `switch_root`): everything the build writes, anywhere, goes to that
/// disk and is capped by its size, and the image's disk is never written. Returns whether
/// it did; without a build disk the root stays as it is.
fn root_on_build_disk() -> io::Result<bool> {
    if !std::path::Path::new(BUILD_DISK).exists() {
        return Ok(false);
    }
    let (disk, root) = ("/run/contractor/disk", "/run/contractor/root");
    std::fs::create_dir_all(disk)?;
    std::fs::create_dir_all(root)?;
    // The host leaves the inode tables uninitialised; do not zero them in the background.
    initrd::mount(
        BUILD_DISK,
        disk,
        "ext4",
        MsFlags::MS_NOATIME,
        "noinit_itable",
    )
    .map_err(|e| context(e, "mount the build disk"))?;
    for dir in ["upper", "work"] {
        std::fs::create_dir_all(format!("{disk}/{dir}"))?;
    }
    load_module("kernel/fs/overlayfs/overlay.ko").map_err(|e| context(e, "load overlay.ko"))?;
    let layers = format!("lowerdir=/,upperdir={disk}/upper,workdir={disk}/work");
    initrd::mount("overlay", root, "overlay", MsFlags::empty(), &layers)
        .map_err(|e| context(e, "mount the overlay root"))?;
    for target in ["/proc", "/sys", "/dev"] {
        initrd::mount(target, &format!("{root}{target}"), "", MsFlags::MS_MOVE, "")
            .map_err(|e| context(e, &format!("move {target}")))?;
    }
    std::env::set_current_dir(root)?;
    initrd::mount(".", "/", "", MsFlags::MS_MOVE, "").map_err(|e| context(e, "move the root"))?;
    nix::unistd::chroot(".").map_err(|e| context(e.into(), "chroot"))?;
    std::env::set_current_dir("/")?;
    Ok(true)
}

/// Loads the kernel module at `relative` (under /lib/modules/<release>/), which must have
/// no dependencies; a module that is built in or already loaded is fine.
fn load_module(relative: &str) -> io::Result<()> {
    let uts = nix::sys::utsname::uname()?;
    let path = format!(
        "/lib/modules/{}/{relative}",
        uts.release().to_string_lossy()
    );
    match initrd::load_module(&path) {
        // Built into this kernel.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| context(e, &path)),
    }
}

fn context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// Reaps children until `agent` has exited.
fn reap_until(agent: Pid) {
    loop {
        match nix::sys::wait::waitpid(None, None) {
            Ok(status) if status.pid() == Some(agent) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            // ECHILD: no child left to wait for.
            Err(_) => return,
        }
    }
}

/// Powers off at once, without syncing: the disk is a throwaway overlay and every result
/// has already left the VM.
fn power_off() -> ! {
    // As PID 1 we may power the machine off.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // reboot only returns on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn mount(source: &str, target: &str, fstype: &str, data: &str) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    match initrd::mount(source, target, fstype, MsFlags::MS_NOSUID, data) {
        // Already mounted (the initrd moves /proc, /sys, /dev and /run to the new root).
        Err(err) if err.raw_os_error() == Some(Errno::EBUSY as i32) => Ok(()),
        other => other,
    }
}

fn set_hostname(name: &str) {
    // As before: a builder without its hostname still builds.
    let _ = nix::unistd::sethostname(name);
}

/// `ip link set lo up`, without needing iproute2 in the image.
fn loopback_up() -> io::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    crate::sys::interface_up(fd.as_fd(), "lo")
}
