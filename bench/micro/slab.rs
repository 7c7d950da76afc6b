//! The per-shard connection table: 1,000,000 entries, one thread.
//!
//! Compares corepush's generational slab (`src/shard/slab.rs`) with the
//! one-thread tables it could be replaced by: the `slab` crate (no
//! generations), `slotmap`'s `SlotMap` and `DenseSlotMap` (generational
//! keys, like ours; its `HopSlotMap` is deprecated), and with
//! `sharded-slab` (built for many threads sharing one table).
//!
//! Two values: one shaped like the shard's `Conn` (its size, with a niche
//! where `Conn` has one, the descriptor) and a 96-byte one with no niche
//! (where an `Option<T>` slot costs 8 more bytes).
//!
//! Measures ns of CPU time (the thread's CPU clock, so time spent
//! descheduled on a shared host is not counted) per insert, get (random
//! order), iteration over every value, remove (random order) and insert
//! into the emptied table (slots reused in the order they were freed), and
//! live heap per entry, counted by a wrapper around mimalloc (the server's
//! allocator); then what the table keeps once emptied, and after giving
//! memory back where it can. Each table runs in a child process of its own
//! (the bench re-executes itself), 3 times, interleaved, and the medians
//! are printed.
//!
//! Run with `cargo bench --bench slab`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::mem::size_of;
use std::num::NonZeroU32;
use std::time::Duration;

use child::{run_child, Figures};
use corepush::internals::{Conn, Key, Slab};
use slotmap::{DefaultKey, DenseSlotMap, Key as _, KeyData, SlotMap};

#[path = "child.rs"]
mod child;
#[path = "counting.rs"]
mod counting;
use counting::live;

// ----------------------------------------------------------- the payloads --

trait Payload: Send + Sync + 'static {
    const NAME: &'static str;
    fn new(i: u64) -> Self;
    fn id(&self) -> u64;
}

/// Shaped like the shard's `Conn` (whose fields are private): its size and
/// alignment, and a niche (`Conn`'s descriptor), so `Option<ConnLike>` is
/// no larger than the value.
#[allow(dead_code)]
struct ConnLike {
    id: u64,
    fd: NonZeroU32,
    rest: [u8; size_of::<Conn>() - 12],
}

impl Payload for ConnLike {
    const NAME: &'static str = "conn";
    fn new(i: u64) -> Self {
        ConnLike {
            id: i,
            fd: NonZeroU32::new(i as u32 | 1).unwrap(),
            rest: [i as u8; size_of::<Conn>() - 12],
        }
    }
    fn id(&self) -> u64 {
        self.id
    }
}

/// 96 bytes and no niche: `Option<Wide>` needs a tag.
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Wide {
    id: u64,
    fd: i32,
    flags: u32,
    created: u64,
    last_ping: u64,
    bytes_out: u64,
    topics: [u64; 7],
}

impl Payload for Wide {
    const NAME: &'static str = "wide";
    fn new(i: u64) -> Self {
        Wide {
            id: i,
            fd: i as i32,
            flags: 0,
            created: i,
            last_ping: 0,
            bytes_out: 0,
            topics: [i; 7],
        }
    }
    fn id(&self) -> u64 {
        self.id
    }
}

const _: () = assert!(size_of::<Wide>() == 96);
const _: () = assert!(size_of::<Option<ConnLike>>() == size_of::<Option<Conn>>());

// ------------------------------------------------------------- the tables --

/// What the bench does with a table.
trait Table<V: Payload> {
    type K: Copy;
    fn new() -> Self;
    fn insert(&mut self, v: V) -> Self::K;
    /// The value's id, if the key still names a value.
    fn read(&self, k: Self::K) -> Option<u64>;
    fn remove(&mut self, k: Self::K) -> bool;
    /// Visits every value (what the shard's sweep does).
    fn visit_all(&mut self) -> u64;
    /// Gives memory back where the table can; false when it has no way to.
    fn shrink(&mut self) -> bool;
}

struct Ours<V>(Slab<V>);

impl<V: Payload> Table<V> for Ours<V> {
    type K = Key;
    fn new() -> Self {
        Ours(Slab::default())
    }
    fn insert(&mut self, v: V) -> Key {
        self.0.insert(v)
    }
    fn read(&self, k: Key) -> Option<u64> {
        self.0.get(k).map(V::id)
    }
    fn remove(&mut self, k: Key) -> bool {
        self.0.remove(k).is_some()
    }
    fn visit_all(&mut self) -> u64 {
        self.0
            .iter_mut()
            .fold(0, |s, (_, v)| s.wrapping_add(v.id()))
    }
    fn shrink(&mut self) -> bool {
        self.0.shrink_if_sparse();
        true
    }
}

