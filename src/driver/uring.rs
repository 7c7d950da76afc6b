//! The shard's event loop, straight on io_uring: one ring per shard, and no
//! task, future or poll source per connection.
//!
//! - **Accept**: one multishot accept on the shard's SO_REUSEPORT listener.
//! - **Receive**: one multishot receive per connection, into a ring of
//!   provided buffers shared by the whole shard (an idle connection holds no
//!   buffer; the session copies bytes only while a frame is incomplete).
//! - **Send**: the shard writes straight to a socket that has room; only a
//!   full socket gets a one-shot poll for room here.
//! - **Wake-ups**: another shard rings this one with `IORING_OP_MSG_RING`
//!   from its own ring, in the submission it makes anyway; threads that are
//!   not shards write the shard's eventfd, which a multishot poll watches.
//! - **Timers** stay data: one sweep per interval, whose time bounds the
//!   wait.
//! - **One submit-and-wait per turn**: a turn reaps every completion, drains
//!   the inbox, sweeps when due, turns the shard's requests into submission
//!   entries and wakes the shards it sent to, then makes a single
//!   `io_uring_enter` that submits them and waits (only if the inbox is
//!   empty) for the next completion or the next deadline.
//!
//! The ring is set up with SINGLE_ISSUER and DEFER_TASKRUN where the kernel
//! has them (completion work runs when the shard waits, never interrupting
//! it), COOP_TASKRUN otherwise, and plain where neither exists. What each
//! bought is in docs/decisions.md.
//!
//! Every request's user data is a 3-bit tag and a connection's 61-bit
//! generational key, so a completion for a connection that has gone (or
//! whose slot was reused) finds no connection and is dropped.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, warn};

use super::{DriverOptions, UringFeatures};
use crate::limits;
use crate::shard::slab::Key;
use crate::shard::{Io, Shard};
use crate::stats::Counter;

/// The size of a provided receive buffer. With the default 512 buffers
/// (`RingSizes`), 2 MiB per shard, touched at start so it is a fixed cost,
/// not one that grows with load.
const BUFFER_SIZE: usize = 4096;
const BUFFER_GROUP: u16 = 0;
/// How soon a shard whose messages wait for room in another shard's inbox
/// tries again, when nothing else wakes it.
const BACKED_UP_RETRY: Duration = Duration::from_micros(200);
/// Completions copied out of the ring at a time.
const CQE_BATCH: usize = 256;

/// What a request is, in the top 3 bits of its user data.
const TAG_SHIFT: u32 = 61;
const TAG_IGNORE: u64 = 0;
const TAG_ACCEPT: u64 = 1;
const TAG_RECV: u64 = 2;
const TAG_WRITABLE: u64 = 3;
const TAG_WAKE: u64 = 4;
const TAG_EVENTFD: u64 = 5;

fn user_data(tag: u64, key: Key) -> u64 {
    tag << TAG_SHIFT | key.to_bits()
}

/// A shard's ring and everything it reads into.
pub struct Driver {
    ring: IoUring,
    buffers: Buffers,
    /// The listener; `None` once the shard stopped accepting.
    listener: Option<OwnedFd>,
    accept_armed: bool,
    /// When to arm accept again after an error (shard ms).
    accept_resume_at: Option<u64>,
    /// When the last "out of descriptors" warning was logged, and how many
    /// failures since.
    fd_warned_at: Option<Instant>,
    fd_failures: u64,
    options: DriverOptions,
    /// Completions copied out of the ring, reused every turn.
    batch: Vec<(u64, i32, u32)>,
    /// Shards to wake at the end of this turn, reused.
    wakes: Vec<crate::router::ShardId>,
    /// Entries that did not fit in the submission queue, in order. The
    /// kernel refuses new submissions (EBUSY) while completions it could
    /// not post wait to be reaped, and reaping is the next turn's work: so
    /// a turn that closes thousands of connections at once leaves the rest
    /// here instead of retrying in place (which spun forever without
    /// DEFER_TASKRUN, where completions are posted during the submit).
    unsubmitted: VecDeque<squeue::Entry>,
    /// Connections whose multishot receive ended while their socket may
    /// still hold data: for want of a buffer (ENOBUFS: more sockets had
    /// data than the shard has buffers), or because the completion queue
    /// was full (the kernel then ends multishot requests). Re-armed at
    /// once, each would post a completion at once and end again for the
    /// same reason: with thousands of such sockets (19,000 clients closing
    /// at once), a shard without DEFER_TASKRUN spent every turn re-arming
    /// them and stopped answering. They are re-armed a batch per turn
    /// instead (half the buffers), after the turn's buffers are back.
    starved: VecDeque<Key>,
}

