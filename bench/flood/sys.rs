//! Thin wrappers over the libc calls the flood needs: a monotonic clock that
//! all processes share, non-blocking TCP sockets, epoll and the fd limit.
//!
//! Everything here returns `io::Result` and never panics on a syscall error,
//! so a failing socket is counted by the caller instead of aborting a run.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

/// CLOCK_MONOTONIC in nanoseconds. It is system-wide, so a timestamp taken in
/// one worker process can be subtracted from one taken in another.
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// A clock's reading in nanoseconds.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The RLIMIT_NOFILE (soft, hard) pair after raising soft to hard.
pub fn raise_nofile_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit struct for both calls.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

const SOCKADDR_IN_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// A fresh non-blocking IPv4 TCP socket, set up by `setup`; closed again
/// if `setup` fails.
fn tcp_socket<T>(setup: impl FnOnce(i32) -> io::Result<T>) -> io::Result<(i32, T)> {
    // SAFETY: plain socket(2) call.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    match setup(fd) {
        Ok(value) => Ok((fd, value)),
        Err(e) => {
            close(fd);
            Err(e)
        }
    }
}

fn bind_v4(fd: i32, addr: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr_in(addr);
    // SAFETY: `sa` is a valid sockaddr_in of the given length.
    cvt(unsafe {
        libc::bind(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            SOCKADDR_IN_LEN,
        )
    })?;
    Ok(())
}

/// Starts a non-blocking TCP connect from `source` (if any) to `target`.
/// Returns the fd; the connect completes later (EPOLLOUT + SO_ERROR).
pub fn connect_nb(target: SocketAddrV4, source: Option<Ipv4Addr>) -> io::Result<i32> {
    let (fd, ()) = tcp_socket(|fd| {
        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
        if let Some(ip) = source {
            // Defer the port choice to connect(), so the port only has to be
            // unique per 4-tuple and not per source address.
            setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
            bind_v4(fd, SocketAddrV4::new(ip, 0))?;
        }
        let sa = sockaddr_in(target);
        // SAFETY: `sa` is a valid sockaddr_in of the given length.
        let ret = unsafe {
            libc::connect(
                fd,
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                SOCKADDR_IN_LEN,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
        }
        Ok(())
    })?;
    Ok(fd)
}

/// SO_ERROR of a socket: 0 once a non-blocking connect has succeeded.
pub fn socket_error(fd: i32) -> i32 {
    let mut err: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: `err`/`len` are valid out-pointers of the right size.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut i32 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        err
    }
}

/// A listening TCP socket (non-blocking) on `addr`; returns fd and the bound address.
pub fn listen_tcp(addr: SocketAddrV4, backlog: i32) -> io::Result<(i32, SocketAddrV4)> {
    tcp_socket(|fd| {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        bind_v4(fd, addr)?;
        // SAFETY: plain listen(2) call.
        cvt(unsafe { libc::listen(fd, backlog) })?;
        let mut out = sockaddr_in(addr);
        let mut len = SOCKADDR_IN_LEN;
        // SAFETY: `out`/`len` are valid out-pointers.
        cvt(unsafe {
            libc::getsockname(
                fd,
                &mut out as *mut libc::sockaddr_in as *mut libc::sockaddr,
                &mut len,
            )
        })?;
        Ok(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(out.sin_addr.s_addr)),
            u16::from_be(out.sin_port),
        ))
    })
}

/// Accepts one connection as a non-blocking socket with TCP_NODELAY.
pub fn accept_nb(listen_fd: i32) -> io::Result<i32> {
    // SAFETY: null address pointers are allowed by accept4(2).
    let fd = cvt(unsafe {
        libc::accept4(
            listen_fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    let _ = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    Ok(fd)
}

/// recv(2); `Ok(0)` is end of stream, `WouldBlock` means drained.
pub fn read(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` writable bytes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// read(2), for pipes (recv(2) only works on sockets).
pub fn read_fd(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` writable bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// send(2) without SIGPIPE.
pub fn write(fd: i32, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` readable bytes.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Closes `fd` with a reset instead of a FIN (SO_LINGER on, 0 s): what a
/// client that crashes or is killed leaves behind.
pub fn close_reset(fd: i32) {
    if fd < 0 {
        return;
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a pointer to a live linger struct and its size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    close(fd);
}

pub fn close(fd: i32) {
    if fd >= 0 {
        // SAFETY: the caller owns `fd` and never uses it again.
        unsafe { libc::close(fd) };
    }
}

pub fn set_nonblocking(fd: i32) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

/// A non-blocking eventfd (a doorbell one thread rings for another).
pub fn eventfd() -> io::Result<i32> {
    // SAFETY: plain eventfd(2) call.
    cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
}

/// Adds 1 to an eventfd's counter. A failure (EAGAIN: the counter is
/// saturated) means a wake-up is pending anyway.
pub fn eventfd_ring(fd: i32) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Empties an eventfd's counter (EAGAIN when it already was).
pub fn eventfd_clear(fd: i32) {
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64.
    unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
}

/// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), ns.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// The CPU the calling thread runs on (sched_getcpu), -1 if unknown.
pub fn cpu() -> i32 {
    // SAFETY: plain sched_getcpu(3) call.
    unsafe { libc::sched_getcpu() }
}

/// An epoll instance with its event array.
pub struct Epoll {
    /// The epoll fd.
    fd: i32,
    /// Reused output array for epoll_wait.
    events: Vec<libc::epoll_event>,
}

pub const EV_IN: u32 = libc::EPOLLIN as u32;
pub const EV_OUT: u32 = libc::EPOLLOUT as u32;
pub const EV_ERR: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
pub const EV_RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const EV_ET: u32 = libc::EPOLLET as u32;

impl Epoll {
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1(2) call.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity],
        })
    }

    pub fn add(&self, fd: i32, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event.
        cvt(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(|_| ())
    }

    /// Stops watching `fd`.
    pub fn del(&self, fd: i32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: `ev` is a valid epoll_event (ignored by EPOLL_CTL_DEL).
        cvt(unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) }).map(|_| ())
    }

    /// Waits up to `timeout_ms`; returns how many events are ready.
    pub fn wait(&mut self, timeout_ms: i32) -> usize {
        // SAFETY: `events` has room for `len` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            0
        } else {
            n as usize
        }
    }

    /// Waits up to `timeout_ns` with nanosecond precision (epoll_pwait2),
    /// so paced sends neither spin nor round to whole milliseconds. Falls
    /// back to `wait` rounded up to 1 ms on kernels without epoll_pwait2.
    pub fn wait_ns(&mut self, timeout_ns: u64) -> usize {
        let ts = libc::timespec {
            tv_sec: (timeout_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `events` has room for `len` entries; `ts` is valid; a null
        // sigmask means "do not change it".
        let n = unsafe {
            libc::epoll_pwait2(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                &ts,
                std::ptr::null(),
            )
        };
        if n >= 0 {
            return n as usize;
        }
        if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            return self.wait(timeout_ns.div_ceil(1_000_000).min(i32::MAX as u64) as i32);
        }
        0
    }

    /// The (token, event bits) of ready event `i` from the last `wait`.
    pub fn event(&self, i: usize) -> (u64, u32) {
        let ev = self.events[i];
        (ev.u64, ev.events)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        close(self.fd);
    }
}
