//! corepush: a WebSocket push server, thread-per-core on io_uring.
//!
//! Data flows one way through these modules:
//!
//! ```text
//!  socket ─> connection ─> handshake / frame ─> protocol ─> shard ─> router ─> shard ─> uid_table ─> connection ─> socket
//! ```
//!
//! - [`server`]: starts one shard per core and hands out a [`server::ServerHandle`],
//!   and a [`server::Pusher`] through which any thread can push into the shards.
//! - [`shard`]: one glommio executor pinned to a core: its listener, its
//!   connections, its uid tables, its inbox. Nothing in it is shared.
//! - [`connection`]: one connection's state machine (handshake, login, open,
//!   closing), its reads, and its outbound queue.
//! - [`handshake`]: the HTTP upgrade.
//! - [`frame`]: WebSocket framing: parsing client frames, encoding shared
//!   server frames.
//! - [`protocol`]: the corepush messages: login uid, `<to>:<payload>`.
//! - [`uid_table`]: the shard-local uid → connections map (every connection
//!   of a uid lives on the uid's home shard).
//! - [`router`]: home shard of a uid, and the inboxes between shards (and
//!   from threads that are not shards), which also carry a connection to its
//!   uid's home at login.
//! - [`slab`]: generational connection table.
//! - [`stats`]: per-shard counters.
//! - [`config`], [`limits`]: settings and the open-file limit.

pub mod config;
pub mod connection;
pub mod frame;
pub mod handshake;
pub mod limits;
pub mod protocol;
pub mod router;
pub mod server;
pub mod shard;
pub mod slab;
pub mod stats;
pub mod uid_table;

pub use config::Config;
pub use server::{start, Pusher, ServerHandle};
