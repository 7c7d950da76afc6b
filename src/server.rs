//! Starting and stopping the server: one shard per core, each on its own
//! thread with its own listener on the same address (SO_REUSEPORT), so the
//! kernel spreads new connections over the shards.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;

use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::frame::{self, Opcode};
use crate::limits::{self, FdLimit};
use crate::router::{Router, ShardId, ShardMsg};
use crate::shard::Shard;
use crate::stats::{ShardStats, Snapshot};

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

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    router: Router,
    stats: Vec<Arc<ShardStats>>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    fd_limit: FdLimit,
}

/// Asks a running server to stop; usable from any thread (signal handlers).
#[derive(Clone)]
pub struct ShutdownTrigger {
    router: Router,
}

impl ShutdownTrigger {
    /// Every shard stops accepting and closes its connections with 1001.
    pub fn trigger(&self) {
        self.router.send_all(|_| ShardMsg::Shutdown);
    }
}

/// Pushes messages into the shards from any thread: the way in for
/// everything that is not a client connection (the HTTP push API and the
/// cluster bridge build on it).
#[derive(Clone)]
pub struct Pusher {
    router: Router,
}

impl Pusher {
    /// Delivers `text` to every connection of `uid`, as a text message.
    pub fn push_text(&self, uid: &str, text: &str) {
        let frame = frame::encode(Opcode::Text, text.as_bytes());
        let home = self.router.home_of(uid);
        let uid = Arc::from(uid);
        let origin = None;
        self.router
            .send(home, ShardMsg::ToUid { uid, frame, origin });
    }

    /// Delivers `text` to every logged-in connection.
    pub fn broadcast_text(&self, text: &str) {
        let frame = frame::encode(Opcode::Text, text.as_bytes());
        self.router.send_all(|_| ShardMsg::Broadcast {
            frame: frame.clone(),
            origin: None,
        });
    }
}

/// Binds the listeners and starts the shards.
pub fn start(config: Config) -> io::Result<ServerHandle> {
    let fd_limit = limits::raise_fd_limit()?;
    let shards = config.shard_count();
    if shards > ShardId::MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many shards",
        ));
    }
    let first = listen(config.listen, config.backlog)?;
    let addr = first
        .local_addr()?
        .as_socket()
        .expect("an IP listener has an IP address");
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(listen(addr, config.backlog)?);
    }

    let (router, inboxes) = Router::new(shards)?;
    let config = Arc::new(config);
    let cpus = allowed_cpus();
    let mut stats = Vec::with_capacity(shards);
    let mut threads = Vec::with_capacity(shards);
    // Each shard says it is running; a shard whose executor could not be
    // built drops its sender without a word.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    for (i, (listener, mut inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let ready = ready_tx.clone();
        let shard_stats = Arc::new(ShardStats::default());
        stats.push(shard_stats.clone());
        let (config, router) = (config.clone(), router.clone());
        let listen_fd = listener.into_raw_fd();
        let wake_fd = inbox.wake_fd.take().expect("fresh inbox").into_raw_fd();
        let placement = if config.no_pin {
            Placement::Unbound
        } else {
            Placement::Fixed(cpus[i % cpus.len()])
        };
        let thread = LocalExecutorBuilder::new(placement)
            .name(&format!("corepush-shard-{i}"))
            .io_memory(IO_MEMORY)
            .ring_depth(RING_DEPTH)
            .spawn(move || async move {
                // SAFETY: both descriptors were just created for this shard
                // alone and their ownership moves here.
                let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listen_fd) };
                let wake = unsafe { glommio::net::UnixStream::from_raw_fd(wake_fd) };
                let shard = Shard::new(i as ShardId, config, router, inbox, shard_stats);
                let _ = ready.send(());
                drop(ready);
                Rc::new(shard).run(listener, wake).await;
            })
            .map_err(io::Error::from)?;
        threads.push(thread);
    }
    drop(ready_tx);
    let server = ServerHandle {
        addr,
        router,
        stats,
        threads,
        fd_limit,
    };
    let running = ready_rx.iter().take(shards).count();
    if running < shards {
        // Stop the shards that did start, and report why the others did not.
        let error = match server.shutdown() {
            Err(e) => e,
            Ok(()) => io::Error::other("a shard did not start"),
        };
        return Err(explain_start_failure(error));
    }
    Ok(server)
}

/// Adds what to do to the errors a shard's executor meets at start.
fn explain_start_failure(error: io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::EPERM) => io::Error::new(
            error.kind(),
            format!(
                "a shard could not set up io_uring ({error}): each shard needs about \
                 2.5 MiB of locked memory for its rings and buffers; raise `ulimit -l` \
                 (systemd: LimitMEMLOCK=) or use fewer --shards"
            ),
        ),
        _ => error,
    }
}

/// A listening socket with a backlog of our choosing (glommio's own bind
/// hard-codes 1024) and SO_REUSEPORT, so every shard can bind the address.
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// The CPUs this process may run on (its affinity mask), so shards are
/// pinned to cores that a container or `taskset` actually grants.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid, and sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0;
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| ok && unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

impl ServerHandle {
    /// The address the shards listen on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shards(&self) -> usize {
        self.threads.len()
    }

    /// The open-file limit before and after it was raised at start.
    pub fn fd_limit(&self) -> FdLimit {
        self.fd_limit
    }

    /// How many connections the open-file limit leaves room for.
    pub fn connection_capacity(&self) -> u64 {
        self.fd_limit
            .now
            .saturating_sub(limits::reserved_fds(self.shards()))
    }

    /// Counters summed over every shard.
    pub fn stats(&self) -> Snapshot {
        Snapshot::sum(&self.shard_stats())
    }

    /// Counters of each shard.
    pub fn shard_stats(&self) -> Vec<Snapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// A handle that other threads can use to push messages.
    pub fn pusher(&self) -> Pusher {
        Pusher {
            router: self.router.clone(),
        }
    }

    /// A handle that other threads can use to stop the server.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger {
            router: self.router.clone(),
        }
    }

    /// Stops the server and waits until every shard has finished.
    pub fn shutdown(self) -> io::Result<()> {
        self.shutdown_trigger().trigger();
        self.join()
    }

    /// Waits until every shard has finished (after a shutdown trigger).
    pub fn join(self) -> io::Result<()> {
        for thread in self.threads {
            thread.join().map_err(io::Error::from)?;
        }
        Ok(())
    }
}
