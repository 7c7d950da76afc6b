//! Any bytes, cut anywhere, with time passing: a session never panics,
//! holds bounded memory, routes nothing once it closes, and does the same
//! whether the bytes come whole or in pieces.
//!
//! The input's first byte chooses how many cuts; the next bytes are the
//! cut points; the rest is the stream. A stream that does not start with a
//! valid upgrade gets one prepended half the time, so the fuzzer spends its
//! time past the handshake too.
#![no_main]

use corepush::internals::{Action, CloseReason, Limits, Phase, Rules, Session};
use libfuzzer_sys::fuzz_target;

const UPGRADE: &[u8] = b"GET / HTTP/1.1\r\nHost: f\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// What a session did, owned, comparable.
#[derive(Debug, PartialEq)]
enum Did {
    Write(Vec<u8>),
    Ping,
    Login(String),
    ToUid(String, Vec<u8>),
    ToAll(Vec<u8>),
    Count(String),
}

fn run(rules: &Rules, pieces: &[&[u8]], timers: bool) -> (Vec<Did>, Phase) {
    let mut session = Session::new(0, rules);
    let mut did = Vec::new();
    let mut closed_at = None;
    for (t, piece) in pieces.iter().enumerate() {
        let mut buf = piece.to_vec();
        let mut out = |a: Action<'_>| {
            did.push(match a {
                Action::Write(f) => Did::Write(f.to_vec()),
                Action::Ping => Did::Ping,
                Action::Login(uid) => Did::Login(uid.to_string()),
                Action::ToUid { uid, payload, .. } => Did::ToUid(uid.to_string(), payload.to_vec()),
                Action::ToAll { payload, .. } => Did::ToAll(payload.to_vec()),
                Action::Count(c) => Did::Count(format!("{c:?}")),
            })
        };
        session.on_bytes(0, rules, &mut buf, &mut out);
        if session.phase() == Phase::LoggingIn {
            session.open(0, rules, &mut out);
        }
        if timers {
            session.on_timer(t as u64 * 7_000, rules, &mut out);
        }
        assert!(session.buffered_bytes() <= 4 * rules.limits.max_message_bytes + 64 * 1024);
        if closed_at.is_none() && matches!(session.phase(), Phase::Closing | Phase::Done) {
            closed_at = Some(did.len());
        }
    }
    if let Some(at) = closed_at {
        // Nothing is routed once the session has closed.
        assert!(!did[at..].iter().any(|d| matches!(d, Did::ToUid(..) | Did::ToAll(..))));
    }
    let mut out = |_: Action<'_>| {};
    session.close(CloseReason::Shutdown, 0, rules, &mut out);
    session.on_eof(0, rules);
    (did, session.phase())
}

fuzz_target!(|input: &[u8]| {
    let Some((&head, rest)) = input.split_first() else {
        return;
    };
    let cuts = (head & 7) as usize;
    if rest.len() < cuts {
        return;
    }
    let (cut_bytes, stream) = rest.split_at(cuts);
    let mut stream = stream.to_vec();
    if head & 8 != 0 && !stream.starts_with(b"GET ") {
        let mut with = UPGRADE.to_vec();
        with.extend_from_slice(&stream);
        stream = with;
    }
    let rules = Rules {
        limits: Limits {
            max_message_bytes: 4096,
            ..Limits::default()
        },
        ..Rules::default()
    };
    let mut points: Vec<usize> = cut_bytes
        .iter()
        .map(|&b| b as usize * stream.len() / 256)
        .collect();
    points.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for p in points.into_iter().chain([stream.len()]) {
        pieces.push(&stream[from..p]);
        from = p;
    }
    let (whole, phase_whole) = run(&rules, &[&stream], false);
    let (split, phase_split) = run(&rules, &pieces, false);
    assert_eq!(whole, split, "cut at {pieces:?}");
    assert_eq!(phase_whole, phase_split);
    // With time passing between pieces (pings, deadlines), still no panic.
    let _ = run(&rules, &pieces, true);
});
