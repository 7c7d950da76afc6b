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

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::{self, Link, Topic};
use crate::outbox::{Outbox, Wrote};
use crate::protocol;
use crate::router::{Arrival, InboxReceiver, Origin, Router, ShardId, ShardMsg};
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
    /// or one whose reads were stopped for a move that did not happen.
    Read(Key, RawFd),
    /// The socket refused a write: call [`Shard::on_writable`] when it has
    /// room.
    WatchWrite(Key, RawFd),
    /// The connection moves to another shard: stop reading its socket, and
    /// call [`Shard::on_reads_stopped`] once no more bytes can arrive here.
    StopReading(Key),
    /// The connection is gone: stop reading and watching it (`watching`
    /// says whether a write watch is pending) and close the socket.
    Close {
        key: Key,
        fd: OwnedFd,
        watching: bool,
    },
    /// Stop accepting connections (shutdown).
    StopAccepting,
}

/// One connection as the shard holds it: 64 bytes, plus the outbox's queue
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
}

pub struct Shard {
    pub id: ShardId,
    pub stats: Arc<ShardStats>,
    /// What every session obeys (shared with the shard's other threads'
    /// shards; cloned, not copied, into each call).
    rules: Arc<Rules>,
    /// Bytes that may wait in user space for one connection.
    max_outbound_bytes: usize,
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
    /// Shutting down: no new connections, and done when none is left.
    stopping: bool,
    /// In a cluster: where messages for other nodes and the uids held here
    /// go (`crate::cluster`).
    cluster: Option<Link>,
}

impl Shard {
    pub fn new(
        inbox: InboxReceiver,
        router: Router,
        rules: Arc<Rules>,
        max_outbound_bytes: usize,
        stats: Arc<ShardStats>,
    ) -> Shard {
        let shards = router.shards();
        Shard {
            id: inbox.id(),
            stats,
            rules,
            max_outbound_bytes,
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

    pub fn inbox(&self) -> &InboxReceiver {
        &self.inbox
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Connections held, in any phase.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
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
        Some(self.conns.insert(Conn {
            fd,
            session: Session::new(now, &self.rules),
            out: Outbox::default(),
            uid: None,
            registered: false,
            moving: false,
            watching: false,
            shut_write: false,
            slow: false,
            broken: false,
        }))
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
        self.settle(key);
    }

    /// The socket's reads ended (end of stream, error, cancelled, or out of
    /// buffers). Returns the socket when the driver should read it again.
    pub fn on_reads_ended(&mut self, key: Key, now: u64) -> Option<RawFd> {
        let conn = self.conns.get(key)?;
        if conn.moving {
            self.on_reads_stopped(key, now);
            return None;
        }
        let ended = matches!(conn.session.phase(), Phase::Draining | Phase::Done);
        (!ended).then(|| conn.fd.as_raw_fd())
    }

    /// A moving connection's reads stopped: nothing more can arrive here,
    /// so it goes to its uid's home with everything read so far.
    pub fn on_reads_stopped(&mut self, key: Key, now: u64) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.moving {
            return;
        }
        conn.moving = false;
        let fd = conn.fd.as_raw_fd();
        if self.stopping {
            // Stay and close here: the home shard is stopping too.
            self.io.push(Io::Read(key, fd));
            self.close_session(key, CloseReason::Shutdown, now);
            return;
        }
        let conn = self.conns.remove(key).expect("just found");
        let uid = conn.uid.expect("a moving connection has its uid");
        let home = self.router.home_of(&uid);
        let arrival = Box::new(Arrival {
            fd: conn.fd,
            uid,
            session: conn.session,
            outbox: conn.out,
        });
        self.stats.dec(Counter::Connections);
        match self.router.push(home, ShardMsg::Adopt(arrival)) {
            Ok(()) => {
                self.stats.inc(Counter::HandedOver);
                self.stats.inc(Counter::CrossShardSent);
                self.touch(home);
            }
            Err(ShardMsg::Adopt(arrival)) => {
                // The home shard has stopped: the server is going away.
                let key = self.adopt_here(*arrival, now);
                self.close_session(key, CloseReason::Shutdown, now);
            }
            Err(_) => unreachable!("push gives back the message it was given"),
        }
    }

    /// Handles what other shards and threads sent; returns how many.
    pub fn on_inbox(&mut self, now: u64) -> usize {
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
        self.conns.shrink_if_sparse();
        self.uids.shrink_if_sparse();
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
        f(&mut session, &mut |action| self.act(key, action));
        if session.phase() == Phase::LoggingIn && self.is_registered(key) {
            // Logged in here: bytes kept behind the login are handled now.
            let rules = self.rules.clone();
            session.open(now, &rules, &mut |action| self.act(key, action));
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.session = session;
        }
        self.close_troubled(now);
        self.settle(key);
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
                    link.publish(Topic::Uid(uid), cluster::kind_of(opcode), payload);
                }
                self.send_to_uid(uid, frame::encode(opcode, payload))
            }
            Action::ToAll { opcode, payload } => {
                if let Some(link) = &self.cluster {
                    link.publish(Topic::All, cluster::kind_of(opcode), payload);
                }
                self.broadcast(frame::encode(opcode, payload))
            }
            Action::Count(counter) => self.stats.inc(counter),
        }
    }

    /// After a connection's session ran: leave the uid table once it is no
    /// longer open, shut or close the socket once its output is out, and
    /// ask for a write watch while output waits.
    fn settle(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
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
        self.io.push(Io::StopReading(key));
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
        let fd = self.conns.get(key).map(|c| c.fd.as_raw_fd());
        if let Some(fd) = fd {
            self.io.push(Io::Read(key, fd));
        }
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
        } = arrival;
        self.stats.inc(Counter::Connections);
        let key = self.conns.insert(Conn {
            fd,
            session,
            out: outbox,
            uid: None,
            registered: false,
            moving: false,
            watching: false,
            shut_write: false,
            slow: false,
            broken: false,
        });
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
            Wrote::Ok => {}
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
        if self.router.push(home, msg).is_ok() {
            self.stats.inc(Counter::CrossShardSent);
            self.touch(home);
        }
    }

    fn broadcast(&mut self, frame: Frame) {
        self.stats.inc(Counter::Broadcasts);
        let origin = Some(self.id);
        // The other shards first, so they write to their connections while
        // this one writes to its own.
        let me = self.id;
        for to in (0..self.router.shards() as ShardId).filter(|&to| to != me) {
            let msg = ShardMsg::Broadcast {
                frame: frame.clone(),
                origin,
                ack: None,
            };
            if self.router.push(to, msg).is_ok() {
                self.stats.inc(Counter::CrossShardSent);
                self.touch(to);
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
