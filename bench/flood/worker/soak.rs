//! The churn soak in a worker (`--soak-conns`): short connections, one
//! connect and one disconnect each, as fast as `slots` and `inflight`
//! allow, beside the worker's steady connections (which carry targeted
//! traffic meanwhile). Each cycle is one of four kinds:
//!
//! * clean: connect, upgrade, log in, close frame; done when the server's
//!   close frame comes back (the socket is then closed);
//! * abrupt: connect, upgrade, log in, then a reset (SO_LINGER 0, close):
//!   a client killed or crashed;
//! * unlogged: connect, upgrade, then nothing: the server must close it
//!   with 1008 `login timeout`; the socket is closed once it has;
//! * silent: connect, upgrade, log in, then nothing, pings unanswered: the
//!   server must close it with 1001 `idle timeout`; the socket is kept
//!   `linger_ns` longer (no FIN from us), so the server must also drop it
//!   on its own, after its close timeout, as it would a client that
//!   vanished from the network.
//!
//! Soak connections log in as `<prefix>c<worker>-<cycle>`: every cycle a
//! new uid, so a million uids pass through the server's tables. Nothing is
//! sent to them; a data message is counted `unexpected`.

use super::{emit, Worker};
use crate::proto::{Event, Phase, SoakCounts, SoakPlan, SoakReport};
use crate::report::{hist_counts, new_hist, record};
use crate::schedule::{mix, Rng};
use crate::sys::{self, Epoll, EV_ERR, EV_ET, EV_IN, EV_OUT, EV_RDHUP};
use crate::ws;
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

/// epoll tokens at or above this are soak slots (token - SOAK_BASE).
pub const SOAK_BASE: u64 = 1 << 41;

/// How long a clean close may wait for the server's close frame.
const CLEAN_CLOSE_TIMEOUT_NS: u64 = 10_000_000_000;

/// How a cycle ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Clean,
    Abrupt,
    Unlogged,
    Silent,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Clean, Kind::Abrupt, Kind::Unlogged, Kind::Silent];

    /// The kind of cycle `k` of worker `w`: drawn from the seed with the
    /// weights `mix` (clean, abrupt, unlogged, silent).
    pub fn of(seed: u64, w: usize, k: u64, mix_weights: &[u32; 4]) -> Kind {
        let total: u64 = mix_weights.iter().map(|&x| u64::from(x)).sum();
        if total == 0 {
            return Kind::Clean;
        }
        let mut r = mix(seed ^ ((w as u64) << 48) ^ k.wrapping_mul(0x9E37_79B9)) % total;
        for (kind, &weight) in Kind::ALL.iter().zip(mix_weights) {
            if r < u64::from(weight) {
                return *kind;
            }
            r -= u64::from(weight);
        }
        Kind::Clean
    }
}

/// Where a soak connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Free,
    Connecting,
    Upgrading,
    LoggingIn,
    /// Clean: our close frame is out.
    Closing,
    /// Half-open: silent, waiting for the server to close it.
    Waiting,
    /// Silent, closed by the server: holding the socket a while.
    Lingering,
}

/// One soak connection.
struct Slot {
    fd: i32,
    st: St,
    kind: Kind,
    /// Its cycle number (and uid).
    cycle: u64,
    /// When the attempt started (connect latency, timeout, nonce).
    started_ns: u64,
    /// When it went silent, or sent its close frame.
    since_ns: u64,
    /// Bytes of an incomplete response or frame.
    inbuf: Vec<u8>,
    /// A silent one was pinged.
    pinged: bool,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            fd: -1,
            st: St::Free,
            kind: Kind::Clean,
            cycle: 0,
            started_ns: 0,
            since_ns: 0,
            inbuf: Vec::new(),
            pinged: false,
        }
    }
}

/// How a cycle ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Clean,
    Abrupt,
    UnloggedReaped,
    SilentReaped,
    CleanUnclean,
    CleanTimeout,
    ReapedOther,
    NotReaped,
    FailConnect,
    FailUpgrade,
    FailLogin,
    FailTimeout,
    Unexpected,
    Abandoned,
}

