//! The build hosts as a fleet: which one takes a build (the roomiest), the line a build
//! waits in when every host is full, and `contractor hosts`.
//!
//! The line is this machine's: each front end that wants a build host holds a ticket (a
//! file named by the time it joined and its pid) in `<runtime dir>/contractor/line/`, and
//! only the first live ticket may take a host. A build keeps its ticket until its VM has
//! started on the host (so the next in line sees it counted there), then drops it. Front
//! ends on other machines are not in this line: the hosts' own counts are all they share.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::display::escape;
use crate::remote::{self, BuildHost, Probe};

/// How often a build waiting in line asks the hosts again.
pub const WAIT_POLL: Duration = Duration::from_secs(5);

/// The most tickets read from the line's directory (more are not counted ahead).
const MAX_TICKETS: usize = 10_000;

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

/// The line's directory, `<runtime dir>/line` (see [`remote::runtime_dir`]).
fn line_dir() -> Option<PathBuf> {
    remote::private_dir(&remote::runtime_dir()?.join("line"))
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

/// One line per host: what its answer was.
fn lines(hosts: &[BuildHost], probes: &[Probe]) -> Vec<String> {
    hosts
        .iter()
        .zip(probes)
        .map(|(host, probe)| match probe {
            Ok(room) => format!("{host}: {room}"),
            Err(why) => format!("{host}: {why}"),
        })
        .collect()
}

/// Picks the build host for a build of `cpus` CPUs and `memory_mib` MiB: the roomiest of
/// `hosts`, once this front end is first in line; while every host is full it waits,
/// saying so on stderr with its position. `tell` shows which host was chosen (the waiting
/// is always shown). The ticket is to be held until the build's VM has started. The error
/// names each host and why none can take the build.
pub fn take(
    hosts: &[BuildHost],
    cpus: u32,
    memory_mib: u64,
    tell: bool,
) -> Result<(BuildHost, Option<Ticket>), Vec<String>> {
    let ticket = line_dir().and_then(|dir| Ticket::join(&dir).ok());
    let mut shown: Option<usize> = None;
    loop {
        let position = ticket.as_ref().map_or(1, Ticket::position);
        if position > 1 {
            if shown != Some(position) {
                eprintln!(
                    "contractor: waiting in line for a build host: position {position} (Ctrl-C to give up)"
                );
                shown = Some(position);
            }
            std::thread::sleep(WAIT_POLL);
            continue;
        }
        let probes = remote::probe_all(hosts, cpus, memory_mib);
        match verdict(&probes, cpus) {
            Verdict::Take(i) => {
                if tell && (hosts.len() > 1 || shown.is_some()) {
                    eprintln!(
                        "contractor: build host {} chosen",
                        escape(&hosts[i].to_string())
                    );
                    for line in lines(hosts, &probes) {
                        eprintln!("  {}", escape(&line));
                    }
                }
                return Ok((hosts[i].clone(), ticket));
            }
            Verdict::Full => {
                if shown != Some(position) {
                    eprintln!(
                        "contractor: all {} build host(s) are full; waiting in line: position {position} (Ctrl-C to give up)",
                        hosts.len()
                    );
                    for line in lines(hosts, &probes) {
                        eprintln!("  {}", escape(&line));
                    }
                    shown = Some(position);
                }
                std::thread::sleep(WAIT_POLL);
            }
            Verdict::Never => {
                let mut chain = vec![match hosts.len() {
                    1 => "the build host cannot take the build".to_string(),
                    n => format!("none of the {n} build hosts can take the build"),
                }];
                chain.extend(lines(hosts, &probes));
                return Err(chain);
            }
        }
    }
}

/// `contractor hosts`: one line per host (its room for a build of `cpus` CPUs and
/// `memory_mib` MiB, the Contractor VMs running there, or why it did not answer), and the
/// builds waiting here in line; whether any host answered.
pub fn list(hosts: &[BuildHost], cpus: u32, memory_mib: u64) -> (Vec<String>, bool) {
    let probes = remote::probe_all(hosts, cpus, memory_mib);
    let width = hosts.iter().map(|h| h.to_string().len()).max().unwrap_or(0);
    let mut out: Vec<String> = hosts
        .iter()
        .zip(&probes)
        .map(|(host, probe)| {
            let name = host.to_string();
            match probe {
                Ok(room) => format!(
                    "{name:width$}  room {}  running {}  ({} MiB free, {} CPUs)",
                    room.builds, room.running, room.free_memory_mib, room.cpus
                ),
                Err(why) => format!("{name:width$}  unavailable: {why}"),
            }
        })
        .collect();
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
    out.push(format!(
        "(room: builds of {cpus} CPU(s) and {memory_mib} MiB that fit now; waiting in line here: {waiting})"
    ));
    (out, probes.iter().any(Result::is_ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::Room;

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
