//! The session driven with made-up bytes and times: no socket anywhere.

use super::*;
use crate::protocol::ClientSends;
use proptest::prelude::*;

/// An action with its borrowed parts copied, so tests can collect them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Did {
    Write(Vec<u8>),
    Ping,
    Login(String),
    ToUid(String, Opcode, Vec<u8>),
    ToAll(Opcode, Vec<u8>),
    Count(Counter),
}

fn record(into: &mut Vec<Did>) -> impl FnMut(Action<'_>) + '_ {
    move |action| {
        into.push(match action {
            Action::Write(frame) => Did::Write(frame.to_vec()),
            Action::Ping => Did::Ping,
            Action::Login(uid) => Did::Login(uid.to_string()),
            Action::ToUid {
                uid,
                opcode,
                payload,
            } => Did::ToUid(uid.to_string(), opcode, payload.to_vec()),
            Action::ToAll { opcode, payload } => Did::ToAll(opcode, payload.to_vec()),
            Action::Count(counter) => Did::Count(counter),
        })
    }
}

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// A masked client frame.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_frame_masked(fin, opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
}

fn client_frame_masked(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn text(payload: &str) -> Vec<u8> {
    client_frame(true, 1, payload.as_bytes())
}

/// A session fed `bytes` in one piece at time 0, opening at every login
/// (as a shard does when the uid's home is this shard).
fn run(bytes: &[u8]) -> (Session, Vec<Did>) {
    run_pieces(&[bytes])
}

fn run_pieces(pieces: &[&[u8]]) -> (Session, Vec<Did>) {
    let rules = Rules::default();
    let mut session = Session::new(0, &rules);
    let mut did = Vec::new();
    for piece in pieces {
        let mut buf = piece.to_vec();
        session.on_bytes(0, &rules, &mut buf, &mut record(&mut did));
        if session.phase() == Phase::LoggingIn {
            session.open(0, &rules, &mut record(&mut did));
        }
    }
    (session, did)
}

fn writes(did: &[Did]) -> Vec<Vec<u8>> {
    did.iter()
        .filter_map(|d| match d {
            Did::Write(bytes) => Some(bytes.clone()),
            _ => None,
        })
        .collect()
}

/// The close frame among `did`'s writes: (code, reason).
fn close_of(did: &[Did]) -> Option<(u16, String)> {
    writes(did).into_iter().find(|w| w[0] == 0x88).map(|w| {
        let payload = &w[2..];
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        (code, String::from_utf8_lossy(&payload[2..]).into_owned())
    })
}

fn upgraded_and_logged_in(uid: &str) -> Vec<u8> {
    let mut bytes = UPGRADE.to_vec();
    bytes.extend(text(uid));
    bytes
}

#[test]
fn upgrade_login_and_sends_in_one_read() {
    let mut bytes = upgraded_and_logged_in("alice");
    bytes.extend(text("bob:hi:there"));
    bytes.extend(client_frame(true, 2, b"all:\x00\x01"));
    bytes.extend(text("no separator"));
    let (session, did) = run(&bytes);
    assert_eq!(session.phase(), Phase::Open);
    assert!(matches!(&did[0], Did::Write(w) if w.starts_with(b"HTTP/1.1 101")));
    assert_eq!(did[1], Did::Login("alice".into()));
    assert_eq!(
        did[2..],
        [
            Did::Count(Counter::MessagesIn),
            Did::ToUid("bob".into(), Opcode::Text, b"hi:there".to_vec()),
            Did::Count(Counter::MessagesIn),
            Did::ToAll(Opcode::Binary, b"\x00\x01".to_vec()),
            Did::Count(Counter::MessagesIn),
            Did::Count(Counter::SendErrors),
            Did::Write(
                frame::encode(
                    Opcode::Text,
                    b"error: missing ':' (expected <uid>:<message>)"
                )
                .to_vec()
            ),
        ]
    );
    assert_eq!(session.buffered_bytes(), 0, "nothing is kept");
}

#[test]
fn a_login_waits_for_the_shard_and_keeps_what_follows() {
    let rules = Rules::default();
    let mut session = Session::new(0, &rules);
    let mut bytes = upgraded_and_logged_in("carol");
    bytes.extend(text("carol:first"));
    let mut did = Vec::new();
    session.on_bytes(0, &rules, &mut bytes, &mut record(&mut did));
    assert_eq!(session.phase(), Phase::LoggingIn);
    assert_eq!(did.last(), Some(&Did::Login("carol".into())));
    // More bytes while the shard decides (or while the session moves).
    let mut more = text("carol:second");
    session.on_bytes(0, &rules, &mut more, &mut record(&mut did));
    let before = did.len();
    assert!(session.buffered_bytes() > 0);

    // Moved whole to another shard, which opens it.
    let mut moved = std::mem::take(&mut session);
    assert_eq!(session.phase(), Phase::Done);
    moved.open(5, &rules, &mut record(&mut did));
    assert_eq!(moved.phase(), Phase::Open);
    assert_eq!(
        did[before..],
        [
            Did::Count(Counter::MessagesIn),
            Did::ToUid("carol".into(), Opcode::Text, b"first".to_vec()),
            Did::Count(Counter::MessagesIn),
            Did::ToUid("carol".into(), Opcode::Text, b"second".to_vec()),
        ]
    );
    assert_eq!(moved.buffered_bytes(), 0);
}

#[test]
fn bad_logins_close_with_1008_and_a_reason() {
    for (uid, reason) in [
        ("", "uid is empty"),
        ("all", "uid 'all' is reserved"),
        ("a:b", "uid contains ':'"),
    ] {
        let (session, did) = run(&upgraded_and_logged_in(uid));
        assert_eq!(session.phase(), Phase::Closing);
        assert_eq!(close_of(&did), Some((1008, reason.to_string())));
        assert!(did.contains(&Did::Count(Counter::LoginRefused)));
    }
}

#[test]
fn bad_requests_get_an_http_status_and_close() {
    let (session, did) = run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(session.phase(), Phase::Closing);
    assert!(writes(&did)[0].starts_with(b"HTTP/1.1 426"));
    assert!(did.contains(&Did::Count(Counter::HandshakeFailed)));
    // Bytes after the close are dropped, not parsed.
    let (_, did) = run_pieces(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &text("x")]);
    assert_eq!(writes(&did).len(), 1);
}

