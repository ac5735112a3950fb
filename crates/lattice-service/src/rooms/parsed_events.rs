//! Stored events kept parsed, for the auth checks of the events that cite them.
//!
//! Every event names its auth events (the create event, the power levels, the sender's
//! membership, …), and nearly every event of a room names the same few. Reading and parsing them
//! again for each event was the largest part of ingesting a remote PDU; this keeps the parsed
//! form of the events read that way.
//!
//! A stored event's record changes in two ways only: a redaction replaces its JSON, and an
//! outlier gets its place (and may be rejected then). The writer of either forgets the event
//! once its write is done; the cache (`user_cache.rs`) keeps a parse only if nothing was
//! forgotten while it was read, so a parse of the record before a change is never kept after it.

use lattice_core::event::Pdu;
use ruma::OwnedEventId;

/// Events kept at most; past it an arbitrary one makes room.
const MAX_PARSED_EVENTS: usize = 8_192;

pub(super) type ParsedEvents = crate::user_cache::KeyedCache<OwnedEventId, Pdu, MAX_PARSED_EVENTS>;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
        cache.insert_if_unchanged(event("old").id(), Arc::new(event("old")), before);
        assert!(cache.get(event("old").id()).is_none());

        let now = cache.generation();
        cache.insert_if_unchanged(event("new").id(), Arc::new(event("new")), now);
        assert_eq!(cache.get(event("new").id()).map(|e| e.object().clone()), Some(event("new").object().clone()));
        cache.forget(event("new").id());
        assert!(cache.get(event("new").id()).is_none());
    }
}
