//! Cross-shard messaging between two glommio executors pinned to cores 0 and 1.
//!
//! (a) crossbeam-channel unbounded MPSC queue + a "doorbell" (a Unix socket
//!     pair; the consumer awaits a read on it only when the queue is empty).
//! (b) glommio's `channels::shared_channel` (bounded SPSC).
//!
//! Measures throughput, ping-pong round-trip latency with a sleeping peer,
//! producer-side cost per send, whether (b) can be fed from a plain thread,
//! and whether order between several producers is kept.
//!
//! Run with `cargo bench --bench channels`. Compare figures as ratios within
//! one run: the machine is shared and noisy.

use std::io::Write as _;
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

/// The message: 24 bytes, an `Arc<[u8]>` payload plus a sequence number.
struct Msg {
    payload: Arc<[u8]>,
    seq: u64,
}

const THROUGHPUT_MSGS: u64 = 10_000_000;
const PINGS: u64 = 100_000;
const SPSC_CAPACITY: usize = 1024;
/// Distinct payloads cycled by the producer, more than the SPSC capacity so
/// producer (clone) and consumer (drop) rarely touch the same refcount.
const PAYLOADS: usize = 4096;
/// Busy gap between two pings, longer than a wake-up, so the peer has surely
/// gone back to sleep (glommio's receiver also wakes the sender's executor
/// when it frees room, a wake-up that is still in flight a few us later).
const PING_GAPS: [Duration; 2] = [Duration::ZERO, Duration::from_micros(100)];

fn payloads() -> Arc<Vec<Arc<[u8]>>> {
    Arc::new(
        (0..PAYLOADS)
            .map(|i| Arc::from(vec![i as u8; 100].into_boxed_slice()))
            .collect(),
    )
}

// ---------------------------------------------------------------- doorbell --

/// Sending half of a crossbeam queue with a doorbell.
#[derive(Clone)]
struct BellTx {
    tx: crossbeam_channel::Sender<Msg>,
    armed: Arc<AtomicBool>,
    bell: Arc<std::os::unix::net::UnixStream>,
}

impl BellTx {
    fn send(&self, m: Msg) {
        self.tx.send(m).expect("consumer gone");
        if self.armed.swap(false, Ordering::SeqCst) {
            // WouldBlock means bytes are already pending: the consumer will wake.
            let _ = (&*self.bell).write(&[1]);
        }
    }
}

/// Receiving half; the `UnixStream` half is turned into a glommio stream on
/// the consumer's executor (see `BellRxRaw::attach`).
struct BellRxRaw {
    rx: crossbeam_channel::Receiver<Msg>,
    armed: Arc<AtomicBool>,
    bell: std::os::unix::net::UnixStream,
}

struct BellRx {
    rx: crossbeam_channel::Receiver<Msg>,
    armed: Arc<AtomicBool>,
    bell: glommio::net::UnixStream,
    buf: [u8; 64],
}

fn doorbell_channel() -> (BellTx, BellRxRaw) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (w, r) = std::os::unix::net::UnixStream::pair().unwrap();
    w.set_nonblocking(true).unwrap();
    r.set_nonblocking(true).unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    (
        BellTx {
            tx,
            armed: armed.clone(),
            bell: Arc::new(w),
        },
        BellRxRaw { rx, armed, bell: r },
    )
}

impl BellRxRaw {
    /// Must be called on the consumer's executor.
    fn attach(self) -> BellRx {
        use std::os::fd::FromRawFd;
        let fd = self.bell.into_raw_fd();
        BellRx {
            rx: self.rx,
            armed: self.armed,
            // SAFETY: we own `fd`, just released from the std stream.
            bell: unsafe { glommio::net::UnixStream::from_raw_fd(fd) },
            buf: [0; 64],
        }
    }
}

impl BellRx {
    /// Drain everything available into `f`; sleep on the doorbell when empty.
    /// Returns when `f` returns false.
    async fn drain(&mut self, mut f: impl FnMut(Msg) -> bool) {
        loop {
            while let Ok(m) = self.rx.try_recv() {
                if !f(m) {
                    return;
                }
            }
            self.armed.store(true, Ordering::SeqCst);
            if !self.rx.is_empty() {
                // A producer may already have swapped and rung: a stale byte
                // only costs one spurious wake-up later.
                self.armed.store(false, Ordering::SeqCst);
                continue;
            }
            let n = self.bell.read(&mut self.buf).await.unwrap();
            assert!(n > 0, "doorbell closed");
        }
    }

    async fn recv(&mut self) -> Msg {
        let mut out = None;
        self.drain(|m| {
            out = Some(m);
            false
        })
        .await;
        out.unwrap()
    }
}

