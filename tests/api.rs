//! The HTTP push API against a real server: real HTTP requests (ureq, and
//! raw sockets for malformed ones) and real WebSocket clients, on free
//! loopback ports.

mod util;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corepush::home_of;
use corepush::stats::Counter;
use serde_json::{json, Value};
use tungstenite::Message;
use util::http::{encode, ApiServer};
use util::*;

/// `count` uids whose home is `shard` of `shards`, named after `prefix`.
fn uids_on(prefix: &str, shard: u16, shards: usize, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|uid| home_of(uid, shards) == shard)
        .take(count)
        .collect()
}

/// Reads text messages until `end`; returns those before it.
fn texts_until(ws: &mut Ws, end: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let text = recv_text(ws);
        if text == end {
            return got;
        }
        got.push(text);
    }
}

#[test]
fn a_push_reaches_exactly_the_connections_of_its_uid_on_any_shard() {
    let api = ApiServer::start(3);
    // One uid at home on each shard, with 1, 2 and 3 tabs, and a bystander.
    let mut uids = Vec::new();
    for shard in 0..3u16 {
        uids.push(uids_on("tabs", shard, 3, 1).remove(0));
    }
    let mut tabs: Vec<Vec<Ws>> = uids
        .iter()
        .enumerate()
        .map(|(i, uid)| (0..=i).map(|_| login(api.addr(), uid)).collect())
        .collect();
    let mut bystander = login(api.addr(), "bystander");
    let per_shard = api.server.shard_stats();
    assert!(
        per_shard.iter().all(|s| s.get(Counter::LocalUids) >= 1),
        "every shard holds a uid: {per_shard:?}"
    );

    for (i, uid) in uids.iter().enumerate() {
        assert_eq!(api.online(uid), i as u64 + 1);
        assert_eq!(api.push(uid, &format!("for {uid}")), i as u64 + 1);
    }
    assert_eq!(api.push("nobody-here", "lost"), 0);
    assert_eq!(api.online("nobody-here"), 0);

    // A broadcast closes the sequence: each tab got its own push, nothing else.
    let end = api.post("/broadcast", "end").json();
    assert_eq!(end["delivered"], 1 + 2 + 3 + 1);
    for (uid, tabs) in uids.iter().zip(&mut tabs) {
        for ws in tabs {
            assert_eq!(texts_until(ws, "end"), vec![format!("for {uid}")]);
        }
    }
    assert!(texts_until(&mut bystander, "end").is_empty());
    let stats = api.server.stats();
    assert_eq!(stats.get(Counter::NoRecipient), 1);
    assert_eq!(
        stats.get(Counter::OutsidePushes),
        4 + 3,
        "4 pushes, 1 broadcast on 3 shards"
    );
}

#[test]
fn a_batch_counts_each_item_and_the_total_in_one_answer() {
    let api = ApiServer::start(2);
    let mut a1 = login(api.addr(), "batch-a");
    let mut a2 = login(api.addr(), "batch-a");
    let mut b = login(api.addr(), "batch-b");
    let batch = json!([
        {"uid": "batch-a", "message": "one"},
        {"uid": "batch-b", "message": "two: with a colon"},
        {"uid": "batch-nobody", "message": "lost"},
        {"uid": "batch-a", "message": "three ✓"},
    ]);
    let reply = api.post("/push", &batch.to_string());
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json(), json!({"delivered": [2, 1, 0, 2], "total": 5}));
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{reply:?}"
    );
    api.post("/broadcast", "end");
    for ws in [&mut a1, &mut a2] {
        assert_eq!(texts_until(ws, "end"), ["one", "three ✓"]);
    }
    assert_eq!(texts_until(&mut b, "end"), ["two: with a colon"]);

    // An empty batch is fine; so is a large one.
    assert_eq!(
        api.post("/push", "[]").json(),
        json!({"delivered": [], "total": 0})
    );
    let many: Vec<Value> = (0..500)
        .map(|i| json!({"uid": "batch-b", "message": format!("m{i}")}))
        .collect();
    let reply = api.post("/push", &Value::from(many).to_string()).json();
    assert_eq!(reply["total"], 500);
    assert!(reply["delivered"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n == 1));
    for i in 0..500 {
        assert_eq!(recv_text(&mut b), format!("m{i}"), "in order");
    }
}

