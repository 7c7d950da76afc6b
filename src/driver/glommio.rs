//! The shard under glommio 0.9, the runtime corepush started with: one
//! `LocalExecutor` per shard thread, kept runnable next to [`super::uring`]
//! so that dropping it is a measured decision (`--runtime glommio`).
//!
//! The [`Shard`] is the same; only the loop around it differs. Its tasks
//! share it as `Rc<Driver>` holding a `RefCell<Shard>`, borrowed for one
//! call at a time and never across an await:
//!
//! - **accept**: `glommio::net::TcpListener::accept` on the shard's
//!   SO_REUSEPORT listener; each socket goes to [`Shard::accept`];
//! - **one task per connection**: glommio's `TcpStream::poll_read` into a
//!   scratch buffer shared by the shard, then `on_bytes` / `on_eof` /
//!   `on_error`; when reads end the task asks `on_reads_ended` whether to go
//!   on;
//! - **inbox**: drains `on_inbox`, again after each reactor pass while
//!   messages keep coming (sockets first, as in a uring turn), and sleeps
//!   on the shard's eventfd (`InboxReceiver::sleep` before, `awake` after).
//!   No ring descriptor is published, so other shards wake this one
//!   through its eventfd, and this one wakes others the same way;
//! - **write watch**: full sockets wait for room in a per-shard epoll set
//!   (below, why not in glommio);
//! - **sweep**: `glommio::timer::sleep(sweep_every)`, then [`Shard::sweep`].
//!
//! After every call into the shard the driver carries out its
//! [`Io`] requests and the wake-ups it owes, and notes when the shard is
//! finished; the executor's main future then ends.
//!
//! | request | under glommio |
//! |---|---|
//! | `Read(key, fd)` | a task reading a duplicate of `fd` |
//! | `WatchWrite(key, fd)` | `fd` armed `EPOLLOUT \| EPOLLONESHOT` in the shard's epoll set; `on_writable` once it fires |
//! | `StopReading(key)` | the connection's stream dropped at once (no read can follow), its task woken to end, then `on_reads_ended` |
//! | `Close { key, fd, watching }` | the stream dropped, its task woken to end; `fd` out of the epoll set if watched, then closed |
//! | `StopAccepting` | the listener shut (`shutdown(SHUT_RD)`): the accept in flight fails, and the accept task ends and closes it |
//!
//! **Descriptors.** The shard owns every connection's descriptor
//! (`OwnedFd`): it writes to it, shuts it, closes it through `Io::Close`,
//! or hands it to another shard at login. glommio's `TcpStream` owns its
//! descriptor too and closes it when dropped; it has no `into_raw_fd`, and
//! an `AcceptedTcpStream` does not show its descriptor. So each side owns
//! its own descriptor of the same socket: an accepted stream keeps the one
//! `accept` returned and the shard gets a `dup` (`F_DUPFD_CLOEXEC`); an
//! adopted socket (`Io::Read`) stays the shard's and its reader gets the
//! `dup`. Each descriptor is closed exactly once, by its one owner: the
//! stream's when the reader stops (the shard's stays open for its writes,
//! e.g. while draining), the shard's by `Io::Close` or the shard that
//! adopts it. The socket is gone once both are. The cost: two descriptors
//! per connection (half the connections per open-file limit of the uring
//! driver) and a `dup` per accept and per adoption. Out of descriptors, the
//! `dup` is retried every 50 ms like a failed accept, the connection
//! waiting unread meanwhile.
//!
//! **What glommio can wait for.** glommio 0.9 waits for readiness only
//! inside its socket streams: a stream arms a POLLIN poll when it is made
//! and again when `recv` says EAGAIN, and a POLLOUT poll when `send` says
//! EAGAIN. That fits reading a connection. It does not fit the two other
//! waits:
//!
//! - *room in a full socket*: glommio's `poll_write` first sends the bytes
//!   it is given, and the bytes waiting are the shard's (its outbox;
//!   `on_writable` flushes them). An empty write never says EAGAIN. So full
//!   sockets are watched in an epoll set of the shard's, and glommio waits
//!   for that set to be readable;
//! - *an eventfd or an epoll set becoming readable*: a glommio stream over
//!   one arms its first POLLIN poll, but `recv` on it fails (ENOTSOCK)
//!   instead of saying EAGAIN, so it can wait once. [`readable`] wraps a
//!   fresh `dup` for each wait: a `dup`, one poll and a `close` per sleep.
//!   Out of descriptors it falls back to a short timer.
//!
//! glommio 0.9 itself keeps one eventfd per executor that has run (its
//! sleep notifier outlives `LocalExecutor::run`): a process that starts
//! and stops glommio servers, like the tests, leaks one descriptor per
//! shard each time. A server started once does not notice.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ::glommio::net::{TcpListener, TcpStream, UnixStream};
use ::glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use futures_lite::AsyncRead;
use tracing::{debug, warn};

