//! The calibrate phase: this host's bare-TCP floor at the same scale
//! (measured by `crate::calibrate`), printed before the server is touched.

use super::Ctx;
use crate::calibrate::{self, CalibPlan, Floor};
use crate::Args;
use serde_json::{json, Map, Value};

/// Measures and prints the floor; None when it could not be measured.
pub fn run(ctx: &mut Ctx) -> Option<Floor> {
    let args = ctx.args;
    let conns = ctx.conns;
    let soft = ctx.fd_soft_limit;
    let cap = (soft.saturating_sub(64 + 4 * ctx.procs() as u64)) as usize;
    let n = (conns as usize).min(cap);
    let plan = CalibPlan {
        n,
        capped: n < conns as usize,
        rounds: args.calib_rounds.max(1),
        rate: args.msg_rate,
        count: u64::from(args.msgs).min((args.msg_rate * 5.0) as u64),
        inflight: args.inflight,
        relay2: !args.calib_no_relay2,
    };
    println!(
        "\n== calibrate: bare TCP floor on this host ({n} sockets{})",
        if plan.capped {
            format!(", capped from {conns} by one process's fd limit {soft}")
        } else {
            String::new()
        }
    );
    ctx.workers.phase_start();
    match calibrate::run(&mut ctx.workers, &plan) {
        Ok(floor) => {
            let c = &floor.json;
            println!(
                "  connect+exchange: {} /s   fanout (send loop to all, until last receiver): {} us (send loop alone {} us; rounds {})",
                c["connect_per_sec"], c["fanout_us"], c["fanout_send_loop_us"], c["fanout_rounds_us"]
            );
            println!(
                "  one-way via bare relay at {} msg/s: {} sent, {} received; relay CPU {} us/msg",
                args.msg_rate,
                c["oneway_sent"],
                c["oneway_received"],
                c["oneway_relay_cpu_us_per_msg"]
            );
            if !c["oneway2_latency_us"].is_null() {
                println!(
                    "  one-way via bare relay, {} threads (epoll, hand-off queue, eventfd ring to a sleeper): {} sent, {} received, {} crossed threads ({}, hand-off p50 {} / p99 {} us, on the reader's CPU {}), {} wake-ups; relay CPU {} us/msg",
                    c["oneway2_threads"],
                    c["oneway2_sent"],
                    c["oneway2_received"],
                    c["oneway2_crossed"],
                    c["oneway2_crossed_fraction"],
                    c["oneway2_hop_us"]["p50"],
                    c["oneway2_hop_us"]["p99"],
                    c["oneway2_hop_same_cpu_fraction"],
                    c["oneway2_wakeups"],
                    c["oneway2_relay_cpu_us_per_msg"]
                );
            }
            ctx.print_latencies(&[
                ("bare one-way", &floor.oneway),
                ("bare one-way, 2 threads", &floor.oneway2),
            ]);
            Some(floor)
        }
        Err(e) => {
            eprintln!("calibration failed: {e}");
            None
        }
    }
}

/// The end of a `--calibrate-only` run: the summary has only the floor.
pub fn only(args: &Args, floor: Option<Floor>) -> i32 {
    let ok = floor.is_some();
    let mut out = Map::new();
    out.insert("calibration".into(), floor.map_or(Value::Null, |f| f.json));
    out.insert("ok".into(), json!(ok));
    if args.json {
        println!("{}", Value::Object(out));
    }
    if ok {
        0
    } else {
        1
    }
}
