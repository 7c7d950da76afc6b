//! WebSocket framing (RFC 6455 section 5), the layer below the protocol.
//!
//! Client frames are parsed in place from whatever buffer holds them (the
//! shard's read scratch, or a connection's partial-frame buffer); tungstenite's
//! `FrameHeader` does the header arithmetic and this module adds the rules a
//! server must enforce (masking, reserved bits, control-frame limits, size).
//!
//! Server frames are encoded once into a [`Frame`]: an `Arc<[u8]>` holding the
//! whole wire form (header and payload). Server frames are not masked, so the
//! same bytes are valid for every recipient: a broadcast shares one `Frame`
//! between all connections and shards and copies no payload per recipient.

use std::io::Cursor;
use std::sync::Arc;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// One encoded server-to-client frame, shared by every recipient.
pub type Frame = Arc<[u8]>;

/// Frame types a server must tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// A later piece of a fragmented message.
    Continuation,
    /// A UTF-8 text message (or its first piece).
    Text,
    /// A binary message (or its first piece).
    Binary,
    /// The close handshake.
    Close,
    /// A ping, answered with a pong.
    Ping,
    /// A pong.
    Pong,
}

impl Opcode {
    /// Close, Ping and Pong: at most 125 bytes, never fragmented.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }

    fn to_tungstenite(self) -> OpCode {
        match self {
            Opcode::Continuation => OpCode::Data(Data::Continue),
            Opcode::Text => OpCode::Data(Data::Text),
            Opcode::Binary => OpCode::Data(Data::Binary),
            Opcode::Close => OpCode::Control(Control::Close),
            Opcode::Ping => OpCode::Control(Control::Ping),
            Opcode::Pong => OpCode::Control(Control::Pong),
        }
    }
}

/// A parsed client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame ends its message.
    pub fin: bool,
    /// What the frame carries.
    pub opcode: Opcode,
    /// Client frames are always masked; the key unmasks the payload.
    pub mask: [u8; 4],
    /// Bytes of header before the payload.
    pub header_len: usize,
    /// Payload bytes after the header.
    pub payload_len: usize,
}