use super::DriverOptions;
use crate::limits;
use crate::router::ShardId;
use crate::shard::slab::Key;
use crate::shard::{Io, Shard};
use crate::stats::{Counter, ShardStats};

/// io_uring buffer memory registered per shard. corepush does no file I/O
/// and reads sockets with plain non-blocking recv, so glommio's default of
/// 10 MiB of locked memory per shard would only be wasted (and would exceed
/// a default `ulimit -l` of 8 MiB for non-root users).
const IO_MEMORY: usize = 1 << 20;

/// Entries of each io_uring submission queue. The kernel sizes the hash
/// table it searches on every cancellation by this (8 buckets at glommio's
/// default of 128, up to its maximum of 256 from 4096 on), and glommio
/// cancels a timer on every wake-up while every idle connection keeps a poll
/// request in that table: at 9,500 connections a shard spent half its time
/// walking 1,200-entry buckets (docs/decisions.md).
const RING_DEPTH: usize = 4096;

/// Size of the read buffer shared by a shard's connections.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Reads taken in one poll of a connection's task before it lets the
/// others run.
const READS_PER_POLL: usize = 16;

/// Write-watch events taken from the epoll set at a time.
const EPOLL_BATCH: usize = 256;

/// How long to wait before accepting (or duplicating a descriptor) again
/// when out of descriptors, and after another accept failure.
const FD_BACKOFF: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The poll interval of a wait that could not get the descriptor it waits
/// through (the process is out of descriptors).
const FALLBACK_POLL: Duration = Duration::from_millis(5);

/// Builds the glommio executor of one shard, on the calling thread (which
/// the server has pinned, or not, as for the uring driver).
/// `DriverOptions::idle_poll` becomes glommio's spin before parking.
pub fn executor(shard: ShardId, options: &DriverOptions) -> io::Result<LocalExecutor> {
    let mut builder = LocalExecutorBuilder::new(Placement::Unbound)
        .name(&format!("corepush-shard-{shard}"))
        .io_memory(IO_MEMORY)
        .ring_depth(RING_DEPTH);
    if !options.idle_poll.is_zero() {
        builder = builder.spin_before_park(options.idle_poll);
    }
    builder.make().map_err(io::Error::from)
}

/// Runs the shard on the current glommio executor until it has been told
/// to shut down and every connection is gone.
pub async fn run(shard: Shard, listener: OwnedFd, options: DriverOptions) -> io::Result<()> {
    let watch = WriteWatch::new()?;
    let driver = Rc::new(Driver {
        stats: shard.stats.clone(),
        id: shard.id,
        shard: RefCell::new(shard),
        readers: RefCell::new(HashMap::new()),
        watch,
        scratch: RefCell::new(vec![0; SCRATCH_BYTES]),
        listener: Cell::new(None),
        finished: Cell::new(false),
        on_finished: RefCell::new(None),
        io: RefCell::new(Vec::new()),
        wakes: RefCell::new(Vec::new()),
        fd_warned_at: Cell::new(None),
        fd_failures: Cell::new(0),
    });
    // The listener's descriptor moves into glommio's listener, which closes
    // it when the accept task ends.
    let listener = listener.into_raw_fd();
    driver.listener.set(Some(listener));
    // SAFETY: nothing else owns the descriptor now.
    let listener = unsafe { TcpListener::from_raw_fd(listener) };
    let accept = ::glommio::spawn_local(accept_loop(driver.clone(), listener)).detach();
    let helpers = [
        ::glommio::spawn_local(inbox_loop(driver.clone())).detach(),
        ::glommio::spawn_local(watch_loop(driver.clone())).detach(),
        ::glommio::spawn_local(sweep_loop(driver.clone(), options.sweep_every)).detach(),
    ];
    driver.carry_out(); // a shard already finished (shut down before it ran)
    poll_fn(|cx| driver.poll_finished(cx)).await;
    // The accept task has ended, or its accept is failing on the shut
    // listener (nothing can be accepted any more, so cancelling it loses
    // no connection).
    accept.cancel();
    for task in &helpers {
        task.cancel();
    }
    // Let the cancelled tasks and the readers told to end run once, so their
    // descriptors are closed before the executor goes.
    futures_lite::future::yield_now().await;
    driver.readers.borrow_mut().clear();
    Ok(())
}

