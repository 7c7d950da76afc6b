//! The cross-shard router: which shard a uid lives on, and the inboxes that
//! carry messages between shards.
//!
//! Every uid has a *home* shard, chosen by a stable hash of its bytes, and
//! every connection of the uid lives there. A connection is accepted by
//! whichever shard the kernel picks (SO_REUSEPORT); when it logs in, that
//! shard hands its socket and its session over to the uid's home
//! (`ShardMsg::Adopt`), which registers it and sends the login reply. So a
//! message for a uid takes at most one hop:
//!
//! ```text
//!   sender's shard ──(0 or 1 hop)──> home shard of the uid = every connection of the uid
//! ```
//!
//! and a broadcast goes from the sender's shard to every shard. Each hop is
//! a FIFO queue, so messages from one sender to one recipient keep their
//! order, targeted and broadcast alike.
//!
//! Each shard has one inbox: a crossbeam MPSC queue that any thread may push
//! to (shards, the HTTP API, the cluster bridge). A shard that finds its
//! inbox empty says so ([`InboxReceiver::sleep`]) before it waits; a
//! producer wakes it only then, and only once per sleep:
//!
//! - a shard producer queues its messages during a turn of its loop
//!   ([`Router::push`]), asks once per destination at the end of the turn
//!   ([`Router::take_wakeup`]), and rings the sleeper from its own io_uring
//!   (an `IORING_OP_MSG_RING` in the submission it makes anyway), so waking
//!   costs it no system call;
//! - any other thread uses [`Router::send`], which rings the shard's
//!   eventfd.
//!
//! A busy shard is never woken, and an idle one burns no CPU polling.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::outbox::Outbox;
use crate::session::frame::Frame;
use crate::session::Session;

/// A shard's index, 0..shards.
pub type ShardId = u16;

/// Where a message came from, for the same-shard / cross-shard counters.
pub type Origin = Option<ShardId>;

/// What travels between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// To a uid's home: a connection that logged in as that uid on another
    /// shard, to be registered and answered here.
    Adopt(Box<Arrival>),
    /// To the uid's home: deliver `frame` to every connection of `uid`,
    /// and report how many to `ack`, if any.
    ToUid {
        /// The recipient.
        uid: Arc<str>,
        /// The encoded server frame, shared by every connection it goes to.
        frame: Frame,
        /// The sender's shard; `None` from a thread that is not a shard.
        origin: Origin,
        /// Where to report how many connections got it.
        ack: Option<Ack>,
    },
    /// To every shard: deliver `frame` to every logged-in connection.
    Broadcast {
        /// The encoded server frame, shared by every connection it goes to.
        frame: Frame,
        /// The sender's shard; `None` from a thread that is not a shard.
        origin: Origin,
        /// Where to report how many connections got it.
        ack: Option<Ack>,
    },
    /// To the uid's home: report how many connections `uid` has.
    Online {
        /// The uid asked about.
        uid: Arc<str>,
        /// Where to report the count.
        ack: Ack,
    },
    /// Stop accepting, close every connection with 1001, then stop.
    Shutdown,
}

/// Where a shard reports a count back to a thread outside the shards (how
/// many connections a push reached, how many a uid has). One `Ack` per
/// message; a [`Tally`] sums the acks of one request, and its waiter wakes
/// when the last one is in. An ack dropped unanswered (its shard stopped)
/// counts 0, so a waiter never waits forever.
#[derive(Debug)]
pub struct Ack {
    tally: Option<Arc<Tally>>,
}

/// The counts of one request, summed as its acks come in.
#[derive(Debug, Default)]
pub struct Tally {
    /// Acks not in yet.
    remaining: AtomicUsize,
    total: AtomicU64,
    /// Woken by the last ack.
    waker: AtomicWaker,
}

impl Tally {
    /// A tally waiting for `acks` acks, and those acks.
    pub fn new(acks: usize) -> (Arc<Tally>, Vec<Ack>) {
        let tally = Arc::new(Tally {
            remaining: AtomicUsize::new(acks),
            ..Tally::default()
        });
        let acks = (0..acks)
            .map(|_| Ack {
                tally: Some(tally.clone()),
            })
            .collect();
        (tally, acks)
    }

    /// The sum, once every ack is in.
    pub fn total(&self) -> Option<u64> {
        (self.remaining.load(SeqCst) == 0).then(|| self.total.load(SeqCst))
    }

