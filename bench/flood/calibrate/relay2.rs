//! Calibration, coordinator side: the two-thread bare relay, the floor of
//! a server that splits its connections over two shards.
//!
//! Two threads each own half of the sink's accepted sockets (by index
//! parity, as shards split connections), each with an epoll of its own
//! watching its sockets and its doorbell (an eventfd). A thread reads its
//! sockets and picks each record's recipient as the one-thread relay does
//! (a random socket). When the recipient is its own it writes the record
//! itself; otherwise it hands the record to the owner over that thread's
//! inbox (a crossbeam channel: lock-free, one producer here) and, once per
//! batch of events, rings the owner's doorbell only if the owner declared
//! it was about to sleep. That is corepush's protocol between shards
//! (`src/router.rs`): the sleeper sets its `asleep` flag, fences and looks
//! at its inbox once more before it waits; a producer fences after its
//! pushes and takes the wake-up by swapping the flag back to false, so one
//! ring covers any number of records and a thread that is awake is never
//! rung. Threads are not pinned; TCP_NODELAY is set on both ends (the
//! sink's `accept_nb` and the clients' `connect_nb`).
//!
//! The threads only borrow the sink's descriptors: the sink stays their
//! owner and closes them. While the relay runs, nothing else reads or
//! writes them.

use super::RECORD;
use crate::report::{new_hist, record};
use crate::schedule::Rng;
use crate::sys::{self, Epoll, EV_IN};
use crossbeam_channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use std::io;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicU64};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Relay threads.
pub const THREADS: usize = 2;

/// The thread that owns the sink's socket `idx`.
pub fn owner(idx: usize) -> usize {
    idx % THREADS
}

/// Where socket `idx` sits in its owner's list.
pub fn local(idx: usize) -> usize {
    idx / THREADS
}

/// epoll token of a thread's doorbell (sockets use their local index).
const BELL: u64 = u64::MAX;

/// Longest a relay thread sleeps without a ring (a safety net: the stop
/// rings every doorbell).
const WAIT_MS: i32 = 1000;

/// A record handed to the thread that owns its recipient.
struct Handoff {
    /// The recipient, as an index into the owner's sockets.
    local: u32,
    rec: [u8; RECORD],
    /// When it was queued (monotonic ns), for the hop's latency.
    queued_ns: u64,
    /// The CPU the reader queued it on.
    cpu: i32,
}

/// What the other thread shares with one relay thread.
#[repr(align(128))]
struct Inbox {
    tx: Sender<Handoff>,
    /// Set just before the thread waits; the producer that swaps it back
    /// to false rings the doorbell.
    asleep: AtomicBool,
    /// The eventfd its epoll watches.
    bell: i32,
    /// Records this thread has written to their recipient so far.
    relayed: AtomicU64,
}

impl Inbox {
    /// Producer side, after its pushes: whether the owner sleeps and must
    /// be rung. True once per sleep, for the one producer that takes it.
    fn take_wakeup(&self) -> bool {
        fence(SeqCst); // the pushes before, the sleeper's emptiness check after
        self.asleep.swap(false, SeqCst)
    }

    /// Owner side: declares that it is about to wait. False (and stays
    /// awake) when a hand-off slipped in meanwhile: drain again instead.
    fn sleep(&self, rx: &Receiver<Handoff>) -> bool {
        self.asleep.store(true, SeqCst);
        fence(SeqCst);
        if rx.is_empty() {
            return true;
        }
        self.asleep.store(false, SeqCst);
        false
    }

    /// Owner side: running again, producers need not ring.
    fn awake(&self) {
        self.asleep.store(false, SeqCst);
    }
}

struct Shared {
    inboxes: Vec<Inbox>,
    stop: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for i in &self.inboxes {
            sys::close(i.bell);
        }
    }
}

/// One of the sink's sockets as its relay thread sees it: the descriptor
/// and the record being reassembled (TCP may split one).
pub struct RSock {
    pub fd: i32,
    pub have: u8,
    pub buf: [u8; RECORD],
}

impl RSock {
    /// Adds `bytes`; calls `on_record` for each record they complete.
    fn feed(&mut self, bytes: &[u8], mut on_record: impl FnMut([u8; RECORD])) {
        for &b in bytes {
            self.buf[self.have as usize] = b;
            self.have += 1;
            if self.have as usize == RECORD {
                self.have = 0;
                on_record(self.buf);
            }
        }
    }
}

