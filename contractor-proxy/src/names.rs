//! The proxy's memory of name resolutions: each `host:port` is resolved once and its
//! answer reused for [`NAME_TTL`], so that a package manager opening hundreds of
//! connections to one registry at once makes one DNS query, not hundreds (a plain resolver
//! drops most of a hundred concurrent queries for one name).
//!
//! - One lookup in flight per name: a request for a name being resolved waits for that
//!   lookup's answer. The lookup runs in a task of its own, so a waiter that gives up (its
//!   client left) does not cancel it for the others.
//! - A transient failure (no answer in time, `EAI_AGAIN`) is tried again, at most
//!   [`RESOLVE_ATTEMPTS`] times in all, [`RESOLVE_BACKOFF`] apart and doubling; the last
//!   failure is the answer, and names the attempts.
//! - A failure is remembered for [`NEGATIVE_TTL`] only, and an answer none of whose
//!   addresses could be connected to is forgotten ([`NameCache::forget`]). The resolver's
//!   own TTLs are not known (`getaddrinfo` does not say them).
//! - At most [`MAX_NAMES`] answers are kept; when full, the expired ones go, then the
//!   oldest. Lookups in flight are never dropped (there are at most as many as requests
//!   the proxy serves at once).
//!
//! The invariant: this only ever saves a lookup, never a check. The addresses it returns
//! go through [`crate::ProxyConfig::check_addresses`] on every request, and the dialer
//! checks each address again when it connects.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::policy::Resolver;

/// How long an answer is reused.
pub const NAME_TTL: Duration = Duration::from_secs(60);

/// How long a failure is reused.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// The most names (`host:port`) whose answers are kept.
pub const MAX_NAMES: usize = 4096;

/// Attempts of one lookup, the first included, when the failures are transient.
pub const RESOLVE_ATTEMPTS: u32 = 3;

/// The wait before the second attempt; it doubles for each further one.
pub const RESOLVE_BACKOFF: Duration = Duration::from_millis(250);

/// A lookup's outcome, as many waiters can share it.
type Answer = Result<Vec<SocketAddr>, Failure>;

/// A failed lookup, kept so that it can be handed to every waiter.
#[derive(Debug, Clone)]
struct Failure {
    kind: io::ErrorKind,
    message: String,
}

impl Failure {
    fn to_error(&self) -> io::Error {
        io::Error::new(self.kind, self.message.clone())
    }
}

/// A name's entry: being resolved, or resolved.
enum Entry {
    Pending(watch::Receiver<Option<Answer>>),
    Ready { answer: Answer, stored: Instant },
}

/// Resolves names through a [`Resolver`], once per name and [`NAME_TTL`].
#[derive(Clone)]
pub struct NameCache(Arc<Inner>);

struct Inner {
    resolver: Resolver,
    /// How long one attempt may take.
    attempt_timeout: Duration,
    /// Counts each call of the resolver.
    metrics: Arc<Metrics>,
    names: Mutex<HashMap<(String, u16), Entry>>,
}

impl NameCache {
    /// A cache in front of `resolver`, each attempt of a lookup bounded by `attempt_timeout`
    /// and counted in `metrics` ([`Metrics::name_lookup`]).
    pub fn new(resolver: Resolver, attempt_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        NameCache(Arc::new(Inner {
            resolver,
            attempt_timeout,
            metrics,
            names: Mutex::new(HashMap::new()),
        }))
    }

    /// The longest [`Self::resolve`] can take: every attempt timing out, and the backoffs.
    pub fn longest_wait(&self) -> Duration {
        let mut total = Duration::ZERO;
        let mut backoff = RESOLVE_BACKOFF;
        for attempt in 0..RESOLVE_ATTEMPTS {
            total += self.0.attempt_timeout;
            if attempt + 1 < RESOLVE_ATTEMPTS {
                total += backoff;
                backoff *= 2;
            }
        }
        total
    }

    /// Forgets the answer for `host` on `port` (none of its addresses could be connected
    /// to: the name may have moved), so that the next request looks it up again. A lookup
    /// in flight is left alone.
    pub fn forget(&self, host: &str, port: u16) {
        if let Ok(mut names) = self.0.names.lock() {
            let key = (host.to_ascii_lowercase(), port);
            if let Some(Entry::Ready { .. }) = names.get(&key) {
                names.remove(&key);
            }
        }
    }

