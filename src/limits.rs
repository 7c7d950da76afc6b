//! Process limits: the open-file limit bounds how many connections one
//! process can hold, so it is raised at start and reported plainly.

use std::io;

/// Descriptors kept for things other than connections: stdio, each shard's
/// listener, io_uring ring and eventfd, and some slack.
pub fn reserved_fds(shards: usize) -> u64 {
    32 + 8 * shards as u64
}

/// The open-file limit before and after raising the soft limit to the hard one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit now (the hard limit).
    pub now: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let raised = raised(lim);
    if raised.rlim_cur != lim.rlim_cur {
        // SAFETY: setrlimit only reads the struct passed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(FdLimit {
        before: lim.rlim_cur,
        now: raised.rlim_cur,
    })
}

/// The limit with its soft value raised to the hard one (never lowered).
fn raised(lim: libc::rlimit) -> libc::rlimit {
    libc::rlimit {
        rlim_cur: lim.rlim_cur.max(lim.rlim_max),
        rlim_max: lim.rlim_max,
    }
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

    // Raising the real limit is checked on the binary, in a child process
    // (tests/process.rs), so this test process keeps its own limit.

    #[test]
    fn the_soft_limit_goes_up_to_the_hard_one_and_never_down() {
        let lim = |cur, max| libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        let up = raised(lim(1024, 20_000));
        assert_eq!((up.rlim_cur, up.rlim_max), (20_000, 20_000));
        let same = raised(lim(20_000, 20_000));
        assert_eq!((same.rlim_cur, same.rlim_max), (20_000, 20_000));
        let unlimited = raised(lim(1024, libc::RLIM_INFINITY));
        assert_eq!(unlimited.rlim_cur, libc::RLIM_INFINITY);
    }

    #[test]
    fn descriptor_exhaustion_is_told_apart() {
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
