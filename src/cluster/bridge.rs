//! The bridge: the one thread between this node's shards and the bus,
//! whatever the bus is. It publishes what the shards queue, keeps the
//! node's subscriptions equal to the uids it holds, pushes what comes from
//! the bus into the shards, and, when the bus goes away, drops and counts
//! what is sent meanwhile, reconnects with backoff and subscribes again.
//!
//! A session runs three loops on this thread's single task, so none waits
//! for another:
//!
//! - publish: takes up to [`BATCH`] queued messages, publishes them as one
//!   pipelined batch, waits for the bus to take it, and goes on (one batch
//!   at a time, in queue order);
//! - control: subscribes to `corepush:all`, then applies subscription
//!   changes in batches (everything waiting at once), and pings;
//! - receive: hands every message from the bus to the shards.
//!
//! Any error ends the session; the link is down until the next one has
//! subscribed to everything again.

use std::cell::Cell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{interval_at, sleep, timeout, Instant};
use tracing::{debug, info, warn};

use super::{
    decode, Bus, Change, Decoded, Message, Outbound, Publish, Receive, Stats, Subscribe, Topic,
};
use crate::push::{Kind, Pusher};

/// The first wait before reconnecting; doubled after each failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// For a publish batch or a ping to be answered.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// For a batch of (un)subscriptions, which may hold every uid of the node.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(5);
/// Messages published in one pipelined batch at most.
const BATCH: usize = 256;

/// The bridge's ends of the queues from the shards, and what it shares.
pub(crate) struct Queues {
    pub node: u64,
    pub stats: Arc<Stats>,
    pub outbound: mpsc::Receiver<Outbound>,
    pub changes: mpsc::UnboundedReceiver<Change>,
    pub stop: watch::Receiver<bool>,
}

