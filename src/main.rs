//! The `corepush` binary: parse flags, start the shards and then the HTTP
//! API, stop on SIGINT or SIGTERM (the API first, then the shards).

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut config = cli::Cli::parse().into_config();
    config.release_memory = Some(release_free_pages);
    // Refuse an unsafe API setting before anything starts.
    if config.api_listen.is_some() {
        if let Err(e) = corepush::api::check(&config) {
            error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    }

    let server = match corepush::start(config.clone()) {
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

    let api = match config.api_listen {
        None => None,
        Some(_) => match corepush::api::start(&config, server.pusher()) {
            Ok(api) => {
                info!(
                    "api listening on {} ({})",
                    api.local_addr(),
                    if config.api_token.is_some() {
                        "bearer token required"
                    } else {
                        "no token: anyone who reaches it may push"
                    }
                );
                Some(Arc::new(api))
            }
            Err(e) => {
                error!("cannot start the HTTP API: {e}");
                let _ = server.shutdown();
                return ExitCode::FAILURE;
            }
        },
    };

    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(e) => {
            error!("cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let trigger = server.shutdown_trigger();
    let api_on_signal = api.clone();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            info!(signal, "stopping: closing connections with 1001");
            // No new pushes; those in flight still reach the shards.
            if let Some(api) = api_on_signal {
                api.shutdown();
            }
            trigger.trigger();
        }
    });
    let result = server.join();
    // The shards stopped on their own (a failure): stop the API too.
    if let Some(api) = api {
        api.shutdown();
    }
    match result {
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

/// On hosts with transparent huge pages set to `always`, the first touch of
/// each shard's allocator arena faults in whole 2 MiB pages: about 20 MiB of
/// resident memory for two shards, whatever the number of connections
/// (measured: 1,032 bytes per connection at 19,000 connections with THP,
/// 226 without; docs/decisions.md). corepush's heap is many small objects
/// with no use for huge pages, so it opts out, for this process only.
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this
    // process; a kernel without it returns EINVAL, which changes nothing.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

extern "C" {
    // mimalloc's own, linked in by the `mimalloc` crate.
    fn mi_collect(force: bool);
}

/// After a mass disconnect, returns the pages the calling shard's heap
/// freed to the OS at once (mimalloc would otherwise keep them until the
/// thread allocates again, which an idle shard does not).
fn release_free_pages() {
    // SAFETY: mi_collect only walks and purges the calling thread's heap.
    unsafe { mi_collect(true) };
}
