//! The broadcast phase: --broadcasts `all:` messages, one at a time, each
//! from a random connection; the next starts when every worker has seen
//! the previous one reach all its connections (or after 10 s), so they
//! never overlap. Latency per recipient, and per broadcast the time until
//! the last recipient has it.

use super::{owner, Ctx, Summary};
use crate::proto::{pick, Command, Event};
use crate::report::{merged, new_hist, record, summary_json};
use crate::schedule::Rng;
use hdrhistogram::Histogram;
use serde_json::json;
use std::time::Duration;

/// Runs the phase; returns the per-broadcast last-recipient histogram (for
/// the ratios).
pub fn run(ctx: &mut Ctx, sum: &mut Summary) -> Histogram<u64> {
    let args = ctx.args;
    let procs = ctx.procs();
    let conns = ctx.conns as usize;
    println!(
        "\n== broadcast: {} broadcasts to every connection, one at a time",
        args.broadcasts
    );
    ctx.workers.phase_start();
    let mark = ctx.cpu_mark();
    let mut rng = Rng::new(args.seed ^ 0xB0AD);
    let mut last_hist = new_hist();
    let mut sent_ok = 0u64;
    let mut complete = 0u64;
    let workers = &mut ctx.workers;
    for b in 0..args.broadcasts {
        workers.send_all(&Command::BcastArm { b });
        workers.wait_for(
            procs,
            Duration::from_secs(10),
            None,
            pick!(Event::BcastArmed { b: x } if x == b => ()),
        );
        let sender = rng.below(conns as u64) as usize;
        workers.send(
            owner(conns, procs, sender),
            &Command::BcastSend {
                b,
                sender: sender as u32,
            },
        );
        let s = workers.wait_for(
            1,
            Duration::from_secs(10),
            None,
            pick!(Event::BcastSent { b: x, ok } if x == b => ok),
        );
        if s.first() != Some(&true) {
            eprintln!("  broadcast {b}: sender {sender} not ready, skipped");
            continue;
        }
        sent_ok += 1;
        let done = workers.wait_for(
            procs,
            Duration::from_secs(10),
            None,
            pick!(Event::BcastDone { b: x, max_latency_ns, .. } if x == b => max_latency_ns),
        );
        if done.len() == procs {
            complete += 1;
            record(&mut last_hist, done.iter().copied().max().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = mark.report(ctx);
    std::thread::sleep(Duration::from_millis(200));
    ctx.workers.send_all(&Command::BcastReport);
    let r = ctx.workers.wait_for(
        procs,
        Duration::from_secs(10),
        None,
        pick!(Event::BcastReport(r) => r),
    );
    let expected: u64 = r.iter().map(|w| w.expected).sum();
    let deliveries: u64 = r.iter().map(|w| w.deliveries).sum();
    let dup: u64 = r.iter().map(|w| w.duplicated).sum();
    let lost = expected.saturating_sub(deliveries);
    let hist = merged(r.iter().map(|w| &w.hist));
    println!("  {sent_ok} of {} sent, {complete} reached every connection; deliveries {deliveries} of {expected}, lost {lost}, duplicated {dup}",
        args.broadcasts);
    ctx.print_latency("broadcast per recipient", &hist);
    ctx.print_latency("broadcast last recipient", &last_hist);
    let ok = sent_ok == u64::from(args.broadcasts) && lost == 0 && dup == 0 && r.len() == procs;
    if !ok {
        sum.fail("broadcast: lost or duplicated deliveries".into());
    }
    sum.set(
        "broadcast",
        json!({
            "count": sent_ok, "requested": args.broadcasts, "complete": complete,
            "expected": expected, "deliveries": deliveries, "lost": lost, "duplicated": dup,
            "latency_us": summary_json(&hist), "last_recipient_us": summary_json(&last_hist),
            "cpu": cpu,
            "ok": ok,
        }),
    );
    last_hist
}
