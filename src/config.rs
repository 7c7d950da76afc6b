//! Settings, as plain data. Every limit has a default that a production
//! deployment can keep. The command line (`src/cli.rs`, in the binary)
//! fills one in; a program embedding corepush builds one directly.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::Login;
use crate::driver::{DriverOptions, RingSizes, UringFeatures};
use crate::protocol::ClientSends;
use crate::session::{Limits, Rules};

#[derive(Debug, Clone)]
/// Everything a server can be told; `Config::default()` is production-ready.
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Number of shards; 0 means one per available core.
    pub shards: usize,
    /// Leave shard threads unpinned (hosts shared with other busy processes).
    pub no_pin: bool,
    /// Listen backlog of each shard's socket (capped by net.core.somaxconn).
    pub backlog: u32,
    /// Largest message a client may send after reassembly (1009 above).
    pub max_message_bytes: usize,
    /// Bytes that may wait in user space for one connection that is not
    /// reading; past it the connection closes with 1008 `slow consumer`.
    pub max_outbound_bytes: usize,
    /// From accept to a complete upgrade request (408 after).
    pub handshake_timeout: Duration,
    /// From the upgrade to the login message (1008 after).
    pub login_timeout: Duration,
    /// Silence after which the server pings.
    pub ping_interval: Duration,
    /// Silence after which the connection closes with 1001.
    pub idle_timeout: Duration,
    /// How long the server waits for the client once its close is out.
    pub close_timeout: Duration,
    /// Messages one client may send per second (0: no limit); over it the
    /// connection closes with 1008 `rate limit`.
    pub max_client_rate: u16,
    /// Connections the whole server holds (0: as many as descriptors
    /// allow); an upgrade over it is answered with 503.
    pub max_connections: usize,
    /// Connections one IP address may hold (0: no limit); over it, 503.
    pub max_connections_per_ip: usize,
    /// Bytes of incomplete input (requests, frames, fragmented messages) a
    /// shard holds for all its connections; past it the connections holding
    /// the most close with 1013.
    pub max_pending_bytes: usize,
    /// Called on a shard's thread after a mass disconnect made its tables
    /// give memory back, so the global allocator can return its free pages
    /// to the OS as well (the `corepush` binary sets mimalloc's collect).
    pub release_memory: Option<fn()>,
    /// Messages that may wait in a shard's inbox; a shard whose messages do
    /// not fit holds them and stops reading the connections that send them
    /// until there is room (backpressure, never a drop).
    pub inbox_capacity: usize,
    /// When set, a login must be an HS256 JWT signed with this secret whose
    /// `sub` is the uid; otherwise the uid itself (trusted networks only).
    pub login_secret: Option<String>,
    /// What a logged-in client may send.
    pub client_sends: ClientSends,
    /// Spin this long for new work before a shard sleeps (0: never spin).
    pub idle_poll: Duration,
    /// io_uring features to use where the kernel has them.
    pub uring: UringFeatures,
    /// Sizes of each shard's ring and receive buffers.
    pub uring_sizes: RingSizes,
    /// Address of the HTTP push API ([`crate::api`]); `None`: no API.
    pub api_listen: Option<SocketAddr>,
    /// When set, every API request must carry `Authorization: Bearer
    /// <token>`. Without it the API serves only a loopback address, unless
    /// `api_insecure`.
    pub api_token: Option<String>,
    /// Serve the API without a token on an address that is not loopback.
    pub api_insecure: bool,
    /// Largest body of a batch push (`POST /push`); each message in it is
    /// also held to `max_message_bytes`.
    pub api_max_batch_bytes: usize,
    /// API connections open at once; one more is answered 503 and closed.
    pub api_max_connections: usize,
    /// Time an API client has to send a request's head (and, on a kept-alive
    /// connection, to start the next one), to finish the request, and to
    /// take each part of the response.
    pub api_timeout: Duration,
    /// Join a cluster whose bus is at this URL (`redis://HOST:PORT`); None:
    /// run alone.
    pub cluster: Option<String>,
    /// Messages for other nodes that may wait for the bus; past it they
    /// are dropped (and counted).
    pub cluster_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 1234)),
            shards: 0,
            no_pin: false,
            backlog: 4096,
            max_message_bytes: limits.max_message_bytes,
            max_outbound_bytes: 1024 * 1024,
            handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
            login_timeout: Duration::from_millis(limits.login_timeout_ms),
            ping_interval: Duration::from_millis(limits.ping_interval_ms),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            close_timeout: Duration::from_millis(limits.close_timeout_ms),
            max_client_rate: 0,
            max_connections: 0,
            max_connections_per_ip: 0,
            max_pending_bytes: 64 * 1024 * 1024,
            release_memory: None,
            inbox_capacity: 16 * 1024,
            login_secret: None,
            client_sends: ClientSends::Any,
            idle_poll: Duration::ZERO,
            uring: UringFeatures::default(),
            uring_sizes: RingSizes::default(),
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], 1235))),
            api_token: None,
            api_insecure: false,
            api_max_batch_bytes: 1024 * 1024,
            api_max_connections: 256,
            api_timeout: Duration::from_secs(10),
            cluster: None,
            cluster_queue: crate::cluster::DEFAULT_QUEUE,
        }
    }
}

