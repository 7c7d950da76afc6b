//! The churn soak (`--soak-conns N`): N short connections, each one
//! connect and one disconnect (clean, abrupt, or half-open and left to the
//! server's timeouts: `worker/soak.rs`), as fast as the host allows, while
//! the `--conns` steady connections carry targeted traffic in rounds of
//! `--msgs` at `--msg-rate`, each round checked exactly-once and in order.
//! Then the steady connections close, and the server must come back to
//! where it started: no connections, logged-in connections or uids
//! (`GET /stats` on `--stats-api`), no more open descriptors than before
//! (`/proc/PID/fd`), RSS within `--soak-rss-tolerance` of before
//! (`/proc/PID/status`), within `--soak-settle-secs`.
//!
//! It runs instead of the usual phases: baseline, connect, soak, teardown,
//! settle.

use super::targeted::{self, Totals};
use super::workers::split;
use super::{connect, mib, teardown, Ctx, Summary};
use crate::http::HttpConn;
use crate::proc_stats;
use crate::proto::{
    pick, Command, Event, Phase, SoakCounts, SoakPlan, SoakReport, Traffic, TrafficPlan,
};
use crate::report::{merge_counts, merged, new_hist, summary_json};
use crate::sys;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The server gauges that must end at zero, and counters worth a look.
const GAUGES: [&str; 3] = ["connections", "logged_in", "local_uids"];
const COUNTERS: [&str; 12] = [
    "accepted",
    "logins",
    "timeouts",
    "handshake_failed",
    "login_refused",
    "protocol_errors",
    "accept_fd_exhausted",
    "accept_failed",
    "connections_refused",
    "pending_shed",
    "slow_consumers",
    "inbox_full",
];

/// A soak with no cycle ending for this long is stopped.
const STALL: Duration = Duration::from_secs(60);

