//! Starting and stopping the server: one shard per core, each on its own
//! thread with its own listener on the same address (SO_REUSEPORT), so the
//! kernel spreads new connections over the shards; and the handles other
//! threads use to push into the shards and to stop them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};

use crate::admission::Admission;
use crate::cluster::{self, Cluster};
use crate::config::Config;
use crate::driver::uring;
use crate::limits::{self, FdLimit};
use crate::push::Pusher;
use crate::router::{InboxReceiver, Router, ShardId, ShardMsg};
use crate::shard::{Shard, ShardSettings};
use crate::stats::{ShardStats, Snapshot};

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    router: Router,
    stats: Arc<[Arc<ShardStats>]>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    fd_limit: FdLimit,
    /// In a cluster: the link and the bridge thread.
    cluster: Option<Cluster>,
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

/// Binds the listeners and starts the shards. Fails, with every shard that
/// did start stopped again and every descriptor closed, when the address is
/// taken or a shard cannot set up its event loop.
pub fn start(config: Config) -> io::Result<ServerHandle> {
    start_shards(config).map_err(explain_start_failure)
}

fn start_shards(config: Config) -> io::Result<ServerHandle> {
    let fd_limit = limits::raise_fd_limit()?;
    let shards = config.shard_count();
    if shards > ShardId::MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many shards",
        ));
    }
    let rules = Arc::new(
        config
            .rules()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
    );
    let mut cluster = match &config.cluster {
        Some(url) => Some(Cluster::new(url, config.cluster_queue)?),
        None => None,
    };
    let listeners = listen_all(config.listen, config.backlog, shards)?;
    let addr = listeners[0]
        .local_addr()?
        .as_socket()
        .expect("an IP listener has an IP address");

    let (router, inboxes) = Router::new(shards, config.inbox_capacity)?;
    let settings = ShardSettings {
        rules,
        admission: Arc::new(Admission::new(
            config.max_connections,
            config.max_connections_per_ip,
        )),
        max_outbound_bytes: config.max_outbound_bytes,
        max_pending_bytes: config.max_pending_bytes,
        release_memory: config.release_memory,
    };
    let cpus = allowed_cpus();
    let mut stats = Vec::with_capacity(shards);
    let mut threads = Vec::with_capacity(shards);
    // Each shard says whether its event loop is set up.
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    for (i, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let shard_stats = Arc::new(ShardStats::default());
        stats.push(shard_stats.clone());
        let cpu = (!config.no_pin).then(|| cpus[i % cpus.len()]);
        let shard = ShardStart {
            config: config.clone(),
            settings: settings.clone(),
            router: router.clone(),
            inbox,
            stats: shard_stats,
            listener: OwnedFd::from(listener),
            cpu,
            cluster: cluster.as_ref().map(|c| c.link().clone()),
        };
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("corepush-shard-{i}"))
            .spawn(move || shard.run(ready))?;
        threads.push(thread);
    }
    drop(ready_tx);
    let mut server = ServerHandle {
        addr,
        router,
        stats: stats.into(),
        threads,
        fd_limit,
        cluster: None,
    };
    let mut failure = None;
    for result in ready_rx.iter().take(shards) {
        if let Err(e) = result {
            failure.get_or_insert(e);
        }
    }
    if let Some(error) = failure {
        // Stop the shards that did start; their listeners close with them.
        let _ = server.shutdown();
        return Err(error);
    }
    if let Some(cluster) = &mut cluster {
        // What comes from the bus goes in through a pusher without a link.
        let inlet = Pusher::new(server.router.clone(), server.stats.clone());
        if let Err(e) = cluster.start(inlet) {
            let _ = server.shutdown();
            return Err(e);
        }
    }
    server.cluster = cluster;
    Ok(server)
}

/// What a shard's thread needs.
struct ShardStart {
    config: Config,
    settings: ShardSettings,
    router: Router,
    inbox: InboxReceiver,
    stats: Arc<ShardStats>,
    listener: OwnedFd,
    /// The core to pin the thread to, if pinning.
    cpu: Option<usize>,
    cluster: Option<cluster::Link>,
}