impl Config {
    /// The shard count actually used: the setting, or one per available
    /// core (one when that cannot be told).
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// How often each shard sweeps its connections for timeouts and pings:
    /// a quarter of the shortest timeout, between 10 ms and 1 s, so a
    /// deadline is enforced within 25% of its setting.
    pub fn sweep_interval(&self) -> Duration {
        let shortest = [
            self.handshake_timeout,
            self.login_timeout,
            self.ping_interval,
            self.idle_timeout,
            self.close_timeout,
        ]
        .into_iter()
        .min()
        .expect("five timeouts");
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// What each session obeys.
    pub fn limits(&self) -> Limits {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        Limits {
            max_message_bytes: self.max_message_bytes,
            handshake_timeout_ms: ms(self.handshake_timeout),
            login_timeout_ms: ms(self.login_timeout),
            ping_interval_ms: ms(self.ping_interval),
            idle_timeout_ms: ms(self.idle_timeout),
            close_timeout_ms: ms(self.close_timeout),
            max_client_rate: self.max_client_rate,
        }
    }

    /// What every session obeys. Fails on an empty login secret.
    pub fn rules(&self) -> Result<Rules, String> {
        let login = match &self.login_secret {
            Some(secret) => Login::token(secret.as_bytes())?,
            None => Login::Uid,
        };
        Ok(Rules {
            limits: self.limits(),
            login,
            client_sends: self.client_sends,
        })
    }

    /// How each shard's driver runs.
    pub fn driver_options(&self) -> DriverOptions {
        DriverOptions {
            sweep_every: self.sweep_interval(),
            idle_poll: self.idle_poll,
            features: self.uring,
            sizes: self.uring_sizes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seeds() {
        let c = Config::default();
        assert_eq!(c.listen.port(), 1234);
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.backlog, 4096);
        assert_eq!(c.sweep_interval(), Duration::from_millis(500));
        assert_eq!(c.limits(), Limits::default());
    }

    #[test]
    fn shard_count_follows_the_setting_or_the_cores() {
        let c = Config {
            shards: 3,
            ..Config::default()
        };
        assert_eq!(c.shard_count(), 3);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(Config::default().shard_count(), cores);
    }

    #[test]
    fn the_sweep_follows_the_shortest_timeout() {
        let c = Config {
            idle_timeout: Duration::from_millis(40),
            ..Config::default()
        };
        assert_eq!(c.sweep_interval(), Duration::from_millis(10));
        let c = Config {
            close_timeout: Duration::from_millis(1000),
            ..Config::default()
        };
        assert_eq!(c.sweep_interval(), Duration::from_millis(250));
    }
}