#[test]
fn a_broadcast_counts_logged_in_connections_only() {
    let api = ApiServer::start(3);
    let mut clients: Vec<Ws> = (0..7)
        .map(|i| login(api.addr(), &format!("bc-{}", i % 4)))
        .collect();
    let _not_logged_in = connect(api.addr());
    let reply = api.post("/broadcast", "to everyone");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"delivered": 7}));
    for ws in &mut clients {
        assert_eq!(recv_text(ws), "to everyone");
    }
    let binary = api.post_binary("/broadcast", &[0, 1, 2, 255]);
    assert_eq!(binary.json()["delivered"], 7);
    for ws in &mut clients {
        assert_eq!(recv(ws), Message::binary(vec![0u8, 1, 2, 255]));
    }
}

#[test]
fn online_follows_logins_and_closes() {
    let api = ApiServer::start(2);
    let uid = "on line/ü";
    assert_eq!(api.online(uid), 0);
    let first = login(api.addr(), uid);
    let second = login(api.addr(), uid);
    assert_eq!(api.online(uid), 2);
    close(first);
    api.server
        .wait_for("one closed", |s| s.get(Counter::LoggedIn) == 1);
    assert_eq!(api.online(uid), 1);
    close(second);
    api.server.wait_empty();
    assert_eq!(api.online(uid), 0);
}

#[test]
fn octet_stream_arrives_as_binary_and_text_must_be_utf8() {
    let api = ApiServer::start(2);
    let mut ws = login(api.addr(), "bin");
    let bytes = [0xff, 0x00, 0xfe, b':', 0x80];
    let reply = api.post_binary("/push/bin", &bytes);
    assert_eq!(reply.json(), json!({"delivered": 1}));
    assert_eq!(recv(&mut ws), Message::binary(bytes.to_vec()));

    api.post("/push/bin", "plain text");
    assert_eq!(recv(&mut ws), Message::text("plain text"));

    let error = api
        .call(
            "POST",
            "/push/bin",
            &[("content-type", "text/plain")],
            &bytes,
        )
        .expect_error(400);
    assert!(error.contains("UTF-8"), "{error}");
    let error = api
        .call("POST", "/broadcast", &[], &bytes)
        .expect_error(400);
    assert!(error.contains("UTF-8"), "{error}");
    // Only the two good pushes arrived.
    api.post("/broadcast", "end");
    assert!(texts_until(&mut ws, "end").is_empty());
}

#[test]
fn the_token_is_required_when_set() {
    let api = ApiServer::start_with(2, |c| c.api_token = Some("s3cret-token".into()));
    let mut ws = login(api.addr(), "guarded");
    let requests: [(&str, &str, &[u8]); 4] = [
        ("POST", "/push/guarded", b"sneaky"),
        ("POST", "/broadcast", b"sneaky"),
        ("GET", "/stats", b""),
        ("GET", "/nowhere", b""),
    ];
    let wrong: [&[(&str, &str)]; 5] = [
        &[],
        &[("authorization", "Bearer s3cret-tokeN")],
        &[("authorization", "Bearer s3cret-token2")],
        &[("authorization", "Basic s3cret-token")],
        &[("authorization", "s3cret-token")],
    ];
    for (method, path, body) in requests {
        for headers in wrong {
            let reply = api.call_raw_auth(method, path, headers, body);
            let error = reply.expect_error(401);
            assert!(error.contains("token"), "{error}");
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer realm=\"corepush\"")
            );
        }
    }
    // The scheme is case-insensitive; the token is not.
    let ok = api.call_raw_auth(
        "POST",
        "/push/guarded",
        &[("authorization", "bearer s3cret-token")],
        b"let in",
    );
    assert_eq!(ok.json(), json!({"delivered": 1}));
    assert_eq!(api.push("guarded", "also in"), 1);
    assert_eq!(api.get("/metrics").status, 200);
    assert_eq!(recv_text(&mut ws), "let in", "nothing refused got through");
    assert_eq!(recv_text(&mut ws), "also in");
}

