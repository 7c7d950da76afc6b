//! A connection's way out: frames are written straight to the socket while
//! it has room; only what a full socket refuses is kept, as shared
//! references to the frames (a broadcast's bytes are never copied per
//! recipient), until the socket drains.
//!
//! An `Outbox` is one pointer: `None` whenever the socket keeps up, which is
//! almost always, so an idle connection holds no queue.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use crate::session::frame::Frame;

/// What happened to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// Written to the socket, or queued within the limit.
    Ok,
    /// The queue went over the limit: the reader is too slow.
    OverLimit,
    /// The socket is broken (the peer is gone).
    Failed,
}

/// The frames a full socket has not taken yet.
#[derive(Debug, Default)]
pub struct Outbox {
    backlog: Option<Box<Backlog>>,
}

/// Frames waiting for a full socket to drain.
#[derive(Debug)]
pub struct Backlog {
    /// The frames, shared with every other recipient; the first may be
    /// partly written.
    frames: VecDeque<Frame>,
    /// Bytes of `frames[0]` already written.
    offset: u32,
    /// Bytes still to write, checked against the slow-consumer limit.
    bytes: u32,
}

impl Outbox {
    /// Writes `frame` now if nothing is queued and the socket takes it, else
    /// queues it. `limit` is the most that may wait in the queue.
    pub fn write(&mut self, fd: RawFd, frame: &Frame, limit: usize) -> Wrote {
        let len = frame.len() as u32;
        match &mut self.backlog {
            Some(backlog) => {
                backlog.frames.push_back(frame.clone());
                backlog.bytes = backlog.bytes.saturating_add(len);
            }
            None => {
                let written = match send_now(fd, frame) {
                    Ok(n) if n == frame.len() => return Wrote::Ok,
                    Ok(n) => n as u32,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(_) => return Wrote::Failed,
                };
                self.backlog = Some(Box::new(Backlog {
                    frames: VecDeque::from([frame.clone()]),
                    offset: written,
                    bytes: len - written,
                }));
            }
        }
        if self.queued_bytes() > limit {
            Wrote::OverLimit
        } else {
            Wrote::Ok
        }
    }

    /// Writes queued frames until the queue is empty (`Ok(true)`) or the
    /// socket is full again (`Ok(false)`). Err: the socket is broken.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<bool> {
        while let Some(backlog) = &mut self.backlog {
            let head = &backlog.frames[0][backlog.offset as usize..];
            let (n, whole) = match send_now(fd, head) {
                Ok(n) => (n, n == head.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.advance(n);
            if !whole {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Records that `n` more bytes of the head frame went out.
    fn advance(&mut self, n: usize) {
        let Some(backlog) = &mut self.backlog else {
            return;
        };
        backlog.bytes -= n as u32;
        backlog.offset += n as u32;
        if backlog.offset as usize == backlog.frames[0].len() {
            backlog.frames.pop_front();
            backlog.offset = 0;
            if backlog.frames.is_empty() {
                self.backlog = None; // give the memory back
            }
        }
    }

    /// Drops every queued frame except one already partly written (cutting
    /// it would corrupt the stream), so a close frame can follow at once.
    pub fn discard(&mut self) {
        if let Some(backlog) = &mut self.backlog {
            if backlog.offset == 0 {
                self.backlog = None;
            } else {
                backlog.frames.truncate(1);
                backlog.bytes = backlog.frames[0].len() as u32 - backlog.offset;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.backlog.is_none()
    }

    pub fn queued_bytes(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.bytes as usize)
    }
}

/// One non-blocking send; never raises SIGPIPE.
fn send_now(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is a valid slice for the duration of the call; a bad
    // or closed descriptor only makes send fail.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::frame::{self, Opcode};
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A socket pair whose reading end nobody reads until the test does.
    fn pair() -> (UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (ours, theirs)
    }

    #[test]
    fn writes_go_straight_out_until_the_socket_is_full() {
        let (ours, mut theirs) = pair();
        let mut out = Outbox::default();
        let frame = frame::encode(Opcode::Text, b"hello");
        assert_eq!(out.write(ours.as_raw_fd(), &frame, 1 << 20), Wrote::Ok);
        assert!(out.is_empty(), "nothing queued while the socket keeps up");
        let mut got = [0u8; 7];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &frame[..]);
    }

    #[test]
    fn a_full_socket_queues_shared_frames_then_trips_the_limit() {
        let (ours, mut theirs) = pair();
        let fd = ours.as_raw_fd();
        let mut out = Outbox::default();
        // A frame whose size is not a divisor of the socket buffer, so the
        // first refused write is a partial one.
        let big: Frame = frame::encode(Opcode::Binary, &[7u8; 4093]);
        while out.is_empty() {
            assert_eq!(out.write(fd, &big, 1 << 20), Wrote::Ok);
        }
        let queued = out.queued_bytes();
        assert!(queued > 0 && queued <= big.len(), "{queued}");
        assert_eq!(out.write(fd, &big, 1 << 20), Wrote::Ok);
        assert_eq!(out.queued_bytes(), queued + big.len());
        assert_eq!(
            std::sync::Arc::strong_count(&big),
            3,
            "queued frames are shared, not copied"
        );
        assert_eq!(out.write(fd, &big, queued + big.len()), Wrote::OverLimit);

        // The reader catches up: the rest goes out and the queue is freed.
        let mut sink = vec![0u8; 1 << 16];
        theirs.set_nonblocking(true).unwrap();
        while !out.flush(fd).unwrap() {
            let _ = theirs.read(&mut sink);
        }
        assert!(out.is_empty());
        assert_eq!(out.queued_bytes(), 0);
    }

    #[test]
    fn a_discard_keeps_only_a_partly_written_head_frame() {
        let frame = |n: usize| frame::encode(Opcode::Binary, &vec![0u8; n]);
        let backlog = |offset: u32| Outbox {
            backlog: Some(Box::new(Backlog {
                frames: VecDeque::from([frame(100), frame(50), frame(70)]),
                offset,
                bytes: 102 + 52 + 72 - offset,
            })),
        };
        // Nothing of the head is out yet: everything can go.
        let mut out = backlog(0);
        out.discard();
        assert!(out.is_empty());
        // 30 bytes of the head are out: its other 72 must follow, alone.
        let mut out = backlog(30);
        out.discard();
        assert_eq!(out.queued_bytes(), 72);
        assert_eq!(out.backlog.as_ref().unwrap().frames.len(), 1);
        assert_eq!(out.backlog.as_ref().unwrap().frames[0].len(), 102);
    }

    #[test]
    fn a_broken_socket_fails_the_write() {
        let (ours, theirs) = pair();
        drop(theirs);
        let mut out = Outbox::default();
        let frame = frame::encode(Opcode::Text, b"x");
        assert_eq!(out.write(ours.as_raw_fd(), &frame, 1 << 20), Wrote::Failed);
    }
}
