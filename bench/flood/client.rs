//! The WebSocket client state machine of a worker's connections: TCP
//! connect, upgrade, login, frames in and out (Ping answered, fragments
//! reassembled, close handshake), failures and their counters.
//!
//! It knows nothing of the phases. It tells an `Observer` what happened to
//! a connection (logged in, attempt failed, closed, a message arrived) and
//! the worker's phase code decides what that means. The life of one
//! connection (`conn::State`):
//!
//! ```text
//! Idle -> Connecting -> Upgrading -> LoggingIn -> Ready -> Closing -> Closed
//!            (any step may end in Failed; a churned connection goes from
//!             Closing back to Connecting)
//! ```

use crate::conn::{Conn, State};
use crate::proto::ErrorCounts;
use crate::schedule::{mix, Rng};
use crate::sys::{self, Epoll, EV_ERR, EV_ET, EV_IN, EV_OUT, EV_RDHUP};
use crate::ws;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

/// What a logged-in connection's message turned out to be, for the
/// client's error counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A flood payload the running phase counted.
    Counted,
    /// A targeted payload when no targeted run is active (late).
    Stray,
    /// Not a flood payload at all (e.g. an `error: ...` reply).
    Unexpected,
}

/// What the client tells the phases. Every call is about one connection.
pub trait Observer {
    /// Connection `li` logged in, `latency_ns` after its attempt started;
    /// `reconnect` when it is a churned connection coming back.
    fn logged_in(&mut self, li: usize, reconnect: bool, latency_ns: u64, now: u64);
    /// A connect, upgrade or login attempt failed.
    fn attempt_failed(&mut self, reconnect: bool);
    /// A connection we were closing for good is closed: `clean` when the
    /// server answered our close frame with its own; `since_ns` is when we
    /// sent ours.
    fn closed(&mut self, clean: bool, since_ns: u64, now: u64);
    /// A text or binary message arrived at logged-in connection `li`
    /// (global index `g`).
    fn message(&mut self, li: usize, g: u32, payload: &[u8], now: u64) -> Delivery;
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

/// A worker's connections, global indices base..base+len.
pub struct Client {
    /// Worker number, for diagnostics.
    index: usize,
    /// Global index of local connection 0: uid of local i is prefix+(base+i).
    base: u32,
    conns: Vec<Conn>,
    /// The worker's poller; connection li is registered with token li.
    ep: Epoll,
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
    /// Error counters that span phases.
    counters: ErrorCounts,
    /// Diagnostic lines printed to stderr so far (bounded).
    logged: u32,
}

/// The 16-byte Sec-WebSocket-Key nonce of connection `g`'s attempt that
/// started at `started_ns` (derived, so it need not be stored).
fn nonce(g: u32, started_ns: u64) -> [u8; 16] {
    let a = mix(u64::from(g) ^ started_ns.rotate_left(32));
    let b = mix(a ^ started_ns);
    let mut n = [0u8; 16];
    n[..8].copy_from_slice(&a.to_le_bytes());
    n[8..].copy_from_slice(&b.to_le_bytes());
    n
}

impl Client {
    /// No connections yet (see `init`); `ep` is the worker's poller.
    pub fn new(index: usize, ep: Epoll, uid_prefix: String, seed: u64) -> Client {
        Client {
            index,
            base: 0,
            conns: Vec::new(),
            ep,
            targets: Vec::new(),
            hosts: Vec::new(),
            sources: Vec::new(),
            uid_prefix,
            rbuf: vec![0; 64 * 1024],
            wbuf: Vec::with_capacity(4096),
            rng: Rng::new(mix(seed ^ (index as u64 + 1) ^ sys::now_ns())),
            counters: ErrorCounts::default(),
            logged: 0,
        }
    }

    /// Sets up `count` idle connections from global index `base` on.
    pub fn init(
        &mut self,
        base: u32,
        count: u32,
        targets: Vec<SocketAddrV4>,
        sources: Vec<Ipv4Addr>,
    ) {
        self.base = base;
        self.conns = (0..count).map(|_| Conn::new()).collect();
        self.hosts = targets.iter().map(|t| t.to_string()).collect();
        self.targets = targets;
        self.sources = sources;
    }

