//! Signed logins (`--login-secret`) and what a client may send
//! (`--client-sends`), against a real server over real sockets.

mod util;

use corepush::protocol::ClientSends;
use corepush::stats::Counter;
use corepush::Kind;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use util::*;

const SECRET: &str = "a secret only the backend knows";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token as a backend mints it.
fn token(secret: &str, sub: &str, exp: u64) -> String {
    let claims = serde_json::json!({ "sub": sub, "exp": exp });
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

fn signed_server() -> TestServer {
    TestServer::start_with(2, |c| c.login_secret = Some(SECRET.into()))
}

#[test]
fn a_valid_token_logs_in_as_its_sub_on_any_shard() {
    let server = signed_server();
    let mut tabs = Vec::new();
    for i in 0..6 {
        let mut ws = connect(server.addr);
        send_text(
            &mut ws,
            &token(SECRET, &format!("user-{}", i % 3), unix_now() + 60),
        );
        assert_eq!(
            recv_text(&mut ws),
            format!("login success, your uid is user-{}", i % 3)
        );
        tabs.push(ws);
    }
    // The uid the token names is the one that receives.
    send_text(&mut tabs[0], "user-1:for user 1");
    assert_eq!(recv_text(&mut tabs[1]), "for user 1");
    assert_eq!(recv_text(&mut tabs[4]), "for user 1");
    for ws in tabs {
        close(ws);
    }
    server.wait_empty();
}

#[test]
fn expired_forged_and_plain_logins_are_closed_with_1008() {
    let server = signed_server();
    let cases = [
        (
            token(SECRET, "alice", unix_now() - 1),
            "invalid login token: expired",
        ),
        (
            token("not the secret", "alice", unix_now() + 60),
            "invalid login token: bad signature",
        ),
        ("alice".to_string(), "invalid login token: malformed"),
        (
            token(SECRET, "all", unix_now() + 60),
            "uid 'all' is reserved",
        ),
    ];
    for (first, reason) in &cases {
        let mut ws = connect(server.addr);
        send_text(&mut ws, first);
        assert_eq!(expect_close(&mut ws), (1008, reason.to_string()));
    }
    server.wait_for("refusals counted", |s| {
        s.get(Counter::LoginRefused) == cases.len() as u64
    });
    server.assert_serving_with(|uid| token(SECRET, uid, unix_now() + 60));
}

#[test]
fn an_empty_login_secret_is_refused_at_start() {
    let config = corepush::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        login_secret: Some(String::new()),
        ..corepush::Config::default()
    };
    let error = corepush::start(config).err().expect("refused");
    assert!(error.to_string().contains("login secret"), "{error}");
}

#[test]
fn targeted_only_refuses_all_from_clients_but_not_from_the_api() {
    let server = TestServer::start_with(2, |c| c.client_sends = ClientSends::Targeted);
    let mut a = login(server.addr, "cs-a");
    let mut b = login(server.addr, "cs-b");
    send_text(&mut a, "all:to everyone");
    assert_eq!(
        recv_text(&mut a),
        "error: clients may not send to all on this server"
    );
    send_text(&mut a, "cs-b:to b");
    assert_eq!(recv_text(&mut b), "to b", "targeted sends still flow");
    let pusher = server.handle().pusher();
    assert_eq!(pusher.broadcast(Kind::Text, b"from the api").wait(), 2);
    assert_eq!(recv_text(&mut a), "from the api");
    assert_eq!(recv_text(&mut b), "from the api");
    assert_eq!(server.stats().get(Counter::SendsRefused), 1);
}

#[test]
fn receive_only_clients_get_every_push_through_the_api() {
    let server = TestServer::start_with(2, |c| c.client_sends = ClientSends::None);
    let mut a = login(server.addr, "ro-a");
    let mut b = login(server.addr, "ro-b");
    send_text(&mut a, "ro-b:sneaky");
    assert_eq!(
        recv_text(&mut a),
        "error: clients may not send on this server"
    );
    send_text(&mut a, "all:sneaky");
    assert_eq!(
        recv_text(&mut a),
        "error: clients may not send on this server"
    );
    let pusher = server.handle().pusher();
    assert_eq!(pusher.push("ro-b", Kind::Text, b"only way in").wait(), 1);
    assert_eq!(
        recv_text(&mut b),
        "only way in",
        "b never got the refused sends"
    );
    assert_eq!(server.stats().get(Counter::SendsRefused), 2);
}
