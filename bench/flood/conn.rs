//! Per-connection state. Kept small (about 90 bytes plus buffers that are
//! empty, and so unallocated, almost all the time): tens of thousands of
//! these live in one worker.

use crate::sys;
use std::io;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not started yet (connect phase has not reached it).
    Idle,
    /// TCP connect in flight.
    Connecting,
    /// Upgrade request sent, waiting for the 101 response.
    Upgrading,
    /// uid sent, waiting for `login success, ...`.
    LoggingIn,
    /// Logged in: sends and receives traffic.
    Ready,
    /// We sent a close frame and wait for the server's close frame.
    Closing,
    /// Closed cleanly (or on purpose); no fd.
    Closed,
    /// Failed to connect/upgrade/log in, or dropped by the server; no fd.
    Failed,
}

/// One client connection to the server under test.
pub struct Conn {
    /// The socket, or -1 when there is none.
    pub fd: i32,
    pub state: State,
    /// Start of the current connect attempt (monotonic ns): the connect
    /// latency is measured from here, timeouts too, and the WebSocket key is
    /// derived from it so the key need not be stored.
    pub started_ns: u64,
    /// Bytes received that do not yet form a complete frame (or the HTTP
    /// response). Empty, so unallocated, almost always.
    pub inbuf: Vec<u8>,
    /// Bytes the kernel did not accept yet; flushed on EPOLLOUT. Empty almost
    /// always.
    pub outbuf: Vec<u8>,
    /// Payload of a fragmented message being reassembled (rare).
    pub frag: Vec<u8>,
    /// Set while a churned connection is closing to reconnect: when it is
    /// closed it connects again instead of staying closed.
    pub reconnect: bool,
    /// This attempt is a churn reconnect, so its login counts for the churn
    /// phase and not for the connect phase.
    pub is_reconnect: bool,
    /// Opcode of the fragmented message in `frag` (text or binary).
    pub frag_opcode: u8,
}

impl Conn {
    pub fn new() -> Conn {
        Conn {
            fd: -1,
            state: State::Idle,
            started_ns: 0,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            frag: Vec::new(),
            reconnect: false,
            is_reconnect: false,
            frag_opcode: 0,
        }
    }

    /// Writes `data`, keeping whatever the kernel does not take in `outbuf`
    /// (to be flushed on EPOLLOUT). Keeps order with earlier unsent bytes.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if !self.outbuf.is_empty() {
            self.outbuf.extend_from_slice(data);
            return self.flush();
        }
        let mut done = 0;
        while done < data.len() {
            match sys::write(self.fd, &data[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if done < data.len() {
            self.outbuf.extend_from_slice(&data[done..]);
        }
        Ok(())
    }

    /// Writes as much of `outbuf` as the kernel takes.
    pub fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.outbuf.len() {
            match sys::write(self.fd, &self.outbuf[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.outbuf.drain(..done);
        if self.outbuf.is_empty() {
            // Give the memory back: a burst must not pin a buffer forever.
            self.outbuf = Vec::new();
        }
        Ok(())
    }

    /// Closes the socket (if any) and drops buffers.
    pub fn close_socket(&mut self) {
        sys::close(self.fd);
        self.fd = -1;
        self.inbuf = Vec::new();
        self.outbuf = Vec::new();
        self.frag = Vec::new();
    }
}

impl Default for Conn {
    fn default() -> Self {
        Conn::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_state_stays_small() {
        // Tens of thousands live in one worker: keep the fixed part small.
        assert!(
            std::mem::size_of::<Conn>() <= 112,
            "{}",
            std::mem::size_of::<Conn>()
        );
    }
}
