//! Drivers: the event loops that run a [`Shard`](crate::shard::Shard).
//!
//! A driver owns a shard's listener and its wait for events; it knows
//! sockets and rings but not the protocol. Its contract with the shard:
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
//!   requests from `take_io` and wakes the shards `take_wakeups` names;
//! - the driver stops when `is_finished` (after a shutdown message), closing
//!   nothing the shard has not asked it to close.
//!
//! Two drivers run the same shard: [`uring`], the shard's own loop straight
//! on io_uring (the default), and [`glommio`], the glommio runtime the
//! project started with, kept runnable while the two are compared
//! (`--runtime glommio`, docs/decisions.md). They differ in how a socket
//! is held: under `uring` the shard's descriptor is the only one; under
//! `glommio` the connection's glommio stream holds a second descriptor of
//! the same socket (its own, closed by the stream), so a connection costs
//! two descriptors. Other shards wake a `uring` shard with MSG_RING, a
//! `glommio` shard through its eventfd.

pub(crate) mod glommio;
pub(crate) mod uring;

use std::time::Duration;

/// Which event loop runs the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// One io_uring per shard, driven by corepush's own loop.
    Uring,
    /// glommio executors, one task per connection.
    Glommio,
}

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
    /// Spin this long for new work before sleeping (0: sleep at once);
    /// glommio's spin before parking under the glommio driver.
    pub idle_poll: Duration,
    /// io_uring features to use where the kernel has them (the uring
    /// driver only).
    pub features: UringFeatures,
}
