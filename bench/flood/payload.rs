//! The flood's own message bodies, inside the protocol's `<to>:<payload>`
//! and `all:<payload>`:
//!
//! * targeted: `t<id> s<sender> <ts>`
//! * broadcast: `b<id> s<sender> <ts>`
//!
//! `id` is the message's index in the schedule (or the broadcast number),
//! `sender` the sending connection's global index and `ts` the send time
//! (CLOCK_MONOTONIC ns, shared by all processes, so latency works across
//! them).

/// Tag of a targeted payload.
pub const TARGETED: u8 = b't';
/// Tag of a broadcast payload.
pub const BROADCAST: u8 = b'b';

/// A parsed payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    pub id: u64,
    pub sender: u64,
    pub ts: u64,
}

/// The frame text that sends targeted message `id` from connection `sender`
/// to uid `<prefix><recipient>` at time `ts`.
pub fn targeted(prefix: &str, recipient: u32, id: u64, sender: u32, ts: u64) -> String {
    format!("{prefix}{recipient}:t{id} s{sender} {ts}")
}

/// The frame text that broadcasts number `id` from connection `sender`.
pub fn broadcast(id: u32, sender: u32, ts: u64) -> String {
    format!("all:b{id} s{sender} {ts}")
}

/// Parses a decimal number at the start of `b`; returns it and the rest.
fn parse_num(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in &b[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((n, &b[digits..]))
}

/// Parses `<tag><id> s<sender> <ts>` as it arrives (without the `to:`).
pub fn parse(p: &[u8], tag: u8) -> Option<Payload> {
    let p = p.strip_prefix(&[tag])?;
    let (id, p) = parse_num(p)?;
    let p = p.strip_prefix(b" s")?;
    let (sender, p) = parse_num(p)?;
    let p = p.strip_prefix(b" ")?;
    let (ts, p) = parse_num(p)?;
    if !p.is_empty() {
        return None;
    }
    Some(Payload { id, sender, ts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_parsing() {
        let p = |id, sender, ts| Some(Payload { id, sender, ts });
        assert_eq!(parse(b"t12 s7 123456", TARGETED), p(12, 7, 123456));
        assert_eq!(parse(b"b3 s0 99", BROADCAST), p(3, 0, 99));
        assert_eq!(parse(b"t12 s7 123456x", TARGETED), None);
        assert_eq!(parse(b"t12 s7", TARGETED), None);
        assert_eq!(parse(b"b1 s1 1", TARGETED), None);
        assert_eq!(parse(b"t s1 1", TARGETED), None);
    }

    #[test]
    fn what_is_sent_parses_back() {
        let text = targeted("u", 42, 7, 3, 99);
        assert_eq!(text, "u42:t7 s3 99");
        let body = text.split_once(':').unwrap().1;
        assert_eq!(
            parse(body.as_bytes(), TARGETED),
            Some(Payload {
                id: 7,
                sender: 3,
                ts: 99
            })
        );
        let text = broadcast(2, 5, 1);
        assert_eq!(text, "all:b2 s5 1");
        let body = text.split_once(':').unwrap().1;
        assert_eq!(
            parse(body.as_bytes(), BROADCAST),
            Some(Payload {
                id: 2,
                sender: 5,
                ts: 1
            })
        );
    }
}
