//! User-space memory per idle logged-in connection, without TCP.
//!
//! One process here holds only about 10k socket pairs (open-file limit), so
//! the memory a connection costs outside the kernel is measured two ways:
//!
//! 1. *Real connections, no runtime*: a real `Shard` of a one-shard router
//!    (`Router::new(1)`: every uid's home is this shard, so every login stays
//!    local) accepts one end of N AF_UNIX stream socket pairs. The other
//!    ends write the real protocol (HTTP upgrade request, then a masked text
//!    frame carrying the uid); the bench reads those bytes from the shard's
//!    end into one receive buffer, as the io_uring driver does, and hands
//!    them to `Shard::on_bytes`; the other ends check the replies (101, then
//!    `login success, your uid is <uid>`). Then every connection sits idle
//!    and its live heap is counted: its slab slot, its uid table entry, its
//!    uid `Arc<str>`, and its share of the tables' growth. The io_uring
//!    driver keeps nothing per connection (a request's user data is the
//!    connection's key), so this is the whole user-space cost of a
//!    connection. N = 1000, 4000 and the largest count the fd limit allows
//!    (two descriptors per connection).
//! 2. *Tables at 1,000,000 entries*: the structures that scale with
//!    entries, filled without sockets: a `Slab` of a value shaped like the
//!    shard's `Conn` and the shard's `UidTable` (one uid per connection),
//!    then emptied again to show what is kept, before and after the sweep
//!    gives memory back.
//!
//! Each measurement runs in a child process of its own (the bench
//! re-executes itself), three times, and the medians are printed; so no run
//! reuses memory freed by another and RSS deltas are clean (the children
//! run with `MIMALLOC_ALLOW_THP=0`, or RSS would move in 2 MiB huge pages).
//! Live heap bytes are counted by a wrapper around mimalloc (the server's
//! allocator): requested sizes, and also what mimalloc really hands out
//! (`mi_usable_size`, size-class rounding included).
//!
//! Run with `cargo bench --bench conn_state`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::mem::size_of;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "child.rs"]
mod child;
use child::{run_child, Figures};

use corepush::internals::{Admission, Conn, Io, Key, Router, Shard, ShardSettings, Slab, UidTable};
use corepush::limits;
use corepush::stats::{Counter, ShardStats};
use corepush::Config;
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
static LARGE_USABLE: [AtomicUsize; LARGE_SLOTS] = [const { AtomicUsize::new(0) }; LARGE_SLOTS];

fn track_large(p: *mut u8, size: usize, usable: usize) {
    for ((slot, len), usable_len) in LARGE_PTR.iter().zip(&LARGE_SIZE).zip(&LARGE_USABLE) {
        if slot
            .compare_exchange(0, p as usize, Relaxed, Relaxed)
            .is_ok()
        {
            len.store(size, Relaxed);
            usable_len.store(usable, Relaxed);
            return;
        }
    }
}

fn untrack_large(p: *mut u8) {
    if let Some(slot) = LARGE_PTR.iter().find(|s| s.load(Relaxed) == p as usize) {
        slot.store(0, Relaxed);
    }
}

/// One live large allocation: address, requested size, usable size.
type LargeAlloc = (usize, usize, usize);