#[test]
fn fragments_are_reassembled_around_control_frames() {
    let mut bytes = upgraded_and_logged_in("u");
    bytes.extend(client_frame(false, 1, b"u:hel"));
    bytes.extend(client_frame(true, 9, b"ping!"));
    bytes.extend(client_frame(false, 0, b"lo "));
    bytes.extend(client_frame(true, 0, "wörld".as_bytes()));
    let (session, did) = run(&bytes);
    assert!(did.contains(&Did::Write(frame::encode(Opcode::Pong, b"ping!").to_vec())));
    assert!(did.contains(&Did::ToUid(
        "u".into(),
        Opcode::Text,
        "hello wörld".as_bytes().to_vec()
    )));
    assert_eq!(session.buffered_bytes(), 0, "the message buffer is freed");
}

#[test]
fn invalid_utf8_fails_as_soon_as_it_arrives() {
    // First fragment valid, second holds an invalid byte; the final
    // fragment never arrives, yet the connection fails with 1007.
    let mut bytes = upgraded_and_logged_in("u");
    bytes.extend(client_frame(false, 1, b"u:ok"));
    bytes.extend(client_frame(false, 0, b"\xff"));
    let (session, did) = run(&bytes);
    assert_eq!(session.phase(), Phase::Closing);
    assert_eq!(close_of(&did).map(|c| c.0), Some(1007));

    // Inside one frame whose payload is still arriving.
    let frame = client_frame(true, 1, b"u:abc\xc0\xafdef");
    let head = upgraded_and_logged_in("u");
    let cut = frame.len() - 3; // the invalid bytes are in, the rest is not
    let (session, did) = run_pieces(&[&head, &frame[..cut]]);
    assert_eq!(session.phase(), Phase::Closing);
    assert_eq!(close_of(&did).map(|c| c.0), Some(1007));

    // A character cut by a fragment boundary is fine...
    let euro = "€".as_bytes();
    let mut bytes = upgraded_and_logged_in("u");
    bytes.extend(client_frame(
        false,
        1,
        &[b"u:".as_slice(), &euro[..1]].concat(),
    ));
    bytes.extend(client_frame(true, 0, &euro[1..]));
    let (session, did) = run(&bytes);
    assert_eq!(session.phase(), Phase::Open);
    assert!(did.contains(&Did::ToUid("u".into(), Opcode::Text, euro.to_vec())));
    // ...but not at the end of the message.
    let mut bytes = upgraded_and_logged_in("u");
    bytes.extend(client_frame(false, 1, b"u:"));
    bytes.extend(client_frame(true, 0, &euro[..2]));
    let (_, did) = run(&bytes);
    assert_eq!(close_of(&did).map(|c| c.0), Some(1007));
}

