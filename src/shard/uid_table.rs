//! The shard-local uid table: uid → this shard's connections logged in
//! with it.
//!
//! Every connection of a uid lives on the uid's home shard (a connection is
//! handed over to it at login, see `router.rs`), so this table is the whole
//! truth about a uid: no directory of other shards, and only this shard's
//! thread ever touches it, so it takes no lock.
//!
//! A uid string is allocated once as an `Arc<str>` and shared by the map key
//! and every connection logged in with it.

use std::collections::HashMap;
use std::sync::Arc;

use smallvec::SmallVec;

use super::slab::Key;

/// Most uids have one connection, so one key is stored inline.
type Conns = SmallVec<[Key; 1]>;

#[derive(Default)]
/// uid → this shard's connections logged in with it.
pub struct UidTable {
    local: HashMap<Arc<str>, Conns>,
}

impl UidTable {
    /// Adds a connection of `uid`; returns the shared uid and whether it is
    /// the uid's first connection.
    pub fn add(&mut self, uid: &str, key: Key) -> (Arc<str>, bool) {
        if let Some(conns) = self.local.get_mut(uid) {
            conns.push(key);
            let (shared, _) = self.local.get_key_value(uid).expect("just found");
            return (shared.clone(), false);
        }
        let shared: Arc<str> = Arc::from(uid);
        self.local.insert(shared.clone(), SmallVec::from_buf([key]));
        (shared, true)
    }

    /// Removes a connection. Returns true when it was the uid's last one.
    pub fn remove(&mut self, uid: &str, key: Key) -> bool {
        let Some(conns) = self.local.get_mut(uid) else {
            return false;
        };
        conns.retain(|k| *k != key);
        if !conns.is_empty() {
            return false;
        }
        self.local.remove(uid);
        true
    }

    /// The connections of `uid`.
    pub fn get(&self, uid: &str) -> &[Key] {
        self.local.get(uid).map(|c| c.as_slice()).unwrap_or(&[])
    }

    /// Every logged-in connection.
    pub fn all(&self) -> impl Iterator<Item = Key> + '_ {
        self.local.values().flatten().copied()
    }

    /// Gives memory back once at most a quarter of the table is in use;
    /// returns whether it did.
    pub fn shrink_if_sparse(&mut self) -> bool {
        let sparse = self.local.capacity() >= 1024 && self.local.len() * 4 <= self.local.capacity();
        if sparse {
            self.local.shrink_to(self.local.len() * 2);
        }
        sparse
    }

    /// Distinct uids.
    pub fn len(&self) -> usize {
        self.local.len()
    }

    /// No uid at all.
    pub fn is_empty(&self) -> bool {
        self.local.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::slab::Slab;

    #[test]
    fn connections_come_and_go() {
        let mut slab = Slab::default();
        let (a, b, c) = (slab.insert(()), slab.insert(()), slab.insert(()));
        let mut t = UidTable::default();
        let (uid, first) = t.add("bob", a);
        assert!(first);
        let (uid2, first) = t.add("bob", b);
        assert!(!first);
        assert!(Arc::ptr_eq(&uid, &uid2), "one allocation per uid");
        t.add("eve", c);
        assert_eq!(t.get("bob"), &[a, b]);
        assert_eq!(t.get("nobody"), &[] as &[Key]);
        assert_eq!(t.all().count(), 3);
        assert!(!t.remove("bob", a));
        assert!(t.remove("bob", b));
        assert!(!t.remove("bob", b), "removing twice is harmless");
        assert_eq!(t.len(), 1);
        assert!(t.remove("eve", c));
        assert!(t.is_empty());
    }

    #[test]
    fn an_emptied_table_gives_its_memory_back() {
        let mut slab = Slab::default();
        let mut t = UidTable::default();
        let keys: Vec<Key> = (0..5000).map(|_| slab.insert(())).collect();
        for (i, &k) in keys.iter().enumerate() {
            t.add(&format!("u{i}"), k);
        }
        let full = t.local.capacity();
        for (i, &k) in keys.iter().enumerate().skip(10) {
            t.remove(&format!("u{i}"), k);
        }
        t.shrink_if_sparse();
        assert!(
            t.local.capacity() < full / 10,
            "{} of {full}",
            t.local.capacity()
        );
        assert_eq!(t.get("u3"), &[keys[3]]);
    }
}
