//! User-space memory per idle logged-in connection, without TCP.
//!
//! One process here holds only about 19k sockets (open-file limit), so the
//! memory a connection costs outside the kernel is measured two ways:
//!
//! 1. *Real connections*: a real `Shard` (no listener, no sweeper) adopts N
//!    AF_UNIX stream sockets as glommio `TcpStream`s with `Shard::open`; the
//!    other ends speak the real protocol (HTTP upgrade, then a masked text
//!    frame with the uid) until every connection is logged in and idle.
//!    Everything a connection really holds is counted: its slab slot, its
//!    glommio task (the `connection::serve` future), glommio's pending poll
//!    source, its uid entries (local map and directory; one shard is home to
//!    every uid), and the share of table growth. N = 1000, 4000 and the
//!    largest count the fd limit allows (two descriptors per connection).
//! 2. *Tables at 1,000,000 entries*: the structures that scale with entries,
//!    filled without sockets: `Slab<ConnState>` and the uid tables of a
//!    2-shard server (each uid has a local entry on its host and a directory
//!    entry at its home), then emptied again to show what is kept.
//!
//! Each measurement runs in a child process of its own (the bench re-executes
//! itself), so no run reuses memory freed by another and RSS deltas are clean.
//! Live heap bytes are counted by a wrapper around mimalloc (the server's
//! allocator): requested sizes, and also what mimalloc really hands out
//! (`mi_usable_size`, size-class rounding included).
//!
//! Run with `cargo bench --bench conn_state`.

use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corepush::connection::{self, ConnState};
use corepush::router::{self, Router};
use corepush::shard::Shard;
use corepush::slab::{Key, Slab};
use corepush::stats::{Counter, ShardStats};
use corepush::uid_table::UidTable;
use corepush::Config;
use glommio::{LocalExecutorBuilder, Placement};
use mimalloc::MiMalloc;
use smallvec::SmallVec;

// ------------------------------------------------------ counting allocator --

extern "C" {
    // Part of the mimalloc library that the `mimalloc` crate links in (the
    // crate's own wrappers sit behind its `extended` feature).
    fn mi_usable_size(p: *const c_void) -> usize;
    fn mi_collect(force: bool);
}

/// Allocations up to this size are counted per exact size.
const EXACT: usize = 4096;
const BUCKETS: usize = EXACT + 2;
const LARGE: usize = EXACT + 1;

/// Live requested bytes, live bytes as mimalloc rounds them, live
/// allocations, live bytes of allocations over `EXACT` (table arrays), and
/// live allocations by requested size.
static LIVE: AtomicIsize = AtomicIsize::new(0);
static USABLE: AtomicIsize = AtomicIsize::new(0);
static COUNT: AtomicIsize = AtomicIsize::new(0);
static LARGE_BYTES: AtomicIsize = AtomicIsize::new(0);
static BY_SIZE: [AtomicIsize; BUCKETS] = [const { AtomicIsize::new(0) }; BUCKETS];

/// Every live allocation over `EXACT`, by address (0: free entry), so the
/// table arrays can be listed one by one. Large allocations are rare.
const LARGE_SLOTS: usize = 4096;
static LARGE_PTR: [AtomicUsize; LARGE_SLOTS] = [const { AtomicUsize::new(0) }; LARGE_SLOTS];
static LARGE_SIZE: [AtomicUsize; LARGE_SLOTS] = [const { AtomicUsize::new(0) }; LARGE_SLOTS];

fn track_large(p: *mut u8, size: usize) {
    for (slot, len) in LARGE_PTR.iter().zip(&LARGE_SIZE) {
        if slot
            .compare_exchange(0, p as usize, Relaxed, Relaxed)
            .is_ok()
        {
            len.store(size, Relaxed);
            return;
        }
    }
}

fn untrack_large(p: *mut u8) {
    if let Some(slot) = LARGE_PTR.iter().find(|s| s.load(Relaxed) == p as usize) {
        slot.store(0, Relaxed);
    }
}

