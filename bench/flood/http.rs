//! A small blocking HTTP/1.1 client for the server's push API: one
//! keep-alive connection, one request at a time (the next is written once
//! the previous answer is in, so requests on one connection are handled in
//! the order written). Hand-written on `std::net::TcpStream`; response
//! heads are parsed with `httparse`, bodies by `Content-Length` or chunked.
//! Nothing of the server's code is used.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The largest response head or body accepted (the API's answers are small;
/// `/stats` is a few KiB per shard).
const MAX_RESPONSE: usize = 16 << 20;

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server said `Connection: close`, or the body ran to EOF.
    pub close: bool,
}

/// One keep-alive connection to an HTTP server.
pub struct HttpConn {
    addr: SocketAddr,
    /// `Host` header value.
    host: String,
    /// `Authorization: Bearer <token>` line (with CRLF), or empty.
    auth: String,
    stream: Option<TcpStream>,
    /// Bytes read past the last response (none in practice: one request at
    /// a time), and the read buffer.
    buf: Vec<u8>,
    timeout: Duration,
}

impl HttpConn {
    /// A connection to `addr` (host:port), not opened until the first
    /// request; `token` adds `Authorization: Bearer <token>`.
    pub fn new(addr: &str, token: Option<&str>, timeout: Duration) -> io::Result<HttpConn> {
        let sock = addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot resolve {addr}"),
            )
        })?;
        Ok(HttpConn {
            addr: sock,
            host: addr.to_string(),
            auth: token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n")),
            stream: None,
            buf: Vec::with_capacity(4096),
            timeout,
        })
    }

    /// Opens the TCP connection now (otherwise the first request does).
    pub fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(s);
            self.buf.clear();
        }
        Ok(())
    }

    /// Closes the connection (the next request opens a new one).
    pub fn close(&mut self) {
        self.stream = None;
        self.buf.clear();
    }

    /// `POST path` with `body` of `content_type`; the answer.
    pub fn post(&mut self, path: &str, content_type: &str, body: &[u8]) -> io::Result<Response> {
        let mut req = Vec::with_capacity(160 + body.len());
        write!(
            req,
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            self.auth,
            body.len()
        )?;
        req.extend_from_slice(body);
        self.round_trip(&req)
    }

    /// `GET path`; with `close`, asks the server to close the connection
    /// after the answer (and closes it here too).
    pub fn get(&mut self, path: &str, close: bool) -> io::Result<Response> {
        let mut req = Vec::with_capacity(128);
        write!(
            req,
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{}",
            self.host, self.auth
        )?;
        if close {
            req.extend_from_slice(b"Connection: close\r\n");
        }
        req.extend_from_slice(b"\r\n");
        let r = self.round_trip(&req);
        if close {
            self.close();
        }
        r
    }

    /// Writes one request and reads its answer. A request is never retried:
    /// a push may have happened even when its answer was lost.
    fn round_trip(&mut self, req: &[u8]) -> io::Result<Response> {
        self.connect()?;
        let result = self.exchange(req);
        match &result {
            Ok(r) if !r.close => {}
            _ => self.close(),
        }
        result
    }

    fn exchange(&mut self, req: &[u8]) -> io::Result<Response> {
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(req)?;
        self.buf.clear();
        let mut chunk = [0u8; 8192];
        // The head.
        let (status, head_len, length, chunked, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let mut length = None;
                    let (mut chunked, mut close) = (false, false);
                    for h in resp.headers.iter() {
                        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = Some(v.parse::<usize>().map_err(|_| bad("content-length"))?);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = v.to_ascii_lowercase().contains("chunked");
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = v.eq_ignore_ascii_case("close");
                        }
                    }
                    break (resp.code.unwrap_or(0), n, length, chunked, close);
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > MAX_RESPONSE {
                        return Err(bad("response head too large"));
                    }
                    let n = read_some(stream, &mut chunk)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed before the answer",
                        ));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => return Err(bad(&format!("malformed response head: {e}"))),
            }
        };
        self.buf.drain(..head_len);
        // The body.
        let body = if chunked {
            loop {
                if let Some((body, used)) = dechunk(&self.buf)? {
                    self.buf.drain(..used);
                    break body;
                }
                let n = read_some(stream, &mut chunk)?;
                if n == 0 {
                    return Err(bad("connection closed inside a chunked body"));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(len) = length {
            if len > MAX_RESPONSE {
                return Err(bad("response body too large"));
            }
            while self.buf.len() < len {
                let n = read_some(stream, &mut chunk)?;
                if n == 0 {
                    return Err(bad("connection closed inside the body"));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            self.buf.drain(..len).collect()
        } else {
            // No length: the body runs to EOF.
            loop {
                let n = read_some(stream, &mut chunk)?;
                if n == 0 {
                    break std::mem::take(&mut self.buf);
                }
                self.buf.extend_from_slice(&chunk[..n]);
                if self.buf.len() > MAX_RESPONSE {
                    return Err(bad("response body too large"));
                }
            }
        };
        let close = close || (!chunked && length.is_none());
        Ok(Response {
            status,
            body,
            close,
        })
    }
}

fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// Decodes a complete chunked body at the start of `buf`: the body and the
/// bytes it used, or None if it is not complete yet.
fn dechunk(buf: &[u8]) -> io::Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[pos..pos + eol]).map_err(|_| bad("chunk size"))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("chunk size"))?;
        if size > MAX_RESPONSE {
            return Err(bad("chunk too large"));
        }
        pos += eol + 2;
        if size == 0 {
            // Trailers (none expected), then the final CRLF.
            loop {
                let Some(eol) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

/// Percent-encodes a uid for one path segment (everything but RFC 3986's
/// unreserved characters).
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-connection server that answers each request it reads (one
    /// `\r\n\r\n`-terminated head, plus Content-Length bytes) with the next
    /// of `answers`, and hands back what it read.
    fn serve(answers: Vec<&'static [u8]>) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let (mut seen, mut pending) = (Vec::new(), Vec::new());
            let mut buf = [0u8; 4096];
            for a in answers {
                // Read one request.
                loop {
                    if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&pending[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if pending.len() >= end + 4 + len {
                            seen.extend(pending.drain(..end + 4 + len));
                            break;
                        }
                    }
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0);
                    pending.extend_from_slice(&buf[..n]);
                }
                s.write_all(a).unwrap();
                seen.extend_from_slice(b"|");
            }
            seen
        });
        (addr, h)
    }

    #[test]
    fn keep_alive_requests_and_answers() {
        let (addr, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"delivered\":1}",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
        ]);
        let mut c = HttpConn::new(&addr, Some("sekrit"), Duration::from_secs(5)).unwrap();
        let r = c.post("/push/u1", "text/plain", b"hello").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), r.close),
            (200, &b"{\"delivered\":1}"[..], false)
        );
        let r = c.post("/push", "application/json", b"[]").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"a\":1}"[..]));
        let r = c.get("/stats", false).unwrap();
        assert_eq!((r.status, r.close), (401, true));
        let seen = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(
            seen.starts_with(&format!(
                "POST /push/u1 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer sekrit\r\n\
             Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello|POST /push HTTP/1.1\r\n"
            )),
            "{seen}"
        );
        assert!(
            seen.contains("\r\n\r\n[]|GET /stats HTTP/1.1\r\n"),
            "{seen}"
        );
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n0\r\n\r\nrest").unwrap(),
            Some((b"abc".to_vec(), 13))
        );
        assert_eq!(dechunk(b"3\r\nabc\r\n0\r\n").unwrap(), None);
        assert_eq!(dechunk(b"3\r\nab").unwrap(), None);
        assert!(dechunk(b"zz\r\n").is_err());
    }

    #[test]
    fn uids_in_paths() {
        assert_eq!(path_segment("u12"), "u12");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment("\u{2713}"), "%E2%9C%93");
    }
}
