//! corepush-flood: a connection-flood benchmark for WebSocket push servers
//! speaking the corepush protocol (uid login, `<to>:<payload>`, `all:`).
//!
//! It drives tens of thousands of connections from a few processes with raw
//! non-blocking sockets and epoll, checks that every message arrives exactly
//! once at the right uid, and prints each figure beside this host's bare-TCP
//! floor. See docs/benchmarks.md.

mod calibrate;
mod client;
mod conn;
mod coordinator;
mod http;
mod ledger;
mod payload;
mod proc_stats;
mod proto;
mod report;
mod schedule;
mod sys;
mod worker;
mod ws;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Connection-flood benchmark for corepush-protocol WebSocket servers.
///
/// Phases, in order: calibrate (bare TCP floor), connect, hold, targeted,
/// broadcast, churn, sweep (with --sweep), teardown. Exits 1 when any
/// message was lost, duplicated, misrouted or reordered, or any connection
/// failed (a sweep step that misses its latency or rate bar is a
/// measurement, not a failure).
#[derive(Parser, Debug, Clone)]
#[command(name = "corepush-flood", version)]
pub struct Args {
    /// Server address host:port; repeat for several nodes (connections are
    /// spread round-robin over them).
    #[arg(long = "target", default_value = "127.0.0.1:1234")]
    pub targets: Vec<String>,

    /// Number of WebSocket connections (uids u0..uN-1).
    #[arg(long, default_value_t = 10_000)]
    pub conns: u32,

    /// Client worker processes; default: as few as the open-file limit allows.
    #[arg(long)]
    pub procs: Option<usize>,

    /// Source addresses to bind (loopback targets only) so ephemeral ports do
    /// not run out; `none` to let the kernel choose.
    #[arg(long, default_value = "127.0.0.0/8")]
    pub sources: String,

    /// Server process to sample memory of (VmRSS); repeat for a cluster.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,

    /// Print a JSON summary as the last stdout line.
    #[arg(long)]
    pub json: bool,

    /// Total new connections per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,

    /// Connection attempts in flight per worker (bounds SYN bursts).
    #[arg(long, default_value_t = 256)]
    pub inflight: usize,

    /// Seconds a connect + upgrade + login may take before it counts failed.
    #[arg(long, default_value_t = 15.0)]
    pub connect_timeout: f64,

    /// Seconds to hold all connections idle (server memory is sampled).
    #[arg(long, default_value_t = 5.0)]
    pub hold_secs: f64,

    /// Targeted messages (0 skips the targeted and churn phases).
    #[arg(long, default_value_t = 10_000)]
    pub msgs: u32,

    /// Targeted messages per second, all workers together.
    #[arg(long, default_value_t = 5_000.0)]
    pub msg_rate: f64,

    /// Broadcasts (`all:`), one at a time (0 skips the phase).
    #[arg(long, default_value_t = 5)]
    pub broadcasts: u32,

    /// Fraction of connections that close and reconnect during a second run
    /// of targeted traffic (0 skips the churn phase).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,

    /// Throughput sweep, run after churn (before teardown): targeted
    /// traffic stepped up through --sweep-rates, --sweep-secs a step, with
    /// the targeted phase's checks, until a step is not sustained (p99 above
    /// --sweep-p99-ms, or sent or delivered per second below 95% of the rate
    /// asked); reports every step and the highest rate sustained.
    #[arg(long)]
    pub sweep: bool,