/// Flags of `io_uring_enter` (linux/io_uring.h).
const ENTER_GETEVENTS: u32 = 1 << 0;
const ENTER_EXT_ARG: u32 = 1 << 3;

/// `struct io_uring_getevents_arg`, for a wait with a timeout.
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// `struct __kernel_timespec`.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

impl Driver {
    /// Sets up the shard's ring, its buffers and its accept, on the thread
    /// that will run it (SINGLE_ISSUER binds the ring to that thread).
    pub fn new(shard: &Shard, listener: OwnedFd, options: DriverOptions) -> io::Result<Driver> {
        let ring = build_ring(&options.features, options.sizes.entries)?;
        let buffers = Buffers::new(&ring, options.sizes.buffers, BUFFER_SIZE)?;
        let mut driver = Driver {
            ring,
            buffers,
            listener: Some(listener),
            accept_armed: false,
            accept_resume_at: None,
            fd_warned_at: None,
            fd_failures: 0,
            options,
            batch: Vec::with_capacity(CQE_BATCH),
            wakes: Vec::new(),
            unsubmitted: VecDeque::new(),
            starved: VecDeque::new(),
        };
        driver.arm_accept();
        driver.arm_eventfd(shard.inbox().eventfd());
        shard.inbox().set_ring_fd(driver.ring.as_raw_fd());
        Ok(driver)
    }

    /// Runs the shard until it has been told to shut down and every
    /// connection is gone.
    pub fn run(mut self, mut shard: Shard) -> io::Result<()> {
        let sweep_every = self.options.sweep_every.as_millis().max(1) as u64;
        let mut next_sweep = shard.now() + sweep_every;
        loop {
            let now = shard.now();
            self.reap(&mut shard, now);
            shard.on_inbox(now);
            if now >= next_sweep {
                shard.sweep(now);
                next_sweep = now + sweep_every;
            }
            if self.accept_resume_at.is_some_and(|at| now >= at) {
                self.accept_resume_at = None;
                self.arm_accept();
            }
            self.carry_out(&mut shard);
            if shard.is_finished() {
                break;
            }
            let until = self.accept_resume_at.unwrap_or(u64::MAX).min(next_sweep);
            let mut timeout = Duration::from_millis(until.saturating_sub(now));
            if shard.is_backed_up() {
                timeout = timeout.min(BACKED_UP_RETRY);
            }
            self.wait(&shard, timeout)?;
        }
        self.finish(&shard)
    }

    // ---- one turn ----

