//! Any bytes as the start of a client frame: parse_header never panics,
//! and what it accepts is consistent (lengths, masking, control rules).
#![no_main]

use corepush::internals::frame::{self, FrameError, Opcode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let max = 1 << 16;
    match frame::parse_header(data, max) {
        Ok(Some(h)) => {
            assert!((2..=14).contains(&h.header_len), "{h:?}");
            assert!(h.header_len <= data.len());
            if h.opcode.is_control() {
                assert!(h.fin && h.payload_len <= 125, "{h:?}");
            } else {
                assert!(h.payload_len <= max, "{h:?}");
            }
            // Unmasking twice gives the bytes back.
            let end = h.frame_len().min(data.len());
            let original = data[h.header_len..end].to_vec();
            let mut payload = original.clone();
            frame::unmask(&mut payload, h.mask);
            frame::unmask(&mut payload, h.mask);
            assert_eq!(payload, original);
            if h.opcode == Opcode::Close && data.len() >= h.frame_len() {
                let _ = frame::parse_close(&payload);
            }
        }
        Ok(None) => {
            // Incomplete: a prefix never makes a complete header.
            assert!(data.len() < 14);
        }
        Err(FrameError::Protocol(reason)) => assert!(!reason.is_empty()),
        Err(FrameError::TooBig) => {}
    }
});
