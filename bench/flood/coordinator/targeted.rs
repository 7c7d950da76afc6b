//! The targeted phase, and the churn phase (the same traffic while some
//! connections close and reconnect): --msgs messages at --msg-rate, random
//! sender and recipient from the seed's schedule; every worker checks what
//! its connections receive and the coordinator sums the counts.

use super::{Ctx, Summary};
use crate::ledger::Counts;
use crate::proto::{pick, Command, Event, Traffic, TrafficPlan, TrafficReport};
use crate::report::{merged, summary_json};
use crate::sys;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::time::Duration;

/// The workers' reports of one traffic run, summed.
pub(super) struct Totals {
    /// Reports received (one per worker when all answered).
    pub reports: usize,
    pub counts: Counts,
    pub sent: u64,
    pub send_skipped: u64,
    pub churned: u64,
    pub reconnected: u64,
    pub reconnect_failed: u64,
    pub hist: Histogram<u64>,
    pub reconnect_hist: Histogram<u64>,
    /// Sends given up (sweep) and whether a worker gave up for being late;
    /// the latest send and counted delivery over all workers (ns, 0: none),
    /// and the latest a send went out.
    pub abandoned: u64,
    pub fell_behind: bool,
    pub last_send_ns: u64,
    pub last_recv_ns: u64,
    pub max_send_lag_ns: u64,
}

impl Totals {
    pub fn of(r: &[Box<TrafficReport>]) -> Totals {
        let mut counts = Counts::default();
        for w in r {
            counts.add(&w.counts);
        }
        Totals {
            reports: r.len(),
            counts,
            sent: r.iter().map(|w| w.sent).sum(),
            send_skipped: r.iter().map(|w| w.send_skipped).sum(),
            churned: r.iter().map(|w| w.churned_conns).sum(),
            reconnected: r.iter().map(|w| w.reconnected).sum(),
            reconnect_failed: r.iter().map(|w| w.reconnect_failed).sum(),
            hist: merged(r.iter().map(|w| &w.hist)),
            reconnect_hist: merged(r.iter().map(|w| &w.reconnect_hist)),
            abandoned: r.iter().map(|w| w.abandoned).sum(),
            fell_behind: r.iter().any(|w| w.fell_behind),
            last_send_ns: r.iter().map(|w| w.last_send_ns).max().unwrap_or(0),
            last_recv_ns: r.iter().map(|w| w.last_recv_ns).max().unwrap_or(0),
            max_send_lag_ns: r.iter().map(|w| w.max_send_lag_ns).max().unwrap_or(0),
        }
    }
}

/// Ends the running traffic (after a moment for duplicates to show up)
/// and collects every worker's report.
pub(super) fn collect(ctx: &mut Ctx) -> Totals {
    std::thread::sleep(Duration::from_millis(200));
    ctx.workers.send_all(&Command::TargetedReport);
    let r = ctx.workers.wait_for(
        ctx.procs(),
        Duration::from_secs(10),
        None,
        pick!(Event::TargetedReport(r) => r),
    );
    Totals::of(&r)
}

/// The targeted phase; returns its latency histogram (for the ratios).
pub fn targeted(ctx: &mut Ctx, sum: &mut Summary) -> Histogram<u64> {
    let (v, ok, hist) = traffic(ctx, Traffic::Targeted, ctx.args.seed, 0.0);
    if !ok {
        sum.fail("targeted: lost/duplicated/misrouted/reordered messages".into());
    }
    sum.set("targeted", v);
    hist
}

/// The churn phase.
pub fn churn(ctx: &mut Ctx, sum: &mut Summary) {
    let (seed, churn) = (ctx.args.seed.wrapping_add(1), ctx.args.churn);
    let (v, ok, _) = traffic(ctx, Traffic::Churn, seed, churn);
    if !ok {
        sum.fail("churn: lost/duplicated/misrouted messages between steady connections, or reconnects failed".into());
    }
    sum.set("churn", v);
}

/// One run of targeted traffic (churn > 0: the churn phase). Returns its
/// JSON, whether it passed, and its latency histogram.
fn traffic(ctx: &mut Ctx, kind: Traffic, seed: u64, churn: f64) -> (Value, bool, Histogram<u64>) {
    let args = ctx.args;
    let procs = ctx.procs();
    let duration = f64::from(args.msgs) / args.msg_rate;
    if churn > 0.0 {
        println!("\n== churn: {} targeted messages at {} msg/s while {:.1}% of connections close, reconnect and log in again",
            args.msgs, args.msg_rate, churn * 100.0);
    } else {
        println!(
            "\n== targeted: {} messages at {} msg/s, random sender and recipient ({:.1} s)",
            args.msgs, args.msg_rate, duration
        );
    }
    ctx.workers.phase_start();
    let mark = ctx.cpu_mark();
    let start = sys::now_ns() + 100_000_000;
    ctx.workers.send_all(&Command::Targeted(TrafficPlan {
        kind,
        seed,
        msgs: args.msgs,
        rate: args.msg_rate,
        churn,
        start_ns: start,
        id_base: 0,
        give_up_lag_ns: None,
    }));
    let wait = Duration::from_secs_f64(duration + 0.1 + args.drain_secs);
    let done = ctx
        .workers
        .wait_for(procs, wait, None, pick!(Event::TargetedDone => ()));
    let all_done = done.len() == procs;
    let cpu = mark.report(ctx);
    let t = collect(ctx);
    let c = &t.counts;
    let (exp_s, exp_c) = (c.expected_steady, c.expected_churned);
    let (del_s, del_c) = (c.delivered_steady, c.delivered_churned);
    let (dup, mis, reord) = (c.duplicated, c.misrouted, c.reordered);
    let (sent, skipped, lost) = (t.sent, t.send_skipped, c.lost());
    let (churned, reconnected, reconnect_failed) = (t.churned, t.reconnected, t.reconnect_failed);
    let ok = all_done
        && t.reports == procs
        && lost == 0
        && dup == 0
        && mis == 0
        && reord == 0
        && reconnect_failed == 0
        && reconnected == churned;
    println!("  sent {sent} ({:.0} msg/s), delivered {}, lost {lost}, duplicated {dup}, misrouted {mis}, reordered {reord}",
        sent as f64 / duration.max(1e-9), c.delivered());
    if churn > 0.0 {
        println!("  {churned} connections churned: {reconnected} reconnected, {reconnect_failed} failed to");
        println!("  messages between steady connections: {exp_s} expected, {del_s} delivered, {lost} lost (must be 0)");
        println!("  messages to/from churned uids (may legitimately be lost while reconnecting): {exp_c} expected, {del_c} delivered, {} not delivered, {skipped} not sent (sender reconnecting)",
            c.churned_not_delivered());
    }
    ctx.print_latency(&format!("{} send->receive", kind.name()), &t.hist);
    if churn > 0.0 {
        ctx.print_latency("reconnect+upgrade+login", &t.reconnect_hist);
    }
    let v = json!({
        "sent": sent, "delivered": c.delivered(), "lost": lost, "duplicated": dup,
        "misrouted": mis, "reordered": reord, "expected": exp_s + exp_c,
        "rate": args.msg_rate, "msgs": args.msgs,
        "latency_us": summary_json(&t.hist),
        "cpu": cpu,
        "churned": {"conns": churned, "reconnected": reconnected, "reconnect_failed": reconnect_failed,
            "expected": exp_c, "delivered": del_c, "not_delivered": c.churned_not_delivered(),
            "not_sent": skipped, "reconnect_latency_us": summary_json(&t.reconnect_hist)},
        "ok": ok,
    });
    (v, ok, t.hist)
}
