//! `--push-via-api ADDR`: targeted messages pushed through the server's
//! HTTP API instead of through WebSockets, after the WebSocket targeted
//! phase of the same run, so the two compare.
//!
//! The coordinator sends the requests, from `--api-conns` threads, one
//! blocking keep-alive HTTP connection each (`http.rs`), one request in
//! flight per connection; the workers only receive, and check what arrives
//! with the same `Ledger` as the targeted phase (`Traffic::Api`). The
//! schedule is the targeted phase's (same seed): schedule sender s is
//! pushed on connection s % conns, in schedule order, so every (sender,
//! recipient) pair's messages go through one connection one after the
//! other, and the API keeps the order of the pushes to one uid that it
//! makes one after the other (docs/protocol.md): per-pair order is
//! meaningful and is checked. The payload is the targeted phase's
//! `t<id> s<sender> <ts>`, `ts` taken just before the request is written,
//! so the latency is API to client.
//!
//! Two sub-phases, single (`POST /push/{uid}`) then batch (`POST /push`,
//! `--api-batch` items a request), each in two steps: paced (the targeted
//! phase's schedule, `--msgs` at `--api-rate`, by default its `--msg-rate`:
//! latency comparable with the WebSocket phase's) and flat out (`--api-msgs`,
//! every connection writing its next request as soon as the previous answer
//! is in: requests and pushes per second).

use super::targeted::{self, Totals};
use super::{Ctx, Summary};
use crate::http::{path_segment, HttpConn};
use crate::proto::{pick, Command, Event, Traffic, TrafficPlan};
use crate::report::{hgrm, new_hist, record, summary_json, table_header, table_row};
use crate::schedule::Schedule;
use crate::sys;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Timeout of one HTTP request (connect, write, answer).
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// How the requests of one step are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPlan {
    /// Messages a request carries: 1 = `POST /push/{uid}`, more = `POST
    /// /push` batches of up to this many.
    pub per_request: usize,
    /// Pushes per second, all connections together; None = flat out.
    pub rate: Option<f64>,
    /// Messages of the step.
    pub msgs: u32,
}

impl StepPlan {
    fn is_batch(&self) -> bool {
        self.per_request > 1
    }

    fn label(&self) -> String {
        let what = if self.is_batch() {
            format!("batch of {}", self.per_request)
        } else {
            "single".to_string()
        };
        match self.rate {
            Some(r) => format!("api {what}, paced at {r} pushes/s"),
            None => format!("api {what}, flat out"),
        }
    }
}

/// One request of one connection: when it is due (offset from the step's
/// start) and the schedule's messages it carries, in schedule order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub due_ns: u64,
    pub msgs: Vec<u32>,
}

/// The requests of connection `c` of `conns`: the messages whose sender is
/// `c` modulo `conns`, in schedule order, `per_request` at a time. Paced,
/// a request is due when its last message is (a backend sends a batch
/// once it has it); flat out, all are due at once.
pub fn requests_for(
    sched: &Schedule,
    conns: usize,
    c: usize,
    per_request: usize,
    paced: bool,
) -> Vec<Request> {
    let mine: Vec<u32> = (0..sched.len() as u32)
        .filter(|&j| sched.sender[j as usize] as usize % conns == c)
        .collect();
    mine.chunks(per_request.max(1))
        .map(|chunk| Request {
            due_ns: if paced {
                sched.send_offset_ns(*chunk.last().expect("chunks are not empty"))
            } else {
                0
            },
            msgs: chunk.to_vec(),
        })
        .collect()
}

/// What one connection's thread did.
struct ConnResult {
    requests: u64,
    /// Messages in requests answered 200.
    pushes: u64,
    /// The sum of the API's `delivered` counts, and messages whose count
    /// was not 1 (every uid has exactly one connection).
    api_delivered: u64,
    api_not_one: u64,
    /// Answers other than 200, and requests with no answer (I/O error).
    http_errors: u64,
    io_errors: u64,
    first_error: Option<String>,
    /// First request written, last answer read (monotonic ns; 0: none).
    first_send_ns: u64,
    last_answer_ns: u64,
    /// The latest a request went out after it was due.
    max_lag_ns: u64,
    /// Request written to answer read.
    rtt: Histogram<u64>,
}

