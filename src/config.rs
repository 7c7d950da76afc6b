//! Settings, from the command line (clap). Every limit has a default that a
//! production deployment can keep.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// corepush: a WebSocket push server. Clients log in with a uid, then send
/// `<uid>:<message>` to push to that user or `all:<message>` to everyone.
#[derive(Debug, Clone, Parser)]
#[command(version)]
pub struct Config {
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
}

fn parse_ms(text: &str) -> Result<Duration, String> {
    let ms: u64 = text.parse().map_err(|e| format!("{e}"))?;
    if ms == 0 {
        return Err("must be at least 1 ms".into());
    }
    Ok(Duration::from_millis(ms))
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["corepush"])
    }
}

impl Config {
    /// The shard count actually used: the setting, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            return self.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    /// How often each shard sweeps its connections for timeouts and pings:
    /// a quarter of the shortest timeout, between 10 ms and 1 s, so a
    /// deadline is enforced within 25% of its setting.
    pub fn sweep_interval(&self) -> Duration {
        let shortest = [
            self.handshake_timeout_ms,
            self.login_timeout_ms,
            self.ping_interval_ms,
            self.idle_timeout_ms,
            self.close_timeout_ms,
        ]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_secs(1));
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
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
        assert!(c.backlog >= 4096);
        assert!(c.shard_count() >= 1);
        assert_eq!(c.sweep_interval(), Duration::from_millis(500));
    }

    #[test]
    fn flags_parse() {
        let c = Config::parse_from([
            "corepush",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "3",
            "--idle-timeout-ms",
            "40",
        ]);
        assert_eq!(c.shard_count(), 3);
        assert_eq!(c.sweep_interval(), Duration::from_millis(10));
        assert!(Config::try_parse_from(["corepush", "--ping-interval-ms", "0"]).is_err());
    }
}
