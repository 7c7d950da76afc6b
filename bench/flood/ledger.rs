//! The exactly-once and order bookkeeping behind every targeted verdict.
//!
//! A worker keeps one `Ledger` per run of targeted traffic (targeted, churn,
//! each sweep step). It knows from the schedule which messages must reach
//! this worker's connections and records each arrival:
//!
//! * counted once: the first arrival of message j at its scheduled
//!   recipient, with its scheduled sender, is `delivered`;
//! * a second arrival of j is a `duplicate` (and not delivered again);
//! * an unknown id, a wrong recipient or a wrong sender is `misrouted`;
//! * j arriving after the next message of the same (sender, recipient) pair
//!   is `reordered` (the protocol keeps order per pair);
//! * `lost` = steady messages expected here − steady messages delivered.
//!
//! Churn: a message with a churned connection at either end may be lost
//! legitimately while that connection reconnects, so it is counted apart
//! (`expected_churned`, `delivered_churned`) and never makes `lost`;
//! duplicates and misroutes count for every message.
//!
//! Pure: no clock, no sockets; the caller records latency on `Delivered`.

use crate::schedule::{Schedule, NONE};
use serde::{Deserialize, Serialize};

/// What one arrival was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipt {
    /// First arrival, right recipient, right sender: counted delivered.
    Delivered,
    /// Arrived before: counted once already.
    Duplicate,
    /// Not in the schedule, or at the wrong recipient, or from the wrong
    /// sender (or not parseable at all).
    Misrouted,
}

/// The ledger's counts, as a worker reports them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Steady messages (no churned end) this worker's connections must get.
    pub expected_steady: u64,
    /// Messages to or from churned connections this worker may get.
    pub expected_churned: u64,
    pub delivered_steady: u64,
    pub delivered_churned: u64,
    pub duplicated: u64,
    pub misrouted: u64,
    pub reordered: u64,
}

impl Counts {
    /// Steady messages that did not arrive (they must all arrive).
    pub fn lost(&self) -> u64 {
        self.expected_steady.saturating_sub(self.delivered_steady)
    }

    /// Messages to or from churned connections that did not arrive (allowed).
    pub fn churned_not_delivered(&self) -> u64 {
        self.expected_churned.saturating_sub(self.delivered_churned)
    }

    /// Every message counted once, steady or not.
    pub fn delivered(&self) -> u64 {
        self.delivered_steady + self.delivered_churned
    }

    /// Adds another worker's counts (the coordinator sums them).
    pub fn add(&mut self, o: &Counts) {
        self.expected_steady += o.expected_steady;
        self.expected_churned += o.expected_churned;
        self.delivered_steady += o.delivered_steady;
        self.delivered_churned += o.delivered_churned;
        self.duplicated += o.duplicated;
        self.misrouted += o.misrouted;
        self.reordered += o.reordered;
    }
}

/// Arrivals of one schedule's messages at one worker's connections.
pub struct Ledger {
    /// Whether message j has arrived (only entries for our recipients move).
    seen: Vec<bool>,
    counts: Counts,
}

impl Ledger {
    /// A ledger for the messages of `sched` whose recipient `is_mine`.
    pub fn new(sched: &Schedule, is_mine: impl Fn(u32) -> bool) -> Ledger {
        let mut counts = Counts::default();
        for j in 0..sched.len() as u32 {
            if is_mine(sched.recipient[j as usize]) {
                if sched.is_steady(j) {
                    counts.expected_steady += 1;
                } else {
                    counts.expected_churned += 1;
                }
            }
        }
        Ledger {
            seen: vec![false; sched.len()],
            counts,
        }
    }

