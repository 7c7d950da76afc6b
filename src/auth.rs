//! What a connection's first message must be to log in.
//!
//! - By default, the uid itself, as in the example corepush comes from. That
//!   trusts the client: anyone can claim any uid, so it is for trusted
//!   networks only.
//! - With a login secret, a JWT signed with HS256 by the backend that knows
//!   the secret, whose `sub` is the uid and whose `exp` has not passed
//!   (no leeway). The token is checked by the `jsonwebtoken` crate.

use std::borrow::Cow;
use std::fmt;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::protocol::{self, UidError};

/// How logins are checked.
pub enum Login {
    /// The first message is the uid (trusted networks only).
    Uid,
    /// The first message is an HS256 JWT whose `sub` is the uid.
    Token(Box<TokenCheck>),
}

/// A login token's key and rules.
pub struct TokenCheck {
    key: DecodingKey,
    validation: Validation,
}

/// Why a login was refused. Its `Display` text is the reason of the 1008
/// close frame the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// The uid (given, or a token's `sub`) breaks the uid rules.
    Uid(UidError),
    /// The token is not a valid JWT for this server.
    Token(&'static str),
}

impl fmt::Display for LoginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoginError::Uid(e) => write!(f, "{e}"),
            LoginError::Token(why) => write!(f, "invalid login token: {why}"),
        }
    }
}

impl std::error::Error for LoginError {}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl Login {
    /// Token logins checked with `secret`; an empty secret is refused.
    pub fn token(secret: &[u8]) -> Result<Login, String> {
        let key = DecodingKey::from_secret(secret)
            .map_err(|_| "the login secret must not be empty".to_string())?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Login::Token(Box::new(TokenCheck { key, validation })))
    }

    /// The uid that `first`, a connection's first message, logs in as.
    pub fn check<'a>(&self, first: &'a [u8]) -> Result<Cow<'a, str>, LoginError> {
        match self {
            Login::Uid => protocol::validate_uid(first)
                .map(Cow::Borrowed)
                .map_err(LoginError::Uid),
            Login::Token(check) => {
                let token =
                    std::str::from_utf8(first).map_err(|_| LoginError::Token("not UTF-8"))?;
                let data = jsonwebtoken::decode::<Claims>(token, &check.key, &check.validation)
                    .map_err(|e| LoginError::Token(token_error(e.kind())))?;
                let uid = data.claims.sub;
                protocol::validate_uid(uid.as_bytes()).map_err(LoginError::Uid)?;
                Ok(Cow::Owned(uid))
            }
        }
    }
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Login::Uid => f.write_str("Uid"),
            Login::Token(_) => f.write_str("Token(HS256, secret not shown)"),
        }
    }
}

fn token_error(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "not signed with HS256",
        ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => "no exp claim",
        ErrorKind::MissingRequiredClaim(_) => "no sub claim",
        ErrorKind::ImmatureSignature => "not valid yet",
        _ => "malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    #[derive(Serialize)]
    struct Mint<'a> {
        sub: &'a str,
        exp: u64,
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(secret: &[u8], sub: &str, exp: u64) -> String {
        let key = EncodingKey::from_secret(secret).unwrap();
        encode(&Header::default(), &Mint { sub, exp }, &key).unwrap()
    }

    #[test]
    fn plain_uids_follow_the_uid_rules() {
        assert_eq!(Login::Uid.check(b"alice").unwrap(), "alice");
        assert_eq!(
            Login::Uid.check(b"all").unwrap_err().to_string(),
            "uid 'all' is reserved"
        );
    }

    #[test]
    fn tokens_must_be_signed_current_and_name_a_valid_uid() {
        let login = Login::token(b"s3cret").unwrap();
        assert!(Login::token(b"").is_err());
        let good = token(b"s3cret", "alice", now() + 60);
        assert_eq!(login.check(good.as_bytes()).unwrap(), "alice");

        let refused = |t: &str| login.check(t.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            refused(&token(b"s3cret", "alice", now() - 1)),
            "invalid login token: expired"
        );
        assert_eq!(
            refused(&token(b"other", "alice", now() + 60)),
            "invalid login token: bad signature"
        );
        assert_eq!(refused("alice"), "invalid login token: malformed");
        assert_eq!(
            refused(&token(b"s3cret", "a:b", now() + 60)),
            "uid contains ':'"
        );
        let no_exp = encode(
            &Header::default(),
            &serde_json::json!({ "sub": "alice" }),
            &EncodingKey::from_secret(b"s3cret").unwrap(),
        )
        .unwrap();
        assert_eq!(refused(&no_exp), "invalid login token: no exp claim");
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &Mint {
                sub: "alice",
                exp: now() + 60,
            },
            &EncodingKey::from_secret(b"s3cret").unwrap(),
        )
        .unwrap();
        assert_eq!(
            refused(&hs512),
            "invalid login token: not signed with HS256"
        );
    }
}
