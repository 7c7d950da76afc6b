//! The deterministic message schedule. Every worker builds the same schedule
//! from the same seed, so each one knows which messages its own connections
//! must send and which they must receive, without talking to the others.
//! That is what makes the exactly-once check work across processes: each
//! worker checks the messages addressed to its connections, and the
//! coordinator sums the counts.

use std::collections::HashMap;

/// SplitMix64: tiny, fast, and good enough to spread senders/recipients.
pub struct Rng {
    /// The generator's state.
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in 0..n (n > 0), by multiply-shift (no modulo bias worth
    /// caring about at these sizes).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The SplitMix64 finaliser: a good 64-bit hash of one word.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// "No message": the end of a same-pair chain.
pub const NONE: u32 = u32::MAX;

/// Which connection sends message j to which, when, and which connections
/// are churned.
pub struct Schedule {
    /// Sender connection (global index) of message j.
    pub sender: Vec<u32>,
    /// Recipient connection (global index) of message j.
    pub recipient: Vec<u32>,
    /// The next message with the same (sender, recipient) pair, or NONE:
    /// the protocol guarantees order per pair, so when j arrives after
    /// next_same_pair[j] that is a reorder.
    pub next_same_pair: Vec<u32>,
    /// Nanoseconds between two scheduled sends (1e9 / rate).
    pub interval_ns: f64,
    /// A connection is churned when mix(seed ^ index) is below this
    /// (0: no churn). Computed, not stored, so every worker agrees.
    churn_threshold: u64,
    /// Seed for the churn choice and times.
    seed: u64,
}

impl Schedule {
    /// `msgs` messages among `conns` connections at `rate` msg/s. One message
    /// in four reuses the previous message's pair, so per-pair order is
    /// actually exercised (fully random pairs almost never repeat).
    pub fn new(seed: u64, conns: u32, msgs: u32, rate: f64, churn: f64) -> Schedule {
        let mut rng = Rng::new(seed);
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(msgs as usize);
        for j in 0..msgs as usize {
            let pair = if j > 0 && rng.below(4) == 0 {
                pairs[j - 1]
            } else {
                (
                    rng.below(conns.into()) as u32,
                    rng.below(conns.into()) as u32,
                )
            };
            pairs.push(pair);
        }
        Schedule::from_pairs(seed, &pairs, rate, churn)
    }

    /// The schedule of exactly these (sender, recipient) pairs, message j
    /// being `pairs[j]`; `seed` and `churn` choose the churned connections.
    pub fn from_pairs(seed: u64, pairs: &[(u32, u32)], rate: f64, churn: f64) -> Schedule {
        let mut next_same_pair = vec![NONE; pairs.len()];
        let mut last_of_pair: HashMap<(u32, u32), u32> = HashMap::new();
        for (j, &pair) in pairs.iter().enumerate() {
            if let Some(prev) = last_of_pair.insert(pair, j as u32) {
                next_same_pair[prev as usize] = j as u32;
            }
        }
        let churn_threshold = if churn <= 0.0 {
            0
        } else if churn >= 1.0 {
            u64::MAX
        } else {
            (churn * u64::MAX as f64) as u64
        };
        Schedule {
            sender: pairs.iter().map(|p| p.0).collect(),
            recipient: pairs.iter().map(|p| p.1).collect(),
            next_same_pair,
            interval_ns: 1e9 / rate.max(1e-3),
            churn_threshold,
            seed,
        }
    }

    pub fn len(&self) -> usize {
        self.sender.len()
    }

    /// Offset of message j's send time from the phase start.
    pub fn send_offset_ns(&self, j: u32) -> u64 {
        (f64::from(j) * self.interval_ns) as u64
    }

    /// How long sending the whole schedule takes.
    pub fn duration_ns(&self) -> u64 {
        self.send_offset_ns(self.len() as u32)
    }

    /// Whether connection `g` closes and reconnects during this phase.
    pub fn is_churned(&self, g: u32) -> bool {
        self.churn_threshold != 0
            && mix(self.seed ^ 0xC4u64.rotate_left(56) ^ u64::from(g)) <= self.churn_threshold
    }

    /// When a churned connection closes, as an offset from the phase start:
    /// spread over the first 80% of the phase so it is back before the end.
    pub fn churn_offset_ns(&self, g: u32) -> u64 {
        let span = (self.duration_ns() as f64 * 0.8) as u64;
        if span == 0 {
            return 0;
        }
        mix(self.seed.rotate_left(17) ^ u64::from(g)) % span
    }

    /// A message is "steady" when neither end is churned: it must arrive
    /// exactly once and in order. Others may legitimately be lost.
    pub fn is_steady(&self, j: u32) -> bool {
        !self.is_churned(self.sender[j as usize]) && !self.is_churned(self.recipient[j as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let a = Schedule::new(7, 1000, 5000, 5000.0, 0.1);
        let b = Schedule::new(7, 1000, 5000, 5000.0, 0.1);
        assert_eq!(a.sender, b.sender);
        assert_eq!(a.recipient, b.recipient);
        assert!(a.sender.iter().all(|&s| s < 1000));
        assert!(a.recipient.iter().all(|&r| r < 1000));
        let churned = (0..1000).filter(|&g| a.is_churned(g)).count();
        assert!((50..150).contains(&churned), "{churned}");
        assert_eq!(a.duration_ns(), 1_000_000_000);
    }

    #[test]
    fn same_pair_chain() {
        let s = Schedule::new(3, 50, 2000, 100.0, 0.0);
        let mut repeats = 0;
        for j in 0..s.len() {
            let n = s.next_same_pair[j];
            if n != NONE {
                repeats += 1;
                assert!(n as usize > j);
                assert_eq!(s.sender[j], s.sender[n as usize]);
                assert_eq!(s.recipient[j], s.recipient[n as usize]);
            }
        }
        assert!(repeats > 400, "{repeats}");
        assert!((0..50).all(|g| !s.is_churned(g)));
    }
}
