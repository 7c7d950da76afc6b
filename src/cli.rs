//! The command line, parsed with clap into the library's plain
//! [`corepush::Config`]. It lives in the binary, so a program embedding the
//! library does not pull in a command-line parser.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use corepush::driver::UringFeatures;
use corepush::protocol::ClientSends;
use corepush::Config;

/// corepush: a WebSocket push server. Clients log in with a uid, then send
/// `<uid>:<message>` to push to that user or `all:<message>` to everyone.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Cli {
    /// Address to listen on (every shard binds it with SO_REUSEPORT).
    #[arg(long, default_value = "0.0.0.0:1234")]
    pub listen: SocketAddr,

    /// Number of shards (one thread pinned per core); 0 means one per available core.
    #[arg(long, default_value_t = 0)]
    pub shards: usize,

    /// Do not pin shard threads to cores. Pinning keeps each shard's data in
    /// one core's caches on a dedicated machine; on a host shared with other
    /// busy processes (a benchmark client on the same cores) it stops the
    /// scheduler from moving a woken shard to an idle core.
    #[arg(long)]
    pub no_pin: bool,

    /// Listen backlog of each shard's socket (capped by net.core.somaxconn).
    #[arg(long, default_value_t = 4096)]
    pub backlog: u32,

    /// Largest message a client may send, in bytes, after reassembling
    /// fragments; a larger one closes the connection with code 1009.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Bytes that may wait in user space for one connection that is not
    /// reading; past it the connection is closed with 1008 "slow consumer".
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_outbound_bytes: usize,

    /// Time allowed from accept to a complete WebSocket upgrade request.
    #[arg(long, value_parser = parse_ms, default_value = "10000")]
    pub handshake_timeout_ms: Duration,

    /// Time allowed from the upgrade to the login message.
    #[arg(long, value_parser = parse_ms, default_value = "10000")]
    pub login_timeout_ms: Duration,

    /// The server pings a connection that has been silent this long.
    #[arg(long, value_parser = parse_ms, default_value = "25000")]
    pub ping_interval_ms: Duration,

    /// A connection silent this long (pings unanswered) is closed with 1001.
    #[arg(long, value_parser = parse_ms, default_value = "60000")]
    pub idle_timeout_ms: Duration,

    /// After the server sends a close frame, how long it waits for the
    /// client to close before dropping the socket.
    #[arg(long, value_parser = parse_ms, default_value = "2000")]
    pub close_timeout_ms: Duration,

    /// Messages one client may send per second (0: no limit); over it the
    /// connection is closed with 1008 "rate limit".
    #[arg(long, default_value_t = 0)]
    pub max_client_rate: u16,

    /// Connections the whole server holds (0: as many as descriptors allow);
    /// an upgrade over it is answered with HTTP 503.
    #[arg(long, default_value_t = 0)]
    pub max_connections: usize,

    /// Connections one IP address may hold (0: no limit); over it, HTTP 503.
    #[arg(long, default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Bytes of incomplete input (requests, frames, fragmented messages) one
    /// shard holds for all its connections; past it the connections holding
    /// the most are closed with 1013, so slow senders cannot pin memory.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_pending_bytes: usize,

    /// Messages that may wait in a shard's inbox. When messages for another
    /// shard do not fit, the sending shard keeps them and stops reading the
    /// connections that send them until there is room (no message dropped).
    #[arg(long, default_value_t = 16 * 1024)]
    pub inbox_capacity: usize,

    /// Require signed logins: the first message must be a JWT signed with
    /// HS256 and this secret, whose `sub` is the uid and whose `exp` has not
    /// passed. Without it the first message is the uid itself, which anyone
    /// can claim: for trusted networks only.
    #[arg(long, env = "COREPUSH_LOGIN_SECRET", hide_env_values = true)]
    pub login_secret: Option<String>,

    /// What a logged-in client may send: `any` (`<uid>:` and `all:`),
    /// `targeted` (`<uid>:` only), or `none` (receive only; pushes come
    /// through the HTTP API). Refusals get an `error: ...` reply.
    #[arg(long, value_enum, default_value_t = ClientSendsArg::Any)]
    pub client_sends: ClientSendsArg,

    /// Microseconds a shard spins for new work before it sleeps (0: sleep
    /// at once). Can help on a dedicated host; on a shared one it costs CPU.
    #[arg(long, default_value_t = 0)]
    pub idle_poll_us: u64,

    /// Address of the HTTP push API (POST /push/{uid}, /push, /broadcast;
    /// GET /online/{uid}, /stats, /metrics), or `off`.
    #[arg(long, value_parser = parse_api_listen, default_value = "127.0.0.1:1235")]
    pub api_listen: ApiListen,

    /// Require `Authorization: Bearer <token>` on every API request. Without
    /// it the API serves only a loopback address (see --api-insecure).
    #[arg(long, env = "COREPUSH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Serve the API without a token on an address that is not loopback:
    /// anyone who reaches it can push to every user.
    #[arg(long)]
    pub api_insecure: bool,

    /// Largest body of a batch push (POST /push), in bytes; each message in
    /// it is also held to --max-message-bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub api_max_batch_bytes: usize,

    /// API connections open at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub api_max_connections: u32,

    /// Time an API client has to send a request's head (or, kept alive, to
    /// start the next request), to finish the request, and to take each
    /// part of the response.
    #[arg(long, value_parser = parse_ms, default_value = "10000")]
    pub api_timeout_ms: Duration,
    /// Join a cluster of corepush nodes whose bus is this Redis
    /// (redis://HOST:PORT, or redis://:PASSWORD@HOST:PORT): a push to a uid
    /// or to all reaches the connections of every node. Without it the node
    /// runs alone.
    #[arg(long, env = "COREPUSH_CLUSTER", value_name = "URL")]
    pub cluster: Option<String>,

    /// Messages for other nodes that may wait for the bus; past it they are
    /// dropped and counted.
    #[arg(long, default_value_t = corepush::cluster::DEFAULT_QUEUE)]
    pub cluster_queue: usize,

    /// io_uring features to leave off, comma-separated (single-issuer,
    /// defer-taskrun, coop-taskrun, msg-ring): for measuring what each buys.
    #[arg(long, value_delimiter = ',', hide = true)]
    pub uring_disable: Vec<UringFeature>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientSendsArg {
    Any,
    Targeted,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UringFeature {
    SingleIssuer,
    DeferTaskrun,
    CoopTaskrun,
    MsgRing,
}

/// `--api-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiListen(pub Option<SocketAddr>);

fn parse_api_listen(text: &str) -> Result<ApiListen, String> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(ApiListen(None));
    }
    text.parse()
        .map(|addr| ApiListen(Some(addr)))
        .map_err(|e| format!("{e} (expected an address such as 127.0.0.1:1235, or off)"))
}

