//! The churn part of a targeted run in a worker: which of this worker's
//! connections close (cleanly) and reconnect, when, and how many came back.
//! The rest of the churn phase is targeted traffic (`targeted.rs`).

use super::Worker;
use crate::report::{new_hist, record};
use crate::schedule::Schedule;
use hdrhistogram::Histogram;

pub struct Churn {
    /// (close time, local index) of this worker's churned connections,
    /// sorted by time.
    list: Vec<(u64, u32)>,
    /// Index into `list` of the next close.
    next: usize,
    /// Churned connections back and logged in again / that failed to.
    pub reconnected: u64,
    pub reconnect_failed: u64,
    /// Connect + upgrade + login latency of the reconnects.
    pub hist: Histogram<u64>,
}

impl Churn {
    /// The churned connections among local 0..count (global base..), the
    /// schedule choosing which and when, from the run's start `t0`.
    pub fn new(sched: &Schedule, base: u32, count: u32, t0: u64) -> Churn {
        let mut list: Vec<(u64, u32)> = (0..count)
            .filter(|&li| sched.is_churned(base + li))
            .map(|li| (t0 + sched.churn_offset_ns(base + li), li))
            .collect();
        list.sort_unstable();
        Churn {
            list,
            next: 0,
            reconnected: 0,
            reconnect_failed: 0,
            hist: new_hist(),
        }
    }

    /// This worker's churned connections.
    pub fn conns(&self) -> u64 {
        self.list.len() as u64
    }

    /// When the next close is due.
    pub fn next_due(&self) -> Option<u64> {
        self.list.get(self.next).map(|&(at, _)| at)
    }

    /// The connections (local indices) to close by `now`.
    fn due(&mut self, now: u64) -> Vec<usize> {
        let mut closes = Vec::new();
        while let Some(&(at, li)) = self.list.get(self.next) {
            if at > now {
                break;
            }
            closes.push(li as usize);
            self.next += 1;
        }
        closes
    }

    pub fn on_reconnected(&mut self, latency_ns: u64) {
        self.reconnected += 1;
        record(&mut self.hist, latency_ns);
    }

    pub fn on_reconnect_failed(&mut self) {
        self.reconnect_failed += 1;
    }

    /// Every close happened and every closed connection is back (or failed
    /// to come back).
    pub fn settled(&self) -> bool {
        self.next == self.list.len() && self.reconnected + self.reconnect_failed >= self.conns()
    }
}

impl Worker {
    /// Closes the churned connections that are due; each reconnects once
    /// closed (see `Client::begin_close`).
    pub(super) fn tick_churn(&mut self, now: u64) {
        let Some(t) = self.phases.targeted.as_mut() else {
            return;
        };
        for li in t.churn.due(now) {
            self.client
                .begin_close(li, b"churn", true, now, &mut self.phases);
        }
    }
}
