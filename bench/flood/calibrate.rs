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
//! The sink (listener, echo, relay, fanout sender) runs in the coordinator
//! process; the clients run in the workers.

use crate::coordinator::{span_ns, split, Workers};
use crate::proto::{pick, Command, Event, Phase};
use crate::report::{hist_counts, merge_counts, new_hist, record, summary_json};
use crate::schedule::Rng;
use crate::sys::{self, Epoll, EV_ERR, EV_ET, EV_IN, EV_OUT, EV_RDHUP};
use crate::worker::{emit, CALIB_BASE};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

/// Size of a sink-to-client or client-to-client record.
const RECORD: usize = 40;
/// Size of the hello a client sends and the sink echoes.
const HELLO: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum CState {
    Idle,
    Connecting,
    /// Hello sent, waiting for its echo.
    Hello,
    Ready,
    Failed,
}

/// One bare calibration client socket (about 48 bytes).
struct CSock {
    fd: i32,
    state: CState,
    /// Bytes of the current hello echo / record received so far.
    have: u8,
    /// The record being reassembled (TCP may split it).
    buf: [u8; RECORD],
}

/// Worker side of calibration: N bare client sockets.
pub struct Clients {
    /// The coordinator's sink.
    target: SocketAddrV4,
    /// Source addresses spread like the real connections.
    sources: Vec<Ipv4Addr>,
    /// Offset into `sources`, so workers spread over different sources.
    base: usize,
    socks: Vec<CSock>,
    /// Next socket to connect, attempts in flight and their limit.
    next: usize,
    inflight: usize,
    inflight_limit: usize,
    ok: u64,
    failed: u64,
    /// Connect phase start and last hello echo (monotonic ns).
    t0: u64,
    last_ns: u64,
    connect_reported: bool,
    /// Fanout round we wait for, records of it seen, last arrival.
    fanout_round: u32,
    fanout_count: u64,
    fanout_last_ns: u64,
    fanout_reported: bool,
    /// One-way test: first send time, ns between sends, how many to send
    /// and how many were sent, next socket to send on.
    ow_start: u64,
    ow_interval: f64,
    ow_count: u64,
    ow_sent: u64,
    ow_next_sock: usize,
    /// Records that arrived through the relay, and their latency.
    ow_received: u64,
    ow_hist: Histogram<u64>,
}

impl Clients {
    pub fn new(
        target: SocketAddrV4,
        sources: Vec<Ipv4Addr>,
        base: usize,
        n: usize,
        inflight_limit: usize,
    ) -> Clients {
        Clients {
            target,
            sources,
            base,
            socks: (0..n)
                .map(|_| CSock {
                    fd: -1,
                    state: CState::Idle,
                    have: 0,
                    buf: [0; RECORD],
                })
                .collect(),
            next: 0,
            inflight: 0,
            inflight_limit: inflight_limit.max(1),
            ok: 0,
            failed: 0,
            t0: sys::now_ns(),
            last_ns: 0,
            connect_reported: n == 0,
            fanout_round: u32::MAX,
            fanout_count: 0,
            fanout_last_ns: 0,
            fanout_reported: true,
            ow_start: 0,
            ow_interval: 0.0,
            ow_count: 0,
            ow_sent: 0,
            ow_next_sock: 0,
            ow_received: 0,
            ow_hist: new_hist(),
        }
        .report_if_empty()
    }

    fn report_if_empty(self) -> Clients {
        if self.socks.is_empty() {
            emit(Event::CalibConnectDone {
                ok: 0,
                failed: 0,
                t0: self.t0,
                last_ns: self.t0,
            });
        }
        self
    }

    /// When the worker loop must wake up next: the next paced one-way send,
    /// or soon while connecting (to start more connects).
    pub fn next_due(&self) -> Option<u64> {
        if self.ow_sent < self.ow_count {
            return Some(self.ow_start + (self.ow_sent as f64 * self.ow_interval) as u64);
        }
        if !self.connect_reported {
            return Some(sys::now_ns() + 1_000_000);
        }
        None
    }

    pub fn progress(&self) -> Option<(Phase, u64)> {
        if !self.connect_reported {
            Some((Phase::CalibrateConnect, self.ok))
        } else {
            None
        }
    }

