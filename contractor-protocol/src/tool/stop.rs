//! Ending a tool this process started: SIGTERM, then at most [`STOP_GRACE`] before SIGKILL,
//! so a tool that ignores SIGTERM cannot hold its parent forever; a service tool
//! ([`Service`]) stopped that way, also when dropped; and a child other threads may signal
//! until it is reaped and never after, when its pid may be another process's
//! ([`Supervised`]).

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

use super::{Answers, ToolError};
use crate::service::{Confinement, Ready};

/// How long a tool sent SIGTERM has to end before it is killed (SIGKILL): the store gives
/// requests in flight 10 s, `contractor-vm` destroys its VM in a few.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// The pid of `child`, for nix.
pub fn child_pid(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// SIGTERM, then wait: every tool stops cleanly on SIGTERM, within [`STOP_GRACE`].
pub fn stop_child(child: &mut Child) {
    let _ = stop_within(child, STOP_GRACE);
}

/// SIGTERM, then wait for at most `grace`; then SIGKILL. A child already reaped is not
/// signalled: its pid may be another process's by now.
fn stop_within(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let _ = kill(child_pid(child), Signal::SIGTERM);
    kill_after(child, grace)
}

/// Waits for `child`, which was sent SIGTERM, for at most `grace`; then kills it. A tool
/// that ignores SIGTERM cannot hold its parent forever.
fn kill_after(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    match wait_until(child, Instant::now() + grace)? {
        Some(status) => Ok(status),
        None => {
            let _ = child.kill();
            child.wait()
        }
    }
}

/// Waits for `child`, told to end by the close of its stdin (`contractor-vm create`: its VM
/// is released), for at most [`STOP_GRACE`]; then stops it ([`stop_child`]'s way). A tool
/// that never lets go cannot hold the build forever.
pub fn wait_or_stop(child: &mut Child) -> std::io::Result<ExitStatus> {
    match wait_until(child, Instant::now() + STOP_GRACE)? {
        Some(status) => Ok(status),
        None => stop_within(child, STOP_GRACE),
    }
}

/// Waits until `holder`, a `contractor-vm create --hold` whose stdin was closed, has either
/// ended (its status) or taken the destroy of its VM to a session of its own (`None`): it
/// does so as soon as it lets go of the VM, and from then on finishes alone whatever
/// happens to this process, so the build need not wait for libvirt's confirmation. A
/// holder that does neither within [`STOP_GRACE`] is stopped ([`wait_or_stop`]'s way).
pub fn handed_over(holder: &mut Child) -> std::io::Result<Option<ExitStatus>> {
    let pid = child_pid(holder);
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        if let Some(status) = holder.try_wait()? {
            return Ok(Some(status));
        }
        if nix::unistd::getsid(Some(pid)) == Ok(pid) {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            return stop_within(holder, STOP_GRACE).map(Some);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `child`'s end, or None if it still runs at `deadline`.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running service (store or proxy): its process, its address, and the thread that reads
/// the rest of its stdout. Stopped with SIGTERM (then SIGKILL after [`STOP_GRACE`]), also
/// when dropped.
pub struct Service<T> {
    name: &'static str,
    child: Option<Child>,
    /// The address it listens on, from its `ready` line.
    pub addr: SocketAddr,
    /// What the service said of its confinement in its `ready` line.
    pub confinement: Option<Confinement>,
    /// The authority certificate a proxy that inspects TLS gave in its `ready` line.
    pub ca_certificate: Option<String>,
    /// The build token a store made itself gave in its `ready` line (checked: a token
    /// of another form fails the start, [`crate::service::is_token`]).
    pub token: Option<String>,
    reader: Option<JoinHandle<T>>,
    grace: Duration,
}

impl<T: Send + 'static> Service<T> {
    /// Starts `command` (tool `name`), shows the child to `started` (a caller that was
    /// interrupted meanwhile signals it), reads its `ready` line, then hands the rest of
    /// its stdout to `rest` on a thread of its own. A service that fails before it is
    /// ready is stopped.
    pub fn start(
        name: &'static str,
        command: Command,
        started: impl FnOnce(&Child),
        rest: impl FnOnce(Answers) -> T + Send + 'static,
    ) -> Result<Service<T>, ToolError> {
        let mut child = super::spawn(name, command)?;
        started(&child);
        drop(child.stdin.take());
        let mut answers = Answers::of(name, &mut child)?;
        let ready: Ready = match answers
            .first(&mut child)
            .and_then(|ready| checked(name, ready))
        {
            Ok(ready) => ready,
            Err(err) => {
                stop_child(&mut child);
                return Err(err);
            }
        };
        Ok(Service {
            name,
            child: Some(child),
            addr: ready.addr,
            confinement: ready.confinement,
            ca_certificate: ready.ca_certificate,
            token: ready.token,
            reader: Some(std::thread::spawn(move || rest(answers))),
            grace: STOP_GRACE,
        })
    }

    /// Stops the service and returns what its reader made of its output; one that does not
    /// end cleanly on SIGTERM is the service's failure.
    pub fn stop(mut self) -> Result<T, ToolError> {
        let name = self.name;
        let grace = self.grace;
        let status = self
            .child
            .take()
            .map(|mut child| stop_within(&mut child, grace));
        let read = self.reader.take().map(|reader| reader.join());
        match status {
            Some(Ok(status)) if status.success() => {}
            Some(Ok(status)) => return Err(ToolError::exited(name, status.code())),
            Some(Err(source)) => return Err(ToolError::Io { name, source }),
            None => {}
        }
        match read {
            Some(Ok(value)) => Ok(value),
            _ => Err(ToolError::Io {
                name,
                source: std::io::Error::other("its output reader ended abnormally"),
            }),
        }
    }
}

/// `ready`, unless it carries a token of another form than a build token's
/// ([`crate::service::is_token`]; a service of another release, or a broken one): that is
/// not the documented line, and the error quotes the token's start.
fn checked(name: &'static str, ready: Ready) -> Result<Ready, ToolError> {
    match ready.token.as_deref() {
        Some(token) if !crate::service::is_token(token) => Err(ToolError::Garbage {
            name,
            line: 1,
            start: format!("{:?}", token.chars().take(80).collect::<String>()),
            source: serde::de::Error::custom(format!(
                "its token is not 1 to {} ASCII letters and digits",
                crate::service::MAX_TOKEN_BYTES
            )),
        }),
        _ => Ok(ready),
    }
}

impl<T> Drop for Service<T> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = stop_within(&mut child, self.grace);
        }
    }
}

