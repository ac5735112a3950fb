//! Stored events kept parsed, for the auth checks of the events that cite them.
//!
//! Every event names its auth events (the create event, the power levels, the sender's
//! membership, …), and nearly every event of a room names the same few. Reading and parsing them
//! again for each event was the largest part of ingesting a remote PDU; this keeps the parsed
//! form of the events read that way.
//!
//! A stored event's record changes in two ways only: a redaction replaces its JSON, and an
//! outlier gets its place (and may be rejected then). The writer of either forgets the event
//! once its write is done. A reader that missed takes the generation before it reads the store
//! and keeps what it parsed only if nothing was forgotten meanwhile, so a parse of the record
//! before a change is never kept after it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use lattice_core::event::Pdu;
use ruma::{EventId, OwnedEventId};

/// Events kept at most. Full, the cache starts again empty: the events every new event cites
/// are back after the next few.
const MAX_PARSED_EVENTS: usize = 8_192;

#[derive(Default)]
pub(super) struct ParsedEvents {
    events: Mutex<HashMap<OwnedEventId, Pdu>>,
    generation: AtomicU64,
}

impl ParsedEvents {
    pub(super) fn get(&self, event_id: &EventId) -> Option<Pdu> {
        self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(event_id).cloned()
    }

    /// Taken before a reader that missed reads the store.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps `event` as read from the store, unless an event was forgotten since `generation`.
    pub(super) fn insert_if_unchanged(&self, event: &Pdu, generation: u64) {
        let mut events = self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Read under the lock `forget` bumps it under: no change slips in between.
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if events.len() >= MAX_PARSED_EVENTS {
            events.clear();
        }
        events.insert(event.id().to_owned(), event.clone());
    }

    /// Called after a write that changed the stored record of `event_id`.
    pub(super) fn forget(&self, event_id: &EventId) {
        let mut events = self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        events.remove(event_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_core::room_version::RoomVersion;
    use ruma::CanonicalJsonObject;

    fn event(body: &str) -> Pdu {
        let object: CanonicalJsonObject = serde_json::from_value(serde_json::json!({
            "room_id": "!r:remote.test", "sender": "@a:remote.test", "type": "m.room.message",
            "content": { "body": body }, "origin_server_ts": 1, "depth": 2,
            "prev_events": [], "auth_events": [], "hashes": { "sha256": "x" }, "signatures": {},
        }))
        .unwrap();
        let version = RoomVersion::parse("10").unwrap();
        Pdu::stored(object, &version, OwnedEventId::try_from("$e").unwrap()).unwrap()
    }

    #[test]
    fn a_parse_read_before_a_change_is_not_kept_after_it() {
        let cache = ParsedEvents::default();
        let before = cache.generation();
        // The record changes (e.g. is redacted) while the reader parses its old form.
        cache.forget(event("old").id());
        cache.insert_if_unchanged(&event("old"), before);
        assert!(cache.get(event("old").id()).is_none());

        let now = cache.generation();
        cache.insert_if_unchanged(&event("new"), now);
        assert_eq!(cache.get(event("new").id()).map(|e| e.object().clone()), Some(event("new").object().clone()));
        cache.forget(event("new").id());
        assert!(cache.get(event("new").id()).is_none());
    }
}
