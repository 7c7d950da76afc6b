//! Cross-shard messaging as src/router.rs does it, between two plain std
//! threads pinned to cores 0 and 1 (no ring, no socket).
//!
//! A shard's inbox is a bounded crossbeam MPSC queue (`--inbox-capacity`,
//! 16384 by default). A consumer that finds it empty declares itself asleep
//! (`InboxReceiver::sleep`) and waits on its eventfd; a producer rings that
//! eventfd only when it takes the wake-up (`Router::take_wakeup`), once per
//! sleep, so a busy consumer is never woken. The bench uses the real
//! `Router`, `InboxReceiver` and `ShardMsg` (through `corepush::internals`).
//! What differs from a server: the consumer waits in poll(2) on its eventfd
//! where a shard waits in io_uring_enter, and a producer always writes the
//! eventfd where a shard producer rings with IORING_OP_MSG_RING from its
//! own ring.
//!
//! Measures:
//! - throughput of 10M small messages with the producer flat out, and the
//!   producer's ns per send, for (a) `Router::send` per message, as the
//!   HTTP API and the cluster bridge send (a full inbox: sleep 20 us, then
//!   longer), and (b) `Router::push` with one `take_wakeup` per 64
//!   messages, as a shard sends within one turn (a full inbox: try again
//!   200 us later). The inbox is bounded, so a producer flat out soon
//!   waits for room: its ns per send include that wait;
//! - round trips between two inboxes with the peer asleep: p50/p99 of the
//!   round trip, and the producer's cost of a send that rings a sleeper
//!   against one that finds the peer awake (the cost of a wake);
//! - order across 2 producers taking turns into one inbox: how many
//!   messages arrive out of their causal order.
//!
//! Run with `cargo bench --bench channels` (optional section names as
//! arguments: throughput pingpong order). Compare figures as ratios within
//! one run: the machine is shared and noisy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corepush::internals::{InboxReceiver, PushError, Router, ShardMsg};
use hdrhistogram::Histogram;

const THROUGHPUT_MSGS: u64 = 10_000_000;
const PINGS: u64 = 100_000;
/// Messages a shard-like producer queues between two wake-up checks.
const BATCH: u64 = 64;
/// How long a shard whose messages do not fit waits before it tries again
/// (the same constant in src/driver/uring.rs).
const BACKED_UP_RETRY: Duration = Duration::from_micros(200);
/// Distinct uids and frames cycled by the producer, so producer (clone)
/// and consumer (drop) rarely touch the same refcount.
const PAYLOADS: usize = 4096;
/// Busy gap between two pings. At 100 us the peer has surely gone back to
/// sleep, so every ping must wake it; with no gap it sometimes has not.
const PING_GAPS: [Duration; 2] = [Duration::ZERO, Duration::from_micros(100)];

fn capacity() -> usize {
    corepush::Config::default().inbox_capacity
}

/// What a push for one uid carries: the uid and a shared 100-byte frame.
struct Payloads {
    uids: Vec<Arc<str>>,
    frames: Vec<Arc<[u8]>>,
}

impl Payloads {
    fn new() -> Arc<Payloads> {
        Arc::new(Payloads {
            uids: (0..PAYLOADS).map(|i| Arc::from(format!("u{i}"))).collect(),
            frames: (0..PAYLOADS)
                .map(|i| Arc::from(vec![i as u8; 100].into_boxed_slice()))
                .collect(),
        })
    }

    fn msg(&self, i: u64) -> ShardMsg {
        let i = i as usize % PAYLOADS;
        ShardMsg::ToUid {
            uid: self.uids[i].clone(),
            frame: self.frames[i].clone(),
            origin: Some(0),
            ack: None,
        }
    }
}

/// A message whose frame is its sequence number.
fn numbered(seq: u64) -> ShardMsg {
    ShardMsg::ToUid {
        uid: Arc::from("u"),
        frame: Arc::from(&seq.to_le_bytes()[..]),
        origin: None,
        ack: None,
    }
}

fn seq_of(msg: &ShardMsg) -> u64 {
    match msg {
        ShardMsg::ToUid { frame, .. } => u64::from_le_bytes(frame[..8].try_into().unwrap()),
        _ => panic!("not a numbered message"),
    }
}

// ---------------------------------------------------------------- the shard --

/// What a shard does with its inbox, without the sockets: drain it; when it
/// is empty, declare itself asleep and wait for the eventfd (a shard waits
/// in io_uring_enter, where the eventfd's poll or a MSG_RING completes).
/// Returns when `f` returns false, with how many times it slept.
fn drain(rx: &InboxReceiver, mut f: impl FnMut(ShardMsg) -> bool) -> u64 {
    let mut sleeps = 0;
    loop {
        while let Some(m) = rx.try_recv() {
            if !f(m) {
                return sleeps;
            }
        }
        if rx.sleep() {
            sleeps += 1;
            wait_readable(rx.eventfd());
            rx.clear_eventfd();
            rx.awake();
        }
    }
}