    /// The addresses of `host` on `port`: remembered, being looked up (then waited for), or
    /// looked up now.
    pub async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let key = (host.to_ascii_lowercase(), port);
        let mut pending = {
            let mut names = self
                .0
                .names
                .lock()
                .map_err(|_| io::Error::other("the name cache is poisoned"))?;
            match names.get(&key) {
                Some(Entry::Ready { answer, stored }) if fresh(answer, *stored) => {
                    return answer.clone().map_err(|failure| failure.to_error());
                }
                Some(Entry::Pending(pending)) => pending.clone(),
                _ => {
                    let (answer, pending) = watch::channel(None);
                    make_room(&mut names);
                    names.insert(key.clone(), Entry::Pending(pending.clone()));
                    tokio::spawn(Arc::clone(&self.0).look_up(key, answer, pending.clone()));
                    pending
                }
            }
        };
        let answer = pending
            .wait_for(Option::is_some)
            .await
            .map_err(|_| io::Error::other("the lookup ended without an answer"))?
            .clone();
        match answer {
            Some(Ok(addrs)) => Ok(addrs),
            Some(Err(failure)) => Err(failure.to_error()),
            None => Err(io::Error::other("the lookup ended without an answer")),
        }
    }
}

impl Inner {
    /// Looks `key` up (with the retries), remembers the answer and hands it to the waiters.
    async fn look_up(
        self: Arc<Self>,
        key: (String, u16),
        waiters: watch::Sender<Option<Answer>>,
        ours: watch::Receiver<Option<Answer>>,
    ) {
        let answer = self.attempts(&key.0, key.1).await;
        if let Ok(mut names) = self.names.lock() {
            // Only the entry this lookup made is replaced.
            let still_ours =
                matches!(names.get(&key), Some(Entry::Pending(entry)) if entry.same_channel(&ours));
            if still_ours {
                names.insert(
                    key,
                    Entry::Ready {
                        answer: answer.clone(),
                        stored: Instant::now(),
                    },
                );
            }
        }
        waiters.send_replace(Some(answer));
    }