#[test]
fn framing_errors_close_with_their_codes() {
    let cases: [(Vec<u8>, u16); 6] = [
        (client_frame(true, 0, b"x"), 1002), // continuation without a message
        (vec![0x81, 0x01, b'x'], 1002),      // not masked
        (client_frame(true, 3, b"x"), 1002), // reserved opcode
        (client_frame(false, 9, b"x"), 1002), // fragmented control frame
        (client_frame(true, 8, &[3]), 1002), // close payload of one byte
        (client_frame(true, 2, &vec![0; 65537]), 1009), // too big from its header
    ];
    for (frame, code) in cases {
        let mut bytes = upgraded_and_logged_in("u");
        bytes.extend(frame);
        let (session, did) = run(&bytes);
        assert_eq!(session.phase(), Phase::Closing, "{code}");
        assert_eq!(close_of(&did).map(|c| c.0), Some(code));
    }
    // Fragments count against the limit too.
    let mut bytes = upgraded_and_logged_in("u");
    bytes.extend(client_frame(false, 2, &vec![0; 40_000]));
    bytes.extend(client_frame(true, 0, &vec![0; 40_000]));
    let (_, did) = run(&bytes);
    assert_eq!(close_of(&did).map(|c| c.0), Some(1009));
}

#[test]
fn the_close_handshake() {
    let rules = Rules::default();
    let mut bytes = upgraded_and_logged_in("u");
    bytes.extend(client_frame(true, 8, &1000u16.to_be_bytes()));
    let (mut session, did) = run(&bytes);
    assert_eq!(session.phase(), Phase::Closing);
    assert_eq!(close_of(&did), Some((1000, String::new())));
    session.on_eof(1, &rules);
    assert_eq!(session.phase(), Phase::Done);

    // An empty close is answered with an empty close.
    let mut bytes = upgraded_and_logged_in("u");
    bytes.extend(client_frame(true, 8, b""));
    let (_, did) = run(&bytes);
    assert_eq!(writes(&did).last().unwrap(), &vec![0x88, 0]);
}

#[test]
fn deadlines_and_pings() {
    let rules = Rules::default();
    let mut did = Vec::new();

    let mut session = Session::new(0, &rules);
    assert_eq!(session.poll_at(&rules), 10_000);
    session.on_timer(9_999, &rules, &mut record(&mut did));
    assert!(did.is_empty(), "nothing before the deadline");
    session.on_timer(10_000, &rules, &mut record(&mut did));
    assert!(writes(&did)[0].starts_with(b"HTTP/1.1 408"));
    assert_eq!(session.phase(), Phase::Closing);
    session.on_timer(12_000, &rules, &mut record(&mut did));
    assert_eq!(session.phase(), Phase::Done, "the close wait ends");

    let mut session = Session::new(0, &rules);
    session.on_bytes(100, &rules, &mut UPGRADE.to_vec(), &mut record(&mut did));
    assert_eq!(session.poll_at(&rules), 10_100, "the login deadline");
    did.clear();
    session.on_timer(10_100, &rules, &mut record(&mut did));
    assert_eq!(close_of(&did), Some((1008, "login timeout".into())));

    let (mut session, _) = run(&upgraded_and_logged_in("u"));
    did.clear();
    assert_eq!(session.poll_at(&rules), 25_000);
    session.on_timer(25_000, &rules, &mut record(&mut did));
    assert_eq!(did, [Did::Ping]);
    assert_eq!(session.poll_at(&rules), 60_000, "pinged: the idle deadline");
    session.on_bytes(
        30_000,
        &rules,
        &mut client_frame(true, 10, b""),
        &mut record(&mut did),
    );
    assert_eq!(session.poll_at(&rules), 55_000, "a pong resets the clock");
    did.clear();
    session.on_timer(55_000, &rules, &mut record(&mut did));
    assert_eq!(did, [Did::Ping]);
    did.clear();
    session.on_timer(89_999, &rules, &mut record(&mut did));
    assert!(did.is_empty(), "the answer is due 35 s after the ping");
    session.on_timer(90_000, &rules, &mut record(&mut did));
    assert_eq!(close_of(&did), Some((1001, "idle timeout".into())));
}