/// What the threads share.
struct Shared {
    addr: String,
    token: Option<String>,
    /// `--uid-prefix`, percent-encoded for a path and escaped for JSON.
    path_prefix: String,
    json_prefix: String,
    id_base: u64,
    sched: Schedule,
}

/// Builds the request body (and path) for `req` stamped `ts`.
fn body_for(sh: &Shared, req: &Request, batch: bool, ts: u64, body: &mut Vec<u8>) -> String {
    use std::io::Write;
    body.clear();
    let item = |j: u32| {
        let (s, r) = (sh.sched.sender[j as usize], sh.sched.recipient[j as usize]);
        (sh.id_base + u64::from(j), s, r)
    };
    if !batch {
        let (id, s, r) = item(req.msgs[0]);
        let _ = write!(body, "t{id} s{s} {ts}");
        return format!("/push/{}{r}", sh.path_prefix);
    }
    body.push(b'[');
    for (i, &j) in req.msgs.iter().enumerate() {
        let (id, s, r) = item(j);
        if i > 0 {
            body.push(b',');
        }
        let _ = write!(
            body,
            "{{\"uid\":\"{}{r}\",\"message\":\"t{id} s{s} {ts}\"}}",
            sh.json_prefix
        );
    }
    body.push(b']');
    "/push".to_string()
}

/// The `delivered` counts of an answer: one number, or an array of them.
fn delivered_counts(body: &[u8]) -> Option<Vec<u64>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    match &v["delivered"] {
        Value::Number(n) => Some(vec![n.as_u64()?]),
        Value::Array(a) => a.iter().map(Value::as_u64).collect(),
        _ => None,
    }
}

/// One connection's thread: its requests in order, each when due.
fn run_conn(sh: &Shared, reqs: &[Request], batch: bool, t0: u64) -> ConnResult {
    let mut out = ConnResult {
        requests: 0,
        pushes: 0,
        api_delivered: 0,
        api_not_one: 0,
        http_errors: 0,
        io_errors: 0,
        first_error: None,
        first_send_ns: 0,
        last_answer_ns: 0,
        max_lag_ns: 0,
        rtt: new_hist(),
    };
    let mut conn = match HttpConn::new(&sh.addr, sh.token.as_deref(), HTTP_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            out.io_errors = reqs.len() as u64;
            out.first_error = Some(format!("{}: {e}", sh.addr));
            return out;
        }
    };
    // Connected before the clock starts (a reconnect later is timed).
    let _ = conn.connect();
    let content_type = if batch {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut body = Vec::with_capacity(if batch { 64 * reqs[0].msgs.len() } else { 64 });
    for req in reqs {
        let due = t0 + req.due_ns;
        let now = sys::now_ns();
        if now < due {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        let ts = sys::now_ns();
        out.max_lag_ns = out.max_lag_ns.max(ts.saturating_sub(due));
        let path = body_for(sh, req, batch, ts, &mut body);
        if out.first_send_ns == 0 {
            out.first_send_ns = ts;
        }
        out.requests += 1;
        let result = conn.post(&path, content_type, &body);
        let now = sys::now_ns();
        match result {
            Ok(r) if r.status == 200 => {
                out.last_answer_ns = now;
                record(&mut out.rtt, now - ts);
                out.pushes += req.msgs.len() as u64;
                match delivered_counts(&r.body) {
                    Some(counts) if counts.len() == req.msgs.len() => {
                        out.api_delivered += counts.iter().sum::<u64>();
                        out.api_not_one += counts.iter().filter(|&&n| n != 1).count() as u64;
                    }
                    _ => {
                        out.api_not_one += req.msgs.len() as u64;
                        if out.first_error.is_none() {
                            out.first_error = Some(format!(
                                "unexpected answer {:?}",
                                String::from_utf8_lossy(&r.body)
                            ));
                        }
                    }
                }
            }
            Ok(r) => {
                out.last_answer_ns = now;
                out.http_errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!(
                        "HTTP {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                    ));
                }
            }
            Err(e) => {
                out.io_errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{path}: {e}"));
                }
            }
        }
    }
    out
}