struct SlabCrate<V>(slab::Slab<V>);

impl<V: Payload> Table<V> for SlabCrate<V> {
    type K = usize;
    fn new() -> Self {
        SlabCrate(slab::Slab::new())
    }
    fn insert(&mut self, v: V) -> usize {
        self.0.insert(v)
    }
    fn read(&self, k: usize) -> Option<u64> {
        self.0.get(k).map(V::id)
    }
    fn remove(&mut self, k: usize) -> bool {
        self.0.try_remove(k).is_some()
    }
    fn visit_all(&mut self) -> u64 {
        self.0.iter().fold(0, |s, (_, v)| s.wrapping_add(v.id()))
    }
    fn shrink(&mut self) -> bool {
        self.0.shrink_to_fit();
        true
    }
}

/// `SlotMap` and `DenseSlotMap` share one API. (`HopSlotMap` is left out:
/// slotmap 1.1 deprecates it, to be removed in 2.0.)
macro_rules! slotmap_table {
    ($name:ident, $map:ident) => {
        struct $name<V>($map<DefaultKey, V>);

        impl<V: Payload> Table<V> for $name<V> {
            type K = DefaultKey;
            fn new() -> Self {
                $name($map::new())
            }
            fn insert(&mut self, v: V) -> DefaultKey {
                self.0.insert(v)
            }
            fn read(&self, k: DefaultKey) -> Option<u64> {
                self.0.get(k).map(V::id)
            }
            fn remove(&mut self, k: DefaultKey) -> bool {
                self.0.remove(k).is_some()
            }
            fn visit_all(&mut self) -> u64 {
                self.0.iter().fold(0, |s, (_, v)| s.wrapping_add(v.id()))
            }
            fn shrink(&mut self) -> bool {
                false // no API: the slots keep their versions
            }
        }
    };
}

slotmap_table!(Basic, SlotMap);
slotmap_table!(Dense, DenseSlotMap);

struct Sharded<V>(sharded_slab::Slab<V>);

impl<V: Payload> Table<V> for Sharded<V> {
    type K = usize;
    fn new() -> Self {
        Sharded(sharded_slab::Slab::new())
    }
    fn insert(&mut self, v: V) -> usize {
        self.0.insert(v).expect("sharded-slab full")
    }
    fn read(&self, k: usize) -> Option<u64> {
        self.0.get(k).map(|v| v.id())
    }
    fn remove(&mut self, k: usize) -> bool {
        self.0.remove(k)
    }
    fn visit_all(&mut self) -> u64 {
        self.0.unique_iter().fold(0, |s, v| s.wrapping_add(v.id()))
    }
    fn shrink(&mut self) -> bool {
        false // no API
    }
}

// ------------------------------------------------------------------ bench --

const N: usize = 1_000_000;

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// The calling thread's CPU time: on this shared host a process spends
/// much of its wall time descheduled, which this clock does not count.
#[derive(Clone, Copy)]
struct Instant(Duration);

impl Instant {
    fn now() -> Instant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills the struct it is given.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        Instant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
}

/// ns of CPU time per entry since `t`.
fn ns(t: Instant) -> f64 {
    (Instant::now().0 - t.0).as_nanos() as f64 / N as f64
}

