//! The broadcast phase in a worker: arm each broadcast (every logged-in
//! connection here must get it), send it when this worker owns the sender,
//! and count deliveries, duplicates and latency per connection.

use super::{emit, Worker};
use crate::client::Delivery;
use crate::payload;
use crate::proto::{BcastReport, Event};
use crate::report::{hist_counts, new_hist, record};
use crate::sys;
use hdrhistogram::Histogram;

/// Bookkeeping of one broadcast in this worker.
#[derive(Clone, Default)]
struct BcastStat {
    /// Ready connections here when it was armed: all must receive it.
    expected: u64,
    received: u64,
    /// Latest arrival minus send time: this worker's "last recipient".
    max_latency_ns: u64,
    done_sent: bool,
}

pub struct Broadcasts {
    /// Per local connection: broadcast id + 1 of the last broadcast it
    /// received, to count duplicates without a set (broadcasts never
    /// overlap).
    last: Vec<u32>,
    /// Per broadcast id.
    stats: Vec<BcastStat>,
    /// Latency of every delivery.
    hist: Histogram<u64>,
    duplicated: u64,
    /// Broadcast payloads with an id nobody armed.
    unknown: u64,
}

impl Default for Broadcasts {
    fn default() -> Broadcasts {
        Broadcasts::new(0)
    }
}

impl Broadcasts {
    /// For `conns` local connections.
    pub fn new(conns: usize) -> Broadcasts {
        Broadcasts {
            last: vec![0; conns],
            stats: Vec::new(),
            hist: new_hist(),
            duplicated: 0,
            unknown: 0,
        }
    }

    /// Broadcast `b` is coming: `ready` connections here must get it.
    pub fn arm(&mut self, b: u32, ready: u64) {
        let bu = b as usize;
        if self.stats.len() <= bu {
            self.stats.resize(bu + 1, BcastStat::default());
        }
        self.stats[bu].expected = ready;
        emit(Event::BcastArmed { b });
        self.check_done(bu);
    }

    /// A broadcast payload arrived at local connection li.
    pub fn on_message(&mut self, li: usize, body: &[u8], now: u64) -> Delivery {
        let Some(p) = payload::parse(body, payload::BROADCAST) else {
            return Delivery::Unexpected;
        };
        let Some(bu) = usize::try_from(p.id).ok().filter(|&b| b < self.stats.len()) else {
            self.unknown += 1;
            return Delivery::Counted;
        };
        if self.last[li] == bu as u32 + 1 {
            self.duplicated += 1;
            return Delivery::Counted;
        }
        self.last[li] = bu as u32 + 1;
        let latency = now.saturating_sub(p.ts);
        record(&mut self.hist, latency);
        let st = &mut self.stats[bu];
        st.received += 1;
        st.max_latency_ns = st.max_latency_ns.max(latency);
        self.check_done(bu);
        Delivery::Counted
    }

    /// Tells the coordinator, once, that every connection here has `b`.
    fn check_done(&mut self, b: usize) {
        let st = &mut self.stats[b];
        if !st.done_sent && st.received >= st.expected {
            st.done_sent = true;
            emit(Event::BcastDone {
                b: b as u32,
                received: st.received,
                max_latency_ns: st.max_latency_ns,
            });
        }
    }

    pub fn report(&self) -> BcastReport {
        BcastReport {
            expected: self.stats.iter().map(|s| s.expected).sum(),
            deliveries: self.stats.iter().map(|s| s.received).sum(),
            duplicated: self.duplicated,
            unknown: self.unknown,
            hist: hist_counts(&self.hist),
        }
    }
}

impl Worker {
    /// Sends broadcast `b` from our connection `sender` and says whether it
    /// went out (not when that connection is not logged in).
    pub(super) fn send_broadcast(&mut self, b: u32, sender: u32) {
        let ok = match self.client.local(sender) {
            Some(li) if self.client.is_ready(li) => {
                let text = payload::broadcast(b, sender, sys::now_ns());
                self.client.send_text(li, text.as_bytes(), &mut self.phases)
            }
            _ => false,
        };
        emit(Event::BcastSent { b, ok });
    }
}
