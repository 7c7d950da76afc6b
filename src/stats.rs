//! Per-shard counters.
//!
//! Each shard owns one [`ShardStats`] and is its only writer, so a counter is
//! bumped with a plain load and store (no locked instruction, no contended
//! cache line). Any thread may read them at any time (tests, the log, and
//! later the `/stats` and `/metrics` endpoints) through a [`Snapshot`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Every counter a shard keeps. Gauges go up and down; the rest only go up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Gauge: connections this shard holds, in any phase.
    Connections,
    /// Gauge: connections that have logged in and not yet closed.
    LoggedIn,
    /// Gauge: distinct uids logged in on this shard (their home).
    LocalUids,
    /// Connections accepted.
    Accepted,
    /// accept() failed because the process or system ran out of descriptors.
    AcceptFdExhausted,
    /// accept() failed for another reason (retried after a short pause).
    AcceptFailed,
    /// Upgrade requests refused with an HTTP error.
    HandshakeFailed,
    /// Successful logins.
    Logins,
    /// Connections that logged in here and were handed to their uid's home.
    HandedOver,
    /// Logins refused (bad uid or token).
    LoginRefused,
    /// Data messages received from logged-in clients.
    MessagesIn,
    /// Sends answered with `error: ...`.
    SendErrors,
    /// Sends refused by `--client-sends` (answered with `error: ...`).
    SendsRefused,
    /// Sends to a uid with no connection anywhere (counted at its home shard).
    NoRecipient,
    /// Broadcasts (`all:`) sent by this shard's clients.
    Broadcasts,
    /// Frames handed to a recipient whose sender lives on this same shard.
    DeliveredSameShard,
    /// Frames handed to a recipient whose sender lives on another shard (or
    /// outside the shards, such as the later HTTP API).
    DeliveredCrossShard,
    /// Messages written or queued to connections (every recipient counts).
    MessagesOut,
    /// Bytes written or queued to connections: messages, replies, control
    /// frames and HTTP responses.
    BytesOut,
    /// Pushes and broadcasts from outside the shards (HTTP API, cluster
    /// bus) handled by this shard.
    OutsidePushes,
    /// Messages this shard put on another shard's inbox.
    CrossShardSent,
    /// Messages taken from this shard's inbox.
    InboxReceived,
    /// Connections closed for not reading (outbound queue over its limit).
    SlowConsumers,
    /// Connections closed by a timeout (handshake, login, idle).
    Timeouts,
    /// Connections closed for a framing or protocol violation.
    ProtocolErrors,
    /// Connections closed for sending over `--max-client-rate`.
    RateLimited,
    /// Upgrades answered with 503 because the server was full
    /// (`--max-connections`, `--max-connections-per-ip`).
    ConnectionsRefused,
    /// Connections closed with 1013 because the shard held too much
    /// incomplete input (`--max-pending-bytes`).
    PendingShed,
    /// Messages held back because another shard's inbox was full.
    InboxFull,
    /// Frames that had to wait in user space because a socket was full.
    FramesQueued,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 30] = [
        Counter::Connections,
        Counter::LoggedIn,
        Counter::LocalUids,
        Counter::Accepted,
        Counter::AcceptFdExhausted,
        Counter::AcceptFailed,
        Counter::HandshakeFailed,
        Counter::Logins,
        Counter::HandedOver,
        Counter::LoginRefused,
        Counter::MessagesIn,
        Counter::SendErrors,
        Counter::SendsRefused,
        Counter::NoRecipient,
        Counter::Broadcasts,
        Counter::DeliveredSameShard,
        Counter::DeliveredCrossShard,
        Counter::MessagesOut,
        Counter::BytesOut,
        Counter::OutsidePushes,
        Counter::CrossShardSent,
        Counter::InboxReceived,
        Counter::SlowConsumers,
        Counter::Timeouts,
        Counter::ProtocolErrors,
        Counter::RateLimited,
        Counter::ConnectionsRefused,
        Counter::PendingShed,
        Counter::InboxFull,
        Counter::FramesQueued,
    ];

    /// The `# HELP` text of each counter. A match, not a table, so a counter
    /// added does not build until it is described here.
    pub fn help(self) -> &'static str {
        match self {
            Counter::Connections => "Connections held, in any phase.",
            Counter::LoggedIn => "Connections logged in and not yet closed.",
            Counter::LocalUids => "Distinct uids logged in on the shard (their home).",
            Counter::Accepted => "Connections accepted.",
            Counter::AcceptFdExhausted => "Accepts that failed for lack of file descriptors.",
            Counter::AcceptFailed => "Accepts that failed for another reason.",
            Counter::HandshakeFailed => "WebSocket upgrade requests refused.",
            Counter::Logins => "Successful logins.",
            Counter::HandedOver => "Logged-in connections handed over to their uid's home shard.",
            Counter::LoginRefused => "Logins refused (bad uid or token).",
            Counter::MessagesIn => "Data messages received from logged-in clients.",
            Counter::SendErrors => "Client sends answered with an error.",
            Counter::SendsRefused => "Client sends refused by --client-sends.",
            Counter::NoRecipient => "Messages to a uid with no connection (dropped).",
            Counter::Broadcasts => "Broadcasts handled.",
            Counter::DeliveredSameShard => "Frames delivered to a recipient on the sender's shard.",
            Counter::DeliveredCrossShard => {
                "Frames delivered to a recipient on another shard than the sender's (or from outside the shards)."
            }
            Counter::MessagesOut => "Messages written or queued to connections.",
            Counter::BytesOut => "Bytes written or queued to connections.",
            Counter::OutsidePushes => "Pushes and broadcasts from outside the shards (HTTP API).",
            Counter::CrossShardSent => "Messages put on another shard's inbox.",
            Counter::InboxReceived => "Messages taken from the shard's inbox.",
            Counter::SlowConsumers => "Connections closed for not reading (slow consumers).",
            Counter::Timeouts => "Connections closed by a timeout.",
            Counter::ProtocolErrors => "Connections closed for a framing or protocol violation.",
            Counter::RateLimited => "Connections closed for sending over --max-client-rate.",
            Counter::ConnectionsRefused => "Upgrades answered with 503: the server (or the address) was full.",
            Counter::PendingShed => "Connections closed with 1013: the shard held too much incomplete input.",
            Counter::InboxFull => "Messages held back because another shard's inbox was full.",
            Counter::FramesQueued => "Frames that waited in user space for a full socket.",
        }
    }

    /// The name used in logs, `/stats` and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Connections => "connections",
            Counter::LoggedIn => "logged_in",
            Counter::LocalUids => "local_uids",
            Counter::Accepted => "accepted",
            Counter::AcceptFdExhausted => "accept_fd_exhausted",
            Counter::AcceptFailed => "accept_failed",
            Counter::HandshakeFailed => "handshake_failed",
            Counter::Logins => "logins",
            Counter::HandedOver => "handed_over",
            Counter::LoginRefused => "login_refused",
            Counter::MessagesIn => "messages_in",
            Counter::SendErrors => "send_errors",
            Counter::SendsRefused => "sends_refused",
            Counter::NoRecipient => "no_recipient",
            Counter::Broadcasts => "broadcasts",
            Counter::DeliveredSameShard => "delivered_same_shard",
            Counter::DeliveredCrossShard => "delivered_cross_shard",
            Counter::MessagesOut => "messages_out",
            Counter::BytesOut => "bytes_out",
            Counter::OutsidePushes => "outside_pushes",
            Counter::CrossShardSent => "cross_shard_sent",
            Counter::InboxReceived => "inbox_received",
            Counter::SlowConsumers => "slow_consumers",
            Counter::Timeouts => "timeouts",
            Counter::ProtocolErrors => "protocol_errors",
            Counter::RateLimited => "rate_limited",
            Counter::ConnectionsRefused => "connections_refused",
            Counter::PendingShed => "pending_shed",
            Counter::InboxFull => "inbox_full",
            Counter::FramesQueued => "frames_queued",
        }
    }
}

