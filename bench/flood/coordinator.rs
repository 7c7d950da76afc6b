//! The coordinator: starts K worker processes (this same binary with the
//! hidden `--worker` flag), drives the phases in lock step over their
//! stdin/stdout pipes, merges counts and histograms, samples the server's
//! memory and prints the report.

use crate::calibrate::{self, CalibPlan};
use crate::proc_stats;
use crate::report::{hgrm, merge_json, new_hist, summary_json, table_header, table_row};
use crate::schedule::Rng;
use crate::sys;
use crate::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Fds a worker keeps for itself besides connections (epoll, pipes, std).
pub const FD_RESERVE: u64 = 100;

/// The slice [lo, hi) of `total` items that worker `w` of `k` owns.
pub fn split(total: usize, k: usize, w: usize) -> (usize, usize) {
    (total * w / k, total * (w + 1) / k)
}

/// The running worker processes and the channel their output arrives on.
pub struct Workers {
    children: Vec<Child>,
    /// Where commands are written, one per worker.
    stdins: Vec<ChildStdin>,
    /// (worker, event) from the reader threads.
    rx: Receiver<(usize, Value)>,
    /// Events that arrived while waiting for something else.
    backlog: VecDeque<(usize, Value)>,
    /// Latest progress per worker: (phase, done, failed).
    progress: Vec<(String, u64, u64)>,
    /// When progress was last printed, and the total done then (for a rate).
    last_print: Instant,
    last_done: u64,
}

