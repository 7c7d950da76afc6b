//! A run of targeted traffic in a worker (the targeted phase, and the
//! churn phase's traffic): send this worker's share of the schedule on
//! time, and check what its connections receive with a `Ledger`.

use super::churn::Churn;
use super::{emit, Worker};
use crate::ledger::{Ledger, Receipt};
use crate::payload;
use crate::proto::{Event, Phase, Traffic, TrafficPlan, TrafficReport};
use crate::report::{hist_counts, new_hist, record};
use crate::schedule::Schedule;
use crate::sys;
use hdrhistogram::Histogram;

pub struct TargetedPhase {
    /// Which run this is.
    kind: Traffic,
    sched: Schedule,
    /// Phase start: message j is due at t0 + j / rate.
    t0: u64,
    /// Message ids this worker sends, in order.
    my_sends: Vec<u32>,
    /// Index into my_sends of the next message to send.
    next_send: usize,
    /// Exactly-once and order bookkeeping of what our connections receive.
    ledger: Ledger,
    sent: u64,
    /// Sends skipped because the sender was reconnecting (churn only).
    send_skipped: u64,
    /// Latency of every delivery (send time in payload to receive time).
    hist: Histogram<u64>,
    /// This worker's churned connections (none outside the churn phase).
    pub churn: Churn,
    /// Whether TargetedDone has been sent.
    done_sent: bool,
}

impl TargetedPhase {
    /// The run `plan` for local connections 0..count (global base..) out of
    /// `total`.
    fn new(plan: &TrafficPlan, base: u32, count: u32, total: u32) -> TargetedPhase {
        let sched = Schedule::new(plan.seed, total, plan.msgs, plan.rate, plan.churn);
        let mine = |g: u32| g >= base && g - base < count;
        let my_sends = (0..sched.len() as u32)
            .filter(|&j| mine(sched.sender[j as usize]))
            .collect();
        let ledger = Ledger::new(&sched, mine);
        let churn = Churn::new(&sched, base, count, plan.start_ns);
        TargetedPhase {
            kind: plan.kind,
            sched,
            t0: plan.start_ns,
            my_sends,
            next_send: 0,
            ledger,
            sent: 0,
            send_skipped: 0,
            hist: new_hist(),
            churn,
            done_sent: false,
        }
    }

    /// Whether the run is still going (not reported done).
    pub fn active(&self) -> bool {
        !self.done_sent
    }

    /// (phase, sent, delivered) for a progress event.
    pub fn progress(&self) -> (Phase, u64, u64) {
        (
            self.kind.into(),
            self.sent,
            self.ledger.counts().delivered(),
        )
    }

    /// When the next send or churn close is due.
    pub fn next_due(&self) -> Option<u64> {
        let send = self
            .my_sends
            .get(self.next_send)
            .map(|&j| self.t0 + self.sched.send_offset_ns(j));
        match (send, self.churn.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The messages to send by `now`, in schedule order.
    fn due_sends(&mut self, now: u64) -> Vec<u32> {
        let mut due = Vec::new();
        while let Some(&j) = self.my_sends.get(self.next_send) {
            if self.t0 + self.sched.send_offset_ns(j) > now {
                break;
            }
            due.push(j);
            self.next_send += 1;
        }
        due
    }

    /// A targeted payload arrived at our connection `g`.
    pub fn on_message(&mut self, g: u32, body: &[u8], now: u64) {
        let Some(p) = payload::parse(body, payload::TARGETED) else {
            self.ledger.garbled();
            return;
        };
        if self.ledger.receive(&self.sched, g, p.id, p.sender) == Receipt::Delivered {
            record(&mut self.hist, now.saturating_sub(p.ts));
        }
    }

    /// Everything sent, every steady message here arrived, every churned
    /// connection back: true once, when that first holds.
    fn check_done(&mut self) -> bool {
        if self.done_sent
            || self.next_send < self.my_sends.len()
            || !self.ledger.steady_complete()
            || !self.churn.settled()
        {
            return false;
        }
        self.done_sent = true;
        true
    }

    fn report(&self) -> TrafficReport {
        TrafficReport {
            counts: *self.ledger.counts(),
            sent: self.sent,
            send_skipped: self.send_skipped,
            churned_conns: self.churn.conns(),
            reconnected: self.churn.reconnected,
            reconnect_failed: self.churn.reconnect_failed,
            hist: hist_counts(&self.hist),
            reconnect_hist: hist_counts(&self.churn.hist),
        }
    }
}

impl Worker {
    pub(super) fn start_targeted(&mut self, plan: &TrafficPlan) {
        let (base, count) = (self.client.base(), self.client.len() as u32);
        self.phases.targeted = Some(TargetedPhase::new(plan, base, count, self.total));
    }

    pub(super) fn tick_targeted(&mut self, now: u64) {
        let Some(t) = self.phases.targeted.as_mut() else {
            return;
        };
        for j in t.due_sends(now) {
            self.send_targeted(j);
        }
        self.tick_churn(now);
        if self
            .phases
            .targeted
            .as_mut()
            .is_some_and(|t| t.check_done())
        {
            emit(Event::TargetedDone);
        }
    }

    /// Sends message j from its (local) sender, unless that connection is
    /// not logged in (a churned one reconnecting).
    fn send_targeted(&mut self, j: u32) {
        let Some(t) = self.phases.targeted.as_mut() else {
            return;
        };
        let (s, r) = (t.sched.sender[j as usize], t.sched.recipient[j as usize]);
        let Some(li) = self.client.local(s).filter(|&li| self.client.is_ready(li)) else {
            t.send_skipped += 1;
            return;
        };
        let text = payload::targeted(self.client.uid_prefix(), r, j.into(), s, sys::now_ns());
        if self.client.send_text(li, text.as_bytes(), &mut self.phases) {
            if let Some(t) = self.phases.targeted.as_mut() {
                t.sent += 1;
            }
        }
    }

    /// Ends the run and reports it (an empty report when there is none).
    pub(super) fn report_targeted(&mut self) {
        let report = match self.phases.targeted.take() {
            Some(t) => t.report(),
            None => TrafficReport::default(),
        };
        emit(Event::TargetedReport(Box::new(report)));
    }
}
