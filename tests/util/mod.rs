//! Helpers shared by the integration tests: a real server on a free port,
//! real WebSocket clients (tungstenite) and raw sockets for malformed input.
#![allow(dead_code)] // each test file uses its own subset

pub mod cluster;
pub mod http;
pub mod process;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use corepush::stats::{Counter, Snapshot};
use corepush::{Config, ServerHandle};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub type Ws = WebSocket<TcpStream>;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A corepush server running in this process, stopped on drop.
pub struct TestServer {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
}

impl TestServer {
    /// A server with `shards` shards and default settings on 127.0.0.1:0.
    pub fn start(shards: usize) -> TestServer {
        TestServer::start_with(shards, |_| {})
    }

    /// Same, with settings changed by `tweak`.
    pub fn start_with(shards: usize, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards,
            ..Config::default()
        };
        tweak(&mut config);
        let handle = corepush::start(config).expect("server starts");
        let addr = handle.local_addr();
        TestServer {
            handle: Some(handle),
            addr,
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn stats(&self) -> Snapshot {
        self.handle().stats()
    }

    pub fn shard_stats(&self) -> Vec<Snapshot> {
        self.handle().shard_stats()
    }

    /// Waits until the summed counters satisfy `check`; panics with the
    /// last counters if they never do.
    pub fn wait_for(&self, what: &str, check: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if check(&s) {
                return s;
            }
            if start.elapsed() > PATIENCE {
                panic!("timed out waiting for {what}: {s:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until no connection, login or uid entry is left anywhere.
    pub fn wait_empty(&self) {
        self.wait_for("empty tables", |s| {
            s.get(Counter::Connections) == 0
                && s.get(Counter::LoggedIn) == 0
                && s.get(Counter::LocalUids) == 0
        });
    }

    /// Stops the server, waiting for every shard to finish.
    pub fn stop(mut self) {
        self.handle
            .take()
            .unwrap()
            .shutdown()
            .expect("clean shutdown");
    }

    /// Checks the server still serves: two fresh clients exchange a message.
    pub fn assert_serving(&self) {
        self.assert_serving_with(|uid| uid.to_string());
    }

    /// Same, logging in with what `credential` makes of each uid (a token
    /// on a server with signed logins).
    pub fn assert_serving_with(&self, credential: impl Fn(&str) -> String) {
        let uid_a = format!("probe-a-{}", unique());
        let uid_b = format!("probe-b-{}", unique());
        let mut a = login_as(self.addr, &credential(&uid_a), &uid_a);
        let mut b = login_as(self.addr, &credential(&uid_b), &uid_b);
        send_text(&mut a, &format!("{uid_b}:still here"));
        assert_eq!(recv_text(&mut b), "still here");
        close(a);
        close(b);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.shutdown();
        }
    }
}

/// A process-unique number, for uids that must not collide between tests.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A TCP connection with read and write timeouts, so a test never hangs.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A WebSocket client, upgraded but not logged in.
pub fn connect(addr: SocketAddr) -> Ws {
    let (ws, response) =
        tungstenite::client::client(format!("ws://{addr}/push"), tcp(addr)).expect("upgrade");
    assert_eq!(response.status(), 101);
    ws
}

/// A WebSocket client logged in as `uid`.
pub fn login(addr: SocketAddr, uid: &str) -> Ws {
    login_as(addr, uid, uid)
}

/// A WebSocket client that sends `credential` (a uid or a token) and is
/// logged in as `uid`.
pub fn login_as(addr: SocketAddr, credential: &str, uid: &str) -> Ws {
    let mut ws = connect(addr);
    send_text(&mut ws, credential);
    assert_eq!(
        recv_text(&mut ws),
        format!("login success, your uid is {uid}")
    );
    ws
}

pub fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).expect("send");
}

pub fn send_binary(ws: &mut Ws, bytes: &[u8]) {
    ws.send(Message::binary(bytes.to_vec())).expect("send");
}

/// The next data message (answering pings on the way).
pub fn recv(ws: &mut Ws) -> Message {
    loop {
        match ws.read().expect("read a message") {
            Message::Ping(_) | Message::Pong(_) => continue,
            msg => return msg,
        }
    }
}

pub fn recv_text(ws: &mut Ws) -> String {
    match recv(ws) {
        Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the server's close frame; returns its code and reason.
pub fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => {
                return (frame.code.into(), frame.reason.to_string())
            }
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(other) => panic!("expected a close frame, got {other:?}"),
            Err(e) => panic!("expected a close frame, got error {e}"),
        }
    }
}

/// Closes from the client side and waits for the server's answer.
pub fn close(mut ws: Ws) {
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .expect("send close");
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => return,
            Err(e) => panic!("closing: {e}"),
        }
    }
}

/// Asserts that nothing arrives within `wait` (used only where the absence
/// of a message is the behaviour under test).
pub fn assert_silent(ws: &mut Ws, wait: Duration) {
    ws.get_ref().set_read_timeout(Some(wait)).unwrap();
    match ws.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    ws.get_ref().set_read_timeout(Some(PATIENCE)).unwrap();
}

// ---- raw sockets, for what a well-behaved client never sends ----

pub const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// A raw socket past the upgrade (101 read), ready for hand-made frames.
pub fn raw_upgraded(addr: SocketAddr) -> TcpStream {
    let mut s = tcp(addr);
    s.write_all(UPGRADE.as_bytes()).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A raw socket logged in as `uid`.
pub fn raw_login(addr: SocketAddr, uid: &str) -> TcpStream {
    let mut s = raw_upgraded(addr);
    s.write_all(&client_frame(true, 1, uid.as_bytes())).unwrap();
    let (op, payload) = read_frame(&mut s).expect("login reply");
    assert_eq!(op, 1);
    assert_eq!(
        payload,
        format!("login success, your uid is {uid}").as_bytes()
    );
    s
}

/// Reads an HTTP response head, byte by byte (so no frame bytes are eaten).
pub fn read_http_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A masked client frame with any opcode and FIN bit.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads one server frame: (opcode, payload), or None at end of stream.
/// Server frames must not be masked; this asserts it.
pub fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).ok()?;
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).ok()?;
    Some((head[0] & 0x0f, payload))
}

/// Reads raw frames until a close frame; returns its code and reason.
pub fn read_close(s: &mut TcpStream) -> (u16, String) {
    loop {
        let (op, payload) = read_frame(s).expect("a close frame before end of stream");
        if op == 8 {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
        }
    }
}

/// Reads until the server closes the TCP connection (EOF or reset).
pub fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("waiting for the server to close: {e}"),
        }
    }
}