/// One step as measured.
struct Step {
    plan: StepPlan,
    conns: usize,
    totals: Totals,
    requests: u64,
    pushes: u64,
    api_delivered: u64,
    api_not_one: u64,
    http_errors: u64,
    io_errors: u64,
    /// First request written to last answer read (s).
    secs: f64,
    /// First request written to last message received (s).
    delivery_secs: f64,
    max_lag_ns: u64,
    rtt: Histogram<u64>,
    cpu: Value,
    all_done: bool,
    procs: usize,
}

impl Step {
    fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.secs.max(1e-9)
    }

    fn pushes_per_sec(&self) -> f64 {
        self.pushes as f64 / self.secs.max(1e-9)
    }

    fn ok(&self) -> bool {
        let c = &self.totals.counts;
        self.all_done
            && self.totals.reports == self.procs
            && c.lost() == 0
            && c.duplicated == 0
            && c.misrouted == 0
            && c.reordered == 0
            && self.http_errors == 0
            && self.io_errors == 0
            && self.api_not_one == 0
    }

    fn json(&self) -> Value {
        let c = &self.totals.counts;
        json!({
            "mode": if self.plan.rate.is_some() { "paced" } else { "flat_out" },
            "rate": self.plan.rate,
            "items_per_request": self.plan.per_request,
            "connections": self.conns,
            "requests": self.requests,
            "pushes": self.pushes,
            "requests_per_sec": self.requests_per_sec().round(),
            "pushes_per_sec": self.pushes_per_sec().round(),
            "duration_s": (self.secs * 1000.0).round() / 1000.0,
            "delivered": c.delivered(),
            "delivered_per_sec": (c.delivered() as f64 / self.delivery_secs.max(1e-9)).round(),
            "api_delivered": self.api_delivered,
            "api_not_one": self.api_not_one,
            "http_errors": self.http_errors,
            "io_errors": self.io_errors,
            "expected": c.expected_steady + c.expected_churned,
            "lost": c.lost(),
            "duplicated": c.duplicated,
            "misrouted": c.misrouted,
            "reordered": c.reordered,
            "latency_us": summary_json(&self.totals.hist),
            "request_us": summary_json(&self.rtt),
            "send_lag_max_ms": self.plan.rate.map(|_| (self.max_lag_ns as f64 / 1e5).round() / 10.0),
            "cpu": self.cpu,
            "ok": self.ok(),
        })
    }
}

