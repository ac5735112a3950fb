//! A bounded in-memory map from user to a value derived from that user's stored data (their
//! parsed push rules, their ignored users), for reads on the hot path of every event. The one
//! writer of the stored data calls [`UserCache::forget`] after each write. A reader that missed
//! takes the [`UserCache::generation`] before reading the store and inserts what it read only if
//! no `forget` happened since, so a value read before a change is never cached after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ruma::{OwnedUserId, UserId};

/// At most this many users' values are kept; past it an arbitrary one makes room.
const MAX_CACHED_USERS: usize = 100_000;

pub(crate) struct UserCache<T> {
    values: Mutex<HashMap<OwnedUserId, Arc<T>>>,
    generation: AtomicU64,
}

impl<T> Default for UserCache<T> {
    fn default() -> Self {
        Self { values: Mutex::new(HashMap::new()), generation: AtomicU64::new(0) }
    }
}

impl<T> UserCache<T> {
    pub(crate) fn get(&self, user_id: &UserId) -> Option<Arc<T>> {
        self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(user_id).cloned()
    }

    /// Taken before a reader that missed reads the store.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn insert_if_unchanged(&self, user_id: &UserId, value: Arc<T>, generation: u64) {
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Read under the lock that `forget` bumps it under: no change slips in between.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if values.len() >= MAX_CACHED_USERS
            && let Some(any) = values.keys().next().cloned()
        {
            values.remove(&any);
        }
        values.insert(user_id.to_owned(), value);
    }

    /// The user's value from the cache, else from `load` (the store), cached unless a
    /// `forget` happened while it was read.
    pub(crate) async fn get_or_load<E>(
        &self,
        user_id: &UserId,
        load: impl Future<Output = Result<T, E>>,
    ) -> Result<Arc<T>, E> {
        if let Some(value) = self.get(user_id) {
            return Ok(value);
        }
        let generation = self.generation();
        let value = Arc::new(load.await?);
        self.insert_if_unchanged(user_id, value.clone(), generation);
        Ok(value)
    }

    /// Drops the user's value after (or on failure of) a write of what it is derived from.
    pub(crate) fn forget(&self, user_id: &UserId) {
        let mut values = self.values.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        values.remove(user_id);
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
