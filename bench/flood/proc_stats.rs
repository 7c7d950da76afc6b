//! Memory figures read from /proc: the server's resident set size and the
//! kernel's TCP buffer memory.

use std::fs;

/// VmRSS of a process in bytes, or None if it cannot be read.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&status)
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sum of VmRSS over several server processes (a cluster); None if any
/// cannot be read, or there are none.
pub fn total_rss(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| rss_bytes(p)).sum()
}

/// Kernel memory used by TCP sockets, system-wide: the `mem` field of
/// /proc/net/sockstat (pages) times the page size.
pub fn tcp_mem_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/net/sockstat").ok()?;
    let pages = parse_sockstat_mem(&text)?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

fn parse_sockstat_mem(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_text() {
        assert_eq!(
            parse_vmrss("Name:\tx\nVmRSS:\t   1234 kB\nVmSwap: 0 kB\n"),
            Some(1234 * 1024)
        );
        assert_eq!(parse_vmrss("Name: x\n"), None);
        let sockstat =
            "sockets: used 15\nTCP: inuse 1 orphan 0 tw 0 alloc 1 mem 255\nUDP: inuse 0 mem 0\n";
        assert_eq!(parse_sockstat_mem(sockstat), Some(255));
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
