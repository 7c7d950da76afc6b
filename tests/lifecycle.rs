//! A connection's whole life on the server: cleanup after close, slow
//! consumers, shutdown (protocol.md, "Guarantees"; README, "Stopping").

mod util;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use corepush::stats::Counter;
use util::*;

#[test]
fn tables_are_empty_after_every_connection_closes() {
    let server = TestServer::start(3);
    let mut clients: Vec<Ws> = Vec::new();
    for i in 0..60 {
        // Some uids have several connections, spread over shards.
        clients.push(login(server.addr, &format!("clean-{}", i % 20)));
    }
    let s = server.wait_for("logins", |s| s.get(Counter::LoggedIn) == 60);
    assert_eq!(s.get(Counter::LocalUids), 20, "each uid lives on one shard");
    assert!(
        s.get(Counter::HandedOver) > 0,
        "some logins moved to their home"
    );
    for (i, ws) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            close(ws);
        } else {
            drop(ws); // no close frame
        }
    }
    server.wait_empty();
    server.assert_serving();
    server.wait_empty();
}

#[test]
fn a_reader_that_stops_reading_is_closed_as_slow_consumer_and_others_go_on() {
    let server = TestServer::start_with(2, |c| c.max_outbound_bytes = 256 * 1024);
    // A receiver with a small kernel buffer (set before connecting, so the
    // window stays small) that never reads.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut slow: TcpStream = socket.into();
    slow.write_all(UPGRADE.as_bytes()).unwrap();
    assert!(read_http_head(&mut slow).starts_with("HTTP/1.1 101"));
    slow.write_all(&client_frame(true, 1, b"slow")).unwrap();
    let mut fast = login(server.addr, "fast");
    let mut sender = login(server.addr, "flooder");
    let chunk = "z".repeat(16 * 1024);
    for i in 0..1000 {
        send_text(&mut sender, &format!("slow:{chunk}"));
        if i % 50 == 0 {
            send_text(&mut sender, &format!("fast:{i}"));
            assert_eq!(recv_text(&mut fast), i.to_string(), "fast is not held back");
        }
    }
    server.wait_for("slow consumer closed", |s| {
        s.get(Counter::SlowConsumers) == 1
    });
    // Now read: the login reply, queued messages, then the close frame.
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    assert_eq!(read_close(&mut slow), (1008, "slow consumer".into()));
    server.wait_for("slow uid gone", |s| s.get(Counter::LoggedIn) == 2);
    // The server shut its side after the close frame and reads until ours.
    assert!(
        read_to_end(&mut slow).is_empty(),
        "nothing after the close frame"
    );
    slow.write_all(&client_frame(true, 8, b""))
        .expect("the server still reads until the client closes");
    drop(slow);
    server.wait_for("slow connection gone", |s| s.get(Counter::Connections) == 2);
}

#[test]
fn a_reader_that_pauses_gets_every_message_in_order_once_it_reads_again() {
    let server = TestServer::start_with(2, |c| c.max_outbound_bytes = 64 * 1024 * 1024);
    // A small kernel buffer, so the server's outbox has to hold most of it.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut paused: TcpStream = socket.into();
    paused.set_read_timeout(Some(PATIENCE)).unwrap();
    paused.write_all(UPGRADE.as_bytes()).unwrap();
    assert!(read_http_head(&mut paused).starts_with("HTTP/1.1 101"));
    paused.write_all(&client_frame(true, 1, b"paused")).unwrap();
    assert_eq!(read_frame(&mut paused).unwrap().0, 1, "login reply");
    let mut sender = login(server.addr, "pauser");
    let chunk = "p".repeat(16 * 1024);
    let count = 300;
    for i in 0..count {
        send_text(&mut sender, &format!("paused:{i} {chunk}"));
    }
    server.wait_for("frames queued for the full socket", |s| {
        s.get(Counter::FramesQueued) > 0
    });
    // Now read: every message, whole and in order, as the socket drains.
    for i in 0..count {
        let (op, payload) = read_frame(&mut paused).expect("a queued message");
        assert_eq!(op, 1);
        let text = String::from_utf8(payload).unwrap();
        assert_eq!(text, format!("{i} {chunk}"), "message {i}");
    }
    assert_eq!(server.stats().get(Counter::SlowConsumers), 0);
    paused.write_all(&client_frame(true, 8, &[3, 232])).unwrap();
    read_close(&mut paused);
    close(sender);
}

