//! Sending: `<to>:<payload>` and `all:<payload>` (protocol.md, "Sending" and
//! "Guarantees").

mod util;

use std::time::Duration;

use corepush::stats::Counter;
use tungstenite::Message;
use util::*;

#[test]
fn targeted_payload_arrives_byte_for_byte_after_the_first_colon() {
    let server = TestServer::start(2);
    let mut alice = login(server.addr, "alice");
    let mut bob = login(server.addr, "bob");
    send_text(&mut alice, "bob:hello: with colons :: and ünïcode");
    assert_eq!(recv_text(&mut bob), "hello: with colons :: and ünïcode");
    send_text(&mut alice, "bob:");
    assert_eq!(recv_text(&mut bob), "", "an empty payload is delivered");
}

#[test]
fn binary_stays_binary() {
    let server = TestServer::start(2);
    let mut alice = login(server.addr, "bin-alice");
    let mut bob = login(server.addr, "bin-bob");
    let mut msg = b"bin-bob:".to_vec();
    msg.extend_from_slice(&[0, 159, 146, 150, 255, b':']);
    send_binary(&mut alice, &msg);
    assert_eq!(
        recv(&mut bob),
        Message::binary(vec![0, 159, 146, 150, 255, b':'])
    );
}

#[test]
fn every_connection_of_a_uid_receives_and_closing_one_leaves_the_others() {
    let server = TestServer::start(2);
    let mut sender = login(server.addr, "multi-sender");
    let mut tabs: Vec<Ws> = (0..4).map(|_| login(server.addr, "multi")).collect();
    send_text(&mut sender, "multi:to every tab");
    for tab in &mut tabs {
        assert_eq!(recv_text(tab), "to every tab");
    }
    close(tabs.remove(0));
    server.wait_for("one tab gone", |s| s.get(Counter::LoggedIn) == 4);
    send_text(&mut sender, "multi:to the rest");
    for tab in &mut tabs {
        assert_eq!(recv_text(tab), "to the rest");
    }
}

#[test]
fn the_sender_receives_its_own_uid_messages() {
    let server = TestServer::start(2);
    let mut me = login(server.addr, "self");
    send_text(&mut me, "self:note to self");
    assert_eq!(recv_text(&mut me), "note to self");
}

#[test]
fn broadcast_reaches_everyone_including_the_sender() {
    let server = TestServer::start(3);
    let mut clients: Vec<Ws> = (0..12)
        .map(|i| login(server.addr, &format!("bc-{i}")))
        .collect();
    let mut outsider = connect(server.addr); // upgraded, not logged in
    send_text(&mut clients[5], "all:hello everyone: really");
    for c in &mut clients {
        assert_eq!(recv_text(c), "hello everyone: really");
    }
    send_text(&mut outsider, "bc-outsider");
    assert_eq!(
        recv_text(&mut outsider),
        "login success, your uid is bc-outsider"
    );
    let s = server.stats();
    assert_eq!(s.get(Counter::Broadcasts), 1);
}

#[test]
fn unknown_uid_gets_nothing_back_and_is_counted() {
    let server = TestServer::start(2);
    let mut alice = login(server.addr, "lonely");
    send_text(&mut alice, "nobody-here:hello?");
    server.wait_for("no recipient counted", |s| s.get(Counter::NoRecipient) == 1);
    assert_silent(&mut alice, Duration::from_millis(200));
}

#[test]
fn malformed_sends_get_an_error_reply_and_the_connection_stays() {
    let server = TestServer::start(2);
    let mut ws = login(server.addr, "clumsy");
    let cases = [
        (
            "no separator",
            "error: missing ':' (expected <uid>:<message>)",
        ),
        (":no recipient", "error: empty recipient before ':'"),
        (
            "bad\u{7}uid:x",
            "error: invalid recipient: uid contains a control character",
        ),
    ];
    for (msg, reply) in cases {
        send_text(&mut ws, msg);
        assert_eq!(recv_text(&mut ws), reply);
    }
    let long_to = format!("{}:x", "z".repeat(129));
    send_text(&mut ws, &long_to);
    assert_eq!(
        recv_text(&mut ws),
        "error: invalid recipient: uid is longer than 128 bytes"
    );
    send_text(&mut ws, "clumsy:still open");
    assert_eq!(recv_text(&mut ws), "still open");
    assert_eq!(server.stats().get(Counter::SendErrors), 4);
}

