//! `contractor-store serve --root DIR [--listen ADDR]`: serves DIR over HTTP, prints one
//! `ready` line with the bound address on stdout, and stops on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use contractor_protocol::service::Ready;
use contractor_protocol::ExitCode;
use contractor_store::{Store, StoreConfig};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Parser)]
#[command(
    name = "contractor-store",
    version,
    about = "Serves a store directory over HTTP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a directory: GET and HEAD anywhere in it, PUT under builds/<id>/artifacts/.
    Serve {
        /// The store directory; it must exist.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Serve only /builds/ID/... (one build's inputs and artifacts); refuse the rest.
        #[arg(long, value_name = "ID")]
        only_build: Option<String>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Command::Serve {
        root,
        listen,
        only_build,
    } = Cli::parse().command;
    let store = match Store::open(&StoreConfig {
        root,
        access_log: true,
        only_build,
    }) {
        Ok(store) => store,
        Err(e) => return fail(ExitCode::BadInput, &anyhow::Error::new(e)),
    };
    match run(store, listen).await {
        Ok(()) => ExitCode::Success.into(),
        Err(e) => fail(ExitCode::Infrastructure, &e),
    }
}

async fn run(store: Store, listen: SocketAddr) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch for SIGINT")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    contractor_protocol::jsonl::write_line(&mut std::io::stdout(), &Ready::new("store", addr))
        .context("cannot write the ready line")?;
    eprintln!(
        "contractor-store: serving {} on http://{addr}",
        store.root().display()
    );
    let shutdown = async {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("contractor-store: stopping");
    };
    store.serve(listener, shutdown).await;
    Ok(())
}

fn fail(code: ExitCode, error: &anyhow::Error) -> std::process::ExitCode {
    eprintln!("contractor-store: {error:#}");
    code.into()
}