pub struct Soak {
    plan: SoakPlan,
    /// Worker number (in uids and the kind draw).
    index: usize,
    targets: Vec<SocketAddrV4>,
    hosts: Vec<String>,
    sources: Vec<Ipv4Addr>,
    prefix: String,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Attempts still connecting, upgrading or logging in.
    attempts: u32,
    /// Silent slots closed by the server, in the order their linger ends.
    linger: VecDeque<(u64, u32)>,
    counts: SoakCounts,
    t0: u64,
    last_ns: u64,
    connect_hist: Histogram<u64>,
    reap_unlogged_hist: Histogram<u64>,
    reap_silent_hist: Histogram<u64>,
    close_hist: Histogram<u64>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    rng: Rng,
    last_scan: u64,
    reported: bool,
    logged: u32,
}

/// The Sec-WebSocket-Key nonce of a cycle's attempt.
fn nonce(w: usize, cycle: u64, started_ns: u64) -> [u8; 16] {
    let a = mix(cycle ^ ((w as u64) << 52) ^ started_ns.rotate_left(29));
    let b = mix(a ^ started_ns);
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&a.to_le_bytes());
    n[8..].copy_from_slice(&b.to_le_bytes());
    n
}

impl Soak {
    pub fn new(
        plan: SoakPlan,
        index: usize,
        targets: Vec<SocketAddrV4>,
        sources: Vec<Ipv4Addr>,
        prefix: String,
        now: u64,
    ) -> Soak {
        let n = plan.slots.max(1);
        Soak {
            index,
            hosts: targets.iter().map(|t| t.to_string()).collect(),
            targets,
            sources,
            prefix,
            slots: (0..n).map(|_| Slot::new()).collect(),
            free: (0..n).rev().collect(),
            attempts: 0,
            linger: VecDeque::new(),
            counts: SoakCounts::default(),
            t0: now,
            last_ns: now,
            connect_hist: new_hist(),
            reap_unlogged_hist: new_hist(),
            reap_silent_hist: new_hist(),
            close_hist: new_hist(),
            rbuf: vec![0; 16 * 1024],
            wbuf: Vec::with_capacity(512),
            rng: Rng::new(mix(plan.seed ^ (index as u64 + 7) ^ now)),
            last_scan: now,
            reported: false,
            logged: 0,
            plan,
        }
    }

    pub fn active(&self) -> bool {
        !self.reported
    }

    /// (phase, cycles done, failures) for a progress event.
    pub fn progress(&self) -> (Phase, u64, u64) {
        (Phase::Soak, self.counts.done, self.counts.failures())
    }

    /// When the next linger ends (the loop must wake for it).
    pub fn next_due(&self) -> Option<u64> {
        self.linger.front().map(|&(at, _)| at)
    }

    fn log(&mut self, msg: String) {
        if self.logged < 20 {
            self.logged += 1;
            eprintln!("flood worker {} soak: {msg}", self.index);
        }
    }

    fn uid(&self, cycle: u64) -> String {
        format!("{}c{}-{}", self.prefix, self.index, cycle)
    }

    /// Starts as many cycles as slots and attempts in flight allow.
    fn start_some(&mut self, ep: &Epoll, now: u64) {
        while self.counts.started < self.plan.cycles && self.attempts < self.plan.inflight.max(1) {
            let Some(i) = self.free.pop() else { break };
            let k = self.counts.started;
            self.counts.started += 1;
            let kind = Kind::of(self.plan.seed, self.index, k, &self.plan.mix);
            let spread = (k as usize).wrapping_add(self.index * 7919);
            let target = self.targets[spread % self.targets.len()];
            let source =
                (!self.sources.is_empty()).then(|| self.sources[spread % self.sources.len()]);
            let slot = &mut self.slots[i as usize];
            *slot = Slot {
                st: St::Connecting,
                kind,
                cycle: k,
                started_ns: now,
                since_ns: now,
                ..Slot::new()
            };
            self.attempts += 1;
            match sys::connect_nb(target, source) {
                Ok(fd) => {
                    self.slots[i as usize].fd = fd;
                    let token = SOAK_BASE + u64::from(i);
                    if let Err(e) = ep.add(fd, token, EV_IN | EV_OUT | EV_RDHUP | EV_ET) {
                        self.log(format!("epoll add: {e}"));
                        self.end(i, End::FailConnect, now);
                    }
                }
                Err(e) => {
                    self.log(format!("connect to {target} from {source:?}: {e}"));
                    self.end(i, End::FailConnect, now);
                }
            }
        }
    }