    /// Sweep steps in msg/s, all workers together, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "5000,10000,20000,40000,80000",
        requires = "sweep"
    )]
    pub sweep_rates: Vec<u32>,

    /// Seconds of traffic per sweep step.
    #[arg(long, default_value_t = 5.0, requires = "sweep")]
    pub sweep_secs: f64,

    /// p99 latency (ms) above which a sweep step is not sustained.
    #[arg(long, default_value_t = 5.0, requires = "sweep")]
    pub sweep_p99_ms: f64,

    /// Push targeted messages through the server's HTTP API at this
    /// address (host:port) too, after the WebSocket targeted phase: single
    /// pushes (POST /push/{uid}) then batches (POST /push), each first
    /// paced (the targeted phase's schedule and rate: latency comparable
    /// with it) then flat out (--api-msgs: requests and pushes per second);
    /// API-to-client latency, the same exactly-once and order checks.
    #[arg(long, value_name = "ADDR")]
    pub push_via_api: Option<String>,

    /// Bearer token for the HTTP API (`Authorization: Bearer T`).
    #[arg(long, env = "COREPUSH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Messages per batch request (POST /push).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub api_batch: u32,

    /// Keep-alive HTTP connections pushing at once, one request in flight
    /// each (schedule sender s pushes on connection s % N, so each pair
    /// keeps its order).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub api_conns: u32,

    /// Pushes per second of the paced API steps, all connections together
    /// (default: --msg-rate; 0: no paced steps). They send --msgs messages.
    #[arg(long)]
    pub api_rate: Option<f64>,

    /// Messages of each flat-out API step.
    #[arg(long, default_value_t = 50_000)]
    pub api_msgs: u32,

    /// Churn soak: this many short connections (connect, then disconnect:
    /// clean, abrupt reset, or half-open left to the server's timeouts, as
    /// --soak-mix says), as fast as the host allows, while the --conns
    /// steady connections carry targeted traffic (--msgs at --msg-rate,
    /// round after round, checked as usual). Then teardown, and the
    /// server's connection and uid counts (GET /stats on --stats-api), open
    /// descriptors and RSS (--server-pid) must be back to their baseline.
    /// Runs instead of the other phases.
    #[arg(long, value_name = "N")]
    pub soak_conns: Option<u64>,

    /// Weights of the soak's kinds: clean, abrupt, unlogged (upgraded,
    /// never logged in), silent (logged in, then silent).
    #[arg(long, value_delimiter = ',', default_value = "1,1,1,1", num_args = 1)]
    pub soak_mix: Vec<u32>,

    /// Soak connections open at once per worker (half-open ones included).
    #[arg(long, default_value_t = 4096)]
    pub soak_slots: u32,

    /// Seconds a half-open soak connection waits for the server to close it
    /// before it counts as not reaped (a failure).
    #[arg(long, default_value_t = 30.0)]
    pub soak_reap_secs: f64,

    /// Milliseconds a silent soak connection keeps its socket after the
    /// server closed it (the server must then drop it on its own, after
    /// its --close-timeout-ms).
    #[arg(long, default_value_t = 2500.0)]
    pub soak_linger_ms: f64,

    /// Seconds the server gets after the soak to bring its counts,
    /// descriptors and RSS back.
    #[arg(long, default_value_t = 30.0)]
    pub soak_settle_secs: f64,

    /// How far above its baseline the server's RSS may end the soak.
    #[arg(long, default_value_t = 0.10)]
    pub soak_rss_tolerance: f64,

    /// The server's HTTP API, for GET /stats in the soak.
    #[arg(long, default_value = "127.0.0.1:1235", value_name = "ADDR")]
    pub stats_api: String,

    /// Skip the bare-TCP calibration.
    #[arg(long)]
    pub no_calibrate: bool,

    /// Only measure this host's bare-TCP floor (no server needed), then exit.
    #[arg(long)]
    pub calibrate_only: bool,

    /// Bare fanout rounds in calibration (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub calib_rounds: u32,

    /// Skip the calibration's two-thread bare relay (the one-way floor of
    /// a two-shard server; it takes as long as the one-thread one).
    #[arg(long)]
    pub calib_no_relay2: bool,

    /// Seed of the message schedule (same seed, same schedule).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// uid prefix: connection i logs in as <prefix><i>.
    #[arg(long, default_value = "u")]
    pub uid_prefix: String,

    /// Seconds to wait for late messages after the last send.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,

    /// Do not print the .hgrm percentile distributions.
    #[arg(long)]
    pub no_hgrm: bool,

    /// Internal: run as worker number N under a coordinator.
    #[arg(long, hide = true)]
    pub worker: Option<usize>,
}

fn main() {
    let args = Args::parse();
    let code = match args.worker {
        Some(index) => worker::Worker::run(&args, index),
        None => coordinator::run(&args),
    };
    std::process::exit(code);
}
