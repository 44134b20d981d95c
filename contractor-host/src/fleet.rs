//! The build hosts as a fleet: each one's room for a build (`contractor-vm capacity` over
//! ssh, all at once), which one takes a build (the roomiest), the line a build waits in
//! when every host is full, and what `contractor hosts` reports.
//!
//! The line is this machine's: each `contractor-host send` that wants a build host holds a
//! ticket (a file named by the time it joined and its pid) in `<runtime dir>/line/`, and
//! only the first live ticket may take a host. A build keeps its ticket until its VM has
//! started on the host (so the next in line sees it counted there), then drops it. Senders
//! on other machines are not in this line: the hosts' own counts are all they share.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use contractor_protocol::error::ErrorObject;
use contractor_protocol::fleet::{Fleet, HostProbe, Room, SendLine};
use contractor_protocol::tool::{Signaller, Supervised};
use contractor_protocol::PROTOCOL_VERSION;

use crate::buildhost::{self, BuildHost};
use crate::RELEASE;

/// How often a build waiting in line asks the hosts again.
pub const WAIT_POLL: Duration = Duration::from_secs(5);

/// The most tickets read from the line's directory (more are not counted ahead).
const MAX_TICKETS: usize = 10_000;

/// The longest a build host may take to answer how much room it has.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The most bytes of a probe's answer read.
const MAX_PROBE_BYTES: u64 = 64 * 1024;

/// What a probe of one build host found: its room, or why it cannot take the build.
pub type Probe = Result<Room, String>;

/// Asks each of `hosts` (`contractor-vm capacity` over its shared connection, all at once)
/// how many builds of `cpus` CPUs and `memory_mib` MiB it has room for; one answer per
/// host, in order, an error saying why for one that cannot be reached, runs another
/// release, or does not answer within [`PROBE_TIMEOUT`].
pub fn probe_all(hosts: &[BuildHost], cpus: u32, memory_mib: u64) -> Vec<Probe> {
    let (tx, rx) = mpsc::channel::<(usize, Probe)>();
    let running = Arc::new(Mutex::new(Vec::<Signaller>::new()));
    for (i, host) in hosts.iter().enumerate() {
        let (tx, host, running) = (tx.clone(), host.clone(), running.clone());
        std::thread::spawn(move || {
            let _ = tx.send((i, probe(&host, cpus, memory_mib, &running)));
        });
    }
    drop(tx);
    let mut probes: Vec<Option<Probe>> = vec![None; hosts.len()];
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while probes.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, probe)) => probes[i] = Some(probe),
            Err(_) => break,
        }
    }
    // Those that did not answer in time are stopped; one that ended was reaped, and its
    // signaller sends nothing (its pid may be another process's by now).
    for probe in running.lock().map(|r| r.clone()).unwrap_or_default() {
        probe.signal(nix::sys::signal::Signal::SIGTERM);
    }
    probes
        .into_iter()
        .map(|probe| {
            probe.unwrap_or_else(|| Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())))
        })
        .collect()
}

