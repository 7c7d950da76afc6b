//! Memory per connection of tungstenite 0.30's `WebSocket` (server role),
//! default `WebSocketConfig` vs 4 KiB read/write buffers, after one small
//! message has been read on each; and the cost of broadcasting one 100-byte
//! message through `WebSocket::send` vs writing one pre-encoded shared frame.
//!
//! Connections run over in-memory streams, so no sockets. Each configuration
//! is measured in a child process of its own (the bench re-executes itself)
//! so that the RSS delta of one does not reuse pages freed by the other.
//!
//! Run with `cargo bench --bench tungstenite_mem`.

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::{Frame, Utf8Bytes};
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tungstenite::{Bytes, Message};

#[path = "child.rs"]
mod child;
use child::run_child;
#[path = "counting.rs"]
mod counting;
use counting::live;

fn vm_rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

// ------------------------------------------------------- in-memory stream --

/// Reads one fixed client frame, then WouldBlock; writes are counted and
/// discarded (the sink stands for the kernel socket buffer).
struct MemStream {
    input: &'static [u8],
    pos: usize,
    written: u64,
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.input[self.pos..];
        if rest.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A masked client text frame, as a browser sends it.
fn client_frame(text: &str) -> &'static [u8] {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    assert!(text.len() < 126);
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    Box::leak(f.into_boxed_slice())
}

// ------------------------------------------------------------------ bench --

const CONNS: usize = 2_000;
const ROUNDS: usize = 100;
const MSG_LEN: usize = 100;

fn config(name: &str) -> WebSocketConfig {
    match name {
        "default" => WebSocketConfig::default(),
        "4k" => WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(4096),
        _ => panic!("unknown config {name}"),
    }
}

/// Runs in the child: prints one line of `key=value` figures.
fn child(cfg_name: &str) {
    let frame = client_frame(r#"{"op":"subscribe","uid":"u12345"}"#);
    let mut streams: Vec<MemStream> = (0..CONNS)
        .map(|_| MemStream {
            input: frame,
            pos: 0,
            written: 0,
        })
        .collect();
    black_box(&mut streams);
    let (live0, rss0) = (live(), vm_rss());

    let cfg = config(cfg_name);
    let mut conns: Vec<WebSocket<MemStream>> = Vec::with_capacity(CONNS);
    for s in streams.drain(..) {
        conns.push(WebSocket::from_raw_socket(s, Role::Server, Some(cfg)));
    }
    drop(streams); // its buffer was counted in live0; it is freed now
    for ws in &mut conns {
        match ws.read().unwrap() {
            Message::Text(t) => assert!(t.starts_with('{')),
            m => panic!("unexpected {m:?}"),
        }
    }
    let stream_vec = CONNS * std::mem::size_of::<MemStream>();
    let live_per = (live() + stream_vec as isize - live0) as f64 / CONNS as f64;
    let rss_per = vm_rss().saturating_sub(rss0) as f64 / CONNS as f64;

    // Broadcast one 100-byte text message to every connection.
    let text: Utf8Bytes = "x".repeat(MSG_LEN).into();
    let sends = (CONNS * ROUNDS) as f64;

    let (a0, b0, live1) = (counting::allocs(), counting::alloc_bytes(), live());
    let t = Instant::now();
    for _ in 0..ROUNDS {
        for ws in &mut conns {
            ws.send(Message::Text(text.clone())).unwrap();
        }
    }
    let send_ns = t.elapsed().as_nanos() as f64 / sends;
    let send_allocs = (counting::allocs() - a0) as f64 / sends;
    let send_bytes = (counting::alloc_bytes() - b0) as f64 / sends;
    let retained = (live() as f64 - live1 as f64) / CONNS as f64;

    // Pre-encode once (server frames are unmasked: same bytes for everyone).
    let mut encoded = Vec::new();
    Frame::message(Bytes::from(text.clone()), OpCode::Data(Data::Text), true)
        .format(&mut encoded)
        .unwrap();
    let shared: Arc<[u8]> = encoded.into();
    let (a0, b0) = (counting::allocs(), counting::alloc_bytes());
    let t = Instant::now();
    for _ in 0..ROUNDS {
        for ws in &mut conns {
            // What a shard hands to the socket: a reference to one buffer.
            let f = shared.clone();
            ws.get_mut().write_all(&f).unwrap();
        }
    }
    let pre_ns = t.elapsed().as_nanos() as f64 / sends;
    let pre_allocs = (counting::allocs() - a0) as f64 / sends;
    let pre_bytes = (counting::alloc_bytes() - b0) as f64 / sends;
    let total: u64 = conns.iter().map(|c| c.get_ref().written).sum();
    assert_eq!(total as usize, 2 * CONNS * ROUNDS * shared.len());

    println!(
        "live={live_per:.0} rss={rss_per:.0} send_ns={send_ns:.1} send_allocs={send_allocs:.2} \
         send_bytes={send_bytes:.1} retained={retained:.0} pre_ns={pre_ns:.1} \
         pre_allocs={pre_allocs:.2} pre_bytes={pre_bytes:.1} frame={}",
        shared.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(&args[2]);
        return;
    }
    println!(
        "tungstenite 0.30 WebSocket (server role), {CONNS} connections over in-memory streams"
    );
    println!(
        "size_of::<WebSocket<MemStream>>() = {} bytes (inline part, counted below)",
        std::mem::size_of::<WebSocket<MemStream>>()
    );
    let d = run_child(&["default"], &[]);
    let k = run_child(&["4k"], &[]);
    println!();
    println!("memory per connection after reading one small message");
    println!("{:<30} {:>14} {:>14}", "", "live heap B", "RSS delta B");
    for (name, r) in [
        ("default config (128 KiB bufs)", &d),
        ("read/write_buffer_size 4 KiB", &k),
    ] {
        println!("{:<30} {:>14.0} {:>14.0}", name, r["live"], r["rss"]);
    }
    println!();
    println!(
        "broadcast of one {MSG_LEN}-byte text message ({}-byte frame) to {CONNS} connections, x{ROUNDS}",
        d["frame"]
    );
    println!(
        "{:<36} {:>10} {:>13} {:>13} {:>15}",
        "(4 KiB config)", "ns/recip.", "allocs/recip.", "bytes/recip.", "kept/conn B"
    );
    println!(
        "{:<36} {:>10.1} {:>13.2} {:>13.1} {:>15.0}",
        "WebSocket::send(Message::Text)",
        k["send_ns"],
        k["send_allocs"],
        k["send_bytes"],
        k["retained"]
    );
    println!(
        "{:<36} {:>10.1} {:>13.2} {:>13.1} {:>15}",
        "pre-encoded Arc<[u8]> frame, write", k["pre_ns"], k["pre_allocs"], k["pre_bytes"], 0
    );
    println!();
    println!(
        "send: the frame (header + {MSG_LEN} B payload) is also copied into each connection's out buffer;"
    );
    println!("kept/conn: out-buffer capacity that stays allocated after the first send.");
}