/// What a shard's tasks share.
struct Driver {
    shard: RefCell<Shard>,
    /// Copies of the shard's id and counters, usable while it is borrowed.
    id: ShardId,
    stats: Arc<ShardStats>,
    /// The reader of each connection being read.
    readers: RefCell<HashMap<Key, Rc<Reader>>>,
    watch: WriteWatch,
    /// The read buffer every connection reads into, taken for one read and
    /// its handling.
    scratch: RefCell<Vec<u8>>,
    /// The listener, while the accept task holds it open.
    listener: Cell<Option<RawFd>>,
    /// The shard is finished; the main future waits for this.
    finished: Cell<bool>,
    on_finished: RefCell<Option<Waker>>,
    /// Requests taken from the shard, and shards to wake, reused.
    io: RefCell<Vec<Io>>,
    wakes: RefCell<Vec<ShardId>>,
    /// When the last "out of descriptors" warning was logged, and how many
    /// failures since.
    fd_warned_at: Cell<Option<Instant>>,
    fd_failures: Cell<u64>,
}

impl Driver {
    /// Calls into the shard with the time, then carries out what it asked.
    fn call<R>(self: &Rc<Self>, f: impl FnOnce(&mut Shard, u64) -> R) -> R {
        let result = {
            let mut shard = self.shard.borrow_mut();
            let now = shard.now();
            f(&mut shard, now)
        };
        self.carry_out();
        result
    }

    /// Carries out the shard's requests (including those that carrying out
    /// others makes), wakes the shards it sent messages to, and notes when
    /// it is finished.
    fn carry_out(self: &Rc<Self>) {
        loop {
            let mut io = self.io.take();
            io.extend(self.shard.borrow_mut().take_io());
            if io.is_empty() {
                self.io.replace(io);
                break;
            }
            for request in io.drain(..) {
                self.carry_out_one(request);
            }
            self.io.replace(io);
        }
        let mut wakes = self.wakes.take();
        let mut shard = self.shard.borrow_mut();
        shard.take_wakeups(|to| wakes.push(to));
        for to in wakes.drain(..) {
            shard.wake_by_eventfd(to);
        }
        self.wakes.replace(wakes);
        if shard.is_finished() && !self.finished.get() {
            self.finished.set(true);
            if let Some(waker) = self.on_finished.take() {
                waker.wake();
            }
        }
    }

    fn carry_out_one(self: &Rc<Self>, request: Io) {
        match request {
            Io::Read(key, fd) => self.start_reader(key, ReadState::Duplicate(fd)),
            Io::WatchWrite(key, fd) => {
                if let Err(error) = self.watch.watch(key, fd) {
                    // Room could never be seen: the connection cannot go on.
                    warn!(shard = self.id, %error, "cannot watch a full socket");
                    let mut shard = self.shard.borrow_mut();
                    let now = shard.now();
                    shard.on_error(key, now);
                }
            }
            Io::StopReading(key) => {
                self.stop_reader(key);
                // Nothing more can be read here: the shard sends the
                // connection on, or reads it again.
                let again = {
                    let mut shard = self.shard.borrow_mut();
                    let now = shard.now();
                    shard.on_reads_ended(key, now)
                };
                if let Some(fd) = again {
                    self.start_reader(key, ReadState::Duplicate(fd));
                }
            }
            Io::Close { key, fd, watching } => {
                self.stop_reader(key);
                if watching {
                    self.watch.unwatch(fd.as_raw_fd());
                }
                drop(fd);
            }
            Io::StopAccepting => {
                // Not by cancelling the accept task: glommio's accept may
                // have a connection in hand (its completion in, its task
                // not run yet), which dropping the task would leave open
                // and unanswered. Shutting the listener makes accept fail
                // (EINVAL) once what was accepted has been taken; the task
                // then sees the listener gone and closes it.
                if let Some(listener) = self.listener.take() {
                    // SAFETY: the accept task keeps this descriptor open
                    // until it sees `listener` taken.
                    unsafe { libc::shutdown(listener, libc::SHUT_RD) };
                }
            }
        }
    }

