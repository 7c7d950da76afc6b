//! The API's endpoints. Every answer is JSON (`/metrics` excepted); every
//! error is `{"error": "<why>"}` with its status.
//!
//! | request | answer |
//! |---|---|
//! | `POST /push/{uid}`, body = the message | `{"delivered": n}` |
//! | `POST /push`, `[{"uid": "..", "message": ".."}, ...]` | `{"delivered": [n1, n2, ...], "total": N}` |
//! | `POST /broadcast`, body = the message | `{"delivered": n}` |
//! | `GET /online/{uid}` | `{"uid": "..", "connections": n}` |
//! | `GET /stats` | `{"shards": S, "total": {..}, "per_shard": [{"shard": 0, ..}, ..]}` |
//! | `GET /metrics` | Prometheus text format |
//!
//! `delivered` counts the connections a message was written or queued to
//! (0 for a uid with no connection). A body is a text message unless its
//! `Content-Type` is `application/octet-stream`, which sends it as binary;
//! text must be UTF-8. A `{uid}` in a path is percent-decoded, then held to
//! the login rules (`protocol::validate_uid`).
//!
//! Checked in this order: the token (401), the path (404), the method (405
//! with `Allow`), the uid (400), the body's size (413, from
//! `Content-Length` before reading, or while reading), then its content
//! (400).

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::time::{timeout_at, Instant};

use crate::config::Config;
use crate::protocol;
use crate::push::{Kind, Pusher};

use super::metrics;

/// What every request handler shares.
pub struct App {
    pusher: Pusher,
    token: Option<Vec<u8>>,
    max_message_bytes: usize,
    max_batch_bytes: usize,
}

/// A refusal: its status and the reason sent as `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// For a batch, the index of the item refused.
    item: Option<usize>,
    /// For 405, the methods the path takes.
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            item: None,
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn at_item(mut self, index: usize) -> ApiError {
        self.item = Some(index);
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = ErrorBody {
            error: &self.message,
            item: self.item,
        };
        let mut response = json(self.status, &body);
        if let Some(allow) = self.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        // A body refused or cut off may still be arriving: close rather
        // than read the rest of it to reach the next request.
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        ) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"corepush\""),
            );
        }
        response
    }
}

/// `{"error": "...", "item": i}`, `item` only for a batch.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<usize>,
}

/// `{"delivered": n}`
#[derive(Serialize)]
struct Delivered {
    delivered: u64,
}

/// `{"delivered": [n1, n2, ...], "total": N}`
#[derive(Serialize)]
struct BatchDelivered {
    delivered: Vec<u64>,
    total: u64,
}

/// `{"uid": "...", "connections": n}`
#[derive(Serialize)]
struct Online<'a> {
    uid: &'a str,
    connections: u64,
}

/// The endpoints.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    /// `/push/{uid}`, the uid still percent-encoded.
    PushUid(&'a str),
    Batch,
    Broadcast,
    Online(&'a str),
    Stats,
    Metrics,
}

impl Route<'_> {
    fn parse(path: &str) -> Option<Route<'_>> {
        let one_segment = |rest: &str| !rest.contains('/');
        Some(match path {
            "/push" => Route::Batch,
            "/broadcast" => Route::Broadcast,
            "/stats" => Route::Stats,
            "/metrics" => Route::Metrics,
            _ => {
                if let Some(uid) = path.strip_prefix("/push/").filter(|r| one_segment(r)) {
                    Route::PushUid(uid)
                } else if let Some(uid) = path.strip_prefix("/online/").filter(|r| one_segment(r)) {
                    Route::Online(uid)
                } else {
                    return None;
                }
            }
        })
    }

    /// The one method the endpoint takes.
    fn method(&self) -> &'static str {
        match self {
            Route::PushUid(_) | Route::Batch | Route::Broadcast => "POST",
            Route::Online(_) | Route::Stats | Route::Metrics => "GET",
        }
    }
}

/// One item of a batch.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Item<'a> {
    #[serde(borrow)]
    uid: Cow<'a, str>,
    #[serde(borrow)]
    message: Cow<'a, str>,
}

