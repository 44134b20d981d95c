//! Upstream TLS connections of inspected sessions, kept for the next request to the same
//! host, whichever client session it comes from.
//!
//! A package manager opens hundreds of inspected sessions to one registry; without this,
//! each paid a TCP connect and a TLS handshake of its own. An HTTP/1.1 connection goes back
//! to the pool once a response has been read to its end and waits there for the next
//! request; an HTTP/2 connection (the server chose `h2` by ALPN) is shared while it lives,
//! and carries the requests of every session to its host at once.
//!
//! The invariants: a request takes only a connection dialled at one of the addresses its
//! own checks returned (and to its own `host:port`, verified for that name), so reuse never
//! skips a decision; the pool never holds more than [`IDLE_PER_HOST`] idle HTTP/1.1
//! connections and one HTTP/2 connection per host, nor more than [`IDLE_TOTAL`] in all, and
//! none that has been idle for [`IDLE_TIMEOUT`] is handed out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};

use crate::meter::TransferSlot;

/// Idle HTTP/1.1 connections kept per `host:port`; when one more comes back, the one idle
/// longest is closed. npm opens up to 15 sockets to its registry at once (`maxsockets`):
/// each of them finds its upstream connection again.
pub const IDLE_PER_HOST: usize = 16;

/// Pooled connections kept in all, over every host (idle HTTP/1.1 ones and shared HTTP/2
/// ones); when one more comes back, the one idle longest anywhere is closed.
pub const IDLE_TOTAL: usize = 64;

/// How long a connection may wait unused and still be handed out: shorter than servers
/// usually keep an idle connection open (60 s and more for the common ones), so that a
/// request seldom takes one the server is closing. One that the server closed anyway is
/// handled by the request's retry rules.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a pooled connection takes requests.
pub(crate) enum Sender<B> {
    /// HTTP/1.1: one request at a time; back to the pool after each response.
    Http1(http1::SendRequest<B>),
    /// HTTP/2: any number at once; stays in the pool while it lives.
    Http2(http2::SendRequest<B>),
}

/// An upstream connection, handed to one request.
pub(crate) struct Connection<B> {
    /// The address it was dialled at.
    pub(crate) addr: SocketAddr,
    pub(crate) sender: Sender<B>,
    /// Which exchange its bytes count for.
    pub(crate) transfer: Arc<TransferSlot>,
    /// It came from the pool (it served a request before, or another session holds it).
    pub(crate) reused: bool,
}

/// The connections kept, per `host:port`.
pub(crate) struct UpstreamPool<B> {
    hosts: Mutex<Hosts<B>>,
}

struct Hosts<B> {
    by_host: HashMap<(String, u16), Kept<B>>,
    /// Connections in `by_host`, over every host.
    count: usize,
    /// The proxy is shutting down: nothing more is kept.
    closed: bool,
}

struct Kept<B> {
    /// Idle HTTP/1.1 connections, the one idle longest first.
    idle: Vec<Idle<B>>,
    shared: Option<Shared<B>>,
}

struct Idle<B> {
    addr: SocketAddr,
    sender: http1::SendRequest<B>,
    transfer: Arc<TransferSlot>,
    since: Instant,
}

struct Shared<B> {
    addr: SocketAddr,
    sender: http2::SendRequest<B>,
    transfer: Arc<TransferSlot>,
    last_used: Instant,
}

impl<B> Default for Kept<B> {
    fn default() -> Self {
        Kept {
            idle: Vec::new(),
            shared: None,
        }
    }
}

impl<B> Kept<B> {
    fn len(&self) -> usize {
        self.idle.len() + usize::from(self.shared.is_some())
    }

    /// Closes (drops) what has been idle too long or was closed by the server.
    fn sweep(&mut self, now: Instant) {
        self.idle.retain(|idle| {
            now.duration_since(idle.since) < IDLE_TIMEOUT && !idle.sender.is_closed()
        });
        if self.shared.as_ref().is_some_and(|shared| {
            now.duration_since(shared.last_used) >= IDLE_TIMEOUT || shared.sender.is_closed()
        }) {
            self.shared = None;
        }
    }

    /// When the least recently used of its connections was last used.
    fn oldest(&self) -> Option<Instant> {
        let idle = self.idle.first().map(|idle| idle.since);
        let shared = self.shared.as_ref().map(|shared| shared.last_used);
        idle.into_iter().chain(shared).min()
    }

    /// Closes the least recently used of its connections.
    fn close_oldest(&mut self) {
        let idle = self.idle.first().map(|idle| idle.since);
        match (idle, &self.shared) {
            (Some(since), Some(shared)) if shared.last_used < since => self.shared = None,
            (Some(_), _) => {
                self.idle.remove(0);
            }
            (None, _) => self.shared = None,
        }
    }
}