/// `GET /stats` on a connection of its own, closed after the answer (so
/// it holds no descriptor of the server's afterwards): the `total` object.
fn stats(ctx: &Ctx) -> Result<Value, String> {
    let args = ctx.args;
    let mut c = HttpConn::new(
        &args.stats_api,
        args.api_token.as_deref(),
        Duration::from_secs(5),
    )
    .map_err(|e| format!("{}: {e}", args.stats_api))?;
    let r = c
        .get("/stats", true)
        .map_err(|e| format!("GET http://{}/stats: {e}", args.stats_api))?;
    if r.status != 200 {
        return Err(format!(
            "GET http://{}/stats: HTTP {}: {}",
            args.stats_api,
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("/stats: {e}"))?;
    match v.get("total") {
        Some(t) if t.is_object() => Ok(t.clone()),
        _ => Err("/stats: no \"total\" object".into()),
    }
}

fn gauge(total: &Value, name: &str) -> u64 {
    total[name].as_u64().unwrap_or(u64::MAX)
}

fn gauges_zero(total: &Value) -> bool {
    GAUGES.iter().all(|g| gauge(total, g) == 0)
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// The server's figures at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    fds: Option<u64>,
    rss: Option<u64>,
}

fn sample(pid: u32) -> Sample {
    Sample {
        fds: fd_count(pid),
        rss: proc_stats::rss_bytes(pid),
    }
}

/// The highest figures seen during the soak.
#[derive(Default)]
struct Peak {
    fds: u64,
    rss: u64,
    connections: u64,
    logged_in: u64,
    local_uids: u64,
}

impl Peak {
    fn see(&mut self, s: Sample) {
        self.fds = self.fds.max(s.fds.unwrap_or(0));
        self.rss = self.rss.max(s.rss.unwrap_or(0));
    }

    fn see_stats(&mut self, t: &Value) {
        self.connections = self.connections.max(gauge(t, "connections"));
        self.logged_in = self.logged_in.max(gauge(t, "logged_in"));
        self.local_uids = self.local_uids.max(gauge(t, "local_uids"));
    }
}

/// The steady traffic over all rounds.
struct SteadyTraffic {
    rounds: u64,
    sent: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    misrouted: u64,
    reordered: u64,
    incomplete: u64,
    hist: Histogram<u64>,
}

impl SteadyTraffic {
    fn add(&mut self, t: &Totals, all_done: bool, procs: usize) {
        let c = &t.counts;
        self.rounds += 1;
        self.sent += t.sent;
        self.delivered += c.delivered();
        self.lost += c.lost();
        self.duplicated += c.duplicated;
        self.misrouted += c.misrouted;
        self.reordered += c.reordered;
        if !all_done || t.reports < procs {
            self.incomplete += 1;
        }
        let _ = self.hist.add(&t.hist);
    }

    fn ok(&self) -> bool {
        self.lost + self.duplicated + self.misrouted + self.reordered + self.incomplete == 0
    }
}

/// The sampling done while waiting (server /proc figures each second,
/// /stats every two).
struct Sampler {
    pid: u32,
    peak: Peak,
    last_proc: Instant,
    last_stats: Instant,
}

impl Sampler {
    fn poll(&mut self, ctx: &Ctx) {
        if self.last_proc.elapsed() >= Duration::from_secs(1) {
            self.last_proc = Instant::now();
            self.peak.see(sample(self.pid));
        }
        if self.last_stats.elapsed() >= Duration::from_secs(2) {
            self.last_stats = Instant::now();
            if let Ok(t) = stats(ctx) {
                self.peak.see_stats(&t);
            }
        }
    }
}

/// One round of steady targeted traffic.
fn round(ctx: &mut Ctx, r: u64, sampler: &mut Sampler, traffic: &mut SteadyTraffic) {
    let args = ctx.args;
    let procs = ctx.procs();
    let start = sys::now_ns() + 100_000_000;
    ctx.workers.send_all(&Command::Targeted(TrafficPlan {
        kind: Traffic::Targeted,
        seed: args.seed.wrapping_add(1000 + r),
        msgs: args.msgs,
        rate: args.msg_rate,
        churn: 0.0,
        start_ns: start,
        id_base: (0x1000 + r) << 32,
        give_up_lag_ns: None,
    }));
    let secs = f64::from(args.msgs) / args.msg_rate + 0.1 + args.drain_secs;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut done = 0;
    while done < procs && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        sampler.poll(ctx);
        done += ctx
            .workers
            .take_ready(pick!(Event::TargetedDone => ()))
            .len();
    }
    let t = targeted::collect(ctx);
    traffic.add(&t, done >= procs, procs);
}

/// Runs the whole soak mode; the summary gets `soak`.
pub fn run(ctx: &mut Ctx, sum: &mut Summary) {
    let args = ctx.args;
    let cycles = args.soak_conns.unwrap_or(0);
    let procs = ctx.procs();
    let Some(&pid) = ctx
        .server_pids
        .first()
        .filter(|_| ctx.server_pids.len() == 1)
    else {
        sum.fail("the soak needs the server's process: exactly one --server-pid".into());
        return;
    };
    // Baseline: the API warmed up (its first answer allocates), the server
    // idle; the fewest descriptors seen over a second (the connection of
    // our GET closes right after its answer).
    println!(
        "\n== soak baseline: server pid {pid}, stats from http://{}/stats",
        args.stats_api
    );
    let total0 = match stats(ctx) {
        Ok(t) => t,
        Err(e) => {
            sum.fail(format!("soak: {e}"));
            return;
        }
    };
    if !gauges_zero(&total0) {
        println!(
            "  WARNING: the server is not idle before the soak: {}",
            gauges_line(&total0)
        );
    }
    let mut base = Sample::default();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        let s = sample(pid);
        base.fds = match (base.fds, s.fds) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        base.rss = s.rss;
    }
    println!(
        "  {}; open descriptors {}, RSS {}",
        gauges_line(&total0),
        show(base.fds),
        base.rss.map_or("?".into(), mib)
    );

    let connected = connect::run(ctx, sum);
    if connected.established == 0 {
        return;
    }

    let mix = {
        let m = &args.soak_mix;
        [m[0], m[1], m[2], m[3]]
    };
    println!(
        "\n== soak: {cycles} connects and disconnects (clean:abrupt:unlogged:silent = {}:{}:{}:{}), \
         at most {} open and {} connecting per worker, {procs} worker(s); meanwhile {} steady connections \
         carry targeted traffic, rounds of {} messages at {} msg/s",
        mix[0], mix[1], mix[2], mix[3], args.soak_slots, args.inflight, connected.established,
        args.msgs, args.msg_rate
    );
    ctx.workers.phase_start();
    let mark = ctx.cpu_mark();
    for w in 0..procs {
        let (lo, hi) = split(cycles as usize, procs, w);
        ctx.workers.send(
            w,
            &Command::Soak(SoakPlan {
                cycles: (hi - lo) as u64,
                mix,
                slots: args.soak_slots,
                inflight: args.inflight as u32,
                seed: args.seed,
                connect_timeout_ns: (args.connect_timeout * 1e9) as u64,
                reap_timeout_ns: (args.soak_reap_secs * 1e9) as u64,
                linger_ns: (args.soak_linger_ms * 1e6) as u64,
            }),
        );
    }
    let mut sampler = Sampler {
        pid,
        peak: Peak::default(),
        last_proc: Instant::now(),
        last_stats: Instant::now(),
    };
    let mut traffic = SteadyTraffic {
        rounds: 0,
        sent: 0,
        delivered: 0,
        lost: 0,
        duplicated: 0,
        misrouted: 0,
        reordered: 0,
        incomplete: 0,
        hist: new_hist(),
    };
    let mut reports: Vec<Box<SoakReport>> = Vec::new();
    let (mut last_done, mut last_change) = (0, Instant::now());
    let mut stopped = false;
    let stall = STALL.max(Duration::from_secs_f64(args.soak_reap_secs * 2.0));
    while reports.len() < procs {
        if args.msgs > 0 {
            round(ctx, traffic.rounds, &mut sampler, &mut traffic);
        } else {
            std::thread::sleep(Duration::from_millis(200));
            sampler.poll(ctx);
        }
        reports.extend(ctx.workers.take_ready(pick!(Event::SoakDone(r) => r)));
        let done = ctx.workers.progress_done(Phase::Soak);
        if done != last_done {
            (last_done, last_change) = (done, Instant::now());
        } else if last_change.elapsed() > stall && reports.len() < procs {
            println!(
                "  no soak cycle ended for {} s: stopping the soak",
                stall.as_secs()
            );
            ctx.workers.send_all(&Command::SoakStop);
            let rest = ctx.workers.wait_for(
                procs - reports.len(),
                Duration::from_secs(10),
                None,
                pick!(Event::SoakDone(r) => r),
            );
            reports.extend(rest);
            stopped = true;
            break;
        }
    }
    let cpu = mark.report(ctx);

    // What the soak did.
    let mut c = SoakCounts::default();
    for r in &reports {
        c.add(&r.counts);
    }
    let t0 = reports.iter().map(|r| r.t0).min().unwrap_or(0);
    let last = reports.iter().map(|r| r.last_ns).max().unwrap_or(0);
    let secs = last.saturating_sub(t0) as f64 / 1e9;
    let per_sec = c.done as f64 / secs.max(1e-9);
    let connect_hist = merged(reports.iter().map(|r| &r.connect_hist));
    let mut reap_unlogged = new_hist();
    let mut reap_silent = new_hist();
    let mut close_hist = new_hist();
    for r in &reports {
        merge_counts(&mut reap_unlogged, &r.reap_unlogged_hist);
        merge_counts(&mut reap_silent, &r.reap_silent_hist);
        merge_counts(&mut close_hist, &r.close_hist);
    }
    println!(
        "  {} of {cycles} cycles done in {secs:.1} s: {per_sec:.0} connects and as many disconnects per second",
        c.done
    );
    println!(
        "  clean {} (close handshake), abrupt {} (reset), unlogged {} (closed by the server: login timeout), \
         silent {} (closed by the server: idle timeout; {} pinged first)",
        c.clean, c.abrupt, c.unlogged_reaped, c.silent_reaped, c.silent_pinged
    );
    let failures = c.failures();
    println!(
        "  failures {failures}: connect {}, upgrade {}, login {}, timeout {}, clean close without the server's close frame {}, \
         clean close timed out {}, half-open closed otherwise {}, not reaped {}, unexpected {}, abandoned {}",
        c.fail_connect, c.fail_upgrade, c.fail_login, c.fail_timeout, c.clean_unclean, c.clean_timeout,
        c.reaped_other, c.not_reaped, c.unexpected, c.abandoned
    );
    ctx.print_latency("soak connect+upgrade(+login)", &connect_hist);
    ctx.print_latency("soak clean close round trip", &close_hist);
    ctx.print_latency("soak unlogged: silence to close", &reap_unlogged);
    ctx.print_latency("soak silent: silence to close", &reap_silent);
    println!(
        "  steady traffic: {} rounds, sent {}, delivered {}, lost {}, duplicated {}, misrouted {}, reordered {}, rounds incomplete {}",
        traffic.rounds, traffic.sent, traffic.delivered, traffic.lost, traffic.duplicated,
        traffic.misrouted, traffic.reordered, traffic.incomplete
    );
    ctx.print_latency("soak traffic send->receive", &traffic.hist);
    let p = &sampler.peak;
    println!(
        "  server peak: {} open descriptors, RSS {}, {} connections, {} logged in, {} uids",
        p.fds,
        mib(p.rss),
        p.connections,
        p.logged_in,
        p.local_uids
    );

    teardown::run(ctx, sum);
    teardown::errors(ctx, sum);

    // Settle: counts to zero, then descriptors and RSS back.
    let settle = Duration::from_secs_f64(args.soak_settle_secs);
    println!(
        "\n== soak settle: waiting up to {:.0} s for the server's counts, descriptors and RSS",
        settle.as_secs_f64()
    );
    let t_settle = Instant::now();
    let mut total = Value::Null;
    let mut counts_at = None;
    while t_settle.elapsed() < settle {
        match stats(ctx) {
            Ok(t) => {
                let zero = gauges_zero(&t);
                total = t;
                if zero {
                    counts_at = Some(t_settle.elapsed());
                    break;
                }
            }
            Err(e) => println!("  {e}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let rss_limit = base
        .rss
        .map(|b| (b as f64 * (1.0 + args.soak_rss_tolerance)) as u64);
    let mut after = sample(pid);
    let (mut fds_at, mut rss_at) = (None, None);
    loop {
        let elapsed = t_settle.elapsed();
        if fds_at.is_none() && matches!((after.fds, base.fds), (Some(a), Some(b)) if a <= b) {
            fds_at = Some(elapsed);
        }
        if rss_at.is_none() && matches!((after.rss, rss_limit), (Some(a), Some(l)) if a <= l) {
            rss_at = Some(elapsed);
        }
        if (fds_at.is_some() && rss_at.is_some()) || elapsed >= settle {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        after = sample(pid);
    }
    let secs_of = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let counts_ok = counts_at.is_some();
    let fds_ok = fds_at.is_some();
    let rss_ok = rss_at.is_some();
    println!(
        "  {} counts back to zero: {}{}",
        verdict(counts_ok),
        gauges_line(&total),
        counts_at.map_or(String::new(), |d| format!(
            " (after {:.1} s)",
            d.as_secs_f64()
        ))
    );
    println!(
        "  {} open descriptors: {} before, {} after (peak {}){}",
        verdict(fds_ok),
        show(base.fds),
        show(after.fds),
        p.fds,
        fds_at.map_or(String::new(), |d| format!(
            " (back after {:.1} s)",
            d.as_secs_f64()
        ))
    );
    println!(
        "  {} RSS: {} before, {} after (peak {}, limit {}){}",
        verdict(rss_ok),
        base.rss.map_or("?".into(), mib),
        after.rss.map_or("?".into(), mib),
        mib(p.rss),
        rss_limit.map_or("?".into(), mib),
        rss_at.map_or(String::new(), |d| format!(
            " (within after {:.1} s)",
            d.as_secs_f64()
        ))
    );
    let soak_ok = !stopped && failures == 0 && c.done == cycles;
    println!(
        "  {} soak: {} of {cycles} cycles ended as their kind should",
        verdict(soak_ok),
        c.done - failures.min(c.done)
    );
    println!(
        "  {} steady traffic: exactly once and in order over {} rounds",
        verdict(traffic.ok()),
        traffic.rounds
    );
    // The server's own counters over the run, for comparison.
    let mut deltas = serde_json::Map::new();
    for name in COUNTERS {
        let d = total[name]
            .as_u64()
            .zip(total0[name].as_u64())
            .map(|(a, b)| a.saturating_sub(b));
        deltas.insert(name.into(), json!(d));
    }
    println!(
        "  server counters over the run: {} (the flood opened {} steady and {} soak connections; \
         {} half-open ones were reaped by a timeout)",
        Value::Object(deltas.clone()),
        connected.established,
        c.started,
        c.unlogged_reaped + c.silent_reaped
    );

    if !soak_ok {
        sum.fail(format!(
            "soak: {failures} cycles failed{}",
            if stopped { " (stopped: stalled)" } else { "" }
        ));
    }
    if !traffic.ok() {
        sum.fail("soak: steady traffic lost/duplicated/misrouted/reordered messages".into());
    }
    if !counts_ok {
        sum.fail(format!(
            "soak: server counts not back to zero: {}",
            gauges_line(&total)
        ));
    }
    if !fds_ok {
        sum.fail(format!(
            "soak: server descriptors {} after, {} before",
            show(after.fds),
            show(base.fds)
        ));
    }
    if !rss_ok {
        sum.fail(format!(
            "soak: server RSS {} after, {} before (more than {:.0}% above)",
            after.rss.map_or("?".into(), mib),
            base.rss.map_or("?".into(), mib),
            args.soak_rss_tolerance * 100.0
        ));
    }
    let gauges_json = |t: &Value| json!({"connections": t["connections"], "logged_in": t["logged_in"], "local_uids": t["local_uids"]});
    sum.set(
        "soak",
        json!({
            "cycles": cycles,
            "done": c.done,
            "duration_s": (secs * 10.0).round() / 10.0,
            "per_sec": per_sec.round(),
            "mix": {"clean": mix[0], "abrupt": mix[1], "unlogged": mix[2], "silent": mix[3]},
            "counts": serde_json::to_value(c).expect("counts serialize"),
            "failures": failures,
            "stopped": stopped,
            "connect_latency_us": summary_json(&connect_hist),
            "clean_close_us": summary_json(&close_hist),
            "reap_us": {"unlogged": summary_json(&reap_unlogged), "silent": summary_json(&reap_silent)},
            "cpu": cpu,
            "traffic": {"rounds": traffic.rounds, "sent": traffic.sent, "delivered": traffic.delivered,
                "lost": traffic.lost, "duplicated": traffic.duplicated, "misrouted": traffic.misrouted,
                "reordered": traffic.reordered, "incomplete_rounds": traffic.incomplete,
                "latency_us": summary_json(&traffic.hist)},
            "server": {
                "pid": pid,
                "before": {"fds": base.fds, "rss_bytes": base.rss, "counts": gauges_json(&total0)},
                "peak": {"fds": p.fds, "rss_bytes": p.rss, "connections": p.connections,
                    "logged_in": p.logged_in, "local_uids": p.local_uids},
                "after": {"fds": after.fds, "rss_bytes": after.rss, "counts": gauges_json(&total)},
                "rss_limit_bytes": rss_limit,
                "settle_s": {"counts": secs_of(counts_at), "fds": secs_of(fds_at), "rss": secs_of(rss_at)},
                "counter_deltas": deltas,
            },
            "checks": {"soak": soak_ok, "traffic": traffic.ok(), "counts_zero": counts_ok,
                "fds_back": fds_ok, "rss_back": rss_ok},
        }),
    );
}

fn gauges_line(total: &Value) -> String {
    GAUGES
        .iter()
        .map(|g| format!("{g} {}", total[*g]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}