impl App {
    /// The routes over `pusher`, with the API settings of `config`.
    pub fn new(config: &Config, pusher: Pusher) -> App {
        App {
            pusher,
            token: config.api_token.as_ref().map(|t| t.as_bytes().to_vec()),
            max_message_bytes: config.max_message_bytes,
            max_batch_bytes: config.api_max_batch_bytes,
        }
    }

    /// Answers one request, within `timeout` of its start (its body must
    /// be in by then, and the shards must have answered).
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        timeout: Duration,
    ) -> Response<Full<Bytes>> {
        let deadline = Instant::now() + timeout;
        self.route(request, deadline)
            .await
            .unwrap_or_else(ApiError::into_response)
    }

    async fn route(
        &self,
        request: Request<Incoming>,
        deadline: Instant,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        if !self.authorized(request.headers()) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API token (Authorization: Bearer <token>)",
            ));
        }
        let route = Route::parse(request.uri().path())
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no such endpoint"))?;
        let method = route.method();
        if request.method().as_str() != method {
            let mut error = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} takes {method} only", request.uri().path()),
            );
            error.allow = Some(method);
            return Err(error);
        }
        match route {
            Route::PushUid(encoded) => {
                let uid = uid_from_path(encoded)?;
                let (kind, message) = self.message(request, deadline).await?;
                let delivered = self.pusher.push(&uid, kind, &message);
                let delivered = answer(deadline, delivered).await?;
                Ok(json(StatusCode::OK, &Delivered { delivered }))
            }
            Route::Broadcast => {
                let (kind, message) = self.message(request, deadline).await?;
                let delivered = answer(deadline, self.pusher.broadcast(kind, &message)).await?;
                Ok(json(StatusCode::OK, &Delivered { delivered }))
            }
            Route::Batch => self.batch(request, deadline).await,
            Route::Online(encoded) => {
                let uid = uid_from_path(encoded)?;
                let connections = answer(deadline, self.pusher.online(&uid)).await?;
                Ok(json(
                    StatusCode::OK,
                    &Online {
                        uid: &uid,
                        connections,
                    },
                ))
            }
            Route::Stats => Ok(json_text(metrics::stats_json(&self.pusher.shard_stats()))),
            Route::Metrics => {
                let mut response = Response::new(Full::new(Bytes::from(metrics::prometheus(
                    &self.pusher.shard_stats(),
                ))));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(response)
            }
        }
    }

    /// Whether the request carries the token, when one is set. The token
    /// is compared in constant time (its length is not secret).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        const SCHEME: &[u8] = b"bearer ";
        if value.len() < SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return false;
        }
        value[SCHEME.len()..].ct_eq(token).into()
    }

    /// The body of a single push or a broadcast, and how it goes out.
    async fn message(
        &self,
        request: Request<Incoming>,
        deadline: Instant,
    ) -> Result<(Kind, Bytes), ApiError> {
        let kind = if is_octet_stream(request.headers()) {
            Kind::Binary
        } else {
            Kind::Text
        };
        let limit = self.max_message_bytes;
        let body = read_body(request, limit, deadline)
            .await
            .map_err(|e| e.too_large(format!("message is larger than {limit} bytes")))?;
        if kind == Kind::Text && std::str::from_utf8(&body).is_err() {
            return Err(ApiError::bad_request(
                "message is not valid UTF-8 (send binary with Content-Type: application/octet-stream)",
            ));
        }
        Ok((kind, body))
    }

    /// `POST /push`: every item is checked before any is pushed; then all
    /// are pushed, and only then are their counts awaited, so a batch costs
    /// one round trip through the shards.
    async fn batch(
        &self,
        request: Request<Incoming>,
        deadline: Instant,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let limit = self.max_batch_bytes;
        let body = read_body(request, limit, deadline)
            .await
            .map_err(|e| e.too_large(format!("batch is larger than {limit} bytes")))?;
        let items: Vec<Item> = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "malformed JSON ({e}); expected [{{\"uid\": \"...\", \"message\": \"...\"}}, ...]"
            ))
        })?;
        for (i, item) in items.iter().enumerate() {
            protocol::validate_uid(item.uid.as_bytes())
                .map_err(|e| ApiError::bad_request(e.to_string()).at_item(i))?;
            if item.message.len() > self.max_message_bytes {
                let why = format!("message is larger than {} bytes", self.max_message_bytes);
                return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, why).at_item(i));
            }
        }
        let deliveries: Vec<_> = items
            .iter()
            .map(|item| {
                self.pusher
                    .push(&item.uid, Kind::Text, item.message.as_bytes())
            })
            .collect();
        let mut delivered = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            delivered.push(answer(deadline, delivery).await?);
        }
        let total: u64 = delivered.iter().sum();
        Ok(json(StatusCode::OK, &BatchDelivered { delivered, total }))
    }
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Other(ApiError),
}

