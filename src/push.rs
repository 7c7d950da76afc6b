//! The way into the shards for everything that is not a client connection:
//! the HTTP push API, the cluster bridge, a program embedding corepush.
//!
//! A [`Pusher`] may be used from any thread. Each push is encoded once and
//! queued to the shard that is the uid's home (or to every shard for a
//! broadcast); the answer, how many connections it was written or queued
//! to, comes back as a [`Delivery`], a future that a blocking caller can
//! also [`Delivery::wait`] on. Nothing here takes a lock: the counts travel
//! back through atomics (`router::Tally`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::cluster::{self, Link, Topic};
use crate::router::{Router, ShardMsg, Tally};
use crate::session::frame::{self, Opcode};
use crate::stats::{ShardStats, Snapshot};

/// Whether a pushed message reaches clients as text or binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A text message (the payload must be UTF-8).
    Text,
    /// A binary message.
    Binary,
}

impl Kind {
    fn opcode(self) -> Opcode {
        match self {
            Kind::Text => Opcode::Text,
            Kind::Binary => Opcode::Binary,
        }
    }

    /// The kind of a client's data message (text unless binary).
    pub(crate) fn of(opcode: Opcode) -> Kind {
        match opcode {
            Opcode::Binary => Kind::Binary,
            _ => Kind::Text,
        }
    }
}

/// Pushes messages into the shards from any thread. Cheap to clone.
#[derive(Clone)]
pub struct Pusher {
    router: Router,
    stats: Arc<[Arc<ShardStats>]>,
    /// In a cluster: pushes are also published for the other nodes. The
    /// cluster bridge's own pusher has none (what comes from the bus is
    /// not published again).
    cluster: Option<Link>,
}

/// How many connections a push reached (or how many a uid has), once every
/// shard involved has answered.
#[must_use = "a Delivery does nothing unless awaited or waited on"]
pub struct Delivery {
    tally: Arc<Tally>,
}

impl Pusher {
    pub(crate) fn new(router: Router, stats: Arc<[Arc<ShardStats>]>) -> Pusher {
        Pusher {
            router,
            stats,
            cluster: None,
        }
    }

    /// The same pusher, publishing to the cluster through `link`.
    pub(crate) fn with_cluster(mut self, link: Option<Link>) -> Pusher {
        self.cluster = link;
        self
    }

    /// Delivers `payload` to every connection of `uid`, on whichever shard
    /// the uid lives, and, in a cluster, on every other node. The count is
    /// of this node's connections.
    pub fn push(&self, uid: &str, kind: Kind, payload: &[u8]) -> Delivery {
        if let Some(link) = &self.cluster {
            link.publish(Topic::Uid(uid), kind, payload);
        }
        let frame = frame::encode(kind.opcode(), payload);
        let (tally, mut acks) = Tally::new(1);
        let msg = ShardMsg::ToUid {
            uid: Arc::from(uid),
            frame,
            origin: None,
            ack: acks.pop(),
        };
        let _ = self.router.send(self.router.home_of(uid), msg);
        Delivery { tally }
    }

    /// Delivers `payload` to every logged-in connection (of every node, in
    /// a cluster). The count is of this node's connections.
    pub fn broadcast(&self, kind: Kind, payload: &[u8]) -> Delivery {
        if let Some(link) = &self.cluster {
            link.publish(Topic::All, kind, payload);
        }
        let frame = frame::encode(kind.opcode(), payload);
        let (tally, acks) = Tally::new(self.router.shards());
        for (to, ack) in acks.into_iter().enumerate() {
            let msg = ShardMsg::Broadcast {
                frame: frame.clone(),
                origin: None,
                ack: Some(ack),
            };
            let _ = self.router.send(to as u16, msg);
        }
        Delivery { tally }
    }

    /// How many connections `uid` has on this node.
    pub fn online(&self, uid: &str) -> Delivery {
        let (tally, mut acks) = Tally::new(1);
        let ack = acks.pop().expect("one ack");
        let msg = ShardMsg::Online {
            uid: Arc::from(uid),
            ack,
        };
        let _ = self.router.send(self.router.home_of(uid), msg);
        Delivery { tally }
    }

    /// Delivers `text` to every connection of `uid`, without waiting.
    pub fn push_text(&self, uid: &str, text: &str) {
        drop(self.push(uid, Kind::Text, text.as_bytes()));
    }

    /// Delivers `text` to every logged-in connection, without waiting.
    pub fn broadcast_text(&self, text: &str) {
        drop(self.broadcast(Kind::Text, text.as_bytes()));
    }

    /// The counters of each shard.
    pub fn shard_stats(&self) -> Vec<Snapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// How many shards the server runs.
    pub fn shards(&self) -> usize {
        self.router.shards()
    }

    /// The cluster bus counters of this node, when it is in a cluster.
    pub fn cluster_stats(&self) -> Option<cluster::Snapshot> {
        self.cluster.as_ref().map(Link::stats)
    }
}

impl Delivery {
    /// Blocks the calling thread until the count is in.
    pub fn wait(self) -> u64 {
        futures_lite::future::block_on(self)
    }
}

impl Future for Delivery {
    type Output = u64;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        if let Some(total) = self.tally.total() {
            return Poll::Ready(total);
        }
        self.tally.register(cx.waker());
        match self.tally.total() {
            Some(total) => Poll::Ready(total),
            None => Poll::Pending,
        }
    }
}