/// Runs one step: arms the workers, pushes from the threads, waits for
/// the deliveries, collects the workers' reports.
fn step(ctx: &mut Ctx, plan: StepPlan, index: u64) -> Step {
    let args = ctx.args;
    let procs = ctx.procs();
    let conns = args.api_conns.max(1) as usize;
    let msgs = plan.msgs;
    let rate = plan.rate.unwrap_or(args.msg_rate);
    let addr = args.push_via_api.clone().expect("--push-via-api");
    let prefix = &args.uid_prefix;
    let json_prefix = serde_json::to_string(prefix).expect("strings serialize");
    let sh = Arc::new(Shared {
        addr,
        token: args.api_token.clone(),
        path_prefix: path_segment(prefix),
        json_prefix: json_prefix[1..json_prefix.len() - 1].to_string(),
        id_base: (0x100 + index) << 32,
        sched: Schedule::new(args.seed, ctx.conns as u32, msgs, rate, 0.0),
    });
    println!("\n-- {}", plan.label());
    ctx.workers.phase_start();
    ctx.workers.send_all(&Command::Targeted(TrafficPlan {
        kind: Traffic::Api,
        seed: args.seed,
        msgs,
        rate,
        churn: 0.0,
        start_ns: sys::now_ns(),
        id_base: sh.id_base,
        give_up_lag_ns: None,
    }));
    let armed = ctx.workers.wait_for(
        procs,
        Duration::from_secs(30),
        None,
        pick!(Event::TargetedArmed => ()),
    );
    if armed.len() < procs {
        eprintln!("  not every worker is ready for the API run");
    }
    let mark = ctx.cpu_mark();
    let t0 = sys::now_ns() + 10_000_000;
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let reqs = requests_for(&sh.sched, conns, c, plan.per_request, plan.rate.is_some());
            let sh = sh.clone();
            let batch = plan.is_batch();
            std::thread::spawn(move || {
                if reqs.is_empty() {
                    None
                } else {
                    Some(run_conn(&sh, &reqs, batch, t0))
                }
            })
        })
        .collect();
    // Progress while the threads push.
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        ctx.workers.drain_progress();
    }
    let results: Vec<ConnResult> = handles
        .into_iter()
        .filter_map(|h| h.join().ok().flatten())
        .collect();
    // Then the deliveries: every worker says when all its messages are in.
    let done = ctx.workers.wait_for(
        procs,
        Duration::from_secs_f64(args.drain_secs),
        None,
        pick!(Event::TargetedDone => ()),
    );
    let cpu = mark.report(ctx);
    let totals = targeted::collect(ctx);
    let first = results
        .iter()
        .map(|r| r.first_send_ns)
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(0);
    let last = results.iter().map(|r| r.last_answer_ns).max().unwrap_or(0);
    let mut rtt = new_hist();
    for r in &results {
        let _ = rtt.add(&r.rtt);
    }
    for e in results
        .iter()
        .filter_map(|r| r.first_error.as_ref())
        .take(3)
    {
        eprintln!("  api error: {e}");
    }
    let sum = |f: fn(&ConnResult) -> u64| results.iter().map(f).sum::<u64>();
    Step {
        plan,
        conns,
        requests: sum(|r| r.requests),
        pushes: sum(|r| r.pushes),
        api_delivered: sum(|r| r.api_delivered),
        api_not_one: sum(|r| r.api_not_one),
        http_errors: sum(|r| r.http_errors),
        io_errors: sum(|r| r.io_errors),
        secs: last.saturating_sub(first) as f64 / 1e9,
        delivery_secs: totals.last_recv_ns.saturating_sub(first) as f64 / 1e9,
        max_lag_ns: results.iter().map(|r| r.max_lag_ns).max().unwrap_or(0),
        rtt,
        totals,
        cpu,
        all_done: done.len() == procs,
        procs,
    }
}

/// Prints a step's figures.
fn print_step(ctx: &Ctx, s: &Step) {
    let c = &s.totals.counts;
    println!(
        "  {} requests ({:.0}/s), {} pushes ({:.0}/s) over {:.2} s; the API counted {} delivered, {} answers not 1",
        s.requests,
        s.requests_per_sec(),
        s.pushes,
        s.pushes_per_sec(),
        s.secs,
        s.api_delivered,
        s.api_not_one
    );
    let lag = match s.plan.rate {
        Some(_) => format!(
            "; latest send {:.1} ms after due",
            s.max_lag_ns as f64 / 1e6
        ),
        None => String::new(),
    };
    println!(
        "  delivered {} ({:.0}/s), lost {}, duplicated {}, misrouted {}, reordered {}; HTTP errors {}, no answer {}{lag}",
        c.delivered(),
        c.delivered() as f64 / s.delivery_secs.max(1e-9),
        c.lost(),
        c.duplicated,
        c.misrouted,
        c.reordered,
        s.http_errors,
        s.io_errors,
    );
    ctx.print_latency("api->client", &s.totals.hist);
    print!(
        "{}{}",
        table_header(),
        table_row("request round trip", &s.rtt)
    );
    if !ctx.args.no_hgrm && !s.rtt.is_empty() {
        println!("\n  request round trip percentile distribution (microseconds):");
        print!("{}", hgrm(&s.rtt, 1000.0));
    }
}

/// p99 of `h` over p99 of `ws` (None when either is empty).
fn p99_ratio(h: &Histogram<u64>, ws: &Histogram<u64>) -> Option<f64> {
    if h.is_empty() || ws.is_empty() {
        return None;
    }
    let r = h.value_at_quantile(0.99) as f64 / ws.value_at_quantile(0.99).max(1) as f64;
    Some((r * 100.0).round() / 100.0)
}

/// The issue's bars (docs/benchmarks.md), printed beside the figures; they
/// do not change the exit code.
const P99_BAR_VS_WEBSOCKET: f64 = 2.0;
const BATCH_BAR_PUSHES_PER_SEC: f64 = 20_000.0;

