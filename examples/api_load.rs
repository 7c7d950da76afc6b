//! A small load loop for the HTTP push API: batches of pushes as fast as a
//! few keep-alive connections can send them, to receivers that read.
//!
//! Start a server, then run this against it:
//!
//! ```text
//! cargo run --release -- --listen 127.0.0.1:1234 --no-pin &
//! cargo run --release --example api_load -- --secs 5 --batch 100
//! ```
//!
//! It logs in one WebSocket receiver per uid (each read by its own
//! thread), sends `POST /push` batches of `--batch` items spread over the
//! uids from `--conns` connections for `--secs` seconds, and prints pushes
//! per second, the latency of a batch, and whether every delivered message
//! arrived. Requests are bounded by the duration; it only targets the
//! addresses given (loopback by default).

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// The API's address.
    #[arg(long, default_value = "127.0.0.1:1235")]
    api: SocketAddr,
    /// The WebSocket address, for the receivers.
    #[arg(long, default_value = "127.0.0.1:1234")]
    ws: SocketAddr,
    /// API token, if the server wants one.
    #[arg(long, env = "COREPUSH_API_TOKEN")]
    token: Option<String>,
    /// Receivers, one uid each.
    #[arg(long, default_value_t = 100)]
    uids: usize,
    /// Pushes per request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// HTTP connections sending at once.
    #[arg(long, default_value_t = 2)]
    conns: usize,
    /// How long to send.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 32)]
    bytes: usize,
}

fn main() {
    let args = Args::parse();
    let received = Arc::new(AtomicU64::new(0));
    for i in 0..args.uids {
        let uid = format!("load-{i}");
        let stream = TcpStream::connect(args.ws).expect("connect to the WebSocket port");
        stream.set_nodelay(true).unwrap();
        let (mut ws, _) =
            tungstenite::client::client(format!("ws://{}/", args.ws), stream).expect("upgrade");
        ws.send(Message::text(uid.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Text(t) if t.starts_with("login success") => {}
            other => panic!("login as {uid}: {other:?}"),
        }
        let received = received.clone();
        std::thread::spawn(move || {
            while let Ok(msg) = ws.read() {
                if msg.is_text() {
                    received.fetch_add(1, Relaxed);
                }
            }
        });
    }

    // A few request bodies, made once, so the client spends its CPU on HTTP.
    let payload = "x".repeat(args.bytes);
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..args.uids.max(1))
            .map(|offset| {
                let items: Vec<serde_json::Value> = (0..args.batch)
                    .map(|j| {
                        let uid = format!("load-{}", (offset + j) % args.uids.max(1));
                        serde_json::json!({ "uid": uid, "message": payload })
                    })
                    .collect();
                serde_json::Value::from(items).to_string()
            })
            .take(16)
            .collect(),
    );

    let url = format!("http://{}/push", args.api);
    let until = Instant::now() + Duration::from_secs_f64(args.secs);
    let started = Instant::now();
    let senders: Vec<_> = (0..args.conns)
        .map(|c| {
            let (url, bodies, token) = (url.clone(), bodies.clone(), args.token.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into();
                let mut latency = Histogram::<u64>::new(3).unwrap();
                let (mut pushes, mut delivered) = (0u64, 0u64);
                let mut n = c;
                while Instant::now() < until {
                    let body = &bodies[n % bodies.len()];
                    n += 1;
                    let mut request = agent.post(&url).content_type("application/json");
                    if let Some(token) = &token {
                        request = request.header("authorization", format!("Bearer {token}"));
                    }
                    let sent = Instant::now();
                    let mut response = request.send(body.as_bytes()).expect("a 200 answer");
                    let answer: serde_json::Value =
                        serde_json::from_str(&response.body_mut().read_to_string().unwrap())
                            .unwrap();
                    latency.record(sent.elapsed().as_micros() as u64).unwrap();
                    pushes += answer["delivered"].as_array().unwrap().len() as u64;
                    delivered += answer["total"].as_u64().unwrap();
                }
                (pushes, delivered, latency)
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new(3).unwrap();
    let (mut pushes, mut delivered) = (0u64, 0u64);
    for sender in senders {
        let (p, d, h) = sender.join().unwrap();
        pushes += p;
        delivered += d;
        latency.add(h).unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Relaxed) < delivered && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "{} batches of {} over {} connections in {elapsed:.2}s: {:.0} pushes/s",
        latency.len(),
        args.batch,
        args.conns,
        pushes as f64 / elapsed
    );
    println!(
        "batch latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0
    );
    println!(
        "delivered {delivered} (of {pushes} pushes), received {}",
        received.load(Relaxed)
    );
}