#[test]
fn no_token_means_loopback_only_unless_insecure() {
    let server = TestServer::start(1);
    let pusher = || server.handle().pusher();
    let config = |listen: &str, token: Option<&str>, insecure: bool| corepush::Config {
        api_listen: Some(listen.parse().unwrap()),
        api_token: token.map(String::from),
        api_insecure: insecure,
        ..corepush::Config::default()
    };
    let error = corepush::api::start(&config("0.0.0.0:0", None, false), pusher())
        .err()
        .expect("refused");
    assert!(error.to_string().contains("--api-token"), "{error}");
    assert!(error.to_string().contains("--api-insecure"), "{error}");
    let error = corepush::api::start(&config("127.0.0.1:0", Some(""), false), pusher())
        .err()
        .expect("an empty token is refused");
    assert!(error.to_string().contains("empty"), "{error}");
    // Loopback (v4 or v6) without a token, and any address with one or with
    // --api-insecure, start.
    for (listen, token, insecure) in [
        ("127.0.0.1:0", None, false),
        ("127.0.0.2:0", None, false),
        ("0.0.0.0:0", Some("t"), false),
        ("0.0.0.0:0", None, true),
    ] {
        let api = corepush::api::start(&config(listen, token, insecure), pusher())
            .unwrap_or_else(|e| panic!("{listen}: {e}"));
        assert_ne!(api.local_addr().port(), 0);
    }
    // The same API address twice: the second says so.
    let first = corepush::api::start(&config("127.0.0.1:0", None, false), pusher()).unwrap();
    let taken = first.local_addr().to_string();
    let error = corepush::api::start(&config(&taken, None, false), pusher())
        .err()
        .expect("address in use");
    assert!(error.to_string().contains("already in use"), "{error}");
}