impl Workers {
    /// Starts `k` workers running this executable with the same arguments.
    pub fn spawn(k: usize) -> std::io::Result<Workers> {
        let exe = std::env::current_exe()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let (tx, rx) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for w in 0..k {
            let mut child = Command::new(&exe)
                .args(&args)
                .arg("--worker")
                .arg(w.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            stdins.push(child.stdin.take().expect("piped stdin"));
            let stdout = child.stdout.take().expect("piped stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) => {
                            if tx.send((w, v)).is_err() {
                                break;
                            }
                        }
                        Err(_) => eprintln!("worker {w}: {line}"),
                    }
                }
                let _ = tx.send((w, json!({"ev": "exited"})));
            });
            children.push(child);
        }
        Ok(Workers {
            children,
            stdins,
            rx,
            backlog: VecDeque::new(),
            progress: vec![(String::new(), 0, 0); k],
            last_print: Instant::now(),
            last_done: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.stdins.len()
    }

    /// Process ids of the workers (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    pub fn send(&mut self, w: usize, cmd: &Value) {
        let _ = writeln!(self.stdins[w], "{cmd}");
        let _ = self.stdins[w].flush();
    }

    pub fn send_all(&mut self, cmd: &Value) {
        for w in 0..self.len() {
            self.send(w, cmd);
        }
    }

    /// Handles progress and errors; returns events worth keeping.
    fn absorb(&mut self, w: usize, v: Value) -> Option<(usize, Value)> {
        match v["ev"].as_str() {
            Some("progress") => {
                self.progress[w] = (
                    v["phase"].as_str().unwrap_or("").to_string(),
                    v["done"].as_u64().unwrap_or(0),
                    v["failed"].as_u64().unwrap_or(0),
                );
                self.print_progress();
                None
            }
            Some("error") => {
                eprintln!("worker {w}: {}", v["msg"]);
                None
            }
            Some("exited") => {
                eprintln!("worker {w} exited");
                Some((w, v))
            }
            _ => Some((w, v)),
        }
    }

    /// One stderr line per second at most while a phase runs.
    fn print_progress(&mut self) {
        let elapsed = self.last_print.elapsed();
        if elapsed < Duration::from_millis(950) {
            return;
        }
        let phase = self.progress[0].0.clone();
        let done: u64 = self.progress.iter().map(|p| p.1).sum();
        let failed: u64 = self.progress.iter().map(|p| p.2).sum();
        let rate = done.saturating_sub(self.last_done) as f64 / elapsed.as_secs_f64();
        let (done_what, other_what) = match phase.as_str() {
            "connect" => ("established", "failed"),
            "targeted" | "churn" => ("sent", "delivered"),
            "teardown" => ("closed", "unclean"),
            _ => ("connected", "failed"),
        };
        eprintln!("  [{phase}] {done} {done_what}, {failed} {other_what}, {rate:.0}/s");
        self.last_print = Instant::now();
        self.last_done = done;
    }

    /// Resets the progress rate at a phase start.
    fn phase_start(&mut self) {
        self.last_print = Instant::now();
        self.last_done = 0;
        for p in &mut self.progress {
            *p = (String::new(), 0, 0);
        }
    }

    /// Reads pending events without waiting (keeps them in the backlog).
    pub fn drain_progress(&mut self) {
        while let Ok((w, v)) = self.rx.try_recv() {
            if let Some(e) = self.absorb(w, v) {
                self.backlog.push_back(e);
            }
        }
    }

    /// Waits until `n` events matching `pred` arrived or `timeout` passed.
    /// `poll`, if given, is called between checks (and should block briefly).
    pub fn wait_for(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        n: usize,
        timeout: Duration,
        mut poll: Option<&mut dyn FnMut()>,
    ) -> Vec<(usize, Value)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut keep = VecDeque::new();
        while let Some((w, v)) = self.backlog.pop_front() {
            if got.len() < n && pred(&v) {
                got.push((w, v));
            } else {
                keep.push_back((w, v));
            }
        }
        self.backlog = keep;
        let mut exited = 0;
        while got.len() < n {
            let now = Instant::now();
            if now >= deadline {
                eprintln!("  timed out waiting: got {} of {n} answers", got.len());
                break;
            }
            let next = match poll.as_mut() {
                Some(p) => {
                    p();
                    self.rx.try_recv().ok()
                }
                None => match self
                    .rx
                    .recv_timeout((deadline - now).min(Duration::from_millis(200)))
                {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            if let Some((w, v)) = next {
                if let Some((w, v)) = self.absorb(w, v) {
                    if v["ev"] == "exited" {
                        exited += 1;
                        if exited >= self.len() {
                            break;
                        }
                    } else if pred(&v) {
                        got.push((w, v));
                    } else {
                        self.backlog.push_back((w, v));
                    }
                }
            }
        }
        got
    }

    /// Tells every worker to exit and reaps them.
    pub fn shutdown(&mut self) {
        self.send_all(&json!({"cmd": "exit"}));
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Resolves `host:port` to an IPv4 address.
fn resolve(target: &str) -> Option<SocketAddrV4> {
    target.to_socket_addrs().ok()?.find_map(|a| match a {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(_) => None,
    })
}

/// Source addresses from a CIDR: up to `max` host addresses, skipping
/// 127.0.0.x (the usual bind address) when the range is wide enough, and
/// last octets 0 and 255.
pub fn source_pool(cidr: &str, max: usize) -> Result<Vec<Ipv4Addr>, String> {
    let (ip, bits) = cidr
        .split_once('/')
        .ok_or_else(|| format!("--sources {cidr}: expected a.b.c.d/prefix"))?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("--sources {cidr}: bad address"))?;
    let bits: u32 = bits
        .parse()
        .map_err(|_| format!("--sources {cidr}: bad prefix"))?;
    if bits > 32 {
        return Err(format!("--sources {cidr}: bad prefix"));
    }
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    let net = u32::from(ip) & mask;
    let size = if bits == 0 {
        u64::from(u32::MAX) + 1
    } else {
        1u64 << (32 - bits)
    };
    let start = if size > 512 { 257 } else { 1 };
    let mut out = Vec::new();
    let mut off = start;
    while out.len() < max && off < size {
        let a = net + off as u32;
        let last = a & 0xFF;
        if last != 0 && last != 255 {
            out.push(Ipv4Addr::from(a));
        }
        off += 1;
    }
    if out.is_empty() && size == 1 {
        out.push(ip);
    }
    Ok(out)
}

/// CPU time of the server and of the flood (coordinator + workers) at the
/// start of a phase, to say how many cores each used during it.
struct CpuMark {
    /// When the phase started.
    wall: Instant,
    /// Server CPU ns so far (None without --server-pid).
    server_ns: Option<u64>,
    /// Flood CPU ns so far, all its processes.
    flood_ns: Option<u64>,
}

impl CpuMark {
    fn now(server_pids: &[u32], workers: &Workers) -> CpuMark {
        let mut flood = workers.pids();
        flood.push(std::process::id());
        CpuMark {
            wall: Instant::now(),
            server_ns: proc_stats::total_cpu_ns(server_pids),
            flood_ns: proc_stats::total_cpu_ns(&flood),
        }
    }

    /// Prints and returns the cores used since the mark.
    fn report(&self, server_pids: &[u32], workers: &Workers) -> Value {
        let end = CpuMark::now(server_pids, workers);
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        let cores = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => {
                Some(((b.saturating_sub(a)) as f64 / 1e9 / wall * 100.0).round() / 100.0)
            }
            _ => None,
        };
        let server = cores(self.server_ns, end.server_ns);
        let flood = cores(self.flood_ns, end.flood_ns);
        let show = |c: Option<f64>| c.map_or("?".to_string(), |c| format!("{c:.2}"));
        println!(
            "  cpu over {wall:.2} s: server {} cores, flood {} cores (of {} on this host)",
            show(server),
            show(flood),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        json!({"wall_s": (wall * 1000.0).round() / 1000.0, "server_cores": server,
            "flood_cores": flood})
    }
}

/// Sums a numeric field over worker answers.
/// The earliest `t0` and the latest `last_ns` the workers reported (ns on
/// the shared monotonic clock); `last` is `t0` when none reported one.
pub(crate) fn span_ns(answers: &[(usize, Value)]) -> (u64, u64) {
    let t0 = answers
        .iter()
        .filter_map(|(_, v)| v["t0"].as_u64())
        .min()
        .unwrap_or(0);
    let last = answers
        .iter()
        .filter_map(|(_, v)| v["last_ns"].as_u64())
        .max()
        .unwrap_or(t0);
    (t0, last)
}

pub(crate) fn sum(answers: &[(usize, Value)], key: &str) -> u64 {
    answers
        .iter()
        .map(|(_, v)| v[key].as_u64().unwrap_or(0))
        .sum()
}

fn merged(answers: &[(usize, Value)], key: &str) -> Histogram<u64> {
    let mut h = new_hist();
    for (_, v) in answers {
        merge_json(&mut h, &v[key]);
    }
    h
}

/// Prints a latency table row plus, unless disabled, the .hgrm distribution.
fn print_latency(args: &Args, label: &str, h: &Histogram<u64>) {
    print!("{}{}", table_header(), table_row(label, h));
    if !args.no_hgrm && !h.is_empty() {
        println!("\n  {label} percentile distribution (microseconds):");
        print!("{}", hgrm(h, 1000.0));
    }
    println!();
}

fn ratio(a: f64, b: f64) -> Value {
    if a > 0.0 && b > 0.0 {
        json!(((a / b) * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Runs the whole benchmark; returns the process exit code.
pub fn run(args: &Args) -> i32 {
    let (soft, hard) = sys::raise_nofile_limit();
    let mut targets = Vec::new();
    for t in &args.targets {
        match resolve(t) {
            Some(a) => targets.push(a),
            None => {
                eprintln!("corepush-flood: cannot resolve --target {t} to an IPv4 address");
                return 2;
            }
        }
    }
    let per_proc = soft.saturating_sub(FD_RESERVE).max(1);
    let conns = u64::from(args.conns);
    let procs = args
        .procs
        .unwrap_or_else(|| conns.div_ceil(per_proc).max(1) as usize)
        .max(1);
    if conns.div_ceil(procs as u64) > per_proc {
        eprintln!(
            "corepush-flood: {conns} connections over {procs} process(es) need {} fds each, \
             but one process may open {soft} (hard limit {hard}); use --procs {} or raise `ulimit -n`",
            conns.div_ceil(procs as u64) + FD_RESERVE,
            conns.div_ceil(per_proc)
        );
        return 2;
    }
    let loopback = targets.iter().all(|t| t.ip().is_loopback());
    let sources = if loopback && args.sources != "none" {
        match source_pool(&args.sources, 64) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("corepush-flood: {e}");
                return 2;
            }
        }
    } else {
        Vec::new()
    };
    let mut server_pids = args.server_pids.clone();
    server_pids.sort_unstable();
    server_pids.dedup();

    println!("corepush-flood: {conns} connections to {:?}, {procs} worker process(es), fd limit {soft}/{hard}, {} source address(es)",
        args.targets, sources.len());
    let mut workers = match Workers::spawn(procs) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("corepush-flood: cannot start workers: {e}");
            return 2;
        }
    };
    let ready = workers.wait_for(|v| v["ev"] == "ready", procs, Duration::from_secs(10), None);
    if ready.len() < procs {
        eprintln!("corepush-flood: workers did not start");
        workers.shutdown();
        return 2;
    }
    let target_strs: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    let source_strs: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    for w in 0..procs {
        let (lo, hi) = split(conns as usize, procs, w);
        workers.send(
            w,
            &json!({"cmd": "init", "base": lo, "count": hi - lo, "total": conns,
                "targets": target_strs, "sources": source_strs}),
        );
    }
    workers.wait_for(
        |v| v["ev"] == "init_done",
        procs,
        Duration::from_secs(10),
        None,
    );

    let mut out = Map::new();
    let mut ok = true;
    let mut problems: Vec<String> = Vec::new();

    // ---- calibrate
    let mut calib = Value::Null;
    let mut calib_oneway = new_hist();
    if !args.no_calibrate {
        let cap = (soft.saturating_sub(64 + 4 * procs as u64)) as usize;
        let n = (conns as usize).min(cap);
        let plan = CalibPlan {
            n,
            capped: n < conns as usize,
            rounds: args.calib_rounds.max(1),
            rate: args.msg_rate,
            count: u64::from(args.msgs).min((args.msg_rate * 5.0) as u64),
            inflight: args.inflight,
        };
        println!(
            "\n== calibrate: bare TCP floor on this host ({n} sockets{})",
            if plan.capped {
                format!(", capped from {conns} by one process's fd limit {soft}")
            } else {
                String::new()
            }
        );
        workers.phase_start();
        match calibrate::run(&mut workers, &plan) {
            Ok((c, h)) => {
                println!(
                    "  connect+exchange: {} /s   fanout (send loop to all, until last receiver): {} us (send loop alone {} us; rounds {})",
                    c["connect_per_sec"], c["fanout_us"], c["fanout_send_loop_us"], c["fanout_rounds_us"]
                );
                println!(
                    "  one-way via bare relay at {} msg/s: {} sent, {} received",
                    args.msg_rate, c["oneway_sent"], c["oneway_received"]
                );
                print_latency(args, "bare one-way", &h);
                calib = c;
                calib_oneway = h;
            }
            Err(e) => {
                eprintln!("calibration failed: {e}");
            }
        }
    }

    if args.calibrate_only {
        workers.shutdown();
        let ok = !calib.is_null();
        out.insert("calibration".into(), calib);
        out.insert("ok".into(), json!(ok));
        if args.json {
            println!("{}", Value::Object(out));
        }
        return if ok { 0 } else { 1 };
    }

    // ---- connect
    let rss_before = proc_stats::total_rss(&server_pids);
    let tcp_before = proc_stats::tcp_mem_bytes();
    println!(
        "\n== connect: {conns} connections{}",
        if args.connect_rate > 0.0 {
            format!(" at {} /s", args.connect_rate)
        } else {
            " flat out".to_string()
        }
    );
    workers.phase_start();
    let mark = CpuMark::now(&server_pids, &workers);
    workers.send_all(
        &json!({"cmd": "connect", "rate": args.connect_rate / procs as f64,
        "inflight": args.inflight, "timeout_ns": (args.connect_timeout * 1e9) as u64}),
    );
    let wait = if args.connect_rate > 0.0 {
        conns as f64 / args.connect_rate
    } else {
        120.0
    } + args.connect_timeout
        + 30.0;
    let done = workers.wait_for(
        |v| v["ev"] == "connect_done",
        procs,
        Duration::from_secs_f64(wait),
        None,
    );
    let established = sum(&done, "established");
    let failed = conns - established.min(conns);
    let (t0, last) = span_ns(&done);
    let per_sec = if last > t0 {
        established as f64 / ((last - t0) as f64 / 1e9)
    } else {
        0.0
    };
    let connect_hist = merged(&done, "hist");
    let flood_rss = sum(&done, "rss_bytes");
    println!(
        "  established {established} of {conns}, failed {failed}, {per_sec:.0} conn/s over {:.2} s",
        (last.saturating_sub(t0)) as f64 / 1e9
    );
    print_latency(args, "connect+upgrade+login", &connect_hist);
    println!(
        "  flood worker memory: {} RSS for {established} connections ({:.0} bytes per connection, all included)",
        mib(flood_rss),
        flood_rss as f64 / established.max(1) as f64
    );
    if failed > 0 {
        ok = false;
        problems.push(format!("{failed} connections failed"));
    }
    out.insert(
        "connections".into(),
        json!({"requested": conns, "established": established, "failed": failed,
            "per_sec": per_sec.round(), "procs": procs, "flood_rss_bytes": flood_rss}),
    );
    let cpu = mark.report(&server_pids, &workers);
    out.insert(
        "connect".into(),
        json!({"latency_us": summary_json(&connect_hist), "cpu": cpu}),
    );

    // ---- hold
    let mut rss_peak = rss_before.unwrap_or(0);
    if args.hold_secs > 0.0 {
        println!(
            "\n== hold: {} s idle with {established} connections",
            args.hold_secs
        );
        let end = Instant::now() + Duration::from_secs_f64(args.hold_secs);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(250).min(end - Instant::now()));
            workers.drain_progress();
            if let Some(r) = proc_stats::total_rss(&server_pids) {
                rss_peak = rss_peak.max(r);
            }
        }
    }
    let rss_after = proc_stats::total_rss(&server_pids);
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
    out.insert(
        "server".into(),
        json!({"pids": server_pids, "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
            "rss_peak_bytes": rss_peak, "bytes_per_conn": bytes_per_conn.map(f64::round),
            "kernel_tcp_mem_before_bytes": tcp_before, "kernel_tcp_mem_after_bytes": tcp_after,
            "kernel_tcp_bytes_per_conn": tcp_per_conn.map(f64::round)}),
    );

    // ---- targeted
    let mut targeted_hist = new_hist();
    if args.msgs > 0 && established > 0 {
        let (v, h) = targeted_phase(args, &mut workers, &server_pids, "targeted", args.seed, 0.0);
        if !v["ok"].as_bool().unwrap_or(false) {
            ok = false;
            problems.push("targeted: lost/duplicated/misrouted/reordered messages".into());
        }
        out.insert("targeted".into(), v);
        targeted_hist = h;
    }

    // ---- broadcast
    let mut bcast_last = new_hist();
    if args.broadcasts > 0 && established > 0 {
        let (v, last) = broadcast_phase(args, &mut workers, &server_pids, conns as usize);
        if !v["ok"].as_bool().unwrap_or(false) {
            ok = false;
            problems.push("broadcast: lost or duplicated deliveries".into());
        }
        out.insert("broadcast".into(), v);
        bcast_last = last;
    }

    // ---- churn
    if args.churn > 0.0 && args.msgs > 0 && established > 0 {
        let (v, _) = targeted_phase(
            args,
            &mut workers,
            &server_pids,
            "churn",
            args.seed.wrapping_add(1),
            args.churn,
        );
        if !v["ok"].as_bool().unwrap_or(false) {
            ok = false;
            problems.push("churn: lost/duplicated/misrouted messages between steady connections, or reconnects failed".into());
        }
        out.insert("churn".into(), v);
    }

    // ---- teardown
    println!("\n== teardown: close all connections cleanly");
    workers.phase_start();
    workers.send_all(&json!({"cmd": "teardown", "timeout_ns": 10_000_000_000u64}));
    let done = workers.wait_for(
        |v| v["ev"] == "teardown_done",
        procs,
        Duration::from_secs(30),
        None,
    );
    let closing = sum(&done, "closing");
    let clean = sum(&done, "clean");
    let unclean = sum(&done, "unclean");
    let timed_out = sum(&done, "timed_out");
    let elapsed = done
        .iter()
        .filter_map(|(_, v)| v["elapsed_ns"].as_u64())
        .max()
        .unwrap_or(0);
    let close_hist = merged(&done, "hist");
    println!("  {closing} closing: {clean} clean (server close frame), {unclean} without close frame, {timed_out} timed out, {:.2} s",
        elapsed as f64 / 1e9);
    print_latency(args, "close frame round trip", &close_hist);
    if unclean + timed_out > 0 || done.len() < procs {
        ok = false;
        problems.push(format!(
            "teardown: {} connections did not close cleanly",
            unclean + timed_out
        ));
    }
    out.insert(
        "teardown".into(),
        json!({"closing": closing, "clean": clean, "unclean": unclean, "timed_out": timed_out,
            "elapsed_ms": elapsed / 1_000_000, "latency_us": summary_json(&close_hist)}),
    );

    // ---- error counters
    workers.send_all(&json!({"cmd": "stats"}));
    let stats = workers.wait_for(|v| v["ev"] == "stats", procs, Duration::from_secs(10), None);
    let mut errors = Map::new();
    for key in [
        "fail_connect",
        "fail_upgrade",
        "fail_login",
        "fail_timeout",
        "dropped",
        "protocol_errors",
        "unexpected",
        "stray",
        "pings",
    ] {
        errors.insert(key.into(), json!(sum(&stats, key)));
    }
    println!("\n== errors: {}", Value::Object(errors.clone()));
    if sum(&stats, "dropped") + sum(&stats, "protocol_errors") + sum(&stats, "unexpected") > 0 {
        ok = false;
        problems.push("connections dropped or protocol errors".into());
    }
    out.insert("errors".into(), Value::Object(errors));
    workers.shutdown();

    // ---- ratios to the floor
    if !calib.is_null() {
        let mut ratios = Map::new();
        ratios.insert(
            "connect_rate_vs_floor".into(),
            ratio(per_sec, calib["connect_per_sec"].as_f64().unwrap_or(0.0)),
        );
        let fanout = calib["fanout_us"].as_f64().unwrap_or(0.0);
        if !bcast_last.is_empty() {
            ratios.insert(
                "broadcast_last_recipient_p50_vs_fanout".into(),
                ratio(bcast_last.value_at_quantile(0.5) as f64 / 1000.0, fanout),
            );
            ratios.insert(
                "broadcast_last_recipient_max_vs_fanout".into(),
                ratio(bcast_last.max() as f64 / 1000.0, fanout),
            );
        }
        if !targeted_hist.is_empty() && !calib_oneway.is_empty() {
            for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
                ratios.insert(
                    format!("targeted_{name}_vs_oneway"),
                    ratio(
                        targeted_hist.value_at_quantile(q) as f64,
                        calib_oneway.value_at_quantile(q) as f64,
                    ),
                );
            }
        }
        println!(
            "\n== ratios to this host's bare-TCP floor (1.0 = as fast as the kernel allows here)"
        );
        for (k, v) in &ratios {
            println!("  {k:<44} {v}");
        }
        out.insert("ratios".into(), Value::Object(ratios));
    }
    out.insert("calibration".into(), calib);
    out.insert("ok".into(), json!(ok));
    out.insert("problems".into(), json!(problems));

    println!();
    if ok {
        println!("RESULT: ok");
    } else {
        println!("RESULT: FAILED: {}", problems.join("; "));
    }
    if args.json {
        println!("{}", Value::Object(out));
    }
    if ok {
        0
    } else {
        1
    }
}