#[test]
fn a_client_that_half_closes_still_gets_what_was_queued_for_it() {
    let server = TestServer::start_with(2, |c| c.max_outbound_bytes = 64 * 1024 * 1024);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut reader: TcpStream = socket.into();
    reader.set_read_timeout(Some(PATIENCE)).unwrap();
    reader.write_all(UPGRADE.as_bytes()).unwrap();
    assert!(read_http_head(&mut reader).starts_with("HTTP/1.1 101"));
    reader.write_all(&client_frame(true, 1, b"half")).unwrap();
    assert_eq!(read_frame(&mut reader).unwrap().0, 1, "login reply");
    let mut sender = login(server.addr, "half-sender");
    let chunk = "h".repeat(16 * 1024);
    let count = 400; // more than the kernel's buffers take
    for i in 0..count {
        send_text(&mut sender, &format!("half:{i} {chunk}"));
    }
    // Every message is written or queued for the reader (a message that
    // arrives after the reader has left is not for it).
    server.wait_for("every message taken in for the full socket", |s| {
        s.get(Counter::MessagesOut) == count && s.get(Counter::FramesQueued) > 0
    });
    // The client sends FIN (no close frame) and goes on reading.
    reader.shutdown(std::net::Shutdown::Write).unwrap();
    for i in 0..count {
        let (op, payload) = read_frame(&mut reader)
            .unwrap_or_else(|| panic!("queued message {i} of {count} lost: {:?}", server.stats()));
        assert_eq!(
            (op, String::from_utf8(payload).unwrap()),
            (1, format!("{i} {chunk}"))
        );
    }
    assert!(
        read_to_end(&mut reader).is_empty(),
        "then the server closes"
    );
    server.wait_for("the half-closed connection is gone", |s| {
        s.get(Counter::LoggedIn) == 1 && s.get(Counter::Connections) == 1
    });
    close(sender);
}

#[test]
fn logins_racing_a_shutdown_all_get_a_close_frame_or_a_status() {
    // Many logins, about half of them moving to another shard, while the
    // server stops: none may vanish without a word.
    let server = TestServer::start(2);
    let addr = server.addr;
    let mut clients: Vec<TcpStream> = (0..200).map(|_| raw_upgraded(addr)).collect();
    for (i, s) in clients.iter_mut().enumerate() {
        s.write_all(&client_frame(true, 1, format!("racer-{i}").as_bytes()))
            .unwrap();
    }
    let stopper = std::thread::spawn(move || server.stop());
    for (i, s) in clients.iter_mut().enumerate() {
        // The login reply (if the login won the race), then the close.
        let first = read_frame(s).unwrap_or_else(|| panic!("client {i} got nothing"));
        let close = match first {
            (1, _) => read_frame(s).unwrap_or_else(|| panic!("client {i}: no close frame")),
            other => other,
        };
        assert_eq!(close.0, 8, "client {i}: {close:?}");
        let code = u16::from_be_bytes([close.1[0], close.1[1]]);
        assert_eq!(code, 1001, "client {i}");
    }
    stopper.join().unwrap();
}

#[test]
fn shutdown_closes_everyone_with_1001() {
    let server = TestServer::start(2);
    let mut clients: Vec<Ws> = (0..10)
        .map(|i| login(server.addr, &format!("sd-{i}")))
        .collect();
    let mut half_open = tcp(server.addr); // never upgrades
                                          // connect() returns once the kernel has queued the connection, not once
                                          // the server has accepted it; one still queued at shutdown is reset.
    server.wait_for("the half-open connection accepted", |s| {
        s.get(Counter::Accepted) == 11
    });
    let addr = server.addr;
    let stopper = std::thread::spawn(move || server.stop());
    for ws in &mut clients {
        assert_eq!(expect_close(ws), (1001, "server shutting down".into()));
    }
    drop(clients); // answer nothing more: the server must not wait forever
    let reply = String::from_utf8(read_to_end(&mut half_open)).unwrap();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    stopper.join().unwrap();
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    assert!(refused.is_err(), "no longer listening");
}
