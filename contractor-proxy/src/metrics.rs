//! Counters of what the proxy did, the per-request access log entry, and the `/metrics`
//! endpoint that serves the counters in the Prometheus text format.
//!
//! The invariant: every request adds to exactly one of `allowed` or a `denied` class, and
//! every byte relayed to or from an upstream is counted once, in `bytes_up` or
//! `bytes_down`, whether it went through a tunnel or a forwarded request.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use contractor_protocol::proxy::SummaryTag;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// The proxy's counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    allowed: AtomicU64,
    denied: Mutex<BTreeMap<&'static str, u64>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    active_connections: AtomicI64,
    connections: AtomicU64,
    name_lookups: AtomicU64,
}

/// The counters at one moment; also the summary line the binary prints last on stdout.
pub use contractor_protocol::proxy::Summary;

impl Metrics {
    /// Counts an allowed request.
    pub fn allowed(&self) {
        self.allowed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused request of `class` (see [`crate::Denial::class`]).
    pub fn denied(&self, class: &'static str) {
        if let Ok(mut denied) = self.denied.lock() {
            *denied.entry(class).or_default() += 1;
        }
    }

    /// Counts bytes sent upstream.
    pub fn add_up(&self, bytes: u64) {
        self.bytes_up.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts bytes received from upstream.
    pub fn add_down(&self, bytes: u64) {
        self.bytes_down.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A client connection opened.
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection closed.
    pub fn connection_closed(&self) {
        self.active_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts one call of the resolver (one attempt of a lookup: a `getaddrinfo`, which
    /// asks the DNS for the name's A and AAAA records unless `/etc/hosts` answers).
    pub fn name_lookup(&self) {
        self.name_lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn summary(&self) -> Summary {
        let denied = self
            .denied
            .lock()
            .map(|denied| {
                denied
                    .iter()
                    .map(|(class, count)| (class.to_string(), *count))
                    .collect()
            })
            .unwrap_or_default();
        Summary {
            kind: SummaryTag::Summary,
            allowed: self.allowed.load(Ordering::Relaxed),
            denied,
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            active_connections: self.active_connections.load(Ordering::Relaxed),
            name_lookups: self.name_lookups.load(Ordering::Relaxed),
            cache_not_kept: 0,
            record: None,
            phase: None,
        }
    }

    /// The counters in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let summary = self.summary();
        let mut text = String::new();
        text.push_str(
            "# HELP contractor_proxy_requests_total Requests decided, by decision and reason class.\n\
             # TYPE contractor_proxy_requests_total counter\n",
        );
        text.push_str(&format!(
            "contractor_proxy_requests_total{{decision=\"allow\",reason=\"allowed\"}} {}\n",
            summary.allowed
        ));
        for (class, count) in &summary.denied {
            text.push_str(&format!(
                "contractor_proxy_requests_total{{decision=\"deny\",reason=\"{class}\"}} {count}\n"
            ));
        }
        for (name, help, kind, value) in [
            (
                "contractor_proxy_upstream_sent_bytes_total",
                "Bytes sent to upstream servers.",
                "counter",
                summary.bytes_up.to_string(),
            ),
            (
                "contractor_proxy_upstream_received_bytes_total",
                "Bytes received from upstream servers.",
                "counter",
                summary.bytes_down.to_string(),
            ),
            (
                "contractor_proxy_connections_total",
                "Client connections accepted.",
                "counter",
                summary.connections.to_string(),
            ),
            (
                "contractor_proxy_active_connections",
                "Client connections open now.",
                "gauge",
                summary.active_connections.to_string(),
            ),
            (
                "contractor_proxy_name_lookups_total",
                "Host names looked up with the resolver (each attempt; answers reused from the name cache are not lookups).",
                "counter",
                summary.name_lookups.to_string(),
            ),
        ] {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        text
    }
}

/// One finished request, a line of the `--access-log` file: what the decision line says,
/// plus the figures known only at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessEntry {
    /// Always `access`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the request arrived, seconds since the Unix epoch, with milliseconds.
    pub time: f64,
    /// The client's address.
    pub client: String,
    /// `CONNECT`, `GET`, ...
    pub method: String,
    /// The target host, normalised.
    pub host: String,
    /// The target port.
    pub port: u16,
    /// `allow` or `deny`, as on the decision line.
    pub decision: String,
    /// The status the client got (200 for an opened tunnel).
    pub status: u16,
    /// Bytes sent to the upstream (request head and body, or tunnel bytes).
    pub bytes_up: u64,
    /// Bytes received from the upstream (response head and body, or tunnel bytes).
    pub bytes_down: u64,
    /// From the request's arrival to its end (the tunnel closing, the body's last byte).
    pub duration_ms: u64,
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let metrics = std::sync::Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let metrics = std::sync::Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(metrics_response(&request, &metrics)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn metrics_response(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, body, content_type) =
        if request.method() == Method::GET && request.uri().path() == "/metrics" {
            (
                StatusCode::OK,
                metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "only GET /metrics is served here\n".to_string(),
                "text/plain; charset=utf-8",
            )
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_counter_with_its_labels() {
        let metrics = Metrics::default();
        metrics.allowed();
        metrics.denied("host_not_allowed");
        metrics.denied("host_not_allowed");
        metrics.add_up(10);
        metrics.add_down(20);
        metrics.connection_opened();
        let text = metrics.render();
        for line in [
            "contractor_proxy_requests_total{decision=\"allow\",reason=\"allowed\"} 1",
            "contractor_proxy_requests_total{decision=\"deny\",reason=\"host_not_allowed\"} 2",
            "contractor_proxy_upstream_sent_bytes_total 10",
            "contractor_proxy_upstream_received_bytes_total 20",
            "contractor_proxy_active_connections 1",
            "# TYPE contractor_proxy_active_connections gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
