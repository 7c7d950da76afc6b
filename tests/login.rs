//! Login: the first data message is the uid (protocol.md, "Login").

mod util;

use std::io::Write;
use std::time::Duration;

use corepush::stats::Counter;
use util::*;

#[test]
fn valid_login_is_acknowledged_in_the_seeds_words() {
    let server = TestServer::start(2);
    let mut ws = connect(server.addr);
    send_text(&mut ws, "user 42 ünïcode");
    assert_eq!(
        recv_text(&mut ws),
        "login success, your uid is user 42 ünïcode"
    );
    let longest = "x".repeat(128);
    close(ws);
    close(login(server.addr, &longest));
}

#[test]
fn invalid_uids_are_closed_with_1008_and_a_reason() {
    let server = TestServer::start(2);
    let cases: [(&str, &str); 5] = [
        ("", "uid is empty"),
        ("all", "uid 'all' is reserved"),
        ("a:b", "uid contains ':'"),
        ("tab\there", "uid contains a control character"),
        (&"y".repeat(129), "uid is longer than 128 bytes"),
    ];
    for (uid, reason) in cases {
        let mut ws = connect(server.addr);
        send_text(&mut ws, uid);
        assert_eq!(
            expect_close(&mut ws),
            (1008, reason.to_string()),
            "uid {uid:?}"
        );
    }
    // A binary login that is not UTF-8.
    let mut ws = connect(server.addr);
    send_binary(&mut ws, &[0xff, 0xfe, 0x00]);
    assert_eq!(
        expect_close(&mut ws),
        (1008, "uid is not valid UTF-8".into())
    );

    server.wait_for("refusals counted", |s| s.get(Counter::LoginRefused) == 6);
    server.assert_serving();
}

#[test]
fn binary_login_with_a_utf8_uid_is_accepted() {
    let server = TestServer::start(1);
    let mut ws = connect(server.addr);
    send_binary(&mut ws, b"bin-user");
    assert_eq!(recv_text(&mut ws), "login success, your uid is bin-user");
}

#[test]
fn ping_before_login_is_answered_and_login_still_works() {
    let server = TestServer::start(1);
    let mut s = raw_upgraded(server.addr);
    s.write_all(&client_frame(true, 9, b"early")).unwrap();
    assert_eq!(read_frame(&mut s), Some((10, b"early".to_vec())));
    s.write_all(&client_frame(true, 1, b"late-user")).unwrap();
    let (op, text) = read_frame(&mut s).unwrap();
    assert_eq!(
        (op, text),
        (1, b"login success, your uid is late-user".to_vec())
    );
}

#[test]
fn login_and_first_message_in_one_packet() {
    let server = TestServer::start(2);
    let mut bob = login(server.addr, "pipelined-bob");
    let mut s = util::tcp(server.addr);
    let mut bytes = UPGRADE.as_bytes().to_vec();
    bytes.extend(client_frame(true, 1, b"pipelined-alice"));
    bytes.extend(client_frame(true, 1, b"pipelined-bob:in one write"));
    s.write_all(&bytes).unwrap();
    assert!(read_http_head(&mut s).starts_with("HTTP/1.1 101"));
    assert_eq!(
        read_frame(&mut s).unwrap().1,
        b"login success, your uid is pipelined-alice"
    );
    assert_eq!(recv_text(&mut bob), "in one write");
}

#[test]
fn login_timeout_closes_with_1008() {
    let server = TestServer::start_with(1, |c| c.login_timeout = Duration::from_millis(200));
    let mut ws = connect(server.addr);
    assert_eq!(expect_close(&mut ws), (1008, "login timeout".into()));
    server.wait_for("timeout counted", |s| s.get(Counter::Timeouts) == 1);
    server.wait_empty();
}

#[test]
fn relogin_after_close_gets_messages_again() {
    let server = TestServer::start(2);
    let mut sender = login(server.addr, "relog-sender");
    for round in 0..3 {
        let mut ws = login(server.addr, "relog");
        send_text(&mut sender, &format!("relog:round {round}"));
        assert_eq!(recv_text(&mut ws), format!("round {round}"));
        close(ws);
        server.wait_for("relog gone", |s| s.get(Counter::LoggedIn) == 1);
    }
}

/// A login accepted by a shard that is not its uid's home moves the socket
/// to the home shard. Bytes the client sent right behind the login (whole
/// frames and half a frame) move with it and are not lost or reordered.
#[test]
fn bytes_behind_the_login_survive_the_handover_to_the_home_shard() {
    let server = TestServer::start(4);
    let mut inbox = login(server.addr, "handover-inbox");
    for i in 0..24 {
        let uid = format!("handover-{i}");
        let mut s = tcp(server.addr);
        let first = client_frame(true, 1, format!("handover-inbox:{i} first").as_bytes());
        let second = client_frame(true, 1, format!("handover-inbox:{i} second").as_bytes());
        let mut bytes = UPGRADE.as_bytes().to_vec();
        bytes.extend(client_frame(true, 1, uid.as_bytes()));
        bytes.extend(&first);
        bytes.extend(&second[..5]); // half of a frame
        s.write_all(&bytes).unwrap();
        assert!(read_http_head(&mut s).starts_with("HTTP/1.1 101"));
        let (_, reply) = read_frame(&mut s).unwrap();
        assert_eq!(
            reply,
            format!("login success, your uid is {uid}").as_bytes()
        );
        s.write_all(&second[5..]).unwrap();
        assert_eq!(recv_text(&mut inbox), format!("{i} first"));
        assert_eq!(recv_text(&mut inbox), format!("{i} second"));
        // The moved connection is reachable at its home.
        let mut probe = login(server.addr, &format!("handover-probe-{i}"));
        send_text(&mut probe, &format!("{uid}:found you"));
        assert_eq!(read_frame(&mut s).unwrap().1, b"found you");
    }
    let s = server.stats();
    assert!(
        s.get(Counter::HandedOver) > 0,
        "no login was handed over: {s:?}"
    );
}
