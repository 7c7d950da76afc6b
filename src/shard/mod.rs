//! A shard: the connections of one core, their uid table, and the routing
//! decided from what their sessions ask. Nothing here is shared with
//! another thread except the inbox (a lock-free queue) and the counters
//! (written only here).
//!
//! A shard knows tables and routing but not the event loop that drives
//! it: a driver (`crate::driver`) calls it with what its sockets did
//! ([`Shard::accept`], [`Shard::on_bytes`], [`Shard::on_eof`],
//! [`Shard::on_writable`], ...), with the time, and with the inbox; the
//! shard hands each connection's bytes to its [`Session`], acts on the
//! session's [`Action`]s, writes frames straight to sockets that have room
//! (`crate::outbox`), and leaves the driver what only the driver can do in
//! [`Shard::take_io`]: start or stop reading a socket, watch a full one,
//! close one.
//!
//! ```text
//!   driver ──bytes──> Shard::on_bytes ──> Session ──actions──> Shard ──> outbox (socket)
//!                                                               └──> router (another shard)
//! ```

pub mod slab;
pub mod uid_table;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use crate::admission::Admission;
use crate::cluster::{Link, Topic};
use crate::outbox::{Outbox, Wrote};
use crate::protocol;
use crate::push::Kind;
use crate::router::{Arrival, InboxReceiver, Origin, PushError, Router, ShardId, ShardMsg};
use crate::session::frame::{self, Frame, Opcode};
use crate::session::{Action, CloseReason, Phase, Rules, Session};
use crate::stats::{Counter, ShardStats};
use slab::{Key, Slab};
use uid_table::UidTable;

/// Inbox messages handled per call of [`Shard::on_inbox`], so sockets are
/// not starved while other shards keep sending.
const INBOX_BATCH: usize = 1024;

/// What the shard asks of its driver.
#[derive(Debug)]
pub enum Io {
    /// Start reading this socket: a connection adopted from another shard,
    /// one whose reads were paused, or one whose move did not happen.
    Read(Key, RawFd),
    /// The socket refused a write: call [`Shard::on_writable`] when it has
    /// room.
    WatchWrite(Key, RawFd),
    /// Stop reading this socket (the connection moves to another shard, or
    /// its messages wait for room in a full inbox), and call
    /// [`Shard::on_reads_ended`] once no more bytes can arrive.
    StopReading(Key),
    /// The connection is gone: stop reading and watching it (`watching`
    /// says whether a write watch is pending) and close the socket.
    Close {
        /// The connection that is gone.
        key: Key,
        /// Its socket, to close.
        fd: OwnedFd,
        /// Whether a write watch is pending on it.
        watching: bool,
    },
    /// Stop accepting connections (shutdown).
    StopAccepting,
}

/// Whether the driver reads a connection's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reads {
    On,
    /// Asked to stop; bytes may still arrive until the driver reports the
    /// reads ended.
    Stopping,
    Off,
}

/// One connection as the shard holds it: 72 bytes, plus the outbox's queue
/// and the session's partial buffers only while they are needed.
#[derive(Debug)]
pub struct Conn {
    /// The socket; closed when the connection leaves the shard, unless it
    /// moves with the connection to another shard.
    fd: OwnedFd,
    session: Session,
    /// What the socket has not taken yet.
    out: Outbox,
    /// The uid, from login on; shared with the uid table (registered) or
    /// travelling with the connection (moving).
    uid: Option<Arc<str>>,
    /// The connection is in the uid table: deliveries reach it.
    registered: bool,
    /// Being handed to its uid's home shard; reads are stopping.
    moving: bool,
    /// The driver watches the socket for room.
    watching: bool,
    /// The write side is shut (our close frame went out whole).
    shut_write: bool,
    /// In `troubled`: over its outbound limit, or its socket failed.
    slow: bool,
    broken: bool,
    reads: Reads,
    /// Not read while messages it sent wait for room in another shard's
    /// inbox (backpressure).
    paused: bool,
    /// Holds a place in the server's admission counts, released when it
    /// closes.
    admitted: bool,
}