    /// Handles every completion that is in the ring.
    fn reap(&mut self, shard: &mut Shard, now: u64) {
        loop {
            let mut batch = std::mem::take(&mut self.batch);
            batch.extend(
                self.ring
                    .completion()
                    .take(CQE_BATCH)
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
            let full = batch.len() == CQE_BATCH;
            for &(data, res, flags) in &batch {
                self.dispatch(shard, data, res, flags, now);
            }
            batch.clear();
            self.batch = batch;
            if !full {
                break;
            }
        }
        self.buffers.publish();
        self.rearm_starved(shard, now);
    }

    fn dispatch(&mut self, shard: &mut Shard, data: u64, res: i32, flags: u32, now: u64) {
        let key = Key::from_bits(data);
        match data >> TAG_SHIFT {
            TAG_ACCEPT => self.on_accept(shard, res, flags, now),
            TAG_RECV => self.on_recv(shard, key, res, flags, now),
            TAG_WRITABLE => shard.on_writable(key, now),
            TAG_EVENTFD => {
                shard.inbox().clear_eventfd();
                if !cqueue::more(flags) {
                    self.arm_eventfd(shard.inbox().eventfd());
                }
            }
            _ => {} // wake-ups (the inbox is drained every turn), cancels
        }
    }

    fn on_accept(&mut self, shard: &mut Shard, res: i32, flags: u32, now: u64) {
        let mut backoff_ms = 0;
        if res >= 0 {
            // SAFETY: a successful accept completion carries a new
            // descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            if let Some(key) = shard.accept(fd, now) {
                self.arm_recv(key, res);
            }
        } else if res != -libc::ECANCELED {
            let error = io::Error::from_raw_os_error(-res);
            let counter;
            (counter, backoff_ms) = accept_failure(&error);
            shard.stats.inc(counter);
            if counter == Counter::AcceptFdExhausted {
                self.warn_fd_exhaustion(shard, &error);
            } else {
                debug!(shard = shard.id, %error, "accept failed");
            }
        }
        if !cqueue::more(flags) {
            self.accept_armed = false;
            if self.listener.is_some() && self.accept_resume_at.is_none() {
                self.accept_resume_at = Some(now + backoff_ms);
            }
        }
    }

