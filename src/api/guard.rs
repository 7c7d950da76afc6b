//! A socket whose writes may not stall: hyper has timeouts for reading a
//! request's head, none for writing a response to a client that does not
//! read. [`StallGuard`] fails a write that has made no progress for its
//! limit, which ends the connection and frees its slot.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    /// Running while a write waits for room; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, limit: Duration) -> StallGuard<S> {
        StallGuard {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes a write's outcome on; a write still pending past the limit
    /// fails with `TimedOut`.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading the response",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A runtime whose clock jumps to the next timer whenever every task
    /// waits: the tests do not depend on how busy the machine is.
    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn a_write_nobody_reads_fails_after_the_limit() {
        let rt = paused_runtime();
        rt.block_on(async {
            // A pipe of 64 bytes that nobody drains.
            let (writer, _reader) = tokio::io::duplex(64);
            let mut guarded = StallGuard::new(writer, Duration::from_millis(50));
            let start = tokio::time::Instant::now();
            let error = guarded.write_all(&[0u8; 1024]).await.unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::TimedOut);
            assert_eq!(start.elapsed(), Duration::from_millis(50));
        });
    }

    #[test]
    fn progress_resets_the_limit() {
        let rt = paused_runtime();
        rt.block_on(async {
            use tokio::io::AsyncReadExt;
            let (writer, mut reader) = tokio::io::duplex(64);
            let mut guarded = StallGuard::new(writer, Duration::from_millis(100));
            // A slow reader that keeps up within the limit each time.
            let drain = tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let mut total = 0;
                while total < 1024 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    total += reader.read(&mut buf).await.unwrap();
                }
            });
            guarded.write_all(&[0u8; 1024]).await.unwrap();
            drain.await.unwrap();
        });
    }
}
