//! A map with a fixed capacity, for caches keyed by what peers control (server names, key IDs):
//! it never grows past its capacity, whatever they send.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

pub struct BoundedMap<K, V> {
    entries: HashMap<K, (V, u64)>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a bounded map needs room for one entry");
        Self { entries: HashMap::new(), capacity }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|(value, _)| value)
    }

    /// Inserts `value`, stamped `now_ms`. When full, the entry inserted longest ago goes (a scan,
    /// but only on insert into a full map, which a cache of this size rarely sees).
    pub fn insert(&mut self, key: K, value: V, now_ms: u64) {
        if !self.entries.contains_key(&key)
            && self.entries.len() >= self.capacity
            && let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, stamp))| *stamp).map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
        self.entries.insert(key, (value, now_ms));
        debug_assert!(self.entries.len() <= self.capacity);
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.remove(key).map(|(value, _)| value)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_drops_its_oldest_entry() {
        let mut map = BoundedMap::new(2);
        map.insert("a", 1, 10);
        map.insert("b", 2, 20);
        map.insert("a", 3, 30);
        map.insert("c", 4, 40);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("b"), None);
        assert_eq!(map.get("a"), Some(&3));
        assert_eq!(map.get("c"), Some(&4));
    }
}
