//! PID 1 in the builder VM: mount what a build expects, bring up loopback, start the agent
//! as a child, reap every orphan, and power off when the agent is done.
//!
//! Nothing here may return: if PID 1 exits, the kernel panics. Failures are printed on the
//! console (the host keeps its log) and the VM powers off.

use std::ffi::CString;
use std::io;
use std::process::Command;

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
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
    ] {
        if let Err(err) = mount(source, target, fstype, data) {
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
        Ok(agent) => reap_until(agent.id() as libc::pid_t),
        Err(err) => eprintln!("contractor-agent: cannot start the agent: {err}"),
    }
    power_off()
}

/// Reaps children until `agent` has exited.
fn reap_until(agent: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a local status word.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            return;
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Powers off at once, without syncing: the disk is a throwaway overlay and every result
/// has already left the VM.
fn power_off() -> ! {
    // SAFETY: reboot takes no pointers; as PID 1 we may power the machine off.
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn mount(source: &str, target: &str, fstype: &str, data: &str) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| {
        CString::new(s)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mount argument"))
    };
    let (source, target_c, fstype, data) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // Already mounted (the initrd moves /proc, /sys, /dev and /run to the new root).
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(err)
}

fn set_hostname(name: &str) {
    // SAFETY: the pointer and length describe a valid byte slice.
    unsafe {
        libc::sethostname(name.as_ptr().cast(), name.len());
    }
}

/// `ip link set lo up`, without needing iproute2 in the image.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: fd is a valid socket and request a valid ifreq for these ioctls.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) < 0 {
            Err(io::Error::last_os_error())
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &request) < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    result
}
