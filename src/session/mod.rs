//! One connection's protocol, with no socket in it: bytes and the time go
//! in, actions come out.
//!
//! ```text
//!   Handshake ──101──> Login ──valid uid──> LoggingIn ──open()──> Open
//!       │                │                      │                   │
//!       │ 4xx, timeout   │ bad uid, timeout     │ (or the whole     │ close frame, error, idle,
//!       v                v                      │  session moves    │ slow consumer, shutdown
//!    Closing <───────────┴──────────────────────┘  to the uid's     v
//!       │  (our close or HTTP error is out;        home shard)   Closing
//!       │   input is read and dropped)
//!       └──client closes, or time runs out──> Done      Open ──client's FIN──> Draining ──> Done
//! ```
//!
//! A [`Session`] owns no socket, task or runtime type, so it is tested,
//! property-tested and fuzzed with made-up bytes. The shard feeds it what a
//! socket delivered ([`Session::on_bytes`], [`Session::on_eof`]), the
//! passing of time ([`Session::on_timer`] once [`Session::poll_at`] is
//! reached) and its own decisions ([`Session::open`], [`Session::close`]);
//! the session answers through [`Action`]s: write this on my socket, this
//! uid logged in, route this message, count this. The phase changes in one
//! place ([`Session::set_phase`]) together with its deadline, and the shard
//! reads it afterwards to know what the socket needs (shut the write side,
//! close it).
//!
//! Bytes are kept per connection only while something is incomplete (an
//! upgrade request or a frame split across reads, a fragmented message);
//! then they live in a boxed [`Partial`] that is freed as soon as it is empty.
//! A frame that arrives whole is unmasked and handled in the caller's buffer.

pub mod frame;
pub mod handshake;

use crate::auth::Login;
use crate::protocol::{self, ClientSends, Send};
use crate::stats::Counter;
use frame::{close_code, ClosePayload, Frame, FrameError, Opcode};
use handshake::Outcome;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the HTTP upgrade request.
    Handshake,
    /// Upgraded; waiting for the first data message, the uid.
    Login,
    /// A valid uid arrived ([`Action::Login`]). The shard either opens the
    /// session here ([`Session::open`]) or moves it, whole, to the uid's
    /// home shard, which opens it there. Bytes arriving meanwhile are kept.
    LoggingIn,
    /// Logged in: sends and deliveries flow.
    Open,
    /// Our close frame (or an HTTP error) is written: once it is out the
    /// write side is shut, and the socket goes when the client closes its
    /// side or the close timeout passes. Input is read and dropped.
    Closing,
    /// The client shut its side without a close handshake: what is still
    /// queued for it is written, then the socket goes (or at the deadline).
    Draining,
    /// Nothing left to do: close the socket.
    Done,
}

/// Why the shard closes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its outbound queue went over the limit: 1008 `slow consumer`.
    SlowConsumer,
    /// The server is stopping: 1001, or 503 before the upgrade.
    Shutdown,
    /// The shard holds too much incomplete input, this session the most:
    /// 1013, or 503 before the upgrade.
    TooMuchPending,
}

/// What a session asks of the shard. Borrowed payloads point into the bytes
/// just given to the session and live until the callback returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// Write these bytes on this connection (an HTTP response, a reply, a
    /// Pong, a close frame).
    Write(Frame),
    /// Write the shard's shared Ping on this connection.
    Ping,
    /// A valid uid logged in. The session now waits in
    /// [`Phase::LoggingIn`]; the shard registers it and calls
    /// [`Session::open`], here or on the uid's home shard.
    Login(&'a str),
    /// Deliver `payload` as one message of type `opcode` to every
    /// connection of `uid`.
    ToUid {
        /// The recipient uid.
        uid: &'a str,
        /// Text or binary.
        opcode: Opcode,
        /// The message to deliver.
        payload: &'a [u8],
    },
    /// Deliver `payload` to every logged-in connection.
    ToAll {
        /// Text or binary.
        opcode: Opcode,
        /// The message to deliver.
        payload: &'a [u8],
    },
    /// Something for the shard's counters.
    Count(Counter),
}