#[test]
fn messages_for_a_never_reach_b() {
    let server = TestServer::start(2);
    let mut a = login(server.addr, "iso-a");
    let mut b = login(server.addr, "iso-b");
    let mut sender = login(server.addr, "iso-sender");
    for i in 0..50 {
        send_text(&mut sender, &format!("iso-a:{i}"));
    }
    send_text(&mut sender, "iso-b:only for b");
    assert_eq!(recv_text(&mut b), "only for b");
    for i in 0..50 {
        assert_eq!(recv_text(&mut a), i.to_string());
    }
}

/// Targeted and broadcast messages from one sender take the same path to a
/// recipient (through the home shard of the recipient's uid), so they keep
/// their order even when mixed, on any shard layout.
#[test]
fn order_holds_across_targeted_and_broadcast_messages() {
    let server = TestServer::start(4);
    let mut senders: Vec<Ws> = (0..4)
        .map(|i| login(server.addr, &format!("ord-s{i}")))
        .collect();
    let mut recipients: Vec<Ws> = (0..8)
        .map(|i| login(server.addr, &format!("ord-r{i}")))
        .collect();
    for seq in 0..200 {
        for (i, s) in senders.iter_mut().enumerate() {
            let to = if seq % 7 == 0 {
                "all".to_string()
            } else {
                format!("ord-r{}", seq % 8)
            };
            send_text(s, &format!("{to}:{i} {seq}"));
        }
    }
    for (r, ws) in recipients.iter_mut().enumerate() {
        let mut last = [-1i64; 4];
        let expected = (0..200).filter(|seq| seq % 7 == 0 || seq % 8 == r).count() * 4;
        for _ in 0..expected {
            let text = recv_text(ws);
            let (i, seq) = text.split_once(' ').unwrap();
            let (i, seq): (usize, i64) = (i.parse().unwrap(), seq.parse().unwrap());
            assert!(
                seq > last[i],
                "recipient {r}: sender {i} sent {seq} after {}",
                last[i]
            );
            last[i] = seq;
        }
    }
}

#[test]
fn deliveries_cross_shards_and_stay_on_shards() {
    let server = TestServer::start(2);
    let mut clients: Vec<Ws> = (0..40)
        .map(|i| login(server.addr, &format!("x-{i}")))
        .collect();
    let per_shard = server.shard_stats();
    assert!(
        per_shard.iter().all(|s| s.get(Counter::LoggedIn) > 0),
        "SO_REUSEPORT spread 40 connections over both shards: {per_shard:?}"
    );
    for (i, ws) in clients.iter_mut().enumerate() {
        send_text(ws, &format!("x-{}:from {i}", (i + 1) % 40));
    }
    for i in 0..40 {
        assert_eq!(recv_text(&mut clients[(i + 1) % 40]), format!("from {i}"));
    }
    // A shard counts its deliveries after writing them: wait for the count.
    let s = server.wait_for("every delivery counted", |s| {
        s.get(Counter::DeliveredSameShard) + s.get(Counter::DeliveredCrossShard) >= 40
    });
    assert_eq!(
        s.get(Counter::DeliveredSameShard) + s.get(Counter::DeliveredCrossShard),
        40
    );
    assert!(s.get(Counter::DeliveredSameShard) > 0, "{s:?}");
    assert!(s.get(Counter::DeliveredCrossShard) > 0, "{s:?}");
    assert!(s.get(Counter::CrossShardSent) > 0, "{s:?}");
}

/// Messages can enter the shards from a thread that is not a shard (the way
/// the HTTP push API and the cluster bridge will come in), and still keep
/// the protocol's rules: every connection of the uid, nobody else.
#[test]
fn a_thread_outside_the_shards_can_push_and_broadcast() {
    let server = TestServer::start(2);
    let mut tabs: Vec<Ws> = (0..3)
        .map(|_| login(server.addr, "outside-target"))
        .collect();
    let mut other = login(server.addr, "outside-other");
    let pusher = server.handle().pusher();
    std::thread::spawn(move || {
        pusher.push_text("outside-target", "from a backend");
        pusher.push_text("outside-nobody", "lost in space");
        pusher.broadcast_text("to everyone");
    })
    .join()
    .unwrap();
    for tab in &mut tabs {
        assert_eq!(recv_text(tab), "from a backend");
        assert_eq!(recv_text(tab), "to everyone");
    }
    assert_eq!(recv_text(&mut other), "to everyone", "not the targeted one");
    // A shard counts its deliveries after writing them: wait for the count.
    let s = server.wait_for("unknown uid and deliveries counted", |s| {
        s.get(Counter::NoRecipient) == 1 && s.get(Counter::DeliveredCrossShard) >= 3 + 4
    });
    assert_eq!(
        s.get(Counter::DeliveredCrossShard),
        3 + 4,
        "outside counts as cross-shard"
    );
}