// ---------------------------------------------------------------- helpers --

fn on_core<T: Send + 'static, F>(
    core: usize,
    name: &str,
    f: impl FnOnce() -> F + Send + 'static,
) -> glommio::ExecutorJoinHandle<T>
where
    F: std::future::Future<Output = T> + 'static,
{
    LocalExecutorBuilder::new(Placement::Fixed(core))
        .name(name)
        .spawn(f)
        .expect("spawn executor")
}

struct Throughput {
    msgs_per_s: f64,
    producer_ns_per_send: f64,
}

struct PingPong {
    rtt: Histogram<u64>,
    send: Histogram<u64>,
}

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

// ------------------------------------------------------------- throughput --

fn throughput_doorbell() -> Throughput {
    let (tx, rx) = doorbell_channel();
    let pl = payloads();
    let consumer = on_core(1, "cons", move || async move {
        let mut rx = rx.attach();
        let mut n = 0u64;
        let mut sum = 0u64;
        rx.drain(|m| {
            std::hint::black_box(&m.payload);
            sum = sum.wrapping_add(m.seq);
            n += 1;
            n < THROUGHPUT_MSGS
        })
        .await;
        (Instant::now(), sum)
    });
    let producer = on_core(0, "prod", move || async move {
        let t0 = Instant::now();
        for i in 0..THROUGHPUT_MSGS {
            tx.send(Msg {
                payload: pl[i as usize % PAYLOADS].clone(),
                seq: i,
            });
        }
        (t0, t0.elapsed())
    });
    let (t0, prod) = producer.join().unwrap();
    let (t1, sum) = consumer.join().unwrap();
    assert_eq!(sum, THROUGHPUT_MSGS * (THROUGHPUT_MSGS - 1) / 2);
    Throughput {
        msgs_per_s: THROUGHPUT_MSGS as f64 / (t1 - t0).as_secs_f64(),
        producer_ns_per_send: prod.as_nanos() as f64 / THROUGHPUT_MSGS as f64,
    }
}

fn throughput_shared() -> Throughput {
    let (tx, rx) = shared_channel::new_bounded::<Msg>(SPSC_CAPACITY);
    let pl = payloads();
    let consumer = on_core(1, "cons", move || async move {
        let rx = rx.connect().await;
        let mut sum = 0u64;
        for _ in 0..THROUGHPUT_MSGS {
            sum = sum.wrapping_add(rx.recv().await.unwrap().seq);
        }
        (Instant::now(), sum)
    });
    let producer = on_core(0, "prod", move || async move {
        let tx = tx.connect().await;
        let t0 = Instant::now();
        for i in 0..THROUGHPUT_MSGS {
            let m = Msg {
                payload: pl[i as usize % PAYLOADS].clone(),
                seq: i,
            };
            if tx.send(m).await.is_err() {
                panic!("consumer gone");
            }
        }
        (t0, t0.elapsed())
    });
    let (t0, prod) = producer.join().unwrap();
    let (t1, sum) = consumer.join().unwrap();
    assert_eq!(sum, THROUGHPUT_MSGS * (THROUGHPUT_MSGS - 1) / 2);
    Throughput {
        msgs_per_s: THROUGHPUT_MSGS as f64 / (t1 - t0).as_secs_f64(),
        producer_ns_per_send: prod.as_nanos() as f64 / THROUGHPUT_MSGS as f64,
    }
}

// -------------------------------------------------------------- ping-pong --

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 1_000_000_000, 3).unwrap()
}

fn pingpong_doorbell(gap: Duration) -> PingPong {
    let (ping_tx, ping_rx) = doorbell_channel();
    let (pong_tx, pong_rx) = doorbell_channel();
    let pl = payloads();
    let pl2 = pl.clone();
    let echo = on_core(1, "echo", move || async move {
        let mut rx = ping_rx.attach();
        for _ in 0..PINGS {
            let m = rx.recv().await;
            pong_tx.send(Msg {
                payload: pl2[0].clone(),
                seq: m.seq,
            });
        }
    });
    let pinger = on_core(0, "ping", move || async move {
        let mut rx = pong_rx.attach();
        let (mut rtt, mut send) = (hist(), hist());
        for i in 0..PINGS {
            spin(gap);
            let t0 = Instant::now();
            ping_tx.send(Msg {
                payload: pl[0].clone(),
                seq: i,
            });
            let t1 = Instant::now();
            let m = rx.recv().await;
            let t2 = Instant::now();
            assert_eq!(m.seq, i);
            send.record((t1 - t0).as_nanos() as u64).unwrap();
            rtt.record((t2 - t0).as_nanos() as u64).unwrap();
        }
        PingPong { rtt, send }
    });
    echo.join().unwrap();
    pinger.join().unwrap()
}

