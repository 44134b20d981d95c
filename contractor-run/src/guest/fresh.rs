//! What the agent does first with a job, before any of the build runs: take the host's
//! wall clock and the host's randomness.
//!
//! A VM restored from a snapshot wakes with the clock of the moment it was saved, and with
//! the random state every other VM restored from that snapshot wakes with too. So the
//! agent sets `CLOCK_REALTIME` from the job's `host_time`, mixes the job's `entropy` into
//! the kernel's input pool (`RNDADDENTROPY`, credited) and forces the kernel's generator
//! to reseed from it (`RNDRESEEDCRNG`): every `getrandom(2)`, `/dev/urandom` read and UUID
//! after this differs between two restored VMs. (The VM's `<genid/>`, which libvirt renews
//! on restore, makes a kernel with the vmgenid driver reseed as well; this does not rely
//! on it.) A cold-booted VM does the same; it costs two system calls.
//!
//! Failures are printed on the console (the host keeps it as `console.log`) and the build
//! goes on: a clock that cannot be set is no reason to refuse the job.

use std::os::fd::AsRawFd;

use contractor_protocol::agent::{HostTime, Job, JOB_ENTROPY_BYTES};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Sets the clock and reseeds the generator from `job`, and says so on the console (for a
/// VM restored from a snapshot, the first lines of its build's console log).
pub fn wake(job: &Job) {
    eprintln!("contractor-agent: the job arrived");
    if let Some(time) = job.host_time {
        match set_clock(time) {
            Ok(()) => eprintln!(
                "contractor-agent: clock set to the host's ({} s)",
                time.secs
            ),
            Err(err) => eprintln!("contractor-agent: cannot set the clock from the host's: {err}"),
        }
    }
    if let Some(entropy) = &job.entropy {
        match decode_hex(entropy) {
            Some(bytes) => match reseed(&bytes) {
                Ok(()) => eprintln!(
                    "contractor-agent: random number generator reseeded with the host's entropy"
                ),
                Err(err) => {
                    eprintln!("contractor-agent: cannot reseed the random number generator: {err}")
                }
            },
            None => eprintln!(
                "contractor-agent: the job's entropy is not {JOB_ENTROPY_BYTES} bytes of hex; not used"
            ),
        }
    }
}

fn set_clock(time: HostTime) -> std::io::Result<()> {
    let secs = libc::time_t::try_from(time.secs).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    if time.nanos >= 1_000_000_000 {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let spec = libc::timespec {
        tv_sec: secs,
        tv_nsec: time.nanos as libc::c_long,
    };
    // SAFETY: `spec` is a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &spec) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `rand_pool_info` with room for the job's bytes.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; JOB_ENTROPY_BYTES],
}

fn reseed(bytes: &[u8; JOB_ENTROPY_BYTES]) -> std::io::Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")?;
    let info = PoolInfo {
        entropy_count: (JOB_ENTROPY_BYTES * 8) as libc::c_int,
        buf_size: JOB_ENTROPY_BYTES as libc::c_int,
        buf: *bytes,
    };
    // SAFETY: the request reads a rand_pool_info of `buf_size` bytes of buffer from `info`,
    // which lives across the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the request takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `text` as exactly [`JOB_ENTROPY_BYTES`] bytes, if it is that many in hex.
fn decode_hex(text: &str) -> Option<[u8; JOB_ENTROPY_BYTES]> {
    let text = text.as_bytes();
    if text.len() != 2 * JOB_ENTROPY_BYTES {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut bytes = [0u8; JOB_ENTROPY_BYTES];
    for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_is_exactly_its_bytes_in_hex() {
        let hex = "00ff10ab".repeat(8);
        let bytes = decode_hex(&hex).expect("valid");
        assert_eq!(&bytes[..4], &[0x00, 0xff, 0x10, 0xab]);
        assert!(decode_hex(&hex[..62]).is_none(), "too short");
        assert!(decode_hex(&format!("{hex}00")).is_none(), "too long");
        assert!(decode_hex(&"zz".repeat(32)).is_none(), "not hex");
    }
}
