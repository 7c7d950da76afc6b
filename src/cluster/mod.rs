//! The cluster: several corepush nodes joined by a message bus, so that a
//! push reaches every connection of a uid whichever node holds it, and a
//! broadcast reaches every node. The bus is Redis pub/sub ([`redis`]); the
//! rest of this module does not know which bus it is, and the shards only
//! see a [`Link`].
//!
//! ```text
//!  shard ─┬─> this node's connections (directly, as without a cluster)
//!         └─> Link::publish ──bounded queue──> bridge thread ──PUBLISH──────────> bus
//!  shard ───> Link::held / released ──queue──> bridge thread ──SUBSCRIBE / UNSUB──> bus
//!  bus ──message──> bridge thread ──Pusher (origin: outside)──> home shard(s) ──> connections
//! ```
//!
//! - **Channels**: `corepush:u:<uid>` for a uid, `corepush:all` for
//!   broadcasts. A node is subscribed to `corepush:all` always, and to a
//!   uid's channel while it holds a connection of that uid: the uid's home
//!   shard says so when the uid's first connection on the node registers
//!   and when its last one leaves, so the two events of one uid come from
//!   one thread, in order. A node therefore receives only the messages of
//!   uids it holds, plus broadcasts.
//! - **Format**: a message published by a node is an envelope, `0xFF`,
//!   version `1`, kind (`1` text, `2` binary), the origin node id (u64 big
//!   endian), then the payload. A message published by another system is
//!   the plain UTF-8 payload, delivered as text; UTF-8 never starts with
//!   `0xFF`, so the two cannot be confused ([`decode`]).
//! - **No echo**: a node delivers a message to its own connections directly
//!   (never waiting for the bus) and publishes it for the others; when the
//!   bus hands the message back, the node sees its own id and skips it.
//! - **Order**: one sender connection lives on one shard, which queues its
//!   messages in order; the bridge publishes them in that order over one
//!   connection, waiting for each batch before the next; the bus delivers
//!   to a node's one subscribed connection in publishing order, targeted
//!   and broadcast channels alike; the receiving bridge pushes them, from
//!   one thread, through the FIFO inbox of the recipient's shard. So order
//!   per sender and recipient connection holds across nodes, as it does
//!   within one.
//! - **At most once**: the bridge lives on its own thread; a shard only
//!   tries to queue (never blocks). A message is dropped, and counted,
//!   when the queue is full or the bus is down. After an outage the bridge
//!   reconnects with backoff (100 ms doubling to 5 s) and subscribes again
//!   to everything the node holds; what was published meanwhile is lost.
//!
//! A bus other than Redis (NATS, say) implements [`Bus`] and is chosen by
//! its URL scheme in [`Cluster::new`]; nothing else changes.

mod bridge;
mod redis;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};
use tracing::error;

use crate::push::{Kind, Pusher};

/// The channel that carries broadcasts.
pub const ALL_CHANNEL: &str = "corepush:all";
/// The prefix of a uid's channel: `corepush:u:<uid>`.
pub const UID_CHANNEL_PREFIX: &str = "corepush:u:";

/// The first byte of an envelope (never the first byte of UTF-8 text).
pub const ENVELOPE_MARK: u8 = 0xFF;
/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
/// Mark, version, kind, origin.
pub const ENVELOPE_HEADER: usize = 11;

/// Default capacity of the queue from the shards to the bridge, in messages.
pub const DEFAULT_QUEUE: usize = 65_536;

/// Where a message goes: one uid's connections, or every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// Every logged-in connection (`corepush:all`).
    All,
    /// Every connection of this uid (`corepush:u:<uid>`).
    Uid(&'a str),
}

impl<'a> Topic<'a> {
    /// The Redis channel of this topic.
    pub fn channel(self) -> String {
        match self {
            Topic::All => ALL_CHANNEL.to_string(),
            Topic::Uid(uid) => format!("{UID_CHANNEL_PREFIX}{uid}"),
        }
    }