    /// Ends slot `i`'s cycle: closes its socket (a reset for an abrupt
    /// one), counts how it ended and frees the slot.
    fn end(&mut self, i: u32, how: End, now: u64) {
        let slot = &mut self.slots[i as usize];
        if matches!(slot.st, St::Connecting | St::Upgrading | St::LoggingIn) {
            self.attempts = self.attempts.saturating_sub(1);
        }
        if how == End::Abrupt {
            sys::close_reset(slot.fd);
        } else {
            sys::close(slot.fd);
        }
        let silent_pinged = slot.kind == Kind::Silent && slot.pinged;
        *slot = Slot::new();
        self.free.push(i);
        let c = &mut self.counts;
        c.done += 1;
        match how {
            End::Clean => c.clean += 1,
            End::Abrupt => c.abrupt += 1,
            End::UnloggedReaped => c.unlogged_reaped += 1,
            End::SilentReaped => c.silent_reaped += 1,
            End::CleanUnclean => c.clean_unclean += 1,
            End::CleanTimeout => c.clean_timeout += 1,
            End::ReapedOther => c.reaped_other += 1,
            End::NotReaped => c.not_reaped += 1,
            End::FailConnect => c.fail_connect += 1,
            End::FailUpgrade => c.fail_upgrade += 1,
            End::FailLogin => c.fail_login += 1,
            End::FailTimeout => c.fail_timeout += 1,
            End::Unexpected => c.unexpected += 1,
            End::Abandoned => c.abandoned += 1,
        }
        if silent_pinged && how == End::SilentReaped {
            c.silent_pinged += 1;
        }
        self.last_ns = now;
    }

    /// Writes a whole small message (upgrade, login, close frame) or fails.
    fn write_all(fd: i32, data: &[u8]) -> bool {
        matches!(sys::write(fd, data), Ok(n) if n == data.len())
    }

    /// Sends one masked frame on slot `i`.
    fn send_frame(&mut self, i: u32, opcode: u8, payload: &[u8]) -> bool {
        let mask = (self.rng.next_u64() as u32).to_le_bytes();
        self.wbuf.clear();
        ws::encode_frame(&mut self.wbuf, opcode, payload, mask);
        Self::write_all(self.slots[i as usize].fd, &self.wbuf)
    }

    /// Readiness of slot `i`.
    pub fn on_event(&mut self, i: usize, events: u32) {
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        if slot.fd < 0 {
            return;
        }
        let i = i as u32;
        let now = sys::now_ns();
        if slot.st == St::Connecting {
            if events & (EV_OUT | EV_ERR) == 0 {
                return;
            }
            let err = sys::socket_error(slot.fd);
            if err != 0 {
                let msg = format!("connect: {}", io::Error::from_raw_os_error(err));
                self.log(msg);
                self.end(i, End::FailConnect, now);
                return;
            }
            let slot = &self.slots[i as usize];
            let key = ws::key_for(nonce(self.index, slot.cycle, slot.started_ns));
            let target = self.hosts
                [(slot.cycle as usize).wrapping_add(self.index * 7919) % self.hosts.len()]
            .clone();
            self.wbuf.clear();
            ws::upgrade_request(&mut self.wbuf, &target, &key);
            if !Self::write_all(slot.fd, &self.wbuf) {
                self.end(i, End::FailConnect, now);
                return;
            }
            self.slots[i as usize].st = St::Upgrading;
        }
        if events & (EV_IN | EV_RDHUP | EV_ERR) != 0 {
            self.on_readable(i, now);
        }
    }