/// The API phase; `ws` is the WebSocket targeted phase's latency (empty
/// when it did not run).
pub fn run(ctx: &mut Ctx, sum: &mut Summary, ws: &Histogram<u64>) {
    let args = ctx.args;
    let addr = args.push_via_api.clone().unwrap_or_default();
    let paced = args.api_rate.unwrap_or(args.msg_rate);
    let paced = (paced > 0.0 && args.msgs > 0).then_some(paced);
    let conns = args.api_conns.max(1) as usize;
    println!(
        "\n== api: the targeted schedule (seed {}) pushed through the HTTP API at {addr}, \
         {conns} keep-alive connections, one request in flight each (schedule sender s on connection s % {conns}); \
         single pushes then batches of {}, each {}flat out ({} messages)",
        args.seed,
        args.api_batch,
        paced.map_or(String::new(), |r| format!("paced ({} messages at {r} pushes/s) then ", args.msgs)),
        args.api_msgs,
    );
    let mut subs = serde_json::Map::new();
    let mut ratios: Vec<(String, Option<f64>)> = Vec::new();
    let (mut lost, mut dup, mut mis, mut reord, mut ok) = (0, 0, 0, 0, true);
    let mut index = 0;
    for (name, per_request) in [("single", 1), ("batch", args.api_batch.max(1) as usize)] {
        let mut steps: Vec<(&str, Step)> = Vec::new();
        let plans = [
            ("paced", paced.map(|r| (Some(r), args.msgs))),
            (
                "flat_out",
                (args.api_msgs > 0).then_some((None, args.api_msgs)),
            ),
        ];
        for (mode, plan) in plans {
            let Some((rate, msgs)) = plan else { continue };
            let s = step(
                ctx,
                StepPlan {
                    per_request,
                    rate,
                    msgs,
                },
                index,
            );
            index += 1;
            print_step(ctx, &s);
            let c = &s.totals.counts;
            lost += c.lost();
            dup += c.duplicated;
            mis += c.misrouted;
            reord += c.reordered;
            if !s.ok() {
                ok = false;
                sum.fail(format!(
                    "api {name} {mode}: lost/duplicated/misrouted/reordered messages or failed requests"
                ));
            }
            steps.push((mode, s));
        }
        let flat = steps.iter().find(|s| s.0 == "flat_out").map(|s| &s.1);
        // Latency from the paced step (comparable with the WebSocket
        // phase), throughput from the flat-out one.
        let lat = steps.first().map(|s| &s.1);
        let mut v = serde_json::Map::new();
        v.insert("items_per_request".into(), json!(per_request));
        v.insert(
            "requests_per_sec".into(),
            json!(flat.map(|s| s.requests_per_sec().round())),
        );
        v.insert(
            "pushes_per_sec".into(),
            json!(flat.map(|s| s.pushes_per_sec().round())),
        );
        v.insert(
            "latency_us".into(),
            lat.map_or(Value::Null, |s| summary_json(&s.totals.hist)),
        );
        for (mode, s) in &steps {
            v.insert((*mode).into(), s.json());
            let key = match *mode {
                "paced" => name.to_string(),
                _ => format!("{name}_flat_out"),
            };
            ratios.push((key, p99_ratio(&s.totals.hist, ws)));
        }
        subs.insert(name.into(), Value::Object(v));
    }
    let ws_p99 = (!ws.is_empty()).then(|| ws.value_at_quantile(0.99) as f64 / 1000.0);
    println!(
        "\n== api vs websocket: p99 of api->client over p99 of the targeted phase (websocket->websocket, {} µs)",
        ws_p99.map_or("-".to_string(), |p| format!("{p:.1}"))
    );
    for (k, v) in &ratios {
        let v = v.map_or("-".to_string(), |v| format!("{v:.2}"));
        println!("  {k:<22} {v}");
    }
    for name in ["single", "batch"] {
        if let Some(p) = subs[name]["pushes_per_sec"].as_f64() {
            let r = subs[name]["requests_per_sec"].as_f64().unwrap_or(0.0);
            println!("  {name} flat out: {r:.0} requests/s, {p:.0} pushes/s");
        }
    }
    // The issue's targets, for the record.
    let single_ratio = ratios.iter().find(|r| r.0 == "single").and_then(|r| r.1);
    let batch_rate = subs["batch"]["pushes_per_sec"].as_f64();
    let p99_met = single_ratio.map(|r| r <= P99_BAR_VS_WEBSOCKET);
    let rate_met = batch_rate.map(|r| r >= BATCH_BAR_PUSHES_PER_SEC);
    let show = |m: Option<bool>| match m {
        Some(true) => "met",
        Some(false) => "not met",
        None => "not measured",
    };
    println!(
        "  targets (not part of the exit code): paced single p99 within {P99_BAR_VS_WEBSOCKET}x the websocket p99: {}; \
         >= {BATCH_BAR_PUSHES_PER_SEC} pushes/s through batches: {}",
        show(p99_met),
        show(rate_met)
    );
    let mut v = subs;
    v.insert("addr".into(), json!(addr));
    v.insert("connections".into(), json!(conns));
    v.insert("paced_msgs".into(), json!(paced.map(|_| args.msgs)));
    v.insert("paced_rate".into(), json!(paced));
    v.insert("flat_out_msgs".into(), json!(args.api_msgs));
    v.insert("websocket_p99_us".into(), json!(ws_p99));
    v.insert(
        "p99_vs_websocket".into(),
        Value::Object(ratios.into_iter().map(|(k, v)| (k, json!(v))).collect()),
    );
    v.insert(
        "targets".into(),
        json!({"single_p99_within_2x_websocket": p99_met, "batch_20k_pushes_per_sec": rate_met}),
    );
    v.insert("lost".into(), json!(lost));
    v.insert("duplicated".into(), json!(dup));
    v.insert("misrouted".into(), json!(mis));
    v.insert("reordered".into(), json!(reord));
    v.insert("ok".into(), json!(ok));
    sum.set("api", Value::Object(v));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_once_and_each_pair_on_one_connection() {
        let sched = Schedule::new(5, 50, 1000, 1000.0, 0.0);
        for (per_request, paced) in [(1, true), (7, true), (100, false)] {
            let mut seen = vec![0u32; sched.len()];
            for c in 0..3 {
                let reqs = requests_for(&sched, 3, c, per_request, paced);
                let mut last_due = 0;
                let mut last_j = None;
                for r in &reqs {
                    assert!(!r.msgs.is_empty() && r.msgs.len() <= per_request);
                    assert!(r.due_ns >= last_due);
                    last_due = r.due_ns;
                    for &j in &r.msgs {
                        seen[j as usize] += 1;
                        // Sender s always on connection s % 3, in order.
                        assert_eq!(sched.sender[j as usize] as usize % 3, c);
                        assert!(last_j.is_none_or(|l| l < j));
                        last_j = Some(j);
                    }
                    let last = *r.msgs.last().unwrap();
                    let want = if paced { sched.send_offset_ns(last) } else { 0 };
                    assert_eq!(r.due_ns, want);
                }
            }
            assert!(seen.iter().all(|&n| n == 1));
        }
    }

    #[test]
    fn bodies_and_answers() {
        let sched = Schedule::from_pairs(1, &[(3, 7), (4, 8)], 1000.0, 0.0);
        let sh = Shared {
            addr: String::new(),
            token: None,
            // The uid prefix `u"/`.
            path_prefix: path_segment("u\"/"),
            json_prefix: r#"u\"/"#.to_string(),
            id_base: 10,
            sched,
        };
        let mut body = Vec::new();
        let req = Request {
            due_ns: 0,
            msgs: vec![1],
        };
        assert_eq!(body_for(&sh, &req, false, 99, &mut body), "/push/u%22%2F8");
        assert_eq!(body, b"t11 s4 99");
        let req = Request {
            due_ns: 0,
            msgs: vec![0, 1],
        };
        assert_eq!(body_for(&sh, &req, true, 5, &mut body), "/push");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!([{"uid": "u\"/7", "message": "t10 s3 5"}, {"uid": "u\"/8", "message": "t11 s4 5"}])
        );
        assert_eq!(delivered_counts(br#"{"delivered":1}"#), Some(vec![1]));
        assert_eq!(
            delivered_counts(br#"{"delivered":[1,0,2],"total":3}"#),
            Some(vec![1, 0, 2])
        );
        assert_eq!(delivered_counts(br#"{"error":"x"}"#), None);
    }
}