fn recv(rx: &InboxReceiver) -> ShardMsg {
    let mut out = None;
    drain(rx, |m| {
        out = Some(m);
        false
    });
    out.unwrap()
}

fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    while unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {}
}

/// Queues `msg` for `to` as a shard does (no waiting), and rings `to` if
/// this producer took its wake-up. True when it rang.
fn push_and_ring(router: &Router, to: u16, msg: ShardMsg) -> bool {
    router.push(to, msg).expect("room in the inbox");
    ring_if_asleep(router, to)
}

fn ring_if_asleep(router: &Router, to: u16) -> bool {
    let woke = router.take_wakeup(to);
    if woke {
        router.wake(to);
    }
    woke
}

// ---------------------------------------------------------------- helpers --

/// Pins the calling thread to `core` (best effort).
fn pin_to(core: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
}

fn on_core<T: Send + 'static>(
    core: usize,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            pin_to(core);
            f()
        })
        .expect("spawn thread")
}

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 1_000_000_000, 3).unwrap()
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

// ------------------------------------------------------------- throughput --

struct Throughput {
    msgs_per_s: f64,
    producer_ns_per_send: f64,
    consumer_sleeps: u64,
}

#[derive(Clone, Copy)]
enum Producer {
    /// `Router::send` per message: a thread that is not a shard.
    Send,
    /// `Router::push`, one `take_wakeup` per `BATCH`: a shard's turn.
    ShardTurn,
}

fn throughput(how: Producer) -> Throughput {
    let (router, mut rxs) = Router::new(1, capacity()).unwrap();
    let rx = rxs.remove(0);
    let pl = Payloads::new();
    let consumer = on_core(1, "cons", move || {
        let mut n = 0u64;
        let sleeps = drain(&rx, |m| {
            std::hint::black_box(&m);
            n += 1;
            n < THROUGHPUT_MSGS
        });
        (Instant::now(), n, sleeps)
    });
    let producer = on_core(0, "prod", move || {
        let t0 = Instant::now();
        match how {
            Producer::Send => {
                for i in 0..THROUGHPUT_MSGS {
                    router.send(0, pl.msg(i)).expect("consumer gone");
                }
            }
            Producer::ShardTurn => {
                for i in 0..THROUGHPUT_MSGS {
                    let mut msg = pl.msg(i);
                    // Full: a shard holds the message, stops reading its
                    // sender, and tries again after at most BACKED_UP_RETRY.
                    while let Err(PushError::Full(back)) = router.push(0, msg) {
                        msg = back;
                        ring_if_asleep(&router, 0);
                        std::thread::sleep(BACKED_UP_RETRY);
                    }
                    if i % BATCH == BATCH - 1 {
                        ring_if_asleep(&router, 0);
                    }
                }
                ring_if_asleep(&router, 0);
            }
        }
        (t0, t0.elapsed())
    });
    let (t0, prod) = producer.join().unwrap();
    let (t1, n, consumer_sleeps) = consumer.join().unwrap();
    assert_eq!(n, THROUGHPUT_MSGS);
    Throughput {
        msgs_per_s: THROUGHPUT_MSGS as f64 / (t1 - t0).as_secs_f64(),
        producer_ns_per_send: prod.as_nanos() as f64 / THROUGHPUT_MSGS as f64,
        consumer_sleeps,
    }
}

// -------------------------------------------------------------- ping-pong --

struct PingPong {
    rtt: Histogram<u64>,
    /// The pinger's send (push, take the wake-up, write the eventfd) when it
    /// rang the echo thread awake, and when it found it awake.
    send_woke: Histogram<u64>,
    send_quiet: Histogram<u64>,
}

/// Ping-pong between two inboxes of one router, as between two shards:
/// shard 0's thread pings shard 1's, which answers at once.
fn pingpong(gap: Duration) -> PingPong {
    let (router, mut rxs) = Router::new(2, capacity()).unwrap();
    let (echo_rx, ping_rx) = (rxs.pop().unwrap(), rxs.pop().unwrap());
    let pl = Payloads::new();
    let echo_router = router.clone();
    let echo_pl = pl.clone();
    let echo = on_core(1, "echo", move || {
        for i in 0..PINGS {
            let m = recv(&echo_rx);
            std::hint::black_box(&m);
            push_and_ring(&echo_router, 0, echo_pl.msg(i));
        }
    });
    let pinger = on_core(0, "ping", move || {
        let (mut rtt, mut send_woke, mut send_quiet) = (hist(), hist(), hist());
        for i in 0..PINGS {
            spin(gap);
            let t0 = Instant::now();
            let woke = push_and_ring(&router, 1, pl.msg(i));
            let t1 = Instant::now();
            let m = recv(&ping_rx);
            let t2 = Instant::now();
            std::hint::black_box(&m);
            let send = if woke {
                &mut send_woke
            } else {
                &mut send_quiet
            };
            send.record((t1 - t0).as_nanos() as u64).unwrap();
            rtt.record((t2 - t0).as_nanos() as u64).unwrap();
        }
        PingPong {
            rtt,
            send_woke,
            send_quiet,
        }
    });
    echo.join().unwrap();
    pinger.join().unwrap()
}