    pub fn ep(&self) -> &Epoll {
        &self.ep
    }

    pub fn ep_mut(&mut self) -> &mut Epoll {
        &mut self.ep
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn base(&self) -> u32 {
        self.base
    }

    /// Whether global connection `g` is one of ours.
    pub fn owns(&self, g: u32) -> bool {
        g >= self.base && g - self.base < self.conns.len() as u32
    }

    /// The local index of our global connection `g`.
    pub fn local(&self, g: u32) -> Option<usize> {
        self.owns(g).then(|| (g - self.base) as usize)
    }

    /// The servers connections go to.
    pub fn targets(&self) -> &[SocketAddrV4] {
        &self.targets
    }

    /// The source addresses connections bind (empty: the kernel chooses).
    pub fn sources(&self) -> &[Ipv4Addr] {
        &self.sources
    }

    pub fn uid_prefix(&self) -> &str {
        &self.uid_prefix
    }

    pub fn is_ready(&self, li: usize) -> bool {
        self.conns[li].state == State::Ready
    }

    /// Logged-in connections.
    pub fn ready_count(&self) -> u64 {
        self.conns
            .iter()
            .filter(|c| c.state == State::Ready)
            .count() as u64
    }

    pub fn counters(&self) -> &ErrorCounts {
        &self.counters
    }

    /// Prints a diagnostic line to stderr, at most 20 per worker.
    fn log(&mut self, msg: String) {
        if self.logged < 20 {
            self.logged += 1;
            eprintln!("flood worker {}: {msg}", self.index);
        }
    }

    /// Starts (or restarts, for churn) the TCP connect of connection li.
    pub fn start_connect(&mut self, li: usize, now: u64, obs: &mut impl Observer) {
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
                    self.fail(li, Fail::Connect, obs);
                }
            }
            Err(e) => {
                self.log(format!("connect to {target} from {source:?}: {e}"));
                self.fail(li, Fail::Connect, obs);
            }
        }
    }

    /// Fails every connect/upgrade/login attempt older than `timeout_ns`.
    pub fn fail_late_attempts(&mut self, now: u64, timeout_ns: u64, obs: &mut impl Observer) {
        let late: Vec<usize> = (0..self.conns.len())
            .filter(|&li| {
                let c = &self.conns[li];
                matches!(
                    c.state,
                    State::Connecting | State::Upgrading | State::LoggingIn
                ) && now.saturating_sub(c.started_ns) > timeout_ns
            })
            .collect();
        for li in late {
            self.fail(li, Fail::Timeout, obs);
        }
    }

    /// Sends a text message on connection li; false if the connection
    /// broke on it.
    pub fn send_text(&mut self, li: usize, payload: &[u8], obs: &mut impl Observer) -> bool {
        self.send_frame(li, ws::OP_TEXT, payload, obs)
    }

    /// Starts the close handshake of a logged-in connection li (our close
    /// frame with `reason`). With `reconnect` it connects and logs in again
    /// once closed (churn); without, `Observer::closed` reports the end.
    /// False if li was not logged in.
    pub fn begin_close(
        &mut self,
        li: usize,
        reason: &[u8],
        reconnect: bool,
        now: u64,
        obs: &mut impl Observer,
    ) -> bool {
        let conn = &mut self.conns[li];
        if conn.state != State::Ready {
            return false;
        }
        conn.state = State::Closing;
        conn.reconnect = reconnect;
        conn.started_ns = now;
        let p = ws::close_payload(1000, reason);
        self.send_frame(li, ws::OP_CLOSE, &p, obs);
        true
    }

    /// Gives up on every connection still waiting for the server's close
    /// frame (drops its socket); returns how many there were.
    pub fn abandon_closing(&mut self) -> u64 {
        let mut late = 0;
        for c in self.conns.iter_mut() {
            if c.state == State::Closing {
                c.close_socket();
                c.state = State::Closed;
                late += 1;
            }
        }
        late
    }

    /// Ends connection li as failed, with the bookkeeping of its phase.
    fn fail(&mut self, li: usize, why: Fail, obs: &mut impl Observer) {
        let conn = &mut self.conns[li];
        let was = conn.state;
        conn.close_socket();
        conn.state = State::Failed;
        conn.reconnect = false;
        let attempt = matches!(was, State::Connecting | State::Upgrading | State::LoggingIn);
        let reconnect = std::mem::take(&mut conn.is_reconnect);
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
            obs.attempt_failed(reconnect);
        }
        if was == State::Closing {
            obs.closed(false, conn.started_ns, sys::now_ns());
        }
    }

    /// Readiness of connection li from epoll.
    pub fn on_event(&mut self, li: usize, events: u32, obs: &mut impl Observer) {
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
                self.fail(li, Fail::Connect, obs);
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
                self.fail(li, Fail::Connect, obs);
                return;
            }
        }
        if events & EV_OUT != 0
            && !self.conns[li].outbuf.is_empty()
            && self.conns[li].flush().is_err()
        {
            self.on_eof(li, obs);
            return;
        }
        if events & (EV_IN | EV_RDHUP | EV_ERR) != 0 {
            self.on_readable(li, events & (EV_RDHUP | EV_ERR) != 0, obs);
        }
    }

    fn on_readable(&mut self, li: usize, hangup: bool, obs: &mut impl Observer) {
        loop {
            let fd = self.conns[li].fd;
            if fd < 0 {
                return;
            }
            match sys::read(fd, &mut self.rbuf) {
                Ok(0) => {
                    self.on_eof(li, obs);
                    return;
                }
                Ok(n) => {
                    self.on_bytes(li, n, obs);
                    // A short read drained the socket: a new arrival makes
                    // a new edge. After a hangup, read on to see the EOF.
                    if n < self.rbuf.len() && !hangup {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.on_eof(li, obs);
                    return;
                }
            }
        }
    }

    /// The peer closed or reset the socket.
    fn on_eof(&mut self, li: usize, obs: &mut impl Observer) {
        match self.conns[li].state {
            State::Closing => self.finish_close(li, false, obs),
            State::Connecting => self.fail(li, Fail::Connect, obs),
            State::Upgrading => self.fail(li, Fail::Upgrade, obs),
            State::LoggingIn => self.fail(li, Fail::Login, obs),
            State::Ready => {
                self.log(format!(
                    "connection {} dropped by server",
                    self.base as usize + li
                ));
                self.fail(li, Fail::Dropped, obs)
            }
            _ => self.conns[li].close_socket(),
        }
    }

    /// Feeds `n` new bytes from rbuf to connection li.
    fn on_bytes(&mut self, li: usize, n: usize, obs: &mut impl Observer) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut pending = std::mem::take(&mut self.conns[li].inbuf);
        if pending.is_empty() {
            let used = self.consume(li, &mut rbuf[..n], obs);
            if used < n && self.conns[li].fd >= 0 {
                self.conns[li].inbuf = rbuf[used..n].to_vec();
            }
        } else {
            pending.extend_from_slice(&rbuf[..n]);
            let used = self.consume(li, &mut pending, obs);
            if self.conns[li].fd >= 0 && used < pending.len() {
                pending.drain(..used);
                self.conns[li].inbuf = pending;
            }
        }
        self.rbuf = rbuf;
    }

    /// Parses the upgrade response and frames in `data`; returns how many
    /// bytes were used (the rest is an incomplete frame).
    fn consume(&mut self, li: usize, data: &mut [u8], obs: &mut impl Observer) -> usize {
        let mut pos = 0;
        if self.conns[li].state == State::Upgrading {
            let g = self.base + li as u32;
            let key = ws::key_for(nonce(g, self.conns[li].started_ns));
            match ws::parse_upgrade(data, &key) {
                ws::Upgrade::Incomplete => return 0,
                ws::Upgrade::Rejected => {
                    let head = String::from_utf8_lossy(&data[..data.len().min(120)]).to_string();
                    self.log(format!("upgrade rejected: {head:?}"));
                    self.fail(li, Fail::Upgrade, obs);
                    return data.len();
                }
                ws::Upgrade::Done { consumed } => {
                    pos = consumed;
                    self.conns[li].state = State::LoggingIn;
                    let uid = format!("{}{}", self.uid_prefix, g);
                    self.send_frame(li, ws::OP_TEXT, uid.as_bytes(), obs);
                }
            }
        }
        while self.conns[li].fd >= 0 {
            match ws::parse_frame(&data[pos..]) {
                ws::Parse::Incomplete => break,
                ws::Parse::Invalid => {
                    self.log("invalid frame from server".to_string());
                    self.fail(li, Fail::Protocol, obs);
                    return data.len();
                }
                ws::Parse::Frame(h) => {
                    let start = pos + h.header_len;
                    let end = start + h.payload_len;
                    if let Some(m) = h.mask {
                        ws::unmask(&mut data[start..end], m);
                    }
                    pos = end;
                    self.on_frame(li, h.fin, h.opcode, &data[start..end], obs);
                }
            }
        }
        pos
    }

    /// Encodes and sends one masked frame on connection li.
    fn send_frame(
        &mut self,
        li: usize,
        opcode: u8,
        payload: &[u8],
        obs: &mut impl Observer,
    ) -> bool {
        let mask = (self.rng.next_u64() as u32).to_le_bytes();
        self.wbuf.clear();
        ws::encode_frame(&mut self.wbuf, opcode, payload, mask);
        if self.conns[li].send(&self.wbuf).is_err() {
            self.on_eof(li, obs);
            return false;
        }
        true
    }

    fn on_frame(
        &mut self,
        li: usize,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        obs: &mut impl Observer,
    ) {
        match opcode {
            ws::OP_PING => {
                self.counters.pings += 1;
                self.send_frame(li, ws::OP_PONG, payload, obs);
            }
            ws::OP_PONG => {}
            ws::OP_CLOSE => {
                if self.conns[li].state == State::Closing {
                    self.finish_close(li, true, obs);
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
                    self.send_frame(li, ws::OP_CLOSE, &echo, obs);
                    let why = if self.conns[li].state == State::LoggingIn {
                        Fail::Login
                    } else {
                        Fail::Dropped
                    };
                    if self.conns[li].fd >= 0 {
                        self.fail(li, why, obs);
                    }
                }
            }
            ws::OP_TEXT | ws::OP_BINARY => {
                if fin {
                    self.on_message(li, payload, obs);
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
                    self.on_message(li, &whole, obs);
                }
            }
        }
    }

    fn on_message(&mut self, li: usize, payload: &[u8], obs: &mut impl Observer) {
        let now = sys::now_ns();
        let g = self.base + li as u32;
        match self.conns[li].state {
            State::LoggingIn => {
                let expected = format!("login success, your uid is {}{}", self.uid_prefix, g);
                if payload != expected.as_bytes() {
                    let got = String::from_utf8_lossy(payload).to_string();
                    self.log(format!("login of {g}: unexpected reply {got:?}"));
                    self.fail(li, Fail::Login, obs);
                    return;
                }
                let conn = &mut self.conns[li];
                conn.state = State::Ready;
                let latency = now.saturating_sub(conn.started_ns);
                let reconnect = std::mem::take(&mut conn.is_reconnect);
                obs.logged_in(li, reconnect, latency, now);
            }
            State::Ready | State::Closing => match obs.message(li, g, payload, now) {
                Delivery::Counted => {}
                Delivery::Stray => self.counters.stray += 1,
                Delivery::Unexpected => {
                    self.counters.unexpected += 1;
                    let got =
                        String::from_utf8_lossy(&payload[..payload.len().min(100)]).to_string();
                    self.log(format!("unexpected message {got:?}"));
                }
            },
            _ => {}
        }
    }

    /// A connection in Closing state is done: by the server's close frame
    /// (`clean`) or by EOF. A churned one connects again.
    fn finish_close(&mut self, li: usize, clean: bool, obs: &mut impl Observer) {
        let now = sys::now_ns();
        let conn = &mut self.conns[li];
        conn.close_socket();
        if conn.reconnect {
            conn.reconnect = false;
            conn.is_reconnect = true;
            self.start_connect(li, now, obs);
            return;
        }
        conn.state = State::Closed;
        obs.closed(clean, conn.started_ns, now);
    }
}