impl ShardStart {
    fn run(self, ready: mpsc::Sender<io::Result<()>>) -> io::Result<()> {
        if let Some(cpu) = self.cpu {
            pin_to(cpu);
        }
        let options = self.config.driver_options();
        let mut shard = Shard::new(self.inbox, self.router, self.settings, self.stats);
        if let Some(link) = self.cluster {
            shard.join_cluster(link);
        }
        match uring::Driver::new(&shard, self.listener, options) {
            Ok(driver) => {
                let _ = ready.send(Ok(()));
                drop(ready);
                driver.run(shard)
            }
            Err(e) => {
                let _ = ready.send(Err(copy_error(&e)));
                Err(e)
            }
        }
    }
}

/// A copy of an error (io::Error is not Clone), keeping its OS error code.
fn copy_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Adds what to do to the errors a shard's event loop meets at start.
fn explain_start_failure(error: io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::EPERM) => io::Error::new(
            error.kind(),
            format!(
                "a shard could not set up io_uring ({error}): each shard needs about \
                 3 MiB of locked memory for its rings and buffers; raise `ulimit -l` \
                 (systemd: LimitMEMLOCK=) or use fewer --shards"
            ),
        ),
        Some(libc::EMFILE) | Some(libc::ENFILE) => io::Error::new(
            error.kind(),
            format!(
                "cannot open the descriptors the server needs to start ({error}): \
                 the open-file limit is too low; raise `ulimit -n` (systemd: LimitNOFILE=)"
            ),
        ),
        Some(libc::ENOSYS) => io::Error::new(
            error.kind(),
            format!("io_uring is not available ({error}): corepush needs Linux 6.0 or later"),
        ),
        _ => error,
    }
}

/// One listener per shard on `addr`. A fixed port already served by
/// another process is refused: SO_REUSEPORT would otherwise let this
/// server join that one's group and take half of its new connections.
fn listen_all(addr: SocketAddr, backlog: u32, shards: usize) -> io::Result<Vec<Socket>> {
    if addr.port() != 0 {
        refuse_if_taken(addr)?;
    }
    let first = listen(addr, backlog)?;
    let addr = first
        .local_addr()?
        .as_socket()
        .expect("an IP listener has an IP address");
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(listen(addr, backlog)?);
    }
    Ok(listeners)
}

/// Binds `addr` once without SO_REUSEPORT: that fails if any process
/// listens there, whatever its options.
fn refuse_if_taken(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{addr} is already in use by another process (is another corepush running?)"),
        )),
        Err(e) => Err(e),
    }
}

/// A listening socket with a backlog of our choosing, SO_REUSEPORT so every
/// shard can bind the address, and TCP_NODELAY, which accepted sockets
/// inherit (no system call per connection for it).
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

/// The CPUs this process may run on (its affinity mask), so shards are
/// pinned to cores that a container or `taskset` actually grants.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid, and sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0;
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set within its size.
        .filter(|&cpu| ok && unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// Pins the calling thread to one CPU (best effort).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` < CPU_SETSIZE, as allowed_cpus() gave it.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
}

impl ServerHandle {
    /// The address the shards listen on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many shards run.
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
        Pusher::new(self.router.clone(), self.stats.clone())
            .with_cluster(self.cluster.as_ref().map(|c| c.link().clone()))
    }

    /// This node's id in its cluster, and the bus (for the log).
    pub fn cluster_node(&self) -> Option<(u64, &str)> {
        self.cluster.as_ref().map(|c| (c.node(), c.address()))
    }

    /// The cluster bus counters of this node, when it is in a cluster.
    pub fn cluster_stats(&self) -> Option<cluster::Snapshot> {
        self.cluster.as_ref().map(Cluster::stats)
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
    /// The first shard error, if any, is returned.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for thread in self.threads {
            let outcome = thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a shard panicked")));
            if let Err(e) = outcome {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        // The shards are done (their last logouts queued): stop the bridge.
        if let Some(cluster) = self.cluster {
            cluster.stop();
        }
        result
    }
}
