//! Any bytes as an HTTP upgrade request: handshake::process never panics,
//! answers every complete request with 101 or a 4xx, and never consumes
//! more than it was given.
#![no_main]

use corepush::internals::handshake::{self, Outcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match handshake::process(data) {
        Outcome::Incomplete => assert!(data.len() < 8 * 1024),
        Outcome::Upgrade { response, consumed } => {
            assert!(consumed <= data.len());
            assert!(response.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        }
        Outcome::Reject { status, response } => {
            assert!((400..500).contains(&status), "{status}");
            let head = format!("HTTP/1.1 {status} ");
            assert!(response.starts_with(head.as_bytes()));
        }
    }
});
