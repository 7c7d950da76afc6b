//! WebSocket framing rules (protocol.md, "Limits and control frames").

mod util;

use std::io::Write;
use std::time::Duration;

use corepush::stats::Counter;
use util::*;

#[test]
fn invalid_utf8_text_closes_with_1007() {
    let server = TestServer::start(2);
    let mut s = raw_login(server.addr, "bad-text");
    s.write_all(&client_frame(true, 1, b"bad-text:\xc3\x28"))
        .unwrap();
    assert_eq!(read_close(&mut s).0, 1007);
    // Also as the login message itself.
    let mut s = raw_upgraded(server.addr);
    s.write_all(&client_frame(true, 1, b"\xff")).unwrap();
    assert_eq!(read_close(&mut s).0, 1007);
    server.wait_for("closed connections gone", |s| {
        s.get(Counter::Connections) == 0
    });
    server.assert_serving();
}

#[test]
fn invalid_utf8_fails_as_soon_as_it_arrives_not_at_the_end_of_the_message() {
    let server = TestServer::start(2);
    // A fragmented text message whose second fragment holds an invalid
    // byte: the final fragment never comes, yet the close does.
    let mut s = raw_login(server.addr, "fail-fast");
    s.write_all(&client_frame(false, 1, b"fail-fast:fine so far"))
        .unwrap();
    s.write_all(&client_frame(false, 0, b" then \xff")).unwrap();
    assert_eq!(
        read_close(&mut s),
        (1007, "text message is not valid UTF-8".into())
    );
    // One frame whose payload is still arriving: the invalid bytes are in,
    // the rest of the frame is not.
    let mut s = raw_login(server.addr, "fail-fast-2");
    let frame = client_frame(
        true,
        1,
        &[b"fail-fast-2:".as_slice(), &[0xc0, 0xaf], &[b'x'; 200]].concat(),
    );
    s.write_all(&frame[..frame.len() - 100]).unwrap();
    assert_eq!(read_close(&mut s).0, 1007);
    server.assert_serving();
}

#[test]
fn too_big_closes_with_1009_before_the_payload_is_read() {
    let server = TestServer::start(2);
    let mut ws = login(server.addr, "big");
    let huge = format!("big:{}", "x".repeat(64 * 1024));
    send_text(&mut ws, &huge);
    assert_eq!(expect_close(&mut ws), (1009, "message too big".into()));

    // Exactly at the limit is fine.
    let mut ws = login(server.addr, "fits");
    let payload = "y".repeat(64 * 1024 - "fits:".len());
    send_text(&mut ws, &format!("fits:{payload}"));
    assert_eq!(recv_text(&mut ws), payload);
    server.assert_serving();
}

#[test]
fn fragmented_messages_are_reassembled() {
    let server = TestServer::start(2);
    let mut bob = login(server.addr, "frag-bob");
    let mut s = raw_login(server.addr, "frag-alice");
    let mut bytes = client_frame(false, 1, b"frag-b");
    bytes.extend(client_frame(true, 9, b"ping in the middle"));
    bytes.extend(client_frame(false, 0, b"ob:hel"));
    bytes.extend(client_frame(true, 0, b"lo in three"));
    // Sent one byte at a time, so every partial-frame path is taken.
    for b in bytes {
        s.write_all(&[b]).unwrap();
    }
    assert_eq!(
        read_frame(&mut s),
        Some((10, b"ping in the middle".to_vec()))
    );
    assert_eq!(recv_text(&mut bob), "hello in three");
}

#[test]
fn fragmented_messages_count_against_the_size_limit() {
    let server = TestServer::start_with(1, |c| c.max_message_bytes = 1000);
    let mut s = raw_login(server.addr, "frag-big");
    s.write_all(&client_frame(false, 2, &[b'a'; 600])).unwrap();
    s.write_all(&client_frame(true, 0, &[b'b'; 600])).unwrap();
    assert_eq!(read_close(&mut s), (1009, "message too big".into()));
}

