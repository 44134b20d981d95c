//! Connection attempts per upstream: at most [`crate::Limits::connects_per_host`] to one
//! `host:port` at once, the next [`crate::Limits::connect_queue_per_host`] waiting their
//! turn in order, and any beyond those refused at once with [`Full`] (the client gets 503
//! with Retry-After). A package manager that opens hundreds of connections to its registry
//! at once then waits a little instead of failing, and the proxy never has more attempts
//! in progress for one host than a server would welcome.
//!
//! The invariant: a host's entry exists only while an attempt to it is in progress or
//! waiting, so the table holds at most as many hosts as the proxy serves requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why an attempt was not even queued.
#[derive(Debug, thiserror::Error)]
#[error(
    "{in_progress} connection attempts to {host} in progress and {waiting} waiting, the most \
     the proxy queues for one host; try again shortly"
)]
pub struct Full {
    host: String,
    in_progress: usize,
    waiting: usize,
}

/// The attempts in progress and waiting, per `host:port`.
#[derive(Debug)]
pub struct ConnectGate {
    per_host: usize,
    queue: usize,
    hosts: Mutex<HashMap<String, Host>>,
}

#[derive(Debug)]
struct Host {
    slots: Arc<Semaphore>,
    /// Attempts in progress and waiting.
    users: usize,
}

/// The right to make one connection attempt; the next waiter goes when it is dropped.
#[derive(Debug)]
pub struct Pass<'a> {
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket<'a>,
}

/// One user of a host's entry, counted until dropped (also when its wait is given up).
#[derive(Debug)]
struct Ticket<'a> {
    gate: &'a ConnectGate,
    host: String,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Ok(mut hosts) = self.gate.hosts.lock() {
            if let Some(entry) = hosts.get_mut(&self.host) {
                entry.users = entry.users.saturating_sub(1);
                if entry.users == 0 {
                    hosts.remove(&self.host);
                }
            }
        }
    }
}

impl ConnectGate {
    /// A gate letting `per_host` attempts (at least one) through at once, `queue` waiting.
    pub fn new(per_host: usize, queue: usize) -> Self {
        ConnectGate {
            per_host: per_host.max(1),
            queue,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a turn to connect to `host` (`host:port`), or says the queue is full.
    pub async fn enter(&self, host: &str) -> Result<Pass<'_>, Full> {
        let slots = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            let entry = hosts.entry(host.to_string()).or_insert_with(|| Host {
                slots: Arc::new(Semaphore::new(self.per_host)),
                users: 0,
            });
            if entry.users >= self.per_host + self.queue {
                return Err(Full {
                    host: host.to_string(),
                    in_progress: self.per_host.min(entry.users),
                    waiting: entry.users.saturating_sub(self.per_host),
                });
            }
            entry.users += 1;
            Arc::clone(&entry.slots)
        };
        let ticket = Ticket {
            gate: self,
            host: host.to_string(),
        };
        // The semaphore is never closed, so this error cannot happen.
        let permit = slots.acquire_owned().await.map_err(|_| Full {
            host: host.to_string(),
            in_progress: self.per_host,
            waiting: 0,
        })?;
        Ok(Pass {
            _permit: permit,
            _ticket: ticket,
        })
    }

    /// Hosts with attempts in progress or waiting.
    #[cfg(test)]
    fn hosts(&self) -> usize {
        self.hosts.lock().map(|hosts| hosts.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn attempts_beyond_the_limit_wait_and_beyond_the_queue_are_refused() {
        let gate = ConnectGate::new(2, 1);
        let first = gate.enter("a:443").await.expect("first");
        let second = gate.enter("a:443").await.expect("second");
        // Another host has its own turns.
        drop(gate.enter("b:443").await.expect("other host"));
        let third = gate.enter("a:443");
        tokio::pin!(third);
        assert!(futures_poll_once(third.as_mut()).await.is_none(), "waits");
        let full = gate.enter("a:443").await.expect_err("queue full");
        assert_eq!(
            full.to_string(),
            "2 connection attempts to a:443 in progress and 1 waiting, the most the proxy \
             queues for one host; try again shortly"
        );
        drop(first);
        third.await.expect("its turn came");
        drop(second);
        assert_eq!(gate.hosts(), 0, "no entry without attempts");
    }

    #[tokio::test]
    async fn a_wait_given_up_frees_its_place() {
        let gate = ConnectGate::new(1, 1);
        let held = gate.enter("a:443").await.expect("first");
        {
            let waiting = gate.enter("a:443");
            tokio::pin!(waiting);
            assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        }
        let again = gate.enter("a:443");
        tokio::pin!(again);
        assert!(
            futures_poll_once(again.as_mut()).await.is_none(),
            "queued, not refused"
        );
        drop(held);
        drop(again.await.expect("its turn"));
        assert_eq!(gate.hosts(), 0);
    }

    /// Polls `future` once: its output if it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