impl<B: Send + 'static> UpstreamPool<B> {
    pub(crate) fn new() -> Self {
        UpstreamPool {
            hosts: Mutex::new(Hosts {
                by_host: HashMap::new(),
                count: 0,
                closed: false,
            }),
        }
    }

    /// A live connection to `host:port` dialled at one of `addrs`, if one is kept: the
    /// shared HTTP/2 one, else the HTTP/1.1 one idle the shortest time (taken out).
    pub(crate) fn take(
        &self,
        host: &str,
        port: u16,
        addrs: &[SocketAddr],
    ) -> Option<Connection<B>> {
        let mut hosts = self.hosts.lock().ok()?;
        let key = (host.to_string(), port);
        let now = Instant::now();
        let taken = hosts.by_host.get_mut(&key).and_then(|kept| {
            kept.sweep(now);
            if let Some(shared) = kept.shared.as_mut().filter(|s| addrs.contains(&s.addr)) {
                shared.last_used = now;
                return Some(Connection {
                    addr: shared.addr,
                    sender: Sender::Http2(shared.sender.clone()),
                    transfer: Arc::clone(&shared.transfer),
                    reused: true,
                });
            }
            let at = kept
                .idle
                .iter()
                .rposition(|idle| addrs.contains(&idle.addr) && idle.sender.is_ready())?;
            let idle = kept.idle.remove(at);
            Some(Connection {
                addr: idle.addr,
                sender: Sender::Http1(idle.sender),
                transfer: idle.transfer,
                reused: true,
            })
        });
        hosts.recount(&key);
        taken
    }

    /// Whether [`Self::take`] would find a connection now.
    pub(crate) fn has(&self, host: &str, port: u16, addrs: &[SocketAddr]) -> bool {
        let Ok(mut hosts) = self.hosts.lock() else {
            return false;
        };
        let key = (host.to_string(), port);
        let found = hosts.by_host.get_mut(&key).is_some_and(|kept| {
            kept.sweep(Instant::now());
            kept.shared
                .as_ref()
                .is_some_and(|s| addrs.contains(&s.addr))
                || kept
                    .idle
                    .iter()
                    .any(|idle| addrs.contains(&idle.addr) && idle.sender.is_ready())
        });
        hosts.recount(&key);
        found
    }

    /// Keeps an HTTP/1.1 connection whose response was read to its end, for the next
    /// request to `host:port`.
    pub(crate) fn put_idle(
        &self,
        host: &str,
        port: u16,
        addr: SocketAddr,
        sender: http1::SendRequest<B>,
        transfer: Arc<TransferSlot>,
    ) {
        self.keep(host, port, |kept| {
            if kept.idle.len() >= IDLE_PER_HOST {
                kept.idle.remove(0);
            }
            kept.idle.push(Idle {
                addr,
                sender,
                transfer,
                since: Instant::now(),
            });
        });
    }

    /// Shares a new HTTP/2 connection to `host:port`, unless one is shared already (the
    /// new one then serves only the request it was dialled for).
    pub(crate) fn put_shared(
        &self,
        host: &str,
        port: u16,
        addr: SocketAddr,
        sender: http2::SendRequest<B>,
        transfer: Arc<TransferSlot>,
    ) {
        self.keep(host, port, |kept| {
            if kept.shared.is_none() {
                kept.shared = Some(Shared {
                    addr,
                    sender,
                    transfer,
                    last_used: Instant::now(),
                });
            }
        });
    }

    /// Has `add` keep a connection to `host:port` (its expired ones swept first), then
    /// keeps the pool within its bounds; nothing once the pool is closed.
    fn keep(&self, host: &str, port: u16, add: impl FnOnce(&mut Kept<B>)) {
        let Ok(mut hosts) = self.hosts.lock() else {
            return;
        };
        if hosts.closed {
            return;
        }
        let key = (host.to_string(), port);
        let kept = hosts.by_host.entry(key.clone()).or_default();
        kept.sweep(Instant::now());
        add(kept);
        hosts.recount(&key);
        hosts.make_room();
    }

    /// Closes every kept connection and keeps none from now on (at shutdown).
    pub(crate) fn clear(&self) {
        if let Ok(mut hosts) = self.hosts.lock() {
            hosts.by_host.clear();
            hosts.count = 0;
            hosts.closed = true;
        }
    }
}

impl<B> Hosts<B> {
    /// Counts again after `key`'s entry changed, and drops it when empty.
    fn recount(&mut self, key: &(String, u16)) {
        if self.by_host.get(key).is_some_and(|kept| kept.len() == 0) {
            self.by_host.remove(key);
        }
        self.count = self.by_host.values().map(Kept::len).sum();
    }