/// What one relay thread did.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Records written to their recipient.
    pub relayed: u64,
    /// Records handed to the other thread (counted by the reader).
    pub crossed: u64,
    /// Doorbells rung (each woke a sleeping thread).
    pub wakeups: u64,
    /// Writes that did not go through whole.
    pub short_writes: u64,
    /// CPU time of the relay threads while relaying, ns.
    pub cpu_ns: u64,
    /// A hand-off's latency: queued by the reader to written by the owner
    /// (ns).
    pub hop: Histogram<u64>,
    /// Hand-offs written on the CPU they were queued on.
    pub hop_same_cpu: u64,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            relayed: 0,
            crossed: 0,
            wakeups: 0,
            short_writes: 0,
            cpu_ns: 0,
            hop: new_hist(),
            hop_same_cpu: 0,
        }
    }
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.relayed += o.relayed;
        self.crossed += o.crossed;
        self.wakeups += o.wakeups;
        self.short_writes += o.short_writes;
        self.cpu_ns += o.cpu_ns;
        let _ = self.hop.add(&o.hop);
        self.hop_same_cpu += o.hop_same_cpu;
    }
}

/// The running relay threads.
pub struct Relay2 {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<io::Result<Stats>>>,
}

impl Relay2 {
    /// Starts the threads over `socks` (the sink's, in accept order, with
    /// any partial record they hold).
    pub fn start(socks: Vec<RSock>) -> io::Result<Relay2> {
        let total = socks.len();
        let mut per_thread: Vec<Vec<RSock>> = (0..THREADS).map(|_| Vec::new()).collect();
        for (idx, s) in socks.into_iter().enumerate() {
            debug_assert_eq!(per_thread[owner(idx)].len(), local(idx));
            per_thread[owner(idx)].push(s);
        }
        let mut inboxes: Vec<Inbox> = Vec::with_capacity(THREADS);
        let mut receivers = Vec::with_capacity(THREADS);
        for _ in 0..THREADS {
            let (tx, rx) = crossbeam_channel::unbounded();
            let bell = match sys::eventfd() {
                Ok(fd) => fd,
                Err(e) => {
                    for i in &inboxes {
                        sys::close(i.bell);
                    }
                    return Err(e);
                }
            };
            inboxes.push(Inbox {
                tx,
                asleep: AtomicBool::new(false),
                bell,
                relayed: AtomicU64::new(0),
            });
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            inboxes,
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::with_capacity(THREADS);
        for (me, (rx, socks)) in receivers.into_iter().zip(per_thread).enumerate() {
            let sh = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("calib-relay{me}"))
                .spawn(move || relay(me, &sh, &rx, socks, total));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let relay = Relay2 { shared, threads };
                    let _ = relay.stop();
                    return Err(e);
                }
            }
        }
        Ok(Relay2 { shared, threads })
    }

    /// Records written to their recipient so far, all threads.
    pub fn relayed(&self) -> u64 {
        self.shared
            .inboxes
            .iter()
            .map(|i| i.relayed.load(Relaxed))
            .sum()
    }

    /// Stops and joins the threads; what they did, summed.
    pub fn stop(self) -> io::Result<Stats> {
        self.shared.stop.store(true, SeqCst);
        for i in &self.shared.inboxes {
            sys::eventfd_ring(i.bell);
        }
        let mut sum = Stats::default();
        let mut err = None;
        for t in self.threads {
            match t.join() {
                Ok(Ok(s)) => sum.add(&s),
                Ok(Err(e)) => err = Some(e),
                Err(_) => err = Some(io::Error::other("relay thread panicked")),
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(sum),
        }
    }
}

/// Writes a whole record or counts a short write.
fn write_record(fd: i32, rec: &[u8; RECORD], stats: &mut Stats) {
    if sys::write(fd, rec).map_or(true, |w| w != RECORD) {
        stats.short_writes += 1;
    }
    stats.relayed += 1;
}

