//! Calibration, coordinator side: the bare listener that accepts the
//! workers' sockets, echoes their hello, relays their records to a random
//! socket and writes the fanout records in a plain loop. The two-thread
//! relay (`relay2.rs`) borrows its sockets.

use super::relay2::RSock;
use super::{HELLO, RECORD};
use crate::schedule::Rng;
use crate::sys::{self, Epoll, EV_IN};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

/// One accepted socket at the sink.
struct SSock {
    fd: i32,
    /// Hello bytes seen (the echo is sent at 16).
    hello: u8,
    /// Record bytes reassembled so far.
    have: u8,
    buf: [u8; RECORD],
}

/// Coordinator side: the bare listener that echoes, relays and fans out.
pub struct Sink {
    listen_fd: i32,
    pub addr: SocketAddrV4,
    ep: Epoll,
    socks: Vec<SSock>,
    /// Picks the relay destination.
    rng: Rng,
    /// Records relayed so far.
    pub relayed: u64,
    /// Writes that did not go through whole (would be a floor artefact).
    pub short_writes: u64,
}

const LISTEN_TOKEN: u64 = u64::MAX;

impl Sink {
    pub fn new() -> io::Result<Sink> {
        let (listen_fd, addr) = sys::listen_tcp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), 65535)?;
        let ep = Epoll::new(1024)?;
        ep.add(listen_fd, LISTEN_TOKEN, EV_IN)?;
        Ok(Sink {
            listen_fd,
            addr,
            ep,
            socks: Vec::new(),
            rng: Rng::new(0x5EED),
            relayed: 0,
            short_writes: 0,
        })
    }

    /// Handles whatever is ready within `timeout_ms`.
    pub fn poll(&mut self, timeout_ms: i32) {
        let n = self.ep.wait(timeout_ms);
        for i in 0..n {
            let (token, _events) = self.ep.event(i);
            if token == LISTEN_TOKEN {
                while let Ok(fd) = sys::accept_nb(self.listen_fd) {
                    let idx = self.socks.len() as u64;
                    if self.ep.add(fd, idx, EV_IN).is_err() {
                        sys::close(fd);
                        continue;
                    }
                    self.socks.push(SSock {
                        fd,
                        hello: 0,
                        have: 0,
                        buf: [0; RECORD],
                    });
                }
            } else {
                self.on_readable(token as usize);
            }
        }
    }

    fn on_readable(&mut self, idx: usize) {
        let mut buf = [0u8; 4096];
        let n = match sys::read(self.socks[idx].fd, &mut buf) {
            Ok(0) | Err(_) => {
                // Closed (end of calibration) or error: stop watching it.
                return;
            }
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            let s = &mut self.socks[idx];
            if (s.hello as usize) < HELLO {
                s.hello += 1;
                if s.hello as usize == HELLO
                    && sys::write(s.fd, b"calib-hello-echo").map_or(true, |w| w != HELLO)
                {
                    self.short_writes += 1;
                }
                continue;
            }
            s.buf[s.have as usize] = b;
            s.have += 1;
            if (s.have as usize) < RECORD {
                continue;
            }
            s.have = 0;
            let rec = s.buf;
            let dest = self.rng.below(self.socks.len() as u64) as usize;
            if sys::write(self.socks[dest].fd, &rec).map_or(true, |w| w != RECORD) {
                self.short_writes += 1;
            }
            self.relayed += 1;
        }
    }

    /// The bare send loop: one 40-byte record to every accepted socket.
    /// Returns (start, end) of the loop in monotonic ns.
    pub fn fanout(&mut self, round: u32) -> (u64, u64) {
        let mut rec = [0u8; RECORD];
        rec[0] = b'F';
        rec[4..8].copy_from_slice(&round.to_le_bytes());
        let t0 = sys::now_ns();
        for s in &self.socks {
            if sys::write(s.fd, &rec).map_or(true, |w| w != RECORD) {
                self.short_writes += 1;
            }
        }
        (t0, sys::now_ns())
    }

    /// The accepted sockets, in accept order, with any partial record,
    /// for the two-thread relay (which borrows the descriptors: they stay
    /// the sink's). The sink must not be polled while that relay runs.
    pub fn relay_socks(&self) -> Vec<RSock> {
        self.socks
            .iter()
            .map(|s| RSock {
                fd: s.fd,
                have: s.have,
                buf: s.buf,
            })
            .collect()
    }

    pub fn accepted(&self) -> usize {
        self.socks.len()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        for s in &self.socks {
            sys::close(s.fd);
        }
        sys::close(self.listen_fd);
    }
}