#[test]
fn bad_input_gets_its_status_and_a_json_error() {
    let api = ApiServer::start_with(2, |c| {
        c.max_message_bytes = 100;
        c.api_max_batch_bytes = 1000;
    });
    let mut ws = login(api.addr(), "target");

    // Invalid uids: 400 with the login rule's words.
    let too_long = "x".repeat(129);
    for (path_uid, why) in [
        ("all", "uid 'all' is reserved"),
        ("a%3Ab", "uid contains ':'"),
        ("a%0Ab", "uid contains a control character"),
        ("%FF", "uid is not valid UTF-8"),
        ("%zz", "uid has an invalid percent-encoding"),
        ("", "uid is empty"),
        (too_long.as_str(), "uid is longer than 128 bytes"),
    ] {
        assert_eq!(
            api.post(&format!("/push/{path_uid}"), "x")
                .expect_error(400),
            why
        );
        assert_eq!(
            api.get(&format!("/online/{path_uid}")).expect_error(400),
            why
        );
    }

    // Over the message limit: 413, whether declared or only seen while reading.
    let big = "y".repeat(101);
    let error = api.post("/push/target", &big).expect_error(413);
    assert_eq!(error, "message is larger than 100 bytes");
    api.post("/broadcast", &big).expect_error(413);
    assert_eq!(
        api.push("target", &"y".repeat(100)),
        1,
        "the limit itself is fine"
    );
    let chunked = api.raw(
        format!(
            "POST /push/target HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
             50\r\n{}\r\n50\r\n{}\r\n0\r\n\r\n",
            "z".repeat(0x50),
            "z".repeat(0x50)
        )
        .as_bytes(),
    );
    assert!(chunked.starts_with("HTTP/1.1 413 "), "{chunked}");
    // A huge declared body is refused without being sent.
    let declared =
        api.raw(b"POST /broadcast HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n\r\n");
    assert!(declared.starts_with("HTTP/1.1 413 "), "{declared}");
    assert!(declared.contains("\"error\""), "{declared}");

    // Unknown paths and wrong methods.
    for path in ["/", "/pushes", "/push/a/b", "/stats/", "/online"] {
        assert_eq!(
            api.get(path).expect_error(404),
            "no such endpoint",
            "{path}"
        );
    }
    for (method, path, allow) in [
        ("GET", "/push/target", "POST"),
        ("GET", "/push", "POST"),
        ("PUT", "/broadcast", "POST"),
        ("POST", "/online/target", "GET"),
        ("DELETE", "/stats", "GET"),
        ("POST", "/metrics", "GET"),
    ] {
        let reply = api.call(method, path, &[], b"");
        reply.expect_error(405);
        assert_eq!(reply.header("allow"), Some(allow), "{method} {path}");
    }

    // Batches: malformed JSON, a wrong shape, a bad item, a big item, too
    // big a batch. Nothing in a refused batch is pushed.
    for body in [
        "",
        "[",
        "{\"uid\": \"target\", \"message\": \"x\"}",
        "[{\"uid\": \"target\"}]",
        "[{\"uid\": \"target\", \"message\": 5}]",
        "[{\"uid\": \"target\", \"message\": \"x\", \"extra\": 1}]",
    ] {
        let error = api.post("/push", body).expect_error(400);
        assert!(error.starts_with("malformed JSON"), "{body}: {error}");
    }
    let bad_item = json!([{"uid": "target", "message": "ok"}, {"uid": "all", "message": "x"}]);
    let reply = api.post("/push", &bad_item.to_string());
    assert_eq!(reply.expect_error(400), "uid 'all' is reserved");
    assert_eq!(reply.json()["item"], 1);
    let big_item = json!([{"uid": "target", "message": big}]);
    let reply = api.post("/push", &big_item.to_string());
    assert_eq!(reply.expect_error(413), "message is larger than 100 bytes");
    assert_eq!(reply.json()["item"], 0);
    let big_batch: Vec<Value> = (0..30)
        .map(|_| json!({"uid": "target", "message": "0123456789"}))
        .collect();
    let error = api
        .post("/push", &Value::from(big_batch).to_string())
        .expect_error(413);
    assert_eq!(error, "batch is larger than 1000 bytes");

    // Malformed HTTP: hyper's own 400, then the connection closes.
    for garbage in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"GET /stats HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET /stats HTTP/9.9\r\n\r\n",
        b"POST /push/target HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
    ] {
        let answer = api.raw(garbage);
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "{:?}: {answer}",
            String::from_utf8_lossy(garbage)
        );
    }

    // A request head over 16 KiB: 431.
    let huge_head = format!(
        "GET /stats HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
        "f".repeat(17 * 1024)
    );
    let answer = api.raw(huge_head.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

    // Of all that, only the one good push arrived.
    api.post("/broadcast", "end");
    assert_eq!(texts_until(&mut ws, "end"), ["y".repeat(100)]);
    api.server.assert_serving();
}