#[test]
fn after_a_stall_of_the_server_a_silent_client_is_pinged_before_it_is_closed() {
    let rules = Rules::default();
    let (mut session, _) = run(&upgraded_and_logged_in("u"));
    let mut did = Vec::new();
    // The shard did not run for 100 s: far past the idle timeout.
    session.on_timer(100_000, &rules, &mut record(&mut did));
    assert_eq!(did, [Did::Ping], "pinged, not closed");
    // It answers: it stays.
    session.on_bytes(
        100_050,
        &rules,
        &mut client_frame(true, 10, b""),
        &mut record(&mut did),
    );
    did.clear();
    session.on_timer(136_000, &rules, &mut record(&mut did));
    assert_eq!(did, [Did::Ping], "silent again for the ping interval");
    assert_eq!(session.phase(), Phase::Open);
}

#[test]
fn the_shard_closes_sessions() {
    let rules = Rules::default();
    let mut did = Vec::new();
    let mut session = Session::new(0, &rules);
    session.close(CloseReason::Shutdown, 0, &rules, &mut record(&mut did));
    assert!(writes(&did)[0].starts_with(b"HTTP/1.1 503"));

    let (mut session, _) = run(&upgraded_and_logged_in("u"));
    did.clear();
    session.close(CloseReason::SlowConsumer, 0, &rules, &mut record(&mut did));
    assert_eq!(close_of(&did), Some((1008, "slow consumer".into())));
    assert!(did.contains(&Did::Count(Counter::SlowConsumers)));
    did.clear();
    session.close(CloseReason::Shutdown, 0, &rules, &mut record(&mut did));
    assert!(did.is_empty(), "closing once is enough");
}

#[test]
fn end_of_stream_drains_an_open_session_and_ends_the_others() {
    let rules = Rules::default();
    let (mut session, _) = run(&upgraded_and_logged_in("u"));
    session.on_eof(7, &rules);
    assert_eq!(session.phase(), Phase::Draining);
    assert_eq!(session.poll_at(&rules), 7 + rules.limits.close_timeout_ms);
    let mut session = Session::new(0, &rules);
    session.on_eof(0, &rules);
    assert_eq!(session.phase(), Phase::Done);
}

// ---- properties ----

