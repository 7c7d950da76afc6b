//! Teardown: a close frame to every connection, then clean closes (the
//! server answered with its close frame), unclean ones and timeouts; and
//! the error counters the workers kept over the whole run.

use super::{Ctx, Summary};
use crate::proto::{pick, Command, ErrorCounts, Event};
use crate::report::{merged, summary_json};
use serde_json::json;
use std::time::Duration;

pub fn run(ctx: &mut Ctx, sum: &mut Summary) {
    let procs = ctx.procs();
    println!("\n== teardown: close all connections cleanly");
    ctx.workers.phase_start();
    ctx.workers.send_all(&Command::Teardown {
        timeout_ns: 10_000_000_000,
    });
    let done = ctx.workers.wait_for(
        procs,
        Duration::from_secs(30),
        None,
        pick!(Event::TeardownDone(r) => r),
    );
    let closing: u64 = done.iter().map(|r| r.closing).sum();
    let clean: u64 = done.iter().map(|r| r.clean).sum();
    let unclean: u64 = done.iter().map(|r| r.unclean).sum();
    let timed_out: u64 = done.iter().map(|r| r.timed_out).sum();
    let elapsed = done.iter().map(|r| r.elapsed_ns).max().unwrap_or(0);
    let close_hist = merged(done.iter().map(|r| &r.hist));
    println!("  {closing} closing: {clean} clean (server close frame), {unclean} without close frame, {timed_out} timed out, {:.2} s",
        elapsed as f64 / 1e9);
    ctx.print_latency("close frame round trip", &close_hist);
    if unclean + timed_out > 0 || done.len() < procs {
        sum.fail(format!(
            "teardown: {} connections did not close cleanly",
            unclean + timed_out
        ));
    }
    sum.set(
        "teardown",
        json!({"closing": closing, "clean": clean, "unclean": unclean, "timed_out": timed_out,
            "elapsed_ms": elapsed / 1_000_000, "latency_us": summary_json(&close_hist)}),
    );
}

/// The error counters summed over the workers (`errors` in the summary).
pub fn errors(ctx: &mut Ctx, sum: &mut Summary) {
    ctx.workers.send_all(&Command::Stats);
    let mut errors = ErrorCounts::default();
    for e in ctx.workers.wait_for(
        ctx.procs(),
        Duration::from_secs(10),
        None,
        pick!(Event::Stats(e) => e),
    ) {
        errors.add(&e);
    }
    let failing = errors.dropped + errors.protocol_errors + errors.unexpected > 0;
    let errors = serde_json::to_value(errors).expect("counts serialize");
    println!("\n== errors: {errors}");
    if failing {
        sum.fail("connections dropped or protocol errors".into());
    }
    sum.set("errors", errors);
}
