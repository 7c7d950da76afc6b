//! The coordinator: starts K worker processes (this same binary with the
//! hidden `--worker` flag), drives the phases in lock step over their
//! stdin/stdout pipes, merges counts and histograms, samples the server's
//! memory and CPU, and prints the report.
//!
//! `run` is the order of the phases; each phase is one file under
//! `coordinator/` (calibrate, connect, hold, targeted and churn, api,
//! broadcast, sweep, teardown), `setup.rs` is everything before them and
//! `workers.rs` the worker processes and their pipes. The churn soak
//! (`soak.rs`) is a mode of its own, with phases of its own.

mod api;
mod broadcast;
mod calibrate;
mod connect;
mod hold;
mod setup;
mod soak;
mod sweep;
mod targeted;
mod teardown;
mod workers;

pub use workers::{owner, split, Workers};

use crate::calibrate::Floor;
use crate::proc_stats;
use crate::report::{hgrm, new_hist, table_header, table_row};
use crate::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// Fds a worker keeps for itself besides connections (epoll, pipes, std).
pub const FD_RESERVE: u64 = 100;

/// What every phase works with.
pub struct Ctx<'a> {
    pub args: &'a Args,
    pub workers: Workers,
    /// Server processes to sample (RSS, CPU), sorted, no duplicates.
    pub server_pids: Vec<u32>,
    /// Connections requested.
    pub conns: u64,
    /// This process's open-file limit (calibration is capped by it).
    pub fd_soft_limit: u64,
}

impl Ctx<'_> {
    pub fn procs(&self) -> usize {
        self.workers.len()
    }

    /// Marks the start of a phase for its CPU figures.
    pub fn cpu_mark(&self) -> CpuMark {
        CpuMark::now(&self.server_pids, &self.workers)
    }

    /// Prints a latency table row plus, unless disabled, the .hgrm
    /// distribution.
    pub fn print_latency(&self, label: &str, h: &Histogram<u64>) {
        print!("{}{}", table_header(), table_row(label, h));
        if !self.args.no_hgrm && !h.is_empty() {
            println!("\n  {label} percentile distribution (microseconds):");
            print!("{}", hgrm(h, 1000.0));
        }
        println!();
    }

    /// Prints several latency rows in one table, then (unless disabled)
    /// each one's .hgrm distribution; empty histograms are left out.
    pub fn print_latencies(&self, rows: &[(&str, &Histogram<u64>)]) {
        let rows: Vec<_> = rows.iter().filter(|(_, h)| !h.is_empty()).collect();
        if rows.is_empty() {
            return;
        }
        print!("{}", table_header());
        for (label, h) in &rows {
            print!("{}", table_row(label, h));
        }
        if !self.args.no_hgrm {
            for (label, h) in &rows {
                println!("\n  {label} percentile distribution (microseconds):");
                print!("{}", hgrm(h, 1000.0));
            }
        }
        println!();
    }
}

/// The JSON summary as the phases fill it in, and what failed.
#[derive(Default)]
pub struct Summary {
    out: Map<String, Value>,
    problems: Vec<String>,
}

impl Summary {
    /// Sets the summary's `key` (one per phase).
    pub fn set(&mut self, key: &str, v: Value) {
        self.out.insert(key.into(), v);
    }

    /// Records a reason for the run to fail (exit code 1).
    pub fn fail(&mut self, problem: String) {
        self.problems.push(problem);
    }

    /// Prints the result (and the JSON line with --json); the exit code.
    fn finish(mut self, args: &Args) -> i32 {
        let ok = self.problems.is_empty();
        self.set("ok", json!(ok));
        self.set("problems", json!(self.problems));
        println!();
        if ok {
            println!("RESULT: ok");
        } else {
            println!("RESULT: FAILED: {}", self.problems.join("; "));
        }
        if args.json {
            println!("{}", Value::Object(self.out));
        }
        if ok {
            0
        } else {
            1
        }
    }
}

/// CPU time of the server and of the flood (coordinator + workers) at the
/// start of a phase, to say how many cores each used during it.
pub struct CpuMark {
    /// When the phase started.
    wall: Instant,
    /// Server CPU ns so far (None without --server-pid).
    server_ns: Option<u64>,
    /// Flood CPU ns so far, all its processes.
    flood_ns: Option<u64>,
}

/// Cores used over a stretch of time.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub wall_s: f64,
    /// Server cores (None without --server-pid).
    pub server: Option<f64>,
    pub flood: Option<f64>,
}

impl Cpu {
    pub fn json(&self) -> Value {
        json!({"wall_s": (self.wall_s * 1000.0).round() / 1000.0,
            "server_cores": self.server, "flood_cores": self.flood})
    }
}

impl CpuMark {
    fn now(server_pids: &[u32], workers: &Workers) -> CpuMark {
        let mut flood = workers.pids();
        flood.push(std::process::id());
        CpuMark {
            wall: Instant::now(),
            server_ns: proc_stats::total_cpu_ns(server_pids),
            flood_ns: proc_stats::total_cpu_ns(&flood),
        }
    }

