//! Ctrl-C and SIGTERM, for a tool that ends what it started in order when interrupted
//! (the front end's build, its remote build, `contractor-host send`'s session).
//!
//! A [`SignalWatch`] catches SIGINT and SIGTERM on a thread of its own, notes the first
//! one's name (`"Ctrl-C"` or `"SIGTERM"`, as results and messages say it) and runs the
//! caller's action for each one caught, told whether it is the first. Dropped, it stops
//! watching: its thread ends and the signals are no longer caught by it (signal-hook's
//! handler stays installed with no action, so a later signal is ignored, not fatal).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use signal_hook::consts::{SIGINT, SIGTERM};

/// One signal caught by a [`SignalWatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caught {
    /// SIGINT or SIGTERM.
    pub signal: Signal,
    /// Its name as Contractor says it: `"Ctrl-C"` or `"SIGTERM"`.
    pub name: &'static str,
    /// Whether it is the first one this watch caught.
    pub first: bool,
}

/// The name Contractor gives `signal` in results and messages: `"Ctrl-C"` for SIGINT,
/// `"SIGTERM"` for SIGTERM (and for any other).
pub fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::SIGINT => "Ctrl-C",
        _ => "SIGTERM",
    }
}

/// Watches for Ctrl-C and SIGTERM until dropped; the default one watches nothing.
#[derive(Default)]
pub struct SignalWatch {
    first: Arc<Mutex<Option<&'static str>>>,
    handle: Option<signal_hook::iterator::Handle>,
}

impl SignalWatch {
    /// Starts watching: each SIGINT or SIGTERM is noted (the first one's name kept) and
    /// then handed to `act`, on the watch's thread. The error is why the signals cannot be
    /// caught (the caller says what is lost; [`SignalWatch::default`] stands in).
    pub fn start(mut act: impl FnMut(Caught) + Send + 'static) -> std::io::Result<SignalWatch> {
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let first = Arc::new(Mutex::new(None));
        let noted = first.clone();
        let handle = signals.handle();
        std::thread::spawn(move || {
            for number in signals.forever() {
                let signal = match number {
                    SIGINT => Signal::SIGINT,
                    _ => Signal::SIGTERM,
                };
                let name = signal_name(signal);
                let first = match noted.lock() {
                    Ok(mut noted) => {
                        let first = noted.is_none();
                        noted.get_or_insert(name);
                        first
                    }
                    Err(_) => true,
                };
                act(Caught {
                    signal,
                    name,
                    first,
                });
            }
        });
        Ok(SignalWatch {
            first,
            handle: Some(handle),
        })
    }

    /// The first signal caught, if any.
    pub fn signal(&self) -> Option<&'static str> {
        self.first.lock().ok().and_then(|s| *s)
    }

    /// The first signal caught, waiting up to `wait` for one: a child that died of a
    /// signal may have had the terminal's Ctrl-C at the same moment as this process, whose
    /// watch thread may not have noted it yet.
    pub fn signal_within(&self, wait: Duration) -> Option<&'static str> {
        let deadline = Instant::now() + wait;
        loop {
            let signal = self.signal();
            if signal.is_some() || Instant::now() >= deadline {
                return signal;
            }
            std::thread::sleep(Duration::from_millis(10).min(wait));
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    // The tests signal their own process: one test at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn raise(signal: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::this(), signal).expect("kill self");
    }

    #[test]
    fn the_first_signal_is_noted_and_each_one_acted_on() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = mpsc::channel();
        let watch = SignalWatch::start(move |caught| {
            let _ = tx.send(caught);
        })
        .expect("watch");
        assert_eq!(watch.signal(), None);
        raise(Signal::SIGTERM);
        let caught = rx.recv_timeout(Duration::from_secs(10)).expect("first");
        assert_eq!(
            caught,
            Caught {
                signal: Signal::SIGTERM,
                name: "SIGTERM",
                first: true
            }
        );
        raise(Signal::SIGINT);
        let caught = rx.recv_timeout(Duration::from_secs(10)).expect("second");
        assert_eq!(
            (caught.signal, caught.name, caught.first),
            (Signal::SIGINT, "Ctrl-C", false)
        );
        assert_eq!(watch.signal(), Some("SIGTERM"));
        assert_eq!(watch.signal_within(Duration::ZERO), Some("SIGTERM"));
    }

    #[test]
    fn a_dropped_watch_acts_no_more_and_a_later_signal_is_not_fatal() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = mpsc::channel();
        let watch = SignalWatch::start(move |caught| {
            let _ = tx.send(caught);
        })
        .expect("watch");
        drop(watch);
        // The thread ends and drops its sender once the watch is closed.
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_err());
        // Caught by no one now, and this process lives on.
        raise(Signal::SIGINT);
        std::thread::sleep(Duration::from_millis(50));
    }

    #[test]
    fn a_watch_that_caught_nothing_says_none_after_waiting() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let watch = SignalWatch::start(|_| {}).expect("watch");
        assert_eq!(watch.signal_within(Duration::from_millis(30)), None);
        assert_eq!(SignalWatch::default().signal(), None);
    }
}
