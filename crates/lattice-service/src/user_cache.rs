//! A bounded in-memory map from a key to a value derived from stored data (a user's parsed push
//! rules, their ignored users, a stored event parsed, a room's members sorted for push rules), for
//! reads on the hot path of every event.
//! The writer of the stored data calls [`KeyedCache::forget`] after each write. A reader that
//! missed takes the [`KeyedCache::generation`] before reading the store and inserts what it read
//! only if no `forget` happened since, so a value read before a change is never cached after it.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ruma::OwnedUserId;

/// At most this many users' values are kept; past it an arbitrary one makes room.
const MAX_CACHED_USERS: usize = 100_000;

/// Per-user values.
pub(crate) type UserCache<T> = KeyedCache<OwnedUserId, T, MAX_CACHED_USERS>;

/// At most `MAX` values are kept; past it an arbitrary one makes room.
pub(crate) struct KeyedCache<K, T, const MAX: usize> {
    values: Mutex<HashMap<K, Arc<T>>>,
    generation: AtomicU64,
}

impl<K, T, const MAX: usize> Default for KeyedCache<K, T, MAX> {
    fn default() -> Self {
        Self { values: Mutex::new(HashMap::new()), generation: AtomicU64::new(0) }
    }
}

impl<K: Eq + Hash + Clone, T, const MAX: usize> KeyedCache<K, T, MAX> {
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<T>>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(key).cloned()
    }

    /// Taken before a reader that missed reads the store.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn insert_if_unchanged<Q>(&self, key: &Q, value: Arc<T>, generation: u64)
    where
        K: Borrow<Q>,
        Q: ToOwned<Owned = K> + ?Sized,
    {
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Read under the lock that `forget` bumps it under: no change slips in between.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if values.len() >= MAX
            && let Some(any) = values.keys().next().cloned()
        {
            values.remove::<K>(&any);
        }
        values.insert(key.to_owned(), value);
    }

    /// The key's value from the cache, else from `load` (the store), cached unless a `forget`
    /// happened while it was read.
    pub(crate) async fn get_or_load<Q, E>(&self, key: &Q, load: impl Future<Output = Result<T, E>>) -> Result<Arc<T>, E>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(value) = self.get(key) {
            return Ok(value);
        }
        let generation = self.generation();
        let value = Arc::new(load.await?);
        self.insert_if_unchanged(key, value.clone(), generation);
        Ok(value)
    }

    /// Drops the key's value after (or on failure of) a write of what it is derived from.
    pub(crate) fn forget<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        values.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use ruma::user_id;

    use super::*;

    #[test]
    fn a_value_read_before_a_change_is_not_cached_after_it() {
        let cache = UserCache::<u32>::default();
        let alice = user_id!("@alice:hs.test");
        let before = cache.generation();
        cache.forget(alice);
        cache.insert_if_unchanged(alice, Arc::new(1), before);
        assert_eq!(cache.get(alice), None);
        cache.insert_if_unchanged(alice, Arc::new(2), cache.generation());
        assert_eq!(cache.get(alice).as_deref(), Some(&2));
        cache.forget(alice);
        assert_eq!(cache.get(alice), None);
    }
}
