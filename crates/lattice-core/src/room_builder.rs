//! Builds unsigned room graphs in memory, for tests and benchmarks of the auth rules and state
//! resolution (signatures play no part there). Every room version: v1–v2 events get
//! `$n:hs.test` IDs and `[id, {hashes}]` references.

use std::collections::HashMap;

use ruma::room_version_rules::{EventIdFormatVersion, RoomIdFormatVersion};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId};
use serde_json::{Value, json};

use crate::event::Pdu;
use crate::room_version::RoomVersion;

pub struct RoomBuilder {
    version: RoomVersion,
    room_id: Option<String>,
    events: HashMap<OwnedEventId, Pdu>,
    clock: u64,
}

impl RoomBuilder {
    pub fn new(version: &str) -> Self {
        let version = RoomVersion::parse(version).expect("a supported room version");
        // From v12 the room ID is derived from the create event; before, it is chosen.
        let room_id = match version.rules().room_id_format {
            RoomIdFormatVersion::V1 => Some("!room:hs.test".to_owned()),
            _ => None,
        };
        Self { version, room_id, events: HashMap::new(), clock: 1_000 }
    }

    pub fn version(&self) -> &RoomVersion {
        &self.version
    }

    /// The `m.room.create` event, with the content the room version expects.
    pub fn create(&mut self, creator: &str) -> OwnedEventId {
        let mut content = json!({ "room_version": self.version.id().as_str() });
        if !self.version.rules().authorization.use_room_create_sender {
            content["creator"] = json!(creator);
        }
        let id = self.event(creator, "m.room.create", Some(""), content, &[], &[]);
        self.room_id.get_or_insert_with(|| format!("!{}", &id.as_str()[1..]));
        id
    }

    /// Adds an event; its depth follows its `prev_events`.
    pub fn event(
        &mut self,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        prev: &[&OwnedEventId],
        auth: &[&OwnedEventId],
    ) -> OwnedEventId {
        self.event_with(sender, kind, state_key, content, prev, auth, None)
    }

    /// An `m.room.redaction` of `target`: `redacts` at the top level before v11, in `content` from v11.
    pub fn redaction(
        &mut self,
        sender: &str,
        target: &OwnedEventId,
        prev: &[&OwnedEventId],
        auth: &[&OwnedEventId],
    ) -> OwnedEventId {
        if self.version.rules().redaction.content_field_redacts {
            self.event_with(sender, "m.room.redaction", None, json!({ "redacts": target }), prev, auth, None)
        } else {
            self.event_with(sender, "m.room.redaction", None, json!({}), prev, auth, Some(target))
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event_with(
        &mut self,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        prev: &[&OwnedEventId],
        auth: &[&OwnedEventId],
        redacts: Option<&OwnedEventId>,
    ) -> OwnedEventId {
        self.clock += 1;
        let depth =
            prev.iter().filter_map(|id| self.events.get(*id)).map(|e| u64::from(e.depth())).max().unwrap_or(0) + 1;
        let legacy_ids = self.version.rules().event_id_format == EventIdFormatVersion::V1;
        let references = |ids: &[&OwnedEventId]| -> Vec<Value> {
            ids.iter().map(|id| if legacy_ids { json!([id, { "sha256": "" }]) } else { json!(id) }).collect()
        };
        let mut value = json!({
            "sender": sender, "type": kind, "content": content, "origin_server_ts": self.clock, "depth": depth,
            "prev_events": references(prev), "auth_events": references(auth), "hashes": { "sha256": "" },
            "signatures": {},
        });
        if legacy_ids {
            value["event_id"] = json!(format!("${}:hs.test", self.clock));
        }
        if let Some(room_id) = &self.room_id {
            value["room_id"] = json!(room_id);
        }
        if let Some(state_key) = state_key {
            value["state_key"] = json!(state_key);
        }
        if let Some(target) = redacts {
            value["redacts"] = json!(target);
        }
        let CanonicalJsonValue::Object(object) = CanonicalJsonValue::try_from(value).expect("canonical") else {
            unreachable!("built as an object")
        };
        self.insert(object)
    }

    fn insert(&mut self, object: CanonicalJsonObject) -> OwnedEventId {
        let pdu = Pdu::new(object, &self.version).expect("builder events are well-formed");
        let id = pdu.id().to_owned();
        self.events.insert(id.clone(), pdu);
        id
    }

    pub fn get(&self, id: &EventId) -> Option<&Pdu> {
        self.events.get(id)
    }
}