impl BodyError {
    fn too_large(self, why: String) -> ApiError {
        match self {
            BodyError::TooLarge => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, why),
            BodyError::Other(e) => e,
        }
    }
}

/// Reads a body of at most `limit` bytes by `deadline`. A `Content-Length`
/// over the limit is refused before reading; a body without one is cut
/// off as soon as it passes the limit.
async fn read_body(
    request: Request<Incoming>,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, BodyError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let body = Limited::new(request.into_body(), limit);
    match timeout_at(deadline, body.collect()).await {
        Err(_) => Err(BodyError::Other(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "the request body did not arrive in time",
        ))),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(BodyError::TooLarge),
        Ok(Err(e)) => Err(BodyError::Other(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        )))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The count a delivery reports, once the shards have answered; 503 if they
/// have not by `deadline` (only when a shard is stuck or stopping).
async fn answer(deadline: Instant, delivery: crate::push::Delivery) -> Result<u64, ApiError> {
    timeout_at(deadline, delivery).await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the shards did not answer in time",
        )
    })
}

/// A uid from a path segment: percent-decoded, then held to the login rules.
fn uid_from_path(encoded: &str) -> Result<String, ApiError> {
    let bytes = percent_decode(encoded)
        .ok_or_else(|| ApiError::bad_request("uid has an invalid percent-encoding"))?;
    protocol::validate_uid(&bytes).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(String::from_utf8(bytes).expect("validate_uid checked UTF-8"))
}

/// Decodes `%XX` escapes; `None` for a `%` not followed by two hex digits.
fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn is_octet_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .eq_ignore_ascii_case("application/octet-stream")
        })
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_string(body).expect("plain structs serialize");
    let mut response = json_text(text);
    *response.status_mut() = status;
    response
}

fn json_text(body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/push"), Some(Route::Batch));
        assert_eq!(Route::parse("/push/alice"), Some(Route::PushUid("alice")));
        assert_eq!(Route::parse("/push/"), Some(Route::PushUid("")));
        assert_eq!(Route::parse("/push/a/b"), None);
        assert_eq!(Route::parse("/online/a%2Fb"), Some(Route::Online("a%2Fb")));
        assert_eq!(Route::parse("/broadcast"), Some(Route::Broadcast));
        assert_eq!(Route::parse("/stats"), Some(Route::Stats));
        assert_eq!(Route::parse("/metrics"), Some(Route::Metrics));
        assert_eq!(Route::parse("/stats/"), None);
        assert_eq!(Route::parse("/"), None);
    }

    #[test]
    fn uids_from_paths() {
        assert_eq!(uid_from_path("alice").unwrap(), "alice");
        assert_eq!(uid_from_path("a%2Fb%20c").unwrap(), "a/b c");
        assert_eq!(uid_from_path("%E2%9C%93").unwrap(), "\u{2713}");
        for bad in [
            "",
            "all",
            "a%3Ab",
            "a%0A",
            "%zz",
            "%4",
            "%FF",
            &"x".repeat(129),
        ] {
            let error = uid_from_path(bad).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            uid_from_path("a%3Ab").unwrap_err().message,
            "uid contains ':'"
        );
    }

    #[test]
    fn octet_stream_is_binary() {
        let mut headers = HeaderMap::new();
        assert!(!is_octet_stream(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/Octet-Stream; x=1"),
        );
        assert!(is_octet_stream(&headers));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_octet_stream(&headers));
    }
}
