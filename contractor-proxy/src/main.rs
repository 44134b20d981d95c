//! `contractor-proxy --allow HOST... [--listen ADDR]`: a filtering forward proxy. Prints one
//! `ready` line with the bound address on stdout, then one `decision` line per request;
//! stops on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::thread;

use anyhow::{anyhow, Context};
use clap::Parser;
use contractor_protocol::jsonl::{write_line, JsonlError};
use contractor_protocol::proxy::Decision;
use contractor_protocol::service::Ready;
use contractor_protocol::ExitCode;
use contractor_proxy::{Allowlist, IpNet, ProxyConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

const AFTER_HELP: &str = "\
Clients reach allowed hosts with CONNECT (HTTPS) or absolute-URI HTTP requests. Anything \
else gets 403 with an X-Contractor-Proxy-Error header saying why, as does any host whose \
addresses are all loopback, private or link-local (unless --allow-net covers them). Stdout \
carries one JSON `ready` line, then one JSON `decision` line per request.

Example:
  contractor-proxy --allow deb.debian.org --listen 127.0.0.1:3128
  curl -x http://127.0.0.1:3128 https://deb.debian.org/";

#[derive(Debug, Parser)]
#[command(
    name = "contractor-proxy",
    version,
    about = "Filtering HTTP/HTTPS forward proxy with a host allowlist",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// A host clients may reach: `example.org` exactly, or `*.example.org` for its
    /// subdomains (not example.org itself). Repeatable.
    #[arg(long, value_name = "HOST")]
    allow: Vec<String>,
    /// A network the proxy may connect to although its addresses are loopback, private or
    /// link-local, e.g. 127.0.0.0/8. Repeatable.
    #[arg(long, value_name = "CIDR")]
    allow_net: Vec<String>,
    /// A port CONNECT and HTTP requests may target. Repeatable.
    #[arg(
        long,
        value_name = "PORT",
        default_values_t = [80, 443],
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    allow_port: Vec<u16>,
}

impl Cli {
    fn into_config(self) -> anyhow::Result<ProxyConfig> {
        let allowed_nets = self
            .allow_net
            .iter()
            .map(|net| net.parse::<IpNet>())
            .collect::<Result<_, _>>()?;
        Ok(ProxyConfig {
            listen: self.listen,
            allowlist: Allowlist::parse(&self.allow)?,
            allowed_nets,
            allowed_ports: self.allow_port.into_iter().collect(),
        })
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match Cli::parse().into_config() {
        Ok(config) => config,
        Err(e) => return fail(ExitCode::BadInput, &e),
    };
    match run(config).await {
        Ok(()) => ExitCode::Success.into(),
        Err(e) => fail(ExitCode::Infrastructure, &e),
    }
}

async fn run(config: ProxyConfig) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let listen = config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    write_line(&mut std::io::stdout(), &Ready::new("proxy", addr))
        .context("cannot write the ready line")?;
    eprintln!(
        "contractor-proxy: listening on {addr}, {} allowlist rules",
        config.allowlist.rules().len()
    );
    let (decisions, received) = mpsc::unbounded_channel();
    let (writer_failed, failed) = oneshot::channel();
    let writer = thread::spawn(move || write_decisions(received, writer_failed));
    let shutdown = async {
        tokio::select! {
            _ = terminate.recv() => eprintln!("contractor-proxy: stopping"),
            _ = interrupt.recv() => eprintln!("contractor-proxy: stopping"),
            Ok(()) = failed => {}
        }
    };
    contractor_proxy::serve(config, listener, decisions, shutdown).await;
    writer
        .join()
        .map_err(|_| anyhow!("the decision writer panicked"))?
        .context("cannot write decisions to stdout")
}

/// Writes decisions to stdout until every sender is gone; on failure, says so on `failed`
/// so that the proxy stops rather than run unrecorded.
fn write_decisions(
    mut received: mpsc::UnboundedReceiver<Decision>,
    failed: oneshot::Sender<()>,
) -> Result<(), JsonlError> {
    let mut stdout = std::io::stdout();
    while let Some(decision) = received.blocking_recv() {
        if let Err(e) = write_line(&mut stdout, &decision) {
            let _ = failed.send(());
            return Err(e);
        }
    }
    Ok(())
}

fn fail(code: ExitCode, error: &anyhow::Error) -> std::process::ExitCode {
    eprintln!("contractor-proxy: {error:#}");
    code.into()
}