/// The live large allocations into `into` (no allocation when its capacity
/// suffices).
fn large_allocations(into: &mut Vec<LargeAlloc>) {
    into.clear();
    for ((slot, len), usable) in LARGE_PTR.iter().zip(&LARGE_SIZE).zip(&LARGE_USABLE) {
        let p = slot.load(Relaxed);
        if p != 0 && into.len() < into.capacity() {
            into.push((p, len.load(Relaxed), usable.load(Relaxed)));
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
    // SAFETY: `p` was just returned by mimalloc.
    let usable = unsafe { mi_usable_size(p.cast()) };
    LIVE.fetch_add(size as isize, Relaxed);
    USABLE.fetch_add(usable as isize, Relaxed);
    COUNT.fetch_add(1, Relaxed);
    BY_SIZE[bucket(size)].fetch_add(1, Relaxed);
    if size > EXACT {
        LARGE_BYTES.fetch_add(size as isize, Relaxed);
        track_large(p, size, usable);
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

// SAFETY: every method forwards to mimalloc with the caller's arguments
// unchanged; the counting around it never touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is mimalloc's.
        let p = unsafe { MiMalloc.alloc(l) };
        if !p.is_null() {
            on_alloc(p, l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is mimalloc's.
        let p = unsafe { MiMalloc.alloc_zeroed(l) };
        if !p.is_null() {
            on_alloc(p, l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        on_free(p, l.size());
        // SAFETY: `p` came from this allocator with layout `l`.
        unsafe { MiMalloc.dealloc(p, l) };
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // Uncount first: mimalloc may free `p` inside realloc.
        on_free(p, l.size());
        // SAFETY: `p` came from this allocator with layout `l`.
        let q = unsafe { MiMalloc.realloc(p, l, new) };
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
    // Read RSS first: reading /proc allocates (and frees) a little.
    let rss = vm_rss();
    Mark {
        live: LIVE.load(Relaxed),
        usable: USABLE.load(Relaxed),
        count: COUNT.load(Relaxed),
        large: LARGE_BYTES.load(Relaxed),
        rss,
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

// ------------------------------------------------------------- the shapes --

/// A slab slot of the shard's table: the shard's `Conn` and the slot's
/// generation (`(u32, Option<T>)` has the layout of the slab's private
/// `Slot<T>`).
const SLOT: usize = size_of::<(u32, Option<Conn>)>();

/// One entry of the uid table's hash map (plus one control byte).
const UID_ENTRY: usize = size_of::<(Arc<str>, SmallVec<[Key; 1]>)>();

/// The heap block of an `Arc<str>` of `len` bytes: two counts and the bytes,
/// padded to 8.
fn arc_str_bytes(len: usize) -> usize {
    (16 + len).next_multiple_of(8)
}

/// The allocation of a hashbrown table of `buckets` entries of `entry`
/// bytes (align 8) with 16-byte control groups (x86-64, SSE2).
fn hash_table_bytes(buckets: usize, entry: usize) -> usize {
    (buckets * entry).next_multiple_of(16) + buckets + 16
}

/// What a large allocation is: the slab's slot array or the uid table's
/// hash table, by its size.
fn classify(size: usize) -> Option<(&'static str, usize)> {
    if size.is_multiple_of(SLOT) && (size / SLOT).is_power_of_two() {
        return Some(("slab slots", size / SLOT));
    }
    let buckets = (size.saturating_sub(16) / (UID_ENTRY + 1)).next_power_of_two();
    (hash_table_bytes(buckets, UID_ENTRY) == size).then_some(("uid table", buckets))
}

// ---------------------------------------------------- part 1: real shard --

/// The upgrade request `tests/util` sends, with a fixed key.
const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

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

/// One non-blocking read on a client's end: what the server wrote.
fn client_read(client: &UnixStream, buf: &mut [u8]) -> usize {
    match (&mut &*client).read(buf) {
        Ok(0) => panic!("the server closed a connection"),
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => panic!("no reply from the server"),
        Err(e) => panic!("client read: {e}"),
    }
}

/// One receive on the shard's end of a socket, into the receive buffer (the
/// driver's provided buffer); returns the byte count (0: end of stream).
fn server_recv(fd: RawFd, buf: &mut [u8]) -> usize {
    // SAFETY: `buf` is valid for `buf.len()` bytes; the descriptor is open
    // (the shard owns it) until the shard asks to close it.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    assert!(n >= 0, "server recv: {}", std::io::Error::last_os_error());
    n as usize
}

/// What the shard asked of its driver, by kind.
#[derive(Default, Clone, Copy)]
struct IoSeen {
    read: usize,
    watch_write: usize,
    stop_reading: usize,
    close: usize,
    stop_accepting: usize,
}

/// Does what the driver would with the shard's requests: closes the
/// sockets it is done with, and counts the rest.
fn drain_io(shard: &mut Shard, seen: &mut IoSeen) {
    for io in shard.take_io() {
        match io {
            Io::Read(..) => seen.read += 1,
            Io::WatchWrite(..) => seen.watch_write += 1,
            Io::StopReading(_) => seen.stop_reading += 1,
            Io::Close { fd, .. } => {
                drop(fd);
                seen.close += 1;
            }
            Io::StopAccepting => seen.stop_accepting += 1,
        }
    }
}

/// Everything the bench itself keeps per connection, allocated and touched
/// before the baseline so neither its heap nor its pages count.
struct Clients {
    /// The client's end of each socket pair.
    ends: Vec<Option<UnixStream>>,
    /// The shard's end, as the driver knows it, and the connection's key.
    fds: Vec<RawFd>,
    keys: Vec<u64>,
}

impl Clients {
    fn new(n: usize) -> Clients {
        Clients {
            ends: (0..n).map(|_| None).collect(),
            fds: vec![-1; n],
            keys: vec![u64::MAX; n],
        }
    }

    fn key(&self, i: usize) -> Key {
        Key::from_bits(self.keys[i])
    }
}

/// Runs connection `i` from accept to its login reply, phase by phase
/// across all connections (so all of them are in flight at once, as in a
/// connection flood): accept with the upgrade request waiting, upgrade,
/// login.
fn connect_all(shard: &mut Shard, c: &mut Clients, rx: &mut [u8], seen: &mut IoSeen) {
    let n = c.ends.len();
    let mut reply = [0u8; 512];
    for i in 0..n {
        let (ours, theirs) = UnixStream::pair().expect("socketpair (open-file limit?)");
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        (&theirs).write_all(UPGRADE).unwrap();
        c.fds[i] = ours.as_raw_fd();
        let key = shard
            .accept(OwnedFd::from(ours), shard.now())
            .expect("the shard accepts");
        c.keys[i] = key.to_bits();
        c.ends[i] = Some(theirs);
        drain_io(shard, seen);
    }
    // The upgrade requests arrive.
    for i in 0..n {
        let got = server_recv(c.fds[i], rx);
        assert_eq!(got, UPGRADE.len(), "the request in one read");
        shard.on_bytes(c.key(i), shard.now(), &mut rx[..got]);
        drain_io(shard, seen);
    }
    // The clients see their 101 and send their uid.
    for i in 0..n {
        let client = c.ends[i].as_ref().unwrap();
        let got = client_read(client, &mut reply);
        let head = &reply[..got];
        assert!(head.starts_with(b"HTTP/1.1 101"), "not upgraded");
        assert!(head.ends_with(b"\r\n\r\n"), "partial upgrade reply");
        let (mut uid, mut frame) = ([0u8; 16], [0u8; 64]);
        let len = uid_into(&mut uid, i);
        let len = client_frame(&uid[..len], &mut frame);
        (&*client).write_all(&frame[..len]).unwrap();
    }
    // The logins arrive.
    for i in 0..n {
        let got = server_recv(c.fds[i], rx);
        assert!(got > 6, "the login frame in one read");
        shard.on_bytes(c.key(i), shard.now(), &mut rx[..got]);
        drain_io(shard, seen);
    }
    // The clients see their login reply.
    let prefix = b"login success, your uid is ";
    for i in 0..n {
        let client = c.ends[i].as_ref().unwrap();
        let got = client_read(client, &mut reply);
        let mut uid = [0u8; 16];
        let len = uid_into(&mut uid, i);
        assert_eq!(reply[0], 0x81, "a text frame");
        assert_eq!(reply[1] as usize, got - 2, "one whole frame");
        let text = &reply[2..got];
        assert!(text.starts_with(prefix), "not a login reply");
        assert_eq!(&text[prefix.len()..], &uid[..len], "the wrong uid");
    }
}

/// Closes every client's end; the shard reads end of stream on each of its
/// ends and lets the connections go, as under the driver.
fn close_all(shard: &mut Shard, c: &mut Clients, rx: &mut [u8], seen: &mut IoSeen) {
    for end in &mut c.ends {
        *end = None;
    }
    for i in 0..c.ends.len() {
        assert_eq!(server_recv(c.fds[i], rx), 0, "end of stream");
        shard.on_eof(c.key(i), shard.now());
        drain_io(shard, seen);
    }
}

fn child_full(n: usize) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let before_shard = mark();
    let config = Config::default();
    let (router, mut inboxes) = Router::new(1, 1024).expect("router");
    let inbox = inboxes.pop().expect("one inbox");
    drop(inboxes);
    let stats = Arc::new(ShardStats::default());
    let settings = ShardSettings {
        rules: Arc::new(config.rules().expect("rules")),
        admission: Arc::new(Admission::new(0, 0)),
        max_outbound_bytes: config.max_outbound_bytes,
        max_pending_bytes: config.max_pending_bytes,
        release_memory: None,
    };
    let mut shard = Shard::new(inbox, router, settings, stats.clone());
    let after_shard = mark();

    // Bench scaffolding, allocated and touched before the baseline.
    let mut clients = Clients::new(n);
    let mut rx = vec![0xa5u8; 4096];
    let mut seen = IoSeen::default();
    let (mut h0, mut h1) = (vec![0isize; BUCKETS], vec![0isize; BUCKETS]);
    let (mut large0, mut large1) = (
        Vec::with_capacity(LARGE_SLOTS),
        Vec::with_capacity(LARGE_SLOTS),
    );

    // One connection through its whole life first, so the shard's scratch
    // vectors (driver requests, ...) have grown once: they are the shard's,
    // not a connection's.
    {
        let mut one = Clients::new(1);
        connect_all(&mut shard, &mut one, &mut rx, &mut seen);
        close_all(&mut shard, &mut one, &mut rx, &mut seen);
        assert!(shard.is_empty());
        seen = IoSeen::default();
    }
    // Return what mimalloc holds freed, so the RSS deltas start clean.
    // SAFETY: plain call into the allocator.
    unsafe { mi_collect(true) };
    // What mimalloc hands out for one uid string (its size class).
    let arc_usable = {
        let before = USABLE.load(Relaxed);
        let probe: Arc<str> = Arc::from("u1234");
        let usable = USABLE.load(Relaxed) - before;
        drop(probe);
        usable
    };

    let base = mark();
    histogram(&mut h0);
    large_allocations(&mut large0);

    let t = Instant::now();
    connect_all(&mut shard, &mut clients, &mut rx, &mut seen);
    let login_secs = t.elapsed().as_secs_f64();

    // Idle: nothing arrives; the periodic sweep runs (nothing is due yet)
    // and the inbox is empty.
    std::thread::sleep(Duration::from_millis(50));
    shard.sweep(shard.now());
    assert_eq!(shard.on_inbox(shard.now()), 0);
    drain_io(&mut shard, &mut seen);
    let idle = mark();
    histogram(&mut h1);
    large_allocations(&mut large1);
    // Freed memory that mimalloc has not yet returned to the kernel (it
    // purges lazily, on later allocator activity) is in the RSS above.
    // SAFETY: plain call into the allocator.
    unsafe { mi_collect(true) };
    let collected = mark();

    let snap = stats.snapshot();
    assert_eq!(shard.len(), n);
    assert_eq!(snap.get(Counter::Connections), n as u64);
    assert_eq!(snap.get(Counter::LoggedIn), n as u64);
    assert_eq!(snap.get(Counter::LocalUids), n as u64);
    assert_eq!(snap.get(Counter::HandedOver), 0, "a login left the shard");
    assert_eq!(
        snap.get(Counter::FramesQueued),
        0,
        "an outbox queue was used"
    );
    let during = seen;

    // Close every client; every connection must go, and its memory with it.
    close_all(&mut shard, &mut clients, &mut rx, &mut seen);
    assert!(shard.is_empty());
    let snap = stats.snapshot();
    assert_eq!(snap.get(Counter::LocalUids), 0);
    assert_eq!(seen.close, n, "every socket closed");
    let closed = mark();
    shard.sweep(shard.now());
    let swept = mark();

    emit(&mut out, "n", n as f64);
    emit(&mut out, "arc_usable", arc_usable as f64);
    emit(&mut out, "login_secs", login_secs);
    emit(&mut out, "io.read", during.read as f64);
    emit(&mut out, "io.watch_write", during.watch_write as f64);
    emit(&mut out, "io.stop_reading", during.stop_reading as f64);
    emit(&mut out, "io.close", during.close as f64);
    emit_delta(&mut out, "shard", before_shard, after_shard, 1);
    emit_delta(&mut out, "conn", base, idle, n);
    emit(
        &mut out,
        "conn.rss_collected",
        (collected.rss - base.rss) as f64 / n as f64,
    );
    emit_delta(&mut out, "closed", base, closed, 1);
    emit_delta(&mut out, "swept", base, swept, 1);

    // Large allocations made since the baseline and still live: the tables.
    large1.retain(|a| !large0.contains(a));
    let (mut slab_bytes, mut uid_bytes, mut other_bytes) = (0, 0, 0);
    let (mut slab_usable, mut uid_usable, mut other_usable) = (0, 0, 0);
    for &(_, size, usable) in &large1 {
        match classify(size) {
            Some(("slab slots", _)) => (slab_bytes, slab_usable) = (size, usable),
            Some(_) => (uid_bytes, uid_usable) = (size, usable),
            None => (other_bytes, other_usable) = (other_bytes + size, other_usable + usable),
        }
    }
    let per = |bytes: usize| bytes as f64 / n as f64;
    emit(&mut out, "slab_array", slab_bytes as f64);
    emit(&mut out, "slab_array.usable", slab_usable as f64);
    emit(&mut out, "uid_array", uid_bytes as f64);
    emit(&mut out, "uid_array.usable", uid_usable as f64);
    emit(&mut out, "other_large", per(other_bytes));
    emit(&mut out, "other_large.usable", per(other_usable));
    for size in 1..=EXACT {
        let d = h1[size] - h0[size];
        if d != 0 {
            emit(&mut out, &format!("hist.{size}"), d as f64 / n as f64);
        }
    }
    out
}

// ------------------------------------------------- part 2: the tables --

/// A stand-in for the shard's `Conn` (whose fields are private): its size
/// and alignment, a niche where `Conn` has one (the descriptor), so
/// `Option<ConnSized>` is as large as `Option<Conn>`, and the uid it
/// shares with the uid table.
#[allow(dead_code)]
struct ConnSized {
    uid: Option<Arc<str>>,
    fd: NonZeroU32,
    rest: [u8; size_of::<Conn>() - 20],
}

fn child_tables(m: usize) -> String {
    assert_eq!(size_of::<ConnSized>(), size_of::<Conn>());
    assert_eq!(size_of::<Option<ConnSized>>(), size_of::<Option<Conn>>());
    let mut out = String::new();
    let mut keys: Vec<Key> = Vec::with_capacity(m);
    let mut slab: Slab<ConnSized> = Slab::default();
    let mut uids = UidTable::default();
    let mut uid = String::with_capacity(16);
    let fd = NonZeroU32::new(7).unwrap();

    // SAFETY: plain call into the allocator.
    unsafe { mi_collect(true) };
    let t0 = mark();
    for _ in 0..m {
        keys.push(slab.insert(ConnSized {
            uid: None,
            fd,
            rest: [0; size_of::<Conn>() - 20],
        }));
    }
    let t1 = mark();
    for (i, &key) in keys.iter().enumerate() {
        uid.clear();
        write!(uid, "u{i}").unwrap();
        let (shared, first) = uids.add(&uid, key);
        assert!(first);
        slab.get_mut(key).unwrap().uid = Some(shared);
    }
    let t2 = mark();
    // SAFETY: plain call into the allocator.
    unsafe { mi_collect(true) };
    let purged = mark();
    for &key in &keys {
        let shared = slab.get_mut(key).unwrap().uid.take().unwrap();
        assert!(uids.remove(&shared, key));
        drop(shared);
        slab.remove(key).unwrap();
    }
    assert!(slab.is_empty());
    assert!(uids.is_empty());
    let t3 = mark();
    // What the shard's sweep does after mass disconnects.
    slab.shrink_if_sparse();
    uids.shrink_if_sparse();
    let t4 = mark();
    // SAFETY: plain call into the allocator.
    unsafe { mi_collect(true) };
    let t5 = mark();

    emit(&mut out, "m", m as f64);
    emit_delta(&mut out, "slab", t0, t1, m);
    emit_delta(&mut out, "uids", t1, t2, m);
    emit_delta(&mut out, "total", t0, t2, m);
    emit(
        &mut out,
        "total.rss_collected",
        (purged.rss - t0.rss) as f64 / m as f64,
    );
    emit_delta(&mut out, "kept", t0, t3, 1);
    emit_delta(&mut out, "shrunk", t0, t4, 1);
    emit_delta(&mut out, "returned", t0, t5, 1);
    out
}

// ------------------------------------------------------------------ parent --

const RUNS: usize = 3;

/// Runs a child `RUNS` times; every figure is the median of its runs (0
/// where a run does not have it).
fn run_median(args: &[&str]) -> Figures {
    // mimalloc asks for transparent huge pages by default, so RSS would move
    // in 2 MiB steps: more than all the connections here hold. Without them
    // RSS moves by 4 KiB pages; the heap is the same.
    let no_thp = [("MIMALLOC_ALLOW_THP", "0")];
    let runs: Vec<Figures> = (0..RUNS).map(|_| run_child(args, &no_thp)).collect();
    let mut keys: Vec<&String> = runs.iter().flat_map(|r| r.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|k| {
            let mut v: Vec<f64> = runs.iter().map(|r| *r.get(k).unwrap_or(&0.0)).collect();
            v.sort_by(f64::total_cmp);
            (k.clone(), v[RUNS / 2])
        })
        .collect()
}

/// Descriptors a child needs besides its connections: stdio, the pipes to
/// the parent, the router's eventfd, /proc reads.
const RESERVED_FDS: u64 = 32;

/// The largest connection count the open-file limit allows: two
/// descriptors per connection.
fn max_connections(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(RESERVED_FDS) / 2) as usize
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

/// Bytes per connection by what holds them, as (requested, usable).
struct Breakdown {
    slot: f64,
    slab_growth: (f64, f64),
    entry: f64,
    uid_growth: (f64, f64),
    arc: (f64, f64),
    other: (f64, f64),
}

impl Breakdown {
    fn of(f: &Figures) -> Breakdown {
        let n = f["n"];
        let slot = SLOT as f64;
        let entry = UID_ENTRY as f64 + 1.0;
        // The tables' arrays now, less what they were at the baseline
        // (small arrays then, freed as the tables grew).
        let (mut slab_before, mut uid_before) = (0.0, 0.0);
        let mut arcs = 0.0;
        for (size, per) in sorted_suffixes(f, "hist.") {
            match classify(size) {
                Some(("slab slots", _)) if per < 0.0 => slab_before -= per * size as f64,
                Some((_, _)) if per < 0.0 => uid_before -= per * size as f64,
                // The uid strings are the only small allocations a
                // connection keeps: u0..u9999 are 24-byte blocks.
                _ if size == arc_str_bytes(5) => arcs = per,
                _ => {}
            }
        }
        // `*_before` are per connection already, like the histogram.
        let growth = |array: f64, before: f64, inline: f64| array / n - before - inline;
        let slab_growth = (
            growth(f["slab_array"], slab_before, slot),
            growth(f["slab_array.usable"], slab_before, slot),
        );
        let uid_growth = (
            growth(f["uid_array"], uid_before, entry),
            growth(f["uid_array.usable"], uid_before, entry),
        );
        let arc = (arcs * arc_str_bytes(5) as f64, arcs * f["arc_usable"]);
        let other = (
            f["conn.live"] - slot - slab_growth.0 - entry - uid_growth.0 - arc.0,
            f["conn.usable"] - slot - slab_growth.1 - entry - uid_growth.1 - arc.1,
        );
        Breakdown {
            slot,
            slab_growth,
            entry,
            uid_growth,
            arc,
            other,
        }
    }
}

const TABLE_ENTRIES: usize = 1_000_000;

/// The project's target for an idle logged-in connection, in user space.
const TARGET_BYTES: f64 = 512.0;

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
    // `cargo bench` passes `--bench`; nothing else is taken.

    // Children inherit the raised soft limit.
    let fd_limit = limits::raise_fd_limit().expect("open-file limit").now;
    let largest = max_connections(fd_limit);
    let mut counts: Vec<usize> = [1_000, 4_000]
        .into_iter()
        .filter(|&n| n < largest)
        .collect();
    counts.push(largest);
    let full: Vec<Figures> = counts
        .iter()
        .map(|n| run_median(&["full", &n.to_string()]))
        .collect();
    let tables = run_median(&["tables", &TABLE_ENTRIES.to_string()]);

    println!("user-space memory per idle logged-in connection (no TCP; counted around mimalloc)");
    println!("every figure is the median of {RUNS} runs, each in a process of its own");
    println!();
    println!("sizes (inline):");
    println!(
        "  Conn {} B, Option<Conn> {} B, slab slot (u32 generation, Option<Conn>) {SLOT} B, Key {} B",
        size_of::<Conn>(),
        size_of::<Option<Conn>>(),
        size_of::<Key>()
    );
    println!("  uid map entry (Arc<str>, SmallVec<[Key; 1]>) {UID_ENTRY} B + 1 control byte");
    println!(
        "  uid Arc<str> block: 16 B of counts + the uid, padded to 8 ({} B for u0..u9999999)",
        arc_str_bytes(7)
    );
    println!();
    println!("1. real connections: Shard::accept on AF_UNIX pairs, upgraded, logged in, idle");
    println!("   (Router::new(1): one shard, home to every uid; fd limit {fd_limit})");
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
            "{:>6} {:>12.1} {:>15.1} {:>12.2} {:>13.1} {:>11.0} {:>15.0} {:>8.3}",
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
    println!(
        "   (RSS after purge: after mi_collect(true), which returns freed pages mimalloc still holds;\n    \
         4 KiB pages: the children run without transparent huge pages, MIMALLOC_ALLOW_THP=0)"
    );
    println!();
    println!("   breakdown, bytes per connection (requested / as mimalloc hands them out):");
    println!(
        "{:>6} {:>12} {:>16} {:>14} {:>16} {:>14} {:>10} {:>14}",
        "N",
        "slab slot",
        "slab growth",
        "uid entry",
        "uid table growth",
        "uid Arc<str>",
        "other",
        "total"
    );
    for f in &full {
        let b = Breakdown::of(f);
        println!(
            "{:>6} {:>12.1} {:>16} {:>14.1} {:>16} {:>14} {:>10} {:>14}",
            f["n"],
            b.slot,
            format!("{:.1} / {:.1}", b.slab_growth.0, b.slab_growth.1),
            b.entry,
            format!("{:.1} / {:.1}", b.uid_growth.0, b.uid_growth.1),
            format!("{:.1} / {:.1}", b.arc.0, b.arc.1),
            format!("{:.1} / {:.1}", b.other.0, b.other.1),
            format!("{:.1} / {:.1}", f["conn.live"], f["conn.usable"]),
        );
    }
    let big = full.last().unwrap();
    println!(
        "   table arrays at N = {}: slab slots {} ({} slots), uid table {} ({} buckets)",
        big["n"],
        kib(big["slab_array"]),
        big["slab_array"] as usize / SLOT,
        kib(big["uid_array"]),
        classify(big["uid_array"] as usize).map_or(0, |(_, b)| b),
    );
    println!(
        "   live allocations per connection by requested size, N = {}:",
        big["n"]
    );
    for (size, per) in sorted_suffixes(big, "hist.") {
        if per.abs() >= 0.001 {
            println!(
                "   {:>6} B x {:>6.3} = {:>7.2} B/conn",
                size,
                per,
                size as f64 * per
            );
        }
    }
    println!(
        "   driver requests while connecting and idle (N = {}): read {}, watch-write {}, stop-reading {}, close {}",
        big["n"], big["io.read"], big["io.watch_write"], big["io.stop_reading"], big["io.close"]
    );
    println!(
        "   one-off: Shard::new + Router::new(1) {} heap / {} RSS",
        kib(big["shard.live"]),
        kib(big["shard.rss"])
    );
    println!(
        "   after all {} closed: {} heap kept ({} allocations: table capacity); after the sweep: {} ({} allocations)",
        big["n"],
        kib(big["closed.live"]),
        big["closed.allocs"],
        kib(big["swept.live"]),
        big["swept.allocs"]
    );
    println!();
    println!("2. tables at {TABLE_ENTRIES} entries (one shard, no sockets)");
    println!(
        "{:<36} {:>12} {:>15} {:>13} {:>13} {:>13}",
        "", "live B/entry", "mimalloc B/ent", "allocs/entry", "of which >4K", "RSS B/entry"
    );
    for (name, key) in [
        ("Slab<Conn-sized> slots", "slab"),
        ("UidTable (+ the uid's Arc<str>)", "uids"),
        ("total", "total"),
    ] {
        println!(
            "{:<36} {:>12.1} {:>15.1} {:>13.2} {:>13.1} {:>13.1}",
            name,
            tables[&format!("{key}.live")],
            tables[&format!("{key}.usable")],
            tables[&format!("{key}.allocs")],
            tables[&format!("{key}.large")],
            tables[&format!("{key}.rss")]
        );
    }
    println!(
        "(RSS while the tables grew includes the arrays they outgrew; after mi_collect(true): {:.1} B/entry)",
        tables["total.rss_collected"]
    );
    println!(
        "after removing all: {} live ({} allocations: slot array, free list, hash table), RSS {}",
        kib(tables["kept.live"]),
        tables["kept.allocs"],
        kib(tables["kept.rss"])
    );
    println!(
        "after shrink_if_sparse (the sweep): {} live ({} allocations); RSS {} once mimalloc purged",
        kib(tables["shrunk.live"]),
        tables["shrunk.allocs"],
        kib(tables["returned.rss"])
    );
    println!();
    let at = big["conn.usable"];
    println!(
        "user-space bytes per idle logged-in connection: {:.0} requested / {:.0} from mimalloc at N = {}; \
         {:.0} / {:.0} at 1M entries; target {TARGET_BYTES:.0}: {}",
        big["conn.live"],
        at,
        big["n"],
        tables["total.live"],
        tables["total.usable"],
        if at.max(tables["total.usable"]) <= TARGET_BYTES {
            "met"
        } else {
            "NOT met"
        }
    );
}
