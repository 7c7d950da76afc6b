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
//! * oneway2_latency_us: the same records, same clients, same rate and
//!   count, through a two-thread bare relay (`calibrate/relay2.rs`): each
//!   thread owns half the sockets and hands a record whose recipient is the
//!   other's over a lock-free queue, ringing the other only when it sleeps.
//!   The floor of a two-shard server, which pays that hand-off and wake-up
//!   for every message that crosses shards (`--calib-no-relay2` skips it).
//!
//! The sink (listener, echo, relay, fanout sender; `calibrate/sink.rs`)
//! and the two-thread relay run in the coordinator process; the clients
//! (`calibrate/clients.rs`) run in the workers; `run` here drives the
//! measurements.

mod clients;
mod relay2;
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
    /// Whether to measure the two-thread relay too.
    pub relay2: bool,
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
    /// One-way latency through the two-thread bare relay (ns); empty when
    /// it was skipped.
    pub oneway2: Histogram<u64>,
}

/// What one one-way round measured.
struct Oneway {
    sent: u64,
    received: u64,
    hist: Histogram<u64>,
}

/// Runs one one-way round: the workers send `plan.count` records tagged
/// `round` at `plan.rate` while `pump` keeps the relay going (it waits
/// about 5 ms and returns the records relayed so far); then collects what
/// the workers measured.
fn oneway_round(
    workers: &mut Workers,
    plan: &CalibPlan,
    round: u32,
    mut pump: impl FnMut() -> u64,
) -> Oneway {
    let k = workers.len();
    let start = sys::now_ns() + 50_000_000;
    for w in 0..k {
        let (lo, hi) = split(plan.count as usize, k, w);
        workers.send(
            w,
            &Command::CalibOneway {
                start_ns: start,
                rate: plan.rate / k as f64,
                count: (hi - lo) as u64,
                round,
            },
        );
    }
    let duration = Duration::from_secs_f64(plan.count as f64 / plan.rate + 3.0);
    let deadline = std::time::Instant::now() + duration;
    while pump() < plan.count && std::time::Instant::now() < deadline {
        workers.drain_progress();
    }
    // Let the last relayed records arrive.
    for _ in 0..20 {
        pump();
    }
    workers.send_all(&Command::CalibReport);
    let mut out = Oneway {
        sent: 0,
        received: 0,
        hist: new_hist(),
    };
    for (s, r, h) in workers.wait_for(
        k,
        Duration::from_secs(10),
        None,
        pick!(Event::CalibReport { sent, received, hist } => (sent, received, hist)),
    ) {
        merge_counts(&mut out.hist, &h);
        out.sent += s;
        out.received += r;
    }
    out
}

/// `part / whole` to 0.001, or null.
fn fraction(part: u64, whole: u64) -> Value {
    if whole == 0 {
        return Value::Null;
    }
    json!((part as f64 / whole as f64 * 1000.0).round() / 1000.0)
}

/// µs of relay CPU per record relayed (to 0.1 µs), or null.
fn cpu_per_msg(cpu_ns: u64, relayed: u64) -> Value {
    if relayed == 0 {
        return Value::Null;
    }
    json!((cpu_ns as f64 / relayed as f64 / 100.0).round() / 10.0)
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

    // (c) one-way latency through a bare relay (this thread).
    let mut one = Oneway {
        sent: 0,
        received: 0,
        hist: new_hist(),
    };
    let mut one_cpu = Value::Null;
    if plan.count > 0 {
        let cpu0 = sys::thread_cpu_ns();
        let relayed0 = sink.relayed;
        one = oneway_round(workers, plan, 0, || {
            sink.poll(5);
            sink.relayed - relayed0
        });
        one_cpu = cpu_per_msg(
            sys::thread_cpu_ns().saturating_sub(cpu0),
            sink.relayed - relayed0,
        );
    }

    // (c2) the same through the two-thread relay; this thread only waits.
    let mut two = Oneway {
        sent: 0,
        received: 0,
        hist: new_hist(),
    };
    let mut two_stats = None;
    if plan.count > 0 && plan.relay2 {
        match relay2::Relay2::start(sink.relay_socks()) {
            Ok(relay) => {
                two = oneway_round(workers, plan, 1, || {
                    std::thread::sleep(Duration::from_millis(5));
                    relay.relayed()
                });
                match relay.stop() {
                    Ok(s) => two_stats = Some(s),
                    Err(e) => eprintln!("calibrate: two-thread relay: {e}"),
                }
            }
            Err(e) => eprintln!("calibrate: two-thread relay did not start: {e}"),
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
    let measured2 = two_stats.is_some();
    let s2 = two_stats.unwrap_or_default();
    let if2 = |v: Value| if measured2 { v } else { Value::Null };
    let crossed_fraction = fraction(s2.crossed, s2.relayed);
    let mut json = json!({
            "conns": accepted,
            "requested": plan.n,
            "capped": plan.capped,
            "connect_ok": ok,
            "connect_failed": failed,
            "connect_per_sec": connect_per_sec.round(),
            "fanout_us": fanout_us.round(),
            "fanout_rounds_us": fanout_rounds.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "fanout_send_loop_us": send_loop_us.round(),
            "oneway_sent": one.sent,
            "oneway_received": one.received,
            "oneway_rate": plan.rate,
            "oneway_latency_us": summary_json(&one.hist),
            "short_writes": short_writes,
    });
    let extra = json!({
            "oneway_relay_cpu_us_per_msg": one_cpu,
            "oneway2_threads": if2(json!(relay2::THREADS)),
            "oneway2_sent": if2(json!(two.sent)),
            "oneway2_received": if2(json!(two.received)),
            "oneway2_relayed": if2(json!(s2.relayed)),
            "oneway2_crossed": if2(json!(s2.crossed)),
            "oneway2_crossed_fraction": if2(crossed_fraction),
            "oneway2_wakeups": if2(json!(s2.wakeups)),
            "oneway2_short_writes": if2(json!(s2.short_writes)),
            "oneway2_relay_cpu_us_per_msg": if2(cpu_per_msg(s2.cpu_ns, s2.relayed)),
            "oneway2_latency_us": if2(summary_json(&two.hist)),
            "oneway2_hop_us": if2(summary_json(&s2.hop)),
            "oneway2_hop_same_cpu_fraction": if2(fraction(s2.hop_same_cpu, s2.crossed)),
    });
    if let (Value::Object(j), Value::Object(e)) = (&mut json, extra) {
        j.extend(e);
    }
    Ok(Floor {
        json,
        connect_per_sec: connect_per_sec.round(),
        fanout_us: fanout_us.round(),
        oneway: one.hist,
        oneway2: two.hist,
    })
}
