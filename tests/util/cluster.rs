//! Helpers for the cluster tests: a real redis-server on a free port, a raw
//! RESP connection to it (what another system pushing through Redis does),
//! and nodes of the real binary as child processes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::ServerProcess;
use super::PATIENCE;

const REDIS_SERVER: &str = "redis-server";

/// A redis-server child process on 127.0.0.1, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// A fresh Redis on a free port (no persistence).
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            if let Some(redis) = RedisServer::try_start(port) {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// A fresh Redis on `port` (which must be free).
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::try_start(port)
            .unwrap_or_else(|| panic!("redis-server did not start on port {port}"))
    }

    /// Starts redis-server on `port`; None when it exits at once (the port
    /// was taken meanwhile).
    fn try_start(port: u16) -> Option<RedisServer> {
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {REDIS_SERVER} ({e}): apt-get install -y redis-server")
            });
        let mut redis = RedisServer {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = redis.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("redis-server on port {port} exited: {status}");
                redis.child = None;
                return None;
            }
            if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).map(Resp::new) {
                if conn.command(&["PING"]) == Value::Simple("PONG".into()) {
                    return Some(redis);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {port} did not answer PING");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A new raw connection.
    pub fn connect(&self) -> Resp {
        Resp::new(TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis"))
    }

    /// `PUBLISH channel payload`; returns how many subscribers got it.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        match self
            .connect()
            .command_bytes(&[b"PUBLISH", channel.as_bytes(), payload])
        {
            Value::Int(n) => n,
            other => panic!("PUBLISH answered {other:?}"),
        }
    }

    /// How many connections subscribe to `channel`.
    pub fn subscribers(&self, channel: &str) -> i64 {
        match self.connect().command(&["PUBSUB", "NUMSUB", channel]) {
            Value::Array(v) if v.len() == 2 => match v[1] {
                Value::Int(n) => n,
                ref other => panic!("NUMSUB count {other:?}"),
            },
            other => panic!("PUBSUB NUMSUB answered {other:?}"),
        }
    }

    /// Waits until `channel` has `n` subscribers.
    pub fn wait_subscribers(&self, channel: &str, n: i64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let now = self.subscribers(channel);
            if now == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{channel} has {now} subscribers, not {n}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the server with SIGKILL (no goodbye to its clients' sockets
    /// but the kernel's) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(again) = RedisServer::try_start(self.port) {
                self.child = again.child_taken();
                return;
            }
            assert!(Instant::now() < deadline, "redis did not restart");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn child_taken(mut self) -> Option<Child> {
        self.child.take()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Value>),
}

/// A raw Redis connection: commands written by hand in RESP.
pub struct Resp {
    stream: BufReader<TcpStream>,
}

impl Resp {
    pub fn new(stream: TcpStream) -> Resp {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Resp {
            stream: BufReader::new(stream),
        }
    }

    pub fn command(&mut self, args: &[&str]) -> Value {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.command_bytes(&args)
    }

    pub fn command_bytes(&mut self, args: &[&[u8]]) -> Value {
        self.send(args);
        self.read()
    }

    pub fn send(&mut self, args: &[&[u8]]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&out).unwrap();
    }

    /// The next value the server sends.
    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("a RESP line");
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" => Value::Simple(rest.into()),
            "-" => Value::Error(rest.into()),
            ":" => Value::Int(rest.parse().unwrap()),
            "$" => {
                let len: i64 = rest.parse().unwrap();
                if len < 0 {
                    return Value::Bulk(None);
                }
                let mut bytes = vec![0u8; len as usize + 2];
                self.stream.read_exact(&mut bytes).unwrap();
                bytes.truncate(len as usize);
                Value::Bulk(Some(bytes))
            }
            "*" => {
                let len: i64 = rest.parse().unwrap();
                Value::Array((0..len.max(0)).map(|_| self.read()).collect())
            }
            _ => panic!("not RESP: {line:?}"),
        }
    }
}

/// Starts a corepush node, `corepush --cluster url`, in a child process on
/// a free port, and waits until its link to the bus is up.
pub fn start_node(url: &str, args: &[&str]) -> ServerProcess {
    let mut cmd = ServerProcess::command(&[
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "off",
        "--cluster",
        url,
    ]);
    cmd.args(args);
    let node = ServerProcess::spawn(cmd);
    // Start-up gets more patience than a delivery: with every test of
    // the file starting nodes at once on a loaded 2-core host, a node
    // once took over 10 s to link (a failure only if it never does).
    node.wait_line_within("cluster: link up", 3 * PATIENCE);
    node
}