fn pingpong_shared(gap: Duration) -> PingPong {
    let (ping_tx, ping_rx) = shared_channel::new_bounded::<Msg>(SPSC_CAPACITY);
    let (pong_tx, pong_rx) = shared_channel::new_bounded::<Msg>(SPSC_CAPACITY);
    let pl = payloads();
    let pl2 = pl.clone();
    let echo = on_core(1, "echo", move || async move {
        let rx = ping_rx.connect().await;
        let tx = pong_tx.connect().await;
        for _ in 0..PINGS {
            let m = rx.recv().await.unwrap();
            let r = Msg {
                payload: pl2[0].clone(),
                seq: m.seq,
            };
            if tx.try_send(r).is_err() {
                panic!("pong channel full");
            }
        }
    });
    let pinger = on_core(0, "ping", move || async move {
        let tx = ping_tx.connect().await;
        let rx = pong_rx.connect().await;
        let (mut rtt, mut send) = (hist(), hist());
        for i in 0..PINGS {
            spin(gap);
            let t0 = Instant::now();
            let r = tx.try_send(Msg {
                payload: pl[0].clone(),
                seq: i,
            });
            let t1 = Instant::now();
            assert!(r.is_ok());
            let m = rx.recv().await.unwrap();
            let t2 = Instant::now();
            assert_eq!(m.seq, i);
            send.record((t1 - t0).as_nanos() as u64).unwrap();
            rtt.record((t2 - t0).as_nanos() as u64).unwrap();
        }
        // Keep the receiver alive until the peer is done sending.
        drop(rx);
        PingPong { rtt, send }
    });
    let r = pinger.join().unwrap();
    echo.join().unwrap();
    r
}

// ------------------------------------------------------ plain-thread check --

/// Can a plain (non-glommio) thread, e.g. an HTTP API or Redis bridge thread,
/// feed a shard through `shared_channel`? Returns the outcome as text.
fn shared_channel_from_plain_thread() -> String {
    let (tx, rx) = shared_channel::new_bounded::<u64>(16);
    let h = std::thread::spawn(move || {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures_lite::future::block_on(async move {
                let tx = tx.connect().await;
                tx.try_send(1).is_ok()
            })
        }));
        std::panic::set_hook(prev);
        match r {
            Ok(ok) => format!("connect() worked (try_send ok = {ok})"),
            Err(e) => {
                let msg = e
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| e.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string panic>".into());
                format!("connect() panicked: \"{msg}\"")
            }
        }
    });
    let out = h.join().unwrap();
    drop(rx);
    out
}

// ---------------------------------------------------------- FIFO ordering --

const ORDER_MSGS: u64 = 100_000;

/// Two producers take turns (a token passed through `turn`), so message k is
/// causally sent before message k+1. Counts how many messages the consumer
/// sees out of that order.
fn wait_turn(turn: &AtomicU64, k: u64) {
    let mut spins = 0u32;
    while turn.load(Ordering::Acquire) != k {
        spins += 1;
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

fn order_doorbell() -> u64 {
    let (tx, rx) = doorbell_channel();
    let turn = Arc::new(AtomicU64::new(0));
    let pl = payloads();
    let mut producers = Vec::new();
    for p in 0..2u64 {
        let (tx, turn, pl) = (tx.clone(), turn.clone(), pl.clone());
        // Plain threads: crossbeam works from anywhere.
        producers.push(std::thread::spawn(move || {
            for k in (p..ORDER_MSGS).step_by(2) {
                wait_turn(&turn, k);
                tx.send(Msg {
                    payload: pl[0].clone(),
                    seq: k,
                });
                turn.store(k + 1, Ordering::Release);
            }
        }));
    }
    drop(tx);
    let consumer = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let mut rx = rx.attach();
            let (mut n, mut last, mut inversions) = (0u64, None::<u64>, 0u64);
            rx.drain(|m| {
                if last.is_some_and(|l| m.seq < l) {
                    inversions += 1;
                }
                last = Some(last.map_or(m.seq, |l| l.max(m.seq)));
                n += 1;
                n < ORDER_MSGS
            })
            .await;
            inversions
        })
        .unwrap();
    for p in producers {
        p.join().unwrap();
    }
    consumer.join().unwrap()
}

