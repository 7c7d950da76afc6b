//! One connection's state machine:
//!
//! ```text
//!   Handshake ──upgrade──> Login ──valid uid──> Open ──close / error / kill──> Closing ──> gone
//!       │                    └──uid homed elsewhere──> socket handed to the home shard
//!       └──────────── bad request, timeout ────────────────────────────────────┘
//! ```
//!
//! A connection is split in two:
//! - [`ConnState`] lives in the shard's slab, where the shard reaches it to
//!   deliver frames, to enforce timeouts and to ask it to close. It holds the
//!   outbound queue, which is empty (and unallocated) whenever the socket
//!   keeps up, because a frame is first written straight to the socket.
//! - [`Connection`] is owned by the connection's task: the socket, and the
//!   few buffers that exist only while a request or a frame is incomplete.
//!   Reads go to the shard's shared scratch buffer, so an idle connection
//!   holds no read buffer at all.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use crate::frame::{self, close_code, ClosePayload, Frame, FrameError, Opcode};
use crate::handshake::{self, Outcome};
use crate::protocol::{self, Send};
use crate::router::ShardId;
use crate::shard::Shard;
use crate::slab::Key;
use crate::stats::Counter;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the HTTP upgrade request.
    Handshake,
    /// Upgraded; waiting for the first data message, the uid.
    Login,
    /// Logged in: sends and deliveries flow.
    Open,
    /// A close frame (or an HTTP error) is on its way out; nothing more is
    /// delivered, and the socket goes once the client closes or time runs out.
    Closing,
}

/// Why the shard asks a connection's task to close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// Its phase deadline passed (handshake, login) or it stayed silent too long.
    Timeout,
    /// Its outbound queue went over the limit.
    SlowConsumer,
    /// The server is stopping.
    Shutdown,
    /// The socket failed or the closing deadline passed: drop it now.
    Drop,
}

/// The part of a connection that the shard reaches from outside its task.
#[derive(Debug)]
pub struct ConnState {
    /// The socket, for writing delivered frames straight from the shard.
    fd: RawFd,
    pub phase: Phase,
    /// What the socket did not take yet; allocated only while it is full.
    pub(crate) backlog: Option<Box<Backlog>>,
    /// The task's waker, to make it flush, or notice a kill.
    pub waker: Option<Waker>,
    /// Set by the shard; the task acts on it at its next poll.
    pub kill: Option<Kill>,
    /// Shard clock (ms) of the last bytes received, for pings and idling.
    pub last_rx_ms: u64,
    /// Shard clock (ms) by which the current phase must end (Handshake,
    /// Login, Closing); `u64::MAX` when open.
    pub deadline_ms: u64,
    /// A ping went out since the last bytes came in.
    pub ping_sent: bool,
    /// The uid, once logged in; shared with the shard's uid table.
    pub uid: Option<std::sync::Arc<str>>,
}

impl ConnState {
    pub fn new(fd: RawFd, now_ms: u64, handshake_deadline_ms: u64) -> ConnState {
        ConnState {
            fd,
            phase: Phase::Handshake,
            backlog: None,
            waker: None,
            kill: None,
            last_rx_ms: now_ms,
            deadline_ms: handshake_deadline_ms,
            ping_sent: false,
            uid: None,
        }
    }

    /// Delivers a data frame if the connection is open. Returns whether it
    /// was accepted (written, or queued within the limit).
    pub fn deliver(&mut self, frame: &Frame, limit: usize) -> bool {
        if self.phase != Phase::Open || self.kill.is_some() {
            return false;
        }
        self.write(frame, limit);
        true
    }

