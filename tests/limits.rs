//! The limits a hostile client or an overload runs into: per-client message
//! rate, connection caps, incomplete input held per shard, and full inboxes
//! between shards (backpressure, not drops). Each ends in a clear answer
//! (close code or HTTP status) while everyone else is served.

mod util;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use corepush::stats::Counter;
use socket2::{Domain, Socket, Type};
use util::*;

#[test]
fn a_client_over_its_message_rate_is_closed_with_1008() {
    let server = TestServer::start_with(2, |c| c.max_client_rate = 20);
    let mut calm = login(server.addr, "rate-calm");
    let mut flooder = raw_login(server.addr, "rate-flood");
    for i in 0..50 {
        let sent = flooder.write_all(&client_frame(true, 1, format!("rate-calm:{i}").as_bytes()));
        if sent.is_err() {
            break; // closed already
        }
    }
    assert_eq!(read_close(&mut flooder), (1008, "rate limit".into()));
    server.wait_for("rate limit counted", |s| s.get(Counter::RateLimited) == 1);
    // At most 20 a second went through: 20, or up to 40 if the burst
    // straddled a second of the shard's clock; never the 50.
    let mut through = 0;
    calm.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while let Ok(tungstenite::Message::Text(text)) = calm.read() {
        assert_eq!(text.as_str(), through.to_string(), "in order");
        through += 1;
    }
    assert!((20..=40).contains(&through), "{through} went through");
    calm.get_ref().set_read_timeout(Some(PATIENCE)).unwrap();
    // A client within its rate is never bothered.
    for i in 0..15 {
        send_text(&mut calm, &format!("rate-calm:again {i}"));
        assert_eq!(recv_text(&mut calm), format!("again {i}"));
    }
    server.assert_serving();
}

#[test]
fn over_max_connections_an_upgrade_gets_503_until_one_leaves() {
    let server = TestServer::start_with(2, |c| c.max_connections = 3);
    let mut held: Vec<Ws> = (0..3)
        .map(|i| login(server.addr, &format!("cap-{i}")))
        .collect();
    let mut over = tcp(server.addr);
    over.write_all(UPGRADE.as_bytes()).unwrap();
    let reply = String::from_utf8(read_to_end(&mut over)).unwrap();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    server.wait_for("refusal counted", |s| {
        s.get(Counter::ConnectionsRefused) == 1
    });
    // The ones inside are served.
    send_text(&mut held[0], "cap-1:inside");
    assert_eq!(recv_text(&mut held[1]), "inside");
    // One leaves: there is room for one more.
    close(held.pop().unwrap());
    server.wait_for("one left", |s| s.get(Counter::Connections) == 2);
    let mut next = login(server.addr, "cap-next");
    send_text(&mut next, "cap-0:welcome");
    assert_eq!(recv_text(&mut held[0]), "welcome");
}

/// A TCP connection to `addr` from the loopback source address `source`.
fn tcp_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

#[test]
fn over_max_connections_per_ip_that_address_gets_503_and_others_do_not() {
    let server = TestServer::start_with(2, |c| c.max_connections_per_ip = 2);
    let upgraded = |source: &str| {
        let mut s = tcp_from(source, server.addr);
        s.write_all(UPGRADE.as_bytes()).unwrap();
        (read_http_head(&mut s), s)
    };
    let (first, _a) = upgraded("127.0.0.7");
    let (second, _b) = upgraded("127.0.0.7");
    let (third, _c) = upgraded("127.0.0.7");
    assert!(first.starts_with("HTTP/1.1 101") && second.starts_with("HTTP/1.1 101"));
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    let (other, _d) = upgraded("127.0.0.8");
    assert!(
        other.starts_with("HTTP/1.1 101"),
        "another address has its own count: {other}"
    );
}

#[test]
fn incomplete_input_over_the_shard_cap_closes_the_biggest_holders_with_1013() {
    let server = TestServer::start_with(1, |c| c.max_pending_bytes = 200_000);
    let mut small = raw_login(server.addr, "pend-small");
    // Half of a 1 KB message to itself: held, but small.
    let mut message = b"pend-small:".to_vec();
    message.resize(1000, b'x');
    let frame = client_frame(true, 1, &message);
    small.write_all(&frame[..500]).unwrap();
    // Three clients each hold most of a 60 KB message: 180 KB, then a
    // fourth goes over the cap.
    let mut holders: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = raw_login(server.addr, &format!("pend-{i}"));
            let big = client_frame(true, 2, &vec![7u8; 60_000]);
            s.write_all(&big[..55_000]).unwrap();
            s
        })
        .collect();
    server.wait_for("the biggest holder shed", |s| {
        s.get(Counter::PendingShed) >= 1
    });
    let closed: Vec<(u16, String)> = holders
        .iter_mut()
        .filter_map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            read_frame(s).filter(|(op, _)| *op == 8).map(|(_, p)| {
                (
                    u16::from_be_bytes([p[0], p[1]]),
                    String::from_utf8_lossy(&p[2..]).into(),
                )
            })
        })
        .collect();
    assert!(!closed.is_empty());
    assert!(closed.len() < 4, "only as many as needed: {closed:?}");
    for c in &closed {
        assert_eq!(c, &(1013, "server busy: too much incomplete input".into()));
    }
    // The small holder finishes its message and is served.
    small.write_all(&frame[500..]).unwrap();
    small
        .write_all(&client_frame(true, 1, b"pend-small:done"))
        .unwrap();
    let mut replies = std::iter::from_fn(|| read_frame(&mut small)).filter(|(op, _)| *op == 1);
    assert_eq!(replies.next(), Some((1, message[11..].to_vec())));
    assert_eq!(replies.next(), Some((1, b"done".to_vec())));
}

#[test]
fn a_full_inbox_holds_messages_back_instead_of_dropping_them() {
    // Inboxes of 4 messages: a client broadcasting as fast as it can
    // overflows the other shard's inbox at once.
    let server = TestServer::start_with(2, |c| c.inbox_capacity = 4);
    let mut readers: Vec<Ws> = (0..6)
        .map(|i| login(server.addr, &format!("bp-{i}")))
        .collect();
    let per_shard = server.shard_stats();
    assert!(
        per_shard.iter().all(|s| s.get(Counter::LoggedIn) > 0),
        "{per_shard:?}"
    );
    let mut sender = raw_login(server.addr, "bp-sender");
    let total = 3000;
    let mut burst = Vec::new();
    for i in 0..total {
        burst.extend(client_frame(true, 1, format!("all:{i}").as_bytes()));
    }
    let writer = std::thread::spawn(move || {
        sender.write_all(&burst).unwrap();
        sender
    });
    for reader in &mut readers {
        for i in 0..total {
            assert_eq!(recv_text(reader), i.to_string(), "in order, none missing");
        }
    }
    let _sender = writer.join().unwrap();
    let s = server.stats();
    assert!(s.get(Counter::InboxFull) > 0, "the inbox did fill: {s:?}");
    assert_eq!(s.get(Counter::SlowConsumers), 0);
}
