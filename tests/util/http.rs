//! Helpers for the HTTP push API: a server with its API on 127.0.0.1:0, a
//! real HTTP client (ureq) that sends the token, and raw requests for what
//! a well-behaved client never sends.

use std::io::Write;
use std::net::SocketAddr;

use corepush::api::ApiHandle;
use corepush::Config;
use serde_json::Value;
use ureq::http;

use super::{read_to_end, tcp, TestServer, PATIENCE};

/// A server and its HTTP API, both stopped on drop (the API first).
pub struct ApiServer {
    pub api: ApiHandle,
    pub server: TestServer,
    /// The API's address.
    pub http: SocketAddr,
    /// Sent as `Authorization: Bearer` by [`ApiServer::call`].
    pub token: Option<String>,
    agent: ureq::Agent,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the status and a JSON `{"error": ...}` body; returns the error.
    pub fn expect_error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let json = self.json();
        json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {json}"))
            .to_string()
    }
}

impl ApiServer {
    pub fn start(shards: usize) -> ApiServer {
        ApiServer::start_with(shards, |_| {})
    }

    /// Same, with settings changed by `tweak` (the API listens on
    /// 127.0.0.1:0 unless `tweak` says otherwise).
    pub fn start_with(shards: usize, tweak: impl FnOnce(&mut Config)) -> ApiServer {
        let mut config = None;
        let server = TestServer::start_with(shards, |c| {
            c.api_listen = Some("127.0.0.1:0".parse().unwrap());
            tweak(c);
            config = Some(c.clone());
        });
        let config = config.unwrap();
        let api = corepush::api::start(&config, server.handle().pusher()).expect("api starts");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(PATIENCE))
            .build()
            .into();
        ApiServer {
            http: api.local_addr(),
            api,
            server,
            token: config.api_token,
            agent,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// A request with the server's token (if any) and `headers`.
    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| ("authorization", b))
            .into_iter()
            .collect();
        all.extend_from_slice(headers);
        self.call_raw_auth(method, path, &all, body)
    }

    /// A request with exactly `headers` (no token added).
    pub fn call_raw_auth(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.http));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(body.to_vec()).expect("a valid request");
        let mut response = self.agent.run(request).expect("an HTTP answer");
        Reply {
            status: response.status().as_u16(),
            headers: response
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: response
                .body_mut()
                .read_to_string()
                .expect("a readable body"),
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], b"")
    }

    /// A text message (or JSON batch).
    pub fn post(&self, path: &str, body: &str) -> Reply {
        self.call("POST", path, &[], body.as_bytes())
    }

    /// A binary message.
    pub fn post_binary(&self, path: &str, body: &[u8]) -> Reply {
        self.call(
            "POST",
            path,
            &[("content-type", "application/octet-stream")],
            body,
        )
    }

    /// `POST /push/{uid}`; the count it answers.
    pub fn push(&self, uid: &str, message: &str) -> u64 {
        let reply = self.post(&format!("/push/{}", encode(uid)), message);
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.json()["delivered"].as_u64().expect("a count")
    }

    /// `GET /online/{uid}`; its connection count.
    pub fn online(&self, uid: &str) -> u64 {
        let reply = self.get(&format!("/online/{}", encode(uid)));
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.json()["uid"], uid);
        reply.json()["connections"].as_u64().expect("a count")
    }

    /// Sends `bytes` on a fresh connection and reads until the server
    /// closes it; returns everything it answered.
    pub fn raw(&self, bytes: &[u8]) -> String {
        let mut s = tcp(self.http);
        s.write_all(bytes).unwrap();
        String::from_utf8_lossy(&read_to_end(&mut s)).into_owned()
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
