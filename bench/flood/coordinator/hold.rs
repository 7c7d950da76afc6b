//! The hold phase: every connection idle for --hold-secs while the
//! server's RSS is sampled (peak kept); then memory per connection, user
//! space (RSS) and kernel TCP buffers (/proc/net/sockstat).

use super::connect::Connected;
use super::{mib, Ctx, Summary};
use crate::proc_stats;
use serde_json::json;
use std::time::{Duration, Instant};

pub fn run(ctx: &mut Ctx, sum: &mut Summary, connected: &Connected) {
    let args = ctx.args;
    let established = connected.established;
    let (rss_before, tcp_before) = (connected.rss_before, connected.tcp_before);
    let mut rss_peak = rss_before.unwrap_or(0);
    let mark = ctx.cpu_mark();
    if args.hold_secs > 0.0 {
        println!(
            "\n== hold: {} s idle with {established} connections",
            args.hold_secs
        );
        let end = Instant::now() + Duration::from_secs_f64(args.hold_secs);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(250).min(end - Instant::now()));
            ctx.workers.drain_progress();
            if let Some(r) = proc_stats::total_rss(&ctx.server_pids) {
                rss_peak = rss_peak.max(r);
            }
        }
    }
    // An idle server should use no CPU at all.
    let idle_cpu = (args.hold_secs > 0.0).then(|| mark.report(ctx));
    sum.set("hold", json!({"secs": args.hold_secs, "cpu": idle_cpu}));
    let rss_after = proc_stats::total_rss(&ctx.server_pids);
    let tcp_after = proc_stats::tcp_mem_bytes();
    let per_conn = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if established > 0 => {
            Some((b.saturating_sub(a)) as f64 / established as f64)
        }
        _ => None,
    };
    let bytes_per_conn = per_conn(rss_before, rss_after);
    let tcp_per_conn = per_conn(tcp_before, tcp_after);
    match (rss_before, rss_after) {
        (Some(b), Some(a)) => println!(
            "  server RSS {} -> {} (peak {}): {:.0} bytes per connection (user space)",
            mib(b),
            mib(a),
            mib(rss_peak),
            bytes_per_conn.unwrap_or(0.0)
        ),
        _ => println!("  server RSS: not measured (give --server-pid PID)"),
    }
    if let (Some(b), Some(a)) = (tcp_before, tcp_after) {
        println!(
            "  kernel TCP memory (sockstat, both ends, whole host) {} -> {}: {:.0} bytes per connection",
            mib(b), mib(a), tcp_per_conn.unwrap_or(0.0)
        );
    }
    sum.set(
        "server",
        json!({"pids": ctx.server_pids, "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
            "rss_peak_bytes": rss_peak, "bytes_per_conn": bytes_per_conn.map(f64::round),
            "kernel_tcp_mem_before_bytes": tcp_before, "kernel_tcp_mem_after_bytes": tcp_after,
            "kernel_tcp_bytes_per_conn": tcp_per_conn.map(f64::round)}),
    );
}