    /// The cores used since the mark (to 0.01 core).
    pub fn measure(&self, ctx: &Ctx) -> Cpu {
        let end = ctx.cpu_mark();
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let cores = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => {
                Some(((b.saturating_sub(a)) as f64 / 1e9 / wall * 100.0).round() / 100.0)
            }
            _ => None,
        };
        Cpu {
            wall_s: wall,
            server: cores(self.server_ns, end.server_ns),
            flood: cores(self.flood_ns, end.flood_ns),
        }
    }

    /// Prints and returns (as JSON) the cores used since the mark.
    pub fn report(&self, ctx: &Ctx) -> Value {
        let cpu = self.measure(ctx);
        println!(
            "  cpu over {:.2} s: server {} cores, flood {} cores (of {} on this host)",
            cpu.wall_s,
            show_cores(cpu.server),
            show_cores(cpu.flood),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        cpu.json()
    }
}

/// A core count for the text report ("?" when unknown).
pub fn show_cores(c: Option<f64>) -> String {
    c.map_or("?".to_string(), |c| format!("{c:.2}"))
}

/// The earliest start and the latest end of (start, end) pairs the workers
/// reported (ns on the shared monotonic clock); the end is the start when
/// there is none.
pub(crate) fn span_ns(spans: impl Iterator<Item = (u64, u64)>) -> (u64, u64) {
    let (mut t0, mut last) = (u64::MAX, 0);
    for (a, b) in spans {
        t0 = t0.min(a);
        last = last.max(b);
    }
    if t0 == u64::MAX {
        return (0, 0);
    }
    (t0, last.max(t0))
}

fn ratio(a: f64, b: f64) -> Value {
    if a > 0.0 && b > 0.0 {
        json!(((a / b) * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Every figure that has a floor, as a ratio to it (printed and returned).
fn ratios(
    floor: &Floor,
    connect_per_sec: f64,
    targeted: &Histogram<u64>,
    bcast_last: &Histogram<u64>,
) -> Value {
    let mut ratios = Map::new();
    ratios.insert(
        "connect_rate_vs_floor".into(),
        ratio(connect_per_sec, floor.connect_per_sec),
    );
    if !bcast_last.is_empty() {
        ratios.insert(
            "broadcast_last_recipient_p50_vs_fanout".into(),
            ratio(
                bcast_last.value_at_quantile(0.5) as f64 / 1000.0,
                floor.fanout_us,
            ),
        );
        ratios.insert(
            "broadcast_last_recipient_max_vs_fanout".into(),
            ratio(bcast_last.max() as f64 / 1000.0, floor.fanout_us),
        );
    }
    if !targeted.is_empty() && !floor.oneway.is_empty() {
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            ratios.insert(
                format!("targeted_{name}_vs_oneway"),
                ratio(
                    targeted.value_at_quantile(q) as f64,
                    floor.oneway.value_at_quantile(q) as f64,
                ),
            );
        }
    }
    // The floor of a two-shard server (p99.9 is VM noise there).
    if !targeted.is_empty() && !floor.oneway2.is_empty() {
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            ratios.insert(
                format!("targeted_{name}_vs_oneway2"),
                ratio(
                    targeted.value_at_quantile(q) as f64,
                    floor.oneway2.value_at_quantile(q) as f64,
                ),
            );
        }
    }
    println!("\n== ratios to this host's bare-TCP floor (1.0 = as fast as the kernel allows here)");
    for (k, v) in &ratios {
        println!("  {k:<44} {v}");
    }
    Value::Object(ratios)
}

/// Runs the whole benchmark; returns the process exit code.
pub fn run(args: &Args) -> i32 {
    let mut ctx = match setup::start(args) {
        Ok(ctx) => ctx,
        Err(code) => return code,
    };
    let mut sum = Summary::default();

    if args.soak_conns.is_some() {
        soak::run(&mut ctx, &mut sum);
        ctx.workers.shutdown();
        return sum.finish(args);
    }

    let floor = if args.no_calibrate {
        None
    } else {
        calibrate::run(&mut ctx)
    };
    if args.calibrate_only {
        ctx.workers.shutdown();
        return calibrate::only(args, floor);
    }

    let connected = connect::run(&mut ctx, &mut sum);
    hold::run(&mut ctx, &mut sum, &connected);
    let live = connected.established > 0;

    let mut targeted_hist = new_hist();
    if args.msgs > 0 && live {
        targeted_hist = targeted::targeted(&mut ctx, &mut sum);
    }
    // After the WebSocket targeted phase, so the two compare.
    if args.push_via_api.is_some() && live {
        api::run(&mut ctx, &mut sum, &targeted_hist);
    }
    let mut bcast_last = new_hist();
    if args.broadcasts > 0 && live {
        bcast_last = broadcast::run(&mut ctx, &mut sum);
    }
    if args.churn > 0.0 && args.msgs > 0 && live {
        targeted::churn(&mut ctx, &mut sum);
    }
    // Last before teardown: its last step overloads on purpose.
    if args.sweep && live {
        sweep::run(&mut ctx, &mut sum);
    }

    teardown::run(&mut ctx, &mut sum);
    teardown::errors(&mut ctx, &mut sum);
    ctx.workers.shutdown();

    match floor {
        Some(floor) => {
            let r = ratios(&floor, connected.per_sec, &targeted_hist, &bcast_last);
            sum.set("ratios", r);
            sum.set("calibration", floor.json);
        }
        None => sum.set("calibration", Value::Null),
    }
    sum.finish(args)
}
