//! corepush: a WebSocket push server, thread-per-core on io_uring.
//!
//! Data flows one way through these modules, each importing only those
//! below it:
//!
//! ```text
//!  socket ─> driver ─bytes─> shard ─> session (handshake, frame, protocol) ─actions─> shard
//!                                                                                      ├─> outbox ─> socket
//!                                                                                      └─> router ─> another shard
//! ```
//!
//! - [`server`]: starts one shard per core, each on its own thread, and
//!   hands out a [`server::ServerHandle`] and a shutdown trigger.
//! - [`push`]: the [`Pusher`], through which any thread pushes into the
//!   shards and learns how many connections a push reached.
//! - [`driver`]: the event loop that runs a shard: [`driver::uring`],
//!   corepush's own loop straight on io_uring (accept, receive, wait,
//!   wake-ups, timers). It knows sockets and rings, not the protocol.
//! - [`shard`]: one core's connections, their uid table
//!   ([`shard::uid_table`]) and generational connection table
//!   ([`shard::slab`]), and the routing decided from what sessions ask. It
//!   knows tables and routing, not the ring.
//! - [`session`]: one connection's protocol with no socket in it: bytes and
//!   the time in, actions out. Below it, [`session::handshake`] (the HTTP
//!   upgrade) and [`session::frame`] (RFC 6455 framing, shared server
//!   frames).
//! - [`protocol`]: the corepush messages: login uid, `<to>:<payload>`, and
//!   what a client may send. [`auth`]: what a login must be (the uid, or a
//!   signed token naming it).
//! - [`outbox`]: a connection's way out: straight to the socket while it
//!   has room, shared frames queued while it is full.
//! - [`router`]: the home shard of a uid, and the inboxes between shards
//!   (and from threads that are not shards), which also carry a connection
//!   and its session to its uid's home at login.
//! - [`admission`]: the server-wide and per-address connection caps.
//! - [`api`]: the HTTP push API on a thread of its own, beside the shards:
//!   pushes, batches, broadcasts and `/online` through a [`Pusher`],
//!   `/stats` and `/metrics` from the counters.
//! - [`cluster`]: with `--cluster`, the bridge to the other nodes over a
//!   bus (Redis pub/sub), on a thread of its own beside the shards: shards
//!   and pushers hand it messages and subscription changes through a
//!   [`cluster::Link`] (queues that never block), and it pushes what comes
//!   from the bus into the shards through a [`Pusher`].
//! - [`stats`]: per-shard counters. [`config`], [`limits`]: settings and
//!   the open-file limit.

pub mod api;
pub mod cluster;
pub mod config;
pub mod driver;
pub mod limits;
pub mod protocol;
pub mod push;
pub mod server;
pub mod stats;

mod admission;
mod auth;
mod outbox;
mod router;
mod session;
mod shard;

pub use config::Config;
pub use push::{Delivery, Kind, Pusher};
pub use router::{home_of, uid_hash};
pub use server::{start, ServerHandle};

/// The internals, for the micro-benchmarks in `bench/micro/` and the fuzz
/// targets in `fuzz/` only: nothing here is part of the library's promise.
#[doc(hidden)]
pub mod internals {
    pub use crate::admission::Admission;
    pub use crate::router::{InboxReceiver, PushError, Router, ShardMsg};
    pub use crate::session::{frame, handshake};
    pub use crate::session::{Action, CloseReason, Limits, Phase, Rules, Session};
    pub use crate::shard::slab::{Key, Slab};
    pub use crate::shard::uid_table::UidTable;
    pub use crate::shard::{Conn, Io, Shard, ShardSettings};
}
