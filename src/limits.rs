//! Process limits: the open-file limit bounds how many connections one
//! process can hold, so it is raised at start and reported plainly.

use std::io;

/// Descriptors kept for things other than connections: stdio, each shard's
/// listener, io_uring rings, doorbells and eventfds, and some slack.
pub fn reserved_fds(shards: usize) -> u64 {
    32 + 8 * shards as u64
}

/// The open-file limit before and after raising the soft limit to the hard one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub now: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(FdLimit {
        before,
        now: lim.rlim_cur,
    })
}

/// Whether an accept error means "out of descriptors" (process or system).
pub fn is_fd_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_is_idempotent() {
        let first = raise_fd_limit().unwrap();
        let second = raise_fd_limit().unwrap();
        assert!(first.now >= first.before);
        assert_eq!(second.before, second.now);
        assert_eq!(second.now, first.now);
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