/// One round over a fresh table; `key=value` lines into `out`.
fn round<V: Payload, T: Table<V>>(out: &mut String) {
    // The key vector is the caller's, allocated outside the counted span.
    let mut keys: Vec<T::K> = Vec::with_capacity(N);
    let base = live();
    let mut table = T::new();

    let t = Instant::now();
    for i in 0..N as u64 {
        keys.push(table.insert(V::new(i)));
    }
    let insert = ns(t);
    let bytes = (live() - base) as f64 / N as f64;
    shuffle(&mut keys, 0x9E37_79B9_7F4A_7C15);

    let t = Instant::now();
    let mut sum = 0u64;
    for &k in &keys {
        sum = sum.wrapping_add(table.read(k).unwrap());
    }
    let get = ns(t);
    black_box(sum);

    let t = Instant::now();
    black_box(table.visit_all());
    let iterate = ns(t);

    let t = Instant::now();
    for &k in &keys {
        assert!(table.remove(k));
    }
    let remove = ns(t);
    let kept = live() - base;

    let t = Instant::now();
    for (i, k) in keys.iter_mut().enumerate() {
        *k = table.insert(V::new(i as u64));
    }
    let reinsert = ns(t);
    let bytes_reinsert = (live() - base) as f64 / N as f64;

    // A mass disconnect: 99% leave, the 1% that stay sit in slots spread
    // over the whole table (the re-insert reused slots in random order).
    let (stay, leave) = keys.split_at(N / 100);
    for &k in leave {
        assert!(table.remove(k));
    }
    let shrinks = table.shrink();
    let sparse_shrunk = live() - base;
    for &k in stay {
        assert!(table.remove(k));
    }
    table.shrink();
    let after_shrink = live() - base;
    drop(table);

    for (k, v) in [
        ("insert", insert),
        ("get", get),
        ("iterate", iterate),
        ("remove", remove),
        ("reinsert", reinsert),
        ("bytes", bytes),
        ("bytes_reinsert", bytes_reinsert),
        ("kept_mb", kept as f64 / 1e6),
        ("sparse_shrunk_mb", sparse_shrunk as f64 / 1e6),
        ("shrunk_mb", after_shrink as f64 / 1e6),
        ("shrinks", shrinks as u8 as f64),
    ] {
        writeln!(out, "{k}={v}").unwrap();
    }
}

/// Whether a key kept past its value's removal misses the value that
/// reused its slot (1) or reaches it (0).
fn stale_key_misses<V: Payload, T: Table<V>>() -> bool {
    let mut table = T::new();
    let old = table.insert(V::new(1));
    assert!(table.remove(old));
    let new = table.insert(V::new(2));
    assert_eq!(table.read(new), Some(2));
    table.read(old).is_none()
}

fn child<V: Payload, T: Table<V>>() -> String {
    let mut out = String::new();
    // Warm the allocator and the process once, then measure.
    round::<V, T>(&mut String::new());
    round::<V, T>(&mut out);
    writeln!(out, "stale_misses={}", stale_key_misses::<V, T>() as u8).unwrap();
    out
}

fn child_of(payload: &str, table: &str) -> String {
    macro_rules! pick {
        ($v:ty) => {
            match table {
                "ours" => child::<$v, Ours<$v>>(),
                "slab" => child::<$v, SlabCrate<$v>>(),
                "slotmap" => child::<$v, Basic<$v>>(),
                "dense" => child::<$v, Dense<$v>>(),
                "sharded" => child::<$v, Sharded<$v>>(),
                other => panic!("unknown table {other}"),
            }
        };
    }
    match payload {
        ConnLike::NAME => pick!(ConnLike),
        Wide::NAME => pick!(Wide),
        other => panic!("unknown payload {other}"),
    }
}

// ------------------------------------------------------------------ parent --

const RUNS: usize = 3;

const TABLES: [(&str, &str); 5] = [
    ("ours", "corepush generational slab"),
    ("slab", "slab 0.4"),
    ("slotmap", "slotmap SlotMap 1.1"),
    ("dense", "slotmap DenseSlotMap"),
    ("sharded", "sharded-slab 0.1"),
];

/// A slotmap key in 60 bits, as corepush's io_uring user data would need it
/// (3 tag bits on top): a live key's version is odd, so its low bit carries
/// nothing, and the index must stay below 2^29.
fn pack_slotmap_key(key: DefaultKey) -> u64 {
    let ffi = key.data().as_ffi();
    let (index, version) = (ffi & 0xFFFF_FFFF, ffi >> 32);
    assert!(index < 1 << 29, "slot index beyond 29 bits");
    (version >> 1) << 29 | index
}

