//! Calibration, worker side: N bare TCP client sockets that connect and
//! exchange a hello with the coordinator's sink, wait for fanout records,
//! and send timestamped records through its relay.

use super::{HELLO, RECORD};
use crate::proto::{Event, Phase};
use crate::report::{hist_counts, new_hist, record};
use crate::sys::{self, Epoll, EV_ERR, EV_ET, EV_IN, EV_OUT, EV_RDHUP};
use crate::worker::{emit, CALIB_BASE};
use hdrhistogram::Histogram;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

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
    /// The round (one-thread relay, two-thread relay) records are tagged
    /// with; records of an earlier round are not counted.
    ow_round: u32,
    /// Records of this round that arrived through the relay, and their
    /// latency.
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
            ow_round: 0,
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
                rec[4..8].copy_from_slice(&self.ow_round.to_le_bytes());
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
            b'O' if word == self.ow_round => {
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

    pub fn start_oneway(&mut self, start_ns: u64, rate: f64, count: u64, round: u32) {
        self.ow_round = round;
        self.ow_start = start_ns;
        self.ow_interval = 1e9 / rate.max(1e-3);
        self.ow_count = count;
        self.ow_sent = 0;
    }

    /// The one-way round's counts; the next round starts from zero.
    pub fn report(&mut self) -> Event {
        let ev = Event::CalibReport {
            sent: self.ow_sent,
            received: self.ow_received,
            hist: hist_counts(&self.ow_hist),
        };
        self.ow_received = 0;
        self.ow_hist.reset();
        ev
    }

    pub fn close_all(&mut self) {
        for s in &mut self.socks {
            sys::close(s.fd);
            s.fd = -1;
        }
    }
}