/// Asks `host` for its capacity; `running` gets what signals the ssh process until it is
/// reaped.
fn probe(host: &BuildHost, cpus: u32, memory_mib: u64, running: &Mutex<Vec<Signaller>>) -> Probe {
    use contractor_protocol::hosted::{room, CapacityReport};
    let cannot = |e: std::io::Error| format!("cannot run ssh: {e}");
    let (stdout, out_end) = std::io::pipe().map_err(cannot)?;
    let (stderr, err_end) = std::io::pipe().map_err(cannot)?;
    let mut ssh = host.ssh(&["contractor-vm", "capacity", "--json-errors"]);
    ssh.stdin(Stdio::null()).stdout(out_end).stderr(err_end);
    let child = Supervised::start(&mut ssh).map_err(cannot)?;
    // The pipes' write ends are the child's alone from here on.
    drop(ssh);
    if let Ok(mut running) = running.lock() {
        running.push(child.signaller());
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    let _ = stdout.take(MAX_PROBE_BYTES).read_to_end(&mut out);
    let _ = stderr.take(MAX_PROBE_BYTES).read_to_end(&mut err);
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for ssh: {e}"))?;
    let said = String::from_utf8_lossy(&err);
    let said = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    let first = out.split(|b| *b == b'\n').next().unwrap_or_default();
    match serde_json::from_slice::<CapacityReport>(first) {
        Ok(CapacityReport::Capacity {
            contractor,
            version,
            ..
        }) if contractor != RELEASE || version != PROTOCOL_VERSION => Err(format!(
            "it runs contractor {contractor} (protocol {version}), this is contractor {RELEASE} (protocol {PROTOCOL_VERSION}): install one release on both"
        )),
        Ok(CapacityReport::Capacity {
            free_memory_mib,
            cpus: host_cpus,
            running,
            ..
        }) => Ok(Room {
            builds: room(free_memory_mib, host_cpus, running, cpus, memory_mib),
            free_memory_mib,
            cpus: host_cpus,
            running,
        }),
        Err(_) => match serde_json::from_slice::<ErrorObject>(first) {
            Ok(error) => Err(format!("contractor-vm failed there: {}", error.chain.join(": "))),
            Err(_) => Err(match status.code() {
                Some(255) => format!("cannot be reached: {said}"),
                Some(127) => format!("contractor-vm is not on its PATH: install Contractor {RELEASE} there"),
                code => format!(
                    "no capacity answer (ssh {}){}",
                    code.map_or("killed".to_string(), |c| format!("exit {c}")),
                    if said.is_empty() { String::new() } else { format!(": {said}") }
                ),
            }),
        },
    }
}

/// A place in the line; leaving it (dropping it) removes the ticket.
#[derive(Debug)]
pub struct Ticket {
    path: PathBuf,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Ticket {
    /// Joins the line in `dir`.
    fn join(dir: &Path) -> std::io::Result<Ticket> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = dir.join(format!("{nanos:024}-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Ticket { path })
    }

    /// Its place in the line, from 1: live tickets ahead of it, plus one. Tickets of
    /// processes that are gone are removed.
    fn position(&self) -> usize {
        let (Some(dir), Some(own)) = (self.path.parent(), self.path.file_name()) else {
            return 1;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 1;
        };
        let own = own.to_string_lossy().into_owned();
        let mut ahead = 0;
        for entry in entries.flatten().take(MAX_TICKETS) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name >= own {
                continue;
            }
            if ticket_pid(&name).is_some_and(alive) {
                ahead += 1;
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        ahead + 1
    }
}

/// The pid a ticket's name ends with.
fn ticket_pid(name: &str) -> Option<i32> {
    name.rsplit_once('-')?.1.parse().ok().filter(|p| *p > 0)
}

/// Whether the process `pid` exists.
fn alive(pid: i32) -> bool {
    use nix::errno::Errno;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// The line's directory, `<runtime dir>/line` (see [`buildhost::runtime_dir`]).
fn line_dir() -> Option<PathBuf> {
    buildhost::private_dir(&buildhost::runtime_dir()?.join("line"))
}

/// What the answers of the hosts allow.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// This host (its index) has the most room.
    Take(usize),
    /// Every host that answered is full now.
    Full,
    /// No host can take the build: none answered, or none ever could (fewer CPUs than the
    /// build asks for).
    Never,
}

/// The roomiest of the hosts that answered (the first listed wins a tie).
fn verdict(probes: &[Probe], cpus: u32) -> Verdict {
    let mut best: Option<(usize, u64)> = None;
    let mut could = false;
    for (i, probe) in probes.iter().enumerate() {
        let Ok(room) = probe else { continue };
        could |= room.cpus >= cpus;
        if room.builds > 0 && best.is_none_or(|(_, most)| room.builds > most) {
            best = Some((i, room.builds));
        }
    }
    match (best, could) {
        (Some((i, _)), _) => Verdict::Take(i),
        (None, true) => Verdict::Full,
        (None, false) => Verdict::Never,
    }
}

/// Each host's answer, as the protocol writes it.
fn answers(hosts: &[BuildHost], probes: &[Probe]) -> Vec<HostProbe> {
    hosts
        .iter()
        .zip(probes)
        .map(|(host, probe)| HostProbe {
            host: host.to_string(),
            room: probe.as_ref().ok().cloned(),
            unavailable: probe.as_ref().err().cloned(),
        })
        .collect()
}

/// Picks the build host for a build of `cpus` CPUs and `memory_mib` MiB: the roomiest of
/// `hosts`, once this process is first in line; while it waits it says so with `tell`
/// (`waiting`, `hosts_full`, each written once per position). The ticket is to be held
/// until the build's VM has started. The error names each host and why none can take the
/// build, outermost first.
pub fn take(
    hosts: &[BuildHost],
    cpus: u32,
    memory_mib: u64,
    tell: &mut dyn FnMut(SendLine),
) -> Result<(usize, Vec<HostProbe>, Option<Ticket>), Vec<String>> {
    let ticket = line_dir().and_then(|dir| Ticket::join(&dir).ok());
    let mut shown: Option<usize> = None;
    loop {
        let position = ticket.as_ref().map_or(1, Ticket::position);
        if position > 1 {
            if shown != Some(position) {
                tell(SendLine::Waiting {
                    position: position as u64,
                });
                shown = Some(position);
            }
            std::thread::sleep(WAIT_POLL);
            continue;
        }
        let probes = probe_all(hosts, cpus, memory_mib);
        match verdict(&probes, cpus) {
            Verdict::Take(i) => return Ok((i, answers(hosts, &probes), ticket)),
            Verdict::Full => {
                if shown != Some(position) {
                    tell(SendLine::HostsFull {
                        position: position as u64,
                        hosts: answers(hosts, &probes),
                    });
                    shown = Some(position);
                }
                std::thread::sleep(WAIT_POLL);
            }
            Verdict::Never => {
                let mut chain = vec![match hosts.len() {
                    1 => "the build host cannot take the build".to_string(),
                    n => format!("none of the {n} build hosts can take the build"),
                }];
                chain.extend(answers(hosts, &probes).iter().map(HostProbe::to_string));
                return Err(chain);
            }
        }
    }
}

/// `contractor-host hosts`: each host's room for a build of `cpus` CPUs and `memory_mib`
/// MiB (or why it did not answer), and the builds waiting here in line.
pub fn list(hosts: &[BuildHost], cpus: u32, memory_mib: u64) -> Fleet {
    let probes = probe_all(hosts, cpus, memory_mib);
    let waiting = line_dir()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .map(|entries| {
            entries
                .flatten()
                .take(MAX_TICKETS)
                .filter(|e| ticket_pid(&e.file_name().to_string_lossy()).is_some_and(alive))
                .count()
        })
        .unwrap_or(0);
    Fleet {
        version: PROTOCOL_VERSION,
        hosts: answers(hosts, &probes),
        waiting: waiting as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(builds: u64, cpus: u32) -> Probe {
        Ok(Room {
            builds,
            free_memory_mib: 4096,
            cpus,
            running: 0,
        })
    }

    #[test]
    fn the_roomiest_host_is_taken_a_full_fleet_waits_and_one_too_small_never_fits() {
        let down: Probe = Err("cannot be reached".into());
        assert_eq!(
            verdict(&[room(1, 8), down.clone(), room(3, 8)], 2),
            Verdict::Take(2)
        );
        assert_eq!(verdict(&[room(2, 8), room(2, 8)], 2), Verdict::Take(0));
        assert_eq!(verdict(&[room(0, 8), down.clone()], 2), Verdict::Full);
        assert_eq!(verdict(&[room(0, 1)], 2), Verdict::Never);
        assert_eq!(verdict(&[down], 2), Verdict::Never);
    }

    #[test]
    fn a_ticket_counts_the_live_tickets_ahead_and_removes_dead_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        // pid 1 lives; a pid above the kernel's limit does not.
        std::fs::write(dir.path().join(format!("{:024}-1", 1)), "").expect("ticket");
        std::fs::write(dir.path().join(format!("{:024}-999999999", 2)), "").expect("ticket");
        let ticket = Ticket::join(dir.path()).expect("join");
        assert_eq!(ticket.position(), 2);
        assert!(!dir.path().join(format!("{:024}-999999999", 2)).exists());
        let path = ticket.path.clone();
        drop(ticket);
        assert!(!path.exists());
    }
}
