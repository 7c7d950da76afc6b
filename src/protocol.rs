//! The corepush message protocol, above WebSocket framing.
//!
//! Two kinds of client message exist (see `docs/protocol.md`):
//! - the login: the first data message, which is the client's uid;
//! - a send: `<to>:<payload>`, split at the FIRST `:`, where `<to>` is a uid
//!   or the word `all`.
//!
//! This module only parses and validates; it never touches sockets or tables.

use std::fmt;

/// The longest uid accepted, in bytes.
pub const MAX_UID_BYTES: usize = 128;

/// The reserved recipient that means "every logged-in connection".
pub const ALL: &str = "all";

/// Why a uid was refused. Its `Display` text is sent to the client, either as
/// the reason of a 1008 close frame (login) or after `error: ` (send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UidError {
    /// No bytes.
    Empty,
    /// Over 128 bytes.
    TooLong,
    /// Not UTF-8.
    NotUtf8,
    /// Contains `:`, the separator.
    HasColon,
    /// Contains an ASCII control character.
    HasControl,
    /// The word `all`.
    Reserved,
}

impl fmt::Display for UidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            UidError::Empty => "uid is empty",
            UidError::TooLong => "uid is longer than 128 bytes",
            UidError::NotUtf8 => "uid is not valid UTF-8",
            UidError::HasColon => "uid contains ':'",
            UidError::HasControl => "uid contains a control character",
            UidError::Reserved => "uid 'all' is reserved",
        };
        f.write_str(text)
    }
}

impl std::error::Error for UidError {}

/// Checks a uid: 1 to 128 bytes of UTF-8, no `:`, no ASCII control
/// character, and not the word `all`.
pub fn validate_uid(bytes: &[u8]) -> Result<&str, UidError> {
    if bytes.is_empty() {
        return Err(UidError::Empty);
    }
    if bytes.len() > MAX_UID_BYTES {
        return Err(UidError::TooLong);
    }
    let uid = std::str::from_utf8(bytes).map_err(|_| UidError::NotUtf8)?;
    if bytes.contains(&b':') {
        return Err(UidError::HasColon);
    }
    if bytes.iter().any(|b| b.is_ascii_control()) {
        return Err(UidError::HasControl);
    }
    if uid == ALL {
        return Err(UidError::Reserved);
    }
    Ok(uid)
}

/// A parsed send: who gets `payload`.
#[derive(Debug, PartialEq, Eq)]
pub enum Send<'a> {
    /// Every connection logged in as `uid`.
    ToUid {
        /// The recipient uid.
        uid: &'a str,
        /// What follows the first `:`.
        payload: &'a [u8],
    },
    /// Every logged-in connection.
    ToAll {
        /// What follows `all:`.
        payload: &'a [u8],
    },
}

/// Why a send was refused. Sent back as `error: <Display>`; the connection
/// stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No `:` in the message.
    NoSeparator,
    /// Nothing before the `:`.
    EmptyRecipient,
    /// What is before the `:` breaks the uid rules.
    BadRecipient(UidError),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::NoSeparator => f.write_str("missing ':' (expected <uid>:<message>)"),
            SendError::EmptyRecipient => f.write_str("empty recipient before ':'"),
            SendError::BadRecipient(e) => write!(f, "invalid recipient: {e}"),
        }
    }
}

impl std::error::Error for SendError {}

/// Splits a message at its first `:` and validates the recipient.
pub fn parse_send(message: &[u8]) -> Result<Send<'_>, SendError> {
    let colon = memchr(b':', message).ok_or(SendError::NoSeparator)?;
    let (to, payload) = (&message[..colon], &message[colon + 1..]);
    if to.is_empty() {
        return Err(SendError::EmptyRecipient);
    }
    if to == ALL.as_bytes() {
        return Ok(Send::ToAll { payload });
    }
    let uid = validate_uid(to).map_err(SendError::BadRecipient)?;
    Ok(Send::ToUid { uid, payload })
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// What a logged-in client may send (`--client-sends`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSends {
    /// `<uid>:` and `all:`, as in the example corepush comes from.
    Any,
    /// `<uid>:` only: broadcasts come from the server side (the API).
    Targeted,
    /// Nothing: clients only receive; every push comes through the API.
    None,
}

