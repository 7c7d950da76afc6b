//! The coordinator: starts K worker processes (this same binary with the
//! hidden `--worker` flag), drives the phases in lock step over their
//! stdin/stdout pipes, merges counts and histograms, samples the server's
//! memory and prints the report.

use crate::calibrate::{self, CalibPlan};
use crate::ledger::Counts;
use crate::proc_stats;
use crate::proto::{pick, Command, ErrorCounts, Event, Phase, Traffic, TrafficPlan};
use crate::report::{hgrm, merged, new_hist, summary_json, table_header, table_row};
use crate::schedule::Rng;
use crate::sys;
use crate::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::process::{self, Child, ChildStdin, Stdio};
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
    rx: Receiver<(usize, Event)>,
    /// Events that arrived while waiting for something else.
    backlog: VecDeque<Event>,
    /// Latest progress per worker: (phase, done, failed).
    progress: Vec<(Option<Phase>, u64, u64)>,
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
            let mut child = process::Command::new(&exe)
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
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            if tx.send((w, ev)).is_err() {
                                break;
                            }
                        }
                        Err(_) => eprintln!("worker {w}: {line}"),
                    }
                }
                let _ = tx.send((w, Event::Exited));
            });
            children.push(child);
        }
        Ok(Workers {
            children,
            stdins,
            rx,
            backlog: VecDeque::new(),
            progress: vec![(None, 0, 0); k],
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

    pub fn send(&mut self, w: usize, cmd: &Command) {
        let line = serde_json::to_string(cmd).expect("commands serialize");
        let _ = writeln!(self.stdins[w], "{line}");
        let _ = self.stdins[w].flush();
    }

    pub fn send_all(&mut self, cmd: &Command) {
        for w in 0..self.len() {
            self.send(w, cmd);
        }
    }

    /// Handles progress and errors; returns events worth keeping.
    fn absorb(&mut self, w: usize, ev: Event) -> Option<Event> {
        match ev {
            Event::Progress {
                phase,
                done,
                failed,
            } => {
                self.progress[w] = (Some(phase), done, failed);
                self.print_progress();
                None
            }
            Event::Error { msg } => {
                eprintln!("worker {w}: {msg}");
                None
            }
            Event::Exited => {
                eprintln!("worker {w} exited");
                Some(ev)
            }
            _ => Some(ev),
        }
    }

    /// One stderr line per second at most while a phase runs.
    fn print_progress(&mut self) {
        let elapsed = self.last_print.elapsed();
        if elapsed < Duration::from_millis(950) {
            return;
        }
        let phase = self.progress[0].0;
        let done: u64 = self.progress.iter().map(|p| p.1).sum();
        let failed: u64 = self.progress.iter().map(|p| p.2).sum();
        let rate = done.saturating_sub(self.last_done) as f64 / elapsed.as_secs_f64();
        let (done_what, other_what) = match phase {
            Some(Phase::Connect) => ("established", "failed"),
            Some(Phase::Targeted | Phase::Churn) => ("sent", "delivered"),
            Some(Phase::Teardown) => ("closed", "unclean"),
            Some(Phase::CalibrateConnect) | None => ("connected", "failed"),
        };
        let phase = phase.map_or("", Phase::name);
        eprintln!("  [{phase}] {done} {done_what}, {failed} {other_what}, {rate:.0}/s");
        self.last_print = Instant::now();
        self.last_done = done;
    }

    /// Resets the progress rate at a phase start.
    fn phase_start(&mut self) {
        self.last_print = Instant::now();
        self.last_done = 0;
        for p in &mut self.progress {
            *p = (None, 0, 0);
        }
    }

    /// Reads pending events without waiting (keeps them in the backlog).
    pub fn drain_progress(&mut self) {
        while let Ok((w, ev)) = self.rx.try_recv() {
            if let Some(ev) = self.absorb(w, ev) {
                self.backlog.push_back(ev);
            }
        }
    }

    /// Waits until `pick` took `n` events or `timeout` passed, and returns
    /// what it took (`pick!` makes one from a pattern). Events it leaves
    /// wait in the backlog for a later call. `poll`, if given, is called
    /// between checks (and should block briefly).
    pub fn wait_for<T>(
        &mut self,
        n: usize,
        timeout: Duration,
        mut poll: Option<&mut dyn FnMut()>,
        pick: impl Fn(Event) -> Result<T, Event>,
    ) -> Vec<T> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(ev) = self.backlog.pop_front() {
            if got.len() >= n {
                keep.push_back(ev);
                continue;
            }
            match pick(ev) {
                Ok(t) => got.push(t),
                Err(ev) => keep.push_back(ev),
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
            let Some(ev) = next.and_then(|(w, ev)| self.absorb(w, ev)) else {
                continue;
            };
            if matches!(ev, Event::Exited) {
                exited += 1;
                if exited >= self.len() {
                    break;
                }
                continue;
            }
            match pick(ev) {
                Ok(t) => got.push(t),
                Err(ev) => self.backlog.push_back(ev),
            }
        }
        got
    }

    /// Tells every worker to exit and reaps them.
    pub fn shutdown(&mut self) {
        self.send_all(&Command::Exit);
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

/// The earliest start and the latest end of (start, end) pairs the workers
/// reported (ns on the shared monotonic clock); the end is the start when
/// there is none.
pub(crate) fn span_ns(spans: impl Iterator<Item = (u64, u64)>) -> (u64, u64) {
    let (mut t0, mut last) = (u64::MAX, 0);
    for (a, b) in spans {
        t0 = t0.min(a);
        last = last.max(b);
    }
    if t0 == u64::MAX {
        return (0, 0);
    }
    (t0, last.max(t0))
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
    let ready = workers.wait_for(
        procs,
        Duration::from_secs(10),
        None,
        pick!(Event::Ready { .. } => ()),
    );
    if ready.len() < procs {
        eprintln!("corepush-flood: workers did not start");
        workers.shutdown();
        return 2;
    }
    for w in 0..procs {
        let (lo, hi) = split(conns as usize, procs, w);
        workers.send(
            w,
            &Command::Init {
                base: lo as u32,
                count: (hi - lo) as u32,
                total: conns as u32,
                targets: targets.clone(),
                sources: sources.clone(),
            },
        );
    }
    workers.wait_for(
        procs,
        Duration::from_secs(10),
        None,
        pick!(Event::InitDone => ()),
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
    workers.send_all(&Command::Connect {
        rate: args.connect_rate / procs as f64,
        inflight: args.inflight,
        timeout_ns: (args.connect_timeout * 1e9) as u64,
    });
    let wait = if args.connect_rate > 0.0 {
        conns as f64 / args.connect_rate
    } else {
        120.0
    } + args.connect_timeout
        + 30.0;
    let done = workers.wait_for(
        procs,
        Duration::from_secs_f64(wait),
        None,
        pick!(Event::ConnectDone(r) => r),
    );
    let established: u64 = done.iter().map(|r| r.established).sum();
    let failed = conns - established.min(conns);
    let (t0, last) = span_ns(done.iter().map(|r| (r.t0, r.last_ns)));
    let per_sec = if last > t0 {
        established as f64 / ((last - t0) as f64 / 1e9)
    } else {
        0.0
    };
    let connect_hist = merged(done.iter().map(|r| &r.hist));
    let flood_rss: u64 = done.iter().map(|r| r.rss_bytes.unwrap_or(0)).sum();
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
        let (v, passed, h) = targeted_phase(
            args,
            &mut workers,
            &server_pids,
            Traffic::Targeted,
            args.seed,
            0.0,
        );
        if !passed {
            ok = false;
            problems.push("targeted: lost/duplicated/misrouted/reordered messages".into());
        }
        out.insert("targeted".into(), v);
        targeted_hist = h;
    }

    // ---- broadcast
    let mut bcast_last = new_hist();
    if args.broadcasts > 0 && established > 0 {
        let (v, passed, last) = broadcast_phase(args, &mut workers, &server_pids, conns as usize);
        if !passed {
            ok = false;
            problems.push("broadcast: lost or duplicated deliveries".into());
        }
        out.insert("broadcast".into(), v);
        bcast_last = last;
    }

    // ---- churn
    if args.churn > 0.0 && args.msgs > 0 && established > 0 {
        let (v, passed, _) = targeted_phase(
            args,
            &mut workers,
            &server_pids,
            Traffic::Churn,
            args.seed.wrapping_add(1),
            args.churn,
        );
        if !passed {
            ok = false;
            problems.push("churn: lost/duplicated/misrouted messages between steady connections, or reconnects failed".into());
        }
        out.insert("churn".into(), v);
    }

    // ---- teardown
    println!("\n== teardown: close all connections cleanly");
    workers.phase_start();
    workers.send_all(&Command::Teardown {
        timeout_ns: 10_000_000_000,
    });
    let done = workers.wait_for(
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
    workers.send_all(&Command::Stats);
    let mut errors = ErrorCounts::default();
    for e in workers.wait_for(
        procs,
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
        ok = false;
        problems.push("connections dropped or protocol errors".into());
    }
    out.insert("errors".into(), errors);
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

/// The targeted phase (or, with churn > 0, the churn phase). Returns its
/// JSON, whether it passed, and its latency histogram.
fn targeted_phase(
    args: &Args,
    workers: &mut Workers,
    server_pids: &[u32],
    kind: Traffic,
    seed: u64,
    churn: f64,
) -> (Value, bool, Histogram<u64>) {
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
    workers.send_all(&Command::Targeted(TrafficPlan {
        kind,
        seed,
        msgs: args.msgs,
        rate: args.msg_rate,
        churn,
        start_ns: start,
    }));
    let wait = Duration::from_secs_f64(duration + 0.1 + args.drain_secs);
    let done = workers.wait_for(procs, wait, None, pick!(Event::TargetedDone => ()));
    let all_done = done.len() == procs;
    let cpu = mark.report(server_pids, workers);
    // A moment for duplicates to show up.
    std::thread::sleep(Duration::from_millis(200));
    workers.send_all(&Command::TargetedReport);
    let r = workers.wait_for(
        procs,
        Duration::from_secs(10),
        None,
        pick!(Event::TargetedReport(r) => r),
    );
    let mut c = Counts::default();
    for w in &r {
        c.add(&w.counts);
    }
    let sent: u64 = r.iter().map(|w| w.sent).sum();
    let skipped: u64 = r.iter().map(|w| w.send_skipped).sum();
    let (exp_s, exp_c) = (c.expected_steady, c.expected_churned);
    let (del_s, del_c) = (c.delivered_steady, c.delivered_churned);
    let (dup, mis, reord) = (c.duplicated, c.misrouted, c.reordered);
    let lost = c.lost();
    let hist = merged(r.iter().map(|w| &w.hist));
    let rec_hist = merged(r.iter().map(|w| &w.reconnect_hist));
    let churned: u64 = r.iter().map(|w| w.churned_conns).sum();
    let reconnected: u64 = r.iter().map(|w| w.reconnected).sum();
    let reconnect_failed: u64 = r.iter().map(|w| w.reconnect_failed).sum();
    let ok = all_done
        && r.len() == procs
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
    print_latency(args, &format!("{} send->receive", kind.name()), &hist);
    if churn > 0.0 {
        print_latency(args, "reconnect+upgrade+login", &rec_hist);
    }
    let v = json!({
        "sent": sent, "delivered": c.delivered(), "lost": lost, "duplicated": dup,
        "misrouted": mis, "reordered": reord, "expected": exp_s + exp_c,
        "rate": args.msg_rate, "msgs": args.msgs,
        "latency_us": summary_json(&hist),
        "cpu": cpu,
        "churned": {"conns": churned, "reconnected": reconnected, "reconnect_failed": reconnect_failed,
            "expected": exp_c, "delivered": del_c, "not_delivered": c.churned_not_delivered(),
            "not_sent": skipped, "reconnect_latency_us": summary_json(&rec_hist)},
        "ok": ok,
    });
    (v, ok, hist)
}

/// The broadcast phase: one broadcast at a time, each from a random
/// connection, waiting until every worker saw it (or a timeout) before the
/// next, so they never overlap. Returns its JSON, whether it passed, and
/// the per-broadcast last-recipient histogram.
fn broadcast_phase(
    args: &Args,
    workers: &mut Workers,
    server_pids: &[u32],
    conns: usize,
) -> (Value, bool, Histogram<u64>) {
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
        workers.send_all(&Command::BcastArm { b });
        workers.wait_for(
            procs,
            Duration::from_secs(10),
            None,
            pick!(Event::BcastArmed { b: x } if x == b => ()),
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
            let last = done.iter().copied().max().unwrap_or(0);
            crate::report::record(&mut last_hist, last);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = mark.report(server_pids, workers);
    std::thread::sleep(Duration::from_millis(200));
    workers.send_all(&Command::BcastReport);
    let r = workers.wait_for(
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
    (v, ok, last_hist)
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