/// A child that other threads may signal ([`Signaller`]) until it is reaped, and never
/// after: [`Supervised::wait`] waits without reaping (`WNOWAIT`), closes the signaller,
/// and only then reaps, so a signal never reaches a pid reused by another process.
pub struct Supervised {
    child: Child,
    signaller: Signaller,
}

/// Sends signals to a [`Supervised`] child while it has not been reaped.
#[derive(Clone)]
pub struct Signaller {
    pid: Pid,
    live: Arc<Mutex<bool>>,
}

impl Signaller {
    /// Sends `signal` to the child; false when it was not sent (the child was reaped, or
    /// the signal failed).
    pub fn signal(&self, signal: Signal) -> bool {
        match self.live.lock() {
            Ok(live) if *live => kill(self.pid, signal).is_ok(),
            _ => false,
        }
    }
}

impl Supervised {
    /// Starts `command` so that it dies with this process ([`super::start`]).
    pub fn start(command: &mut Command) -> std::io::Result<Supervised> {
        let child = super::start(command)?;
        let (pid, live) = (child_pid(&child), Arc::new(Mutex::new(true)));
        let signaller = Signaller { pid, live };
        Ok(Supervised { child, signaller })
    }

    /// What signals the child from another thread.
    pub fn signaller(&self) -> Signaller {
        self.signaller.clone()
    }

    /// Waits for the child to end and returns its status; its [`Signaller`]s send nothing
    /// from then on.
    pub fn wait(mut self) -> std::io::Result<ExitStatus> {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        while let Err(Errno::EINTR) = waitid(Id::Pid(self.signaller.pid), flags) {}
        if let Ok(mut live) = self.signaller.live.lock() {
            *live = false;
        }
        self.child.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool::tests::sh;
    use std::os::unix::process::ExitStatusExt;

    const READY: &str =
        r#"echo '{"type":"ready","version":1,"service":"test","addr":"127.0.0.1:9"}'"#;

    #[test]
    fn a_service_that_ignores_sigterm_is_killed_after_the_grace_and_the_error_names_it() {
        let command = sh(&format!("trap '' TERM; {READY}; exec sleep 30"));
        let mut service =
            Service::start("contractor-test", command, |_| {}, Answers::drain).expect("ready");
        assert_eq!(service.addr, "127.0.0.1:9".parse().expect("addr"));
        service.grace = Duration::from_millis(300);
        let err = service.stop().expect_err("killed");
        assert_eq!(
            err.to_string(),
            "contractor-test failed (killed by a signal): it wrote no answer; its own message is above"
        );
    }

    #[test]
    fn a_service_that_ends_before_it_is_ready_fails_naming_it() {
        let err = Service::start("contractor-test", sh("exit 4"), |_| {}, Answers::drain)
            .err()
            .expect("not ready");
        assert!(
            err.to_string()
                .starts_with("contractor-test failed (exit code 4)"),
            "{err}"
        );
    }

    #[test]
    fn a_service_that_stops_on_sigterm_returns_what_its_reader_read() {
        // What it says on its way out reaches the reader.
        let script =
            format!("trap 'echo {{}}; exit 0' TERM; {READY}; while :; do sleep 0.05; done");
        let service = Service::start(
            "contractor-test",
            sh(&script),
            |_| {},
            |mut answers| answers.next_line().ok().flatten(),
        )
        .expect("ready");
        assert_eq!(
            service.stop().expect("stopped on SIGTERM"),
            Some(b"{}".to_vec())
        );
    }

    #[test]
    fn a_supervised_child_is_signalled_while_it_runs_and_never_after_it_is_reaped() {
        // Moved from contractor-gitlab's child.rs, and new for contractor-host.
        let status = Supervised::start(&mut sh("exit 7"))
            .expect("sh runs")
            .wait()
            .expect("wait");
        assert_eq!(status.code(), Some(7));
        let child = Supervised::start(Command::new("sleep").arg("30")).expect("sleep runs");
        let signaller = child.signaller();
        assert!(signaller.signal(Signal::SIGTERM));
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(nix::libc::SIGTERM));
        assert!(
            !signaller.signal(Signal::SIGTERM),
            "signalled after it was reaped"
        );
    }
}