/// One relay thread: thread `me` of `shared`, owning `socks` out of
/// `total` sockets.
fn relay(
    me: usize,
    shared: &Shared,
    rx: &Receiver<Handoff>,
    mut socks: Vec<RSock>,
    total: usize,
) -> io::Result<Stats> {
    let inbox = &shared.inboxes[me];
    let mut ep = Epoll::new(1024)?;
    ep.add(inbox.bell, BELL, EV_IN)?;
    for (l, s) in socks.iter().enumerate() {
        ep.add(s.fd, l as u64, EV_IN)?;
    }
    let cpu0 = sys::thread_cpu_ns();
    let mut rng = Rng::new(0x5EED_0001 + me as u64);
    let mut stats = Stats::default();
    let mut ring = [false; THREADS];
    let mut buf = [0u8; 4096];
    loop {
        // Hand-offs from the other thread first: they have waited longest.
        while let Ok(h) = rx.try_recv() {
            write_record(socks[h.local as usize].fd, &h.rec, &mut stats);
            record(&mut stats.hop, sys::now_ns().saturating_sub(h.queued_ns));
            if sys::cpu() == h.cpu {
                stats.hop_same_cpu += 1;
            }
        }
        inbox.relayed.store(stats.relayed, Relaxed);
        if shared.stop.load(SeqCst) {
            break;
        }
        let sleeping = inbox.sleep(rx);
        let n = ep.wait(if sleeping { WAIT_MS } else { 0 });
        if sleeping {
            inbox.awake();
        }
        for i in 0..n {
            let (token, _) = ep.event(i);
            if token == BELL {
                sys::eventfd_clear(inbox.bell);
                continue;
            }
            let l = token as usize;
            let got = match sys::read(socks[l].fd, &mut buf) {
                Ok(0) => None,
                Ok(n) => Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
                Err(_) => None,
            };
            let Some(got) = got else {
                // Closed or failed: stop watching it (level-triggered,
                // it would be reported again and again).
                let _ = ep.del(socks[l].fd);
                continue;
            };
            let mut records = [[0u8; RECORD]; 4096 / RECORD + 1];
            let mut k = 0;
            socks[l].feed(&buf[..got], |rec| {
                records[k] = rec;
                k += 1;
            });
            for rec in &records[..k] {
                let dest = rng.below(total as u64) as usize;
                let to = owner(dest);
                if to == me {
                    write_record(socks[local(dest)].fd, rec, &mut stats);
                } else {
                    let h = Handoff {
                        local: local(dest) as u32,
                        rec: *rec,
                        queued_ns: sys::now_ns(),
                        cpu: sys::cpu(),
                    };
                    // Fails only once the receiver is gone (it never is
                    // while this thread runs).
                    let _ = shared.inboxes[to].tx.send(h);
                    stats.crossed += 1;
                    ring[to] = true;
                }
            }
        }
        inbox.relayed.store(stats.relayed, Relaxed);
        for (to, r) in ring.iter_mut().enumerate() {
            if std::mem::take(r) && shared.inboxes[to].take_wakeup() {
                sys::eventfd_ring(shared.inboxes[to].bell);
                stats.wakeups += 1;
            }
        }
    }
    stats.cpu_ns = sys::thread_cpu_ns().saturating_sub(cpu0);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn ownership_splits_by_parity_and_round_trips() {
        assert_eq!((owner(0), local(0)), (0, 0));
        assert_eq!((owner(1), local(1)), (1, 0));
        assert_eq!((owner(2), local(2)), (0, 1));
        assert_eq!((owner(19_999), local(19_999)), (1, 9_999));
        for idx in 0..1000 {
            assert_eq!(local(idx) * THREADS + owner(idx), idx);
        }
        // Each thread's sockets, in accept order, are 0, 1, 2, ... locally.
        let mut count = [0usize; THREADS];
        for idx in 0..1001 {
            assert_eq!(local(idx), count[owner(idx)]);
            count[owner(idx)] += 1;
        }
        assert_eq!(count, [501, 500]);
    }

    #[test]
    fn feed_reassembles_split_records() {
        let mut s = RSock {
            fd: -1,
            have: 0,
            buf: [0; RECORD],
        };
        let stream: Vec<u8> = (0..(3 * RECORD) as u8).collect();
        let mut got = Vec::new();
        // 7 + 50 + rest: records cut at odd places.
        for part in [&stream[..7], &stream[7..57], &stream[57..]] {
            s.feed(part, |r| got.push(r));
        }
        assert_eq!(got.len(), 3);
        for (i, r) in got.iter().enumerate() {
            assert_eq!(&r[..], &stream[i * RECORD..(i + 1) * RECORD]);
        }
        assert_eq!(s.have, 0);
        // A partial record handed over from the sink is completed.
        let mut s = RSock {
            fd: -1,
            have: 3,
            buf: [9; RECORD],
        };
        let mut n = 0;
        s.feed(&[1; RECORD - 3], |r| {
            assert_eq!(&r[..3], &[9, 9, 9]);
            assert!(r[3..].iter().all(|&b| b == 1));
            n += 1;
        });
        assert_eq!((n, s.have), (1, 0));
    }

    /// The wake protocol never loses a wake-up: a consumer that sleeps on
    /// an eventfd (in epoll, with a long timeout) sees every hand-off soon,
    /// and is rung at most once per item.
    #[test]
    fn sleeping_consumer_is_always_woken() {
        let (tx, rx) = crossbeam_channel::unbounded::<Handoff>();
        let bell = sys::eventfd().unwrap();
        let inbox = Arc::new(Inbox {
            tx,
            asleep: AtomicBool::new(false),
            bell,
            relayed: AtomicU64::new(0),
        });
        const N: u64 = 20_000;
        let consumer = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                let mut ep = Epoll::new(8).unwrap();
                ep.add(inbox.bell, BELL, EV_IN).unwrap();
                let (mut got, mut tries) = (0u64, 0u64);
                let start = Instant::now();
                while got < N {
                    while rx.try_recv().is_ok() {
                        got += 1;
                    }
                    if got == N {
                        break;
                    }
                    tries += 1;
                    let sleeping = inbox.sleep(&rx);
                    // 10 s: a lost wake-up shows as a stall, not a hang.
                    if ep.wait(if sleeping { 10_000 } else { 0 }) > 0 {
                        sys::eventfd_clear(inbox.bell);
                    }
                    if sleeping {
                        inbox.awake();
                    }
                    assert!(start.elapsed() < Duration::from_secs(5), "stalled");
                }
                (got, tries)
            })
        };
        let mut rings = 0;
        for i in 0..N {
            inbox
                .tx
                .send(Handoff {
                    local: i as u32,
                    rec: [0; RECORD],
                    queued_ns: 0,
                    cpu: -1,
                })
                .unwrap();
            if inbox.take_wakeup() {
                sys::eventfd_ring(inbox.bell);
                rings += 1;
            }
            if i % 64 == 0 {
                std::thread::yield_now();
            }
        }
        let (got, tries) = consumer.join().unwrap();
        assert_eq!(got, N);
        // Each ring takes one `asleep = true` the consumer stored.
        assert!(rings <= tries, "{rings} rings, {tries} tries to sleep");
        sys::close(bell);
    }

    /// End to end over socket pairs: every record reaches a socket, about
    /// half of them cross, and the counts add up.
    #[test]
    fn relays_every_record_over_two_threads() {
        let n = 8;
        let mut far = Vec::new();
        let mut socks = Vec::new();
        for _ in 0..n {
            let mut fds = [0i32; 2];
            // SAFETY: `fds` has room for the two descriptors.
            let r = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            assert_eq!(r, 0);
            socks.push(RSock {
                fd: fds[0],
                have: 0,
                buf: [0; RECORD],
            });
            far.push(fds[1]);
        }
        let near: Vec<i32> = socks.iter().map(|s| s.fd).collect();
        let relay = Relay2::start(socks).unwrap();
        let records = 400u64;
        for i in 0..records {
            let mut rec = [0u8; RECORD];
            rec[0] = b'O';
            rec[8..16].copy_from_slice(&i.to_le_bytes());
            // Split some records in two writes.
            let fd = far[i as usize % n];
            if i % 5 == 0 {
                assert_eq!(sys::write(fd, &rec[..11]).unwrap(), 11);
                std::thread::sleep(Duration::from_micros(200));
                assert_eq!(sys::write(fd, &rec[11..]).unwrap(), RECORD - 11);
            } else {
                assert_eq!(sys::write(fd, &rec).unwrap(), RECORD);
            }
            if i % 16 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while relay.relayed() < records && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let stats = relay.stop().unwrap();
        assert_eq!(stats.relayed, records);
        assert_eq!(stats.short_writes, 0);
        // Random recipients: about half cross (400 draws; 120..280 is far
        // beyond 6 standard deviations).
        assert!((120..280).contains(&stats.crossed), "{stats:?}");
        assert!(stats.wakeups <= stats.crossed);
        // Every record arrives whole, exactly once overall.
        let mut seen = vec![false; records as usize];
        let mut buf = [0u8; 65536];
        for &fd in &far {
            let mut bytes = Vec::new();
            while let Ok(k) = sys::read(fd, &mut buf) {
                if k == 0 {
                    break;
                }
                bytes.extend_from_slice(&buf[..k]);
            }
            assert_eq!(bytes.len() % RECORD, 0);
            for rec in bytes.chunks(RECORD) {
                assert_eq!(rec[0], b'O');
                let i = u64::from_le_bytes(rec[8..16].try_into().unwrap()) as usize;
                assert!(!seen[i]);
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        for fd in near.into_iter().chain(far) {
            sys::close(fd);
        }
    }
}
