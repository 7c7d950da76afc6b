//! A worker process: one epoll loop driving thousands of WebSocket client
//! connections, plus the bare-TCP calibration clients. It takes commands
//! (`proto::Command`) as JSON lines on stdin and answers with events
//! (`proto::Event`) on stdout; the coordinator decides when each phase
//! starts.

use crate::calibrate::Clients;
use crate::conn::{Conn, State};
use crate::ledger::{Ledger, Receipt};
use crate::proto::{
    BcastReport, Command, ConnectReport, ErrorCounts, Event, Phase, TeardownReport, Traffic,
    TrafficPlan, TrafficReport,
};
use crate::report::{hist_counts, new_hist, record};
use crate::schedule::{mix, Rng, Schedule};
use crate::sys::{self, Epoll, EV_ERR, EV_ET, EV_IN, EV_OUT, EV_RDHUP};
use crate::ws;
use crate::Args;
use hdrhistogram::Histogram;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddrV4};

/// epoll token of the command pipe.
const TOKEN_STDIN: u64 = u64::MAX;
/// Tokens at or above this are calibration sockets (token - CALIB_BASE).
pub const CALIB_BASE: u64 = 1 << 40;

/// Writes one event to the coordinator, as a JSON line.
pub fn emit(ev: Event) {
    let line = serde_json::to_string(&ev).expect("events serialize");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Why a connection attempt or an established connection ended badly.
#[derive(Clone, Copy)]
enum Fail {
    /// TCP connect refused/unreachable, or the socket could not be made.
    Connect,
    /// No (valid) 101 response.
    Upgrade,
    /// Login refused or answered with something else.
    Login,
    /// Connect + upgrade + login did not finish in time.
    Timeout,
    /// An established connection was closed or reset by the server.
    Dropped,
    /// The server sent bytes that are not valid WebSocket frames.
    Protocol,
}

/// State of the connect phase.
struct ConnectPhase {
    /// Phase start (monotonic ns): pacing and rate are relative to it.
    t0: u64,
    /// Connections per second for this worker; 0 = as fast as possible.
    rate: f64,
    /// At most this many attempts in flight at once (avoids SYN drops).
    inflight_limit: usize,
    /// Attempt timeout in ns.
    timeout_ns: u64,
    /// Next local connection to start.
    next: usize,
    /// Attempts started and not yet finished.
    inflight: usize,
    established: u64,
    failed: u64,
    /// Time of the last login success, for the connections/s figure.
    last_ns: u64,
    /// Connect + upgrade + login latency per connection.
    hist: Histogram<u64>,
    /// Whether connect_done has been sent.
    reported: bool,
}

/// State of a targeted (or churn) phase.
struct TargetedPhase {
    /// Which run this is.
    kind: Traffic,
    sched: Schedule,
    /// Phase start: message j is due at t0 + j / rate.
    t0: u64,
    /// Message ids this worker sends, in order.
    my_sends: Vec<u32>,
    /// Index into my_sends of the next message to send.
    next_send: usize,
    /// Exactly-once and order bookkeeping of what our connections receive.
    ledger: Ledger,
    sent: u64,
    /// Sends skipped because the sender was reconnecting (churn only).
    send_skipped: u64,
    /// Latency of every delivery (send time in payload to receive time).
    hist: Histogram<u64>,
    /// (close time, local index) of our churned connections, sorted.
    churn_list: Vec<(u64, u32)>,
    next_churn: usize,
    /// Churned connections back and logged in again / that failed to.
    reconnected: u64,
    reconnect_failed: u64,
    /// Connect + upgrade + login latency of the reconnects.
    reconnect_hist: Histogram<u64>,
    /// Whether targeted_done has been sent.
    done_sent: bool,
}

/// Per-broadcast bookkeeping in this worker.
#[derive(Clone, Default)]
struct BcastStat {
    /// Ready connections here when it was armed: all must receive it.
    expected: u64,
    received: u64,
    /// Latest arrival minus send time: this worker's "last recipient".
    max_latency_ns: u64,
    done_sent: bool,
}

/// State of teardown.
struct Teardown {
    t0: u64,
    timeout_ns: u64,
    /// Connections we sent a close frame to.
    closing: u64,
    /// Closed after the server's close frame.
    clean: u64,
    /// Closed by EOF/reset without a close frame, or timed out.
    unclean: u64,
    timed_out: u64,
    /// Time from our close frame to the server's close frame.
    hist: Histogram<u64>,
    reported: bool,
}

pub struct Worker {
    /// Worker number (0-based); with `base` it decides which uids are ours.
    index: usize,
    /// Global index of our first connection: uid of local i is prefix+(base+i).
    base: u32,
    /// Connections across all workers: the schedule picks among all.
    total: u32,
    ep: Epoll,
    conns: Vec<Conn>,
    /// Servers; global connection g goes to targets[g % len].
    targets: Vec<SocketAddrV4>,
    /// Host header per target.
    hosts: Vec<String>,
    /// Source addresses; global g binds sources[g % len] (empty: none).
    sources: Vec<Ipv4Addr>,
    uid_prefix: String,
    /// Shared read buffer (one per worker, not per connection).
    rbuf: Vec<u8>,
    /// Shared scratch buffer for encoding frames.
    wbuf: Vec<u8>,
    /// Mask keys.
    rng: Rng,
    /// Partial command line from stdin.
    cmd_buf: Vec<u8>,
    /// Error counters that span phases.
    counters: ErrorCounts,
    /// Diagnostic lines printed to stderr so far (bounded).
    logged: u32,
    connect: Option<ConnectPhase>,
    targeted: Option<TargetedPhase>,
    bcast: Vec<BcastStat>,
    /// Latency of every broadcast delivery.
    bcast_hist: Histogram<u64>,
    bcast_duplicated: u64,
    /// Broadcast payloads with an id nobody armed.
    bcast_unknown: u64,
    teardown: Option<Teardown>,
    calib: Option<Clients>,
    /// Last progress line sent (ns), to send at most one per second.
    last_progress: u64,
    /// Last timeout scan (ns).
    last_scan: u64,
    /// Set by the exit command.
    exit: bool,
}

/// Parses a decimal number at the start of `b`; returns it and the rest.
fn parse_num(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in &b[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((n, &b[digits..]))
}

/// Parses `<tag><id> s<sender> <ts>` (tag `t` targeted, `b` broadcast).
pub fn parse_payload(p: &[u8], tag: u8) -> Option<(u64, u64, u64)> {
    let p = p.strip_prefix(&[tag])?;
    let (id, p) = parse_num(p)?;
    let p = p.strip_prefix(b" s")?;
    let (sender, p) = parse_num(p)?;
    let p = p.strip_prefix(b" ")?;
    let (ts, p) = parse_num(p)?;
    if !p.is_empty() {
        return None;
    }
    Some((id, sender, ts))
}

fn nonce(g: u32, started_ns: u64) -> [u8; 16] {
    let a = mix(u64::from(g) ^ started_ns.rotate_left(32));
    let b = mix(a ^ started_ns);
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&a.to_le_bytes());
    n[8..].copy_from_slice(&b.to_le_bytes());
    n
}

impl Worker {
    /// Runs the worker until the coordinator says exit or closes stdin.
    pub fn run(args: &Args, index: usize) -> i32 {
        sys::raise_nofile_limit();
        let _ = sys::set_nonblocking(0);
        let ep = match Epoll::new(1024) {
            Ok(ep) => ep,
            Err(e) => {
                eprintln!("worker {index}: epoll: {e}");
                return 1;
            }
        };
        if let Err(e) = ep.add(0, TOKEN_STDIN, EV_IN) {
            eprintln!("worker {index}: epoll add stdin: {e}");
            return 1;
        }
        let mut w = Worker {
            index,
            base: 0,
            total: 0,
            ep,
            conns: Vec::new(),
            targets: Vec::new(),
            hosts: Vec::new(),
            sources: Vec::new(),
            uid_prefix: args.uid_prefix.clone(),
            rbuf: vec![0; 64 * 1024],
            wbuf: Vec::with_capacity(4096),
            rng: Rng::new(mix(args.seed ^ (index as u64 + 1) ^ sys::now_ns())),
            cmd_buf: Vec::new(),
            counters: ErrorCounts::default(),
            logged: 0,
            connect: None,
            targeted: None,
            bcast: Vec::new(),
            bcast_hist: new_hist(),
            bcast_duplicated: 0,
            bcast_unknown: 0,
            teardown: None,
            calib: None,
            last_progress: 0,
            last_scan: 0,
            exit: false,
        };
        emit(Event::Ready {
            pid: std::process::id(),
        });
        while !w.exit {
            let timeout = w.timeout_ns();
            let n = w.ep.wait_ns(timeout);
            for i in 0..n {
                let (token, events) = w.ep.event(i);
                if token == TOKEN_STDIN {
                    w.on_stdin();
                } else if token >= CALIB_BASE {
                    if let Some(c) = w.calib.as_mut() {
                        c.on_event(&w.ep, (token - CALIB_BASE) as usize, events);
                    }
                } else {
                    w.on_conn_event(token as usize, events);
                }
            }
            w.tick();
        }
        0
    }

    /// How long epoll may sleep (ns): until the next paced send or churn
    /// close, 10 ms while a phase needs timeout checks, else 100 ms.
    fn timeout_ns(&self) -> u64 {
        let now = sys::now_ns();
        let mut due = now + 100_000_000;
        if self.connect.as_ref().is_some_and(|c| !c.reported) || self.teardown.is_some() {
            due = now + 10_000_000;
        }
        if let Some(t) = &self.targeted {
            if let Some(&j) = t.my_sends.get(t.next_send) {
                due = due.min(t.t0 + t.sched.send_offset_ns(j));
            }
            if let Some(&(at, _)) = t.churn_list.get(t.next_churn) {
                due = due.min(at);
            }
        }
        if let Some(c) = &self.calib {
            if let Some(at) = c.next_due() {
                due = due.min(at);
            }
        }
        due.saturating_sub(now)
    }

    fn on_stdin(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match sys::read_fd(0, &mut buf) {
                Ok(0) => {
                    // Coordinator gone: stop.
                    self.exit = true;
                    return;
                }
                Ok(n) => self.cmd_buf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.exit = true;
                    return;
                }
            }
        }
        while let Some(pos) = self.cmd_buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.cmd_buf.drain(..=pos).collect();
            match serde_json::from_slice::<Command>(&line) {
                Ok(cmd) => self.on_command(cmd),
                Err(e) => eprintln!("worker {}: bad command: {e}", self.index),
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Init {
                base,
                count,
                total,
                targets,
                sources,
            } => {
                self.base = base;
                self.total = total;
                self.conns = (0..count).map(|_| Conn::new()).collect();
                self.hosts = targets.iter().map(|t| t.to_string()).collect();
                self.targets = targets;
                self.sources = sources;
                emit(Event::InitDone);
            }
            Command::Connect {
                rate,
                inflight,
                timeout_ns,
            } => {
                self.connect = Some(ConnectPhase {
                    t0: sys::now_ns(),
                    rate,
                    inflight_limit: inflight.max(1),
                    timeout_ns,
                    next: 0,
                    inflight: 0,
                    established: 0,
                    failed: 0,
                    last_ns: 0,
                    hist: new_hist(),
                    reported: false,
                });
            }
            Command::Targeted(plan) => self.start_targeted(&plan),
            Command::TargetedReport => self.report_targeted(),
            Command::BcastArm { b } => {
                let b = b as usize;
                if self.bcast.len() <= b {
                    self.bcast.resize(b + 1, BcastStat::default());
                }
                let expected = self
                    .conns
                    .iter()
                    .filter(|c| c.state == State::Ready)
                    .count() as u64;
                self.bcast[b].expected = expected;
                emit(Event::BcastArmed { b: b as u32 });
                self.check_bcast_done(b);
            }
            Command::BcastSend { b, sender } => {
                let ok = self.send_broadcast(b, sender);
                emit(Event::BcastSent { b, ok });
            }
            Command::BcastReport => {
                emit(Event::BcastReport(BcastReport {
                    expected: self.bcast.iter().map(|s| s.expected).sum(),
                    deliveries: self.bcast.iter().map(|s| s.received).sum(),
                    duplicated: self.bcast_duplicated,
                    unknown: self.bcast_unknown,
                    hist: hist_counts(&self.bcast_hist),
                }));
            }
            Command::Teardown { timeout_ns } => self.start_teardown(timeout_ns),
            Command::Stats => emit(Event::Stats(self.counters)),
            Command::CalibConnect { addr, n, inflight } => {
                self.calib = Some(Clients::new(
                    addr,
                    self.sources.clone(),
                    self.base as usize,
                    n,
                    inflight,
                ));
            }
            Command::CalibFanout { round } => {
                if let Some(c) = self.calib.as_mut() {
                    c.arm_fanout(round);
                }
                emit(Event::CalibArmed);
            }
            Command::CalibOneway {
                start_ns,
                rate,
                count,
            } => {
                if let Some(c) = self.calib.as_mut() {
                    c.start_oneway(start_ns, rate, count);
                }
            }
            Command::CalibReport => match self.calib.as_ref() {
                Some(c) => emit(c.report()),
                None => emit(Event::CalibReport {
                    sent: 0,
                    received: 0,
                    hist: Vec::new(),
                }),
            },
            Command::CalibClose => {
                if let Some(mut c) = self.calib.take() {
                    c.close_all();
                }
                emit(Event::CalibClosed);
            }
            Command::Exit => self.exit = true,
        }
    }

    /// Periodic work: pacing, timeouts, completion, progress.
    fn tick(&mut self) {
        let now = sys::now_ns();
        self.tick_connect(now);
        self.tick_targeted(now);
        self.tick_teardown(now);
        if let Some(c) = self.calib.as_mut() {
            c.tick(&self.ep, now);
        }
        if now.saturating_sub(self.last_scan) > 200_000_000 {
            self.last_scan = now;
            self.scan_timeouts(now);
        }
        if now.saturating_sub(self.last_progress) >= 1_000_000_000 {
            self.last_progress = now;
            self.progress();
        }
    }

    fn progress(&self) {
        let (phase, done, failed) = if let Some(c) = self.connect.as_ref().filter(|c| !c.reported) {
            (Phase::Connect, c.established, c.failed)
        } else if let Some(t) = self.targeted.as_ref().filter(|t| !t.done_sent) {
            (t.kind.into(), t.sent, t.ledger.counts().delivered())
        } else if let Some(t) = self.teardown.as_ref().filter(|t| !t.reported) {
            (Phase::Teardown, t.clean + t.unclean, t.unclean)
        } else if let Some((phase, done)) = self.calib.as_ref().and_then(Clients::progress) {
            (phase, done, 0)
        } else {
            return;
        };
        emit(Event::Progress {
            phase,
            done,
            failed,
        });
    }

    fn tick_connect(&mut self, now: u64) {
        let Some(c) = self.connect.as_mut() else {
            return;
        };
        if c.reported {
            return;
        }
        let allowed = if c.rate > 0.0 {
            ((now.saturating_sub(c.t0) as f64 / 1e9) * c.rate) as usize + 1
        } else {
            usize::MAX
        };
        let mut to_start = Vec::new();
        while c.next < self.conns.len() && c.inflight < c.inflight_limit && c.next < allowed {
            to_start.push(c.next);
            c.next += 1;
            c.inflight += 1;
        }
        for li in to_start {
            self.start_connect(li, now);
        }
        let c = self.connect.as_mut().expect("connect phase");
        if c.next == self.conns.len() && c.inflight == 0 {
            c.reported = true;
            emit(Event::ConnectDone(ConnectReport {
                established: c.established,
                failed: c.failed,
                t0: c.t0,
                last_ns: c.last_ns,
                rss_bytes: crate::proc_stats::rss_bytes(std::process::id()),
                hist: hist_counts(&c.hist),
            }));
        }
    }

    /// Starts (or restarts, for churn) the TCP connect of local connection li.
    fn start_connect(&mut self, li: usize, now: u64) {
        let g = self.base + li as u32;
        let target = self.targets[g as usize % self.targets.len()];
        let source = if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[g as usize % self.sources.len()])
        };
        let conn = &mut self.conns[li];
        conn.started_ns = now;
        conn.state = State::Connecting;
        match sys::connect_nb(target, source) {
            Ok(fd) => {
                conn.fd = fd;
                if let Err(e) = self
                    .ep
                    .add(fd, li as u64, EV_IN | EV_OUT | EV_RDHUP | EV_ET)
                {
                    self.log(format!("epoll add: {e}"));
                    self.fail(li, Fail::Connect);
                }
            }
            Err(e) => {
                self.log(format!("connect to {target} from {source:?}: {e}"));
                self.fail(li, Fail::Connect);
            }
        }
    }

    /// Prints a diagnostic line to stderr, at most 20 per worker.
    fn log(&mut self, msg: String) {
        if self.logged < 20 {
            self.logged += 1;
            eprintln!("flood worker {}: {msg}", self.index);
        }
    }

    fn scan_timeouts(&mut self, now: u64) {
        let timeout = match &self.connect {
            Some(c) => c.timeout_ns,
            None => return,
        };
        let mut late = Vec::new();
        for (li, c) in self.conns.iter().enumerate() {
            if matches!(
                c.state,
                State::Connecting | State::Upgrading | State::LoggingIn
            ) && now.saturating_sub(c.started_ns) > timeout
            {
                late.push(li);
            }
        }
        for li in late {
            self.fail(li, Fail::Timeout);
        }
    }

    /// Ends connection li as failed, with the bookkeeping of its phase.
    fn fail(&mut self, li: usize, why: Fail) {
        let conn = &mut self.conns[li];
        let was = conn.state;
        conn.close_socket();
        conn.state = State::Failed;
        conn.reconnect = false;
        let attempt = matches!(was, State::Connecting | State::Upgrading | State::LoggingIn);
        let c = &mut self.counters;
        match why {
            Fail::Connect => c.fail_connect += 1,
            Fail::Upgrade => c.fail_upgrade += 1,
            Fail::Login => c.fail_login += 1,
            Fail::Timeout => c.fail_timeout += 1,
            Fail::Dropped => c.dropped += 1,
            Fail::Protocol => c.protocol_errors += 1,
        }
        if attempt {
            if conn.is_reconnect {
                conn.is_reconnect = false;
                if let Some(t) = self.targeted.as_mut() {
                    t.reconnect_failed += 1;
                }
            } else if let Some(cp) = self.connect.as_mut() {
                cp.failed += 1;
                cp.inflight = cp.inflight.saturating_sub(1);
            }
        }
        if was == State::Closing {
            if let Some(t) = self.teardown.as_mut() {
                t.unclean += 1;
            }
        }
    }

    fn on_conn_event(&mut self, li: usize, events: u32) {
        if li >= self.conns.len() || self.conns[li].fd < 0 {
            return;
        }
        if self.conns[li].state == State::Connecting {
            if events & (EV_OUT | EV_ERR) == 0 {
                return;
            }
            let err = sys::socket_error(self.conns[li].fd);
            if err != 0 {
                let msg = format!("connect: {}", io::Error::from_raw_os_error(err));
                self.log(msg);
                self.fail(li, Fail::Connect);
                return;
            }
            let g = self.base + li as u32;
            let conn = &mut self.conns[li];
            let key = ws::key_for(nonce(g, conn.started_ns));
            self.wbuf.clear();
            ws::upgrade_request(
                &mut self.wbuf,
                &self.hosts[g as usize % self.hosts.len()],
                &key,
            );
            conn.state = State::Upgrading;
            if conn.send(&self.wbuf).is_err() {
                self.fail(li, Fail::Connect);
                return;
            }
        }
        if events & EV_OUT != 0
            && !self.conns[li].outbuf.is_empty()
            && self.conns[li].flush().is_err()
        {
            self.on_eof(li);
            return;
        }
        if events & (EV_IN | EV_RDHUP | EV_ERR) != 0 {
            self.on_readable(li, events & (EV_RDHUP | EV_ERR) != 0);
        }
    }

    fn on_readable(&mut self, li: usize, hangup: bool) {
        loop {
            let fd = self.conns[li].fd;
            if fd < 0 {
                return;
            }
            match sys::read(fd, &mut self.rbuf) {
                Ok(0) => {
                    self.on_eof(li);
                    return;
                }
                Ok(n) => {
                    self.on_bytes(li, n);
                    // A short read drained the socket: a new arrival makes
                    // a new edge. After a hangup, read on to see the EOF.
                    if n < self.rbuf.len() && !hangup {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.on_eof(li);
                    return;
                }
            }
        }
    }

    /// The peer closed or reset the socket.
    fn on_eof(&mut self, li: usize) {
        match self.conns[li].state {
            State::Closing => self.finish_close(li, false),
            State::Connecting => self.fail(li, Fail::Connect),
            State::Upgrading => self.fail(li, Fail::Upgrade),
            State::LoggingIn => self.fail(li, Fail::Login),
            State::Ready => {
                self.log(format!(
                    "connection {} dropped by server",
                    self.base as usize + li
                ));
                self.fail(li, Fail::Dropped)
            }
            _ => self.conns[li].close_socket(),
        }
    }

    /// Feeds `n` new bytes from rbuf to connection li.
    fn on_bytes(&mut self, li: usize, n: usize) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut pending = std::mem::take(&mut self.conns[li].inbuf);
        if pending.is_empty() {
            let used = self.consume(li, &mut rbuf[..n]);
            if used < n && self.conns[li].fd >= 0 {
                self.conns[li].inbuf = rbuf[used..n].to_vec();
            }
        } else {
            pending.extend_from_slice(&rbuf[..n]);
            let used = self.consume(li, &mut pending);
            if self.conns[li].fd >= 0 && used < pending.len() {
                pending.drain(..used);
                self.conns[li].inbuf = pending;
            }
        }
        self.rbuf = rbuf;
    }

    /// Parses the upgrade response and frames in `data`; returns how many
    /// bytes were used (the rest is an incomplete frame).
    fn consume(&mut self, li: usize, data: &mut [u8]) -> usize {
        let mut pos = 0;
        if self.conns[li].state == State::Upgrading {
            let g = self.base + li as u32;
            let key = ws::key_for(nonce(g, self.conns[li].started_ns));
            match ws::parse_upgrade(data, &key) {
                ws::Upgrade::Incomplete => return 0,
                ws::Upgrade::Rejected => {
                    let head = String::from_utf8_lossy(&data[..data.len().min(120)]).to_string();
                    self.log(format!("upgrade rejected: {head:?}"));
                    self.fail(li, Fail::Upgrade);
                    return data.len();
                }
                ws::Upgrade::Done { consumed } => {
                    pos = consumed;
                    self.conns[li].state = State::LoggingIn;
                    let uid = format!("{}{}", self.uid_prefix, g);
                    self.send_frame(li, ws::OP_TEXT, uid.as_bytes());
                }
            }
        }
        while self.conns[li].fd >= 0 {
            match ws::parse_frame(&data[pos..]) {
                ws::Parse::Incomplete => break,
                ws::Parse::Invalid => {
                    self.log("invalid frame from server".to_string());
                    self.fail(li, Fail::Protocol);
                    return data.len();
                }
                ws::Parse::Frame(h) => {
                    let start = pos + h.header_len;
                    let end = start + h.payload_len;
                    if let Some(m) = h.mask {
                        ws::unmask(&mut data[start..end], m);
                    }
                    pos = end;
                    self.on_frame(li, h.fin, h.opcode, &data[start..end]);
                }
            }
        }
        pos
    }

    /// Encodes and sends one masked frame on connection li.
    fn send_frame(&mut self, li: usize, opcode: u8, payload: &[u8]) -> bool {
        let mask = (self.rng.next_u64() as u32).to_le_bytes();
        self.wbuf.clear();
        ws::encode_frame(&mut self.wbuf, opcode, payload, mask);
        if self.conns[li].send(&self.wbuf).is_err() {
            self.on_eof(li);
            return false;
        }
        true
    }

    fn on_frame(&mut self, li: usize, fin: bool, opcode: u8, payload: &[u8]) {
        match opcode {
            ws::OP_PING => {
                self.counters.pings += 1;
                self.send_frame(li, ws::OP_PONG, payload);
            }
            ws::OP_PONG => {}
            ws::OP_CLOSE => {
                if self.conns[li].state == State::Closing {
                    self.finish_close(li, true);
                } else {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    let reason =
                        String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).to_string();
                    let g = self.base as usize + li;
                    self.log(format!("server closed connection {g}: {code} {reason}"));
                    let echo = ws::close_payload(code, b"");
                    self.send_frame(li, ws::OP_CLOSE, &echo);
                    let why = if self.conns[li].state == State::LoggingIn {
                        Fail::Login
                    } else {
                        Fail::Dropped
                    };
                    if self.conns[li].fd >= 0 {
                        self.fail(li, why);
                    }
                }
            }
            ws::OP_TEXT | ws::OP_BINARY => {
                if fin {
                    self.on_message(li, payload);
                } else {
                    let c = &mut self.conns[li];
                    c.frag = payload.to_vec();
                    c.frag_opcode = opcode;
                }
            }
            _ => {
                // Continuation.
                self.conns[li].frag.extend_from_slice(payload);
                if fin {
                    let whole = std::mem::take(&mut self.conns[li].frag);
                    self.on_message(li, &whole);
                }
            }
        }
    }

    fn on_message(&mut self, li: usize, payload: &[u8]) {
        let now = sys::now_ns();
        match self.conns[li].state {
            State::LoggingIn => {
                let g = self.base + li as u32;
                let expected = format!("login success, your uid is {}{}", self.uid_prefix, g);
                if payload != expected.as_bytes() {
                    let got = String::from_utf8_lossy(payload).to_string();
                    self.log(format!("login of {g}: unexpected reply {got:?}"));
                    self.fail(li, Fail::Login);
                    return;
                }
                let conn = &mut self.conns[li];
                conn.state = State::Ready;
                let latency = now.saturating_sub(conn.started_ns);
                if conn.is_reconnect {
                    conn.is_reconnect = false;
                    if let Some(t) = self.targeted.as_mut() {
                        t.reconnected += 1;
                        record(&mut t.reconnect_hist, latency);
                    }
                } else if let Some(c) = self.connect.as_mut() {
                    c.established += 1;
                    c.inflight = c.inflight.saturating_sub(1);
                    c.last_ns = now;
                    record(&mut c.hist, latency);
                }
            }
            State::Ready | State::Closing => {
                if payload.first() == Some(&b't') {
                    self.on_targeted(li, payload, now);
                } else if payload.first() == Some(&b'b') {
                    self.on_broadcast(li, payload, now);
                } else {
                    self.counters.unexpected += 1;
                    let got =
                        String::from_utf8_lossy(&payload[..payload.len().min(100)]).to_string();
                    self.log(format!("unexpected message {got:?}"));
                }
            }
            _ => {}
        }
    }

    fn on_targeted(&mut self, li: usize, payload: &[u8], now: u64) {
        let g = self.base + li as u32;
        let Some(t) = self.targeted.as_mut() else {
            self.counters.stray += 1;
            return;
        };
        let Some((j, s, ts)) = parse_payload(payload, b't') else {
            t.ledger.garbled();
            return;
        };
        if t.ledger.receive(&t.sched, g, j, s) == Receipt::Delivered {
            record(&mut t.hist, now.saturating_sub(ts));
        }
    }

    fn on_broadcast(&mut self, li: usize, payload: &[u8], now: u64) {
        let Some((b, _s, ts)) = parse_payload(payload, b'b') else {
            self.counters.unexpected += 1;
            return;
        };
        let bu = b as usize;
        if bu >= self.bcast.len() {
            self.bcast_unknown += 1;
            return;
        }
        let conn = &mut self.conns[li];
        if conn.last_bcast == b as u32 + 1 {
            self.bcast_duplicated += 1;
            return;
        }
        conn.last_bcast = b as u32 + 1;
        let latency = now.saturating_sub(ts);
        record(&mut self.bcast_hist, latency);
        let st = &mut self.bcast[bu];
        st.received += 1;
        st.max_latency_ns = st.max_latency_ns.max(latency);
        self.check_bcast_done(bu);
    }

    fn check_bcast_done(&mut self, b: usize) {
        let st = &mut self.bcast[b];
        if !st.done_sent && st.received >= st.expected {
            st.done_sent = true;
            emit(Event::BcastDone {
                b: b as u32,
                received: st.received,
                max_latency_ns: st.max_latency_ns,
            });
        }
    }

    fn send_broadcast(&mut self, b: u32, g: u32) -> bool {
        let li = g.wrapping_sub(self.base) as usize;
        if li >= self.conns.len() || self.conns[li].state != State::Ready {
            return false;
        }
        let payload = format!("all:b{b} s{g} {}", sys::now_ns());
        self.send_frame(li, ws::OP_TEXT, payload.as_bytes())
    }

    fn start_targeted(&mut self, plan: &TrafficPlan) {
        let sched = Schedule::new(plan.seed, self.total, plan.msgs, plan.rate, plan.churn);
        let t0 = plan.start_ns;
        let mine = |g: u32| g >= self.base && g < self.base + self.conns.len() as u32;
        let mut my_sends = Vec::new();
        for j in 0..sched.len() as u32 {
            if mine(sched.sender[j as usize]) {
                my_sends.push(j);
            }
        }
        let ledger = Ledger::new(&sched, mine);
        let mut churn_list: Vec<(u64, u32)> = (0..self.conns.len() as u32)
            .filter(|&li| sched.is_churned(self.base + li))
            .map(|li| (t0 + sched.churn_offset_ns(self.base + li), li))
            .collect();
        churn_list.sort_unstable();
        self.targeted = Some(TargetedPhase {
            kind: plan.kind,
            sched,
            t0,
            my_sends,
            next_send: 0,
            ledger,
            sent: 0,
            send_skipped: 0,
            hist: new_hist(),
            churn_list,
            next_churn: 0,
            reconnected: 0,
            reconnect_failed: 0,
            reconnect_hist: new_hist(),
            done_sent: false,
        });
    }

    fn tick_targeted(&mut self, now: u64) {
        let Some(t) = self.targeted.as_mut() else {
            return;
        };
        // Sends that are due.
        let mut due = Vec::new();
        while let Some(&j) = t.my_sends.get(t.next_send) {
            if t.t0 + t.sched.send_offset_ns(j) > now {
                break;
            }
            due.push(j);
            t.next_send += 1;
        }
        // Churn closes that are due.
        let mut closes = Vec::new();
        while let Some(&(at, li)) = t.churn_list.get(t.next_churn) {
            if at > now {
                break;
            }
            closes.push(li as usize);
            t.next_churn += 1;
        }
        for j in due {
            self.send_targeted(j);
        }
        for li in closes {
            if self.conns[li].state == State::Ready {
                self.conns[li].reconnect = true;
                self.conns[li].state = State::Closing;
                let p = ws::close_payload(1000, b"churn");
                self.send_frame(li, ws::OP_CLOSE, &p);
            }
        }
        let t = self.targeted.as_mut().expect("targeted phase");
        let churned_total = t.churn_list.len() as u64;
        if !t.done_sent
            && t.next_send == t.my_sends.len()
            && t.next_churn == t.churn_list.len()
            && t.ledger.steady_complete()
            && t.reconnected + t.reconnect_failed >= churned_total
        {
            t.done_sent = true;
            emit(Event::TargetedDone);
        }
    }

    fn send_targeted(&mut self, j: u32) {
        let t = self.targeted.as_ref().expect("targeted phase");
        let s = t.sched.sender[j as usize];
        let r = t.sched.recipient[j as usize];
        let li = (s - self.base) as usize;
        if self.conns[li].state != State::Ready {
            self.targeted.as_mut().expect("targeted phase").send_skipped += 1;
            return;
        }
        let payload = format!("{}{r}:t{j} s{s} {}", self.uid_prefix, sys::now_ns());
        if self.send_frame(li, ws::OP_TEXT, payload.as_bytes()) {
            self.targeted.as_mut().expect("targeted phase").sent += 1;
        }
    }

    fn report_targeted(&mut self) {
        let Some(t) = self.targeted.take() else {
            emit(Event::TargetedReport(Box::default()));
            return;
        };
        emit(Event::TargetedReport(Box::new(TrafficReport {
            counts: *t.ledger.counts(),
            sent: t.sent,
            send_skipped: t.send_skipped,
            churned_conns: t.churn_list.len() as u64,
            reconnected: t.reconnected,
            reconnect_failed: t.reconnect_failed,
            hist: hist_counts(&t.hist),
            reconnect_hist: hist_counts(&t.reconnect_hist),
        })));
    }

    fn start_teardown(&mut self, timeout_ns: u64) {
        let now = sys::now_ns();
        let mut td = Teardown {
            t0: now,
            timeout_ns,
            closing: 0,
            clean: 0,
            unclean: 0,
            timed_out: 0,
            hist: new_hist(),
            reported: false,
        };
        let p = ws::close_payload(1000, b"bye");
        for li in 0..self.conns.len() {
            if self.conns[li].state == State::Ready {
                self.conns[li].state = State::Closing;
                self.conns[li].started_ns = now;
                td.closing += 1;
                self.send_frame(li, ws::OP_CLOSE, &p);
            }
        }
        self.teardown = Some(td);
    }

    /// A connection in Closing state is done: by the server's close frame
    /// (`clean`) or by EOF.
    fn finish_close(&mut self, li: usize, clean: bool) {
        let now = sys::now_ns();
        let conn = &mut self.conns[li];
        conn.close_socket();
        if conn.reconnect {
            conn.reconnect = false;
            conn.is_reconnect = true;
            self.start_connect(li, now);
            return;
        }
        conn.state = State::Closed;
        let started = conn.started_ns;
        if let Some(t) = self.teardown.as_mut() {
            if clean {
                t.clean += 1;
                record(&mut t.hist, now.saturating_sub(started));
            } else {
                t.unclean += 1;
            }
        }
    }

    fn tick_teardown(&mut self, now: u64) {
        let Some(t) = self.teardown.as_ref() else {
            return;
        };
        if t.reported {
            return;
        }
        if now.saturating_sub(t.t0) > t.timeout_ns {
            let mut late = 0;
            for c in self.conns.iter_mut() {
                if c.state == State::Closing {
                    c.close_socket();
                    c.state = State::Closed;
                    late += 1;
                }
            }
            let t = self.teardown.as_mut().expect("teardown");
            t.timed_out += late;
        }
        let t = self.teardown.as_mut().expect("teardown");
        if t.clean + t.unclean + t.timed_out >= t.closing {
            t.reported = true;
            let last = sys::now_ns();
            emit(Event::TeardownDone(TeardownReport {
                closing: t.closing,
                clean: t.clean,
                unclean: t.unclean,
                timed_out: t.timed_out,
                elapsed_ns: last - t.t0,
                hist: hist_counts(&t.hist),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_parsing() {
        assert_eq!(parse_payload(b"t12 s7 123456", b't'), Some((12, 7, 123456)));
        assert_eq!(parse_payload(b"b3 s0 99", b'b'), Some((3, 0, 99)));
        assert_eq!(parse_payload(b"t12 s7 123456x", b't'), None);
        assert_eq!(parse_payload(b"t12 s7", b't'), None);
        assert_eq!(parse_payload(b"b1 s1 1", b't'), None);
        assert_eq!(parse_payload(b"t s1 1", b't'), None);
    }
}
