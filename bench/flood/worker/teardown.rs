//! Teardown in a worker: a close frame to every logged-in connection, then
//! count clean closes (the server answered with its close frame), unclean
//! ones and those that time out.

use super::{emit, Worker};
use crate::proto::{Event, Phase, TeardownReport};
use crate::report::{hist_counts, new_hist, record};
use crate::sys;
use hdrhistogram::Histogram;

pub struct Teardown {
    t0: u64,
    timeout_ns: u64,
    /// Connections we sent a close frame to.
    closing: u64,
    /// Closed after the server's close frame.
    clean: u64,
    /// Closed by EOF/reset without a close frame.
    unclean: u64,
    timed_out: u64,
    /// Time from our close frame to the server's close frame.
    hist: Histogram<u64>,
    reported: bool,
}

impl Teardown {
    fn new(t0: u64, timeout_ns: u64) -> Teardown {
        Teardown {
            t0,
            timeout_ns,
            closing: 0,
            clean: 0,
            unclean: 0,
            timed_out: 0,
            hist: new_hist(),
            reported: false,
        }
    }

    pub fn active(&self) -> bool {
        !self.reported
    }

    /// (phase, closed, unclean) for a progress event.
    pub fn progress(&self) -> (Phase, u64, u64) {
        (Phase::Teardown, self.clean + self.unclean, self.unclean)
    }

    /// A connection we closed is closed, `round_trip_ns` after our frame.
    pub fn on_closed(&mut self, clean: bool, round_trip_ns: u64) {
        if clean {
            self.clean += 1;
            record(&mut self.hist, round_trip_ns);
        } else {
            self.unclean += 1;
        }
    }
}

impl Worker {
    pub(super) fn start_teardown(&mut self, timeout_ns: u64) {
        let now = sys::now_ns();
        // In place before the first close frame goes out, so a connection
        // that breaks on it is counted (unclean) like any other.
        self.phases.teardown = Some(Teardown::new(now, timeout_ns));
        for li in 0..self.client.len() {
            if self
                .client
                .begin_close(li, b"bye", false, now, &mut self.phases)
            {
                if let Some(t) = self.phases.teardown.as_mut() {
                    t.closing += 1;
                }
            }
        }
    }

    pub(super) fn tick_teardown(&mut self, now: u64) {
        let Some(t) = self.phases.teardown.as_mut().filter(|t| t.active()) else {
            return;
        };
        if now.saturating_sub(t.t0) > t.timeout_ns {
            t.timed_out += self.client.abandon_closing();
        }
        if t.clean + t.unclean + t.timed_out >= t.closing {
            t.reported = true;
            emit(Event::TeardownDone(TeardownReport {
                closing: t.closing,
                clean: t.clean,
                unclean: t.unclean,
                timed_out: t.timed_out,
                elapsed_ns: sys::now_ns() - t.t0,
                hist: hist_counts(&t.hist),
            }));
        }
    }
}
