//! The HTTP push API: how other systems (a backend, a cron job, a
//! monitoring scraper) push to users and read the counters.
//!
//! It is HTTP/1.1 served by hyper on a tokio current-thread runtime, on a
//! thread of its own: never inside a shard's loop. It reaches the shards
//! only through a [`Pusher`], so nothing a caller sends can stall a shard;
//! what a caller can hold on the API thread is bounded here:
//!
//! - connections: at most `api_max_connections` open at once; one more is
//!   answered 503 and closed;
//! - time: a request's head must arrive within `api_timeout` (also the
//!   longest a kept-alive connection may sit idle), the whole request must
//!   be read and answered within `api_timeout` of its start, and a response
//!   write may not stall longer than `api_timeout` (a client that does not
//!   read);
//! - size: a body is read only up to its limit (`max_message_bytes` for one
//!   message, `api_max_batch_bytes` for a batch) and answered 413 past it,
//!   before reading more; request heads are held to 16 KiB (431 above).
//!
//! The endpoints and their answers are in [`routes`]; `/stats` and
//! `/metrics` are rendered by [`metrics`].

mod guard;
pub mod metrics;
pub mod routes;

use std::convert::Infallible;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use crate::config::Config;
use crate::push::Pusher;

use guard::StallGuard;
use routes::App;

/// The most a stop waits for requests in flight before it drops them (or
/// `api_timeout`, if shorter: no request may take longer).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The largest request head (request line and headers); 431 above.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The most a connection buffers from its socket.
const MAX_BUF_BYTES: usize = 64 * 1024;

/// How often, at most, a refused connection (over the limit) is logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);

/// The answer to a connection over `api_max_connections`, written straight
/// to its socket.
fn busy_response() -> Vec<u8> {
    let body = r#"{"error":"too many API connections, try again"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A running API: its address, and the way to stop it.
pub struct ApiHandle {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ApiHandle {
    /// The address the API listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets the requests in flight finish (for at most
    /// 5 s or `api_timeout`, then they are dropped), and waits until the
    /// API thread has ended. Any thread may call it, any number of times.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                warn!("the api thread panicked");
            }
        }
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Checks the API settings without binding anything: an address is set,
/// the token is not empty, and an address that is not loopback has a token
/// (or `api_insecure`).
pub fn check(config: &Config) -> io::Result<SocketAddr> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let addr = config
        .api_listen
        .ok_or_else(|| invalid("the HTTP API is off (no api address)".into()))?;
    match &config.api_token {
        Some(token) if token.is_empty() => Err(invalid("the API token must not be empty".into())),
        None if !addr.ip().is_loopback() && !config.api_insecure => Err(invalid(format!(
            "refusing to serve the HTTP API on {addr} without a token: anyone who reaches it \
             could push to every user. Set --api-token (or COREPUSH_API_TOKEN), listen on a \
             loopback address (--api-listen 127.0.0.1:1235), or pass --api-insecure"
        ))),
        _ => Ok(addr),
    }
}

/// Binds the API's address and starts its thread, which serves until
/// [`ApiHandle::shutdown`] (or the handle is dropped). Call it after the
/// shards have started, with their [`Pusher`].
pub fn start(config: &Config, pusher: Pusher) -> io::Result<ApiHandle> {
    let addr = check(config)?;
    let listener = StdListener::bind(addr).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => io::Error::new(
            e.kind(),
            format!("the API address {addr} is already in use (another corepush? pick one with --api-listen)"),
        ),
        _ => io::Error::new(e.kind(), format!("cannot listen on {addr} for the API: {e}")),
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let app = Arc::new(App::new(config, pusher));
    let limits = Limits {
        connections: config.api_max_connections.max(1),
        timeout: config.api_timeout,
    };
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("corepush-api".into())
        .spawn(move || runtime.block_on(serve(listener, app, limits, stopped)))?;
    Ok(ApiHandle {
        addr,
        stop,
        thread: Mutex::new(Some(thread)),
    })
}

#[derive(Clone, Copy)]
struct Limits {
    connections: usize,
    timeout: Duration,
}

/// The accept loop, until `stop` turns true; then a bounded graceful drain.
async fn serve(
    listener: StdListener,
    app: Arc<App>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            warn!("api: cannot register the listener: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(limits.connections));
    let busy = busy_response();
    let graceful = GracefulShutdown::new();
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        let stream = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: pause rather than spin.
                    warn!("api: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let _ = stream.try_write(&busy);
            if last_refusal_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                warn!(
                    "api: {} connections open, refusing more with 503",
                    limits.connections
                );
                last_refusal_log = Some(Instant::now());
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.handle(request, limits.timeout).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_BUF_BYTES)
            .serve_connection(
                TokioIo::new(StallGuard::new(stream, limits.timeout)),
                service,
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!("api connection: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    let open = graceful.count();
    let grace = SHUTDOWN_GRACE.min(limits.timeout);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("api: requests still running after {grace:?} of shutdown, dropping them");
    } else if open > 0 {
        debug!("api: {open} connections closed at shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_answer_is_well_formed() {
        let busy = busy_response();
        let text = std::str::from_utf8(&busy).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["error"].is_string());
    }
}
