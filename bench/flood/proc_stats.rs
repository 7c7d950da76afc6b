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

/// CPU time (user + system) a process has used so far, in nanoseconds, from
/// /proc/PID/stat (fields 14 and 15, in clock ticks).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces: split after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so fields 14 and 15 are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Sum of `cpu_ns` over processes; None if any cannot be read, or none.
pub fn total_cpu_ns(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| cpu_ns(p)).sum()
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
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 1 0 99 0";
        assert_eq!(parse_stat_ticks(stat), Some(10));
        assert!(cpu_ns(std::process::id()).is_some());
    }
}
