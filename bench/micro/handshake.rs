//! Cost of one upgrade: tungstenite's request parser and response builder
//! against corepush's in-place parse (`corepush::internals::handshake::process`).
//!
//! `cargo bench --bench handshake`: ns and heap allocations per upgrade.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::{create_response, write_response, Request};

/// Counts allocations, to show what each path leaves to the allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: both methods forward to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REQUEST: &[u8] = b"GET /push HTTP/1.1\r\nHost: 127.0.0.1:1234\r\n\
    User-Agent: corepush-flood\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

const ROUNDS: u64 = 200_000;

fn measure(name: &str, mut upgrade: impl FnMut() -> usize) -> f64 {
    for _ in 0..1000 {
        black_box(upgrade());
    }
    let (a0, b0) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed));
    let start = Instant::now();
    for _ in 0..ROUNDS {
        black_box(upgrade());
    }
    let ns = start.elapsed().as_nanos() as f64 / ROUNDS as f64;
    let allocs = (ALLOCS.load(Relaxed) - a0) as f64 / ROUNDS as f64;
    let bytes = (BYTES.load(Relaxed) - b0) as f64 / ROUNDS as f64;
    println!("{name:<36} {ns:>9.0} ns {allocs:>9.1} allocs {bytes:>9.0} bytes");
    ns
}

fn main() {
    println!(
        "one upgrade request ({} bytes), {ROUNDS} rounds",
        REQUEST.len()
    );
    let ours = measure("corepush::internals::handshake::process", || {
        match corepush::internals::handshake::process(REQUEST) {
            corepush::internals::handshake::Outcome::Upgrade { response, .. } => response.len(),
            _ => panic!("not an upgrade"),
        }
    });
    let theirs = measure("tungstenite try_parse+create_response", || {
        let (_, request) = Request::try_parse(REQUEST).unwrap().unwrap();
        let response = create_response(&request).unwrap();
        let mut out = Vec::with_capacity(160);
        write_response(&mut out, &response).unwrap();
        out.len()
    });
    println!("ratio tungstenite / corepush: {:.2}", theirs / ours);
}