    fn on_readable(&mut self, i: u32, now: u64) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        loop {
            let slot = &self.slots[i as usize];
            if slot.fd < 0 || slot.st == St::Free {
                break;
            }
            match sys::read(slot.fd, &mut rbuf) {
                Ok(0) => {
                    self.on_eof(i, now);
                    break;
                }
                Ok(n) => {
                    let mut data = std::mem::take(&mut self.slots[i as usize].inbuf);
                    data.extend_from_slice(&rbuf[..n]);
                    let used = self.consume(i, &mut data, now);
                    let slot = &mut self.slots[i as usize];
                    if slot.st != St::Free && used < data.len() {
                        data.drain(..used);
                        slot.inbuf = data;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.on_eof(i, now);
                    break;
                }
            }
        }
        self.rbuf = rbuf;
    }

    /// The server closed (FIN or reset) slot `i`'s connection.
    fn on_eof(&mut self, i: u32, now: u64) {
        let slot = &self.slots[i as usize];
        let how = match slot.st {
            St::Connecting => End::FailConnect,
            St::Upgrading => End::FailUpgrade,
            St::LoggingIn => End::FailLogin,
            St::Closing => End::CleanUnclean,
            // Closed without its close frame first.
            St::Waiting => End::ReapedOther,
            // Already counted as closed by the server; keep lingering.
            St::Lingering | St::Free => return,
        };
        self.end(i, how, now);
    }

    /// Parses what arrived on slot `i`; returns the bytes used.
    fn consume(&mut self, i: u32, data: &mut [u8], now: u64) -> usize {
        let mut pos = 0;
        if self.slots[i as usize].st == St::Upgrading {
            let slot = &self.slots[i as usize];
            let key = ws::key_for(nonce(self.index, slot.cycle, slot.started_ns));
            match ws::parse_upgrade(data, &key) {
                ws::Upgrade::Incomplete => return 0,
                ws::Upgrade::Rejected => {
                    let head = String::from_utf8_lossy(&data[..data.len().min(120)]).to_string();
                    self.log(format!("upgrade rejected: {head:?}"));
                    self.end(i, End::FailUpgrade, now);
                    return data.len();
                }
                ws::Upgrade::Done { consumed } => {
                    pos = consumed;
                    let slot = &mut self.slots[i as usize];
                    if slot.kind == Kind::Unlogged {
                        record(&mut self.connect_hist, now - slot.started_ns);
                        slot.st = St::Waiting;
                        slot.since_ns = now;
                        self.attempts = self.attempts.saturating_sub(1);
                    } else {
                        slot.st = St::LoggingIn;
                        let cycle = slot.cycle;
                        let uid = self.uid(cycle);
                        if !self.send_frame(i, ws::OP_TEXT, uid.as_bytes()) {
                            self.end(i, End::FailLogin, now);
                            return data.len();
                        }
                    }
                }
            }
        }
        while self.slots[i as usize].st != St::Free {
            match ws::parse_frame(&data[pos..]) {
                ws::Parse::Incomplete => break,
                ws::Parse::Invalid => {
                    self.log("invalid frame from server".to_string());
                    let how = match self.slots[i as usize].st {
                        St::LoggingIn => End::FailLogin,
                        _ => End::Unexpected,
                    };
                    self.end(i, how, now);
                    return data.len();
                }
                ws::Parse::Frame(h) => {
                    let start = pos + h.header_len;
                    let end = start + h.payload_len;
                    if let Some(m) = h.mask {
                        ws::unmask(&mut data[start..end], m);
                    }
                    pos = end;
                    self.on_frame(i, h.opcode, &data[start..end], now);
                }
            }
        }
        pos
    }

