//! Who may connect: the server-wide connection cap (`--max-connections`)
//! and the per-address cap (`--max-connections-per-ip`). A connection over
//! either is still read, and its upgrade is answered with 503.
//!
//! Shared by every shard and touched only when a connection is accepted or
//! closed, never per message. The server-wide count is one atomic; the
//! per-address counts, on only when that cap is set, sit behind a mutex
//! held for one map update.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// The caps and what is held against them.
#[derive(Debug, Default)]
pub struct Admission {
    /// Server-wide cap; 0: none.
    max: usize,
    /// Connections admitted and not yet released.
    open: AtomicUsize,
    /// Per-address cap (0: none) and the count per address.
    per_ip: usize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    /// Caps of `max` connections in all (0: none) and `per_ip` per address (0: none).
    pub fn new(max: usize, per_ip: usize) -> Admission {
        Admission {
            max,
            per_ip,
            ..Admission::default()
        }
    }

    /// Whether admitting needs the peer's address (the per-address cap is on).
    pub fn wants_address(&self) -> bool {
        self.per_ip > 0
    }

    /// Takes a place for a connection from `ip`; false when there is none
    /// (then nothing was taken).
    pub fn admit(&self, ip: Option<IpAddr>) -> bool {
        let before = self.open.fetch_add(1, Relaxed);
        if self.max > 0 && before >= self.max {
            self.open.fetch_sub(1, Relaxed);
            return false;
        }
        if let (true, Some(ip)) = (self.per_ip > 0, ip) {
            let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
            let count = by_ip.entry(ip).or_insert(0);
            if *count >= self.per_ip {
                drop(by_ip);
                self.open.fetch_sub(1, Relaxed);
                return false;
            }
            *count += 1;
        }
        true
    }

    /// Gives back the place of an admitted connection from `ip`.
    pub fn release(&self, ip: Option<IpAddr>) {
        self.open.fetch_sub(1, Relaxed);
        if let (true, Some(ip)) = (self.per_ip > 0, ip) {
            let mut by_ip = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = by_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
    }

    /// Connections admitted and not yet released.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Addresses with at least one connection (per-address cap only).
    pub fn addresses(&self) -> usize {
        self.by_ip.lock().map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_wide_cap_admits_up_to_max_and_frees_on_release() {
        let a = Admission::new(2, 0);
        assert!(a.admit(None) && a.admit(None));
        assert!(!a.admit(None), "full");
        assert_eq!(a.open(), 2, "a refusal takes nothing");
        a.release(None);
        assert!(a.admit(None), "room again");
        let unlimited = Admission::new(0, 0);
        assert!((0..1000).all(|_| unlimited.admit(None)));
        assert_eq!(unlimited.open(), 1000);
    }

    #[test]
    fn the_per_address_cap_counts_each_address_alone() {
        let a = Admission::new(0, 2);
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(a.admit(Some(x)) && a.admit(Some(x)));
        assert!(!a.admit(Some(x)), "x is at its cap");
        assert!(a.admit(Some(y)), "y is not");
        assert_eq!(a.open(), 3);
        a.release(Some(x));
        a.release(Some(x));
        a.release(Some(y));
        assert_eq!((a.open(), a.addresses()), (0, 0), "nothing is left behind");
    }
}
