//! Cost of encoding one server frame: corepush's encoder
//! (`corepush::internals::frame::encode`, one `Arc<[u8]>` allocated at its
//! final size and the parts copied in) against the encoder it replaced,
//! which collected the header and payload bytes through a `Chain`/`FlatMap`
//! iterator into an `Arc<[u8]>`. That iterator is not `TrustedLen`, so the
//! collect grows a `Vec` and copies it once more into the `Arc`.
//!
//! `cargo bench --bench encode`: ns, allocations and heap bytes per frame
//! for text payloads of 16 B to 64 KiB. Both must produce the same bytes;
//! the benchmark checks that before timing. Compare as ratios within one
//! run: the machine is shared and noisy.

// Only the allocation counters are read here.
#[allow(dead_code)]
#[path = "counting.rs"]
mod counting;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use corepush::internals::frame::{encode, Opcode};

/// The encoder before commit d79d91b, kept here as the baseline: the
/// header then every part, collected byte by byte.
fn encode_by_collect(payload: &[u8]) -> Arc<[u8]> {
    let parts: [&[u8]; 1] = [payload];
    let len = payload.len();
    let mut head = [0u8; 10];
    let head_len = if len < 126 {
        head[1] = len as u8;
        2
    } else if len < 65536 {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    head[0] = 0x81; // FIN, text
    let chain = head[..head_len]
        .iter()
        .chain(parts.iter().flat_map(|p| p.iter()));
    chain.copied().collect()
}

/// ns, allocations and bytes allocated per call of `f`, over `iters` calls.
fn measure(iters: u32, mut f: impl FnMut() -> Arc<[u8]>) -> (f64, f64, f64) {
    // Warm up the allocator's size classes and the caches.
    for _ in 0..iters / 10 {
        black_box(f());
    }
    let (a0, b0) = (counting::allocs(), counting::alloc_bytes());
    let t = Instant::now();
    for _ in 0..iters {
        black_box(f());
    }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64;
    let allocs = (counting::allocs() - a0) as f64 / iters as f64;
    let bytes = (counting::alloc_bytes() - b0) as f64 / iters as f64;
    (ns, allocs, bytes)
}

fn main() {
    println!(
        "{:>9} | {:>12} {:>7} {:>9} | {:>12} {:>7} {:>9} | {:>7}",
        "payload", "collect ns", "allocs", "bytes", "final ns", "allocs", "bytes", "speedup"
    );
    for size in [16usize, 128, 1024, 4096, 65536] {
        let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(
            &encode_by_collect(&payload)[..],
            &encode(Opcode::Text, &payload)[..],
            "the two encoders disagree at {size} bytes"
        );
        let iters = (200_000_000 / (size as u32 + 64)).clamp(2_000, 2_000_000);
        let old = measure(iters, || encode_by_collect(black_box(&payload)));
        let new = measure(iters, || encode(Opcode::Text, black_box(&payload)));
        println!(
            "{:>7} B | {:>12.1} {:>7.2} {:>9.0} | {:>12.1} {:>7.2} {:>9.0} | {:>6.1}x",
            size,
            old.0,
            old.1,
            old.2,
            new.0,
            new.1,
            new.2,
            old.0 / new.0
        );
    }
}