    /// Writes `frame` now if nothing is queued and the socket takes it;
    /// otherwise queues it (sharing, not copying, the bytes).
    pub fn write(&mut self, frame: &Frame, limit: usize) {
        if self.kill == Some(Kill::Drop) {
            return;
        }
        let len = frame.len() as u32;
        match &mut self.backlog {
            Some(backlog) => {
                backlog.frames.push_back(frame.clone());
                backlog.bytes = backlog.bytes.saturating_add(len);
            }
            None => {
                let written = match send_now(self.fd, frame) {
                    Ok(n) if n == frame.len() => return,
                    Ok(n) => n as u32,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(_) => {
                        self.request_kill(Kill::Drop);
                        return;
                    }
                };
                self.backlog = Some(Box::new(Backlog {
                    frames: VecDeque::from([frame.clone()]),
                    offset: written,
                    bytes: len - written,
                }));
                self.wake(); // the task must wait for the socket to drain
            }
        }
        if self.queued_bytes() > limit && self.phase != Phase::Closing {
            self.request_kill(Kill::SlowConsumer);
        }
    }

    /// Drops every queued frame except one already partly written (cutting
    /// it would corrupt the stream), so a close frame can follow at once.
    fn discard_backlog(&mut self) {
        if let Some(backlog) = &mut self.backlog {
            if backlog.offset == 0 {
                self.backlog = None;
            } else {
                backlog.frames.truncate(1);
                backlog.bytes = backlog.frames[0].len() as u32 - backlog.offset;
            }
        }
    }

    /// The frame to write next and how much of it is written already.
    fn next_to_flush(&self) -> Option<(Frame, usize)> {
        let backlog = self.backlog.as_ref()?;
        Some((backlog.frames.front()?.clone(), backlog.offset as usize))
    }

    /// Records that `n` more bytes of the head frame went out.
    fn flushed(&mut self, n: usize) {
        let Some(backlog) = &mut self.backlog else {
            return;
        };
        backlog.bytes -= n as u32;
        backlog.offset += n as u32;
        if backlog.offset as usize == backlog.frames[0].len() {
            backlog.frames.pop_front();
            backlog.offset = 0;
            if backlog.frames.is_empty() {
                self.backlog = None; // give the memory back
            }
        }
    }