    pub fn tick(&mut self, ep: &Epoll, now: u64) {
        while self.next < self.socks.len() && self.inflight < self.inflight_limit {
            let i = self.next;
            self.next += 1;
            let source = if self.sources.is_empty() {
                None
            } else {
                Some(self.sources[(self.base + i) % self.sources.len()])
            };
            match sys::connect_nb(self.target, source) {
                Ok(fd) => {
                    self.socks[i].fd = fd;
                    self.socks[i].state = CState::Connecting;
                    self.inflight += 1;
                    if ep
                        .add(fd, CALIB_BASE + i as u64, EV_IN | EV_OUT | EV_RDHUP | EV_ET)
                        .is_err()
                    {
                        self.fail(i);
                    }
                }
                Err(e) => {
                    if self.failed < 5 {
                        eprintln!("calibration connect: {e}");
                    }
                    self.socks[i].state = CState::Failed;
                    self.failed += 1;
                }
            }
        }
        if !self.connect_reported && self.next == self.socks.len() && self.inflight == 0 {
            self.connect_reported = true;
            emit(Event::CalibConnectDone {
                ok: self.ok,
                failed: self.failed,
                t0: self.t0,
                last_ns: self.last_ns,
            });
        }
        while self.ow_sent < self.ow_count {
            let due = self.ow_start + (self.ow_sent as f64 * self.ow_interval) as u64;
            if due > now {
                break;
            }
            self.send_oneway();
        }
    }

    fn fail(&mut self, i: usize) {
        let s = &mut self.socks[i];
        if matches!(s.state, CState::Connecting | CState::Hello) {
            self.inflight -= 1;
            self.failed += 1;
        }
        sys::close(s.fd);
        s.fd = -1;
        s.state = CState::Failed;
    }

    fn send_oneway(&mut self) {
        self.ow_sent += 1;
        let n = self.socks.len();
        for _ in 0..n {
            let i = self.ow_next_sock % n;
            self.ow_next_sock += 1;
            if self.socks[i].state == CState::Ready {
                let mut rec = [0u8; RECORD];
                rec[0] = b'O';
                rec[8..16].copy_from_slice(&sys::now_ns().to_le_bytes());
                let _ = sys::write(self.socks[i].fd, &rec);
                return;
            }
        }
    }

