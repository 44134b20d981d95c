//! The library's `serve` run in the test's own process, on a loopback listener: for tests
//! that stage what the binary cannot (a resolver's answers, an inspecting authority made in
//! memory). The lines it writes are read as the protocol's `ProxyLine`; the proxy stops when
//! its `Running` is dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use contractor_protocol::proxy::{Decision, Download, ProxyLine};
use contractor_proxy::{inspect, Allowlist, IpNet, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// How long `Running::next_line` waits for a line.
pub const LINE_PATIENCE: Duration = Duration::from_secs(10);

/// A proxy served in this process; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub lines: mpsc::UnboundedReceiver<ProxyLine>,
    _stop: oneshot::Sender<()>,
}

impl Running {
    pub async fn next_line(&mut self) -> ProxyLine {
        tokio::time::timeout(LINE_PATIENCE, self.lines.recv())
            .await
            .expect("a line in time")
            .expect("a line")
    }

    pub async fn next_decision(&mut self) -> Decision {
        match self.next_line().await {
            ProxyLine::Decision(decision) => decision,
            other => panic!("a decision, not {other:?}"),
        }
    }

    pub async fn next_download(&mut self) -> Download {
        match self.next_line().await {
            ProxyLine::Download(download) => download,
            other => panic!("a download, not {other:?}"),
        }
    }
}

/// Serves `config` on a new loopback listener.
pub async fn start(config: ProxyConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    start_on(config, listener).await
}

/// Serves `config` on `listener`.
pub async fn start_on(config: ProxyConfig, listener: TcpListener) -> Running {
    let addr = listener.local_addr().expect("proxy address");
    let (sender, lines) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(contractor_proxy::serve(
        config,
        listener,
        sender,
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        addr,
        lines,
        _stop: stop,
    }
}

/// Allows `rules` on any port, with the loopback network open (the tests' upstreams
/// listen there); names are resolved by the configuration's default resolver until the
/// test stages its own.
pub fn open_to_loopback(rules: &[&str]) -> ProxyConfig {
    let mut config = ProxyConfig::new(Allowlist::parse(rules).expect("rules"));
    config.allowed_nets = vec!["127.0.0.0/8".parse::<IpNet>().expect("net")];
    config.allowed_ports = (1..=u16::MAX).collect();
    config
}

/// Sends a CONNECT for `target` (`host:port`) through `proxy`: the stream, and the head of
/// the answer.
pub async fn connect(proxy: SocketAddr, target: &str) -> io::Result<(TcpStream, String)> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await?);
    }
    Ok((stream, String::from_utf8_lossy(&head).into_owned()))
}

/// Sends a CONNECT to `target` and reads the head of the answer.
pub async fn connect_status(proxy: SocketAddr, target: String) -> io::Result<String> {
    Ok(connect(proxy, &target).await?.1)
}

/// CONNECTs to `host:port` through `proxy` (the answer must be 200), then speaks TLS
/// trusting only `trusted`.
pub async fn connect_tls(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    trusted: &CertificateDer<'static>,
) -> io::Result<TlsStream<TcpStream>> {
    let (stream, head) = connect(proxy, &format!("{host}:{port}")).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = RootCertStore::empty();
    roots
        .add(trusted.clone())
        .expect("trust the build authority");
    let client_config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(client_config))
        .connect(
            ServerName::try_from(host.to_string()).expect("name"),
            stream,
        )
        .await
}

/// Makes `config` record downloads and inspect TLS to the hosts it reaches, with a new
/// build authority and `roots` trusted upstream; returns the authority's certificate, for
/// clients to trust.
pub fn inspect_tls(config: &mut ProxyConfig, roots: RootCertStore) -> CertificateDer<'static> {
    config.record_downloads = true;
    let authority = inspect::Authority::new(&config.reachable_hosts())
        .expect("authority")
        .expect("names");
    let certificate = authority.certificate().clone();
    config.inspection = Some(inspect::Inspection {
        authority: Arc::new(authority),
        upstream: Arc::new(inspect::client_config(roots)),
    });
    certificate
}