impl ClientSends {
    /// The reply refusing `send`, or None when it is allowed.
    pub fn refuses(self, send: &Send<'_>) -> Option<String> {
        match (self, send) {
            (ClientSends::Any, _) | (ClientSends::Targeted, Send::ToUid { .. }) => None,
            (ClientSends::Targeted, Send::ToAll { .. }) => {
                Some("error: clients may not send to all on this server".into())
            }
            (ClientSends::None, _) => Some("error: clients may not send on this server".into()),
        }
    }
}

/// The reply to a successful login, as the seed example words it.
pub fn login_reply(uid: &str) -> String {
    format!("login success, your uid is {uid}")
}

/// The reply to a refused send.
pub fn error_reply(e: SendError) -> String {
    format!("error: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_rules() {
        assert_eq!(validate_uid(b"alice"), Ok("alice"));
        assert_eq!(validate_uid("Zoë 42".as_bytes()), Ok("Zoë 42"));
        assert_eq!(validate_uid(b""), Err(UidError::Empty));
        assert_eq!(validate_uid(b"all"), Err(UidError::Reserved));
        assert_eq!(validate_uid(b"ALL"), Ok("ALL"));
        assert_eq!(validate_uid(b"a:b"), Err(UidError::HasColon));
        assert_eq!(validate_uid(b"a\nb"), Err(UidError::HasControl));
        assert_eq!(validate_uid(b"a\x7fb"), Err(UidError::HasControl));
        assert_eq!(validate_uid(&[0xff, 0xfe]), Err(UidError::NotUtf8));
        assert_eq!(validate_uid(&[b'x'; 128]).map(str::len), Ok(128));
        assert_eq!(validate_uid(&[b'x'; 129]), Err(UidError::TooLong));
    }

    #[test]
    fn send_splits_at_first_colon() {
        assert_eq!(
            parse_send(b"bob:hi:there:"),
            Ok(Send::ToUid {
                uid: "bob",
                payload: b"hi:there:"
            })
        );
        assert_eq!(
            parse_send(b"bob:"),
            Ok(Send::ToUid {
                uid: "bob",
                payload: b""
            })
        );
        assert_eq!(parse_send(b"all:x"), Ok(Send::ToAll { payload: b"x" }));
        assert_eq!(parse_send(b"no separator"), Err(SendError::NoSeparator));
        assert_eq!(parse_send(b":x"), Err(SendError::EmptyRecipient));
        assert_eq!(
            parse_send(b"a\tb:x"),
            Err(SendError::BadRecipient(UidError::HasControl))
        );
    }

    #[test]
    fn what_clients_may_send() {
        let to_bob = Send::ToUid {
            uid: "bob",
            payload: b"x",
        };
        let to_all = Send::ToAll { payload: b"x" };
        assert_eq!(ClientSends::Any.refuses(&to_bob), None);
        assert_eq!(ClientSends::Any.refuses(&to_all), None);
        assert_eq!(ClientSends::Targeted.refuses(&to_bob), None);
        assert!(ClientSends::Targeted
            .refuses(&to_all)
            .unwrap()
            .starts_with("error: "));
        assert!(ClientSends::None
            .refuses(&to_bob)
            .unwrap()
            .starts_with("error: "));
        assert!(ClientSends::None.refuses(&to_all).is_some());
    }

    #[test]
    fn replies() {
        assert_eq!(login_reply("u1"), "login success, your uid is u1");
        assert_eq!(
            error_reply(SendError::NoSeparator),
            "error: missing ':' (expected <uid>:<message>)"
        );
    }
}