impl Conn {
    fn new(fd: OwnedFd, session: Session, out: Outbox, admitted: bool) -> Conn {
        Conn {
            fd,
            session,
            out,
            uid: None,
            registered: false,
            moving: false,
            watching: false,
            shut_write: false,
            slow: false,
            broken: false,
            reads: Reads::On,
            paused: false,
            admitted,
        }
    }

    /// Whether its socket should be read: not while it moves to another
    /// shard, waits for room in a full inbox, or its input has ended.
    fn wants_reads(&self) -> bool {
        let ended = matches!(self.session.phase(), Phase::Draining | Phase::Done);
        !self.moving && !self.paused && !ended
    }
}

/// What every shard of a server shares.
#[derive(Debug, Clone)]
pub struct ShardSettings {
    /// What every session obeys.
    pub rules: Arc<Rules>,
    /// The server-wide and per-address connection caps.
    pub admission: Arc<Admission>,
    /// Bytes that may wait in user space for one connection.
    pub max_outbound_bytes: usize,
    /// Bytes of incomplete input this shard may hold for all its sessions.
    pub max_pending_bytes: usize,
    /// Called on the shard's thread after its tables gave memory back (a
    /// mass disconnect), so the allocator can return its free pages too.
    pub release_memory: Option<fn()>,
}

/// One core's connections, uid table and routing (see the module doc).
pub struct Shard {
    /// Which shard this is.
    pub id: ShardId,
    /// This shard's counters, read by other threads.
    pub stats: Arc<ShardStats>,
    /// What every session obeys (shared with the other shards; the `Arc`
    /// is cloned into each call, the rules are not copied).
    rules: Arc<Rules>,
    admission: Arc<Admission>,
    /// Bytes that may wait in user space for one connection.
    max_outbound_bytes: usize,
    /// Bytes of incomplete input the sessions may hold together, and what
    /// they hold now.
    max_pending_bytes: usize,
    pending_bytes: usize,
    release_memory: Option<fn()>,
    /// The peer address of each connection, kept only while the
    /// per-address cap is on (to release its count when it closes).
    addresses: HashMap<Key, IpAddr>,
    router: Router,
    inbox: InboxReceiver,
    conns: Slab<Conn>,
    /// The uids whose home is this shard, with their connections (all of
    /// them live here).
    uids: UidTable,
    /// One encoded empty Ping, shared by every connection pinged.
    ping: Frame,
    /// When the shard started: the shard's clock counts ms from here.
    epoch: Instant,
    /// Requests for the driver, taken with [`Shard::take_io`].
    io: Vec<Io>,
    /// Connections that went over their outbound limit, or whose socket
    /// failed, during deliveries: closed once the deliveries are done.
    troubled: Vec<Key>,
    /// Shards this one queued messages for since the driver last asked.
    touched: Vec<ShardId>,
    touched_mask: Vec<bool>,
    /// Keys due for their timers, reused by each sweep.
    due: Vec<Key>,
    /// The recipients of the message being delivered, reused.
    recipients: Vec<Key>,
    /// Messages for shards whose inbox was full, in order, per shard; they
    /// go before any newer message for that shard.
    overflow: Vec<VecDeque<ShardMsg>>,
    /// A message went to `overflow` during the current event: the
    /// connection that sent it is paused.
    overflowed: bool,
    /// Connections paused until `overflow` drains.
    paused: Vec<Key>,
    /// Shutting down: no new connections, and done when none is left.
    stopping: bool,
    /// In a cluster: where messages for other nodes and the uids held here
    /// go (`crate::cluster`).
    cluster: Option<Link>,
}