/// The targeted phase (or, with churn > 0, the churn phase).
fn targeted_phase(
    args: &Args,
    workers: &mut Workers,
    server_pids: &[u32],
    label: &str,
    seed: u64,
    churn: f64,
) -> (Value, Histogram<u64>) {
    let procs = workers.len();
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
    workers.phase_start();
    let mark = CpuMark::now(server_pids, workers);
    let start = sys::now_ns() + 100_000_000;
    workers.send_all(
        &json!({"cmd": "targeted", "label": label, "seed": seed, "msgs": args.msgs,
        "rate": args.msg_rate, "churn": churn, "start_ns": start}),
    );
    let wait = Duration::from_secs_f64(duration + 0.1 + args.drain_secs);
    let done = workers.wait_for(|v| v["ev"] == "targeted_done", procs, wait, None);
    let all_done = done.len() == procs;
    let cpu = mark.report(server_pids, workers);
    // A moment for duplicates to show up.
    std::thread::sleep(Duration::from_millis(200));
    workers.send_all(&json!({"cmd": "targeted_report"}));
    let r = workers.wait_for(
        |v| v["ev"] == "targeted_report",
        procs,
        Duration::from_secs(10),
        None,
    );
    let sent = sum(&r, "sent");
    let skipped = sum(&r, "send_skipped");
    let exp_s = sum(&r, "expected_steady");
    let exp_c = sum(&r, "expected_churned");
    let del_s = sum(&r, "delivered_steady");
    let del_c = sum(&r, "delivered_churned");
    let dup = sum(&r, "duplicated");
    let mis = sum(&r, "misrouted");
    let reord = sum(&r, "reordered");
    let lost = exp_s.saturating_sub(del_s);
    let hist = merged(&r, "hist");
    let rec_hist = merged(&r, "reconnect_hist");
    let churned = sum(&r, "churned_conns");
    let reconnected = sum(&r, "reconnected");
    let reconnect_failed = sum(&r, "reconnect_failed");
    let ok = all_done
        && r.len() == procs
        && lost == 0
        && dup == 0
        && mis == 0
        && reord == 0
        && reconnect_failed == 0
        && reconnected == churned;
    println!("  sent {sent} ({:.0} msg/s), delivered {}, lost {lost}, duplicated {dup}, misrouted {mis}, reordered {reord}",
        sent as f64 / duration.max(1e-9), del_s + del_c);
    if churn > 0.0 {
        println!("  {churned} connections churned: {reconnected} reconnected, {reconnect_failed} failed to");
        println!("  messages between steady connections: {exp_s} expected, {del_s} delivered, {lost} lost (must be 0)");
        println!("  messages to/from churned uids (may legitimately be lost while reconnecting): {exp_c} expected, {del_c} delivered, {} not delivered, {skipped} not sent (sender reconnecting)",
            exp_c.saturating_sub(del_c));
    }
    print_latency(args, &format!("{label} send->receive"), &hist);
    if churn > 0.0 {
        print_latency(args, "reconnect+upgrade+login", &rec_hist);
    }
    let v = json!({
        "sent": sent, "delivered": del_s + del_c, "lost": lost, "duplicated": dup,
        "misrouted": mis, "reordered": reord, "expected": exp_s + exp_c,
        "rate": args.msg_rate, "msgs": args.msgs,
        "latency_us": summary_json(&hist),
        "cpu": cpu,
        "churned": {"conns": churned, "reconnected": reconnected, "reconnect_failed": reconnect_failed,
            "expected": exp_c, "delivered": del_c, "not_delivered": exp_c.saturating_sub(del_c),
            "not_sent": skipped, "reconnect_latency_us": summary_json(&rec_hist)},
        "ok": ok,
    });
    (v, hist)
}

