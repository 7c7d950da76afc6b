//! The `corepush` binary: parse flags, start the shards, stop on SIGINT or
//! SIGTERM.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = cli::Cli::parse().into_config();

    let server = match corepush::start(config) {
        Ok(server) => server,
        Err(e) => {
            error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = server.fd_limit();
    info!(
        "listening on {} with {} shards; open-file limit {} (was {}) allows about {} connections",
        server.local_addr(),
        server.shards(),
        limit.now,
        limit.before,
        server.connection_capacity(),
    );
    if let Some((node, bus)) = server.cluster_node() {
        info!("cluster: node {node:016x} joins the cluster on {bus}");
    }

    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            error!("cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let trigger = server.shutdown_trigger();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            info!(signal, "stopping: closing connections with 1001");
            trigger.trigger();
        }
    });
    match server.join() {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("a shard failed: {e}");
            ExitCode::FAILURE
        }
    }
}