// ---------------------------------------------------------- FIFO ordering --

const ORDER_MSGS: u64 = 100_000;

/// Two producers take turns (a token passed through `turn`), so message k is
/// causally sent before message k+1.
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

/// Two plain threads send into one inbox with `Router::send`, taking turns;
/// counts how many messages the consumer sees out of that order.
fn order() -> u64 {
    let (router, mut rxs) = Router::new(1, capacity()).unwrap();
    let rx = rxs.remove(0);
    let turn = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    for p in 0..2u64 {
        let (router, turn) = (router.clone(), turn.clone());
        producers.push(std::thread::spawn(move || {
            for k in (p..ORDER_MSGS).step_by(2) {
                wait_turn(&turn, k);
                router.send(0, numbered(k)).expect("consumer gone");
                turn.store(k + 1, Ordering::Release);
            }
        }));
    }
    let consumer = std::thread::spawn(move || {
        let (mut n, mut last, mut inversions) = (0u64, None::<u64>, 0u64);
        drain(&rx, |m| {
            let seq = seq_of(&m);
            if last.is_some_and(|l| seq < l) {
                inversions += 1;
            }
            last = Some(last.map_or(seq, |l| l.max(seq)));
            n += 1;
            n < ORDER_MSGS
        });
        inversions
    });
    for p in producers {
        p.join().unwrap();
    }
    consumer.join().unwrap()
}

// ------------------------------------------------------------------- main --

fn main() {
    // Optional section names as arguments: throughput pingpong order.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    println!(
        "channels: a shard's inbox (src/router.rs) between two threads pinned to cores 0 -> 1"
    );
    println!(
        "message = ShardMsg::ToUid, {} bytes (Arc<str> uid + Arc<[u8]> frame); inbox capacity {}",
        std::mem::size_of::<ShardMsg>(),
        capacity()
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
        ta.push(throughput(Producer::Send));
        tb.push(throughput(Producer::ShardTurn));
    }
    println!(
        "throughput, {THROUGHPUT_MSGS} messages, producer flat out (median of {THROUGHPUT_REPS})"
    );
    println!(
        "{:<40} {:>8} {:>16} {:>15} {:>20}",
        "", "Mmsg/s", "producer ns/send", "consumer sleeps", "Mmsg/s of each rep"
    );
    let b_name = format!("(b) Router::push, take_wakeup per {BATCH}");
    for (name, t) in [
        ("(a) Router::send per message", &mut ta),
        (b_name.as_str(), &mut tb),
    ] {
        let each: Vec<String> = t
            .iter()
            .map(|x| format!("{:.1}", x.msgs_per_s / 1e6))
            .collect();
        println!(
            "{:<40} {:>8.2} {:>16.1} {:>15.0} {:>20}",
            name,
            median_by(t, |x| x.msgs_per_s) / 1e6,
            median_by(t, |x| x.producer_ns_per_send),
            median_by(t, |x| x.consumer_sleeps as f64),
            each.join(" ")
        );
    }
    println!();
}

/// A send percentile, or `-` when no send fell in that class.
fn send_us(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        "-".into()
    } else {
        format!("{:.2}us", us(h.value_at_quantile(0.5)))
    }
}

fn pingpong_table() {
    println!("ping-pong between two inboxes, {PINGS} round trips each");
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>8} {:>15} {:>15}",
        "busy gap between pings",
        "rtt p50",
        "rtt p99",
        "rtt max",
        "woke",
        "send p50, woke",
        "send p50, awake"
    );
    for gap in PING_GAPS {
        let p = pingpong(gap);
        let woke = p.send_woke.len() as f64 / PINGS as f64 * 100.0;
        println!(
            "{:<24} {:>7.1}us {:>7.1}us {:>7.0}us {:>6.2}% {:>15} {:>15}",
            format!("{gap:?}"),
            us(p.rtt.value_at_quantile(0.5)),
            us(p.rtt.value_at_quantile(0.99)),
            us(p.rtt.max()),
            woke,
            send_us(&p.send_woke),
            send_us(&p.send_quiet)
        );
    }
    println!("(woke: pings whose send rang the echo thread's eventfd; a send's cost is");
    println!(" push + take_wakeup + the eventfd write when it rang)");
    println!();
}

fn order_table() {
    println!("order across 2 producers taking turns ({ORDER_MSGS} messages, causal order)");
    println!(
        "{:<40} {:>12}",
        "one inbox, Router::send from each",
        format!("{} out of order", order())
    );
    println!();
}
