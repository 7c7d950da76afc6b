//! Bad input at the transport: requests that are not upgrades, garbage,
//! timeouts, abrupt disconnects. Each gets a clear answer and the server
//! keeps serving everyone else (protocol.md, "Transport").

mod util;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use corepush::stats::Counter;
use util::*;

fn http_status(server: &TestServer, request: &[u8]) -> (String, String) {
    let mut s = tcp(server.addr);
    s.write_all(request).unwrap();
    let all = read_to_end(&mut s);
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn plain_http_gets_426_and_a_reason() {
    let server = TestServer::start(2);
    let (status, body) = http_status(&server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 426 Upgrade Required");
    assert!(body.contains("WebSocket"), "{body}");
    server.assert_serving();
}

#[test]
fn other_bad_requests_get_4xx() {
    let server = TestServer::start(2);
    let post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(
        http_status(&server, post).0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    let garbage = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n";
    assert_eq!(http_status(&server, garbage).0, "HTTP/1.1 400 Bad Request");
    let no_key = UPGRADE.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    assert_eq!(
        http_status(&server, no_key.as_bytes()).0,
        "HTTP/1.1 400 Bad Request"
    );
    let no_host = UPGRADE.replace("Host: test\r\n", "");
    let (status, reason) = http_status(&server, no_host.as_bytes());
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(reason.contains("Host"), "{reason}");
    let endless = format!("GET / HTTP/1.1\r\nX-Pad: {}", "p".repeat(10_000));
    assert_eq!(
        http_status(&server, endless.as_bytes()).0,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    server.wait_for("failures counted", |s| s.get(Counter::HandshakeFailed) == 5);
    server.assert_serving();
}

#[test]
fn random_garbage_never_crashes_or_stalls_the_server() {
    let server = TestServer::start(2);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..40 {
        let mut bytes = Vec::new();
        for _ in 0..(64 + round * 37) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.push(seed as u8);
        }
        // Half of the rounds speak garbage after a valid upgrade and login.
        let mut s = if round % 2 == 0 {
            tcp(server.addr)
        } else {
            raw_login(server.addr, &format!("garbage-{round}"))
        };
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        read_to_end(&mut s); // the server always ends the connection
    }
    server.wait_empty();
    server.assert_serving();
}

#[test]
fn slow_handshake_times_out_with_408() {
    let server = TestServer::start_with(1, |c| c.handshake_timeout = Duration::from_millis(200));
    let mut s = tcp(server.addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow").unwrap();
    let reply = String::from_utf8(read_to_end(&mut s)).unwrap();
    assert!(reply.starts_with("HTTP/1.1 408 Request Timeout"), "{reply}");
    let silent = read_to_end(&mut tcp(server.addr));
    assert!(String::from_utf8_lossy(&silent).starts_with("HTTP/1.1 408"));
    server.wait_empty();
    server.assert_serving();
}

#[test]
fn abrupt_disconnects_leave_no_trace() {
    let server = TestServer::start(2);
    let mut sender = login(server.addr, "abrupt-sender");
    for i in 0..20 {
        let mut s = raw_login(server.addr, &format!("abrupt-{i}"));
        match i % 3 {
            // Vanish without a close frame.
            0 => drop(s),
            // Vanish mid-frame.
            1 => {
                s.write_all(&client_frame(true, 1, b"abrupt-sender:half")[..5])
                    .unwrap();
                drop(s);
            }
            // Reset the connection (SO_LINGER 0 makes close send RST).
            _ => {
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(s);
            }
        }
    }
    server.wait_for("only the sender left", |s| {
        s.get(Counter::Connections) == 1 && s.get(Counter::LocalUids) == 1
    });
    // Messages to the vanished uids go nowhere, and nothing breaks.
    for i in 0..20 {
        send_text(&mut sender, &format!("abrupt-{i}:anyone?"));
    }
    server.wait_for("no recipients", |s| s.get(Counter::NoRecipient) == 20);
    close(sender);
    server.wait_empty();
    server.assert_serving();
}