    /// Out of descriptors: keep serving the connections there are, retry
    /// shortly, and say so at most every 5 seconds.
    fn warn_fd_exhaustion(&mut self, shard: &Shard, error: &io::Error) {
        self.fd_failures += 1;
        if self
            .fd_warned_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            warn!(
                shard = shard.id,
                %error,
                failures = self.fd_failures,
                connections = shard.len(),
                "cannot accept: out of file descriptors; raise `ulimit -n` \
                 (systemd: LimitNOFILE=) to hold more connections"
            );
            self.fd_warned_at = Some(Instant::now());
            self.fd_failures = 0;
        }
    }

    fn on_recv(&mut self, shard: &mut Shard, key: Key, res: i32, flags: u32, now: u64) {
        if res > 0 {
            let bid = cqueue::buffer_select(flags).expect("a receive with data has a buffer");
            shard.on_bytes(key, now, self.buffers.get(bid, res as usize));
            self.buffers.give_back(bid);
        } else if res == 0 {
            shard.on_eof(key, now);
        } else if res != -libc::ENOBUFS && res != -libc::ECANCELED {
            shard.on_error(key, now);
        }
        if !cqueue::more(flags) {
            if res > 0 || res == -libc::ENOBUFS {
                self.starved.push_back(key);
            } else if let Some(fd) = shard.on_reads_ended(key, now) {
                self.arm_recv(key, fd);
            }
        }
    }

    /// Re-arms up to half the shard's buffers' worth of the connections in
    /// `starved` (their reads end here only now, so a connection that
    /// closed or moved meanwhile is not armed again).
    fn rearm_starved(&mut self, shard: &mut Shard, now: u64) {
        for _ in 0..self.buffers.count / 2 {
            let Some(key) = self.starved.pop_front() else {
                break;
            };
            if let Some(fd) = shard.on_reads_ended(key, now) {
                self.arm_recv(key, fd);
            }
        }
    }

    /// Turns the shard's requests into submission entries, and wakes the
    /// shards it sent messages to.
    fn carry_out(&mut self, shard: &mut Shard) {
        for io in shard.take_io() {
            match io {
                Io::Read(key, fd) => self.arm_recv(key, fd),
                Io::WatchWrite(key, fd) => {
                    let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                        .build()
                        .user_data(user_data(TAG_WRITABLE, key));
                    self.push(poll);
                }
                Io::StopReading(key) => self.cancel(user_data(TAG_RECV, key)),
                Io::Close { key, fd, watching } => {
                    self.cancel(user_data(TAG_RECV, key));
                    if watching {
                        self.cancel(user_data(TAG_WRITABLE, key));
                    }
                    self.close(fd);
                }
                Io::StopAccepting => {
                    self.cancel(TAG_ACCEPT << TAG_SHIFT);
                    self.accept_resume_at = None;
                    if let Some(listener) = self.listener.take() {
                        self.close(listener);
                    }
                }
            }
        }
        let mut wakes = std::mem::take(&mut self.wakes);
        shard.take_wakeups(|to| wakes.push(to));
        for to in wakes.drain(..) {
            match shard.ring_fd_of(to) {
                Some(ring) if self.options.features.msg_ring => {
                    let ring = types::Fd(ring);
                    let wake = opcode::MsgRingData::new(ring, 0, TAG_WAKE << TAG_SHIFT, None)
                        .build()
                        .flags(squeue::Flags::SKIP_SUCCESS)
                        .user_data(TAG_IGNORE);
                    self.push(wake);
                }
                _ => shard.wake_by_eventfd(to),
            }
        }
        self.wakes = wakes;
    }

    /// Submits what is queued and, if the shard may sleep, waits for the
    /// next completion or `timeout`, in one system call.
    fn wait(&mut self, shard: &Shard, timeout: Duration) -> io::Result<()> {
        if !self.options.idle_poll.is_zero() && self.idle_poll(shard) {
            return Ok(());
        }
        // Never sleep while entries wait for room in the submission queue
        // or connections wait for buffers: the next turn has work.
        let sleeping =
            self.unsubmitted.is_empty() && self.starved.is_empty() && shard.inbox().sleep();
        let result = if sleeping {
            self.enter(1, Some(timeout))
        } else {
            self.enter(0, None)
        };
        if sleeping {
            shard.inbox().awake();
        }
        result
    }

    /// Spins for new work for up to `idle_poll` before the shard sleeps;
    /// true when work came.
    fn idle_poll(&mut self, shard: &Shard) -> bool {
        let start = Instant::now();
        loop {
            if self.enter(0, None).is_err() {
                return false;
            }
            if !self.ring.completion().is_empty() || !shard.inbox().is_empty() {
                return true;
            }
            if start.elapsed() >= self.options.idle_poll {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// One `io_uring_enter`: submits every queued entry, runs completion
    /// work, and waits for `want` completions (at most `timeout`).
    fn enter(&mut self, want: u32, timeout: Option<Duration>) -> io::Result<()> {
        self.refill();
        let to_submit = self.ring.submission().len() as u32;
        let submitter = self.ring.submitter();
        let result = match timeout {
            Some(timeout) => {
                let ts = KernelTimespec {
                    tv_sec: timeout.as_secs() as i64,
                    tv_nsec: timeout.subsec_nanos() as i64,
                };
                let arg = GeteventsArg {
                    sigmask: 0,
                    sigmask_sz: 0,
                    min_wait_usec: 0,
                    ts: &ts as *const KernelTimespec as u64,
                };
                // SAFETY: `arg` and the timespec it points to live across
                // the call; the kernel only reads them.
                unsafe {
                    submitter.enter(to_submit, want, ENTER_GETEVENTS | ENTER_EXT_ARG, Some(&arg))
                }
            }
            // SAFETY: no argument is passed.
            None => unsafe {
                submitter.enter::<libc::sigset_t>(to_submit, want, ENTER_GETEVENTS, None)
            },
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // The timeout passed, a signal came, or completions must be
                // reaped first: all are the next turn's business.
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => Ok(()),
                _ => Err(e),
            },
        }
    }

    /// Stops: the last requests go out, the buffers are unregistered before
    /// their memory is freed, and the ring closes.
    fn finish(mut self, shard: &Shard) -> io::Result<()> {
        shard.inbox().set_ring_fd(-1);
        self.enter(0, None)?;
        // The last closes, if they did not all fit: nothing is left to
        // handle their completions, so they are only counted off.
        while !self.unsubmitted.is_empty() {
            self.ring.completion().for_each(drop);
            self.enter(0, None)?;
        }
        let _ = self.ring.submitter().unregister_buf_ring(BUFFER_GROUP);
        Ok(())
    }

    // ---- submission entries ----

    /// Queues an entry; when the submission queue is full, hands it to the
    /// kernel once and, if there is still no room, keeps the entry for a
    /// later turn (`unsubmitted`), never waiting here.
    fn push(&mut self, entry: squeue::Entry) {
        if self.unsubmitted.is_empty() {
            if self.try_push(&entry) {
                return;
            }
            match self.ring.submit() {
                Ok(_) if self.try_push(&entry) => return,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => warn!(error = %e, "io_uring submit failed"),
            }
        }
        self.unsubmitted.push_back(entry);
    }

    fn try_push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: no entry refers to memory: every one names a descriptor
        // (kept open until its close entry is processed) or a buffer group
        // whose memory outlives the ring.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    /// Moves kept entries into the submission queue, in order, while they
    /// fit.
    fn refill(&mut self) {
        while let Some(entry) = self.unsubmitted.pop_front() {
            if !self.try_push(&entry) {
                self.unsubmitted.push_front(entry);
                break;
            }
        }
    }

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        if self.accept_armed {
            return;
        }
        let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(TAG_ACCEPT << TAG_SHIFT);
        self.push(accept);
        self.accept_armed = true;
    }

    fn arm_recv(&mut self, key: Key, fd: RawFd) {
        let recv = opcode::RecvMulti::new(types::Fd(fd), BUFFER_GROUP)
            .build()
            .user_data(user_data(TAG_RECV, key));
        self.push(recv);
    }

    fn arm_eventfd(&mut self, eventfd: RawFd) {
        let poll = opcode::PollAdd::new(types::Fd(eventfd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(TAG_EVENTFD << TAG_SHIFT);
        self.push(poll);
    }

    fn cancel(&mut self, target: u64) {
        let cancel = opcode::AsyncCancel::new(target)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(TAG_IGNORE);
        self.push(cancel);
    }

    /// Closes a descriptor through the ring, after the cancels before it.
    fn close(&mut self, fd: OwnedFd) {
        let close = opcode::Close::new(types::Fd(fd.into_raw_fd()))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(TAG_IGNORE);
        self.push(close);
    }
}

/// How a failed accept is counted, and how long (ms) to wait before
/// accepting again: out of descriptors, long enough for some to free up;
/// anything else (a client that reset, a transient error) is not ours to
/// fix, but is retried after a pause rather than in a tight loop.
fn accept_failure(error: &io::Error) -> (Counter, u64) {
    if limits::is_fd_exhaustion(error) {
        (Counter::AcceptFdExhausted, 50)
    } else {
        (Counter::AcceptFailed, 10)
    }
}

/// Builds a ring with the best setup flags the kernel takes, falling back
/// one step at a time: SINGLE_ISSUER + DEFER_TASKRUN, then COOP_TASKRUN,
/// then none.
fn build_ring(features: &UringFeatures, entries: u32) -> io::Result<IoUring> {
    let mut attempts: Vec<(bool, bool, bool)> = Vec::new();
    if features.single_issuer && features.defer_taskrun {
        attempts.push((true, true, false));
    }
    if features.coop_taskrun {
        attempts.push((features.single_issuer, false, true));
    }
    attempts.push((false, false, false));
    let mut last = None;
    for (single_issuer, defer_taskrun, coop_taskrun) in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(4 * entries).setup_submit_all();
        if single_issuer {
            builder.setup_single_issuer();
        }
        if defer_taskrun {
            builder.setup_defer_taskrun();
        }
        if coop_taskrun {
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        match builder.build(entries) {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
}

/// The shard's provided receive buffers: a ring of buffer descriptors the
/// kernel takes from, and the memory they point into.
struct Buffers {
    /// The descriptor ring (page-aligned, as the kernel requires).
    entries: *mut types::BufRingEntry,
    entries_len: usize,
    /// `count` buffers of `size` bytes each.
    memory: *mut u8,
    memory_len: usize,
    count: u16,
    size: usize,
    /// Our tail of the ring; the kernel sees it once published.
    tail: u16,
}

impl Buffers {
    fn new(ring: &IoUring, count: u16, size: usize) -> io::Result<Buffers> {
        assert!(
            count.is_power_of_two(),
            "the buffer ring size is a power of two"
        );
        let entries_len = count as usize * std::mem::size_of::<types::BufRingEntry>();
        let memory_len = count as usize * size;
        let entries = map(entries_len)? as *mut types::BufRingEntry;
        let memory = match map(memory_len) {
            Ok(memory) => memory,
            Err(e) => {
                // SAFETY: `entries` was just mapped with this length.
                unsafe { libc::munmap(entries.cast(), entries_len) };
                return Err(e);
            }
        };
        let mut buffers = Buffers {
            entries,
            entries_len,
            memory,
            memory_len,
            count,
            size,
            tail: 0,
        };
        // SAFETY: the descriptor ring and the memory stay mapped until
        // `Drop`, which runs after the ring has unregistered them.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries as u64,
                count,
                BUFFER_GROUP,
                0,
            )?;
        }
        for bid in 0..count {
            buffers.give_back(bid);
        }
        buffers.publish();
        Ok(buffers)
    }

    /// The first `len` bytes of buffer `bid`, which a completion handed us.
    fn get(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(bid < self.count && len <= self.size);
        // SAFETY: buffer `bid` lies inside `memory`, and the kernel does not
        // touch it until it is given back.
        unsafe { std::slice::from_raw_parts_mut(self.memory.add(bid as usize * self.size), len) }
    }

    /// Puts buffer `bid` back in the ring (seen by the kernel once published).
    fn give_back(&mut self, bid: u16) {
        let slot = (self.tail & (self.count - 1)) as usize;
        // SAFETY: `slot` < count, inside the mapped descriptor ring; the
        // kernel reads slots only below the published tail.
        let entry = unsafe { &mut *self.entries.add(slot) };
        // SAFETY: as in `get`.
        entry.set_addr(unsafe { self.memory.add(bid as usize * self.size) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given back visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lives in the first descriptor of the
        // mapped ring; the kernel reads it, so it is written atomically.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.entries) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped with these lengths in `new`.
        unsafe {
            libc::munmap(self.entries.cast(), self.entries_len);
            libc::munmap(self.memory.cast(), self.memory_len);
        }
    }
}

/// Anonymous memory, touched now so its cost shows at start.
fn map(len: usize) -> io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping of `len` bytes, owned by the caller.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(ptr.cast())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_accept_is_counted_and_retried_after_a_pause() {
        let failure = |errno| accept_failure(&io::Error::from_raw_os_error(errno));
        assert_eq!(failure(libc::EMFILE), (Counter::AcceptFdExhausted, 50));
        assert_eq!(failure(libc::ENFILE), (Counter::AcceptFdExhausted, 50));
        assert_eq!(failure(libc::ECONNABORTED), (Counter::AcceptFailed, 10));
        assert_eq!(failure(libc::EPROTO), (Counter::AcceptFailed, 10));
    }

    #[test]
    fn user_data_carries_a_tag_and_a_key() {
        let mut slab = crate::shard::slab::Slab::default();
        let key = slab.insert(());
        for tag in [TAG_ACCEPT, TAG_RECV, TAG_WRITABLE, TAG_WAKE, TAG_EVENTFD] {
            let data = user_data(tag, key);
            assert_eq!(data >> TAG_SHIFT, tag);
            assert_eq!(Key::from_bits(data), key);
        }
    }
}