/// The live large allocations, (address, size), into `into` (no allocation
/// when its capacity suffices).
fn large_allocations(into: &mut Vec<(usize, usize)>) {
    into.clear();
    for (slot, len) in LARGE_PTR.iter().zip(&LARGE_SIZE) {
        let p = slot.load(Relaxed);
        if p != 0 && into.len() < into.capacity() {
            into.push((p, len.load(Relaxed)));
        }
    }
}

fn bucket(size: usize) -> usize {
    if size <= EXACT {
        size
    } else {
        LARGE
    }
}

fn on_alloc(p: *mut u8, size: usize) {
    LIVE.fetch_add(size as isize, Relaxed);
    // SAFETY: `p` was just returned by mimalloc.
    USABLE.fetch_add(unsafe { mi_usable_size(p.cast()) } as isize, Relaxed);
    COUNT.fetch_add(1, Relaxed);
    BY_SIZE[bucket(size)].fetch_add(1, Relaxed);
    if size > EXACT {
        LARGE_BYTES.fetch_add(size as isize, Relaxed);
        track_large(p, size);
    }
}

/// Call before the block is freed.
fn on_free(p: *mut u8, size: usize) {
    LIVE.fetch_sub(size as isize, Relaxed);
    // SAFETY: `p` is a live mimalloc block.
    USABLE.fetch_sub(unsafe { mi_usable_size(p.cast()) } as isize, Relaxed);
    COUNT.fetch_sub(1, Relaxed);
    BY_SIZE[bucket(size)].fetch_sub(1, Relaxed);
    if size > EXACT {
        LARGE_BYTES.fetch_sub(size as isize, Relaxed);
        untrack_large(p);
    }
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = MiMalloc.alloc(l);
        if !p.is_null() {
            on_alloc(p, l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = MiMalloc.alloc_zeroed(l);
        if !p.is_null() {
            on_alloc(p, l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        on_free(p, l.size());
        MiMalloc.dealloc(p, l);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // Uncount first: mimalloc may free `p` inside realloc.
        on_free(p, l.size());
        let q = MiMalloc.realloc(p, l, new);
        if q.is_null() {
            on_alloc(p, l.size()); // the old block stays
        } else {
            on_alloc(q, new);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn vm_rss() -> isize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: isize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Memory counters at one moment.
#[derive(Clone, Copy)]
struct Mark {
    live: isize,
    usable: isize,
    count: isize,
    large: isize,
    rss: isize,
}

fn mark() -> Mark {
    Mark {
        live: LIVE.load(Relaxed),
        usable: USABLE.load(Relaxed),
        count: COUNT.load(Relaxed),
        large: LARGE_BYTES.load(Relaxed),
        rss: vm_rss(),
    }
}

/// Copies the live-allocations-by-size histogram into `into` (no allocation).
fn histogram(into: &mut [isize]) {
    for (slot, counter) in into.iter_mut().zip(&BY_SIZE) {
        *slot = counter.load(Relaxed);
    }
}

/// Child output: `key=value` pairs, one per line.
fn emit(out: &mut String, key: &str, value: f64) {
    writeln!(out, "{key}={value}").unwrap();
}

/// Per-unit deltas between two marks, under `prefix`.
fn emit_delta(out: &mut String, prefix: &str, a: Mark, b: Mark, units: usize) {
    let per = |x: isize, y: isize| (y - x) as f64 / units as f64;
    emit(out, &format!("{prefix}.live"), per(a.live, b.live));
    emit(out, &format!("{prefix}.usable"), per(a.usable, b.usable));
    emit(out, &format!("{prefix}.allocs"), per(a.count, b.count));
    emit(out, &format!("{prefix}.large"), per(a.large, b.large));
    emit(out, &format!("{prefix}.rss"), per(a.rss, b.rss));
}

// ---------------------------------------------------- part 1: real shard --

/// What `tests/util` sends: an upgrade request with a fixed key.
const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// Same as the server binary: 1 MiB of io_uring buffers per shard.
const IO_MEMORY: usize = 1 << 20;

/// Writes the uid `u{i}` into `buf`; returns its length.
fn uid_into(buf: &mut [u8; 16], i: usize) -> usize {
    let mut w = &mut buf[..];
    write!(w, "u{i}").unwrap();
    16 - w.len()
}

/// A masked client text frame carrying `payload` (< 126 bytes), written
/// into `out`; returns its length. No allocation.
fn client_frame(payload: &[u8], out: &mut [u8; 64]) -> usize {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out[0] = 0x81;
    out[1] = 0x80 | payload.len() as u8;
    out[2..6].copy_from_slice(&mask);
    for (i, b) in payload.iter().enumerate() {
        out[6 + i] = b ^ mask[i % 4];
    }
    6 + payload.len()
}

/// One non-blocking read on a client end: Some(n) when bytes came.
fn try_read(client: &UnixStream, buf: &mut [u8]) -> Option<usize> {
    match (&mut &*client).read(buf) {
        Ok(0) => panic!("server closed a connection"),
        Ok(n) => Some(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("client read: {e}"),
    }
}

fn child_full(n: usize) -> String {
    let before_exec = mark();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("conn-state")
        .io_memory(IO_MEMORY)
        .spawn(move || async move { full(n, before_exec).await })
        .expect("executor starts")
        .join()
        .expect("executor finishes")
}

async fn full(n: usize, before_exec: Mark) -> String {
    let sleep = |ms| glommio::timer::sleep(Duration::from_millis(ms));
    let mut out = String::with_capacity(64 * 1024);
    let in_exec = mark();

    let (router, mut inboxes) = Router::new(1).expect("router");
    let inbox = inboxes.pop().expect("one inbox");
    let stats = Arc::new(ShardStats::default());
    let config = Arc::new(Config::default());
    let shard = Rc::new(Shard::new(0, config, router, inbox, stats.clone()));
    let after_shard = mark();

    // Bench scaffolding, allocated before the baseline.
    let mut clients: Vec<UnixStream> = Vec::with_capacity(n);
    let mut state: Vec<u8> = vec![0; n];
    let (mut h0, mut h1) = (vec![0isize; BUCKETS], vec![0isize; BUCKETS]);
    let (mut large0, mut large1) = (
        Vec::with_capacity(LARGE_SLOTS),
        Vec::with_capacity(LARGE_SLOTS),
    );
    let mut buf = [0u8; 512];

    // What a glommio stream allocates, and the size of the task's future
    // (built and dropped without being polled).
    let future_size = {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        histogram(&mut h0);
        // SAFETY: a fresh descriptor, owned by the stream from here on.
        let stream = unsafe { glommio::net::TcpStream::from_raw_fd(ours.into_raw_fd()) };
        histogram(&mut h1);
        for size in 1..=EXACT {
            let d = h1[size] - h0[size];
            if d != 0 {
                emit(&mut out, &format!("stream_alloc.{size}"), d as f64);
            }
        }
        let key = Slab::<()>::default().insert(());
        let future = connection::serve(shard.clone(), key, stream, Vec::new());
        let size = std::mem::size_of_val(&future);
        drop(future);
        drop(theirs);
        size
    };

    sleep(20).await;
    let base = mark();
    histogram(&mut h0);
    large_allocations(&mut large0);

    let t = Instant::now();
    for _ in 0..n {
        let (ours, theirs) = UnixStream::pair().expect("socketpair (open-file limit?)");
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        (&theirs).write_all(UPGRADE).unwrap();
        // SAFETY: a fresh descriptor, owned by the stream from here on.
        let stream = unsafe { glommio::net::TcpStream::from_raw_fd(ours.into_raw_fd()) };
        shard.open(stream);
        clients.push(theirs);
    }
    // Drive the clients: 101, then the uid, then the login reply.
    loop {
        let mut done = 0;
        for (i, client) in clients.iter().enumerate() {
            match state[i] {
                0 => {
                    if let Some(k) = try_read(client, &mut buf) {
                        let head = &buf[..k];
                        assert!(head.starts_with(b"HTTP/1.1 101"), "not upgraded");
                        assert!(head.ends_with(b"\r\n\r\n"), "partial upgrade reply");
                        let (mut uid, mut frame) = ([0u8; 16], [0u8; 64]);
                        let len = uid_into(&mut uid, i);
                        let len = client_frame(&uid[..len], &mut frame);
                        (&*client).write_all(&frame[..len]).unwrap();
                        state[i] = 1;
                    }
                }
                1 => {
                    if let Some(k) = try_read(client, &mut buf) {
                        let mut uid = [0u8; 16];
                        let len = uid_into(&mut uid, i);
                        let reply = &buf[2..k];
                        assert_eq!(buf[0], 0x81);
                        assert!(reply.starts_with(b"login success, your uid is "));
                        assert!(reply.ends_with(&uid[..len]));
                        state[i] = 2;
                    }
                }
                _ => done += 1,
            }
        }
        if done == n && stats.snapshot().get(Counter::LoggedIn) == n as u64 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "logins stalled");
        sleep(1).await;
    }
    let login_secs = t.elapsed().as_secs_f64();
    sleep(50).await; // idle
    let idle = mark();
    histogram(&mut h1);
    large_allocations(&mut large1);
    // Freed memory that mimalloc has not yet returned to the kernel (it
    // purges lazily, on later allocator activity) is in the RSS above.
    // SAFETY: plain call into the allocator.
    unsafe { mi_collect(true) };
    let collected = mark();
    let snap = stats.snapshot();
    assert_eq!(snap.get(Counter::Connections), n as u64);
    assert_eq!(snap.get(Counter::LocalUids), n as u64);
    assert_eq!(
        snap.get(Counter::FramesQueued),
        0,
        "an outbound queue was used"
    );

    // Close every client; every connection must go, and its memory with it.
    drop(clients);
    let t = Instant::now();
    while stats.snapshot().get(Counter::Connections) > 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "closes stalled");
        sleep(1).await;
    }
    sleep(50).await;
    let closed = mark();
    let snap = stats.snapshot();
    assert_eq!(snap.get(Counter::LocalUids), 0);

    emit(&mut out, "n", n as f64);
    emit(&mut out, "login_secs", login_secs);
    emit(&mut out, "future_size", future_size as f64);
    emit_delta(&mut out, "exec", before_exec, in_exec, 1);
    emit_delta(&mut out, "shard", in_exec, after_shard, 1);
    emit_delta(&mut out, "conn", base, idle, n);
    emit(
        &mut out,
        "conn.rss_collected",
        (collected.rss - base.rss) as f64 / n as f64,
    );
    // Large allocations made since the baseline and still live.
    large1.retain(|a| !large0.contains(a));
    large1.sort_by_key(|&(_, size)| std::cmp::Reverse(size));
    for (i, (_, size)) in large1.iter().enumerate() {
        emit(&mut out, &format!("large.{i}"), *size as f64);
    }
    emit_delta(&mut out, "closed", base, closed, 1);
    for size in 1..=EXACT {
        let d = h1[size] - h0[size];
        if d != 0 {
            emit(&mut out, &format!("hist.{size}"), d as f64 / n as f64);
        }
    }
    out
}

// ------------------------------------------------- part 2: the tables --

fn child_tables(m: usize) -> String {
    let mut out = String::new();
    let mut keys: Vec<Key> = Vec::with_capacity(m);
    let mut slab: Slab<ConnState> = Slab::default();
    // Every connection of a uid lives on the uid's home shard.
    let mut tables = [UidTable::default(), UidTable::default()];
    let mut uid = String::with_capacity(16);

    let t0 = mark();
    for _ in 0..m {
        keys.push(slab.insert(ConnState::new(-1, 0, u64::MAX)));
    }
    let t1 = mark();
    for (i, &key) in keys.iter().enumerate() {
        uid.clear();
        write!(uid, "u{i}").unwrap();
        let home = router::home_of(&uid, 2);
        let (shared, first) = tables[home as usize].add(&uid, key);
        assert!(first);
        slab.get_mut(key).unwrap().uid = Some(shared);
    }
    let t2 = mark();
    for &key in &keys {
        let shared = slab.get_mut(key).unwrap().uid.take().unwrap();
        let home = router::home_of(&shared, 2);
        assert!(tables[home as usize].remove(&shared, key));
        drop(shared);
        slab.remove(key).unwrap();
    }
    let t4 = mark();
    assert!(slab.is_empty());
    assert!(tables.iter().all(UidTable::is_empty));

    emit(&mut out, "m", m as f64);
    emit_delta(&mut out, "slab", t0, t1, m);
    emit_delta(&mut out, "local", t1, t2, m);
    emit_delta(&mut out, "total", t0, t2, m);
    emit_delta(&mut out, "kept", t0, t4, 1);
    out
}

// ------------------------------------------------------------------ parent --

type Figures = HashMap<String, f64>;

fn run_child(args: &[&str]) -> Figures {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("child")
        .args(args)
        .output()
        .expect("run child");
    assert!(
        out.status.success(),
        "child {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

/// The largest connection count the open-file limit allows: two
/// descriptors per connection, and room for the executor, stdio and so on.
fn max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    (lim.rlim_cur.min(1 << 24) as usize).saturating_sub(256) / 2
}

/// The figures named `{prefix}{number}`, as (number, value), by number.
fn sorted_suffixes(f: &Figures, prefix: &str) -> Vec<(usize, f64)> {
    let mut v: Vec<(usize, f64)> = f
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.parse().ok()?, *v)))
        .collect();
    v.sort_by_key(|&(key, _)| key);
    v
}

const TABLE_ENTRIES: usize = 1_000_000;

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let n: usize = args[3].parse().unwrap();
        let out = match args[2].as_str() {
            "full" => child_full(n),
            "tables" => child_tables(n),
            other => panic!("unknown child {other}"),
        };
        print!("{out}");
        return;
    }

    let largest = max_connections().min(9_000);
    let counts: Vec<usize> = [1_000, 4_000, largest]
        .into_iter()
        .filter(|&n| n <= largest)
        .collect();
    let full: Vec<Figures> = counts
        .iter()
        .map(|n| run_child(&["full", &n.to_string()]))
        .collect();
    let tables = run_child(&["tables", &TABLE_ENTRIES.to_string()]);

    use std::mem::size_of;
    println!("user-space memory per connection (no TCP; counted around mimalloc)");
    println!();
    println!("sizes (inline):");
    println!(
        "  ConnState {} B, Option<ConnState> {} B, slab slot (u32, Option<ConnState>) {} B",
        size_of::<ConnState>(),
        size_of::<Option<ConnState>>(),
        size_of::<(u32, Option<ConnState>)>()
    );
    println!(
        "  connection::serve future {} B, glommio TcpStream {} B, Key {} B",
        full[0]["future_size"],
        size_of::<glommio::net::TcpStream>(),
        size_of::<Key>()
    );
    println!(
        "  uid map entry (Arc<str>, SmallVec<[Key; 1]>) {} B + 1 control byte",
        size_of::<(Arc<str>, SmallVec<[Key; 1]>)>()
    );
    println!();
    println!("1. real connections: Shard::open on AF_UNIX pairs, upgraded, logged in, idle");
    println!("   (one shard, home to every uid: slot + task + poll source + local and directory entries)");
    println!(
        "{:>6} {:>12} {:>15} {:>12} {:>13} {:>11} {:>15} {:>8}",
        "N",
        "live B/conn",
        "mimalloc B/conn",
        "allocs/conn",
        "of which >4K",
        "RSS B/conn",
        "RSS after purge",
        "login s"
    );
    for f in &full {
        println!(
            "{:>6} {:>12.0} {:>15.0} {:>12.2} {:>13.0} {:>11.0} {:>15.0} {:>8.2}",
            f["n"],
            f["conn.live"],
            f["conn.usable"],
            f["conn.allocs"],
            f["conn.large"],
            f["conn.rss"],
            f["conn.rss_collected"],
            f["login_secs"]
        );
    }
    println!("   (RSS after purge: after mi_collect(true), which returns freed pages mimalloc still holds)");
    let big = full.last().unwrap();
    println!(
        "   one-off: executor {} heap / {} RSS; Shard::new {} heap (64 KiB scratch, ping frame, router) / {} RSS",
        kib(big["exec.live"]),
        kib(big["exec.rss"]),
        kib(big["shard.live"]),
        kib(big["shard.rss"])
    );
    println!(
        "   after all {} closed: {} heap kept ({} allocations: table capacity), RSS {:+}",
        big["n"],
        kib(big["closed.live"]),
        big["closed.allocs"],
        kib(big["closed.rss"])
    );
    println!();
    println!(
        "   live allocations per connection by requested size, N = {}:",
        big["n"]
    );
    let mut small_rest = 0.0;
    for (size, per) in sorted_suffixes(big, "hist.") {
        if per.abs() >= 0.25 {
            println!(
                "   {:>6} B x {:>5.2} = {:>7.1} B/conn",
                size,
                per,
                size as f64 * per
            );
        } else {
            small_rest += size as f64 * per;
        }
    }
    println!("   other small allocations: {small_rest:.1} B/conn");
    let stream: Vec<String> = sorted_suffixes(big, "stream_alloc.")
        .iter()
        .map(|(size, count)| format!("{count} x {size} B"))
        .collect();
    println!(
        "   (a glommio TcpStream alone allocates {}: its pending poll Source; the task is the rest)",
        stream.join(" + ")
    );
    println!(
        "   allocations > 4 KiB, amortized: {:.1} B/conn; the live ones made since the baseline:",
        big["conn.large"]
    );
    let slot = size_of::<(u32, Option<ConnState>)>();
    let entry = size_of::<(Arc<str>, SmallVec<[Key; 1]>)>();
    for (_, size) in sorted_suffixes(big, "large.") {
        let size = size as usize;
        let what = if size.is_multiple_of(slot) && (size / slot).is_power_of_two() {
            format!("slab slots, {} x {slot} B", size / slot)
        } else if size > 16
            && (size - 16).is_multiple_of(entry + 1)
            && ((size - 16) / (entry + 1)).is_power_of_two()
        {
            format!(
                "uid hash table, {} buckets x ({entry} + 1) B",
                (size - 16) / (entry + 1)
            )
        } else {
            // The slab's free list is empty while every slot is in use.
            "glommio's own tables (source map, queues)".to_string()
        };
        println!(
            "   {:>10} B = {:>6.1} B/conn  {what}",
            size,
            size as f64 / big["n"]
        );
    }
    println!();
    println!("2. tables at {TABLE_ENTRIES} entries (2-shard server, no sockets)");
    println!(
        "{:<34} {:>12} {:>15} {:>13} {:>13} {:>13}",
        "", "live B/entry", "mimalloc B/ent", "allocs/entry", "of which >4K", "RSS B/entry"
    );
    for (name, key) in [
        ("Slab<ConnState> slots", "slab"),
        ("uid maps (+ Arc<str> uid)", "local"),
        ("total", "total"),
    ] {
        println!(
            "{:<34} {:>12.1} {:>15.1} {:>13.2} {:>13.1} {:>13.1}",
            name,
            tables[&format!("{key}.live")],
            tables[&format!("{key}.usable")],
            tables[&format!("{key}.allocs")],
            tables[&format!("{key}.large")],
            tables[&format!("{key}.rss")]
        );
    }
    println!(
        "after removing all: {} live ({} allocations: slab Vec + free list + hash table capacity, kept by design), RSS {:+}",
        kib(tables["kept.live"]),
        tables["kept.allocs"],
        kib(tables["kept.rss"])
    );
    println!();
    println!(
        "user-space bytes per idle logged-in connection: {:.0} (real, at N={}); of which slot+uid tables at 1M: {:.0}",
        big["conn.live"], big["n"], tables["total.live"]
    );
}