    fn on_frame(&mut self, i: u32, opcode: u8, payload: &[u8], now: u64) {
        let st = self.slots[i as usize].st;
        match opcode {
            ws::OP_PING => {
                if matches!(st, St::Waiting | St::Lingering) {
                    // Silent: never answered.
                    self.slots[i as usize].pinged = true;
                } else if st != St::Closing {
                    let p = payload.to_vec();
                    self.send_frame(i, ws::OP_PONG, &p);
                }
            }
            ws::OP_PONG => {}
            ws::OP_CLOSE => self.on_close_frame(i, payload, now),
            ws::OP_TEXT | ws::OP_BINARY if st == St::LoggingIn => {
                let slot = &self.slots[i as usize];
                let expected = format!("login success, your uid is {}", self.uid(slot.cycle));
                if payload != expected.as_bytes() {
                    let got =
                        String::from_utf8_lossy(&payload[..payload.len().min(100)]).to_string();
                    self.log(format!("login: unexpected reply {got:?}"));
                    self.end(i, End::FailLogin, now);
                    return;
                }
                self.attempts = self.attempts.saturating_sub(1);
                let slot = &mut self.slots[i as usize];
                record(&mut self.connect_hist, now - slot.started_ns);
                slot.since_ns = now;
                match slot.kind {
                    Kind::Clean => {
                        slot.st = St::Closing;
                        let p = ws::close_payload(1000, b"soak");
                        if !self.send_frame(i, ws::OP_CLOSE, &p) {
                            self.end(i, End::CleanUnclean, now);
                        }
                    }
                    Kind::Abrupt => {
                        // Counted out of attempts above; `end` must not
                        // count it again.
                        slot.st = St::Waiting;
                        self.end(i, End::Abrupt, now);
                    }
                    Kind::Silent | Kind::Unlogged => slot.st = St::Waiting,
                }
            }
            _ => {
                if st != St::Lingering {
                    let got =
                        String::from_utf8_lossy(&payload[..payload.len().min(100)]).to_string();
                    self.log(format!("unexpected message {got:?}"));
                    self.end(i, End::Unexpected, now);
                }
            }
        }
    }

    /// The server's close frame on slot `i`.
    fn on_close_frame(&mut self, i: u32, payload: &[u8], now: u64) {
        let slot = &self.slots[i as usize];
        let code = if payload.len() >= 2 {
            u16::from_be_bytes([payload[0], payload[1]])
        } else {
            1005
        };
        let reason = payload.get(2..).unwrap_or(&[]);
        match slot.st {
            St::Closing => {
                record(&mut self.close_hist, now - slot.since_ns);
                self.end(i, End::Clean, now);
            }
            St::Waiting => {
                let (want_code, want_reason, hist) = match slot.kind {
                    Kind::Unlogged => (1008, &b"login timeout"[..], &mut self.reap_unlogged_hist),
                    _ => (1001, &b"idle timeout"[..], &mut self.reap_silent_hist),
                };
                if code != want_code || reason != want_reason {
                    let r = String::from_utf8_lossy(reason).to_string();
                    self.log(format!("{:?} closed with {code} {r:?}", slot.kind));
                    self.end(i, End::ReapedOther, now);
                    return;
                }
                record(hist, now - slot.since_ns);
                if slot.kind == Kind::Unlogged {
                    self.end(i, End::UnloggedReaped, now);
                } else {
                    // Counted now; the socket stays open a while longer.
                    let slot = &mut self.slots[i as usize];
                    slot.st = St::Lingering;
                    self.linger.push_back((now + self.plan.linger_ns, i));
                }
            }
            St::Lingering | St::Free => {}
            St::Connecting | St::Upgrading | St::LoggingIn => {
                let r = String::from_utf8_lossy(reason).to_string();
                self.log(format!("closed while logging in: {code} {r:?}"));
                self.end(i, End::FailLogin, now);
            }
        }
    }

