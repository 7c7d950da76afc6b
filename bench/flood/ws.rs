//! Minimal RFC 6455 client side: the upgrade request, checking the 101
//! response (including Sec-WebSocket-Accept), masked client frames, and
//! parsing server frames in place. No allocation per frame. SHA-1 and
//! base64 come from small crates (`sha1_smol`, `base64`), not from the
//! server's code, so the flood stays an independent check of the handshake.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha1_smol::Sha1;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Frames bigger than this are treated as a protocol error: the flood only
/// expects small messages, so a huge length means a framing bug.
pub const MAX_FRAME: u64 = 16 << 20;

/// The Sec-WebSocket-Key for a 16-byte nonce (its base64). The nonce is
/// derived from the connection's index and attempt start time, so it need
/// not be stored.
pub fn key_for(nonce: [u8; 16]) -> Vec<u8> {
    STANDARD.encode(nonce).into_bytes()
}

/// The Sec-WebSocket-Accept value a server must answer to `key`:
/// base64(SHA-1(key + GUID)).
pub fn accept_for(key: &[u8]) -> Vec<u8> {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    STANDARD.encode(sha.digest().bytes()).into_bytes()
}

/// Appends the HTTP upgrade request to `out`.
pub fn upgrade_request(out: &mut Vec<u8>, host: &str, key: &[u8]) {
    out.extend_from_slice(b"GET / HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(
        b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
    );
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Outcome of looking at the bytes received after the upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// The header block is not complete yet.
    Incomplete,
    /// 101 with the right accept value; `consumed` bytes were the headers,
    /// anything after them is already WebSocket frames.
    Done { consumed: usize },
    /// Anything else: wrong status, missing or wrong accept value.
    Rejected,
}

/// Checks an upgrade response for status 101 and the accept value for `key`.
pub fn parse_upgrade(buf: &[u8], key: &[u8]) -> Upgrade {
    let end = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => p + 4,
        None => {
            if buf.len() > 8192 {
                return Upgrade::Rejected;
            }
            return Upgrade::Incomplete;
        }
    };
    let head = &buf[..end];
    if !(head.starts_with(b"HTTP/1.1 101") || head.starts_with(b"HTTP/1.0 101")) {
        return Upgrade::Rejected;
    }
    let expected = accept_for(key);
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let (name, value) = line.split_at(colon);
            if name.eq_ignore_ascii_case(b"sec-websocket-accept") {
                let value = value[1..].trim_ascii();
                if value == expected.as_slice() {
                    return Upgrade::Done { consumed: end };
                }
                return Upgrade::Rejected;
            }
        }
    }
    Upgrade::Rejected
}

/// Appends one complete (FIN) masked client frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A close frame payload: status code then reason.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// Header of one server frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// Bytes of header (including a mask key if the server masked).
    pub header_len: usize,
    pub payload_len: usize,
    /// Servers must not mask, but if one does we unmask rather than misparse.
    pub mask: Option<[u8; 4]>,
}

/// Result of trying to parse a frame header.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// Need more bytes for the header or the payload.
    Incomplete,
    Frame(FrameHead),
    /// Reserved bits, unknown opcode or absurd length.
    Invalid,
}

/// Parses the frame at the start of `buf`; `Frame` only when the whole
/// payload is present too.
pub fn parse_frame(buf: &[u8]) -> Parse {
    if buf.len() < 2 {
        return Parse::Incomplete;
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Parse::Invalid;
    }
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Parse::Invalid;
    }
    let masked = b1 & 0x80 != 0;
    let mut pos = 2;
    let len = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Parse::Incomplete;
            }
            pos = 4;
            u64::from(u16::from_be_bytes([buf[2], buf[3]]))
        }
        127 => {
            if buf.len() < 10 {
                return Parse::Incomplete;
            }
            pos = 10;
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > MAX_FRAME {
        return Parse::Invalid;
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Parse::Incomplete;
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < pos + len as usize {
        return Parse::Incomplete;
    }
    Parse::Frame(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode,
        header_len: pos,
        payload_len: len as usize,
        mask,
    })
}

/// Removes a (server) mask in place.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc_example() {
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_vec()
        );
        let key = key_for(*b"the sample nonce");
        assert_eq!(key, b"dGhlIHNhbXBsZSBub25jZQ==".to_vec());
    }

    #[test]
    fn upgrade_response() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        assert_eq!(
            parse_upgrade(ok, key),
            Upgrade::Done {
                consumed: ok.len() - 4
            }
        );
        assert_eq!(parse_upgrade(&ok[..20], key), Upgrade::Incomplete);
        let bad = b"HTTP/1.1 400 Bad Request\r\n\r\n";
        assert_eq!(parse_upgrade(bad, key), Upgrade::Rejected);
        let wrong = b"HTTP/1.1 101 OK\r\nsec-websocket-accept: xxx\r\n\r\n";
        assert_eq!(parse_upgrade(wrong, key), Upgrade::Rejected);
    }

    #[test]
    fn masked_frame_roundtrip() {
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
            let head = match parse_frame(&out) {
                Parse::Frame(h) => h,
                other => panic!("{other:?}"),
            };
            assert!(head.fin);
            assert_eq!(head.opcode, OP_TEXT);
            assert_eq!(head.payload_len, len);
            assert_eq!(head.mask, Some([1, 2, 3, 4]));
            let mut body = out[head.header_len..].to_vec();
            unmask(&mut body, [1, 2, 3, 4]);
            assert_eq!(body, payload);
            assert_eq!(parse_frame(&out[..out.len() - 1]), Parse::Incomplete);
        }
    }

    #[test]
    fn server_frames() {
        assert_eq!(
            parse_frame(b"\x81\x05hello"),
            Parse::Frame(FrameHead {
                fin: true,
                opcode: OP_TEXT,
                header_len: 2,
                payload_len: 5,
                mask: None
            })
        );
        assert!(matches!(parse_frame(b"\x89\x00"), Parse::Frame(_)));
        assert_eq!(parse_frame(b"\x81"), Parse::Incomplete);
        assert_eq!(parse_frame(b"\x81\x7e\x01"), Parse::Incomplete);
        assert_eq!(parse_frame(b"\xc1\x00"), Parse::Invalid);
        assert_eq!(parse_frame(b"\x83\x00"), Parse::Invalid);
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(parse_frame(&huge), Parse::Invalid);
    }
}
