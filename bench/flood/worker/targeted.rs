//! A run of targeted traffic in a worker (the targeted phase, and the
//! churn phase's traffic): send this worker's share of the schedule on
//! time, and check what its connections receive with a `Ledger`.

use super::churn::Churn;
use super::{emit, Worker};
use crate::client::Delivery;
use crate::ledger::{Ledger, Receipt};
use crate::payload;
use crate::proto::{Event, Phase, Traffic, TrafficPlan, TrafficReport};
use crate::report::{hist_counts, new_hist, record};
use crate::schedule::Schedule;
use crate::sys;
use hdrhistogram::Histogram;

/// At most this many sends per turn of the event loop: a worker that is
/// behind catches up in bursts of this size and reads (and answers the
/// coordinator) in between, instead of writing for seconds on end.
const MAX_BURST: usize = 256;

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
    /// Payload id of message j is id_base + j (see `TrafficPlan::id_base`).
    id_base: u64,
    /// Exactly-once and order bookkeeping of what our connections receive.
    ledger: Ledger,
    sent: u64,
    /// Sends skipped because the sender was reconnecting (churn only).
    send_skipped: u64,
    /// Give the rest up when a send is this late (sweep only).
    give_up_lag_ns: Option<u64>,
    /// Sends given up that way or when told to stop.
    abandoned: u64,
    /// Whether they were given up for being late.
    fell_behind: bool,
    /// The latest a message went out after its scheduled time.
    max_send_lag_ns: u64,
    /// Time of the last send and of the last counted delivery.
    last_send_ns: u64,
    last_recv_ns: u64,
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
        // An API run's messages are pushed by the coordinator.
        let my_sends = (0..sched.len() as u32)
            .filter(|&j| plan.kind.workers_send() && mine(sched.sender[j as usize]))
            .collect();
        let ledger = Ledger::new(&sched, mine);
        let churn = Churn::new(&sched, base, count, plan.start_ns);
        TargetedPhase {
            kind: plan.kind,
            sched,
            t0: plan.start_ns,
            my_sends,
            next_send: 0,
            id_base: plan.id_base,
            ledger,
            sent: 0,
            send_skipped: 0,
            give_up_lag_ns: plan.give_up_lag_ns,
            abandoned: 0,
            fell_behind: false,
            max_send_lag_ns: 0,
            last_send_ns: 0,
            last_recv_ns: 0,
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
    /// (An API run: delivered and misrouted, nothing being sent here.)
    pub fn progress(&self) -> (Phase, u64, u64) {
        if !self.kind.workers_send() {
            let c = self.ledger.counts();
            return (Phase::Api, c.delivered(), c.misrouted);
        }
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

    /// When message j is due.
    fn due_at(&self, j: u32) -> u64 {
        self.t0 + self.sched.send_offset_ns(j)
    }

    /// The messages to send by `now`, in schedule order, at most MAX_BURST.
    /// With a give-up lag, a sender that far behind sends none of the rest.
    fn due_sends(&mut self, now: u64) -> Vec<u32> {
        let mut due = Vec::new();
        while let Some(&j) = self.my_sends.get(self.next_send) {
            if due.len() == MAX_BURST {
                break;
            }
            let at = self.due_at(j);
            if at > now {
                break;
            }
            if self.give_up_lag_ns.is_some_and(|limit| now - at > limit) {
                self.fell_behind = true;
                self.give_up();
                break;
            }
            due.push(j);
            self.next_send += 1;
        }
        due
    }

    /// Sends none of the messages not sent yet (counted `abandoned`).
    pub fn give_up(&mut self) {
        self.abandoned += (self.my_sends.len() - self.next_send) as u64;
        self.next_send = self.my_sends.len();
    }

    /// Whether messages are still to be sent.
    fn sending(&self) -> bool {
        self.next_send < self.my_sends.len()
    }

    /// A targeted payload arrived at our connection `g`.
    pub fn on_message(&mut self, g: u32, body: &[u8], now: u64) -> Delivery {
        let Some(p) = payload::parse(body, payload::TARGETED) else {
            self.ledger.garbled();
            return Delivery::Counted;
        };
        let Some(j) = p.id.checked_sub(self.id_base) else {
            // From an earlier run, too late to count.
            return Delivery::Stray;
        };
        if self.ledger.receive(&self.sched, g, j, p.sender) == Receipt::Delivered {
            record(&mut self.hist, now.saturating_sub(p.ts));
            self.last_recv_ns = now;
        }
        Delivery::Counted
    }

    /// Everything sent, every steady message here arrived, every churned
    /// connection back: true once, when that first holds.
    fn check_done(&mut self) -> bool {
        if self.done_sent
            || self.sending()
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
            abandoned: self.abandoned,
            fell_behind: self.fell_behind,
            last_send_ns: self.last_send_ns,
            last_recv_ns: self.last_recv_ns,
            max_send_lag_ns: self.max_send_lag_ns,
        }
    }
}