/// Runs the bridge until it is stopped.
pub(crate) async fn run<B: Bus>(bus: B, queues: Queues, pusher: Pusher) {
    let Queues {
        node,
        stats,
        mut outbound,
        mut changes,
        mut stop,
    } = queues;
    let inlet = Inlet {
        node,
        stats: &stats,
        pusher,
        warned: Cell::new(false),
    };
    let mut status = Status {
        address: bus.address(),
        node,
        ever_up: false,
        quiet: false,
    };
    let mut subs = Subs::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut backoff = BACKOFF_MIN;
    loop {
        let connected = tokio::select! {
            r = timeout(CONNECT_TIMEOUT, bus.connect()) => {
                r.unwrap_or_else(|_| Err(format!("no connection within {CONNECT_TIMEOUT:?}")))
            }
            never = idle(&mut outbound, &mut changes, &mut subs, &stats) => match never {},
            _ = stopped(&mut stop) => return,
        };
        let trouble = match connected {
            Ok(session) => {
                let lost = tokio::select! {
                    lost = serve::<B>(
                        session,
                        &mut outbound,
                        &mut batch,
                        &mut changes,
                        &mut subs,
                        &inlet,
                        &mut status,
                    ) => lost,
                    _ = stopped(&mut stop) => return,
                };
                // Whatever was being published may not have been: at most once.
                Stats::add(&stats.dropped.0, batch.len() as u64);
                batch.clear();
                subs.reset();
                stats.subscribed_uids.store(0, Relaxed);
                if stats.up.0.swap(false, Relaxed) {
                    warn!(
                        "cluster: link to {} lost ({lost}); messages between nodes are dropped \
                         until it is back",
                        status.address
                    );
                    status.quiet = true;
                    backoff = BACKOFF_MIN;
                }
                lost
            }
            Err(e) => e,
        };
        if !status.quiet {
            warn!(
                "cluster: cannot reach {} ({trouble}); retrying, at most every {BACKOFF_MAX:?}",
                status.address
            );
            status.quiet = true;
        } else {
            debug!("cluster: {} still down: {trouble}", status.address);
        }
        tokio::select! {
            _ = sleep(backoff) => {}
            never = idle(&mut outbound, &mut changes, &mut subs, &stats) => match never {},
            _ = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One session, until it fails.
async fn serve<B: Bus>(
    session: (B::Publisher, B::Subscriber, B::Receiver),
    outbound: &mut mpsc::Receiver<Outbound>,
    batch: &mut Vec<Outbound>,
    changes: &mut mpsc::UnboundedReceiver<Change>,
    subs: &mut Subs,
    inlet: &Inlet<'_>,
    status: &mut Status<'_>,
) -> String {
    let (mut publisher, mut subscriber, mut receiver) = session;
    tokio::select! {
        lost = control(&mut subscriber, changes, subs, inlet.stats, status) => lost,
        lost = publish(&mut publisher, outbound, batch, inlet.stats) => lost,
        lost = receive(&mut receiver, inlet) => lost,
    }
}

/// Publishes what the shards queue, one batch at a time, in order.
async fn publish<P: Publish>(
    publisher: &mut P,
    outbound: &mut mpsc::Receiver<Outbound>,
    batch: &mut Vec<Outbound>,
    stats: &Stats,
) -> String {
    loop {
        if outbound.recv_many(batch, BATCH).await == 0 {
            // Every link is gone (the server is stopping): nothing to publish.
            std::future::pending::<()>().await;
        }
        if let Err(e) = within(REPLY_TIMEOUT, publisher.publish(batch)).await {
            return e;
        }
        Stats::add(&stats.published, batch.len() as u64);
        batch.clear();
    }
}

/// Keeps the subscriptions equal to the uids the node holds, and pings.
async fn control<S: Subscribe>(
    subscriber: &mut S,
    changes: &mut mpsc::UnboundedReceiver<Change>,
    subs: &mut Subs,
    stats: &Stats,
    status: &mut Status<'_>,
) -> String {
    if let Err(e) = within(REPLY_TIMEOUT, subscriber.subscribe(&[Topic::All])).await {
        return e;
    }
    let mut ping = interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    let mut open = true;
    loop {
        while let Ok(change) = changes.try_recv() {
            subs.apply(change);
        }
        let (add, remove) = subs.take();
        if !add.is_empty() {
            let topics: Vec<Topic<'_>> = add.iter().map(|uid| Topic::Uid(uid)).collect();
            if let Err(e) = within(SUBSCRIBE_TIMEOUT, subscriber.subscribe(&topics)).await {
                return e;
            }
            subs.confirmed(&add, true);
        }
        if !remove.is_empty() {
            let topics: Vec<Topic<'_>> = remove.iter().map(|uid| Topic::Uid(uid)).collect();
            if let Err(e) = within(SUBSCRIBE_TIMEOUT, subscriber.unsubscribe(&topics)).await {
                return e;
            }
            subs.confirmed(&remove, false);
        }
        stats.subscribed_uids.store(subs.subscribed, Relaxed);
        if !stats.up.0.load(Relaxed) {
            status.up(stats, subs.subscribed);
        }
        tokio::select! {
            change = changes.recv(), if open => match change {
                Some(change) => subs.apply(change),
                None => open = false,
            },
            _ = ping.tick() => {
                if let Err(e) = within(REPLY_TIMEOUT, subscriber.ping()).await {
                    return e;
                }
            }
        }
    }
}

/// Hands every message from the bus to the shards.
async fn receive<R: Receive>(receiver: &mut R, inlet: &Inlet<'_>) -> String {
    while let Some(message) = receiver.next().await {
        inlet.handle(message.topic(), message.payload());
    }
    "the bus closed the subscribed connection".into()
}

/// While there is no session: take subscription changes (the table stays
/// current) and drop what is queued for publishing (counted).
async fn idle(
    outbound: &mut mpsc::Receiver<Outbound>,
    changes: &mut mpsc::UnboundedReceiver<Change>,
    subs: &mut Subs,
    stats: &Stats,
) -> Infallible {
    let mut batch = Vec::new();
    let (mut out_open, mut changes_open) = (true, true);
    loop {
        tokio::select! {
            change = changes.recv(), if changes_open => match change {
                Some(change) => subs.apply(change),
                None => changes_open = false,
            },
            n = outbound.recv_many(&mut batch, BATCH), if out_open => {
                out_open = n > 0;
                Stats::add(&stats.dropped.0, n as u64);
                batch.clear();
            }
            else => std::future::pending::<()>().await,
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// What the log says about the link, once per change.
struct Status<'a> {
    address: &'a str,
    node: u64,
    /// The link was up once: coming up again is a reconnect.
    ever_up: bool,
    /// The link being down was logged: say nothing more until it is up.
    quiet: bool,
}

impl Status<'_> {
    fn up(&mut self, stats: &Stats, uids: u64) {
        if self.ever_up {
            Stats::add(&stats.reconnects, 1);
            info!(
                "cluster: link to {} is back; subscribed again to corepush:all and {uids} uids",
                self.address
            );
        } else {
            info!(
                "cluster: link up to {} as node {:016x}",
                self.address, self.node
            );
        }
        stats.up.0.store(true, Relaxed);
        self.ever_up = true;
        self.quiet = false;
    }
}

/// Where messages from the bus go in.
struct Inlet<'a> {
    node: u64,
    stats: &'a Stats,
    /// Without a link: what comes from the bus is not published again.
    pusher: Pusher,
    /// A malformed message was logged: count the next ones only.
    warned: Cell<bool>,
}

impl Inlet<'_> {
    fn handle(&self, topic: Option<Topic<'_>>, payload: &[u8]) {
        match decode(payload) {
            Decoded::Envelope { origin, .. } if origin == self.node => {
                // Delivered here directly when it was sent.
                Stats::add(&self.stats.own_echoes, 1);
            }
            Decoded::Envelope { kind, payload, .. } => self.push(topic, kind, payload),
            Decoded::Plain(text) => self.push(topic, Kind::Text, text.as_bytes()),
            Decoded::Malformed(why) => self.malformed(why),
        }
        // Counted once handled, so that a reader of the counter knows the
        // message is in the shards' inboxes.
        Stats::add(&self.stats.received, 1);
    }

    fn push(&self, topic: Option<Topic<'_>>, kind: Kind, payload: &[u8]) {
        match topic {
            Some(Topic::Uid(uid)) => drop(self.pusher.push(uid, kind, payload)),
            Some(Topic::All) => drop(self.pusher.broadcast(kind, payload)),
            None => self.malformed("on a channel that is not corepush's"),
        }
    }

    fn malformed(&self, why: &str) {
        Stats::add(&self.stats.malformed, 1);
        if !self.warned.replace(true) {
            warn!("cluster: dropped a message from the bus: {why} (further ones are only counted)");
        }
    }
}

/// The node's subscriptions: which uids it holds (from the shards) and
/// which it is subscribed to on the current session (confirmed by the
/// bus). Changes are noted as they come and applied in batches.
#[derive(Debug, Default)]
struct Subs {
    uids: HashMap<Arc<str>, Entry>,
    /// Uids whose `held` and `subscribed` may differ (each once).
    dirty: Vec<Arc<str>>,
    /// Entries subscribed.
    subscribed: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    held: bool,
    subscribed: bool,
    /// In `dirty`.
    dirty: bool,
}

impl Subs {
    fn apply(&mut self, change: Change) {
        let (uid, held) = match change {
            Change::Held(uid) => (uid, true),
            Change::Released(uid) => (uid, false),
        };
        let entry = self.uids.entry(uid.clone()).or_default();
        entry.held = held;
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push(uid);
        }
    }

    /// The uids to subscribe to and to unsubscribe from now.
    fn take(&mut self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for uid in std::mem::take(&mut self.dirty) {
            let Some(entry) = self.uids.get_mut(&uid) else {
                continue;
            };
            entry.dirty = false;
            match (entry.held, entry.subscribed) {
                (true, false) => add.push(uid),
                (false, true) => remove.push(uid),
                (false, false) => {
                    self.uids.remove(&uid);
                }
                (true, true) => {}
            }
        }
        (add, remove)
    }

    /// The bus confirmed these (un)subscriptions.
    fn confirmed(&mut self, uids: &[Arc<str>], subscribed: bool) {
        for uid in uids {
            let Some(entry) = self.uids.get_mut(uid) else {
                continue;
            };
            if entry.subscribed != subscribed {
                entry.subscribed = subscribed;
                if subscribed {
                    self.subscribed += 1;
                } else {
                    self.subscribed -= 1;
                }
            }
            if entry.held != entry.subscribed {
                if !entry.dirty {
                    entry.dirty = true;
                    self.dirty.push(uid.clone());
                }
            } else if !entry.held && !entry.dirty {
                self.uids.remove(uid);
            }
        }
    }

    /// The session is gone, and its subscriptions with it: every uid held
    /// is to be subscribed to again.
    fn reset(&mut self) {
        self.subscribed = 0;
        self.dirty.clear();
        self.uids.retain(|_, entry| entry.held);
        for (uid, entry) in self.uids.iter_mut() {
            entry.subscribed = false;
            entry.dirty = true;
            self.dirty.push(uid.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn names(v: &[Arc<str>]) -> Vec<&str> {
        let mut v: Vec<&str> = v.iter().map(|u| &**u).collect();
        v.sort();
        v
    }

    #[test]
    fn subscriptions_follow_the_uids_held_in_batches() {
        let mut subs = Subs::default();
        subs.apply(Change::Held(uid("a")));
        subs.apply(Change::Held(uid("b")));
        subs.apply(Change::Held(uid("c")));
        subs.apply(Change::Released(uid("c")));
        let (add, remove) = subs.take();
        assert_eq!(names(&add), ["a", "b"], "c came and went: nothing to do");
        assert!(remove.is_empty());
        subs.confirmed(&add, true);
        assert_eq!(subs.subscribed, 2);
        assert_eq!(subs.uids.len(), 2, "c is forgotten");

        subs.apply(Change::Released(uid("a")));
        subs.apply(Change::Held(uid("a")));
        subs.apply(Change::Released(uid("b")));
        let (add, remove) = subs.take();
        assert!(add.is_empty(), "a left and came back: still subscribed");
        assert_eq!(names(&remove), ["b"]);
        subs.confirmed(&remove, false);
        assert_eq!(subs.subscribed, 1);
        assert_eq!(subs.uids.len(), 1);
        assert_eq!(subs.take(), (vec![], vec![]));
    }

    #[test]
    fn after_a_lost_session_every_uid_held_is_subscribed_again() {
        let mut subs = Subs::default();
        for u in ["a", "b", "c"] {
            subs.apply(Change::Held(uid(u)));
        }
        let (add, _) = subs.take();
        subs.confirmed(&add, true);
        subs.apply(Change::Released(uid("c")));
        subs.reset();
        assert_eq!(subs.subscribed, 0);
        let (add, remove) = subs.take();
        assert_eq!(names(&add), ["a", "b"]);
        assert!(remove.is_empty(), "c went with the session");
    }

    #[test]
    fn a_change_during_a_subscription_is_applied_after_it() {
        let mut subs = Subs::default();
        subs.apply(Change::Held(uid("a")));
        let (add, _) = subs.take();
        // Released while its SUBSCRIBE was on the way.
        subs.apply(Change::Released(uid("a")));
        subs.confirmed(&add, true);
        let (add, remove) = subs.take();
        assert!(add.is_empty());
        assert_eq!(names(&remove), ["a"]);
        subs.confirmed(&remove, false);
        assert!(subs.uids.is_empty());
    }
}
