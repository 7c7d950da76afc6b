//! The HTTP upgrade (RFC 6455 section 4.2): request in, 101 or 4xx out.
//!
//! The request is parsed in place with httparse into a fixed array of headers
//! and the 101 response is written straight into the frame that carries it,
//! so an upgrade allocates nothing but that frame. tungstenite derives the
//! `Sec-WebSocket-Accept` key. (tungstenite's own request parser builds an
//! `http::Request` with a header map first: docs/decisions.md has the cost.)
//! The request is buffered per connection only when it arrives in pieces, and
//! only up to [`MAX_REQUEST_BYTES`].

use std::io::Write;

use tungstenite::handshake::derive_accept_key;

use super::frame::Frame;

/// The largest upgrade request accepted, headers included.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The most headers an upgrade request may carry.
const MAX_HEADERS: usize = 32;

/// What to do with the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request is not complete yet.
    Incomplete,
    /// A valid upgrade: send `response`, then speak WebSocket from byte
    /// `consumed` of the input on.
    Upgrade {
        /// The 101 response.
        response: Frame,
        /// Bytes of the input the request took.
        consumed: usize,
    },
    /// Not a valid upgrade: send `response` (a 4xx) and close.
    Reject {
        /// The HTTP status.
        status: u16,
        /// The whole response.
        response: Frame,
    },
}

/// Examines the request bytes received so far.
pub fn process(buf: &[u8]) -> Outcome {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let consumed = match request.parse(buf) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_BYTES => {
            return Outcome::Incomplete
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return reject(
                431,
                "Request Header Fields Too Large",
                "upgrade request too large",
            )
        }
        Err(_) => return reject(400, "Bad Request", "malformed HTTP request"),
    };
    if request.method != Some("GET") {
        return reject(405, "Method Not Allowed", "use GET to upgrade");
    }
    if request.version != Some(1) {
        return reject(400, "Bad Request", "HTTP/1.1 or later required");
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if header("Host").is_none() {
        return reject(400, "Bad Request", "missing Host header");
    }
    if !has_token(header("Upgrade"), "websocket") || !has_token(header("Connection"), "upgrade") {
        return reject(
            426,
            "Upgrade Required",
            "this is a WebSocket server: send an upgrade request",
        );
    }
    if header("Sec-WebSocket-Version") != Some(b"13") {
        return reject(426, "Upgrade Required", "Sec-WebSocket-Version must be 13");
    }
    let Some(key) = header("Sec-WebSocket-Key") else {
        return reject(400, "Bad Request", "missing Sec-WebSocket-Key");
    };
    if !is_valid_key(key) {
        return reject(400, "Bad Request", "invalid Sec-WebSocket-Key");
    }
    Outcome::Upgrade {
        response: switching_protocols(&derive_accept_key(key)),
        consumed,
    }
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: Option<&[u8]>, token: &str) -> bool {
    value.is_some_and(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// A key is 16 bytes in base64: 22 base64 characters and `==`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn switching_protocols(accept: &str) -> Frame {
    let mut response = [0u8; 160];
    let mut out = &mut response[..];
    write!(
        out,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .expect("a 101 response fits in 160 bytes");
    let len = 160 - out.len();
    Frame::from(&response[..len])
}

fn reject(status: u16, phrase: &str, reason: &str) -> Outcome {
    let response = format!(
        "HTTP/1.1 {status} {phrase}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Sec-WebSocket-Version: 13\r\nContent-Length: {}\r\n\r\n{reason}\n",
        reason.len() + 1
    );
    Outcome::Reject {
        status,
        response: Frame::from(response.into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn status(outcome: &Outcome) -> u16 {
        match outcome {
            Outcome::Reject { status, .. } => *status,
            Outcome::Upgrade { .. } => 101,
            Outcome::Incomplete => 0,
        }
    }

    #[test]
    fn accepts_the_rfc_example() {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x81\x80");
        let Outcome::Upgrade { response, consumed } = process(&bytes) else {
            panic!("not upgraded");
        };
        assert_eq!(consumed, GOOD.len(), "frame bytes after the request stay");
        let text = std::str::from_utf8(&response).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn waits_for_the_whole_request() {
        assert_eq!(process(&GOOD.as_bytes()[..40]), Outcome::Incomplete);
    }

    #[test]
    fn refuses_with_a_status() {
        assert_eq!(status(&process(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")), 426);
        assert_eq!(status(&process(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")), 405);
        assert_eq!(status(&process(b"\x16\x03\x01garbage\r\n\r\n")), 400);
        let old = GOOD.replace("HTTP/1.1", "HTTP/1.0");
        assert_eq!(status(&process(old.as_bytes())), 400);
        let no_host = GOOD.replace("Host: x\r\n", "");
        assert_eq!(status(&process(no_host.as_bytes())), 400);
        let no_key = GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_eq!(status(&process(no_key.as_bytes())), 400);
        let bad_key = GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short==");
        assert_eq!(status(&process(bad_key.as_bytes())), 400);
        let v8 = GOOD.replace("Version: 13", "Version: 8");
        assert_eq!(status(&process(v8.as_bytes())), 426);
        let no_conn = GOOD.replace("keep-alive, Upgrade", "keep-alive");
        assert_eq!(status(&process(no_conn.as_bytes())), 426);
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(status(&process(huge.as_bytes())), 431);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let crowded = GOOD.replace(
            "Upgrade: websocket\r\n",
            &format!("Upgrade: websocket\r\n{many}"),
        );
        assert_eq!(status(&process(crowded.as_bytes())), 431);
    }
}