impl Header {
    /// Header and payload together.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Why a client frame is refused; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// RFC 6455 violation: close code 1002 with this reason.
    Protocol(&'static str),
    /// Payload over the configured limit: close code 1009.
    TooBig,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Protocol(reason) => f.write_str(reason),
            FrameError::TooBig => f.write_str("message too big"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Close codes corepush sends.
pub mod close_code {
    /// The server is going away, or the client was idle too long.
    pub const GOING_AWAY: u16 = 1001;
    /// A violation of RFC 6455.
    pub const PROTOCOL: u16 = 1002;
    /// Text that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Against the server's rules (bad login, slow consumer, rate).
    pub const POLICY: u16 = 1008;
    /// A message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server is busy: try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Parses the header of the frame at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole header. A data
/// frame whose payload is over `max_payload` is refused from its header alone,
/// before any of the payload is read.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    let mut cursor = Cursor::new(buf);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(_) => return Err(FrameError::Protocol("reserved opcode")),
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let mask = header
        .mask
        .ok_or(FrameError::Protocol("client frame not masked"))?;
    let opcode = match header.opcode {
        OpCode::Data(Data::Continue) => Opcode::Continuation,
        OpCode::Data(Data::Text) => Opcode::Text,
        OpCode::Data(Data::Binary) => Opcode::Binary,
        OpCode::Control(Control::Close) => Opcode::Close,
        OpCode::Control(Control::Ping) => Opcode::Ping,
        OpCode::Control(Control::Pong) => Opcode::Pong,
        _ => return Err(FrameError::Protocol("reserved opcode")),
    };
    if opcode.is_control() {
        if !header.is_final {
            return Err(FrameError::Protocol("fragmented control frame"));
        }
        if len > 125 {
            return Err(FrameError::Protocol("control frame over 125 bytes"));
        }
    } else if len > max_payload as u64 {
        return Err(FrameError::TooBig);
    }
    Ok(Some(Header {
        fin: header.is_final,
        opcode,
        mask,
        header_len: cursor.position() as usize,
        payload_len: len as usize,
    }))
}

/// Unmasks a client payload in place.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap()) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Encodes one unfragmented, unmasked server frame.
pub fn encode(opcode: Opcode, payload: &[u8]) -> Frame {
    encode_parts(opcode, &[payload])
}

/// Encodes a close frame with a status code and a UTF-8 reason (at most 123
/// bytes, cut at a character boundary if longer).
pub fn encode_close(code: u16, reason: &str) -> Frame {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    encode_parts(
        Opcode::Close,
        &[&code.to_be_bytes(), &reason.as_bytes()[..end]],
    )
}

/// Encodes a frame whose payload is the concatenation of `parts`, in one
/// allocation of exactly the wire size, written once.
fn encode_parts(opcode: Opcode, parts: &[&[u8]]) -> Frame {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = FrameHeader {
        is_final: true,
        opcode: opcode.to_tungstenite(),
        ..FrameHeader::default()
    };
    let mut head = [0u8; 10];
    let head_len = header.len(len as u64);
    header
        .format(len as u64, &mut &mut head[..])
        .expect("a header fits in 10 bytes");
    let mut frame = Arc::<[u8]>::new_uninit_slice(head_len + len);
    let slots = Arc::get_mut(&mut frame).expect("a new Arc has one owner");
    let mut at = 0;
    for part in std::iter::once(&head[..head_len]).chain(parts.iter().copied()) {
        slots[at..at + part.len()].write_copy_of_slice(part);
        at += part.len();
    }
    debug_assert_eq!(at, slots.len());
    // SAFETY: the loop above wrote every byte: the header and the parts
    // together are exactly `head_len + len` bytes, the slice's length.
    unsafe { frame.assume_init() }
}

/// What a client's close frame said, once validated.
#[derive(Debug, PartialEq, Eq)]
pub enum ClosePayload {
    /// No status code: answer with an empty close frame.
    Empty,
    /// A valid status code, echoed in the answer.
    Code(u16),
}

/// Validates the payload of a client's close frame (RFC 6455 5.5.1, 7.4).
pub fn parse_close(payload: &[u8]) -> Result<ClosePayload, (u16, &'static str)> {
    match payload.len() {
        0 => return Ok(ClosePayload::Empty),
        1 => return Err((close_code::PROTOCOL, "close payload of one byte")),
        _ => {}
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    if !valid {
        return Err((close_code::PROTOCOL, "invalid close code"));
    }
    if std::str::from_utf8(&payload[2..]).is_err() {
        return Err((close_code::INVALID_DATA, "close reason is not UTF-8"));
    }
    Ok(ClosePayload::Code(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn parses_and_unmasks_text() {
        let wire = masked(0x81, b"hello world, masked", [1, 2, 3, 4]);
        let h = parse_header(&wire, 1024).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.header_len), (true, Opcode::Text, 6));
        let mut payload = wire[h.header_len..h.frame_len()].to_vec();
        unmask(&mut payload, h.mask);
        assert_eq!(payload, b"hello world, masked");
    }

    #[test]
    fn incomplete_header_waits() {
        let wire = masked(0x82, &[7u8; 300], [9, 9, 9, 9]);
        for cut in 0..8 {
            assert_eq!(parse_header(&wire[..cut], 1024), Ok(None), "cut {cut}");
        }
        let h = parse_header(&wire, 1024).unwrap().unwrap();
        assert_eq!((h.header_len, h.payload_len), (8, 300));
    }

    #[test]
    fn refuses_what_a_server_must_refuse() {
        let m = [1, 2, 3, 4];
        assert_eq!(
            parse_header(&[0x81, 0x00], 10),
            Err(FrameError::Protocol("client frame not masked"))
        );
        assert_eq!(
            parse_header(&masked(0xC1, b"x", m), 10),
            Err(FrameError::Protocol("reserved bits set"))
        );
        assert_eq!(
            parse_header(&masked(0x83, b"x", m), 10),
            Err(FrameError::Protocol("reserved opcode"))
        );
        assert_eq!(
            parse_header(&masked(0x09, b"x", m), 10),
            Err(FrameError::Protocol("fragmented control frame"))
        );
        assert_eq!(
            parse_header(&masked(0x89, &[0; 126], m), 1000),
            Err(FrameError::Protocol("control frame over 125 bytes"))
        );
        assert_eq!(
            parse_header(&masked(0x82, &[0; 11], m), 10),
            Err(FrameError::TooBig)
        );
    }

    #[test]
    fn encodes_every_length_form() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'a'; len];
            let frame = encode(Opcode::Binary, &payload);
            assert_eq!(frame[0], 0x82);
            let head = match len {
                0..=125 => 2,
                126..=65535 => 4,
                _ => 10,
            };
            assert_eq!(frame.len(), head + len);
            assert_eq!(&frame[head..], &payload[..]);
        }
    }

    #[test]
    fn close_frames() {
        let f = encode_close(1008, "slow consumer");
        assert_eq!(&f[..4], &[0x88, 15, 0x03, 0xF0]);
        assert_eq!(&f[4..], b"slow consumer");
        let long = "é".repeat(100);
        assert_eq!(encode_close(1000, &long).len(), 2 + 2 + 122);
        assert_eq!(parse_close(b""), Ok(ClosePayload::Empty));
        assert_eq!(parse_close(&[3, 232]), Ok(ClosePayload::Code(1000)));
        assert!(parse_close(&[3]).is_err());
        assert!(parse_close(&[3, 236]).is_err()); // 1004
        assert!(parse_close(&[3, 232, 0xff]).is_err());
    }
}