    /// The topic of a Redis channel, if it is one of ours.
    pub fn of_channel(channel: &'a str) -> Option<Topic<'a>> {
        if channel == ALL_CHANNEL {
            Some(Topic::All)
        } else {
            channel.strip_prefix(UID_CHANNEL_PREFIX).map(Topic::Uid)
        }
    }
}

/// Writes the envelope of a node-originated message.
pub fn encode(out: &mut Vec<u8>, kind: Kind, origin: u64, payload: &[u8]) {
    out.reserve(ENVELOPE_HEADER + payload.len());
    out.push(ENVELOPE_MARK);
    out.push(ENVELOPE_VERSION);
    out.push(match kind {
        Kind::Text => 1,
        Kind::Binary => 2,
    });
    out.extend_from_slice(&origin.to_be_bytes());
    out.extend_from_slice(payload);
}

/// What a message from the bus is.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// An envelope: from node `origin` (0: another system that wrote one).
    Envelope {
        /// The node that published it (0: an outside system).
        origin: u64,
        /// Text or binary.
        kind: Kind,
        /// The message itself.
        payload: &'a [u8],
    },
    /// Plain UTF-8 text from another system.
    Plain(&'a str),
    /// Neither: dropped and counted.
    Malformed(&'static str),
}

/// Reads a message from the bus. Text, in an envelope or plain, must be
/// UTF-8: a client would otherwise have to close the connection.
pub fn decode(bytes: &[u8]) -> Decoded<'_> {
    if bytes.first() != Some(&ENVELOPE_MARK) {
        return match std::str::from_utf8(bytes) {
            Ok(text) => Decoded::Plain(text),
            Err(_) => Decoded::Malformed("neither UTF-8 text nor an envelope"),
        };
    }
    if bytes.len() < ENVELOPE_HEADER {
        return Decoded::Malformed("envelope shorter than its header");
    }
    if bytes[1] != ENVELOPE_VERSION {
        return Decoded::Malformed("envelope of an unknown version");
    }
    let kind = match bytes[2] {
        1 => Kind::Text,
        2 => Kind::Binary,
        _ => return Decoded::Malformed("envelope of an unknown kind"),
    };
    let origin = u64::from_be_bytes(bytes[3..11].try_into().expect("8 bytes"));
    let payload = &bytes[ENVELOPE_HEADER..];
    if kind == Kind::Text && std::str::from_utf8(payload).is_err() {
        return Decoded::Malformed("text envelope that is not UTF-8");
    }
    Decoded::Envelope {
        origin,
        kind,
        payload,
    }
}

/// A message on its way from a shard (or a pusher) to the bus: the uid, if
/// any, and the envelope, in one allocation.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Bytes of the uid at the start of `bytes`; None for a broadcast.
    uid_len: Option<usize>,
    bytes: Vec<u8>,
}

impl Outbound {
    fn new(to: Topic<'_>, kind: Kind, origin: u64, payload: &[u8]) -> Outbound {
        let (uid_len, uid) = match to {
            Topic::All => (None, ""),
            Topic::Uid(uid) => (Some(uid.len()), uid),
        };
        let mut bytes = Vec::with_capacity(uid.len() + ENVELOPE_HEADER + payload.len());
        bytes.extend_from_slice(uid.as_bytes());
        encode(&mut bytes, kind, origin, payload);
        Outbound { uid_len, bytes }
    }

    pub(crate) fn topic(&self) -> Topic<'_> {
        match self.uid_len {
            None => Topic::All,
            // Written from a &str above.
            Some(n) => Topic::Uid(std::str::from_utf8(&self.bytes[..n]).unwrap_or_default()),
        }
    }

    pub(crate) fn envelope(&self) -> &[u8] {
        &self.bytes[self.uid_len.unwrap_or(0)..]
    }
}

/// A uid's first connection on this node registered, or its last one left.
#[derive(Debug)]
pub(crate) enum Change {
    Held(Arc<str>),
    Released(Arc<str>),
}