#[test]
fn slow_and_greedy_callers_are_cut_off_without_touching_the_shards() {
    let api = ApiServer::start_with(2, |c| {
        c.api_timeout = Duration::from_millis(300);
    });
    let mut ws = login(api.addr(), "steady");

    // A request head that never ends: closed after the timeout.
    let start = Instant::now();
    let mut slow_head = tcp(api.http);
    slow_head
        .write_all(b"POST /push/steady HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_end(&mut slow_head)).into_owned();
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(!answer.contains("200"), "{answer}");

    // A body that never ends: 408.
    let mut slow_body = tcp(api.http);
    slow_body
        .write_all(b"POST /push/steady HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_end(&mut slow_body)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");

    // An idle kept-alive connection is closed too.
    let mut idle = tcp(api.http);
    idle.write_all(b"GET /stats HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let answer = String::from_utf8_lossy(&read_to_end(&mut idle)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

    // A client that sends requests and never reads the answers: its
    // connection is dropped once writing stalls, and nothing else waits.
    let mut greedy = tcp(api.http);
    let request = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n";
    greedy
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let start = Instant::now();
    let refused = loop {
        match greedy.write_all(request) {
            Ok(_) => assert!(start.elapsed() < PATIENCE, "never cut off"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            refused.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        ),
        "the server dropped it, no write timed out: {refused}"
    );
    assert_eq!(api.push("steady", "still fine"), 1);
    assert_eq!(recv_text(&mut ws), "still fine");
    api.server.assert_serving();
}

#[test]
fn connections_over_the_limit_get_503_until_a_slot_frees() {
    let api = ApiServer::start_with(1, |c| c.api_max_connections = 4);
    let _ws = login(api.addr(), "steady");
    // Idle connections hold every slot (for --api-timeout-ms, 10 s).
    let held: Vec<_> = (0..4).map(|_| tcp(api.http)).collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut extra = tcp(api.http);
    let answer = String::from_utf8_lossy(&read_to_end(&mut extra)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("too many API connections"), "{answer}");
    // Closing them frees their slots.
    drop(held);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer =
            api.raw(b"GET /online/steady HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        if answer.starts_with("HTTP/1.1 200 ") {
            assert!(
                answer.ends_with("{\"uid\":\"steady\",\"connections\":1}"),
                "{answer}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stats_has_every_counter_in_total_and_per_shard() {
    let api = ApiServer::start(2);
    let mut ws = login(api.addr(), "counted");
    api.push("counted", "one");
    api.push("nobody", "lost");
    recv_text(&mut ws);
    let stats = api.get("/stats");
    assert_eq!(stats.status, 200);
    assert_eq!(stats.header("content-type"), Some("application/json"));
    let stats = stats.json();
    assert_eq!(stats["shards"], 2);
    let per_shard = stats["per_shard"].as_array().unwrap();
    assert_eq!(per_shard.len(), 2);
    for counter in Counter::ALL {
        let name = counter.name();
        let total = stats["total"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}"));
        let sum: u64 = per_shard.iter().map(|s| s[name].as_u64().unwrap()).sum();
        assert_eq!(total, sum, "{name}");
    }
    for (i, shard) in per_shard.iter().enumerate() {
        assert_eq!(shard["shard"], i);
    }
    let total = &stats["total"];
    assert_eq!(total["logged_in"], 1);
    assert_eq!(total["connections"], 1);
    assert_eq!(total["local_uids"], 1);
    assert_eq!(total["no_recipient"], 1);
    assert_eq!(total["outside_pushes"], 2);
    assert_eq!(
        total["messages_out"], 1,
        "the push (replies are not counted)"
    );
    for name in [
        "login_refused",
        "slow_consumers",
        "delivered_cross_shard",
        "messages_in",
    ] {
        assert!(total[name].is_u64(), "{name}");
    }
}

#[test]
fn metrics_pass_promtool() {
    let api = ApiServer::start(2);
    let _ws = login(api.addr(), "scraped");
    api.push("scraped", "x");
    let reply = api.get("/metrics");
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{reply:?}"
    );
    let text = &reply.body;
    for counter in Counter::ALL {
        let name = corepush::api::metrics::metric_name(counter);
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        let kind = if corepush::api::metrics::is_gauge(counter) {
            "gauge"
        } else {
            assert!(name.ends_with("_total"), "{name}");
            "counter"
        };
        assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
        for shard in 0..2 {
            assert!(
                text.contains(&format!("{name}{{shard=\"{shard}\"}} ")),
                "{name}"
            );
        }
    }
    assert!(text.contains("corepush_logged_in{shard="));
    assert!(text.contains("corepush_outside_pushes_total{shard="));

    // The official linter, which must be installed (.ci/run installs it).
    let mut promtool = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "promtool is needed for this test ({e}): apt-get install -y prometheus \
             (.ci/run installs it)"
        ),
    };
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shutdown_is_prompt_with_connections_open_and_closes_the_port() {
    // Requests in flight get at most the timeout (here 1 s) to finish.
    let api = ApiServer::start_with(1, |c| c.api_timeout = Duration::from_secs(1));
    let addr = api.http;
    // A kept-alive connection that is idle, and one halfway through a head.
    let mut idle = tcp(addr);
    idle.write_all(b"GET /stats HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let mut halfway = tcp(addr);
    halfway.write_all(b"GET /stats HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    api.api.shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    read_to_end(&mut idle);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
    api.api.shutdown(); // a second stop is harmless
    api.server.assert_serving();
}

#[test]
fn uids_in_paths_are_percent_decoded() {
    let api = ApiServer::start(2);
    let uid = "a/b c?d#e%f+ü";
    let mut ws = login(api.addr(), uid);
    assert_eq!(api.online(uid), 1);
    let reply = api.post(&format!("/push/{}", encode(uid)), "decoded");
    assert_eq!(reply.json(), json!({"delivered": 1}));
    assert_eq!(recv_text(&mut ws), "decoded");
}

// ---- the binary ----

/// Runs `corepush` with `args`, returns the child and its stderr lines.
fn spawn_binary(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_corepush"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1"])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("COREPUSH_API_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn corepush");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[test]
fn the_binary_refuses_a_public_api_without_a_token() {
    let (mut child, lines) = spawn_binary(&["--api-listen", "0.0.0.0:0"]);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let said: Vec<String> = lines.iter().collect();
    assert!(
        said.iter().any(
            |l| l.contains("refusing to serve the HTTP API on 0.0.0.0:0")
                && l.contains("--api-token")
        ),
        "{said:?}"
    );
    assert!(!said.iter().any(|l| l.contains("listening on")), "{said:?}");
}

#[test]
fn the_binary_serves_the_api_with_a_token_and_stops_on_sigterm() {
    let (mut child, lines) = spawn_binary(&[
        "--api-listen",
        "127.0.0.1:0",
        "--api-token",
        "from-the-flag",
    ]);
    let mut server = None;
    let mut api = None;
    while api.is_none() {
        let line = lines.recv_timeout(PATIENCE).expect("startup lines");
        let addr = |l: &str| -> std::net::SocketAddr {
            let rest = l.split("listening on ").nth(1).unwrap();
            rest.split([' ', ';']).next().unwrap().parse().unwrap()
        };
        if line.contains("api listening on ") {
            assert!(server.is_some(), "the shards' line comes first");
            assert!(line.contains("bearer token required"), "{line}");
            api = Some(addr(&line));
        } else if line.contains("listening on ") {
            server = Some(addr(&line));
        }
    }
    let (server, api) = (server.unwrap(), api.unwrap());
    let mut ws = login(server, "from-binary");
    let request = |auth: &str| {
        let mut s = tcp(api);
        write!(
            s,
            "POST /push/from-binary HTTP/1.1\r\nhost: x\r\n{auth}content-length: 2\r\n\
             connection: close\r\n\r\nhi"
        )
        .unwrap();
        String::from_utf8_lossy(&read_to_end(&mut s)).into_owned()
    };
    assert!(request("").starts_with("HTTP/1.1 401 "));
    let ok = request("authorization: Bearer from-the-flag\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
    assert!(ok.ends_with("{\"delivered\":1}"), "{ok}");
    assert_eq!(recv_text(&mut ws), "hi");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(expect_close(&mut ws), (1001, "server shutting down".into()));
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(api).is_err(),
        "the API stopped"
    );
}