fn unpack_slotmap_key(bits: u64) -> DefaultKey {
    let bits = bits & ((1 << 60) - 1);
    let (index, version) = (bits & ((1 << 29) - 1), (bits >> 29) << 1 | 1);
    KeyData::from_ffi(version << 32 | index).into()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        print!("{}", child_of(&args[2], &args[3]));
        return;
    }

    // Every round runs each table once, so noise spreads over all of them.
    let payloads = [ConnLike::NAME, Wide::NAME];
    let mut runs: HashMap<(&str, &str), Vec<Figures>> = HashMap::new();
    for payload in payloads {
        for _ in 0..RUNS {
            for (table, _) in TABLES {
                runs.entry((payload, table))
                    .or_default()
                    .push(run_child(&[payload, table], &[]));
            }
        }
    }
    let median = |payload: &str, table: &str, key: &str| {
        let mut v: Vec<f64> = runs[&(payload, table)].iter().map(|f| f[key]).collect();
        v.sort_by(f64::total_cmp);
        v[RUNS / 2]
    };

    println!("connection table: {N} entries, one thread; get and remove in random order");
    println!("every figure is the median of {RUNS} runs, each in a process of its own");
    for payload in payloads {
        let (value, slot) = match payload {
            ConnLike::NAME => (
                format!(
                    "a {}-byte value shaped like the shard's Conn (with a niche)",
                    size_of::<ConnLike>()
                ),
                size_of::<(u32, Option<ConnLike>)>(),
            ),
            _ => (
                format!("a {}-byte value with no niche", size_of::<Wide>()),
                size_of::<(u32, Option<Wide>)>(),
            ),
        };
        println!();
        println!("{value}; our slot (u32 generation, Option<T>) = {slot} B");
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>10} {:>12} {:>13} {:>12} {:>18} {:>11}",
            "",
            "insert",
            "get",
            "iterate",
            "remove",
            "re-insert",
            "bytes/entry",
            "bytes/entry'",
            "MB emptied",
            "MB shrunk 1%; 0%",
            "stale key"
        );
        for (table, name) in TABLES {
            let m = |key| median(payload, table, key);
            let shrunk = if m("shrinks") > 0.0 {
                format!("{:.1}; {:.1}", m("sparse_shrunk_mb"), m("shrunk_mb"))
            } else {
                "no API".to_string()
            };
            let stale = if m("stale_misses") > 0.0 {
                "misses"
            } else {
                "REACHES"
            };
            println!(
                "{:<28} {:>7.1}ns {:>7.1}ns {:>7.1}ns {:>7.1}ns {:>8.1}ns {:>12.1} {:>13.1} {:>12.1} {:>18} {:>11}",
                name,
                m("insert"),
                m("get"),
                m("iterate"),
                m("remove"),
                m("reinsert"),
                m("bytes"),
                m("bytes_reinsert"),
                m("kept_mb"),
                shrunk,
                stale
            );
        }
        let ratio =
            |table: &str, key: &str| median(payload, table, key) / median(payload, "ours", key);
        println!(
            "ratio to ours (>1: ours faster)  get: slab {:.2}, slotmap {:.2}, dense {:.2}, sharded {:.2}",
            ratio("slab", "get"),
            ratio("slotmap", "get"),
            ratio("dense", "get"),
            ratio("sharded", "get")
        );
    }
    println!();
    println!("insert: 1M into a new table (growth included); get, remove: 1M in random order;");
    println!(
        "iterate: every value once, per value; re-insert: 1M into the emptied table (slot reuse);"
    );
    println!("bytes/entry: live heap after 1M inserts / 1M; bytes/entry': after the re-insert;");
    println!("MB emptied: live heap once all removed; MB shrunk: after shrink_if_sparse (ours) or");
    println!("shrink_to_fit (slab), where the table has a way to give memory back, with 1% of the");
    println!("values left in slots spread over the table, then with none (both give back only the");
    println!("empty slots at the end of the table);");
    println!("stale key: a key kept past its value's removal, after the slot was reused.");

    // The key corepush puts in io_uring user data: 61 bits, 3 tag bits above.
    let mut ours: Slab<()> = Slab::default();
    let k = ours.insert(());
    assert_eq!(Key::from_bits(k.to_bits() | 7 << 61), k);
    let mut sm: SlotMap<DefaultKey, ()> = SlotMap::new();
    let k = sm.insert(());
    assert_eq!(unpack_slotmap_key(pack_slotmap_key(k) | 7 << 61), k);
    let far = DefaultKey::from(KeyData::from_ffi(u64::MAX << 32 | ((1 << 29) - 1)));
    assert_eq!(unpack_slotmap_key(pack_slotmap_key(far)), far);
    println!();
    println!(
        "keys: ours {} B, 61 bits (index 32, generation 29: wraps after 2^29 reuses of a slot);",
        size_of::<Key>()
    );
    println!(
        "  slotmap {} B, 64 bits as_ffi (index 32, version 32, odd while live: wraps after 2^31 reuses),",
        size_of::<DefaultKey>()
    );
    println!("  60 bits once repacked (version >> 1, index < 2^29; checked above); slab usize, no generation;");
    println!("  sharded-slab usize (generation, thread id, page and slot packed by its Config).");
}
