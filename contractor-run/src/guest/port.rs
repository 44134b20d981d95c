//! Finding and opening the VM's virtio-serial ports by name.
//!
//! There is no udev in the guest (the agent is init), so `/dev/virtio-ports/NAME` links do
//! not exist: the port is found through `/sys/class/virtio-ports/*/name`. A port reads as
//! end-of-file while the host end is not connected, so the reader waits and retries
//! instead of treating that as the end.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Finds the device of the port called `name`.
pub fn find(name: &str) -> io::Result<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name}"),
    ))
}

/// Opens the port called `name`, waiting up to `wait` for it to appear, and bridges it to
/// an async stream. Must be called inside a tokio runtime.
pub fn open(name: &str, wait: Duration) -> io::Result<DuplexStream> {
    let deadline = Instant::now() + wait;
    let path = loop {
        match find(name) {
            Ok(path) if path.exists() => break path,
            Ok(_) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(path) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} does not exist", path.display()),
                ))
            }
            Err(err) => return Err(err),
        }
    };
    let device = OpenOptions::new().read(true).write(true).open(&path)?;
    bridge(device)
}

/// Pumps bytes between a blocking character device and an in-memory async stream, one
/// thread each way.
fn bridge(device: File) -> io::Result<DuplexStream> {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut to_device, mut from_device) = tokio::io::split(ours);
    let runtime = tokio::runtime::Handle::current();
    let mut reader = device.try_clone()?;
    let read_runtime = runtime.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                // The host end is not connected (yet, or for a moment): wait.
                Ok(0) => std::thread::sleep(Duration::from_millis(20)),
                Ok(n) => {
                    if read_runtime
                        .block_on(from_device.write_all(&buf[..n]))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    let mut writer = device;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match runtime.block_on(to_device.read(&mut buf)) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if writer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    Ok(theirs)
}
