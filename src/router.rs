//! The cross-shard router: which shard a uid lives on, and the inboxes that
//! carry messages between shards.
//!
//! Every uid has a *home* shard, chosen by a stable hash of its bytes, and
//! every connection of the uid lives there. A connection is accepted by
//! whichever shard the kernel picks (SO_REUSEPORT); when it logs in, that
//! shard hands its socket over to the uid's home (`ShardMsg::Adopt`), which
//! registers it and sends the login reply. So a message for a uid takes at
//! most one hop:
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
//! to (shards, and later the HTTP API and the cluster bridge), plus a
//! doorbell: a socket pair the shard waits on, through io_uring, only when its
//! queue is empty. A producer rings it only when the shard has said it is
//! about to sleep, so a busy shard is never woken by syscalls and an idle one
//! burns no CPU polling. docs/decisions.md has the measurements.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::connection::Handover;
use crate::frame::Frame;

/// A shard's index, 0..shards.
pub type ShardId = u16;

/// Where a message came from, for the same-shard / cross-shard counters.
pub type Origin = Option<ShardId>;

/// What travels between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// To a uid's home: a connection that just logged in as that uid on
    /// another shard, to be registered and answered here.
    Adopt(Box<Handover>),
    /// To the uid's home: deliver `frame` to every connection of `uid`.
    ToUid {
        uid: Arc<str>,
        frame: Frame,
        origin: Origin,
    },
    /// To every shard: deliver `frame` to every logged-in connection.
    Broadcast { frame: Frame, origin: Origin },
    /// Stop accepting, close every connection with 1001, then stop.
    Shutdown,
}

/// The uid's home shard: FNV-1a of its bytes, modulo the shard count. Stable
/// across runs and machines, so later cluster nodes agree on it.
pub fn home_of(uid: &str, shards: usize) -> ShardId {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in uid.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards as u64) as ShardId
}

/// Wakes a sleeping shard. Shared by every producer of one inbox.
#[derive(Debug)]
struct Doorbell {
    /// Set by the shard just before it sleeps; the producer that clears it
    /// rings, so one ring covers any number of messages.
    armed: AtomicBool,
    /// Write end of the socket pair; the shard reads the other end.
    ring: UnixStream,
}

#[derive(Debug)]
struct Inbox {
    tx: Sender<ShardMsg>,
    bell: Arc<Doorbell>,
}

/// Sends messages to shards. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct Router {
    inboxes: Arc<[Inbox]>,
}

/// A shard's end of its inbox.
#[derive(Debug)]
pub struct InboxReceiver {
    rx: Receiver<ShardMsg>,
    bell: Arc<Doorbell>,
    /// Read end of the doorbell, for the shard to wait on.
    pub wake_fd: Option<OwnedFd>,
}

impl Router {
    /// Builds the router and one receiver per shard.
    pub fn new(shards: usize) -> std::io::Result<(Router, Vec<InboxReceiver>)> {
        let mut inboxes = Vec::with_capacity(shards);
        let mut receivers = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = crossbeam_channel::unbounded();
            let (ring, wake) = UnixStream::pair()?;
            ring.set_nonblocking(true)?;
            wake.set_nonblocking(true)?;
            let bell = Arc::new(Doorbell {
                armed: AtomicBool::new(false),
                ring,
            });
            inboxes.push(Inbox {
                tx,
                bell: bell.clone(),
            });
            receivers.push(InboxReceiver {
                rx,
                bell,
                wake_fd: Some(OwnedFd::from(wake)),
            });
        }
        let router = Router {
            inboxes: inboxes.into(),
        };
        Ok((router, receivers))
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    pub fn home_of(&self, uid: &str) -> ShardId {
        home_of(uid, self.shards())
    }

    /// Puts `msg` on shard `to`'s inbox and wakes it if it sleeps.
    pub fn send(&self, to: ShardId, msg: ShardMsg) {
        let inbox = &self.inboxes[to as usize];
        if inbox.tx.send(msg).is_err() {
            return; // that shard has stopped: nothing left to deliver to
        }
        fence(SeqCst);
        if inbox.bell.armed.swap(false, SeqCst) {
            // A full socket buffer means a wake-up is already pending.
            let _ = (&inbox.bell.ring).write(&[1]);
        }
    }

    /// Sends `msg` to every shard, built by `make` for each.
    pub fn send_all(&self, mut make: impl FnMut(ShardId) -> ShardMsg) {
        for to in 0..self.shards() {
            self.send(to as ShardId, make(to as ShardId));
        }
    }
}

impl InboxReceiver {
    pub fn try_recv(&self) -> Option<ShardMsg> {
        self.rx.try_recv().ok()
    }

    /// Declares that the shard is about to wait on `wake_fd`. Returns false
    /// (and disarms) when a message slipped in meanwhile: drain again instead.
    pub fn arm(&self) -> bool {
        self.bell.armed.store(true, SeqCst);
        fence(SeqCst);
        if self.rx.is_empty() {
            return true;
        }
        self.bell.armed.store(false, SeqCst);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn home_is_stable_and_spread() {
        assert_eq!(home_of("alice", 1), 0);
        assert_eq!(home_of("alice", 7), home_of("alice", 7));
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[home_of(&format!("u{i}"), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn rings_only_when_armed() {
        let (router, mut rx) = Router::new(1).unwrap();
        let rx = rx.remove(0);
        let mut wake = UnixStream::from(rx.wake_fd.as_ref().unwrap().try_clone().unwrap());
        let mut byte = [0u8; 8];

        router.send(0, ShardMsg::Shutdown);
        assert!(wake.read(&mut byte).is_err(), "not armed: no ring");
        assert!(!rx.arm(), "a message is waiting: do not sleep");
        assert!(matches!(rx.try_recv(), Some(ShardMsg::Shutdown)));

        assert!(rx.arm());
        router.send(0, ShardMsg::Shutdown);
        router.send(0, ShardMsg::Shutdown);
        assert_eq!(
            wake.read(&mut byte).unwrap(),
            1,
            "one ring for two messages"
        );
    }
}
