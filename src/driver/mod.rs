//! The driver: the event loop that runs a [`Shard`](crate::shard::Shard),
//! [`uring`], the shard's own loop straight on io_uring (one ring per
//! shard, on the shard's thread).
//!
//! The driver owns a shard's listener, its ring and its wait for events;
//! it knows sockets and rings but not the protocol. Its contract with the
//! shard:
//!
//! - every accepted socket goes to [`Shard::accept`](crate::shard::Shard::accept);
//!   the driver then reads it under the returned key until the shard says
//!   otherwise;
//! - bytes read go to `on_bytes`, end of stream to `on_eof`, a read error to
//!   `on_error`; when a socket's reads end for any reason the driver asks
//!   `on_reads_ended` whether to read it again;
//! - the inbox is drained with `on_inbox` every turn, deadlines with `sweep`
//!   at the sweep interval;
//! - after each event the driver carries out [`Io`](crate::shard::Io)
//!   requests from `take_io` and wakes the shards `take_wakeups` names:
//!   with `IORING_OP_MSG_RING` from its own ring, or through the other
//!   shard's eventfd where MSG_RING is off or missing;
//! - it sleeps only after the shard has declared its inbox asleep
//!   (`InboxReceiver::sleep`), and watches the shard's eventfd, which
//!   threads that are not shards write to wake it;
//! - the driver stops when `is_finished` (after a shutdown message), closing
//!   nothing the shard has not asked it to close.
//!
//! The shard's descriptor is the only one a socket has: a connection costs
//! one descriptor, as
//! [`ServerHandle::connection_capacity`](crate::server::ServerHandle::connection_capacity)
//! counts.

pub(crate) mod uring;

use std::time::Duration;

/// io_uring features that can be switched off, to measure what each buys
/// (`--uring-disable`). All are on by default where the kernel has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringFeatures {
    /// IORING_SETUP_SINGLE_ISSUER: only the shard's thread submits.
    pub single_issuer: bool,
    /// IORING_SETUP_DEFER_TASKRUN: completions are run when the shard
    /// waits, not by interrupting it.
    pub defer_taskrun: bool,
    /// IORING_SETUP_COOP_TASKRUN: no interrupt for completion work (used
    /// when DEFER_TASKRUN is off or missing).
    pub coop_taskrun: bool,
    /// Wake other shards with IORING_OP_MSG_RING (else their eventfd).
    pub msg_ring: bool,
}

impl Default for UringFeatures {
    fn default() -> Self {
        UringFeatures {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: true,
            msg_ring: true,
        }
    }
}

/// How a shard's driver runs.
#[derive(Debug, Clone, Copy)]
pub struct DriverOptions {
    /// How often the shard's deadlines are swept.
    pub sweep_every: Duration,
    /// Spin this long for new work before sleeping (0: sleep at once).
    pub idle_poll: Duration,
    /// io_uring features to use where the kernel has them.
    pub features: UringFeatures,
    /// How large each shard's ring and receive buffers are.
    pub sizes: RingSizes,
}

/// How large a shard's io_uring and its receive buffers are. The defaults
/// suit tens of thousands of connections per shard; tests shrink them to
/// reach the ring's limits with a few hundred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSizes {
    /// Submission queue entries (the completion queue is four times
    /// larger); a power of two.
    pub entries: u32,
    /// Provided receive buffers of 4 KiB; a power of two. More sockets
    /// with data at once than buffers is handled, only slower.
    pub buffers: u16,
}

impl Default for RingSizes {
    fn default() -> Self {
        RingSizes {
            entries: 4096,
            buffers: 512,
        }
    }
}
