//! The shard-local uid tables.
//!
//! A shard keeps two maps, and takes no lock for either: only it touches them.
//! - *Local*: uid → this shard's connections logged in with it. Split by the
//!   uid's home shard, so a broadcast forwarded by home shard H walks exactly
//!   the connections whose messages pass through H (see `router.rs`).
//! - *Directory*: for the uids whose home is this shard, the shards that host
//!   at least one of their connections. A host registers on its first local
//!   connection of a uid and unregisters after its last, in order, over its
//!   FIFO inbox, so a set of shard ids is enough.
//!
//! A uid string is allocated once per shard as an `Arc<str>` and shared by the
//! map key, the connection that logged in with it, and the messages that name it.

use std::collections::HashMap;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::router::ShardId;
use crate::slab::Key;

/// Most uids have one connection, so one key is stored inline.
type Conns = SmallVec<[Key; 1]>;
/// Most uids live on one shard, so two ids are stored inline.
type Hosts = SmallVec<[ShardId; 2]>;

pub struct UidTable {
    /// Local connections by uid, one map per home shard of the uid.
    local: Vec<HashMap<Arc<str>, Conns>>,
    /// Hosting shards of the uids whose home is this shard.
    directory: HashMap<Arc<str>, Hosts>,
}

impl UidTable {
    pub fn new(shards: usize) -> UidTable {
        UidTable {
            local: (0..shards).map(|_| HashMap::new()).collect(),
            directory: HashMap::new(),
        }
    }

    /// Adds a local connection of `uid` (homed at `home`). Returns the shared
    /// uid and whether it is the first local connection of that uid (so the
    /// home must learn that this shard hosts it).
    pub fn add_local(&mut self, uid: &str, home: ShardId, key: Key) -> (Arc<str>, bool) {
        let map = &mut self.local[home as usize];
        if let Some(conns) = map.get_mut(uid) {
            conns.push(key);
            let (shared, _) = map.get_key_value(uid).expect("just found");
            return (shared.clone(), false);
        }
        let shared: Arc<str> = Arc::from(uid);
        map.insert(shared.clone(), SmallVec::from_buf([key]));
        (shared, true)
    }

    /// Removes a local connection. Returns true when it was the uid's last
    /// one here (so the home must learn that this shard no longer hosts it).
    pub fn remove_local(&mut self, uid: &str, home: ShardId, key: Key) -> bool {
        let map = &mut self.local[home as usize];
        let Some(conns) = map.get_mut(uid) else {
            return false;
        };
        conns.retain(|k| *k != key);
        if !conns.is_empty() {
            return false;
        }
        map.remove(uid);
        true
    }

    /// This shard's connections of `uid`.
    pub fn local(&self, uid: &str, home: ShardId) -> &[Key] {
        self.local[home as usize]
            .get(uid)
            .map(|c| c.as_slice())
            .unwrap_or(&[])
    }

    /// Every local logged-in connection whose uid is homed at `home`.
    pub fn local_by_home(&self, home: ShardId) -> impl Iterator<Item = Key> + '_ {
        self.local[home as usize].values().flatten().copied()
    }

    /// Records that `host` has a connection of `uid`. Returns true when the
    /// uid was new to the directory.
    pub fn register_host(&mut self, uid: Arc<str>, host: ShardId) -> bool {
        let mut added = false;
        let hosts = self.directory.entry(uid).or_insert_with(|| {
            added = true;
            SmallVec::new()
        });
        if !hosts.contains(&host) {
            hosts.push(host);
        }
        added
    }

    /// Records that `host` no longer has a connection of `uid`. Returns true
    /// when the uid left the directory.
    pub fn unregister_host(&mut self, uid: &str, host: ShardId) -> bool {
        let Some(hosts) = self.directory.get_mut(uid) else {
            return false;
        };
        hosts.retain(|h| *h != host);
        if !hosts.is_empty() {
            return false;
        }
        self.directory.remove(uid);
        true
    }

    /// The shards hosting a connection of `uid` (a uid homed here).
    pub fn hosts(&self, uid: &str) -> &[ShardId] {
        self.directory.get(uid).map(|h| h.as_slice()).unwrap_or(&[])
    }

    /// Distinct uids with a local connection.
    pub fn local_len(&self) -> usize {
        self.local.iter().map(HashMap::len).sum()
    }

    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slab::Slab;

    #[test]
    fn local_connections_come_and_go() {
        let mut slab = Slab::default();
        let (a, b) = (slab.insert(()), slab.insert(()));
        let mut t = UidTable::new(2);
        let (uid, first) = t.add_local("bob", 1, a);
        assert!(first);
        let (uid2, first) = t.add_local("bob", 1, b);
        assert!(!first);
        assert!(Arc::ptr_eq(&uid, &uid2), "one allocation per uid");
        assert_eq!(t.local("bob", 1), &[a, b]);
        assert_eq!(t.local("bob", 0), &[] as &[Key]);
        assert_eq!(t.local_by_home(1).count(), 2);
        assert_eq!(t.local_by_home(0).count(), 0);
        assert!(!t.remove_local("bob", 1, a));
        assert!(t.remove_local("bob", 1, b));
        assert_eq!(t.local_len(), 0);
    }

    #[test]
    fn directory_tracks_hosts() {
        let mut t = UidTable::new(4);
        assert!(t.register_host("eve".into(), 2));
        assert!(!t.register_host("eve".into(), 3));
        assert!(!t.register_host("eve".into(), 3));
        assert_eq!(t.hosts("eve"), &[2, 3]);
        assert!(!t.unregister_host("eve", 2));
        assert!(t.unregister_host("eve", 3));
        assert_eq!(t.hosts("eve"), &[] as &[ShardId]);
        assert_eq!(t.directory_len(), 0);
    }
}