impl Shard {
    /// A shard reading `inbox`, sending through `router`, counting into `stats`.
    pub fn new(
        inbox: InboxReceiver,
        router: Router,
        settings: ShardSettings,
        stats: Arc<ShardStats>,
    ) -> Shard {
        let shards = router.shards();
        Shard {
            id: inbox.id(),
            stats,
            rules: settings.rules,
            admission: settings.admission,
            max_outbound_bytes: settings.max_outbound_bytes,
            max_pending_bytes: settings.max_pending_bytes,
            pending_bytes: 0,
            release_memory: settings.release_memory,
            addresses: HashMap::new(),
            router,
            inbox,
            conns: Slab::default(),
            uids: UidTable::default(),
            ping: frame::encode(Opcode::Ping, &[]),
            epoch: Instant::now(),
            io: Vec::new(),
            troubled: Vec::new(),
            touched: Vec::new(),
            touched_mask: vec![false; shards],
            due: Vec::new(),
            recipients: Vec::new(),
            overflow: (0..shards).map(|_| VecDeque::new()).collect(),
            overflowed: false,
            paused: Vec::new(),
            stopping: false,
            cluster: None,
        }
    }

    /// Joins a cluster: client messages are also published for the other
    /// nodes, and the uids whose home is this shard are subscribed to.
    pub fn join_cluster(&mut self, link: Link) {
        self.cluster = Some(link);
    }

    /// The shard clock: ms since the shard started.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// This shard's end of its inbox.
    pub fn inbox(&self) -> &InboxReceiver {
        &self.inbox
    }

    /// What every session obeys.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Connections held, in any phase.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// No connection at all.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Messages wait for room in another shard's inbox: the driver must come
    /// back soon (`on_inbox` retries them) rather than sleep until an event.
    pub fn is_backed_up(&self) -> bool {
        !self.paused.is_empty() || self.overflow.iter().any(|q| !q.is_empty())
    }

    /// Stopping, and every connection is gone: the driver may exit.
    pub fn is_finished(&self) -> bool {
        self.stopping && self.conns.is_empty()
    }