/// Settings a session obeys. Copied by value into each call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest client message after reassembly, in bytes (1009 above).
    pub max_message_bytes: usize,
    /// From accept to a complete upgrade request, ms (408 after).
    pub handshake_timeout_ms: u64,
    /// From the upgrade to the login message, ms (1008 after).
    pub login_timeout_ms: u64,
    /// Silence after which the server pings, ms.
    pub ping_interval_ms: u64,
    /// Silence after which the connection closes with 1001, ms.
    pub idle_timeout_ms: u64,
    /// How long to wait for the client once our close is out, ms.
    pub close_timeout_ms: u64,
    /// Messages a logged-in client may send per second (0: no limit);
    /// over it the connection closes with 1008 `rate limit`.
    pub max_client_rate: u16,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: 64 * 1024,
            handshake_timeout_ms: 10_000,
            login_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            close_timeout_ms: 2_000,
            max_client_rate: 0,
        }
    }
}

/// Everything a session obeys: its limits, what a login must be, and what
/// a logged-in client may send.
#[derive(Debug)]
pub struct Rules {
    /// Sizes and timeouts.
    pub limits: Limits,
    /// What a login must be.
    pub login: Login,
    /// What a logged-in client may send.
    pub client_sends: ClientSends,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            limits: Limits::default(),
            login: Login::Uid,
            client_sends: ClientSends::Any,
        }
    }
}

/// One connection's protocol state: 32 bytes, plus a [`Partial`] only
/// while something is incomplete.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    /// A Ping went out since the last bytes came in.
    ping_sent: bool,
    /// The server is full: the upgrade is answered with 503.
    refused: bool,
    /// The second (shard clock, wrapping) of the last message, and how many
    /// messages came in that second, for `max_client_rate`.
    rate_second: u16,
    rate_count: u16,
    /// When the current phase must end (Handshake, Login, LoggingIn,
    /// Closing, Draining), in the shard's ms; while open, when a ping sent
    /// must have been answered.
    deadline: u64,
    /// When bytes last arrived, for pings and the idle timeout.
    last_rx: u64,
    /// Whatever is incomplete; `None` (no allocation) almost always.
    partial: Option<Box<Partial>>,
}

/// Bytes a session keeps between reads.
#[derive(Debug, Default)]
struct Partial {
    /// Unparsed input: an upgrade request in pieces, a frame header or a
    /// control frame in pieces, or the bytes behind a login, kept for
    /// [`Session::open`] (here or on the uid's home shard).
    raw: Vec<u8>,
    /// A data frame whose header is read and whose payload is still arriving.
    frame: Option<Incoming>,
    /// The data message being assembled, unmasked, and its type.
    message: Vec<u8>,
    message_op: Option<Opcode>,
    /// How much of `message` is known to be valid UTF-8 (text only), so an
    /// invalid byte fails the connection as soon as it arrives.
    utf8_checked: usize,
}

/// The payload of a data frame that is still arriving.
#[derive(Debug, Clone, Copy)]
struct Incoming {
    /// Payload bytes still to come.
    left: usize,
    /// The masking key, rotated to where the payload continues.
    mask: [u8; 4],
    /// The frame ends its message.
    fin: bool,
}

impl Partial {
    fn is_empty(&self) -> bool {
        self.raw.is_empty() && self.frame.is_none() && self.message_op.is_none()
    }

    fn bytes(&self) -> usize {
        self.raw.capacity() + self.message.capacity()
    }
}

impl Default for Session {
    /// A finished session: what is left behind when one is taken out.
    fn default() -> Session {
        Session {
            phase: Phase::Done,
            ping_sent: false,
            refused: false,
            rate_second: 0,
            rate_count: 0,
            deadline: 0,
            last_rx: 0,
            partial: None,
        }
    }
}