    fn poll_finished(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.finished.get() {
            return Poll::Ready(());
        }
        *self.on_finished.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    // ---- readers ----

    /// Starts reading a connection (replacing any reader it had).
    fn start_reader(self: &Rc<Self>, key: Key, state: ReadState) {
        let reader = Rc::new(Reader {
            key,
            state: RefCell::new(state),
            waker: RefCell::new(None),
        });
        let old = self.readers.borrow_mut().insert(key, reader.clone());
        if let Some(old) = old {
            old.stop();
        }
        ::glommio::spawn_local(read_loop(self.clone(), reader)).detach();
    }

    /// Stops reading a connection at once: its stream is dropped, so no
    /// read can follow, and its task is woken to end.
    fn stop_reader(&self, key: Key) {
        let reader = self.readers.borrow_mut().remove(&key);
        if let Some(reader) = reader {
            reader.stop();
        }
    }

    /// A reader whose reads ended on their own stops and leaves the table.
    fn forget_reader(&self, reader: &Rc<Reader>) {
        let mut readers = self.readers.borrow_mut();
        if readers
            .get(&reader.key)
            .is_some_and(|r| Rc::ptr_eq(r, reader))
        {
            readers.remove(&reader.key);
        }
        drop(readers);
        reader.stop();
    }

    /// Reads a connection until its stream would block, it was stopped, or
    /// its reads ended and the shard does not want more.
    fn poll_reader(self: &Rc<Self>, reader: &Rc<Reader>, cx: &mut Context<'_>) -> Poll<()> {
        let key = reader.key;
        for _ in 0..READS_PER_POLL {
            let mut scratch = self.take_scratch();
            let read = {
                let mut state = reader.state.borrow_mut();
                let ReadState::Reading(stream) = &mut *state else {
                    self.scratch.replace(scratch);
                    return Poll::Ready(());
                };
                Pin::new(stream).poll_read(cx, &mut scratch)
            };
            let ended = match read {
                Poll::Pending => {
                    self.scratch.replace(scratch);
                    reader.park(cx.waker());
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => {
                    self.call(|shard, now| shard.on_eof(key, now));
                    true
                }
                Poll::Ready(Ok(n)) => {
                    self.call(|shard, now| shard.on_bytes(key, now, &mut scratch[..n]));
                    false
                }
                Poll::Ready(Err(_)) => {
                    self.call(|shard, now| shard.on_error(key, now));
                    true
                }
            };
            self.scratch.replace(scratch);
            if ended && !self.reads_ended(reader) {
                return Poll::Ready(());
            }
        }
        // A busy connection: let the others run, then come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A reader's reads ended on their own (end of stream, error): unless
    /// the shard stopped or closed it meanwhile (which answered already),
    /// asks the shard whether to read on. Returns whether to.
    fn reads_ended(self: &Rc<Self>, reader: &Rc<Reader>) -> bool {
        if !reader.is_reading() {
            return false;
        }
        let again = self.call(|shard, now| shard.on_reads_ended(reader.key, now));
        if again.is_some() && reader.is_reading() {
            return true;
        }
        self.forget_reader(reader);
        false
    }

    fn take_scratch(&self) -> Vec<u8> {
        let scratch = self.scratch.take();
        if scratch.is_empty() {
            return vec![0; SCRATCH_BYTES]; // only if reads ever nest
        }
        scratch
    }

    // ---- descriptors ----

    /// Out of descriptors: counted, and said at most every 5 seconds.
    fn out_of_descriptors(&self, error: &io::Error) {
        self.stats.inc(Counter::AcceptFdExhausted);
        self.fd_failures.set(self.fd_failures.get() + 1);
        if self
            .fd_warned_at
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            warn!(
                shard = self.id,
                %error,
                failures = self.fd_failures.get(),
                connections = self.shard.borrow().len(),
                "cannot accept: out of file descriptors; raise `ulimit -n` \
                 (systemd: LimitNOFILE=) to hold more connections"
            );
            self.fd_warned_at.set(Some(Instant::now()));
            self.fd_failures.set(0);
        }
    }
}

/// What a connection's reader reads from.
enum ReadState {
    /// The shard's descriptor of an adopted socket, to duplicate first.
    Duplicate(RawFd),
    /// This driver's own stream of the socket.
    Reading(TcpStream),
    /// Stopped: the stream is gone.
    Stopped,
}

/// One connection's reader, shared by its task and the reader table.
struct Reader {
    key: Key,
    state: RefCell<ReadState>,
    /// The task's waker while it waits, to end it when stopped.
    waker: RefCell<Option<Waker>>,
}

impl Reader {
    fn is_reading(&self) -> bool {
        !matches!(*self.state.borrow(), ReadState::Stopped)
    }

    /// Drops the stream (closing this driver's descriptor and cancelling
    /// its poll) and wakes the task so it ends.
    fn stop(&self) {
        let old = self.state.replace(ReadState::Stopped);
        drop(old);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn park(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

// ---- the tasks ----

async fn accept_loop(driver: Rc<Driver>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(_) if driver.listener.get().is_none() => {
                return; // stopped accepting: the listener closes here
            }
            Err(error) => {
                let error = io::Error::from(error);
                if limits::is_fd_exhaustion(&error) {
                    driver.out_of_descriptors(&error);
                    ::glommio::timer::sleep(FD_BACKOFF).await;
                } else {
                    // Not ours to fix (the client reset, a transient error):
                    // retry shortly rather than spin on it.
                    driver.stats.inc(Counter::AcceptFailed);
                    debug!(shard = driver.id, %error, "accept failed");
                    ::glommio::timer::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        // The shard's own descriptor of the socket; the stream keeps its own.
        let fd = loop {
            match duplicate(stream.as_raw_fd()) {
                Ok(fd) => break Some(fd),
                Err(error) if limits::is_fd_exhaustion(&error) => {
                    driver.out_of_descriptors(&error);
                    ::glommio::timer::sleep(FD_BACKOFF).await;
                }
                Err(error) => {
                    driver.stats.inc(Counter::AcceptFailed);
                    debug!(shard = driver.id, %error, "cannot duplicate an accepted socket");
                    break None;
                }
            }
        };
        let Some(fd) = fd else {
            continue; // dropping the stream closes the socket
        };
        let key = {
            let mut shard = driver.shard.borrow_mut();
            let now = shard.now();
            shard.accept(fd, now)
        };
        // None: the shard is stopping and closed its descriptor; dropping
        // the stream closes ours.
        if let Some(key) = key {
            driver.start_reader(key, ReadState::Reading(stream));
        }
        driver.carry_out();
    }
}

/// A connection's task: duplicates an adopted socket's descriptor if it
/// has to, then reads until it is stopped or its reads end.
async fn read_loop(driver: Rc<Driver>, reader: Rc<Reader>) {
    loop {
        let fd = match &*reader.state.borrow() {
            ReadState::Duplicate(fd) => *fd,
            ReadState::Reading(_) => break,
            ReadState::Stopped => return,
        };
        match duplicate(fd) {
            Ok(own) => {
                // SAFETY: the stream takes over the duplicate, which
                // nothing else owns.
                let stream = unsafe { TcpStream::from_raw_fd(own.into_raw_fd()) };
                reader.state.replace(ReadState::Reading(stream));
            }
            Err(error) if limits::is_fd_exhaustion(&error) => {
                // Keep the connection; read it once a descriptor is free.
                driver.out_of_descriptors(&error);
                ::glommio::timer::sleep(FD_BACKOFF).await;
            }
            Err(error) => {
                debug!(shard = driver.id, %error, "cannot duplicate an adopted socket");
                let key = reader.key;
                driver.call(|shard, now| shard.on_error(key, now));
                driver.reads_ended(&reader);
                return;
            }
        }
    }
    poll_fn(|cx| driver.poll_reader(&reader, cx)).await;
}

/// How soon a shard whose messages wait for room in another shard's inbox
/// tries again (as in the uring driver).
const BACKED_UP_RETRY: Duration = Duration::from_micros(200);

/// Drains the inbox, and sleeps on the shard's eventfd while it is empty.
async fn inbox_loop(driver: Rc<Driver>) {
    let eventfd = driver.shard.borrow().inbox().eventfd();
    loop {
        driver.call(|shard, now| shard.on_inbox(now));
        if driver.shard.borrow().is_backed_up() {
            // Messages wait for room in another shard's inbox: retry soon.
            ::glommio::timer::sleep(BACKED_UP_RETRY).await;
            continue;
        }
        if !driver.shard.borrow().inbox().sleep() {
            // More is waiting: drain again after the sockets' turn.
            next_turn().await;
            continue;
        }
        if readable(eventfd).await.is_err() {
            ::glommio::timer::sleep(FALLBACK_POLL).await;
        }
        {
            let shard = driver.shard.borrow();
            shard.inbox().awake();
            shard.inbox().clear_eventfd();
        }
        // Let the tasks woken in the same reactor pass (reads, accepts) run
        // first: sockets before the inbox, as in a turn of the uring driver.
        futures_lite::future::yield_now().await;
    }
}

/// Tells the shard about full sockets that have room again.
async fn watch_loop(driver: Rc<Driver>) {
    let epoll = driver.watch.epoll.as_raw_fd();
    let mut ready = Vec::new();
    loop {
        if readable(epoll).await.is_err() {
            ::glommio::timer::sleep(FALLBACK_POLL).await;
        }
        driver.watch.take_ready(&mut ready);
        for key in ready.drain(..) {
            driver.call(|shard, now| shard.on_writable(key, now));
        }
    }
}

async fn sweep_loop(driver: Rc<Driver>, every: Duration) {
    let every = every.max(Duration::from_millis(1));
    loop {
        ::glommio::timer::sleep(every).await;
        driver.call(|shard, now| shard.sweep(now));
    }
}

/// Waits for glommio's next reactor pass, then lets the tasks that pass
/// woke run first: the uring driver's turn (the sockets' completions, then
/// the inbox) for a task that would otherwise drain again at once. Yielding
/// within the task queue is not enough: glommio reaps its main ring (where
/// the sockets' polls are) only when its queues run dry or its preemption
/// timer (100 ms) fires, so a busy inbox would hold up the shard's sockets.
async fn next_turn() {
    // A timer is processed at the start of the next pass, before its I/O.
    ::glommio::timer::sleep(Duration::from_micros(1)).await;
    futures_lite::future::yield_now().await;
}

// ---- waiting for what glommio cannot wait for ----

/// Waits, on glommio's reactor, until `fd` (an eventfd or an epoll set) is
/// readable: a glommio stream over a new duplicate of it arms one POLLIN
/// poll (module doc). Fails only when the duplicate cannot be made.
async fn readable(fd: RawFd) -> io::Result<()> {
    let own = duplicate(fd)?;
    // SAFETY: the stream takes over the duplicate, which nothing else owns;
    // it only polls it (its recv fails on a descriptor that is not a
    // socket, which is when the wait is over).
    let mut stream = unsafe { UnixStream::from_raw_fd(own.into_raw_fd()) };
    poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, &mut []).map(|_| ())).await;
    Ok(())
}

/// A new descriptor of the same open file, closed on exec.
fn duplicate(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the caller's descriptor is open for the length of this call.
    unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}

/// The shard's full sockets, each armed once for room (EPOLLOUT |
/// EPOLLONESHOT) with its connection's key as the event's data.
struct WriteWatch {
    epoll: OwnedFd,
}

impl WriteWatch {
    fn new() -> io::Result<WriteWatch> {
        // SAFETY: epoll_create1 returns a new descriptor, or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(WriteWatch { epoll })
    }

    /// Arms `fd` for room once. A socket watched before keeps its disarmed
    /// registration, so it is re-armed instead of added.
    fn watch(&self, key: Key, fd: RawFd) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLOUT | libc::EPOLLONESHOT) as u32,
            u64: key.to_bits(),
        };
        let ctl = |op, event: &mut libc::epoll_event| {
            // SAFETY: `event` is a valid epoll_event; `fd` is a socket the
            // shard owns.
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, event) }
        };
        if ctl(libc::EPOLL_CTL_ADD, &mut event) == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EEXIST) {
            return Err(error);
        }
        if ctl(libc::EPOLL_CTL_MOD, &mut event) == 0 {
            return Ok(());
        }
        Err(io::Error::last_os_error())
    }

    /// Forgets a socket that is about to close.
    fn unwatch(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// The keys of the sockets that have room (or failed) since last asked.
    fn take_ready(&self, keys: &mut Vec<Key>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EPOLL_BATCH];
        loop {
            // SAFETY: `events` has room for EPOLL_BATCH entries; timeout 0
            // never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    EPOLL_BATCH as i32,
                    0,
                )
            };
            if n <= 0 {
                return;
            }
            keys.extend(
                events[..n as usize]
                    .iter()
                    .map(|event| Key::from_bits(event.u64)),
            );
            if (n as usize) < EPOLL_BATCH {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdUnixStream;

    /// Runs `f` on a glommio executor of its own thread.
    fn on_glommio<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        std::thread::spawn(move || {
            let options = DriverOptions {
                sweep_every: Duration::from_millis(10),
                idle_poll: Duration::ZERO,
                features: Default::default(),
            };
            executor(0, &options).unwrap().run(f());
        })
        .join()
        .unwrap();
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd returns a new descriptor, or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn ring(fd: RawFd) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64.
        let written = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        assert_eq!(written, 8);
    }

    fn clear(fd: RawFd) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn an_eventfd_can_be_waited_on_again_and_again() {
        on_glommio(|| async {
            let event = eventfd();
            let fd = event.as_raw_fd();
            for round in 0..3 {
                // Rung before the wait: over at once.
                ring(fd);
                readable(fd).await.unwrap();
                clear(fd);
                // Rung by another thread while waiting.
                let start = Instant::now();
                let ringer = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(30));
                    ring(fd);
                });
                readable(fd).await.unwrap();
                assert!(
                    start.elapsed() >= Duration::from_millis(25),
                    "round {round}"
                );
                clear(fd);
                ringer.join().unwrap();
            }
        });
    }

    #[test]
    fn a_wait_leaves_no_descriptor_behind() {
        on_glommio(|| async {
            let event = eventfd();
            ring(event.as_raw_fd());
            let before = open_fds();
            for _ in 0..200 {
                readable(event.as_raw_fd()).await.unwrap();
            }
            // Each wait's duplicate is closed (other tests running at the
            // same time may hold a few descriptors).
            assert!(open_fds() < before + 50, "{before} -> {}", open_fds());
        });
    }

    #[test]
    fn a_full_socket_is_reported_once_it_has_room_and_once_per_watch() {
        on_glommio(|| async {
            let watch = WriteWatch::new().unwrap();
            let (ours, mut theirs) = StdUnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let chunk = [7u8; 4096];
            let mut sent = 0;
            while let Ok(n) = (&ours).write(&chunk) {
                sent += n;
            }
            let key = Key::from_bits(42);
            let mut ready = Vec::new();
            watch.watch(key, ours.as_raw_fd()).unwrap();
            watch.take_ready(&mut ready);
            assert!(ready.is_empty(), "full: no room yet");

            let reader = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                let mut sink = vec![0u8; sent];
                theirs.read_exact(&mut sink).unwrap();
                theirs
            });
            readable(watch.epoll.as_raw_fd()).await.unwrap();
            watch.take_ready(&mut ready);
            assert_eq!(ready, [key]);
            ready.clear();
            watch.take_ready(&mut ready);
            assert!(ready.is_empty(), "one report per watch");

            // Watched again (its registration is re-armed): room at once.
            watch.watch(key, ours.as_raw_fd()).unwrap();
            readable(watch.epoll.as_raw_fd()).await.unwrap();
            watch.take_ready(&mut ready);
            assert_eq!(ready, [key]);
            watch.unwatch(ours.as_raw_fd());
            drop(reader.join().unwrap());
        });
    }
}