/// A valid client stream: upgrade, login, then a mix of messages, some
/// fragmented, with pings in between.
fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
    let message = (
        prop::collection::vec(any::<u8>(), 0..300),
        1usize..4,
        any::<bool>(),
        any::<[u8; 4]>(),
    );
    prop::collection::vec(message, 0..12).prop_map(|messages| {
        let mut bytes = upgraded_and_logged_in("me");
        for (body, fragments, ping, mask) in messages {
            let mut payload = b"me:".to_vec();
            payload.extend(&body);
            let step = payload.len().div_ceil(fragments).max(1);
            let pieces: Vec<&[u8]> = payload.chunks(step).collect();
            for (i, piece) in pieces.iter().enumerate() {
                let opcode = if i == 0 { 2 } else { 0 };
                let fin = i + 1 == pieces.len();
                bytes.extend(client_frame_masked(fin, opcode, piece, mask));
                if ping && !fin {
                    bytes.extend(client_frame(true, 9, b"p"));
                }
            }
        }
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_split_of_a_valid_stream_yields_the_same_actions(
        stream in valid_stream(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let (_, whole) = run(&stream);
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        at.sort_unstable();
        at.dedup();
        let mut pieces = Vec::new();
        let mut from = 0;
        for cut in at.into_iter().chain([stream.len()]) {
            pieces.push(&stream[from..cut]);
            from = cut;
        }
        let (session, split) = run_pieces(&pieces);
        prop_assert_eq!(session.phase(), Phase::Open);
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn no_input_panics_or_grows_without_bound(
        prefix in prop_oneof![Just(Vec::new()), Just(UPGRADE.to_vec()), Just(upgraded_and_logged_in("x"))],
        pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..10),
    ) {
        let rules = Rules {
            limits: Limits { max_message_bytes: 1024, ..Limits::default() },
            ..Rules::default()
        };
        let mut session = Session::new(0, &rules);
        let mut did = Vec::new();
        let mut all = vec![prefix];
        all.extend(pieces);
        for (t, piece) in all.iter().enumerate() {
            let mut buf = piece.clone();
            session.on_bytes(t as u64, &rules, &mut buf, &mut record(&mut did));
            if session.phase() == Phase::LoggingIn {
                session.open(t as u64, &rules, &mut record(&mut did));
            }
            session.on_timer(t as u64 * 5_000, &rules, &mut record(&mut did));
            prop_assert!(session.buffered_bytes() <= 64 * 1024);
        }
    }
}

#[test]
fn what_a_client_may_send_follows_the_rules() {
    let send_both = |client_sends| {
        let rules = Rules {
            client_sends,
            ..Rules::default()
        };
        let mut session = Session::new(0, &rules);
        let mut did = Vec::new();
        let mut bytes = upgraded_and_logged_in("me");
        bytes.extend(text("bob:hi"));
        bytes.extend(text("all:hi"));
        session.on_bytes(0, &rules, &mut bytes, &mut record(&mut did));
        session.open(0, &rules, &mut record(&mut did));
        did
    };
    let refused = |did: &[Did]| {
        did.iter()
            .filter(|d| **d == Did::Count(Counter::SendsRefused))
            .count()
    };
    let did = send_both(ClientSends::Any);
    assert_eq!(refused(&did), 0);
    assert!(did.contains(&Did::ToAll(Opcode::Text, b"hi".to_vec())));

    let did = send_both(ClientSends::Targeted);
    assert_eq!(refused(&did), 1);
    assert!(did.contains(&Did::ToUid("bob".into(), Opcode::Text, b"hi".to_vec())));
    assert!(!did.iter().any(|d| matches!(d, Did::ToAll(..))));
    let reply = frame::encode(
        Opcode::Text,
        b"error: clients may not send to all on this server",
    );
    assert!(did.contains(&Did::Write(reply.to_vec())));

    let did = send_both(ClientSends::None);
    assert_eq!(refused(&did), 2);
    assert!(!did
        .iter()
        .any(|d| matches!(d, Did::ToAll(..) | Did::ToUid(..))));
}

#[test]
fn a_token_login_names_the_uid_or_closes_with_1008() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let rules = Rules {
        login: crate::auth::Login::token(b"k").unwrap(),
        ..Rules::default()
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let claims = serde_json::json!({ "sub": "alice", "exp": exp });
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"k").unwrap(),
    )
    .unwrap();

    let mut session = Session::new(0, &rules);
    let mut did = Vec::new();
    let mut bytes = upgraded_and_logged_in(&token);
    session.on_bytes(0, &rules, &mut bytes, &mut record(&mut did));
    assert_eq!(did.last(), Some(&Did::Login("alice".into())));

    let mut session = Session::new(0, &rules);
    let mut did = Vec::new();
    let mut bytes = upgraded_and_logged_in("alice");
    session.on_bytes(0, &rules, &mut bytes, &mut record(&mut did));
    assert_eq!(session.phase(), Phase::Closing);
    assert_eq!(
        close_of(&did),
        Some((1008, "invalid login token: malformed".into()))
    );
    assert!(did.contains(&Did::Count(Counter::LoginRefused)));
}