impl Session {
    /// A connection just accepted, at `now`: waiting for its upgrade.
    pub fn new(now: u64, rules: &Rules) -> Session {
        Session {
            phase: Phase::Handshake,
            ping_sent: false,
            refused: false,
            rate_second: 0,
            rate_count: 0,
            deadline: now.saturating_add(rules.limits.handshake_timeout_ms),
            last_rx: now,
            partial: None,
        }
    }

    /// A connection the server has no room for: its upgrade request is
    /// read and answered with 503, then it closes.
    pub fn refused(now: u64, rules: &Rules) -> Session {
        Session {
            refused: true,
            ..Session::new(now, rules)
        }
    }

    /// Where the session is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes this session holds for incomplete input.
    pub fn buffered_bytes(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.bytes())
    }

    /// The only place the phase changes, together with its deadline.
    fn set_phase(&mut self, phase: Phase, now: u64, rules: &Rules) {
        self.phase = phase;
        self.deadline = match phase {
            Phase::Handshake => now.saturating_add(rules.limits.handshake_timeout_ms),
            Phase::Login => now.saturating_add(rules.limits.login_timeout_ms),
            Phase::LoggingIn => self.deadline, // still the login's
            Phase::Open | Phase::Done => u64::MAX,
            Phase::Closing | Phase::Draining => now.saturating_add(rules.limits.close_timeout_ms),
        };
        if !matches!(
            phase,
            Phase::Handshake | Phase::Login | Phase::LoggingIn | Phase::Open
        ) {
            self.partial = None; // nothing more is parsed
        }
    }

    /// When [`Session::on_timer`] has something to do (shard ms).
    pub fn poll_at(&self, rules: &Rules) -> u64 {
        match self.phase {
            // Pinged: the answer is due by the deadline set with the ping.
            Phase::Open if self.ping_sent => self.deadline,
            Phase::Open => {
                let limits = &rules.limits;
                let silence = limits.ping_interval_ms.min(limits.idle_timeout_ms);
                self.last_rx.saturating_add(silence)
            }
            Phase::Done => u64::MAX,
            _ => self.deadline,
        }
    }

    /// Enforces the deadlines at `now`: handshake (408), login (1008),
    /// idle (1001), the close wait; and pings a silent open connection.
    pub fn on_timer(&mut self, now: u64, rules: &Rules, out: &mut impl FnMut(Action<'_>)) {
        if now < self.poll_at(rules) {
            return;
        }
        match self.phase {
            Phase::Handshake => {
                out(Action::Count(Counter::Timeouts));
                self.reject_http(now, rules, http_status(408, "Request Timeout"), out);
            }
            Phase::Login | Phase::LoggingIn => {
                out(Action::Count(Counter::Timeouts));
                self.close_with(now, rules, close_code::POLICY, "login timeout", out);
            }
            // A connection is closed as idle only once a ping went
            // unanswered for the rest of the idle timeout: after a stall of
            // the server's own, a silent client is pinged first.
            Phase::Open
                if self.ping_sent
                    || rules.limits.ping_interval_ms >= rules.limits.idle_timeout_ms =>
            {
                out(Action::Count(Counter::Timeouts));
                self.close_with(now, rules, close_code::GOING_AWAY, "idle timeout", out);
            }
            Phase::Open => {
                let limits = &rules.limits;
                self.ping_sent = true;
                self.deadline =
                    now.saturating_add(limits.idle_timeout_ms - limits.ping_interval_ms);
                out(Action::Ping);
            }
            Phase::Closing | Phase::Draining => self.set_phase(Phase::Done, now, rules),
            Phase::Done => {}
        }
    }

    /// The shard closes the session (slow consumer, shutdown).
    pub fn close(
        &mut self,
        reason: CloseReason,
        now: u64,
        rules: &Rules,
        out: &mut impl FnMut(Action<'_>),
    ) {
        match (reason, self.phase) {
            (_, Phase::Closing | Phase::Draining | Phase::Done) => {}
            (CloseReason::Shutdown, Phase::Handshake) => {
                let response = http_status(503, "Service Unavailable");
                self.reject_http(now, rules, response, out);
            }
            (CloseReason::Shutdown, _) => {
                let reason = "server shutting down";
                self.close_with(now, rules, close_code::GOING_AWAY, reason, out);
            }
            (CloseReason::TooMuchPending, phase) => {
                out(Action::Count(Counter::PendingShed));
                if phase == Phase::Handshake {
                    let response = http_status(503, "Service Unavailable");
                    self.reject_http(now, rules, response, out);
                } else {
                    let reason = "server busy: too much incomplete input";
                    self.close_with(now, rules, close_code::TRY_AGAIN_LATER, reason, out);
                }
            }
            (CloseReason::SlowConsumer, _) => {
                out(Action::Count(Counter::SlowConsumers));
                self.close_with(now, rules, close_code::POLICY, "slow consumer", out);
            }
        }
    }

    /// The client shut its side of the socket (end of stream).
    pub fn on_eof(&mut self, now: u64, rules: &Rules) {
        match self.phase {
            Phase::Open => self.set_phase(Phase::Draining, now, rules),
            Phase::Draining | Phase::Done => {}
            _ => self.set_phase(Phase::Done, now, rules),
        }
    }

    /// The socket failed: nothing more can be written or read.
    pub fn abort(&mut self, now: u64, rules: &Rules) {
        self.set_phase(Phase::Done, now, rules);
    }

    /// The shard registered the login (here, or on the home shard after a
    /// move): the session is open, and bytes kept behind the login are
    /// handled now.
    pub fn open(&mut self, now: u64, rules: &Rules, out: &mut impl FnMut(Action<'_>)) {
        if self.phase != Phase::LoggingIn {
            return;
        }
        self.set_phase(Phase::Open, now, rules);
        let kept = self.take_raw();
        if !kept.is_empty() {
            let mut kept = kept;
            let used = self.parse_frames(now, rules, &mut kept, out);
            self.keep(&kept[used..]);
        }
    }

    /// Bytes that arrived on the socket at `now`. `data` is the caller's
    /// buffer; whole frames are unmasked in it, in place.
    pub fn on_bytes(
        &mut self,
        now: u64,
        rules: &Rules,
        data: &mut [u8],
        out: &mut impl FnMut(Action<'_>),
    ) {
        self.last_rx = now;
        self.ping_sent = false;
        match self.phase {
            Phase::Handshake => self.on_request_bytes(now, rules, data, out),
            Phase::Login | Phase::Open => self.on_frame_bytes(now, rules, data, out),
            Phase::LoggingIn => self.keep(data),
            Phase::Closing | Phase::Draining | Phase::Done => {} // dropped
        }
    }

    // ---- the kept bytes ----

    fn partial(&mut self) -> &mut Partial {
        self.partial.get_or_insert_with(Box::default)
    }

    fn take_raw(&mut self) -> Vec<u8> {
        self.partial
            .as_mut()
            .map(|p| std::mem::take(&mut p.raw))
            .unwrap_or_default()
    }

    /// Keeps unparsed bytes for later, if this phase parses later.
    fn keep(&mut self, rest: &[u8]) {
        let keeps = matches!(
            self.phase,
            Phase::Handshake | Phase::Login | Phase::LoggingIn | Phase::Open
        );
        if keeps && !rest.is_empty() {
            self.partial().raw.extend_from_slice(rest);
        }
        self.free_if_empty();
    }

    fn free_if_empty(&mut self) {
        if self.partial.as_ref().is_some_and(|p| p.is_empty()) {
            self.partial = None;
        }
    }

    // ---- the upgrade ----

    fn on_request_bytes(
        &mut self,
        now: u64,
        rules: &Rules,
        data: &mut [u8],
        out: &mut impl FnMut(Action<'_>),
    ) {
        let kept = self.take_raw();
        if kept.is_empty() {
            // The usual case: the whole request in one read, parsed in place.
            match handshake::process(data) {
                Outcome::Incomplete => self.keep(data),
                outcome => self.on_handshake(outcome, now, rules, data, out),
            }
            return;
        }
        let mut buf = kept;
        buf.extend_from_slice(data);
        match handshake::process(&buf) {
            Outcome::Incomplete => self.keep(&buf),
            outcome => self.on_handshake(outcome, now, rules, &mut buf, out),
        }
    }

    fn on_handshake(
        &mut self,
        outcome: Outcome,
        now: u64,
        rules: &Rules,
        request: &mut [u8],
        out: &mut impl FnMut(Action<'_>),
    ) {
        match outcome {
            Outcome::Incomplete => {}
            Outcome::Reject { response, .. } => {
                out(Action::Count(Counter::HandshakeFailed));
                self.reject_http(now, rules, response, out);
            }
            Outcome::Upgrade { .. } if self.refused => {
                out(Action::Count(Counter::ConnectionsRefused));
                let response = http_status(503, "Service Unavailable");
                self.reject_http(now, rules, response, out);
            }
            Outcome::Upgrade { response, consumed } => {
                out(Action::Write(response));
                self.set_phase(Phase::Login, now, rules);
                // Frames pipelined behind the request.
                let rest = &mut request[consumed..];
                if !rest.is_empty() {
                    self.on_frame_bytes(now, rules, rest, out);
                }
            }
        }
    }

    // ---- frames ----

    fn on_frame_bytes(
        &mut self,
        now: u64,
        rules: &Rules,
        data: &mut [u8],
        out: &mut impl FnMut(Action<'_>),
    ) {
        let kept = self.take_raw();
        if kept.is_empty() {
            let used = self.parse_frames(now, rules, data, out);
            self.keep(&data[used..]);
            return;
        }
        let mut buf = kept;
        buf.extend_from_slice(data);
        let used = self.parse_frames(now, rules, &mut buf, out);
        self.keep(&buf[used..]);
    }

    fn reads_frames(&self) -> bool {
        matches!(self.phase, Phase::Login | Phase::Open)
    }

    /// Handles every frame (or piece of a data frame's payload) at the start
    /// of `buf`; returns how many bytes were used. What is left is an
    /// incomplete header or control frame, or bytes behind a login.
    fn parse_frames(
        &mut self,
        now: u64,
        rules: &Rules,
        buf: &mut [u8],
        out: &mut impl FnMut(Action<'_>),
    ) -> usize {
        let max = rules.limits.max_message_bytes;
        let mut pos = 0;
        while pos < buf.len() && self.reads_frames() {
            if let Some(incoming) = self.partial.as_ref().and_then(|p| p.frame) {
                pos += self.continue_payload(incoming, now, rules, &mut buf[pos..], out);
                continue;
            }
            let header = match frame::parse_header(&buf[pos..], max) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(FrameError::Protocol(reason)) => {
                    self.fail(now, rules, close_code::PROTOCOL, reason, out);
                    break;
                }
                Err(FrameError::TooBig) => {
                    self.fail(now, rules, close_code::TOO_BIG, "message too big", out);
                    break;
                }
            };
            let available = buf.len() - pos;
            if header.opcode.is_control() {
                if available < header.frame_len() {
                    break; // at most 139 bytes, kept raw
                }
                let payload = &mut buf[pos + header.header_len..pos + header.frame_len()];
                frame::unmask(payload, header.mask);
                pos += header.frame_len();
                self.on_control(header.opcode, payload, now, rules, out);
                continue;
            }
            let assembling = self.partial.as_ref().and_then(|p| p.message_op);
            let so_far = self.partial.as_ref().map_or(0, |p| p.message.len());
            match (header.opcode, assembling) {
                (Opcode::Continuation, None) => {
                    let reason = "continuation without a message";
                    self.fail(now, rules, close_code::PROTOCOL, reason, out);
                    break;
                }
                (Opcode::Text | Opcode::Binary, Some(_)) => {
                    let reason = "new message inside a fragmented one";
                    self.fail(now, rules, close_code::PROTOCOL, reason, out);
                    break;
                }
                _ => {}
            }
            if so_far + header.payload_len > max {
                self.fail(now, rules, close_code::TOO_BIG, "message too big", out);
                break;
            }
            if assembling.is_none() && header.fin && available >= header.frame_len() {
                // The whole message in one frame, here: handled in place.
                let payload = &mut buf[pos + header.header_len..pos + header.frame_len()];
                frame::unmask(payload, header.mask);
                pos += header.frame_len();
                self.on_message(header.opcode, payload, now, rules, out);
                continue;
            }
            // The message is assembled in the partial buffer as it arrives.
            pos += header.header_len;
            let partial = self.partial();
            if partial.message_op.is_none() {
                partial.message_op = Some(header.opcode);
                partial.utf8_checked = 0;
            }
            let incoming = Incoming {
                left: header.payload_len,
                mask: header.mask,
                fin: header.fin,
            };
            partial.frame = Some(incoming);
            if header.payload_len == 0 {
                self.continue_payload(incoming, now, rules, &mut [], out);
            }
        }
        pos
    }

    /// Takes the next piece of a data frame's payload from `buf`; returns
    /// the bytes used. Completes the message when its last frame ends.
    fn continue_payload(
        &mut self,
        incoming: Incoming,
        now: u64,
        rules: &Rules,
        buf: &mut [u8],
        out: &mut impl FnMut(Action<'_>),
    ) -> usize {
        let n = incoming.left.min(buf.len());
        let piece = &mut buf[..n];
        frame::unmask(piece, incoming.mask);
        let partial = self.partial();
        partial.message.extend_from_slice(piece);
        let left = incoming.left - n;
        let ends_message = left == 0 && incoming.fin;
        partial.frame = (left > 0).then(|| Incoming {
            left,
            mask: rotate(incoming.mask, n),
            fin: incoming.fin,
        });
        if partial.message_op == Some(Opcode::Text)
            && !check_utf8(&partial.message, &mut partial.utf8_checked, ends_message)
        {
            let reason = "text message is not valid UTF-8";
            self.fail(now, rules, close_code::INVALID_DATA, reason, out);
            return n;
        }
        if ends_message {
            let message = std::mem::take(&mut partial.message);
            let opcode = partial.message_op.take().expect("a message is assembling");
            self.free_if_empty();
            self.on_message(opcode, &message, now, rules, out);
        }
        n
    }

    fn on_control(
        &mut self,
        opcode: Opcode,
        payload: &[u8],
        now: u64,
        rules: &Rules,
        out: &mut impl FnMut(Action<'_>),
    ) {
        match opcode {
            Opcode::Ping => out(Action::Write(frame::encode(Opcode::Pong, payload))),
            Opcode::Close => match frame::parse_close(payload) {
                Ok(ClosePayload::Empty) => {
                    let close = frame::encode(Opcode::Close, &[]);
                    self.send_close(now, rules, close, out);
                }
                Ok(ClosePayload::Code(code)) => {
                    let close = frame::encode_close(code, "");
                    self.send_close(now, rules, close, out);
                }
                Err((code, reason)) => self.fail(now, rules, code, reason, out),
            },
            _ => {} // Pong: its arrival already counted as activity
        }
    }

    /// A complete data message.
    fn on_message(
        &mut self,
        opcode: Opcode,
        payload: &[u8],
        now: u64,
        rules: &Rules,
        out: &mut impl FnMut(Action<'_>),
    ) {
        if opcode == Opcode::Text && std::str::from_utf8(payload).is_err() {
            let reason = "text message is not valid UTF-8";
            self.fail(now, rules, close_code::INVALID_DATA, reason, out);
            return;
        }
        match self.phase {
            Phase::Login => match rules.login.check(payload) {
                Ok(uid) => {
                    self.set_phase(Phase::LoggingIn, now, rules);
                    out(Action::Login(&uid));
                }
                Err(e) => {
                    out(Action::Count(Counter::LoginRefused));
                    self.close_with(now, rules, close_code::POLICY, &e.to_string(), out);
                }
            },
            Phase::Open => {
                out(Action::Count(Counter::MessagesIn));
                if self.over_rate(now, rules.limits.max_client_rate) {
                    out(Action::Count(Counter::RateLimited));
                    self.close_with(now, rules, close_code::POLICY, "rate limit", out);
                    return;
                }
                let send = protocol::parse_send(payload);
                let refused = send
                    .as_ref()
                    .ok()
                    .and_then(|send| rules.client_sends.refuses(send));
                let reply = match (send, refused) {
                    (Ok(_), Some(refusal)) => {
                        out(Action::Count(Counter::SendsRefused));
                        refusal
                    }
                    (Ok(Send::ToUid { uid, payload }), None) => {
                        return out(Action::ToUid {
                            uid,
                            opcode,
                            payload,
                        })
                    }
                    (Ok(Send::ToAll { payload }), None) => {
                        return out(Action::ToAll { opcode, payload })
                    }
                    (Err(e), _) => {
                        out(Action::Count(Counter::SendErrors));
                        protocol::error_reply(e)
                    }
                };
                out(Action::Write(frame::encode(Opcode::Text, reply.as_bytes())));
            }
            _ => {}
        }
    }

    /// Counts a message against the per-second limit; true when over it.
    fn over_rate(&mut self, now: u64, limit: u16) -> bool {
        if limit == 0 {
            return false;
        }
        let second = (now / 1000) as u16;
        if second != self.rate_second {
            self.rate_second = second;
            self.rate_count = 0;
        }
        self.rate_count = self.rate_count.saturating_add(1);
        self.rate_count > limit
    }

    // ---- closing ----

    /// A protocol violation: counted, then closed with `code`.
    fn fail(
        &mut self,
        now: u64,
        rules: &Rules,
        code: u16,
        reason: &str,
        out: &mut impl FnMut(Action<'_>),
    ) {
        out(Action::Count(Counter::ProtocolErrors));
        self.close_with(now, rules, code, reason, out);
    }

    fn close_with(
        &mut self,
        now: u64,
        rules: &Rules,
        code: u16,
        reason: &str,
        out: &mut impl FnMut(Action<'_>),
    ) {
        self.send_close(now, rules, frame::encode_close(code, reason), out);
    }

    fn send_close(
        &mut self,
        now: u64,
        rules: &Rules,
        close: Frame,
        out: &mut impl FnMut(Action<'_>),
    ) {
        self.set_phase(Phase::Closing, now, rules);
        out(Action::Write(close));
    }

    /// Answers a request that is not a valid upgrade, then closes.
    fn reject_http(
        &mut self,
        now: u64,
        rules: &Rules,
        response: Frame,
        out: &mut impl FnMut(Action<'_>),
    ) {
        self.set_phase(Phase::Closing, now, rules);
        out(Action::Write(response));
    }
}

/// A bodiless HTTP response that closes the connection.
fn http_status(status: u16, phrase: &str) -> Frame {
    let text =
        format!("HTTP/1.1 {status} {phrase}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    Frame::from(text.into_bytes())
}

/// The masking key as seen `n` bytes further into the payload.
fn rotate(mask: [u8; 4], n: usize) -> [u8; 4] {
    let mut rotated = mask;
    rotated.rotate_left(n % 4);
    rotated
}

/// Checks the bytes of `message` after `checked`, moving `checked` up to
/// the last complete character. False when they cannot be the start of
/// valid UTF-8, or, once `complete`, when a character is cut off.
fn check_utf8(message: &[u8], checked: &mut usize, complete: bool) -> bool {
    match std::str::from_utf8(&message[*checked..]) {
        Ok(_) => {
            *checked = message.len();
            true
        }
        Err(e) if e.error_len().is_none() && !complete => {
            *checked += e.valid_up_to();
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests;