    /// What the driver must do since it last asked.
    pub fn take_io(&mut self) -> std::vec::Drain<'_, Io> {
        self.io.drain(..)
    }

    /// Calls `wake` for every shard that was sent messages since the last
    /// call and sleeps: the driver wakes each (once per sleep).
    pub fn take_wakeups(&mut self, mut wake: impl FnMut(ShardId)) {
        for to in self.touched.drain(..) {
            self.touched_mask[to as usize] = false;
            if self.router.take_wakeup(to) {
                wake(to);
            }
        }
    }

    /// Shard `to`'s io_uring, for waking it with MSG_RING.
    pub fn ring_fd_of(&self, to: ShardId) -> Option<RawFd> {
        self.router.ring_fd(to)
    }

    /// Wakes shard `to` through its eventfd (when no ring can reach it).
    pub fn wake_by_eventfd(&self, to: ShardId) {
        self.router.wake(to);
    }

    // ---- what the driver reports ----

    /// A new connection. Returns its key, under which the driver reads the
    /// socket, or None when the shard is stopping (the socket is closed).
    pub fn accept(&mut self, fd: OwnedFd, now: u64) -> Option<Key> {
        if self.stopping {
            return None;
        }
        self.stats.inc(Counter::Accepted);
        self.stats.inc(Counter::Connections);
        let address = self
            .admission
            .wants_address()
            .then(|| peer_ip(&fd))
            .flatten();
        let admitted = self.admission.admit(address);
        let session = if admitted {
            Session::new(now, &self.rules)
        } else {
            Session::refused(now, &self.rules)
        };
        let key = self
            .conns
            .insert(Conn::new(fd, session, Outbox::default(), admitted));
        if let (true, Some(ip)) = (admitted, address) {
            self.addresses.insert(key, ip);
        }
        Some(key)
    }

    /// Bytes read from a connection's socket, in a buffer the session may
    /// change in place.
    pub fn on_bytes(&mut self, key: Key, now: u64, data: &mut [u8]) {
        let rules = self.rules.clone();
        self.with_session(key, now, |session, mut out| {
            session.on_bytes(now, &rules, data, &mut out);
        });
    }

    /// The client shut its side (end of stream).
    pub fn on_eof(&mut self, key: Key, now: u64) {
        let rules = self.rules.clone();
        self.with_session(key, now, |session, _| session.on_eof(now, &rules));
    }

    /// Reading the socket failed: the connection is gone.
    pub fn on_error(&mut self, key: Key, now: u64) {
        let rules = self.rules.clone();
        self.with_session(key, now, |session, _| session.abort(now, &rules));
    }

    /// The socket a write watch was asked for has room (or failed).
    pub fn on_writable(&mut self, key: Key, now: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.watching = false;
        if conn.out.flush(conn.fd.as_raw_fd()).is_err() {
            let rules = self.rules.clone();
            self.with_session(key, now, |session, _| session.abort(now, &rules));
            return;
        }
        self.settle(key, now);
    }

    /// The socket's reads ended (end of stream, error, cancelled, or out of
    /// buffers). Returns the socket when the driver should read it again.
    pub fn on_reads_ended(&mut self, key: Key, now: u64) -> Option<RawFd> {
        let conn = self.conns.get_mut(key)?;
        conn.reads = Reads::Off;
        if conn.moving {
            self.ship(key, now);
            return None;
        }
        if !conn.wants_reads() {
            return None;
        }
        conn.reads = Reads::On;
        Some(conn.fd.as_raw_fd())
    }

    /// Sends a moving connection, whose reads have ended, to its uid's home
    /// with everything read so far.
    fn ship(&mut self, key: Key, now: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.moving = false;
        if self.stopping {
            // Stay and close here: the home shard is stopping too.
            self.read(key);
            self.close_session(key, CloseReason::Shutdown, now);
            return;
        }
        let address = self.addresses.remove(&key);
        let conn = self.conns.remove(key).expect("just found");
        self.pending_bytes -= conn.session.buffered_bytes();
        let uid = conn.uid.expect("a moving connection has its uid");
        let home = self.router.home_of(&uid);
        let arrival = Box::new(Arrival {
            fd: conn.fd,
            uid,
            session: conn.session,
            outbox: conn.out,
            admitted: conn.admitted,
            address,
        });
        self.stats.dec(Counter::Connections);
        self.stats.inc(Counter::HandedOver);
        if let Err(ShardMsg::Adopt(arrival)) = self.send_to_shard(home, ShardMsg::Adopt(arrival)) {
            // The home shard has stopped: the server is going away.
            let key = self.adopt_here(*arrival, now);
            self.read(key);
            self.close_session(key, CloseReason::Shutdown, now);
        }
    }

    /// Asks the driver to read a connection's socket, unless it is read.
    fn read(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.reads == Reads::Off {
                conn.reads = Reads::On;
                self.io.push(Io::Read(key, conn.fd.as_raw_fd()));
            }
        }
    }

    /// Asks the driver to stop reading a connection's socket.
    fn stop_reading(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.reads == Reads::On {
                conn.reads = Reads::Stopping;
                self.io.push(Io::StopReading(key));
            }
        }
    }

    /// Handles what other shards and threads sent; returns how many.
    pub fn on_inbox(&mut self, now: u64) -> usize {
        self.flush_overflow();
        let mut handled = 0;
        while handled < INBOX_BATCH {
            let Some(msg) = self.inbox.try_recv() else {
                break;
            };
            handled += 1;
            self.stats.inc(Counter::InboxReceived);
            match msg {
                ShardMsg::Adopt(arrival) => self.adopt(*arrival, now),
                ShardMsg::ToUid {
                    uid,
                    frame,
                    origin,
                    ack,
                } => {
                    let delivered = self.deliver_to_uid(&uid, &frame, origin);
                    if let Some(ack) = ack {
                        ack.done(delivered);
                    }
                }
                ShardMsg::Broadcast { frame, origin, ack } => {
                    let delivered = self.deliver_to_all(&frame, origin);
                    if let Some(ack) = ack {
                        ack.done(delivered);
                    }
                }
                ShardMsg::Online { uid, ack } => ack.done(self.uids.get(&uid).len() as u64),
                ShardMsg::Shutdown => self.shut_down(now),
            }
            self.close_troubled(now);
        }
        handled
    }

    /// Enforces every deadline that has passed and pings silent
    /// connections; gives table memory back after mass disconnects.
    pub fn sweep(&mut self, now: u64) {
        let shrank = self.conns.shrink_if_sparse() | self.uids.shrink_if_sparse();
        if let (true, Some(release)) = (shrank, self.release_memory) {
            release();
        }
        let rules = self.rules.clone();
        let mut due = std::mem::take(&mut self.due);
        due.extend(
            self.conns
                .iter_mut()
                .filter(|(_, conn)| conn.session.poll_at(&rules) <= now)
                .map(|(key, _)| key),
        );
        for &key in &due {
            self.with_session(key, now, |session, mut out| {
                session.on_timer(now, &rules, &mut out)
            });
        }
        due.clear();
        self.due = due;
    }

    /// Stops accepting and closes every connection with 1001 (503 before
    /// the upgrade). The shard is finished once they are all gone.
    pub fn shut_down(&mut self, now: u64) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.io.push(Io::StopAccepting);
        let keys: Vec<Key> = self.conns.keys().collect();
        for key in keys {
            if !self.conns.get(key).is_some_and(|c| c.moving) {
                self.close_session(key, CloseReason::Shutdown, now);
            }
        }
    }

    // ---- one connection's session ----

    /// Runs `f` on a connection's session with the shard acting on every
    /// action, then settles the connection. The session is taken out of
    /// the table meanwhile, so actions may reach any connection, this one
    /// included.
    fn with_session(
        &mut self,
        key: Key,
        now: u64,
        f: impl FnOnce(&mut Session, &mut dyn FnMut(Action<'_>)),
    ) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let mut session = std::mem::take(&mut conn.session);
        let held = session.buffered_bytes();
        f(&mut session, &mut |action| self.act(key, action));
        if session.phase() == Phase::LoggingIn && self.is_registered(key) {
            // Logged in here: bytes kept behind the login are handled now.
            let rules = self.rules.clone();
            session.open(now, &rules, &mut |action| self.act(key, action));
        }
        self.pending_bytes = self.pending_bytes - held + session.buffered_bytes();
        if let Some(conn) = self.conns.get_mut(key) {
            conn.session = session;
        }
        if std::mem::take(&mut self.overflowed) {
            self.pause(key);
        }
        self.close_troubled(now);
        self.settle(key, now);
        if self.pending_bytes > self.max_pending_bytes {
            self.shed_pending(now);
        }
    }

    /// Stops reading a connection whose messages wait for room in another
    /// shard's inbox, until they are through.
    fn pause(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.paused {
            conn.paused = true;
            self.paused.push(key);
            self.stop_reading(key);
        }
    }

    /// Queues what waited for full inboxes, in order; once nothing waits,
    /// the paused connections are read again.
    fn flush_overflow(&mut self) {
        for to in 0..self.overflow.len() {
            while let Some(msg) = self.overflow[to].pop_front() {
                match self.router.push(to as ShardId, msg) {
                    Ok(()) => self.touch(to as ShardId),
                    Err(PushError::Full(msg)) => {
                        self.overflow[to].push_front(msg);
                        break;
                    }
                    Err(PushError::Stopped(_)) => {} // shutting down
                }
            }
        }
        if self.overflow.iter().all(|q| q.is_empty()) {
            for key in std::mem::take(&mut self.paused) {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.paused = false;
                    if conn.wants_reads() {
                        self.read(key);
                    }
                }
            }
        }
    }

    /// Queues `msg` for shard `to`: behind what already waits for it, or in
    /// its inbox; when the inbox is full it waits here and the sending
    /// connection is paused. Gives the message back when `to` has stopped.
    fn send_to_shard(&mut self, to: ShardId, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.stats.inc(Counter::CrossShardSent);
        let waiting = &mut self.overflow[to as usize];
        if !waiting.is_empty() {
            waiting.push_back(msg);
            self.overflowed = true;
            self.stats.inc(Counter::InboxFull);
            return Ok(());
        }
        match self.router.push(to, msg) {
            Ok(()) => {
                self.touch(to);
                Ok(())
            }
            Err(PushError::Full(msg)) => {
                self.overflow[to as usize].push_back(msg);
                self.overflowed = true;
                self.stats.inc(Counter::InboxFull);
                self.touch(to); // it must drain: make sure it is awake
                Ok(())
            }
            Err(PushError::Stopped(msg)) => Err(msg),
        }
    }

    /// Over the pending-input cap: closes the sessions holding the most
    /// (1013) until the shard is back under it.
    fn shed_pending(&mut self, now: u64) {
        let mut holders: Vec<(usize, Key)> = self
            .conns
            .iter_mut()
            .map(|(key, conn)| (conn.session.buffered_bytes(), key))
            .filter(|&(bytes, _)| bytes > 0)
            .collect();
        holders.sort_unstable_by_key(|&(bytes, _)| std::cmp::Reverse(bytes));
        for (_, key) in holders {
            if self.pending_bytes <= self.max_pending_bytes {
                break;
            }
            self.close_session(key, CloseReason::TooMuchPending, now);
        }
    }

    fn is_registered(&self, key: Key) -> bool {
        self.conns.get(key).is_some_and(|c| c.registered)
    }

    fn act(&mut self, key: Key, action: Action<'_>) {
        match action {
            Action::Write(frame) => self.write(key, &frame),
            Action::Ping => {
                let ping = self.ping.clone();
                self.write(key, &ping);
            }
            Action::Login(uid) => self.login(key, uid),
            Action::ToUid {
                uid,
                opcode,
                payload,
            } => {
                if let Some(link) = &self.cluster {
                    link.publish(Topic::Uid(uid), Kind::of(opcode), payload);
                }
                self.send_to_uid(uid, frame::encode(opcode, payload))
            }
            Action::ToAll { opcode, payload } => {
                if let Some(link) = &self.cluster {
                    link.publish(Topic::All, Kind::of(opcode), payload);
                }
                self.broadcast(frame::encode(opcode, payload))
            }
            Action::Count(counter) => self.stats.inc(counter),
        }
    }

    /// After a connection's session ran: leave the uid table once it is no
    /// longer open, shut or close the socket once its output is out, and
    /// ask for a write watch while output waits.
    fn settle(&mut self, key: Key, now: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.moving && conn.reads == Reads::Off {
            return self.ship(key, now);
        }
        let phase = conn.session.phase();
        if phase != Phase::Open && conn.registered {
            self.logout(key);
        }
        let conn = self.conns.get_mut(key).expect("still here");
        let flushed = conn.out.is_empty();
        match phase {
            Phase::Done => return self.forget(key),
            Phase::Draining if flushed => return self.forget(key),
            Phase::Closing if flushed && !conn.shut_write => {
                // Our close is out whole: send FIN and wait for the
                // client's, so unread input never turns into a reset.
                // SAFETY: shutdown on a socket this shard owns.
                unsafe { libc::shutdown(conn.fd.as_raw_fd(), libc::SHUT_WR) };
                conn.shut_write = true;
            }
            _ => {}
        }
        if !flushed && !conn.watching {
            conn.watching = true;
            self.io.push(Io::WatchWrite(key, conn.fd.as_raw_fd()));
        }
    }

    /// Removes a finished connection: its uid entry, its slot, its socket.
    fn forget(&mut self, key: Key) {
        self.logout(key);
        let Some(conn) = self.conns.remove(key) else {
            return;
        };
        self.stats.dec(Counter::Connections);
        self.pending_bytes -= conn.session.buffered_bytes();
        let address = self.addresses.remove(&key);
        if conn.admitted {
            self.admission.release(address);
        }
        self.io.push(Io::Close {
            key,
            fd: conn.fd,
            watching: conn.watching,
        });
    }

    /// Closes a connection's session for a reason of the shard's.
    fn close_session(&mut self, key: Key, reason: CloseReason, now: u64) {
        let rules = self.rules.clone();
        self.with_session(key, now, |session, mut out| {
            session.close(reason, now, &rules, &mut out)
        });
    }

    /// Closes the connections that deliveries found over their limit or
    /// broken.
    fn close_troubled(&mut self, now: u64) {
        while let Some(key) = self.troubled.pop() {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            let (slow, broken) = (conn.slow, conn.broken);
            conn.slow = false;
            conn.broken = false;
            let rules = self.rules.clone();
            if broken {
                conn.out = Outbox::default();
                self.with_session(key, now, |session, _| session.abort(now, &rules));
            } else if slow && conn.session.phase() == Phase::Open {
                // Drop what waits (keeping a half-written frame whole) so
                // the close frame follows at once.
                conn.out.discard();
                self.close_session(key, CloseReason::SlowConsumer, now);
            }
        }
    }

    // ---- logging in and out ----

    /// A session logged in as `uid`: registered here when this is the
    /// uid's home, otherwise its reads stop and it moves there.
    fn login(&mut self, key: Key, uid: &str) {
        let home = self.router.home_of(uid);
        if home == self.id {
            self.register(key, uid);
            return;
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.uid = Some(Arc::from(uid));
        conn.moving = true;
        self.stop_reading(key);
    }

    /// Enters a connection in the uid table, then answers its login: from
    /// the reply on, every message for the uid finds this connection.
    fn register(&mut self, key: Key, uid: &str) {
        let (uid, first) = self.uids.add(uid, key);
        if let (true, Some(link)) = (first, &self.cluster) {
            link.held(uid.clone());
        }
        let reply = frame::encode(Opcode::Text, protocol::login_reply(&uid).as_bytes());
        if let Some(conn) = self.conns.get_mut(key) {
            conn.uid = Some(uid);
            conn.registered = true;
        }
        self.stats.inc(Counter::Logins);
        self.stats.inc(Counter::LoggedIn);
        if first {
            self.stats.inc(Counter::LocalUids);
        }
        self.write(key, &reply);
    }

    /// Takes a connection out of the uid table (once).
    fn logout(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.registered {
            return;
        }
        conn.registered = false;
        let uid = conn
            .uid
            .take()
            .expect("a registered connection has its uid");
        self.stats.dec(Counter::LoggedIn);
        if self.uids.remove(&uid, key) {
            self.stats.dec(Counter::LocalUids);
            if let Some(link) = &self.cluster {
                link.released(uid);
            }
        }
    }

    /// Takes over a connection that logged in on another shard as a uid
    /// whose home is this one: registers it, answers its login, goes on
    /// with the bytes it brought, and reads its socket from now on.
    fn adopt(&mut self, arrival: Arrival, now: u64) {
        let key = self.adopt_here(arrival, now);
        self.read(key);
        if self.stopping {
            self.close_session(key, CloseReason::Shutdown, now);
        }
    }

    fn adopt_here(&mut self, arrival: Arrival, now: u64) -> Key {
        let Arrival {
            fd,
            uid,
            session,
            outbox,
            admitted,
            address,
        } = arrival;
        self.stats.inc(Counter::Connections);
        self.pending_bytes += session.buffered_bytes();
        let mut conn = Conn::new(fd, session, outbox, admitted);
        conn.reads = Reads::Off; // until `read`
        let key = self.conns.insert(conn);
        if let Some(ip) = address {
            self.addresses.insert(key, ip);
        }
        self.register(key, &uid);
        let rules = self.rules.clone();
        self.with_session(key, now, |session, mut out| {
            session.open(now, &rules, &mut out)
        });
        key
    }

    // ---- messages leaving and arriving ----

    /// Writes one of a connection's own frames (reply, pong, close).
    fn write(&mut self, key: Key, frame: &Frame) {
        self.deliver_one(key, frame);
    }

    /// Writes `frame` to one connection; returns whether it was written or
    /// queued. Trouble (over the limit, broken socket) is noted and dealt
    /// with once the current deliveries are done.
    fn deliver_one(&mut self, key: Key, frame: &Frame) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if conn.broken {
            return false;
        }
        match conn
            .out
            .write(conn.fd.as_raw_fd(), frame, self.max_outbound_bytes)
        {
            Wrote::Ok => self.stats.add(Counter::BytesOut, frame.len() as u64),
            Wrote::OverLimit => {
                self.stats.add(Counter::BytesOut, frame.len() as u64);
                if !conn.slow && !conn.broken {
                    self.troubled.push(key);
                }
                conn.slow = true;
            }
            Wrote::Failed => {
                if !conn.slow && !conn.broken {
                    self.troubled.push(key);
                }
                conn.broken = true;
                return false;
            }
        }
        if !conn.out.is_empty() {
            self.stats.inc(Counter::FramesQueued);
            if !conn.watching {
                conn.watching = true;
                self.io.push(Io::WatchWrite(key, conn.fd.as_raw_fd()));
            }
        }
        true
    }

    /// A message for `uid`: delivered here when the uid lives here, else
    /// queued to its home (only then is the uid copied for the trip).
    fn send_to_uid(&mut self, uid: &str, frame: Frame) {
        let home = self.router.home_of(uid);
        let origin = Some(self.id);
        if home == self.id {
            self.deliver_to_uid(uid, &frame, origin);
            return;
        }
        let uid = Arc::from(uid);
        let msg = ShardMsg::ToUid {
            uid,
            frame,
            origin,
            ack: None,
        };
        let _ = self.send_to_shard(home, msg); // a stopped shard has no one to deliver to
    }

    fn broadcast(&mut self, frame: Frame) {
        self.stats.inc(Counter::Broadcasts);
        let origin = Some(self.id);
        // The other shards first, so they write to their connections while
        // this one writes to its own: a sleeping one is woken now, not at
        // the end of this turn, which the writes below make long (one
        // eventfd write per broadcast and sleeping shard).
        let me = self.id;
        for to in (0..self.router.shards() as ShardId).filter(|&to| to != me) {
            let msg = ShardMsg::Broadcast {
                frame: frame.clone(),
                origin,
                ack: None,
            };
            if self.send_to_shard(to, msg).is_ok() && self.router.take_wakeup(to) {
                self.router.wake(to);
            }
        }
        self.deliver_to_all(&frame, origin);
    }

    /// Notes that shard `to` was sent something, to wake it if it sleeps.
    fn touch(&mut self, to: ShardId) {
        if !self.touched_mask[to as usize] {
            self.touched_mask[to as usize] = true;
            self.touched.push(to);
        }
    }

    /// Delivers to every connection of `uid` (all of them live here).
    /// Returns how many connections it was written or queued to.
    fn deliver_to_uid(&mut self, uid: &str, frame: &Frame, origin: Origin) -> u64 {
        let mut keys = std::mem::take(&mut self.recipients);
        keys.extend_from_slice(self.uids.get(uid));
        if keys.is_empty() {
            self.stats.inc(Counter::NoRecipient);
        }
        let delivered = self.deliver(&keys, frame, origin);
        keys.clear();
        self.recipients = keys;
        delivered
    }

    fn deliver_to_all(&mut self, frame: &Frame, origin: Origin) -> u64 {
        let mut keys = std::mem::take(&mut self.recipients);
        keys.extend(self.uids.all());
        let delivered = self.deliver(&keys, frame, origin);
        keys.clear();
        self.recipients = keys;
        delivered
    }

    fn deliver(&mut self, keys: &[Key], frame: &Frame, origin: Origin) -> u64 {
        let mut delivered = 0;
        for &key in keys {
            if self.deliver_one(key, frame) {
                delivered += 1;
            }
        }
        let counter = if origin == Some(self.id) {
            Counter::DeliveredSameShard
        } else {
            Counter::DeliveredCrossShard
        };
        self.stats.add(counter, delivered);
        self.stats.add(Counter::MessagesOut, delivered);
        if origin.is_none() {
            self.stats.inc(Counter::OutsidePushes);
        }
        delivered
    }
}

/// The address of a connected socket's peer, if it can be told.
fn peer_ip(fd: &OwnedFd) -> Option<IpAddr> {
    let addr = socket2::SockRef::from(fd).peer_addr().ok()?;
    addr.as_socket().map(|a| a.ip())
}
