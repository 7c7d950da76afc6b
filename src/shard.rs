//! A shard: one glommio executor pinned to one core, owning everything its
//! connections need. Nothing here is shared with another thread except the
//! inbox (a lock-free queue) and the counters (written only here).
//!
//! Four kinds of task run on a shard:
//! - the accept loop, on the shard's own SO_REUSEPORT listener;
//! - one task per connection (`connection::serve`);
//! - the inbox loop, which handles what other shards and threads send;
//! - the sweeper, which enforces deadlines and sends pings for all the
//!   shard's connections in one pass, so no connection owns a timer.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, UnixStream};
use glommio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::Config;
use crate::connection::{self, ConnState, Handover, Kill, Phase};
use crate::frame::{self, Frame, Opcode};
use crate::limits;
use crate::protocol;
use crate::router::{InboxReceiver, Origin, Router, ShardId, ShardMsg};
use crate::slab::{Key, Slab};
use crate::stats::{Counter, ShardStats};
use crate::uid_table::UidTable;

/// Size of the read buffer shared by a shard's connections.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Inbox messages handled before the inbox loop yields to other tasks.
const INBOX_BATCH: usize = 256;

pub struct Shard {
    pub id: ShardId,
    pub config: Arc<Config>,
    pub stats: Arc<ShardStats>,
    router: Router,
    inbox: InboxReceiver,
    conns: RefCell<Slab<ConnState>>,
    /// The uids whose home is this shard, with their connections (all of
    /// them live here).
    uids: RefCell<UidTable>,
    /// The read buffer every connection of this shard reads into, taken for
    /// the duration of one read and its processing.
    scratch: RefCell<Vec<u8>>,
    /// One encoded empty Ping, shared by every connection the sweeper pings.
    ping: Frame,
    /// When the shard started; the shard clock counts ms from here.
    epoch: Instant,
    /// The shard clock, refreshed by the sweeper and by each inbox wake-up.
    /// Connections read it instead of the system clock.
    now_ms: Cell<u64>,
    /// The accept loop, cancelled at shutdown (which closes the listener).
    accept_task: RefCell<Option<JoinHandle<()>>>,
}