    /// Up to [`RESOLVE_ATTEMPTS`] lookups while the failures are transient.
    async fn attempts(&self, host: &str, port: u16) -> Answer {
        let mut backoff = RESOLVE_BACKOFF;
        let mut attempt = 1;
        loop {
            self.metrics.name_lookup();
            let lookup = self.resolver.resolve(host, port);
            let failure = match tokio::time::timeout(self.attempt_timeout, lookup).await {
                Ok(Ok(addrs)) => return Ok(addrs),
                Ok(Err(e)) => Failure {
                    kind: e.kind(),
                    message: e.to_string(),
                },
                Err(_) => Failure {
                    kind: io::ErrorKind::TimedOut,
                    message: format!("no answer within {} s", self.attempt_timeout.as_secs_f64()),
                },
            };
            if !transient(&failure) {
                return Err(failure);
            }
            if attempt >= RESOLVE_ATTEMPTS {
                return Err(Failure {
                    kind: failure.kind,
                    message: format!("{} (tried {attempt} times)", failure.message),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        }
    }
}

/// Whether a failure may pass if asked again: the resolver did not answer in time, or said
/// so itself (`EAI_AGAIN`, whose glibc text the system resolver passes on).
fn transient(failure: &Failure) -> bool {
    matches!(
        failure.kind,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    ) || failure
        .message
        .contains("Temporary failure in name resolution")
}

/// Whether a stored answer may still be used.
fn fresh(answer: &Answer, stored: Instant) -> bool {
    let ttl = match answer {
        Ok(_) => NAME_TTL,
        Err(_) => NEGATIVE_TTL,
    };
    stored.elapsed() < ttl
}

/// Makes room for one more name: the expired answers go, then (still full) the oldest.
fn make_room(names: &mut HashMap<(String, u16), Entry>) {
    if names.len() < MAX_NAMES {
        return;
    }
    names.retain(|_, entry| match entry {
        Entry::Pending(_) => true,
        Entry::Ready { answer, stored } => fresh(answer, *stored),
    });
    while names.len() >= MAX_NAMES {
        let oldest = names
            .iter()
            .filter_map(|(key, entry)| match entry {
                Entry::Ready { stored, .. } => Some((*stored, key.clone())),
                Entry::Pending(_) => None,
            })
            .min_by_key(|(stored, _)| *stored)
            .map(|(_, key)| key);
        match oldest {
            Some(key) => {
                names.remove(&key);
            }
            // Only lookups in flight: they are bounded by the requests served at once.
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(answer: fn(&str) -> io::Result<Vec<SocketAddr>>) -> (Resolver, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        let resolver = Resolver::new(move |host, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            let answer = answer(host);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                answer
            })
        });
        (resolver, count)
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 443))
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_name_share_one_lookup() {
        let (resolver, count) = counting(|_| Ok(vec![addr()]));
        let metrics = Arc::new(Metrics::default());
        let cache = NameCache::new(resolver, Duration::from_secs(5), Arc::clone(&metrics));
        let lookups: Vec<_> = (0..100)
            .map(|i| {
                let cache = cache.clone();
                let host = if i % 2 == 0 {
                    "Reg.Example"
                } else {
                    "reg.example"
                };
                tokio::spawn(async move { cache.resolve(host, 443).await })
            })
            .collect();
        for lookup in lookups {
            assert_eq!(lookup.await.expect("task").expect("answer"), vec![addr()]);
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Remembered: asked again, nothing is looked up.
        cache.resolve("reg.example", 443).await.expect("answer");
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // Another port is another name.
        cache.resolve("reg.example", 80).await.expect("answer");
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // A forgotten name is looked up again.
        cache.forget("REG.example", 443);
        cache.resolve("reg.example", 443).await.expect("answer");
        assert_eq!(count.load(Ordering::SeqCst), 3);
        // The summary counts the resolver's calls, not the requests.
        assert_eq!(metrics.summary().name_lookups, 3);
    }

    #[tokio::test]
    async fn a_final_failure_is_kept_briefly_and_not_retried() {
        let (resolver, count) =
            counting(|_| Err(io::Error::new(io::ErrorKind::NotFound, "no such host")));
        let cache = NameCache::new(resolver, Duration::from_secs(5), Arc::default());
        for _ in 0..3 {
            let e = cache.resolve("gone.example", 443).await.expect_err("fails");
            assert_eq!(e.to_string(), "no such host");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_transient_failure_is_tried_again_then_reported_with_the_attempts() {
        let (resolver, count) = counting(|_| {
            Err(io::Error::other(
                "failed to lookup address information: Temporary failure in name resolution",
            ))
        });
        let metrics = Arc::new(Metrics::default());
        let cache = NameCache::new(resolver, Duration::from_secs(5), Arc::clone(&metrics));
        let e = cache
            .resolve("flaky.example", 443)
            .await
            .expect_err("fails");
        assert!(e.to_string().ends_with("(tried 3 times)"), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), RESOLVE_ATTEMPTS as usize);
        // Each attempt is a lookup.
        assert_eq!(metrics.summary().name_lookups, u64::from(RESOLVE_ATTEMPTS));
    }

    #[test]
    fn a_full_cache_drops_the_expired_then_the_oldest() {
        let mut names = HashMap::new();
        let now = Instant::now();
        for i in 0..MAX_NAMES {
            let stored = now - Duration::from_millis(i as u64);
            let entry = Entry::Ready {
                answer: Ok(vec![addr()]),
                stored,
            };
            names.insert((format!("h{i}.example"), 443), entry);
        }
        make_room(&mut names);
        assert_eq!(names.len(), MAX_NAMES - 1);
        let oldest = (format!("h{}.example", MAX_NAMES - 1), 443);
        assert!(!names.contains_key(&oldest));
        assert_eq!(
            longest(Duration::from_secs(10)),
            Duration::from_millis(30_750)
        );
    }

    fn longest(attempt: Duration) -> Duration {
        NameCache::new(
            Resolver::new(|_, _| Box::pin(async { Ok(vec![]) })),
            attempt,
            Arc::default(),
        )
        .longest_wait()
    }
}
