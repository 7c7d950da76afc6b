//! Several nodes joined through a real Redis (`--cluster`): pushes cross
//! nodes to every connection of a uid exactly once and in order, outside
//! systems push with a plain PUBLISH, a node receives only what it needs,
//! and the cluster survives a killed node and a restarted Redis.
//!
//! Each test starts its own redis-server on a free port. Where a test needs
//! a message to have gone through a node's bridge, it waits for the
//! bridge's counters; to show that nothing more arrives (no duplicate), it
//! sends a fence along the same path afterwards and expects the fence next.

mod util;

use std::time::{Duration, Instant};

use corepush::cluster::Snapshot as Bus;
use corepush::stats::Counter;
use corepush::Kind;
use tungstenite::Message;
use util::cluster::{start_node, RedisServer, Resp, Value};
use util::process::ServerProcess;
use util::*;

/// A Redis and `n` in-process nodes of two shards each, linked.
struct Cluster {
    redis: RedisServer,
    nodes: Vec<TestServer>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let redis = RedisServer::start();
        let url = redis.url();
        let nodes: Vec<TestServer> = (0..n)
            .map(|_| TestServer::start_with(2, |c| c.cluster = Some(url.clone())))
            .collect();
        let cluster = Cluster { redis, nodes };
        for i in 0..n {
            cluster.wait_bus(i, "link up", |b| b.link_up);
        }
        cluster
    }

    fn node(&self, i: usize) -> &TestServer {
        &self.nodes[i]
    }

    fn bus(&self, i: usize) -> Bus {
        self.nodes[i]
            .handle()
            .cluster_stats()
            .expect("in a cluster")
    }

    /// Waits until node `i`'s bus counters satisfy `check`.
    fn wait_bus(&self, i: usize, what: &str, check: impl Fn(&Bus) -> bool) -> Bus {
        let start = Instant::now();
        loop {
            let bus = self.bus(i);
            if check(&bus) {
                return bus;
            }
            if start.elapsed() > PATIENCE {
                panic!("node {i}: timed out waiting for {what}: {bus:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until node `i` is subscribed to `n` uids.
    fn wait_held(&self, i: usize, n: u64) {
        self.wait_bus(i, &format!("{n} uid subscriptions"), |b| {
            b.subscribed_uids == n
        });
    }

    /// Logs in as `uid` on node `i`.
    fn login(&self, i: usize, uid: &str) -> Ws {
        login(self.nodes[i].addr, uid)
    }

    /// Publishes a plain-text fence on `channel` and expects it to be the
    /// next message of each of `clients`: anything queued for them before
    /// (a duplicate) would come first.
    fn fence(&self, channel: &str, subscribers: i64, clients: &mut [&mut Ws]) {
        let fence = format!("fence-{}", unique());
        assert_eq!(self.redis.publish(channel, fence.as_bytes()), subscribers);
        for ws in clients.iter_mut() {
            assert_eq!(recv_text(ws), fence, "a duplicate came before the fence");
        }
    }
}

fn recv_binary(ws: &mut Ws) -> Vec<u8> {
    match recv(ws) {
        Message::Binary(b) => b.to_vec(),
        other => panic!("expected binary, got {other:?}"),
    }
}

#[test]
fn a_push_crosses_nodes_to_its_uid_text_and_binary() {
    let c = Cluster::start(3);
    let mut alice = c.login(1, "alice");
    c.wait_held(1, 1);
    let mut bob = c.login(0, "bob");
    c.wait_held(0, 1);

    send_text(&mut bob, "alice:hello from node 0");
    assert_eq!(recv_text(&mut alice), "hello from node 0");
    send_binary(&mut bob, b"alice:\x00\xffbin");
    assert_eq!(recv_binary(&mut alice), b"\x00\xffbin");
    send_text(&mut alice, "bob:back:with a colon");
    assert_eq!(recv_text(&mut bob), "back:with a colon");

    // The HTTP API's way in: a Pusher of node 2, which holds neither.
    c.node(2)
        .handle()
        .pusher()
        .push("alice", Kind::Text, b"pushed on node 2")
        .wait();
    assert_eq!(recv_text(&mut alice), "pushed on node 2");

    // Counted once Redis answered node 0, maybe after alice had them.
    let zero = c.wait_bus(0, "two published", |b| b.published >= 2);
    assert_eq!(zero.published, 2, "node 0 published its two messages");
    assert_eq!(
        c.bus(2).received,
        0,
        "node 2 holds no uid: nothing came to it"
    );
}

#[test]
fn a_broadcast_reaches_every_connection_of_every_node_once() {
    let c = Cluster::start(3);
    let mut clients: Vec<Ws> = (0..3).map(|i| c.login(i, &format!("b{i}"))).collect();
    for i in 0..3 {
        c.wait_held(i, 1);
    }
    send_text(&mut clients[1], "all:hello everyone");
    for ws in &mut clients {
        assert_eq!(recv_text(ws), "hello everyone");
    }
    // Every node has handled its copy from the bus (node 1 its own echo).
    c.wait_bus(0, "the broadcast", |b| b.received == 1);
    c.wait_bus(2, "the broadcast", |b| b.received == 1);
    c.wait_bus(1, "its own echo", |b| b.own_echoes == 1);
    let mut refs: Vec<&mut Ws> = clients.iter_mut().collect();
    c.fence("corepush:all", 3, &mut refs);

    // Pusher::broadcast too.
    let reached = c
        .node(2)
        .handle()
        .pusher()
        .broadcast(Kind::Text, b"from the api")
        .wait();
    assert_eq!(reached, 1, "the count is of node 2's own connections");
    for ws in &mut clients {
        assert_eq!(recv_text(ws), "from the api");
    }
}

#[test]
fn every_connection_of_a_uid_on_every_node_receives_exactly_once() {
    let c = Cluster::start(3);
    let mut a0 = c.login(0, "alice");
    let mut a0b = c.login(0, "alice");
    let mut a1 = c.login(1, "alice");
    let mut a2 = c.login(2, "alice");
    let mut bob = c.login(2, "bob");
    c.wait_held(0, 1);
    c.wait_held(1, 1);
    c.wait_held(2, 2);
    c.redis.wait_subscribers("corepush:u:alice", 3);

    send_text(&mut bob, "alice:to all of alice");
    for ws in [&mut a0, &mut a0b, &mut a1, &mut a2] {
        assert_eq!(recv_text(ws), "to all of alice");
    }
    c.wait_bus(0, "alice's message", |b| b.received == 1);
    c.wait_bus(1, "alice's message", |b| b.received == 1);
    c.wait_bus(2, "its own echo", |b| b.own_echoes == 1 && b.received == 1);
    c.fence(
        "corepush:u:alice",
        3,
        &mut [&mut a0, &mut a0b, &mut a1, &mut a2],
    );

    // A push through node 0's Pusher: its two connections directly, the
    // others through the bus.
    let here = c
        .node(0)
        .handle()
        .pusher()
        .push("alice", Kind::Binary, b"api")
        .wait();
    assert_eq!(here, 2);
    for ws in [&mut a0, &mut a0b, &mut a1, &mut a2] {
        assert_eq!(recv_binary(ws), b"api");
    }
    c.wait_bus(0, "its own echo", |b| b.own_echoes == 1);
    c.wait_bus(1, "the push", |b| b.received == 3);
    c.wait_bus(2, "the push", |b| b.received == 3);
    c.fence(
        "corepush:u:alice",
        3,
        &mut [&mut a0, &mut a0b, &mut a1, &mut a2],
    );
    assert_silent(&mut bob, Duration::from_millis(50));
}

#[test]
fn the_sending_node_delivers_once_to_its_own_connections() {
    let c = Cluster::start(2);
    let mut sender = c.login(0, "alice");
    let mut other = c.login(0, "alice");
    let mut far = c.login(1, "alice");
    c.wait_held(0, 1);
    c.wait_held(1, 1);

    send_text(&mut sender, "alice:once");
    for ws in [&mut sender, &mut other, &mut far] {
        assert_eq!(recv_text(ws), "once");
    }
    // The echo has come back to node 0 and was skipped.
    c.wait_bus(0, "its own echo", |b| b.own_echoes == 1 && b.received == 1);
    c.fence(
        "corepush:u:alice",
        2,
        &mut [&mut sender, &mut other, &mut far],
    );
    // Node 0's shards were handed the fence only (a duplicate would have
    // been handed to the same shard before it).
    let stats = c
        .node(0)
        .wait_for("the fence counted", |s| s.get(Counter::OutsidePushes) >= 1);
    assert_eq!(stats.get(Counter::OutsidePushes), 1);
}

#[test]
fn order_holds_per_sender_across_nodes_with_broadcasts_mixed_in() {
    let c = Cluster::start(3);
    let mut sender = c.login(0, "sender");
    let mut alice = c.login(1, "alice");
    c.wait_held(0, 1);
    c.wait_held(1, 1);
    let mut expected_alice = Vec::new();
    let mut expected_sender = Vec::new();
    for i in 0..200 {
        if i % 7 == 3 {
            send_text(&mut sender, &format!("all:b{i}"));
            expected_alice.push(format!("b{i}"));
            expected_sender.push(format!("b{i}"));
        } else {
            send_text(&mut sender, &format!("alice:t{i}"));
            expected_alice.push(format!("t{i}"));
        }
    }
    let got: Vec<String> = (0..expected_alice.len())
        .map(|_| recv_text(&mut alice))
        .collect();
    assert_eq!(got, expected_alice);
    let got: Vec<String> = (0..expected_sender.len())
        .map(|_| recv_text(&mut sender))
        .collect();
    assert_eq!(got, expected_sender);
    assert_eq!(c.bus(0).dropped, 0);
}

#[test]
fn another_system_pushes_with_a_plain_publish() {
    let c = Cluster::start(2);
    let mut alice = c.login(0, "alice");
    let mut bob = c.login(1, "bob");
    c.wait_held(0, 1);
    c.wait_held(1, 1);

    // What `redis-cli PUBLISH corepush:u:alice hello` or phpredis's
    // `$redis->publish('corepush:u:alice', 'hello')` send.
    assert_eq!(c.redis.publish("corepush:u:alice", b"hello from php"), 1);
    assert_eq!(recv_text(&mut alice), "hello from php");
    assert_eq!(
        c.redis
            .publish("corepush:all", "tout le monde é".as_bytes()),
        2
    );
    assert_eq!(recv_text(&mut alice), "tout le monde é");
    assert_eq!(recv_text(&mut bob), "tout le monde é");

    // An envelope written by another system (origin 0): binary.
    let mut envelope = vec![0xFF, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0];
    envelope.extend_from_slice(&[1, 2, 3]);
    c.redis.publish("corepush:u:bob", &envelope);
    assert_eq!(recv_binary(&mut bob), [1, 2, 3]);

    // Neither UTF-8 nor an envelope: dropped and counted, not delivered.
    c.redis.publish("corepush:u:bob", &[0xC3, 0x28]);
    c.wait_bus(1, "the malformed message", |b| b.malformed == 1);
    c.fence("corepush:u:bob", 1, &mut [&mut bob]);

    // What a node publishes, as another subscriber sees it.
    let mut spy: Resp = c.redis.connect();
    spy.send(&[b"SUBSCRIBE", b"corepush:u:alice"]);
    assert!(matches!(spy.read(), Value::Array(_)), "subscribe confirmed");
    c.redis.wait_subscribers("corepush:u:alice", 2);
    send_text(&mut bob, "alice:seen");
    assert_eq!(recv_text(&mut alice), "seen");
    let Value::Array(message) = spy.read() else {
        panic!("expected a message")
    };
    let Value::Bulk(Some(bytes)) = &message[2] else {
        panic!("expected a payload: {message:?}")
    };
    let node1 = c.node(1).handle().cluster_node().unwrap().0;
    let mut expected = vec![0xFF, 1, 1];
    expected.extend_from_slice(&node1.to_be_bytes());
    expected.extend_from_slice(b"seen");
    assert_eq!(bytes, &expected);
}

#[test]
fn a_node_receives_only_the_uids_it_holds_plus_broadcasts() {
    let c = Cluster::start(3);
    let mut sender = c.login(0, "sender");
    let mut a0 = c.login(0, "alice");
    let mut a1 = c.login(1, "alice");
    let mut carol = c.login(2, "carol");
    c.wait_held(0, 2);
    c.wait_held(1, 1);
    c.wait_held(2, 1);

    for i in 0..50 {
        send_text(&mut sender, &format!("alice:m{i}"));
    }
    for i in 0..50 {
        assert_eq!(recv_text(&mut a0), format!("m{i}"));
        assert_eq!(recv_text(&mut a1), format!("m{i}"));
    }
    c.wait_bus(1, "alice's 50", |b| b.received == 50);
    // A broadcast published after them: node 2 would have had alice's
    // messages before it.
    c.fence(
        "corepush:all",
        3,
        &mut [&mut carol, &mut a1, &mut a0, &mut sender],
    );
    let two = c.wait_bus(2, "the fence", |b| b.received == 1);
    assert_eq!(two.received, 1, "node 2 got none of alice's messages");

    // Alice leaves node 1: it unsubscribes, and hears no more of her.
    close(a1);
    c.wait_held(1, 0);
    c.redis.wait_subscribers("corepush:u:alice", 1);
    for i in 0..10 {
        send_text(&mut sender, &format!("alice:late{i}"));
    }
    for i in 0..10 {
        assert_eq!(recv_text(&mut a0), format!("late{i}"));
    }
    c.wait_bus(0, "its echoes", |b| b.own_echoes == 60);
    c.fence("corepush:all", 3, &mut [&mut carol, &mut a0, &mut sender]);
    c.wait_bus(1, "the second fence", |b| b.received == 52);
    assert_eq!(c.bus(1).received, 52, "50 + two fences, no late ones");
    assert_eq!(c.node(1).stats().get(Counter::NoRecipient), 0);
}

#[test]
fn nodes_reconnect_and_resubscribe_after_redis_restarts() {
    let mut c = Cluster::start(3);
    let mut bob = c.login(0, "bob");
    let mut alice = c.login(1, "alice");
    let mut carol = c.login(2, "carol");
    for i in 0..3 {
        c.wait_held(i, 1);
    }
    send_text(&mut bob, "alice:before");
    assert_eq!(recv_text(&mut alice), "before");

    c.redis.kill();
    for i in 0..3 {
        c.wait_bus(i, "the link down", |b| !b.link_up && b.subscribed_uids == 0);
    }
    // Sent during the outage: delivered on its own node only, dropped for
    // the others (at most once), and counted.
    send_text(&mut bob, "all:lost");
    assert_eq!(recv_text(&mut bob), "lost");
    c.wait_bus(0, "the drop", |b| b.dropped == 1);

    c.redis.restart();
    for i in 0..3 {
        c.wait_bus(i, "the link back, resubscribed", |b| {
            b.link_up && b.reconnects == 1 && b.subscribed_uids == 1
        });
    }
    c.redis.wait_subscribers("corepush:all", 3);
    c.redis.wait_subscribers("corepush:u:alice", 1);
    send_text(&mut bob, "alice:after");
    assert_eq!(recv_text(&mut alice), "after", "not the lost broadcast");
    send_text(&mut carol, "all:back");
    for ws in [&mut bob, &mut alice, &mut carol] {
        assert_eq!(recv_text(ws), "back");
    }
    for node in &c.nodes {
        node.assert_serving();
    }
    // Nothing crashed: every node stops cleanly.
    drop((bob, alice, carol));
    for node in c.nodes.drain(..) {
        node.stop();
    }
}

#[test]
fn a_killed_node_loses_only_its_own_connections() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut nodes: Vec<ServerProcess> = (0..3)
        .map(|_| start_node(&url, &["--shards", "1"]))
        .collect();
    let mut a = login(nodes[0].addr, "a");
    let mut b = login(nodes[1].addr, "b");
    let mut c = login(nodes[2].addr, "c");
    let mut alice1 = login(nodes[1].addr, "alice");
    let mut alice2 = login(nodes[2].addr, "alice");
    redis.wait_subscribers("corepush:u:b", 1);
    redis.wait_subscribers("corepush:u:c", 1);
    redis.wait_subscribers("corepush:u:alice", 2);

    send_text(&mut a, "alice:both");
    assert_eq!(recv_text(&mut alice1), "both");
    assert_eq!(recv_text(&mut alice2), "both");

    let killed = nodes[2].pid();
    nodes[2].kill();
    // Its clients see the connection end; Redis forgets its subscriptions.
    match c.read() {
        Err(_) | Ok(Message::Close(_)) => {}
        Ok(other) => panic!("node {killed} was killed, yet {other:?}"),
    }
    drop(alice2);
    redis.wait_subscribers("corepush:all", 2);
    redis.wait_subscribers("corepush:u:alice", 1);

    send_text(&mut a, "b:still here");
    assert_eq!(recv_text(&mut b), "still here");
    send_text(&mut b, "alice:still yours");
    assert_eq!(recv_text(&mut alice1), "still yours");
    send_text(&mut a, "all:to the living");
    for ws in [&mut a, &mut b, &mut alice1] {
        assert_eq!(recv_text(ws), "to the living");
    }
    // A new client on a surviving node is served as ever.
    let mut c_again = login(nodes[0].addr, "c");
    redis.wait_subscribers("corepush:u:c", 1);
    send_text(&mut b, "c:welcome back");
    assert_eq!(recv_text(&mut c_again), "welcome back");
}

#[test]
fn a_node_without_cluster_has_no_bus() {
    let server = TestServer::start(1);
    assert!(server.handle().cluster_stats().is_none());
    assert!(server.handle().cluster_node().is_none());
    assert!(server.handle().pusher().cluster_stats().is_none());
}

#[test]
fn a_node_starts_while_redis_is_down_and_links_when_it_comes() {
    let port = util::cluster::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let node = TestServer::start_with(1, |c| c.cluster = Some(url.clone()));
    let mut alice = login(node.addr, "alice");
    // Served alone meanwhile; what it would publish is dropped.
    send_text(&mut alice, "alice:alone");
    assert_eq!(recv_text(&mut alice), "alone");
    let bus = node.handle().cluster_stats().unwrap();
    assert!(!bus.link_up);
    assert_eq!(bus.dropped, 1);

    let redis = RedisServer::start_on(port);
    let start = Instant::now();
    while !node.handle().cluster_stats().unwrap().link_up
        || node.handle().cluster_stats().unwrap().subscribed_uids != 1
    {
        assert!(start.elapsed() < PATIENCE, "the node never linked");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(node.handle().cluster_stats().unwrap().reconnects, 0);
    assert_eq!(redis.publish("corepush:u:alice", b"now linked"), 1);
    assert_eq!(recv_text(&mut alice), "now linked");
}

#[test]
fn help_documents_the_cluster_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corepush"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in ["--cluster <URL>", "COREPUSH_CLUSTER", "--cluster-queue"] {
        assert!(
            help.contains(needle),
            "{needle} missing from --help:\n{help}"
        );
    }
}

#[test]
fn an_unknown_bus_is_refused_at_start() {
    let config = corepush::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        cluster: Some("nats://127.0.0.1:4222".into()),
        ..corepush::Config::default()
    };
    let error = corepush::start(config).err().expect("refused");
    assert!(error.to_string().contains("redis://"), "{error}");
}