/// The broadcast phase: one broadcast at a time, each from a random
/// connection, waiting until every worker saw it (or a timeout) before the
/// next, so they never overlap. Returns its JSON and the per-broadcast
/// last-recipient histogram.
fn broadcast_phase(
    args: &Args,
    workers: &mut Workers,
    server_pids: &[u32],
    conns: usize,
) -> (Value, Histogram<u64>) {
    let procs = workers.len();
    println!(
        "\n== broadcast: {} broadcasts to every connection, one at a time",
        args.broadcasts
    );
    workers.phase_start();
    let mark = CpuMark::now(server_pids, workers);
    let mut rng = Rng::new(args.seed ^ 0xB0AD);
    let mut last_hist = new_hist();
    let mut sent_ok = 0u64;
    let mut complete = 0u64;
    for b in 0..args.broadcasts {
        workers.send_all(&json!({"cmd": "bcast_arm", "b": b}));
        workers.wait_for(
            |v| v["ev"] == "bcast_armed" && v["b"] == b,
            procs,
            Duration::from_secs(10),
            None,
        );
        let sender = rng.below(conns as u64) as usize;
        let owner = (0..procs)
            .find(|&w| {
                let (lo, hi) = split(conns, procs, w);
                sender >= lo && sender < hi
            })
            .unwrap_or(0);
        workers.send(
            owner,
            &json!({"cmd": "bcast_send", "b": b, "sender": sender}),
        );
        let s = workers.wait_for(
            |v| v["ev"] == "bcast_sent" && v["b"] == b,
            1,
            Duration::from_secs(10),
            None,
        );
        if !s.first().is_some_and(|(_, v)| v["ok"] == true) {
            eprintln!("  broadcast {b}: sender {sender} not ready, skipped");
            continue;
        }
        sent_ok += 1;
        let done = workers.wait_for(
            |v| v["ev"] == "bcast_done" && v["b"] == b,
            procs,
            Duration::from_secs(10),
            None,
        );
        if done.len() == procs {
            complete += 1;
            let last = done
                .iter()
                .filter_map(|(_, v)| v["max_latency_ns"].as_u64())
                .max()
                .unwrap_or(0);
            crate::report::record(&mut last_hist, last);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = mark.report(server_pids, workers);
    std::thread::sleep(Duration::from_millis(200));
    workers.send_all(&json!({"cmd": "bcast_report"}));
    let r = workers.wait_for(
        |v| v["ev"] == "bcast_report",
        procs,
        Duration::from_secs(10),
        None,
    );
    let expected = sum(&r, "expected");
    let deliveries = sum(&r, "deliveries");
    let dup = sum(&r, "duplicated");
    let lost = expected.saturating_sub(deliveries);
    let hist = merged(&r, "hist");
    println!("  {sent_ok} of {} sent, {complete} reached every connection; deliveries {deliveries} of {expected}, lost {lost}, duplicated {dup}",
        args.broadcasts);
    print_latency(args, "broadcast per recipient", &hist);
    print_latency(args, "broadcast last recipient", &last_hist);
    let ok = sent_ok == u64::from(args.broadcasts) && lost == 0 && dup == 0 && r.len() == procs;
    let v = json!({
        "count": sent_ok, "requested": args.broadcasts, "complete": complete,
        "expected": expected, "deliveries": deliveries, "lost": lost, "duplicated": dup,
        "latency_us": summary_json(&hist), "last_recipient_us": summary_json(&last_hist),
        "cpu": cpu,
        "ok": ok,
    });
    (v, last_hist)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_everything() {
        let mut next = 0;
        for w in 0..3 {
            let (lo, hi) = split(10, 3, w);
            assert_eq!(lo, next);
            next = hi;
        }
        assert_eq!(next, 10);
    }

    #[test]
    fn sources_from_cidr() {
        let s = source_pool("127.0.0.0/8", 4).unwrap();
        assert_eq!(
            s,
            vec![
                Ipv4Addr::new(127, 0, 1, 1),
                Ipv4Addr::new(127, 0, 1, 2),
                Ipv4Addr::new(127, 0, 1, 3),
                Ipv4Addr::new(127, 0, 1, 4)
            ]
        );
        let s = source_pool("127.0.0.0/30", 10).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            source_pool("127.0.0.9/32", 10).unwrap(),
            vec![Ipv4Addr::new(127, 0, 0, 9)]
        );
        assert!(source_pool("nonsense", 1).is_err());
    }
}