impl Shard {
    pub fn new(
        id: ShardId,
        config: Arc<Config>,
        router: Router,
        inbox: InboxReceiver,
        stats: Arc<ShardStats>,
    ) -> Shard {
        Shard {
            id,
            config,
            stats,
            router,
            inbox,
            conns: RefCell::new(Slab::default()),
            uids: RefCell::new(UidTable::default()),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES]),
            ping: frame::encode(Opcode::Ping, &[]),
            epoch: Instant::now(),
            now_ms: Cell::new(0),
            accept_task: RefCell::new(None),
        }
    }

    /// Runs the shard until it has been told to shut down and every
    /// connection is gone.
    pub async fn run(self: Rc<Self>, listener: TcpListener, wake: UnixStream) {
        let accept = glommio::spawn_local(accept_loop(self.clone(), listener)).detach();
        *self.accept_task.borrow_mut() = Some(accept);
        glommio::spawn_local(sweep_loop(self.clone())).detach();
        self.inbox_loop(wake).await;
        while !self.conns.borrow().is_empty() {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }

    // ---- the shard clock and shared buffers ----

    pub fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    fn tick(&self) -> u64 {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.now_ms.set(now);
        now
    }

    pub fn login_timeout_ms(&self) -> u64 {
        self.config.login_timeout_ms.as_millis() as u64
    }

    pub fn close_timeout_ms(&self) -> u64 {
        self.config.close_timeout_ms.as_millis() as u64
    }

    pub fn take_scratch(&self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut *self.scratch.borrow_mut());
        if buf.is_empty() {
            buf = vec![0; SCRATCH_BYTES]; // only if a read ever nests
        }
        buf
    }

    pub fn put_scratch(&self, buf: Vec<u8>) {
        *self.scratch.borrow_mut() = buf;
    }

    /// Runs `f` on a connection's state. The connection's own task calls
    /// this only for its own key, which exists until `forget`.
    pub fn with_conn<R>(&self, key: Key, f: impl FnOnce(&mut ConnState) -> R) -> R {
        let mut conns = self.conns.borrow_mut();
        f(conns
            .get_mut(key)
            .expect("a connection's state outlives its task"))
    }

    // ---- connections arriving and leaving ----

    /// Adopts an accepted stream: a slot in the connection table and a task.
    pub fn open(self: &Rc<Self>, stream: glommio::net::TcpStream) {
        use std::os::fd::AsRawFd;
        let _ = stream.set_nodelay(true);
        let now = self.tick();
        let deadline = now + self.config.handshake_timeout_ms.as_millis() as u64;
        let state = ConnState::new(stream.as_raw_fd(), now, deadline);
        let key = self.conns.borrow_mut().insert(state);
        self.stats.inc(Counter::Accepted);
        self.stats.inc(Counter::Connections);
        glommio::spawn_local(connection::serve(self.clone(), key, stream, Vec::new())).detach();
    }

    /// Takes over a connection that logged in on another shard as a uid
    /// whose home is this one: registers it, answers its login, and goes on
    /// with any bytes the other shard had already read.
    fn adopt(self: &Rc<Self>, handover: Handover) {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let Handover {
            fd,
            uid,
            carry,
            backlog,
        } = handover;
        // SAFETY: the descriptor was duplicated for this shard alone and its
        // ownership moves into the stream.
        let stream = unsafe { glommio::net::TcpStream::from_raw_fd(fd.into_raw_fd()) };
        let now = self.tick();
        let mut state = ConnState::new(std::os::fd::AsRawFd::as_raw_fd(&stream), now, u64::MAX);
        state.backlog = backlog;
        let key = self.conns.borrow_mut().insert(state);
        self.stats.inc(Counter::Connections);
        self.login(key, &uid);
        glommio::spawn_local(connection::serve(self.clone(), key, stream, carry)).detach();
    }

    /// Sends a connection that logged in here to its uid's home shard.
    pub fn hand_over(&self, home: ShardId, handover: Handover) {
        self.stats.inc(Counter::HandedOver);
        self.stats.inc(Counter::CrossShardSent);
        self.router.send(home, ShardMsg::Adopt(Box::new(handover)));
    }

    /// Removes a finished connection: its uid entry, then its slot.
    pub fn forget(&self, key: Key) {
        self.logout(key);
        self.conns.borrow_mut().remove(key);
        self.stats.dec(Counter::Connections);
    }

    /// The shard every connection of `uid` lives on.
    pub fn home_of(&self, uid: &str) -> ShardId {
        self.router.home_of(uid)
    }

    /// Registers a login of a uid homed here, then answers it: from the
    /// reply on, every message for the uid finds this connection.
    pub fn login(&self, key: Key, uid: &str) {
        let (uid, first) = self.uids.borrow_mut().add(uid, key);
        let reply = frame::encode(Opcode::Text, protocol::login_reply(&uid).as_bytes());
        let limit = self.config.max_outbound_bytes;
        self.with_conn(key, |c| {
            c.uid = Some(uid);
            c.phase = Phase::Open;
            c.deadline_ms = u64::MAX;
            c.write(&reply, limit);
        });
        self.stats.inc(Counter::Logins);
        self.stats.inc(Counter::LoggedIn);
        if first {
            self.stats.inc(Counter::LocalUids);
        }
    }

    /// Takes a connection out of the uid table (once; later calls do nothing).
    pub fn logout(&self, key: Key) {
        let Some(uid) = self.with_conn(key, |c| c.uid.take()) else {
            return;
        };
        self.stats.dec(Counter::LoggedIn);
        if self.uids.borrow_mut().remove(&uid, key) {
            self.stats.dec(Counter::LocalUids);
        }
    }

    // ---- messages leaving a connection ----

    /// A message for `uid`: delivered here when the uid lives here, else
    /// queued to its home (only then is the uid copied for the trip).
    pub fn send_to_uid(&self, uid: &str, frame: Frame) {
        let home = self.router.home_of(uid);
        let origin = Some(self.id);
        if home == self.id {
            self.deliver_to_uid(uid, &frame, origin);
            return;
        }
        self.stats.inc(Counter::CrossShardSent);
        let uid = Arc::from(uid);
        self.router
            .send(home, ShardMsg::ToUid { uid, frame, origin });
    }

    pub fn broadcast(&self, frame: Frame) {
        self.stats.inc(Counter::Broadcasts);
        let origin = Some(self.id);
        // The other shards first, so they write to their connections while
        // this one writes to its own.
        for to in (0..self.router.shards() as ShardId).filter(|&to| to != self.id) {
            self.stats.inc(Counter::CrossShardSent);
            let frame = frame.clone();
            self.router.send(to, ShardMsg::Broadcast { frame, origin });
        }
        self.deliver_to_all(&frame, origin);
    }

    // ---- messages arriving at the shard ----

    async fn inbox_loop(self: &Rc<Self>, mut wake: UnixStream) {
        let mut bell = [0u8; 64];
        loop {
            let mut handled = 0;
            while let Some(msg) = self.inbox.try_recv() {
                self.stats.inc(Counter::InboxReceived);
                if let ShardMsg::Shutdown = msg {
                    self.shut_down();
                    return;
                }
                self.handle(msg);
                handled += 1;
                if handled % INBOX_BATCH == 0 {
                    glommio::yield_if_needed().await;
                }
            }
            if self.inbox.arm() {
                let _ = wake.read(&mut bell).await;
                self.tick();
            }
        }
    }

    fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Adopt(handover) => self.adopt(*handover),
            ShardMsg::ToUid { uid, frame, origin } => self.deliver_to_uid(&uid, &frame, origin),
            ShardMsg::Broadcast { frame, origin } => self.deliver_to_all(&frame, origin),
            ShardMsg::Shutdown => self.shut_down(),
        }
    }

    /// Delivers to every connection of `uid` (all of them live here).
    fn deliver_to_uid(&self, uid: &str, frame: &Frame, origin: Origin) {
        let uids = self.uids.borrow();
        let conns = uids.get(uid);
        if conns.is_empty() {
            self.stats.inc(Counter::NoRecipient);
        }
        self.deliver(conns.iter().copied(), frame, origin);
    }

    fn deliver_to_all(&self, frame: &Frame, origin: Origin) {
        let uids = self.uids.borrow();
        self.deliver(uids.all(), frame, origin);
    }

    fn deliver(&self, keys: impl Iterator<Item = Key>, frame: &Frame, origin: Origin) {
        let limit = self.config.max_outbound_bytes;
        let mut conns = self.conns.borrow_mut();
        let (mut delivered, mut queued) = (0, 0);
        for key in keys {
            if let Some(conn) = conns.get_mut(key) {
                if conn.deliver(frame, limit) {
                    delivered += 1;
                    if conn.queued_bytes() > 0 {
                        queued += 1;
                    }
                }
            }
        }
        let counter = if origin == Some(self.id) {
            Counter::DeliveredSameShard
        } else {
            Counter::DeliveredCrossShard
        };
        self.stats.add(counter, delivered);
        self.stats.add(Counter::FramesQueued, queued);
    }

    // ---- deadlines and shutdown ----

    /// One pass over every connection: phase deadlines, idle timeouts, pings.
    /// Then, if most connections have gone, the tables give memory back.
    fn sweep(&self) {
        self.conns.borrow_mut().shrink_if_sparse();
        self.uids.borrow_mut().shrink_if_sparse();
        let now = self.tick();
        let ping_after = self.config.ping_interval_ms.as_millis() as u64;
        let idle_after = self.config.idle_timeout_ms.as_millis() as u64;
        let limit = self.config.max_outbound_bytes;
        for (_, conn) in self.conns.borrow_mut().iter_mut() {
            if conn.kill.is_some() {
                continue;
            }
            let kill = match conn.phase {
                Phase::Handshake | Phase::Login if now >= conn.deadline_ms => Some(Kill::Timeout),
                Phase::Closing if now >= conn.deadline_ms => Some(Kill::Drop),
                Phase::Open if now.saturating_sub(conn.last_rx_ms) >= idle_after => {
                    Some(Kill::Timeout)
                }
                Phase::Open if now.saturating_sub(conn.last_rx_ms) >= ping_after => {
                    if !conn.ping_sent {
                        conn.ping_sent = true;
                        conn.write(&self.ping, limit);
                    }
                    None
                }
                _ => None,
            };
            if let Some(kill) = kill {
                conn.request_kill(kill);
            }
        }
    }

    /// Stops accepting and asks every connection to close with 1001.
    fn shut_down(&self) {
        if let Some(accept) = self.accept_task.borrow_mut().take() {
            accept.cancel();
        }
        for (_, conn) in self.conns.borrow_mut().iter_mut() {
            conn.request_kill(Kill::Shutdown);
        }
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let mut last_warning: Option<Instant> = None;
    let mut failures_since_warning = 0u64;
    loop {
        match listener.accept().await {
            Ok(stream) => shard.open(stream),
            Err(e) => {
                let e = std::io::Error::from(e);
                if !limits::is_fd_exhaustion(&e) {
                    debug!(shard = shard.id, error = %e, "accept failed");
                    continue;
                }
                // Out of descriptors: keep serving the connections we have,
                // retry shortly, and say so at most every 5 seconds.
                shard.stats.inc(Counter::AcceptFdExhausted);
                failures_since_warning += 1;
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    warn!(
                        shard = shard.id,
                        error = %e,
                        failures = failures_since_warning,
                        connections = shard.conns.borrow().len(),
                        "cannot accept: out of file descriptors; raise `ulimit -n` \
                         (systemd: LimitNOFILE=) to hold more connections"
                    );
                    last_warning = Some(Instant::now());
                    failures_since_warning = 0;
                }
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn sweep_loop(shard: Rc<Shard>) {
    let every = shard.config.sweep_interval();
    loop {
        glommio::timer::sleep(every).await;
        shard.sweep();
    }
}
