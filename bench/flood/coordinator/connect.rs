//! The connect phase: every connection connects, upgrades and logs in
//! (paced by --connect-rate, at most --inflight attempts per worker);
//! latency per connection, connections per second, failures.

use super::{mib, span_ns, Ctx, Summary};
use crate::proc_stats;
use crate::proto::{pick, Command, Event};
use crate::report::{merged, summary_json};
use serde_json::json;
use std::time::Duration;

/// What later phases need from the connect phase.
pub struct Connected {
    pub established: u64,
    pub per_sec: f64,
    /// Server RSS and kernel TCP memory before the first connection.
    pub rss_before: Option<u64>,
    pub tcp_before: Option<u64>,
}

pub fn run(ctx: &mut Ctx, sum: &mut Summary) -> Connected {
    let args = ctx.args;
    let (conns, procs) = (ctx.conns, ctx.procs());
    let rss_before = proc_stats::total_rss(&ctx.server_pids);
    let tcp_before = proc_stats::tcp_mem_bytes();
    println!(
        "\n== connect: {conns} connections{}",
        if args.connect_rate > 0.0 {
            format!(" at {} /s", args.connect_rate)
        } else {
            " flat out".to_string()
        }
    );
    ctx.workers.phase_start();
    let mark = ctx.cpu_mark();
    ctx.workers.send_all(&Command::Connect {
        rate: args.connect_rate / procs as f64,
        inflight: args.inflight,
        timeout_ns: (args.connect_timeout * 1e9) as u64,
    });
    let wait = if args.connect_rate > 0.0 {
        conns as f64 / args.connect_rate
    } else {
        120.0
    } + args.connect_timeout
        + 30.0;
    let done = ctx.workers.wait_for(
        procs,
        Duration::from_secs_f64(wait),
        None,
        pick!(Event::ConnectDone(r) => r),
    );
    let established: u64 = done.iter().map(|r| r.established).sum();
    let failed = conns - established.min(conns);
    let (t0, last) = span_ns(done.iter().map(|r| (r.t0, r.last_ns)));
    let per_sec = if last > t0 {
        established as f64 / ((last - t0) as f64 / 1e9)
    } else {
        0.0
    };
    let connect_hist = merged(done.iter().map(|r| &r.hist));
    let flood_rss: u64 = done.iter().map(|r| r.rss_bytes.unwrap_or(0)).sum();
    println!(
        "  established {established} of {conns}, failed {failed}, {per_sec:.0} conn/s over {:.2} s",
        (last.saturating_sub(t0)) as f64 / 1e9
    );
    ctx.print_latency("connect+upgrade+login", &connect_hist);
    println!(
        "  flood worker memory: {} RSS for {established} connections ({:.0} bytes per connection, all included)",
        mib(flood_rss),
        flood_rss as f64 / established.max(1) as f64
    );
    if failed > 0 {
        sum.fail(format!("{failed} connections failed"));
    }
    sum.set(
        "connections",
        json!({"requested": conns, "established": established, "failed": failed,
            "per_sec": per_sec.round(), "procs": procs, "flood_rss_bytes": flood_rss}),
    );
    let cpu = mark.report(ctx);
    sum.set(
        "connect",
        json!({"latency_us": summary_json(&connect_hist), "cpu": cpu}),
    );
    Connected {
        established,
        per_sec,
        rss_before,
        tcp_before,
    }
}