#[test]
fn fragmentation_errors_close_with_1002() {
    let server = TestServer::start(1);
    let cases: [(Vec<u8>, &str); 4] = [
        (
            client_frame(true, 0, b"x"),
            "continuation without a message",
        ),
        (
            [client_frame(false, 1, b"a"), client_frame(true, 1, b"b")].concat(),
            "new message inside a fragmented one",
        ),
        (client_frame(false, 9, b"p"), "fragmented control frame"),
        (client_frame(true, 3, b"x"), "reserved opcode"),
    ];
    for (bytes, reason) in cases {
        let mut s = raw_login(server.addr, "frag-err");
        s.write_all(&bytes).unwrap();
        assert_eq!(read_close(&mut s), (1002, reason.into()));
    }
    server.wait_for("violations counted", |s| {
        s.get(Counter::ProtocolErrors) == 4
    });
}

#[test]
fn unmasked_and_reserved_bit_frames_close_with_1002() {
    let server = TestServer::start(1);
    let mut s = raw_login(server.addr, "unmasked");
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(read_close(&mut s), (1002, "client frame not masked".into()));

    let mut s = raw_login(server.addr, "rsv");
    let mut frame = client_frame(true, 1, b"x");
    frame[0] |= 0x40;
    s.write_all(&frame).unwrap();
    assert_eq!(read_close(&mut s), (1002, "reserved bits set".into()));
}

#[test]
fn ping_gets_pong_with_the_same_payload() {
    let server = TestServer::start(1);
    let mut s = raw_login(server.addr, "pinger");
    s.write_all(&client_frame(true, 9, b"are you there"))
        .unwrap();
    assert_eq!(read_frame(&mut s), Some((10, b"are you there".to_vec())));
}

#[test]
fn client_close_is_echoed_and_the_uid_is_gone() {
    let server = TestServer::start(2);
    let mut s = raw_login(server.addr, "closer");
    s.write_all(&client_frame(true, 8, &[0x0f, 0xa0, b'b', b'y', b'e']))
        .unwrap();
    assert_eq!(
        read_close(&mut s),
        (4000, String::new()),
        "the code is echoed"
    );
    assert!(
        read_to_end(&mut s).is_empty(),
        "then the server closes the TCP connection"
    );
    server.wait_empty();

    let mut s = raw_login(server.addr, "closer-empty");
    s.write_all(&client_frame(true, 8, b"")).unwrap();
    assert_eq!(read_frame(&mut s), Some((8, vec![])));

    let mut s = raw_login(server.addr, "closer-bad");
    s.write_all(&client_frame(true, 8, &[0x03, 0xed])).unwrap(); // 1005 may not be sent
    assert_eq!(read_close(&mut s), (1002, "invalid close code".into()));
}

#[test]
fn server_pings_silent_clients_and_closes_them_when_silence_lasts() {
    let server = TestServer::start_with(1, |c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(400);
    });
    // A client that answers pings stays, well past the idle timeout.
    let mut good = raw_login(server.addr, "answers");
    let start = std::time::Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1_000) {
        let (op, payload) = read_frame(&mut good).unwrap();
        assert_eq!(op, 9, "a server ping");
        good.write_all(&client_frame(true, 10, &payload)).unwrap();
        pings += 1;
    }
    assert!(pings >= 5, "pinged every ~100 ms of silence: {pings}");
    good.write_all(&client_frame(true, 1, b"answers:still here"))
        .unwrap();
    let reply = std::iter::from_fn(|| read_frame(&mut good)).find(|(op, _)| *op != 9);
    assert_eq!(reply, Some((1, b"still here".to_vec())));
    // A client that never answers is pinged, then closed.
    let mut mute = raw_login(server.addr, "mute");
    assert_eq!(read_frame(&mut mute).unwrap().0, 9);
    assert_eq!(read_close(&mut mute), (1001, "idle timeout".into()));
    server.wait_for("idle timeout counted", |s| s.get(Counter::Timeouts) >= 1);
}