/// The bus counters of one node (what `/stats` can show). The bridge
/// thread writes most; shards and pushers add to `dropped`.
#[derive(Debug, Default)]
pub struct Stats {
    published: AtomicU64,
    received: AtomicU64,
    own_echoes: AtomicU64,
    malformed: AtomicU64,
    subscribed_uids: AtomicU64,
    reconnects: AtomicU64,
    /// Written by every shard that drops, on a line of its own.
    dropped: Padded<AtomicU64>,
    /// Read by every shard for every message: on a line of its own, written
    /// only when the link goes up or down.
    up: Padded<AtomicBool>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl Stats {
    fn add(cell: &AtomicU64, n: u64) {
        cell.fetch_add(n, Relaxed);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            link_up: self.up.0.load(Relaxed),
            published: self.published.load(Relaxed),
            received: self.received.load(Relaxed),
            own_echoes: self.own_echoes.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            dropped: self.dropped.0.load(Relaxed),
            subscribed_uids: self.subscribed_uids.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
        }
    }
}

/// A copy of a node's bus counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Gauge: the link is up (connected and subscribed to what the node
    /// holds); while it is down, messages for other nodes are dropped.
    pub link_up: bool,
    /// Messages published for other nodes.
    pub published: u64,
    /// Messages that came from the bus, this node's own echoes included.
    pub received: u64,
    /// Of those, this node's own messages coming back (skipped: they were
    /// delivered here directly).
    pub own_echoes: u64,
    /// Of those, messages neither an envelope nor UTF-8 (dropped).
    pub malformed: u64,
    /// Messages for other nodes dropped: queue full or link down.
    pub dropped: u64,
    /// Gauge: uid channels subscribed to, as confirmed by the bus.
    pub subscribed_uids: u64,
    /// Times the link came back after it went down.
    pub reconnects: u64,
}

impl Snapshot {
    /// Every counter with its name, for `/stats` and logs.
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        [
            ("cluster_link_up", self.link_up as u64),
            ("cluster_published", self.published),
            ("cluster_received", self.received),
            ("cluster_own_echoes", self.own_echoes),
            ("cluster_malformed", self.malformed),
            ("cluster_dropped", self.dropped),
            ("cluster_subscribed_uids", self.subscribed_uids),
            ("cluster_reconnects", self.reconnects),
        ]
    }
}

/// What shards and pushers hold to reach the bridge: two queues and the
/// node's counters. Cheap to clone; every call returns at once.
#[derive(Debug, Clone)]
pub struct Link {
    node: u64,
    stats: Arc<Stats>,
    /// Messages for other nodes: bounded, dropped when full.
    outbound: mpsc::Sender<Outbound>,
    /// Subscription changes: never dropped, so the node's subscriptions
    /// always match its uid tables. One per uid's first login and last
    /// logout on this node, and the bridge takes them whether or not the
    /// bus is up (it only updates its table then), so this queue stays as
    /// short as the logins of the moment; an `Arc<str>` shared with the
    /// uid table each, no copy of the uid.
    changes: mpsc::UnboundedSender<Change>,
}

impl Link {
    /// This node's id: the origin of its envelopes.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// Publishes a message for the other nodes (this node's connections
    /// are delivered to directly by the caller). Never blocks: when the
    /// link is down or the queue is full, the message is dropped and
    /// counted.
    pub fn publish(&self, to: Topic<'_>, kind: Kind, payload: &[u8]) {
        if !self.stats.up.0.load(Relaxed) {
            Stats::add(&self.stats.dropped.0, 1);
            return;
        }
        let out = Outbound::new(to, kind, self.node, payload);
        if self.outbound.try_send(out).is_err() {
            Stats::add(&self.stats.dropped.0, 1);
        }
    }

    /// The uid's first connection on this node registered (from its home
    /// shard): subscribe to its channel.
    pub fn held(&self, uid: Arc<str>) {
        let _ = self.changes.send(Change::Held(uid));
    }

    /// The uid's last connection on this node left (from its home shard):
    /// unsubscribe from its channel.
    pub fn released(&self, uid: Arc<str>) {
        let _ = self.changes.send(Change::Released(uid));
    }

    /// The bus counters of this node.
    pub fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }
}