fn parse_ms(text: &str) -> Result<Duration, String> {
    let ms: u64 = text.parse().map_err(|e| format!("{e}"))?;
    if ms == 0 {
        return Err("must be at least 1 ms".into());
    }
    Ok(Duration::from_millis(ms))
}

impl Cli {
    pub fn into_config(self) -> Config {
        let mut uring = UringFeatures::default();
        for feature in &self.uring_disable {
            match feature {
                UringFeature::SingleIssuer => uring.single_issuer = false,
                UringFeature::DeferTaskrun => uring.defer_taskrun = false,
                UringFeature::CoopTaskrun => uring.coop_taskrun = false,
                UringFeature::MsgRing => uring.msg_ring = false,
            }
        }
        Config {
            listen: self.listen,
            shards: self.shards,
            no_pin: self.no_pin,
            backlog: self.backlog,
            max_message_bytes: self.max_message_bytes,
            max_outbound_bytes: self.max_outbound_bytes,
            handshake_timeout: self.handshake_timeout_ms,
            login_timeout: self.login_timeout_ms,
            ping_interval: self.ping_interval_ms,
            idle_timeout: self.idle_timeout_ms,
            close_timeout: self.close_timeout_ms,
            max_client_rate: self.max_client_rate,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_pending_bytes: self.max_pending_bytes,
            release_memory: None, // set by main, which knows the allocator
            inbox_capacity: self.inbox_capacity,
            login_secret: self.login_secret,
            client_sends: match self.client_sends {
                ClientSendsArg::Any => ClientSends::Any,
                ClientSendsArg::Targeted => ClientSends::Targeted,
                ClientSendsArg::None => ClientSends::None,
            },
            idle_poll: Duration::from_micros(self.idle_poll_us),
            uring,
            uring_sizes: Default::default(),
            api_listen: self.api_listen.0,
            api_token: self.api_token,
            api_insecure: self.api_insecure,
            api_max_batch_bytes: self.api_max_batch_bytes,
            api_max_connections: self.api_max_connections as usize,
            api_timeout: self.api_timeout_ms,
            cluster: self.cluster,
            cluster_queue: self.cluster_queue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_give_the_library_defaults() {
        let parsed = Cli::parse_from(["corepush"]).into_config();
        let defaults = Config::default();
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn flags_parse() {
        let c = Cli::parse_from([
            "corepush",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "3",
            "--idle-timeout-ms",
            "40",
            "--idle-poll-us",
            "50",
            "--uring-disable",
            "msg-ring,defer-taskrun",
            "--cluster",
            "redis://127.0.0.1:6379",
        ])
        .into_config();
        assert_eq!(c.shard_count(), 3);
        assert_eq!(c.idle_timeout, Duration::from_millis(40));
        assert_eq!(c.idle_poll, Duration::from_micros(50));
        assert!(!c.uring.msg_ring && !c.uring.defer_taskrun && c.uring.single_issuer);
        assert_eq!(c.cluster.as_deref(), Some("redis://127.0.0.1:6379"));
        assert!(Cli::try_parse_from(["corepush", "--ping-interval-ms", "0"]).is_err());
        assert!(
            Cli::try_parse_from(["corepush", "--runtime", "uring"]).is_err(),
            "--runtime is gone: there is one driver"
        );
    }

    #[test]
    fn api_flags_parse() {
        let c = Cli::parse_from(["corepush", "--api-listen", "off"]).into_config();
        assert_eq!(c.api_listen, None);
        let c = Cli::parse_from([
            "corepush",
            "--api-listen",
            "[::1]:8080",
            "--api-token",
            "t0k3n",
            "--api-insecure",
            "--api-timeout-ms",
            "250",
        ])
        .into_config();
        assert_eq!(c.api_listen, Some("[::1]:8080".parse().unwrap()));
        assert_eq!(c.api_token.as_deref(), Some("t0k3n"));
        assert!(c.api_insecure);
        assert_eq!(c.api_timeout, Duration::from_millis(250));
        assert!(Cli::try_parse_from(["corepush", "--api-listen", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["corepush", "--api-max-connections", "0"]).is_err());
    }
}