fn order_mesh() -> u64 {
    let turn = Arc::new(AtomicU64::new(0));
    let mut receivers = Vec::new();
    let mut producers = Vec::new();
    for p in 0..2u64 {
        let (tx, rx) = shared_channel::new_bounded::<u64>(ORDER_MSGS as usize);
        receivers.push(rx);
        let turn = turn.clone();
        producers.push(on_core(p as usize, "prod", move || async move {
            let tx = tx.connect().await;
            for k in (p..ORDER_MSGS).step_by(2) {
                wait_turn(&turn, k);
                assert!(tx.try_send(k).is_ok());
                turn.store(k + 1, Ordering::Release);
            }
            // Keep the channel open until the consumer is done.
            glommio::timer::sleep(Duration::from_millis(200)).await;
        }));
    }
    let consumer = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            // Typical shard: one task per inbox, appending to a shared log.
            let log = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for rx in receivers {
                let log = log.clone();
                tasks.push(glommio::spawn_local(async move {
                    let rx = rx.connect().await;
                    for _ in 0..ORDER_MSGS / 2 {
                        let k = rx.recv().await.unwrap();
                        log.borrow_mut().push(k);
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            let log = log.borrow();
            let (mut last, mut inversions) = (None::<u64>, 0u64);
            for &k in log.iter() {
                if last.is_some_and(|l| k < l) {
                    inversions += 1;
                }
                last = Some(last.map_or(k, |l| l.max(k)));
            }
            inversions
        })
        .unwrap();
    let inv = consumer.join().unwrap();
    for p in producers {
        p.join().unwrap();
    }
    inv
}

// ------------------------------------------------------------------- main --

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() {
    // Optional section names as arguments: throughput pingpong order plain.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    println!("channels: cross-shard messaging, executors pinned to cores 0 -> 1");
    println!(
        "message = {} bytes (Arc<[u8]> + u64); SPSC capacity {SPSC_CAPACITY}",
        std::mem::size_of::<Msg>()
    );
    println!();

    if want("throughput") {
        throughput_table();
    }
    if want("pingpong") {
        pingpong_table();
    }
    if want("order") {
        order_table();
    }
    if want("plain") {
        println!(
            "shared_channel from a plain thread: {}",
            shared_channel_from_plain_thread()
        );
    }
}

/// Median of `THROUGHPUT_REPS` runs, (a) and (b) interleaved so that a burst
/// of noise from other processes hits both alike.
const THROUGHPUT_REPS: usize = 3;

fn median_by(v: &mut [Throughput], f: impl Fn(&Throughput) -> f64) -> f64 {
    v.sort_by(|x, y| f(x).total_cmp(&f(y)));
    f(&v[v.len() / 2])
}

fn throughput_table() {
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..THROUGHPUT_REPS {
        ta.push(throughput_doorbell());
        tb.push(throughput_shared());
    }
    println!(
        "throughput, {THROUGHPUT_MSGS} messages, producer flat out (median of {THROUGHPUT_REPS})"
    );
    println!(
        "{:<34} {:>12} {:>16} {:>20}",
        "", "Mmsg/s", "producer ns/send", "Mmsg/s of each rep"
    );
    for (name, t) in [
        ("(a) crossbeam unbounded + doorbell", &mut ta),
        ("(b) glommio shared_channel", &mut tb),
    ] {
        let each: Vec<String> = t
            .iter()
            .map(|x| format!("{:.1}", x.msgs_per_s / 1e6))
            .collect();
        println!(
            "{:<34} {:>12.2} {:>16.1} {:>20}",
            name,
            median_by(t, |x| x.msgs_per_s) / 1e6,
            median_by(t, |x| x.producer_ns_per_send),
            each.join(" ")
        );
    }
    println!();
}

fn pingpong_table() {
    for gap in PING_GAPS {
        let pa = pingpong_doorbell(gap);
        let pb = pingpong_shared(gap);
        println!("ping-pong, {PINGS} round trips, {gap:?} busy gap between round trips");
        println!(
            "{:<34} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "", "rtt p50", "rtt p99", "rtt max", "send p50", "send mean"
        );
        for (name, p) in [
            ("(a) crossbeam unbounded + doorbell", &pa),
            ("(b) glommio shared_channel", &pb),
        ] {
            println!(
                "{:<34} {:>7.1}us {:>7.1}us {:>7.0}us {:>8.2}us {:>8.2}us",
                name,
                us(p.rtt.value_at_quantile(0.5)),
                us(p.rtt.value_at_quantile(0.99)),
                us(p.rtt.max()),
                us(p.send.value_at_quantile(0.5)),
                p.send.mean() / 1000.0
            );
        }
        println!();
    }
}

fn order_table() {
    println!("order across 2 producers taking turns ({ORDER_MSGS} messages, causal order)");
    println!(
        "{:<34} {:>12}",
        "(a) one crossbeam MPSC queue",
        format!("{} out of order", order_doorbell())
    );
    println!(
        "{:<34} {:>12}",
        "(b) mesh of 2 shared_channels",
        format!("{} out of order", order_mesh())
    );
    println!();
}