    /// Asks the task to close the connection, and wakes it to do so. A
    /// reason already pending stays, unless the socket is broken (`Drop`).
    pub fn request_kill(&mut self, kill: Kill) {
        if self.kill.is_none() || kill == Kill::Drop {
            self.kill = Some(kill);
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(waker) = &self.waker {
            waker.wake_by_ref();
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.bytes as usize)
    }
}

/// Frames waiting for a full socket to drain.
#[derive(Debug)]
pub struct Backlog {
    /// The frames, shared with every other recipient; the first may be
    /// partly written.
    frames: VecDeque<Frame>,
    /// Bytes of `frames[0]` already written.
    offset: u32,
    /// Bytes still to write, checked against the slow-consumer limit.
    bytes: u32,
}

/// A logged-in connection on its way to the home shard of its uid.
#[derive(Debug)]
pub struct Handover {
    /// A duplicate of the socket: the shard that accepted it closes its own.
    pub(crate) fd: OwnedFd,
    pub(crate) uid: Box<str>,
    /// Bytes read after the login frame, not yet parsed.
    pub(crate) carry: Vec<u8>,
    /// Output the socket had not taken yet (normally none).
    pub(crate) backlog: Option<Box<Backlog>>,
}

/// One non-blocking send; never raises SIGPIPE.
fn send_now(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is a valid slice for the duration of the call.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads taken in one poll before the task yields to its neighbours.
const READS_PER_POLL: usize = 16;

/// The task side of a connection.
pub struct Connection {
    shard: Rc<Shard>,
    key: Key,
    stream: TcpStream,
    /// Bytes carried to the next read: an upgrade request or a frame that
    /// is not complete yet. Empty (unallocated) almost always.
    pending: Vec<u8>,
    /// A fragmented message being reassembled, with its opcode.
    message: Vec<u8>,
    message_op: Option<Opcode>,
    /// The write side has been shut down (after the last frame went out).
    half_closed: bool,
    /// Set at login when the uid's home is another shard: where to go.
    moving_to: Option<(ShardId, Box<str>)>,
}

/// Runs one connection until it is gone (or handed over), then removes
/// every trace of it here. `carry` holds bytes already read from it.
pub async fn serve(shard: Rc<Shard>, key: Key, stream: TcpStream, mut carry: Vec<u8>) {
    let mut conn = Connection {
        shard,
        key,
        stream,
        pending: Vec::new(),
        message: Vec::new(),
        message_op: None,
        half_closed: false,
        moving_to: None,
    };
    if !carry.is_empty() {
        conn.on_frame_bytes(&mut carry);
    }
    futures_lite::future::poll_fn(|cx| conn.poll(cx)).await;
    conn.shard.forget(conn.key);
    // Dropping the stream closes the socket, after the uid entry is gone.
}

impl Connection {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..READS_PER_POLL {
            if self.poll_flush(cx).is_err() {
                return Poll::Ready(());
            }
            let kill = self.shard.with_conn(self.key, |c| c.kill.take());
            match kill {
                Some(Kill::Drop) => return Poll::Ready(()),
                Some(kill) => {
                    self.on_kill(kill);
                    continue; // flush the close frame
                }
                None => {}
            }
            if self.phase() == Phase::Closing && !self.half_closed && self.queue_empty() {
                // Everything, the close frame included, is out: send FIN and
                // wait for the client's, so unread input never turns into RST.
                // SAFETY: shutdown on a socket we own.
                unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_WR) };
                self.half_closed = true;
            }

            let mut scratch = self.shard.take_scratch();
            let ended = match Pin::new(&mut self.stream).poll_read(cx, &mut scratch) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
                Poll::Ready(Ok(n)) => {
                    self.on_bytes(&mut scratch[..n]);
                    false
                }
                Poll::Pending => {
                    self.shard.put_scratch(scratch);
                    self.shard.with_conn(self.key, |c| match &c.waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => c.waker = Some(cx.waker().clone()),
                    });
                    return Poll::Pending;
                }
            };
            self.shard.put_scratch(scratch);
            if ended {
                return Poll::Ready(());
            }
            if self.moving_to.is_some() {
                self.hand_over();
                return Poll::Ready(());
            }
        }
        // Busy connection: let the others run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Gives the socket (a duplicate of it), the unparsed bytes and any
    /// unsent output to the uid's home shard. This task then ends and closes
    /// its own descriptor; the socket lives on through the duplicate.
    fn hand_over(&mut self) {
        let Some((home, uid)) = self.moving_to.take() else {
            return;
        };
        let Ok(fd) = self.stream_fd().try_clone_to_owned() else {
            return; // out of descriptors: the connection is dropped
        };
        let backlog = self.shard.with_conn(self.key, |c| c.backlog.take());
        let carry = std::mem::take(&mut self.pending);
        let handover = Handover {
            fd,
            uid,
            carry,
            backlog,
        };
        self.shard.hand_over(home, handover);
    }

    fn stream_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the stream owns this descriptor for as long as `self` lives.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.stream.as_raw_fd()) }
    }

    fn phase(&self) -> Phase {
        self.shard.with_conn(self.key, |c| c.phase)
    }

    fn queue_empty(&self) -> bool {
        self.shard.with_conn(self.key, |c| c.backlog.is_none())
    }

    /// Writes queued frames until the queue is empty or the socket is full
    /// (then the task is woken when it drains). Err: the peer is gone.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            let Some((frame, offset)) = self.shard.with_conn(self.key, |c| c.next_to_flush())
            else {
                return Ok(());
            };
            match Pin::new(&mut self.stream).poll_write(cx, &frame[offset..]) {
                Poll::Ready(Ok(n)) => self.shard.with_conn(self.key, |c| c.flushed(n)),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
    }

    fn on_kill(&mut self, kill: Kill) {
        let phase = self.phase();
        match (kill, phase) {
            (_, Phase::Closing) => {}
            (Kill::Timeout, Phase::Handshake) => {
                self.shard.stats.inc(Counter::Timeouts);
                self.reject_http(&Frame::from(
                    &b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"[..],
                ));
            }
            (Kill::Shutdown, Phase::Handshake) => self.reject_http(&Frame::from(
                &b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"[..],
            )),
            (Kill::Timeout, Phase::Login) => {
                self.shard.stats.inc(Counter::Timeouts);
                self.close(close_code::POLICY, "login timeout");
            }
            (Kill::Timeout, _) => {
                self.shard.stats.inc(Counter::Timeouts);
                self.close(close_code::GOING_AWAY, "idle timeout");
            }
            (Kill::SlowConsumer, _) => {
                self.shard.stats.inc(Counter::SlowConsumers);
                self.shard.with_conn(self.key, |c| c.discard_backlog());
                self.close(close_code::POLICY, "slow consumer");
            }
            (Kill::Shutdown, _) => self.close(close_code::GOING_AWAY, "server shutting down"),
            (Kill::Drop, _) => {}
        }
    }

    /// Bytes just read into the shard's scratch buffer.
    fn on_bytes(&mut self, data: &mut [u8]) {
        let now = self.shard.now_ms();
        let phase = self.shard.with_conn(self.key, |c| {
            c.last_rx_ms = now;
            c.ping_sent = false;
            c.phase
        });
        match phase {
            Phase::Handshake => self.on_request_bytes(data),
            Phase::Login | Phase::Open => self.on_frame_bytes(data),
            Phase::Closing => {} // read and dropped until the client closes
        }
    }

    fn on_request_bytes(&mut self, data: &mut [u8]) {
        if self.pending.is_empty() {
            // The usual case: the whole request in one read, parsed in place.
            match handshake::process(data) {
                Outcome::Incomplete => self.pending = data.to_vec(),
                outcome => self.on_handshake(outcome, data),
            }
            return;
        }
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(data);
        match handshake::process(&buf) {
            Outcome::Incomplete => self.pending = buf,
            outcome => self.on_handshake(outcome, &mut buf),
        }
    }

    fn on_handshake(&mut self, outcome: Outcome, request: &mut [u8]) {
        match outcome {
            Outcome::Incomplete => {}
            Outcome::Reject { response, .. } => {
                self.shard.stats.inc(Counter::HandshakeFailed);
                self.reject_http(&response);
            }
            Outcome::Upgrade { response, consumed } => {
                let deadline = self.shard.now_ms() + self.shard.login_timeout_ms();
                self.write(&response);
                self.shard.with_conn(self.key, |c| {
                    c.phase = Phase::Login;
                    c.deadline_ms = deadline;
                });
                // Frames pipelined behind the request.
                if consumed < request.len() {
                    self.on_frame_bytes(&mut request[consumed..]);
                }
            }
        }
    }

    /// Parses every complete frame; keeps an incomplete tail for later.
    fn on_frame_bytes(&mut self, data: &mut [u8]) {
        if self.pending.is_empty() {
            let used = self.parse_frames(data);
            if used < data.len() && self.keeps_unparsed_bytes() {
                self.pending = data[used..].to_vec();
            }
            return;
        }
        let mut buf = std::mem::take(&mut self.pending);
        buf.extend_from_slice(data);
        let used = self.parse_frames(&mut buf);
        if used < buf.len() && self.keeps_unparsed_bytes() {
            buf.drain(..used);
            self.pending = buf;
        }
    }

    /// Frames are parsed while logging in or open, and not after a login
    /// that moves the connection: what follows belongs to the home shard.
    fn is_reading_frames(&self) -> bool {
        self.moving_to.is_none() && self.keeps_unparsed_bytes()
    }

    /// Bytes after the last complete frame are kept to parse later, here or,
    /// after a handover, on the home shard.
    fn keeps_unparsed_bytes(&self) -> bool {
        matches!(self.phase(), Phase::Login | Phase::Open)
    }

    /// Handles the complete frames at the start of `buf`; returns the bytes used.
    fn parse_frames(&mut self, buf: &mut [u8]) -> usize {
        let max = self.shard.config.max_message_bytes;
        let mut pos = 0;
        while self.is_reading_frames() {
            let header = match frame::parse_header(&buf[pos..], max) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(FrameError::Protocol(reason)) => {
                    self.fail(close_code::PROTOCOL, reason);
                    break;
                }
                Err(FrameError::TooBig) => {
                    self.fail(close_code::TOO_BIG, "message too big");
                    break;
                }
            };
            if header.opcode == Opcode::Continuation
                && self.message.len() + header.payload_len > max
            {
                self.fail(close_code::TOO_BIG, "message too big");
                break;
            }
            if buf.len() - pos < header.frame_len() {
                break;
            }
            let payload = &mut buf[pos + header.header_len..pos + header.frame_len()];
            frame::unmask(payload, header.mask);
            pos += header.frame_len();
            self.on_frame(header.fin, header.opcode, payload);
        }
        pos
    }

    fn on_frame(&mut self, fin: bool, opcode: Opcode, payload: &[u8]) {
        match opcode {
            Opcode::Ping => self.write(&frame::encode(Opcode::Pong, payload)),
            Opcode::Pong => {}
            Opcode::Close => self.on_close_frame(payload),
            Opcode::Text | Opcode::Binary if self.message_op.is_some() => {
                self.fail(close_code::PROTOCOL, "new message inside a fragmented one");
            }
            Opcode::Text | Opcode::Binary if fin => self.on_message(opcode, payload),
            Opcode::Text | Opcode::Binary => {
                self.message_op = Some(opcode);
                self.message.extend_from_slice(payload);
            }
            Opcode::Continuation => {
                let Some(op) = self.message_op else {
                    self.fail(close_code::PROTOCOL, "continuation without a message");
                    return;
                };
                self.message.extend_from_slice(payload);
                if fin {
                    let message = std::mem::take(&mut self.message);
                    self.message_op = None;
                    self.on_message(op, &message);
                }
            }
        }
    }

    fn on_close_frame(&mut self, payload: &[u8]) {
        match frame::parse_close(payload) {
            Ok(ClosePayload::Empty) => self.close_with(frame::encode(Opcode::Close, &[])),
            Ok(ClosePayload::Code(code)) => self.close_with(frame::encode_close(code, "")),
            Err((code, reason)) => self.fail(code, reason),
        }
    }

    /// A complete data message.
    fn on_message(&mut self, opcode: Opcode, payload: &[u8]) {
        if opcode == Opcode::Text && std::str::from_utf8(payload).is_err() {
            self.fail(close_code::INVALID_DATA, "text message is not valid UTF-8");
            return;
        }
        match self.phase() {
            Phase::Login => self.login(payload),
            Phase::Open => self.send(opcode, payload),
            Phase::Handshake | Phase::Closing => {}
        }
    }

    fn login(&mut self, payload: &[u8]) {
        match protocol::validate_uid(payload) {
            Ok(uid) => {
                let home = self.shard.home_of(uid);
                if home == self.shard.id {
                    self.shard.login(self.key, uid);
                } else {
                    self.moving_to = Some((home, uid.into()));
                }
            }
            Err(e) => {
                self.shard.stats.inc(Counter::LoginRefused);
                self.close(close_code::POLICY, &e.to_string());
            }
        }
    }

    fn send(&mut self, opcode: Opcode, message: &[u8]) {
        self.shard.stats.inc(Counter::MessagesIn);
        match protocol::parse_send(message) {
            Ok(Send::ToUid { uid, payload }) => {
                self.shard.send_to_uid(uid, frame::encode(opcode, payload));
            }
            Ok(Send::ToAll { payload }) => {
                self.shard.broadcast(frame::encode(opcode, payload));
            }
            Err(e) => {
                self.shard.stats.inc(Counter::SendErrors);
                let reply = protocol::error_reply(e);
                self.write(&frame::encode(Opcode::Text, reply.as_bytes()));
            }
        }
    }

    /// A protocol violation: counted, then closed with `code`.
    fn fail(&mut self, code: u16, reason: &str) {
        self.shard.stats.inc(Counter::ProtocolErrors);
        self.close(code, reason);
    }

    fn close(&mut self, code: u16, reason: &str) {
        self.close_with(frame::encode_close(code, reason));
    }

    /// Leaves the uid table, sends `close` and waits for the client to close.
    fn close_with(&mut self, close: Frame) {
        self.shard.logout(self.key);
        self.write(&close);
        self.enter_closing();
    }

    /// Answers a request that is not a valid upgrade, then closes.
    fn reject_http(&mut self, response: &Frame) {
        self.write(response);
        self.enter_closing();
    }

    fn enter_closing(&mut self) {
        self.pending = Vec::new();
        self.message = Vec::new();
        self.message_op = None;
        let deadline = self.shard.now_ms() + self.shard.close_timeout_ms();
        self.shard.with_conn(self.key, |c| {
            c.phase = Phase::Closing;
            c.deadline_ms = deadline;
        });
    }

    /// Writes this connection's own frame (a reply, a pong, a close).
    fn write(&mut self, frame: &Frame) {
        let limit = self.shard.config.max_outbound_bytes;
        self.shard.with_conn(self.key, |c| c.write(frame, limit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A connection state writing into one end of a socket pair that nobody
    /// reads until the test says so.
    fn open_state() -> (ConnState, UnixStream, UnixStream) {
        // `ours` must outlive the state, which only borrows its descriptor.
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut state = ConnState::new(ours.as_raw_fd(), 0, u64::MAX);
        state.phase = Phase::Open;
        (state, ours, theirs)
    }

    #[test]
    fn writes_go_straight_out_until_the_socket_is_full() {
        let (mut state, _ours, mut theirs) = open_state();
        let frame = frame::encode(Opcode::Text, b"hello");
        assert!(state.deliver(&frame, 1 << 20));
        assert!(
            state.backlog.is_none(),
            "nothing queued while the socket keeps up"
        );
        let mut got = [0u8; 7];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &frame[..]);
    }

    #[test]
    fn a_full_socket_queues_shared_frames_then_trips_the_limit() {
        let (mut state, _ours, mut theirs) = open_state();
        let big: Frame = frame::encode(Opcode::Binary, &[7u8; 4096]);
        let mut sent = 0;
        while state.backlog.is_none() {
            state.deliver(&big, 1 << 20);
            sent += 1;
        }
        let queued = state.queued_bytes();
        assert!(queued > 0 && queued <= big.len(), "{queued}");
        state.deliver(&big, 1 << 20);
        assert_eq!(state.queued_bytes(), queued + big.len());
        assert_eq!(
            std::sync::Arc::strong_count(&big),
            3,
            "queued frames are shared, not copied"
        );
        assert_eq!(state.kill, None);

        // Past the limit the connection is marked slow.
        state.deliver(&big, queued + big.len());
        assert_eq!(state.kill, Some(Kill::SlowConsumer));
        assert!(!state.deliver(&big, usize::MAX), "no delivery once marked");

        // Dropping the backlog keeps a half-written head frame whole.
        let half_written = state.backlog.as_ref().unwrap().offset > 0;
        state.discard_backlog();
        match state.next_to_flush() {
            None => assert!(!half_written, "a half-written frame was dropped"),
            Some((head, offset)) => {
                assert!(half_written && offset > 0);
                assert_eq!(state.backlog.as_ref().unwrap().frames.len(), 1);
                assert_eq!(state.queued_bytes(), head.len() - offset);
                // Once the head is written the backlog is gone, memory and all.
                state.flushed(head.len() - offset);
            }
        }
        assert!(state.backlog.is_none());
        assert_eq!(state.queued_bytes(), 0);
        let _ = theirs.set_nonblocking(true);
        let mut sink = vec![0u8; 1 << 16];
        assert!(
            theirs.read(&mut sink).unwrap() > 0,
            "{sent} frames went out directly"
        );
    }
}
