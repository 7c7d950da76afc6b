//! The host's floor, measured with bare TCP and no WebSocket at the same
//! scale as the server run, so every server figure can be read as a ratio to
//! what the kernel allows on this machine:
//!
//! * connect_per_sec: TCP connect plus a 16-byte exchange (hello, echo).
//! * fanout_us: one process writes one 40-byte record to each of N
//!   sockets in a plain loop; time until the last receiver has it.
//! * oneway_latency_us: 40-byte records sent at the targeted phase's rate
//!   from a client through a bare relay (which forwards each record to a
//!   random other socket) to a client: the same two hops a pushed message
//!   takes, minus the server's work.
//!
//! The sink (listener, echo, relay, fanout sender; `calibrate/sink.rs`)
//! runs in the coordinator process; the clients (`calibrate/clients.rs`)
//! run in the workers; `run` here drives the three measurements.

mod clients;
mod sink;

pub use clients::Clients;

use crate::coordinator::{span_ns, split, Workers};
use crate::proto::{pick, Command, Event};
use crate::report::{merge_counts, new_hist, summary_json};
use crate::sys;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sink::Sink;
use std::io;
use std::time::Duration;

/// Size of a sink-to-client or client-to-client record.
pub(crate) const RECORD: usize = 40;
/// Size of the hello a client sends and the sink echoes.
pub(crate) const HELLO: usize = 16;

/// Settings of a calibration run.
pub struct CalibPlan {
    /// Sockets (capped by one process's fd limit).
    pub n: usize,
    /// Whether `n` is below the requested connection count.
    pub capped: bool,
    /// Fanout rounds; the median is the floor.
    pub rounds: u32,
    /// One-way test: total rate and count (same rate as the targeted phase).
    pub rate: f64,
    pub count: u64,
    pub inflight: usize,
}

/// The floor, as the ratios use it and as the summary prints it.
pub struct Floor {
    /// The summary's `calibration` object.
    pub json: Value,
    /// Bare connects per second (rounded, as printed).
    pub connect_per_sec: f64,
    /// Bare fanout: first write to last receiver, µs (rounded, as printed).
    pub fanout_us: f64,
    /// One-way latency through the bare relay (ns).
    pub oneway: Histogram<u64>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the three floor measurements.
pub fn run(workers: &mut Workers, plan: &CalibPlan) -> io::Result<Floor> {
    let mut sink = Sink::new()?;
    let k = workers.len();
    // (a') connect + small exchange.
    for w in 0..k {
        let (lo, hi) = split(plan.n, k, w);
        workers.send(
            w,
            &Command::CalibConnect {
                addr: sink.addr,
                n: hi - lo,
                inflight: plan.inflight,
            },
        );
    }
    let done = workers.wait_for(
        k,
        Duration::from_secs(120),
        Some(&mut || sink.poll(2)),
        pick!(Event::CalibConnectDone { ok, failed, t0, last_ns } => (ok, failed, t0, last_ns)),
    );
    let ok: u64 = done.iter().map(|d| d.0).sum();
    let failed: u64 = done.iter().map(|d| d.1).sum();
    let (t0, last) = span_ns(done.iter().map(|d| (d.2, d.3)));
    let connect_per_sec = if last > t0 {
        ok as f64 / ((last - t0) as f64 / 1e9)
    } else {
        0.0
    };
    // Let the last accepts land.
    for _ in 0..50 {
        if sink.accepted() as u64 >= ok {
            break;
        }
        sink.poll(10);
    }
    eprintln!("calibrate: {ok} bare TCP connections ({failed} failed) at {connect_per_sec:.0}/s");

    // (a) fanout floor.
    let mut fanout = Vec::new();
    let mut send_loop = Vec::new();
    for round in 0..plan.rounds {
        workers.send_all(&Command::CalibFanout { round });
        workers.wait_for(
            k,
            Duration::from_secs(10),
            None,
            pick!(Event::CalibArmed => ()),
        );
        let (start, end) = sink.fanout(round);
        let done = workers.wait_for(
            k,
            Duration::from_secs(20),
            None,
            pick!(Event::CalibFanoutDone { round: r, last_ns, .. } if r == round => last_ns),
        );
        let last = done.iter().copied().max().unwrap_or(end);
        if done.len() == k {
            fanout.push(last.saturating_sub(start) as f64 / 1000.0);
        }
        send_loop.push(end.saturating_sub(start) as f64 / 1000.0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let fanout_rounds = fanout.clone();
    let fanout_us = median(&mut fanout);
    let send_loop_us = median(&mut send_loop);
    eprintln!(
        "calibrate: bare fanout to {} sockets: {fanout_us:.0} us (send loop {send_loop_us:.0} us)",
        sink.accepted()
    );

    // (c) one-way latency through a bare relay.
    let mut hist = new_hist();
    let mut sent = 0;
    let mut received = 0;
    if plan.count > 0 {
        let start = sys::now_ns() + 50_000_000;
        for w in 0..k {
            let (lo, hi) = split(plan.count as usize, k, w);
            workers.send(
                w,
                &Command::CalibOneway {
                    start_ns: start,
                    rate: plan.rate / k as f64,
                    count: (hi - lo) as u64,
                },
            );
        }
        let duration = Duration::from_secs_f64(plan.count as f64 / plan.rate + 3.0);
        let deadline = std::time::Instant::now() + duration;
        while sink.relayed < plan.count && std::time::Instant::now() < deadline {
            sink.poll(5);
            workers.drain_progress();
        }
        // Let the last relayed records arrive.
        for _ in 0..20 {
            sink.poll(5);
        }
        workers.send_all(&Command::CalibReport);
        for (s, r, h) in workers.wait_for(
            k,
            Duration::from_secs(10),
            None,
            pick!(Event::CalibReport { sent, received, hist } => (sent, received, hist)),
        ) {
            merge_counts(&mut hist, &h);
            sent += s;
            received += r;
        }
    }
    workers.send_all(&Command::CalibClose);
    workers.wait_for(
        k,
        Duration::from_secs(10),
        None,
        pick!(Event::CalibClosed => ()),
    );
    let short_writes = sink.short_writes;
    let accepted = sink.accepted();
    drop(sink);
    Ok(Floor {
        json: json!({
            "conns": accepted,
            "requested": plan.n,
            "capped": plan.capped,
            "connect_ok": ok,
            "connect_failed": failed,
            "connect_per_sec": connect_per_sec.round(),
            "fanout_us": fanout_us.round(),
            "fanout_rounds_us": fanout_rounds.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "fanout_send_loop_us": send_loop_us.round(),
            "oneway_sent": sent,
            "oneway_received": received,
            "oneway_rate": plan.rate,
            "oneway_latency_us": summary_json(&hist),
            "short_writes": short_writes,
        }),
        connect_per_sec: connect_per_sec.round(),
        fanout_us: fanout_us.round(),
        oneway: hist,
    })
}