    /// Registers the waker to wake when every ack is in.
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

impl Ack {
    /// Reports `n`.
    pub fn done(mut self, n: u64) {
        if let Some(tally) = self.tally.take() {
            tally.total.fetch_add(n, SeqCst);
            if tally.remaining.fetch_sub(1, SeqCst) == 1 {
                tally.waker.wake();
            }
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if self.tally.is_some() {
            Ack {
                tally: self.tally.take(),
            }
            .done(0);
        }
    }
}

/// A logged-in connection on its way to the home shard of its uid: the
/// socket itself (no copy of it), its session, and its unsent output.
#[derive(Debug)]
pub struct Arrival {
    pub fd: OwnedFd,
    pub uid: Arc<str>,
    /// In `Phase::LoggingIn`, with any bytes read behind the login.
    pub session: Session,
    pub outbox: Outbox,
    /// It holds a place in the admission counts, and from which address.
    pub admitted: bool,
    pub address: Option<std::net::IpAddr>,
}

/// The uid's 64-bit FNV-1a hash: stable across runs, machines and builds
/// (the cluster's nodes rely on agreeing on it).
pub fn uid_hash(uid: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in uid.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The uid's home shard: its hash modulo the shard count.
pub fn home_of(uid: &str, shards: usize) -> ShardId {
    (uid_hash(uid) % shards as u64) as ShardId
}

/// What producers share with one shard.
#[derive(Debug)]
struct Inbox {
    tx: Sender<ShardMsg>,
    /// Set by the shard just before it waits; the producer that clears it
    /// wakes the shard, so one wake-up covers any number of messages.
    asleep: AtomicBool,
    /// Written by threads that are not shards to wake this shard.
    eventfd: OwnedFd,
    /// This shard's io_uring, for `IORING_OP_MSG_RING` from other shards'
    /// rings; -1 while it has none.
    ring_fd: AtomicI32,
}

/// Sends messages to shards. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct Router {
    inboxes: Arc<[Inbox]>,
}

/// Why a message could not be queued; it is given back.
#[derive(Debug)]
pub enum PushError {
    /// The inbox is full: try again once the shard has drained some.
    Full(ShardMsg),
    /// The shard has stopped.
    Stopped(ShardMsg),
}

/// A shard's end of its inbox.
#[derive(Debug)]
pub struct InboxReceiver {
    rx: Receiver<ShardMsg>,
    router: Router,
    id: ShardId,
}

impl Router {
    /// Builds the router and one receiver per shard, whose inbox holds at
    /// most `capacity` messages.
    pub fn new(shards: usize, capacity: usize) -> io::Result<(Router, Vec<InboxReceiver>)> {
        let mut inboxes = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
            // SAFETY: eventfd returns a new descriptor that we own, or -1.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just created and is owned by nobody else.
            let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
            inboxes.push(Inbox {
                tx,
                asleep: AtomicBool::new(false),
                eventfd,
                ring_fd: AtomicI32::new(-1),
            });
            receivers.push(rx);
        }
        let router = Router {
            inboxes: inboxes.into(),
        };
        let receivers = receivers
            .into_iter()
            .enumerate()
            .map(|(i, rx)| InboxReceiver {
                rx,
                router: router.clone(),
                id: i as ShardId,
            })
            .collect();
        Ok((router, receivers))
    }

    /// How many shards there are.
    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// The uid's home shard.
    pub fn home_of(&self, uid: &str) -> ShardId {
        home_of(uid, self.shards())
    }

    /// Queues `msg` for shard `to` without waking it; the caller asks
    /// [`Router::take_wakeup`] once it has queued what it has. Gives the
    /// message back when the inbox is full or the shard has stopped.
    pub fn push(&self, to: ShardId, msg: ShardMsg) -> Result<(), PushError> {
        self.inboxes[to as usize]
            .tx
            .try_send(msg)
            .map_err(|e| match e {
                TrySendError::Full(msg) => PushError::Full(msg),
                TrySendError::Disconnected(msg) => PushError::Stopped(msg),
            })
    }

    /// After pushes to `to`: whether it sleeps and must be woken. True once
    /// per sleep, for the one producer that takes the wake-up.
    pub fn take_wakeup(&self, to: ShardId) -> bool {
        fence(SeqCst); // the pushes before, the shard's emptiness check after
        self.inboxes[to as usize].asleep.swap(false, SeqCst)
    }

    /// Wakes shard `to` through its eventfd.
    pub fn wake(&self, to: ShardId) {
        let one: u64 = 1;
        let fd = self.inboxes[to as usize].eventfd.as_raw_fd();
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. A
        // failure (the counter is saturated) means a wake-up is pending.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }

    /// Queues `msg` for shard `to` and wakes it if it sleeps: for threads
    /// that are not shards. While the inbox is full the calling thread
    /// waits (backpressure on the HTTP API or the cluster bus, never a
    /// drop). Gives the message back when the shard stopped.
    pub fn send(&self, to: ShardId, mut msg: ShardMsg) -> Result<(), ShardMsg> {
        let mut pause = std::time::Duration::from_micros(20);
        loop {
            match self.push(to, msg) {
                Ok(()) => break,
                Err(PushError::Stopped(back)) => return Err(back),
                Err(PushError::Full(back)) => {
                    msg = back;
                    if self.take_wakeup(to) {
                        self.wake(to);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(5));
                }
            }
        }
        if self.take_wakeup(to) {
            self.wake(to);
        }
        Ok(())
    }

    /// Sends to every shard a message built by `make` for each.
    pub fn send_all(&self, mut make: impl FnMut(ShardId) -> ShardMsg) {
        for to in 0..self.shards() as ShardId {
            let _ = self.send(to, make(to));
        }
    }

    /// Shard `to`'s io_uring descriptor, once it has one.
    pub fn ring_fd(&self, to: ShardId) -> Option<RawFd> {
        let fd = self.inboxes[to as usize].ring_fd.load(SeqCst);
        (fd >= 0).then_some(fd)
    }
}

impl InboxReceiver {
    /// The shard whose inbox this is.
    pub fn id(&self) -> ShardId {
        self.id
    }

