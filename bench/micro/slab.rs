//! The per-shard connection table: 1,000,000 entries of a 96-byte struct.
//!
//! Compares `sharded-slab` (concurrent, lock-free) with a minimal
//! single-threaded generational slab written here. A shard owns its table
//! and never shares it, so the question is what the concurrency costs.
//!
//! Measures ns per insert, get and remove (get/remove in random order) and
//! live heap bytes per entry, counted by a wrapper around the system
//! allocator.
//!
//! Run with `cargo bench --bench slab`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

// ------------------------------------------------------ counting allocator --

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

// ------------------------------------------------------------ the payload --

/// Stand-in for a connection record: 96 bytes, no niche.
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct Conn {
    uid: u64,
    fd: i32,
    flags: u32,
    created: u64,
    last_ping: u64,
    bytes_out: u64,
    topics: [u64; 7],
}

const _: () = assert!(std::mem::size_of::<Conn>() == 96);

fn conn(i: u64) -> Conn {
    Conn {
        uid: i,
        fd: i as i32,
        flags: 0,
        created: i,
        last_ping: 0,
        bytes_out: 0,
        topics: [i; 7],
    }
}

// ------------------------------------------------- generational slab here --

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Key: slot index and the generation it was inserted with, so a stale key
/// (connection closed, slot reused) never reaches the new occupant.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Key {
    index: u32,
    generation: u32,
}

struct GenSlab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
}

impl<T> GenSlab<T> {
    fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, value: T) -> Key {
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            Key {
                index,
                generation: slot.generation,
            }
        } else {
            let index = u32::try_from(self.slots.len()).expect("slab full");
            self.slots.push(Slot {
                generation: 0,
                value: Some(value),
            });
            Key {
                index,
                generation: 0,
            }
        }
    }

    fn get(&self, key: Key) -> Option<&T> {
        match self.slots.get(key.index as usize) {
            Some(s) if s.generation == key.generation => s.value.as_ref(),
            _ => None,
        }
    }

    fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let v = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
        Some(v)
    }
}

// ------------------------------------------------------------------ bench --

const N: usize = 1_000_000;

struct Row {
    insert_ns: f64,
    get_ns: f64,
    remove_ns: f64,
    bytes_per_entry: f64,
    bytes_after_remove: usize,
    reinsert_ns: f64,
    bytes_after_reinsert: f64,
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

fn ns(t: Instant) -> f64 {
    t.elapsed().as_nanos() as f64 / N as f64
}

fn bench_gen() -> Row {
    let base = live();
    let mut slab = GenSlab::new();
    let t = Instant::now();
    let mut keys: Vec<Key> = (0..N as u64).map(|i| slab.insert(conn(i))).collect();
    let insert_ns = ns(t);
    // The key vector is the caller's, not the table's.
    let bytes = live() - base - keys.capacity() * std::mem::size_of::<Key>();
    shuffle(&mut keys, 0x9E37_79B9_7F4A_7C15);

    let t = Instant::now();
    let mut sum = 0u64;
    for k in &keys {
        sum = sum.wrapping_add(slab.get(*k).unwrap().uid);
    }
    let get_ns = ns(t);
    black_box(sum);

    let t = Instant::now();
    for k in &keys {
        black_box(slab.remove(*k).unwrap());
    }
    let remove_ns = ns(t);
    let bytes_after_remove = live() - base - keys.capacity() * std::mem::size_of::<Key>();

    let t = Instant::now();
    for (i, k) in keys.iter_mut().enumerate() {
        *k = slab.insert(conn(i as u64));
    }
    let reinsert_ns = ns(t);
    let bytes_after_reinsert = live() - base - keys.capacity() * std::mem::size_of::<Key>();
    drop(slab);
    Row {
        insert_ns,
        get_ns,
        remove_ns,
        bytes_per_entry: bytes as f64 / N as f64,
        bytes_after_remove,
        reinsert_ns,
        bytes_after_reinsert: bytes_after_reinsert as f64 / N as f64,
    }
}

fn bench_sharded() -> Row {
    let base = live();
    let slab = sharded_slab::Slab::new();
    let t = Instant::now();
    let mut keys: Vec<usize> = (0..N as u64)
        .map(|i| slab.insert(conn(i)).unwrap())
        .collect();
    let insert_ns = ns(t);
    let bytes = live() - base - keys.capacity() * std::mem::size_of::<usize>();
    shuffle(&mut keys, 0x9E37_79B9_7F4A_7C15);

    let t = Instant::now();
    let mut sum = 0u64;
    for k in &keys {
        sum = sum.wrapping_add(slab.get(*k).unwrap().uid);
    }
    let get_ns = ns(t);
    black_box(sum);

    let t = Instant::now();
    for k in &keys {
        assert!(slab.remove(*k));
    }
    let remove_ns = ns(t);
    let bytes_after_remove = live() - base - keys.capacity() * std::mem::size_of::<usize>();

    let t = Instant::now();
    for (i, k) in keys.iter_mut().enumerate() {
        *k = slab.insert(conn(i as u64)).unwrap();
    }
    let reinsert_ns = ns(t);
    let bytes_after_reinsert = live() - base - keys.capacity() * std::mem::size_of::<usize>();
    drop(slab);
    Row {
        insert_ns,
        get_ns,
        remove_ns,
        bytes_per_entry: bytes as f64 / N as f64,
        bytes_after_remove,
        reinsert_ns,
        bytes_after_reinsert: bytes_after_reinsert as f64 / N as f64,
    }
}

fn main() {
    println!(
        "slab: {N} entries of a {}-byte struct, one thread; get/remove in random order",
        std::mem::size_of::<Conn>()
    );
    println!(
        "generational slot = {} bytes (Option<Conn> + u32 generation)",
        std::mem::size_of::<Slot<Conn>>()
    );
    // Warm the allocator and the page cache of the process once.
    black_box(bench_gen());
    black_box(bench_sharded());

    let g = bench_gen();
    let s = bench_sharded();
    println!();
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>11} {:>13} {:>12} {:>13}",
        "", "insert", "get", "remove", "bytes/entry", "MB after rm", "re-insert", "bytes/entry'"
    );
    for (name, r) in [("generational Vec slab", &g), ("sharded-slab 0.1", &s)] {
        println!(
            "{:<24} {:>7.1}ns {:>7.1}ns {:>7.1}ns {:>11.1} {:>13.1} {:>10.1}ns {:>13.1}",
            name,
            r.insert_ns,
            r.get_ns,
            r.remove_ns,
            r.bytes_per_entry,
            r.bytes_after_remove as f64 / 1e6,
            r.reinsert_ns,
            r.bytes_after_reinsert
        );
    }
    println!();
    println!(
        "bytes/entry: live heap after 1M inserts / 1M; MB after rm: live heap once all removed;"
    );
    println!("re-insert: 1M inserts into the emptied table (slot reuse); bytes/entry' after that.");
}