    /// Closes the least recently used connections anywhere while more than [`IDLE_TOTAL`]
    /// are kept (expired ones first: every entry is swept).
    fn make_room(&mut self) {
        if self.count <= IDLE_TOTAL {
            return;
        }
        let now = Instant::now();
        for kept in self.by_host.values_mut() {
            kept.sweep(now);
        }
        self.by_host.retain(|_, kept| kept.len() > 0);
        self.count = self.by_host.values().map(Kept::len).sum();
        while self.count > IDLE_TOTAL {
            let Some(oldest) = self
                .by_host
                .iter()
                .filter_map(|(host, kept)| kept.oldest().map(|at| (at, host.clone())))
                .min()
                .map(|(_, host)| host)
            else {
                break;
            };
            if let Some(kept) = self.by_host.get_mut(&oldest) {
                kept.close_oldest();
            }
            self.recount(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    type Body = http_body_util::Empty<bytes::Bytes>;

    /// An HTTP/1.1 sender over an in-memory stream whose far end `ends` keeps open.
    async fn sender(ends: &mut Vec<tokio::io::DuplexStream>) -> http1::SendRequest<Body> {
        let (near, far) = tokio::io::duplex(1024);
        ends.push(far);
        let (sender, connection) = http1::handshake(TokioIo::new(near))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        sender
    }

    fn kept<B>(pool: &UpstreamPool<B>) -> (usize, usize) {
        let hosts = pool.hosts.lock().expect("lock");
        let counted: usize = hosts.by_host.values().map(Kept::len).sum();
        (hosts.count, counted)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn slot() -> Arc<TransferSlot> {
        TransferSlot::new(Arc::default())
    }

    #[tokio::test]
    async fn one_host_keeps_at_most_its_bound_and_the_newest() {
        let pool = UpstreamPool::new();
        let mut ends = Vec::new();
        for port in 0..(IDLE_PER_HOST as u16 + 3) {
            let sender = sender(&mut ends).await;
            pool.put_idle("registry.test", 443, addr(1000 + port), sender, slot());
        }
        assert_eq!(kept(&pool), (IDLE_PER_HOST, IDLE_PER_HOST));
        // The three oldest went; a request for one of their addresses finds nothing.
        assert!(pool.take("registry.test", 443, &[addr(1000)]).is_none());
        assert!(!pool.has("registry.test", 443, &[addr(1002)]));
    }

    #[tokio::test]
    async fn all_hosts_together_keep_at_most_the_total_bound() {
        let pool = UpstreamPool::new();
        let mut ends = Vec::new();
        for n in 0..(IDLE_TOTAL + 5) {
            let sender = sender(&mut ends).await;
            pool.put_idle(&format!("h{n}.test"), 443, addr(1000), sender, slot());
        }
        assert_eq!(kept(&pool), (IDLE_TOTAL, IDLE_TOTAL));
        // The hosts kept are the newest ones.
        let hosts = pool.hosts.lock().expect("lock");
        assert!(!hosts.by_host.contains_key(&("h4.test".to_string(), 443)));
        assert!(hosts
            .by_host
            .contains_key(&(format!("h{}.test", IDLE_TOTAL + 4), 443)));
    }

    #[tokio::test]
    async fn a_connection_is_taken_only_for_its_host_port_and_a_checked_address() {
        let pool = UpstreamPool::new();
        let mut ends = Vec::new();
        let sender = sender(&mut ends).await;
        // Ready once its connection task has run.
        tokio::task::yield_now().await;
        pool.put_idle("registry.test", 443, addr(1000), sender, slot());
        assert!(pool.take("other.test", 443, &[addr(1000)]).is_none());
        assert!(pool.take("registry.test", 8443, &[addr(1000)]).is_none());
        assert!(pool.take("registry.test", 443, &[addr(1001)]).is_none());
        let taken = pool.take("registry.test", 443, &[addr(1001), addr(1000)]);
        assert!(taken.is_some_and(|connection| connection.reused));
        assert_eq!(kept(&pool), (0, 0));
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_dropped_not_handed_out() {
        let pool = UpstreamPool::new();
        let mut ends = Vec::new();
        let sender = sender(&mut ends).await;
        tokio::task::yield_now().await;
        pool.put_idle("registry.test", 443, addr(1000), sender, slot());
        // The far end closes; the connection task sees it end.
        ends.clear();
        for _ in 0..100 {
            if !pool.has("registry.test", 443, &[addr(1000)]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pool.take("registry.test", 443, &[addr(1000)]).is_none());
        assert_eq!(kept(&pool), (0, 0));
    }
}