    fn inbox(&self) -> &Inbox {
        &self.router.inboxes[self.id as usize]
    }

    /// The next message, if one waits.
    pub fn try_recv(&self) -> Option<ShardMsg> {
        self.rx.try_recv().ok()
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Declares that the shard is about to wait. Returns false (and stays
    /// awake) when a message slipped in meanwhile: drain again instead.
    pub fn sleep(&self) -> bool {
        self.inbox().asleep.store(true, SeqCst);
        fence(SeqCst);
        if self.rx.is_empty() {
            return true;
        }
        self.inbox().asleep.store(false, SeqCst);
        false
    }

    /// The shard is running again: producers need not wake it.
    pub fn awake(&self) {
        self.inbox().asleep.store(false, SeqCst);
    }

    /// The eventfd that threads outside the shards write to wake this one.
    pub fn eventfd(&self) -> RawFd {
        self.inbox().eventfd.as_raw_fd()
    }

    /// Publishes this shard's io_uring descriptor for MSG_RING wake-ups
    /// (-1 to withdraw it before the ring closes).
    pub fn set_ring_fd(&self, fd: RawFd) {
        self.inbox().ring_fd.store(fd, SeqCst);
    }

    /// Empties the eventfd's counter after it woke the shard.
    pub fn clear_eventfd(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from an eventfd we own;
        // EAGAIN (already clear) is fine.
        unsafe { libc::read(self.eventfd(), (&mut count as *mut u64).cast(), 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_is_pinned_and_spread() {
        // Pinned values: every node of a cluster, every build and every
        // machine must agree on them (FNV-1a 64 of the uid's bytes).
        assert_eq!(uid_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(uid_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(uid_hash("alice"), 0x508b_2abb_65a0_3907);
        assert_eq!(home_of("alice", 1), 0);
        assert_eq!(home_of("alice", 7), 1);
        assert_eq!(home_of("alice", 2), 1);
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[home_of(&format!("u{i}"), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    fn eventfd_count(rx: &InboxReceiver) -> u64 {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from the eventfd.
        let n = unsafe { libc::read(rx.eventfd(), (&mut count as *mut u64).cast(), 8) };
        if n == 8 {
            count
        } else {
            0
        }
    }

    #[test]
    fn wakes_only_a_sleeping_shard_once_per_sleep() {
        let (router, mut rx) = Router::new(1, 16).unwrap();
        let rx = rx.remove(0);

        router.send(0, ShardMsg::Shutdown).unwrap();
        assert_eq!(eventfd_count(&rx), 0, "awake: no wake-up");
        assert!(!rx.sleep(), "a message is waiting: do not sleep");
        assert!(matches!(rx.try_recv(), Some(ShardMsg::Shutdown)));

        assert!(rx.sleep());
        router.send(0, ShardMsg::Shutdown).unwrap();
        router.send(0, ShardMsg::Shutdown).unwrap();
        assert_eq!(eventfd_count(&rx), 1, "one wake-up for two messages");

        // A shard producer asks once per batch.
        rx.awake();
        assert!(!rx.sleep(), "two messages still wait");
        while rx.try_recv().is_some() {}
        assert!(rx.sleep());
        router.push(0, ShardMsg::Shutdown).unwrap();
        router.push(0, ShardMsg::Shutdown).unwrap();
        assert!(router.take_wakeup(0));
        assert!(!router.take_wakeup(0), "the wake-up is taken once");
        assert_eq!(eventfd_count(&rx), 0, "push alone never rings");
    }

    #[test]
    fn a_full_inbox_gives_the_message_back() {
        let (router, rx) = Router::new(1, 2).unwrap();
        router.push(0, ShardMsg::Shutdown).unwrap();
        router.push(0, ShardMsg::Shutdown).unwrap();
        assert!(matches!(
            router.push(0, ShardMsg::Shutdown),
            Err(PushError::Full(ShardMsg::Shutdown))
        ));
        assert!(rx[0].try_recv().is_some());
        router.push(0, ShardMsg::Shutdown).expect("room again");
    }

    #[test]
    fn a_tally_sums_its_acks_and_counts_a_dropped_one_as_zero() {
        let (tally, mut acks) = Tally::new(3);
        acks.pop().unwrap().done(5);
        assert_eq!(tally.total(), None, "two acks are still out");
        acks.pop().unwrap().done(2);
        drop(acks); // the third shard stopped without answering
        assert_eq!(tally.total(), Some(7));
    }

    #[test]
    fn a_stopped_shard_gives_the_message_back() {
        let (router, rx) = Router::new(2, 16).unwrap();
        drop(rx);
        assert!(matches!(
            router.send(1, ShardMsg::Shutdown),
            Err(ShardMsg::Shutdown)
        ));
    }
}
