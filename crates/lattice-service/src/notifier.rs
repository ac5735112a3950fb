//! Wakes waiting `/sync` long-polls, each only for what concerns its user: writes to the rooms
//! the user is in (or invited to, or knocking on), and the user's own news (a membership of
//! theirs, their account data, their to-device messages).
//!
//! A waiter registers before it looks for news, so a write that lands between the look and the
//! wait is not lost: `Notify` keeps one permit for a waiter that is not waiting yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ruma::{RoomId, UserId};
use tokio::sync::Notify;

/// What a waiter listens to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Topic {
    User(String),
    Room(String),
}

#[derive(Default)]
pub(crate) struct Notifier {
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// Topic → waiter ID → the waiter's wake-up.
    topics: HashMap<Topic, HashMap<u64, Arc<Notify>>>,
    waiters: usize,
    /// Wake-ups sent to waiters since start.
    wakeups: u64,
}

/// One waiting `/sync`: registered under its topics until dropped.
pub(crate) struct Listener {
    notifier: Arc<Notifier>,
    id: u64,
    topics: Vec<Topic>,
    wake: Arc<Notify>,
}

/// How many `/sync` requests are waiting for news; for tests and benchmarks that must know a
/// long-poll is asleep before they write.
#[derive(Clone)]
pub struct SyncWaiters(pub(crate) Arc<Notifier>);

impl SyncWaiters {
    pub fn count(&self) -> usize {
        self.0.lock().waiters
    }

    /// Wake-ups sent to waiting syncs since the server started.
    pub fn wakeups(&self) -> u64 {
        self.0.lock().wakeups
    }
}

impl Notifier {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a waiter for `user_id`'s own news and for writes to `rooms`.
    pub(crate) fn listen<'a>(
        self: &Arc<Self>,
        user_id: &UserId,
        rooms: impl IntoIterator<Item = &'a RoomId>,
    ) -> Listener {
        let topics: Vec<Topic> = std::iter::once(Topic::User(user_id.to_string()))
            .chain(rooms.into_iter().map(|room| Topic::Room(room.to_string())))
            .collect();
        let wake = Arc::new(Notify::new());
        let mut registry = self.lock();
        let id = registry.next_id;
        registry.next_id += 1;
        registry.waiters += 1;
        for topic in &topics {
            registry.topics.entry(topic.clone()).or_default().insert(id, wake.clone());
        }
        Listener { notifier: self.clone(), id, topics, wake }
    }

    pub(crate) fn notify_user(&self, user_id: &UserId) {
        self.notify(&Topic::User(user_id.to_string()));
    }

    pub(crate) fn notify_room(&self, room_id: &RoomId) {
        self.notify(&Topic::Room(room_id.to_string()));
    }

    fn notify(&self, topic: &Topic) {
        let mut registry = self.lock();
        let mut sent = 0;
        for wake in registry.topics.get(topic).into_iter().flat_map(HashMap::values) {
            wake.notify_one();
            sent += 1;
        }
        registry.wakeups += sent;
    }
}

impl Listener {
    /// Resolves at the first notification since registering (or since the last one taken).
    pub(crate) async fn notified(&self) {
        self.wake.notified().await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut registry = self.notifier.lock();
        registry.waiters -= 1;
        for topic in &self.topics {
            if let Some(waiters) = registry.topics.get_mut(topic) {
                waiters.remove(&self.id);
                if waiters.is_empty() {
                    registry.topics.remove(topic);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> ruma::OwnedUserId {
        UserId::parse(format!("@{name}:hs")).expect("valid user")
    }

    fn room(name: &str) -> ruma::OwnedRoomId {
        RoomId::parse(format!("!{name}:hs")).expect("valid room")
    }

    #[tokio::test]
    async fn only_the_concerned_waiter_wakes() {
        let notifier = Arc::new(Notifier::default());
        let (alice, bob) = (user("alice"), user("bob"));
        let (ours, theirs) = (room("ours"), room("theirs"));
        let listener = notifier.listen(&alice, [&*ours]);
        notifier.notify_room(&theirs);
        notifier.notify_user(&bob);
        // A zero timeout polls once: it resolves only if a wake-up is already stored.
        let woken = tokio::time::timeout(std::time::Duration::ZERO, listener.notified()).await;
        assert!(woken.is_err(), "a write elsewhere must not wake the waiter");
        // A notification sent before the wait starts is kept for it.
        notifier.notify_room(&ours);
        listener.notified().await;
        notifier.notify_user(&alice);
        listener.notified().await;
    }

    #[test]
    fn dropping_a_listener_unregisters_it() {
        let notifier = Arc::new(Notifier::default());
        let waiters = SyncWaiters(notifier.clone());
        let (a, b) = (room("a"), room("b"));
        let listener = notifier.listen(&user("alice"), [&*a, &*b]);
        assert_eq!(waiters.count(), 1);
        drop(listener);
        assert_eq!(waiters.count(), 0);
        assert!(notifier.lock().topics.is_empty());
    }
}