/// One shard's counters, indexed by [`Counter`].
#[derive(Debug, Default)]
pub struct ShardStats {
    values: [AtomicU64; Counter::ALL.len()],
}

impl ShardStats {
    /// Adds `n` (wrapping, so `u64::MAX` subtracts one). Only the owning
    /// shard calls this, so a load and a store are enough.
    pub fn add(&self, counter: Counter, n: u64) {
        let cell = &self.values[counter as usize];
        cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one.
    pub fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Takes one away (gauges).
    pub fn dec(&self, counter: Counter) {
        self.add(counter, u64::MAX);
    }

    /// A copy of every counter now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            values: std::array::from_fn(|i| self.values[i].load(Relaxed)),
        }
    }
}

/// A copy of every counter, for one shard or summed over shards.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    values: [u64; Counter::ALL.len()],
}

impl Snapshot {
    /// One counter's value.
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }

    /// Counter-by-counter sum, for a whole-server view.
    pub fn sum<'a>(shards: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
        let mut total = Snapshot::default();
        for shard in shards {
            for (t, v) in total.values.iter_mut().zip(shard.values) {
                *t += v;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_names_line_up() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} is out of place", c.name());
        }
        let s = ShardStats::default();
        s.inc(Counter::Logins);
        s.inc(Counter::LoggedIn);
        s.inc(Counter::LoggedIn);
        s.dec(Counter::LoggedIn);
        let snap = s.snapshot();
        assert_eq!(snap.get(Counter::Logins), 1);
        assert_eq!(snap.get(Counter::LoggedIn), 1);
        let total = Snapshot::sum([&snap, &snap]);
        assert_eq!(total.get(Counter::Logins), 2);
    }
}