    pub fn on_event(&mut self, ep: &Epoll, i: usize, events: u32) {
        let _ = ep;
        if i >= self.socks.len() || self.socks[i].fd < 0 {
            return;
        }
        if self.socks[i].state == CState::Connecting {
            if events & (EV_OUT | EV_ERR) == 0 {
                return;
            }
            if sys::socket_error(self.socks[i].fd) != 0 {
                self.fail(i);
                return;
            }
            self.socks[i].state = CState::Hello;
            if sys::write(self.socks[i].fd, b"calib-hello-0123").map_or(true, |n| n != HELLO) {
                self.fail(i);
                return;
            }
        }
        if events & (EV_IN | EV_RDHUP | EV_ERR) == 0 {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match sys::read(self.socks[i].fd, &mut buf) {
                Ok(0) => {
                    self.fail(i);
                    return;
                }
                Ok(n) => {
                    let now = sys::now_ns();
                    for &b in &buf[..n] {
                        self.on_byte(i, b, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.fail(i);
                    return;
                }
            }
        }
    }

    fn on_byte(&mut self, i: usize, b: u8, now: u64) {
        let s = &mut self.socks[i];
        if s.state == CState::Hello {
            s.have += 1;
            if s.have as usize == HELLO {
                s.have = 0;
                s.state = CState::Ready;
                self.inflight -= 1;
                self.ok += 1;
                self.last_ns = now;
            }
            return;
        }
        s.buf[s.have as usize] = b;
        s.have += 1;
        if (s.have as usize) < RECORD {
            return;
        }
        s.have = 0;
        let kind = s.buf[0];
        let word = u32::from_le_bytes([s.buf[4], s.buf[5], s.buf[6], s.buf[7]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&s.buf[8..16]);
        let ts = u64::from_le_bytes(ts);
        match kind {
            b'F' if word == self.fanout_round => {
                self.fanout_count += 1;
                self.fanout_last_ns = now;
                if !self.fanout_reported && self.fanout_count >= self.ok {
                    self.fanout_reported = true;
                    emit(Event::CalibFanoutDone {
                        round: word,
                        count: self.fanout_count,
                        last_ns: self.fanout_last_ns,
                    });
                }
            }
            b'O' => {
                self.ow_received += 1;
                record(&mut self.ow_hist, now.saturating_sub(ts));
            }
            _ => {}
        }
    }

    pub fn arm_fanout(&mut self, round: u32) {
        self.fanout_round = round;
        self.fanout_count = 0;
        self.fanout_last_ns = 0;
        self.fanout_reported = false;
    }

    pub fn start_oneway(&mut self, start_ns: u64, rate: f64, count: u64) {
        self.ow_start = start_ns;
        self.ow_interval = 1e9 / rate.max(1e-3);
        self.ow_count = count;
        self.ow_sent = 0;
    }

    pub fn report(&self) -> Event {
        Event::CalibReport {
            sent: self.ow_sent,
            received: self.ow_received,
            hist: hist_counts(&self.ow_hist),
        }
    }

    pub fn close_all(&mut self) {
        for s in &mut self.socks {
            sys::close(s.fd);
            s.fd = -1;
        }
    }
}

/// One accepted socket at the sink.
struct SSock {
    fd: i32,
    /// Hello bytes seen (the echo is sent at 16).
    hello: u8,
    /// Record bytes reassembled so far.
    have: u8,
    buf: [u8; RECORD],
}

/// Coordinator side: the bare listener that echoes, relays and fans out.
pub struct Sink {
    listen_fd: i32,
    pub addr: SocketAddrV4,
    ep: Epoll,
    socks: Vec<SSock>,
    /// Picks the relay destination.
    rng: Rng,
    relayed: u64,
    /// Writes that did not go through whole (would be a floor artefact).
    short_writes: u64,
}

const LISTEN_TOKEN: u64 = u64::MAX;

impl Sink {
    pub fn new() -> io::Result<Sink> {
        let (listen_fd, addr) = sys::listen_tcp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 65535)?;
        let ep = Epoll::new(1024)?;
        ep.add(listen_fd, LISTEN_TOKEN, EV_IN)?;
        Ok(Sink {
            listen_fd,
            addr,
            ep,
            socks: Vec::new(),
            rng: Rng::new(0x5EED),
            relayed: 0,
            short_writes: 0,
        })
    }

    /// Handles whatever is ready within `timeout_ms`.
    pub fn poll(&mut self, timeout_ms: i32) {
        let n = self.ep.wait(timeout_ms);
        for i in 0..n {
            let (token, _events) = self.ep.event(i);
            if token == LISTEN_TOKEN {
                while let Ok(fd) = sys::accept_nb(self.listen_fd) {
                    let idx = self.socks.len() as u64;
                    if self.ep.add(fd, idx, EV_IN).is_err() {
                        sys::close(fd);
                        continue;
                    }
                    self.socks.push(SSock {
                        fd,
                        hello: 0,
                        have: 0,
                        buf: [0; RECORD],
                    });
                }
            } else {
                self.on_readable(token as usize);
            }
        }
    }

    fn on_readable(&mut self, idx: usize) {
        let mut buf = [0u8; 4096];
        let n = match sys::read(self.socks[idx].fd, &mut buf) {
            Ok(0) | Err(_) => {
                // Closed (end of calibration) or error: stop watching it.
                return;
            }
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            let s = &mut self.socks[idx];
            if (s.hello as usize) < HELLO {
                s.hello += 1;
                if s.hello as usize == HELLO
                    && sys::write(s.fd, b"calib-hello-echo").map_or(true, |w| w != HELLO)
                {
                    self.short_writes += 1;
                }
                continue;
            }
            s.buf[s.have as usize] = b;
            s.have += 1;
            if (s.have as usize) < RECORD {
                continue;
            }
            s.have = 0;
            let rec = s.buf;
            let dest = self.rng.below(self.socks.len() as u64) as usize;
            if sys::write(self.socks[dest].fd, &rec).map_or(true, |w| w != RECORD) {
                self.short_writes += 1;
            }
            self.relayed += 1;
        }
    }

    /// The bare send loop: one 40-byte record to every accepted socket.
    /// Returns (start, end) of the loop in monotonic ns.
    pub fn fanout(&mut self, round: u32) -> (u64, u64) {
        let mut rec = [0u8; RECORD];
        rec[0] = b'F';
        rec[4..8].copy_from_slice(&round.to_le_bytes());
        let t0 = sys::now_ns();
        for s in &self.socks {
            if sys::write(s.fd, &rec).map_or(true, |w| w != RECORD) {
                self.short_writes += 1;
            }
        }
        (t0, sys::now_ns())
    }

    pub fn accepted(&self) -> usize {
        self.socks.len()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        for s in &self.socks {
            sys::close(s.fd);
        }
        sys::close(self.listen_fd);
    }
}

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