    /// Records message `id`, which says it comes from connection `sender`,
    /// arriving at connection `at` (both global indices).
    pub fn receive(&mut self, sched: &Schedule, at: u32, id: u64, sender: u64) -> Receipt {
        let Some(j) = usize::try_from(id).ok().filter(|&j| j < self.seen.len()) else {
            self.counts.misrouted += 1;
            return Receipt::Misrouted;
        };
        if sched.recipient[j] != at || u64::from(sched.sender[j]) != sender {
            self.counts.misrouted += 1;
            return Receipt::Misrouted;
        }
        if self.seen[j] {
            self.counts.duplicated += 1;
            return Receipt::Duplicate;
        }
        self.seen[j] = true;
        if sched.is_steady(j as u32) {
            self.counts.delivered_steady += 1;
            let next = sched.next_same_pair[j];
            if next != NONE && self.seen[next as usize] {
                self.counts.reordered += 1;
            }
        } else {
            self.counts.delivered_churned += 1;
        }
        Receipt::Delivered
    }

    /// A targeted payload that does not even parse: misrouted.
    pub fn garbled(&mut self) {
        self.counts.misrouted += 1;
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Whether every steady message expected here has arrived.
    pub fn steady_complete(&self) -> bool {
        self.counts.delivered_steady == self.counts.expected_steady
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections 0..4 are "mine" (this worker), 4.. belong to others.
    fn mine(g: u32) -> bool {
        g < 4
    }

    /// A schedule of exactly these (sender, recipient) pairs, no churn.
    fn sched(pairs: &[(u32, u32)]) -> Schedule {
        Schedule::from_pairs(1, pairs, 1000.0, 0.0)
    }

    #[test]
    fn counted_once() {
        let s = sched(&[(5, 1), (6, 2), (1, 7)]);
        let mut l = Ledger::new(&s, mine);
        // Messages 0 and 1 are ours to receive; 2 goes to another worker.
        assert_eq!(l.counts().expected_steady, 2);
        assert_eq!(l.receive(&s, 1, 0, 5), Receipt::Delivered);
        assert_eq!(l.counts().delivered_steady, 1);
        assert!(!l.steady_complete());
        assert_eq!(l.receive(&s, 2, 1, 6), Receipt::Delivered);
        assert!(l.steady_complete());
        let c = l.counts();
        assert_eq!((c.delivered(), c.lost(), c.duplicated), (2, 0, 0));
        assert_eq!((c.misrouted, c.reordered), (0, 0));
    }

    #[test]
    fn duplicate_detected_and_not_counted_twice() {
        let s = sched(&[(5, 1), (6, 2)]);
        let mut l = Ledger::new(&s, mine);
        assert_eq!(l.receive(&s, 1, 0, 5), Receipt::Delivered);
        assert_eq!(l.receive(&s, 1, 0, 5), Receipt::Duplicate);
        assert_eq!(l.receive(&s, 1, 0, 5), Receipt::Duplicate);
        let c = l.counts();
        assert_eq!((c.delivered_steady, c.duplicated), (1, 2));
        // A duplicate does not stand in for the message still missing.
        assert_eq!(c.lost(), 1);
    }

    #[test]
    fn reorder_within_a_pair_detected() {
        // 0 and 2 are the same pair (5 -> 1); 1 is another pair to the same
        // recipient, whose order relative to the others is free.
        let s = sched(&[(5, 1), (6, 1), (5, 1)]);
        assert_eq!(s.next_same_pair[0], 2);
        let mut l = Ledger::new(&s, mine);
        assert_eq!(l.receive(&s, 1, 1, 6), Receipt::Delivered);
        assert_eq!(l.receive(&s, 1, 2, 5), Receipt::Delivered);
        assert_eq!(l.counts().reordered, 0);
        assert_eq!(l.receive(&s, 1, 0, 5), Receipt::Delivered);
        assert_eq!(l.counts().reordered, 1);

        // The same arrivals in pair order: no reorder.
        let mut l = Ledger::new(&s, mine);
        for (j, from) in [(0, 5), (1, 6), (2, 5)] {
            assert_eq!(l.receive(&s, 1, j, from), Receipt::Delivered);
        }
        assert_eq!(l.counts().reordered, 0);

        // Another pair's later message first is not a reorder either.
        let mut l = Ledger::new(&s, mine);
        for (j, from) in [(1, 6), (0, 5), (2, 5)] {
            l.receive(&s, 1, j, from);
        }
        assert_eq!(l.counts().reordered, 0);
    }

    #[test]
    fn misroute_detected() {
        let s = sched(&[(5, 1), (6, 2)]);
        let mut l = Ledger::new(&s, mine);
        // Wrong recipient: message 0 is for connection 1.
        assert_eq!(l.receive(&s, 2, 0, 5), Receipt::Misrouted);
        // Wrong sender.
        assert_eq!(l.receive(&s, 1, 0, 6), Receipt::Misrouted);
        // Not in the schedule.
        assert_eq!(l.receive(&s, 1, 2, 5), Receipt::Misrouted);
        assert_eq!(l.receive(&s, 1, u64::MAX, 5), Receipt::Misrouted);
        l.garbled();
        let c = l.counts();
        assert_eq!((c.misrouted, c.delivered(), c.duplicated), (5, 0, 0));
        // A misrouted copy does not count as the delivery: after it the
        // real one still arrives once.
        assert_eq!(l.receive(&s, 1, 0, 5), Receipt::Delivered);
        assert_eq!(l.counts().lost(), 1);
    }

    #[test]
    fn lost_is_expected_minus_delivered() {
        let s = sched(&[(5, 1), (6, 2), (7, 3), (5, 1), (1, 9)]);
        let mut l = Ledger::new(&s, mine);
        assert_eq!(l.counts().expected_steady, 4);
        assert_eq!(l.counts().lost(), 4);
        l.receive(&s, 1, 0, 5);
        l.receive(&s, 3, 2, 7);
        assert_eq!(l.counts().lost(), 2);
        l.receive(&s, 2, 1, 6);
        l.receive(&s, 1, 3, 5);
        assert_eq!(l.counts().lost(), 0);
        assert!(l.steady_complete());
    }

    #[test]
    fn churned_messages_are_exempt_from_lost_but_not_from_duplicates() {
        // Which connections a seed churns is a hash: find one churned and
        // one steady connection among the others' (4..) and ours.
        let probe = Schedule::from_pairs(9, &[], 1000.0, 0.5);
        let churned = (4..100).find(|&g| probe.is_churned(g)).unwrap();
        let steady = (4..100).find(|&g| !probe.is_churned(g)).unwrap();
        let me = (0..4).find(|&g| !probe.is_churned(g)).unwrap();
        // 0, 3: steady -> me; 1, 2: churned -> me.
        let pairs = [(steady, me), (churned, me), (churned, me), (steady, me)];
        let s = Schedule::from_pairs(9, &pairs, 1000.0, 0.5);
        assert!(s.is_steady(0) && !s.is_steady(1));
        let mut l = Ledger::new(&s, mine);
        let c = *l.counts();
        assert_eq!((c.expected_steady, c.expected_churned), (2, 2));
        assert_eq!(l.receive(&s, me, 0, steady.into()), Receipt::Delivered);
        assert_eq!(l.receive(&s, me, 2, churned.into()), Receipt::Delivered);
        // Message 1 (churned) is missing: allowed. Message 3 (steady) is
        // missing: lost, whatever churned messages did arrive.
        let c = *l.counts();
        assert_eq!((c.lost(), c.churned_not_delivered()), (1, 1));
        assert_eq!((c.delivered_steady, c.delivered_churned), (1, 1));
        assert!(!l.steady_complete());
        assert_eq!(l.receive(&s, me, 3, steady.into()), Receipt::Delivered);
        assert_eq!(l.counts().lost(), 0);
        assert!(l.steady_complete());
        // Order is not checked for churned messages (a reconnect may
        // legitimately lose the earlier one) ...
        l.receive(&s, me, 1, churned.into());
        assert_eq!(l.counts().reordered, 0);
        // ... but a duplicate is a duplicate whoever the ends are.
        assert_eq!(l.receive(&s, me, 2, churned.into()), Receipt::Duplicate);
        assert_eq!(l.counts().duplicated, 1);
    }
}