impl Worker {
    pub(super) fn start_targeted(&mut self, plan: &TrafficPlan) {
        let (base, count) = (self.client.base(), self.client.len() as u32);
        self.phases.targeted = Some(TargetedPhase::new(plan, base, count, self.total));
        if !plan.kind.workers_send() {
            emit(Event::TargetedArmed);
        }
    }

    pub(super) fn tick_targeted(&mut self, now: u64) {
        let Some(t) = self.phases.targeted.as_mut() else {
            return;
        };
        for j in t.due_sends(now) {
            self.send_targeted(j);
        }
        self.tick_churn(now);
        // A sweep step is judged by the coordinator from tallies (a sender
        // may give up, and then no worker alone knows what must arrive).
        if self
            .phases
            .targeted
            .as_mut()
            .is_some_and(|t| t.kind != Traffic::Sweep && t.check_done())
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
        let (id, due) = (t.id_base + u64::from(j), t.due_at(j));
        let now = sys::now_ns();
        let text = payload::targeted(self.client.uid_prefix(), r, id, s, now);
        if self.client.send_text(li, text.as_bytes(), &mut self.phases) {
            if let Some(t) = self.phases.targeted.as_mut() {
                t.sent += 1;
                t.last_send_ns = now;
                t.max_send_lag_ns = t.max_send_lag_ns.max(now.saturating_sub(due));
            }
        }
    }

    /// Answers a tally request: sent and delivered so far, still sending.
    pub(super) fn tally_targeted(&mut self, seq: u64) {
        let (sent, delivered, sending) = match self.phases.targeted.as_ref() {
            Some(t) => (t.sent, t.ledger.counts().delivered(), t.sending()),
            None => (0, 0, false),
        };
        emit(Event::TargetedTally {
            seq,
            sent,
            delivered,
            sending,
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep-like run: 1,000 messages at 1,000 msg/s among 4
    /// connections, all of them this worker's, from t = 1 s.
    fn phase(give_up_lag_ns: Option<u64>, id_base: u64) -> TargetedPhase {
        let plan = TrafficPlan {
            kind: Traffic::Sweep,
            seed: 3,
            msgs: 1000,
            rate: 1000.0,
            churn: 0.0,
            start_ns: 1_000_000_000,
            id_base,
            give_up_lag_ns,
        };
        TargetedPhase::new(&plan, 0, 4, 4)
    }

    #[test]
    fn sends_on_schedule_in_bursts() {
        let mut t = phase(None, 0);
        assert!(t.due_sends(999_999_999).is_empty());
        assert_eq!(t.due_sends(1_000_000_000), vec![0]);
        // 10 ms later: messages 1..=10 are due.
        assert_eq!(t.due_sends(1_010_000_000), (1..=10).collect::<Vec<_>>());
        // Far behind: at most MAX_BURST per call, in order, none skipped.
        let burst = t.due_sends(2_000_000_000);
        assert_eq!(burst.len(), MAX_BURST);
        assert_eq!(burst[0], 11);
        assert!(t.sending());
        assert_eq!(t.abandoned, 0);
    }

    #[test]
    fn a_sender_too_far_behind_gives_up() {
        let mut t = phase(Some(500_000_000), 0);
        assert_eq!(t.due_sends(1_400_000_000).len(), MAX_BURST);
        // Message 256 was due at 1.256 s: at 1.8 s it is 544 ms late.
        assert!(t.due_sends(1_800_000_000).is_empty());
        assert!(t.fell_behind);
        assert_eq!(t.abandoned, 1000 - MAX_BURST as u64);
        assert!(!t.sending());
        // Told to stop: the rest is given up too, and is not "behind".
        let mut t = phase(None, 0);
        t.due_sends(1_000_000_000);
        t.give_up();
        assert_eq!(
            (t.abandoned, t.fell_behind, t.sending()),
            (999, false, false)
        );
    }

    #[test]
    fn earlier_runs_are_stray_not_misrouted() {
        let base = 1 << 32;
        let mut t = phase(None, base);
        let (s, r) = (t.sched.sender[5], t.sched.recipient[5]);
        let body = |id: u64| format!("t{id} s{s} 1").into_bytes();
        assert_eq!(t.on_message(r, &body(5), 2), Delivery::Stray);
        assert_eq!(t.ledger.counts().misrouted, 0);
        assert_eq!(t.on_message(r, &body(base + 5), 2), Delivery::Counted);
        assert_eq!(t.ledger.counts().delivered(), 1);
        assert_eq!(t.on_message(r, &body(base + 5000), 2), Delivery::Counted);
        assert_eq!(t.ledger.counts().misrouted, 1);
    }
}