    /// Timeouts, lingers and new cycles; the report once every cycle ended.
    pub fn tick(&mut self, ep: &Epoll, now: u64) -> Option<SoakReport> {
        if self.reported {
            return None;
        }
        while let Some(&(at, i)) = self.linger.front() {
            if at > now {
                break;
            }
            self.linger.pop_front();
            if self.slots[i as usize].st == St::Lingering {
                self.end(i, End::SilentReaped, now);
            }
        }
        if now.saturating_sub(self.last_scan) >= 100_000_000 {
            self.last_scan = now;
            for i in 0..self.slots.len() as u32 {
                let s = &self.slots[i as usize];
                let how = match s.st {
                    St::Connecting | St::Upgrading | St::LoggingIn
                        if now - s.started_ns > self.plan.connect_timeout_ns =>
                    {
                        End::FailTimeout
                    }
                    St::Waiting if now - s.since_ns > self.plan.reap_timeout_ns => End::NotReaped,
                    St::Closing if now - s.since_ns > CLEAN_CLOSE_TIMEOUT_NS => End::CleanTimeout,
                    _ => continue,
                };
                self.end(i, how, now);
            }
        }
        self.start_some(ep, now);
        if self.counts.done >= self.plan.cycles {
            return Some(self.report());
        }
        None
    }

    /// Stops: everything still open is closed, and with what never started
    /// counted abandoned.
    pub fn stop(&mut self, now: u64) -> SoakReport {
        for i in 0..self.slots.len() as u32 {
            if self.slots[i as usize].st != St::Free {
                self.end(i, End::Abandoned, now);
            }
        }
        let never = self.plan.cycles.saturating_sub(self.counts.started);
        self.counts.abandoned += never;
        self.counts.started += never;
        self.counts.done += never;
        self.report()
    }

    fn report(&mut self) -> SoakReport {
        self.reported = true;
        SoakReport {
            counts: self.counts,
            t0: self.t0,
            last_ns: self.last_ns,
            connect_hist: hist_counts(&self.connect_hist),
            reap_unlogged_hist: hist_counts(&self.reap_unlogged_hist),
            reap_silent_hist: hist_counts(&self.reap_silent_hist),
            close_hist: hist_counts(&self.close_hist),
        }
    }
}

impl Worker {
    pub(super) fn start_soak(&mut self, plan: SoakPlan) {
        let soak = Soak::new(
            plan,
            self.index,
            self.client.targets().to_vec(),
            self.client.sources().to_vec(),
            self.client.uid_prefix().to_string(),
            sys::now_ns(),
        );
        self.soak = Some(soak);
    }

    pub(super) fn tick_soak(&mut self, now: u64) {
        let Some(s) = self.soak.as_mut() else { return };
        if let Some(report) = s.tick(self.client.ep(), now) {
            emit(Event::SoakDone(Box::new(report)));
        }
    }

    pub(super) fn stop_soak(&mut self) {
        let report = match self.soak.as_mut() {
            Some(s) if s.active() => s.stop(sys::now_ns()),
            _ => SoakReport::default(),
        };
        emit(Event::SoakDone(Box::new(report)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_weights() {
        let mut n = [0u32; 4];
        for k in 0..40_000 {
            let kind = Kind::of(1, 0, k, &[1, 1, 1, 1]);
            n[Kind::ALL.iter().position(|&x| x == kind).unwrap()] += 1;
        }
        assert!(n.iter().all(|&c| (9_000..11_000).contains(&c)), "{n:?}");
        // A weight of 0 never comes up; the draw is the same every time.
        for k in 0..1000 {
            let kind = Kind::of(3, 1, k, &[2, 0, 1, 0]);
            assert!(matches!(kind, Kind::Clean | Kind::Unlogged));
            assert_eq!(kind, Kind::of(3, 1, k, &[2, 0, 1, 0]));
        }
        assert!((0..100).all(|k| Kind::of(1, 0, k, &[0, 0, 0, 5]) == Kind::Silent));
    }
}
