//! The HTTP upgrade (RFC 6455 section 4.2): request in, 101 or 4xx out.
//!
//! tungstenite parses the request and checks the upgrade headers; this module
//! maps its verdict to a status a client can act on. The request is buffered
//! per connection only until it is complete, at most [`MAX_REQUEST_BYTES`].

use tungstenite::error::{Error, ProtocolError};
use tungstenite::handshake::machine::TryParse;
use tungstenite::handshake::server::{create_response, write_response, Request};

/// The largest upgrade request accepted, headers included.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// What to do with the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request is not complete yet.
    Incomplete,
    /// A valid upgrade: send `response`, then speak WebSocket from byte
    /// `consumed` of the input on.
    Upgrade { response: Vec<u8>, consumed: usize },
    /// Not a valid upgrade: send `response` (a 4xx) and close.
    Reject { status: u16, response: Vec<u8> },
}

/// Examines the request bytes received so far.
pub fn process(buf: &[u8]) -> Outcome {
    match Request::try_parse(buf) {
        Ok(None) if buf.len() >= MAX_REQUEST_BYTES => reject(
            431,
            "Request Header Fields Too Large",
            "upgrade request too large",
        ),
        Ok(None) => Outcome::Incomplete,
        Ok(Some((consumed, request))) => match create_response(&request) {
            Ok(response) => {
                let mut bytes = Vec::with_capacity(160);
                write_response(&mut bytes, &response).expect("writing to a Vec");
                Outcome::Upgrade {
                    response: bytes,
                    consumed,
                }
            }
            Err(e) => refuse(&e),
        },
        Err(e) => refuse(&e),
    }
}

fn refuse(e: &Error) -> Outcome {
    let Error::Protocol(p) = e else {
        return reject(400, "Bad Request", "malformed HTTP request");
    };
    match p {
        ProtocolError::WrongHttpMethod => reject(405, "Method Not Allowed", "use GET to upgrade"),
        ProtocolError::MissingConnectionUpgradeHeader
        | ProtocolError::MissingUpgradeWebSocketHeader => reject(
            426,
            "Upgrade Required",
            "this is a WebSocket server: send an upgrade request",
        ),
        ProtocolError::MissingSecWebSocketVersionHeader => {
            reject(426, "Upgrade Required", "Sec-WebSocket-Version must be 13")
        }
        ProtocolError::MissingSecWebSocketKey => {
            reject(400, "Bad Request", "missing Sec-WebSocket-Key")
        }
        ProtocolError::InvalidSecWebSocketKey => {
            reject(400, "Bad Request", "invalid Sec-WebSocket-Key")
        }
        ProtocolError::WrongHttpVersion => reject(400, "Bad Request", "HTTP/1.1 or later required"),
        _ => reject(400, "Bad Request", "invalid upgrade request"),
    }
}

fn reject(status: u16, phrase: &str, reason: &str) -> Outcome {
    let response = format!(
        "HTTP/1.1 {status} {phrase}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Sec-WebSocket-Version: 13\r\nContent-Length: {}\r\n\r\n{reason}\n",
        reason.len() + 1
    );
    Outcome::Reject {
        status,
        response: response.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
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
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
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
        let no_key = GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
        assert_eq!(status(&process(no_key.as_bytes())), 400);
        let v8 = GOOD.replace("Version: 13", "Version: 8");
        assert_eq!(status(&process(v8.as_bytes())), 426);
        let huge = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(status(&process(huge.as_bytes())), 431);
    }
}