/// A message bus under the bridge. A session is a way to publish, a way to
/// subscribe, and the stream of messages on the subscribed topics; when
/// any of them fails the session is over and the bridge opens another.
pub(crate) trait Bus {
    type Publisher: Publish;
    type Subscriber: Subscribe;
    type Receiver: Receive;

    /// Where the bus is, for the log (no password).
    fn address(&self) -> &str;

    /// Opens a session, subscribed to nothing yet.
    async fn connect(&self) -> Result<(Self::Publisher, Self::Subscriber, Self::Receiver), String>;
}

pub(crate) trait Publish {
    /// Publishes a batch, in order; done when the bus has taken all of it.
    async fn publish(&mut self, batch: &[Outbound]) -> Result<(), String>;
}

pub(crate) trait Subscribe {
    /// Subscribes to the topics (pipelined); done when the bus confirmed.
    async fn subscribe(&mut self, topics: &[Topic<'_>]) -> Result<(), String>;
    async fn unsubscribe(&mut self, topics: &[Topic<'_>]) -> Result<(), String>;
    /// A round trip over the subscribed connection, to notice a bus that
    /// stopped answering.
    async fn ping(&mut self) -> Result<(), String>;
}

pub(crate) trait Receive {
    type Message: Message;
    /// The next message, or None once the session is over.
    async fn next(&mut self) -> Option<Self::Message>;
}

pub(crate) trait Message {
    /// None for a channel that is not ours.
    fn topic(&self) -> Option<Topic<'_>>;
    fn payload(&self) -> &[u8];
}

/// The buses there are, chosen by the URL's scheme.
enum Backend {
    Redis(redis::Redis),
}

/// This node's membership of a cluster: the [`Link`] for the shards and
/// pushers, and the bridge thread once started.
pub struct Cluster {
    link: Link,
    address: String,
    /// Taken when the bridge starts.
    waiting: Option<(Backend, bridge::Queues)>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Cluster {
    /// Checks the bus URL and makes the queues; the bridge starts with
    /// [`Cluster::start`]. `queue` bounds the messages waiting for the bus.
    pub fn new(url: &str, queue: usize) -> io::Result<Cluster> {
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let backend = if url.starts_with("redis://") {
            Backend::Redis(redis::Redis::new(url).map_err(invalid)?)
        } else {
            return Err(invalid(format!(
                "--cluster {url}: unsupported bus; expected redis://HOST:PORT"
            )));
        };
        let address = match &backend {
            Backend::Redis(bus) => bus.address().to_string(),
        };
        let node = node_id();
        let stats = Arc::new(Stats::default());
        let (out_tx, out_rx) = mpsc::channel(queue.max(1));
        let (change_tx, change_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let link = Link {
            node,
            stats: stats.clone(),
            outbound: out_tx,
            changes: change_tx,
        };
        let queues = bridge::Queues {
            node,
            stats,
            outbound: out_rx,
            changes: change_rx,
            stop: stop_rx,
        };
        Ok(Cluster {
            link,
            address,
            waiting: Some((backend, queues)),
            stop,
            thread: None,
        })
    }

    /// The handle shards and pushers publish through.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// This node's id on the bus (random, never 0).
    pub fn node(&self) -> u64 {
        self.link.node
    }

    /// The bus, for the log (no password).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The bus counters of this node.
    pub fn stats(&self) -> Snapshot {
        self.link.stats()
    }

    /// Starts the bridge thread; messages from the bus go into the shards
    /// through `pusher`, which must not publish (it has no link).
    pub fn start(&mut self, pusher: Pusher) -> io::Result<()> {
        let Some((backend, queues)) = self.waiting.take() else {
            return Ok(());
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("corepush-cluster".into())
            .spawn(move || match backend {
                Backend::Redis(bus) => runtime.block_on(bridge::run(bus, queues, pusher)),
            })?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Stops the bridge and waits for its thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("cluster: the bridge thread panicked");
            }
        }
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &format_args!("{:016x}", self.node()))
            .field("address", &self.address)
            .finish()
    }
}

/// A random nonzero node id (0 is the origin other systems may write).
fn node_id() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let mut id = u64::from_ne_bytes(bytes);
    if n != 8 {
        // No getrandom: the time and the pid differ between nodes too.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        id = nanos ^ (u64::from(std::process::id()) << 32);
    }
    id.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_pinned_layout() {
        let mut out = Vec::new();
        encode(&mut out, Kind::Binary, 0x0102_0304_0506_0708, b"hi");
        assert_eq!(out, [0xFF, 1, 2, 1, 2, 3, 4, 5, 6, 7, 8, b'h', b'i']);
        assert_eq!(
            decode(&out),
            Decoded::Envelope {
                origin: 0x0102_0304_0506_0708,
                kind: Kind::Binary,
                payload: b"hi"
            }
        );
        let mut text = Vec::new();
        encode(&mut text, Kind::Text, 7, "é:x".as_bytes());
        assert!(matches!(
            decode(&text),
            Decoded::Envelope { origin: 7, kind: Kind::Text, payload } if payload == "é:x".as_bytes()
        ));
    }

    #[test]
    fn plain_text_and_what_is_refused() {
        assert_eq!(decode(b"hello"), Decoded::Plain("hello"));
        assert_eq!(decode(b""), Decoded::Plain(""));
        assert!(matches!(decode(&[0xC3]), Decoded::Malformed(_)));
        assert!(matches!(decode(&[0xFF, 1, 1]), Decoded::Malformed(_)));
        let mut v2 = vec![0xFF, 2, 1];
        v2.extend_from_slice(&[0; 8]);
        assert!(matches!(decode(&v2), Decoded::Malformed(_)), "version 2");
        let mut kind3 = vec![0xFF, 1, 3];
        kind3.extend_from_slice(&[0; 8]);
        assert!(matches!(decode(&kind3), Decoded::Malformed(_)));
        let mut bad_text = vec![0xFF, 1, 1];
        bad_text.extend_from_slice(&[0; 8]);
        bad_text.push(0xC3);
        assert!(matches!(decode(&bad_text), Decoded::Malformed(_)));
    }

    #[test]
    fn channels() {
        assert_eq!(Topic::Uid("alice").channel(), "corepush:u:alice");
        assert_eq!(Topic::All.channel(), "corepush:all");
        assert_eq!(Topic::of_channel("corepush:u:a:b"), Some(Topic::Uid("a:b")));
        assert_eq!(Topic::of_channel("corepush:all"), Some(Topic::All));
        assert_eq!(Topic::of_channel("other"), None);
    }

    #[test]
    fn outbound_keeps_uid_and_envelope_apart() {
        let out = Outbound::new(Topic::Uid("bob"), Kind::Text, 9, b"yo");
        assert_eq!(out.topic(), Topic::Uid("bob"));
        assert_eq!(
            decode(out.envelope()),
            Decoded::Envelope {
                origin: 9,
                kind: Kind::Text,
                payload: b"yo"
            }
        );
        let all = Outbound::new(Topic::All, Kind::Binary, 9, b"");
        assert_eq!(all.topic(), Topic::All);
        assert_eq!(all.envelope().len(), ENVELOPE_HEADER);
        let empty_uid = Outbound::new(Topic::Uid(""), Kind::Text, 9, b"");
        assert_eq!(empty_uid.topic(), Topic::Uid(""), "not a broadcast");
    }

    #[test]
    fn a_link_drops_and_counts_when_down_or_full() {
        let cluster = Cluster::new("redis://127.0.0.1:1", 2).unwrap();
        let link = cluster.link().clone();
        assert_ne!(link.node(), 0);
        link.publish(Topic::All, Kind::Text, b"down");
        assert_eq!(link.stats().dropped, 1, "the link is not up yet");
        link.stats.up.0.store(true, Relaxed);
        for _ in 0..5 {
            link.publish(Topic::Uid("u"), Kind::Text, b"x");
        }
        assert_eq!(link.stats().dropped, 4, "two fit in the queue");
        assert!(Cluster::new("nats://127.0.0.1:4222", 2).is_err());
    }
}
