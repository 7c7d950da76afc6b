//! The connect phase in a worker: start every connection's connect,
//! upgrade and login, paced by rate and bounded in flight, and report when
//! each has logged in or failed.

use super::{emit, Worker};
use crate::proto::{ConnectReport, Event};
use crate::report::{hist_counts, new_hist, record};
use hdrhistogram::Histogram;
use std::ops::Range;

pub struct ConnectPhase {
    /// Phase start (monotonic ns): pacing and rate are relative to it.
    t0: u64,
    /// Connections per second for this worker; 0 = as fast as possible.
    rate: f64,
    /// At most this many attempts in flight at once (avoids SYN drops).
    inflight_limit: usize,
    /// Attempt timeout in ns.
    timeout_ns: u64,
    /// Next local connection to start.
    next: usize,
    /// Attempts started and not yet finished.
    inflight: usize,
    established: u64,
    failed: u64,
    /// Time of the last login success, for the connections/s figure.
    last_ns: u64,
    /// Connect + upgrade + login latency per connection.
    hist: Histogram<u64>,
    /// Whether the report has been sent.
    reported: bool,
}

impl ConnectPhase {
    pub fn new(t0: u64, rate: f64, inflight_limit: usize, timeout_ns: u64) -> ConnectPhase {
        ConnectPhase {
            t0,
            rate,
            inflight_limit: inflight_limit.max(1),
            timeout_ns,
            next: 0,
            inflight: 0,
            established: 0,
            failed: 0,
            last_ns: 0,
            hist: new_hist(),
            reported: false,
        }
    }

    /// Whether the phase still runs (not reported yet).
    pub fn active(&self) -> bool {
        !self.reported
    }

    pub fn timeout_ns(&self) -> u64 {
        self.timeout_ns
    }

    pub fn established(&self) -> u64 {
        self.established
    }

    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// The local connections to start now out of `total`: as many as the
    /// rate allows by `now`, keeping at most `inflight_limit` in flight.
    fn due(&mut self, now: u64, total: usize) -> Range<usize> {
        let allowed = if self.rate > 0.0 {
            ((now.saturating_sub(self.t0) as f64 / 1e9) * self.rate) as usize + 1
        } else {
            usize::MAX
        };
        let start = self.next;
        let room = self.inflight_limit.saturating_sub(self.inflight);
        let end = total.min(allowed.max(start)).min(start + room);
        self.next = end;
        self.inflight += end - start;
        start..end
    }

    pub fn on_established(&mut self, latency_ns: u64, now: u64) {
        self.established += 1;
        self.inflight = self.inflight.saturating_sub(1);
        self.last_ns = now;
        record(&mut self.hist, latency_ns);
    }

    pub fn on_failed(&mut self) {
        self.failed += 1;
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// The report, once every one of `total` connections has finished its
    /// attempt.
    fn finish(&mut self, total: usize) -> Option<ConnectReport> {
        if self.reported || self.next < total || self.inflight > 0 {
            return None;
        }
        self.reported = true;
        Some(ConnectReport {
            established: self.established,
            failed: self.failed,
            t0: self.t0,
            last_ns: self.last_ns,
            rss_bytes: crate::proc_stats::rss_bytes(std::process::id()),
            hist: hist_counts(&self.hist),
        })
    }
}

impl Worker {
    pub(super) fn tick_connect(&mut self, now: u64) {
        let total = self.client.len();
        let Some(c) = self.phases.connect.as_mut().filter(|c| c.active()) else {
            return;
        };
        for li in c.due(now, total) {
            self.client.start_connect(li, now, &mut self.phases);
        }
        if let Some(report) = self.phases.connect.as_mut().and_then(|c| c.finish(total)) {
            emit(Event::ConnectDone(report));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_and_bounded() {
        // 10 per second, at most 3 in flight.
        let mut c = ConnectPhase::new(0, 10.0, 3, 1);
        assert_eq!(c.due(0, 100), 0..1);
        assert_eq!(c.due(150_000_000, 100), 1..2);
        assert_eq!(c.due(1_000_000_000, 100), 2..3);
        // Three in flight: nothing more until one finishes.
        assert_eq!(c.due(2_000_000_000, 100), 3..3);
        c.on_established(1000, 2_000_000_000);
        c.on_failed();
        assert_eq!(c.due(2_000_000_000, 100), 3..5);
        // Flat out, bounded by the total.
        let mut c = ConnectPhase::new(0, 0.0, 256, 1);
        assert_eq!(c.due(0, 10), 0..10);
        assert_eq!(c.due(0, 10), 10..10);
        assert!(c.finish(10).is_none());
        for _ in 0..10 {
            c.on_established(1, 1);
        }
        assert_eq!(c.finish(10).map(|r| r.established), Some(10));
        assert!(!c.active());
    }
}
