//! A single-threaded generational slab: the shard's connection table.
//!
//! A [`Key`] names one slot *and* the generation it was issued for, so a key
//! kept past the connection's end (in a uid table, a queued delivery, a timer
//! sweep, an io_uring request in flight) never reaches a later connection that reused the slot: `get` checks
//! the generation and answers `None`. The shard is the only thread that
//! touches its slab, so nothing here is atomic (see docs/decisions.md for why
//! sharded-slab is not used).

/// Names one value in a [`Slab`]: a slot index and that slot's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    index: u32,
    generation: u32,
}

/// Generations wrap within this many bits, so a key fits in 61 bits and an
/// io_uring request's 64-bit user data can carry a key and a 3-bit tag.
const GENERATION_BITS: u32 = 29;
const GENERATION_MASK: u32 = (1 << GENERATION_BITS) - 1;

impl Key {
    /// The key as 61 bits: the index in the low 32, the generation above.
    pub fn to_bits(self) -> u64 {
        u64::from(self.index) | u64::from(self.generation) << 32
    }

    /// The key that [`Key::to_bits`] gave these bits for (higher bits are
    /// ignored).
    pub fn from_bits(bits: u64) -> Key {
        Key {
            index: bits as u32,
            generation: (bits >> 32) as u32 & GENERATION_MASK,
        }
    }
}

struct Slot<T> {
    /// Bumped every time the slot is freed, so stale keys stop matching.
    generation: u32,
    value: Option<T>,
}

/// Values under generational keys (see the module doc).
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Indices of empty slots, reused last-freed first (warm in cache).
    free: Vec<u32>,
    len: usize,
    /// Above every generation ever issued: a slot created after a shrink
    /// starts here, so no key issued before the shrink can match it.
    fresh_generation: u32,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            fresh_generation: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Live values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No live value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value` and returns its key.
    pub fn insert(&mut self, value: T) -> Key {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: self.fresh_generation,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.value = Some(value);
        self.len += 1;
        Key {
            index,
            generation: slot.generation,
        }
    }

    /// The value under `key`, unless it was removed since.
    pub fn get(&self, key: Key) -> Option<&T> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_ref()
    }

    /// The value under `key`, unless it was removed since.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Takes the value under `key` out; the key goes stale.
    pub fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = (slot.generation + 1) & GENERATION_MASK;
        self.fresh_generation = self.fresh_generation.max(slot.generation);
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    /// Gives memory back after many values left: drops the empty slots at
    /// the end of the table and releases spare capacity, once at most a
    /// quarter of the table is in use. Live keys stay valid. Returns
    /// whether it shrank.
    pub fn shrink_if_sparse(&mut self) -> bool {
        if self.slots.len() < 1024 || self.len * 4 > self.slots.len() {
            return false;
        }
        while self.slots.last().is_some_and(|slot| slot.value.is_none()) {
            self.slots.pop();
        }
        let end = self.slots.len() as u32;
        self.free.retain(|&index| index < end);
        self.slots.shrink_to_fit();
        self.free.shrink_to_fit();
        true
    }

    /// Every live key.
    pub fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, slot)| {
            slot.value.as_ref().map(|_| Key {
                index: i as u32,
                generation: slot.generation,
            })
        })
    }

    /// Every live value, with its key.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, slot)| {
            let key = Key {
                index: i as u32,
                generation: slot.generation,
            };
            slot.value.as_mut().map(|v| (key, v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_key_never_reaches_a_reused_slot() {
        let mut slab = Slab::default();
        let first = slab.insert("first");
        assert_eq!(slab.remove(first), Some("first"));
        let second = slab.insert("second");
        assert_eq!(first.index, second.index, "the slot is reused");
        assert_eq!(slab.get(first), None);
        assert_eq!(slab.remove(first), None);
        assert_eq!(slab.get(second), Some(&"second"));
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn shrinking_keeps_live_keys_and_never_revives_stale_ones() {
        let mut slab = Slab::default();
        let keys: Vec<Key> = (0..4096).map(|i| slab.insert(i)).collect();
        for &key in &keys[100..] {
            slab.remove(key);
        }
        let stale = keys[4000];
        slab.shrink_if_sparse();
        assert_eq!(slab.slots.len(), 100, "the empty tail is gone");
        assert!(slab.slots.capacity() < 4096);
        assert_eq!(slab.get(keys[99]), Some(&99), "live keys still work");
        // Refill past the old end: the slot at the stale key's index is new,
        // and the stale key must not reach it.
        let refill: Vec<Key> = (0..4000).map(|i| slab.insert(i)).collect();
        assert_eq!(slab.get(stale), None);
        assert!(refill.iter().all(|&k| slab.get(k).is_some()));
        assert_eq!(slab.len(), 4100);
    }

    #[test]
    fn keys_round_trip_through_61_bits() {
        let mut slab = Slab::default();
        let mut key = slab.insert(());
        for _ in 0..3 {
            slab.remove(key);
            key = slab.insert(());
        }
        assert_eq!(key.generation, 3);
        let tagged = key.to_bits() | 5 << 61;
        assert_eq!(Key::from_bits(tagged), key);
        assert_eq!(key.to_bits() >> 61, 0, "the top 3 bits stay free");
        // A slot's generation wraps inside its bits.
        slab.slots[0].generation = GENERATION_MASK;
        let last = Key {
            index: 0,
            generation: GENERATION_MASK,
        };
        assert!(slab.remove(last).is_some());
        assert_eq!(slab.slots[0].generation, 0);
    }

    #[test]
    fn iter_lists_live_values_with_their_keys() {
        let mut slab = Slab::default();
        let a = slab.insert("a");
        let b = slab.insert("b");
        slab.remove(a);
        let live: Vec<_> = slab.iter_mut().map(|(k, v)| (k, *v)).collect();
        assert_eq!(live, vec![(b, "b")]);
        assert!(!slab.is_empty());
        slab.remove(b);
        assert!(slab.is_empty());
    }
}
