//! A PDU that passed the format checks, with its fields typed for auth and state resolution.

use ruma::events::TimelineEventType;
use ruma::room_version_rules::EventsReferenceFormatVersion;
use ruma::{
    CanonicalJsonObject, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt,
    UserId,
};
use serde::Deserialize;
use serde_json::value::RawValue as RawJsonValue;

use crate::pdu::{self, PduError};
use crate::room_version::RoomVersion;

/// An event of a room, as the auth rules and state resolution see it. Built only from an object
/// that passed [`pdu::check_format`], so every field here is present and well-formed.
#[derive(Clone, Debug)]
pub struct Pdu {
    event_id: OwnedEventId,
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    kind: TimelineEventType,
    content: Box<RawJsonValue>,
    state_key: Option<String>,
    prev_events: Vec<OwnedEventId>,
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    depth: UInt,
    rejected: bool,
    object: CanonicalJsonObject,
}

#[derive(Deserialize)]
struct Fields {
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawJsonValue>,
    state_key: Option<String>,
    prev_events: Vec<serde_json::Value>,
    auth_events: Vec<serde_json::Value>,
    redacts: Option<OwnedEventId>,
    depth: UInt,
}

#[derive(Deserialize)]
struct RedactsInContent {
    redacts: Option<OwnedEventId>,
}

impl Pdu {
    /// Checks the format of an event, computes its ID and types its fields.
    pub fn new(object: CanonicalJsonObject, version: &RoomVersion) -> Result<Self, PduError> {
        pdu::check_format(&object, version)?;
        let event_id = pdu::event_id(&object, version)?;
        Self::stored(object, version, event_id)
    }

    /// An event read back from storage, where it was stored under `event_id` after passing the
    /// checks of [`Pdu::new`]; skips recomputing its reference hash.
    pub fn stored(
        object: CanonicalJsonObject,
        version: &RoomVersion,
        event_id: OwnedEventId,
    ) -> Result<Self, PduError> {
        let bytes = serde_json::to_vec(&object).map_err(|e| PduError::Format(e.to_string()))?;
        let fields: Fields = serde_json::from_slice(&bytes).map_err(|e| PduError::Format(e.to_string()))?;
        let format = version.rules().events_reference_format;
        let references = |values: Vec<serde_json::Value>| -> Result<Vec<OwnedEventId>, PduError> {
            values.iter().map(|value| reference_id(value, format)).collect()
        };
        // From v11 a redaction names its target in `content`; before, at the top level.
        let redacts = match (&fields.kind, fields.redacts) {
            (TimelineEventType::RoomRedaction, None) => {
                serde_json::from_str::<RedactsInContent>(fields.content.get()).ok().and_then(|c| c.redacts)
            }
            (_, top_level) => top_level,
        };
        Ok(Self {
            event_id,
            room_id: fields.room_id,
            sender: fields.sender,
            origin_server_ts: fields.origin_server_ts,
            kind: fields.kind,
            content: fields.content,
            state_key: fields.state_key,
            prev_events: references(fields.prev_events)?,
            auth_events: references(fields.auth_events)?,
            redacts,
            depth: fields.depth,
            rejected: false,
            object,
        })
    }

    pub fn id(&self) -> &EventId {
        &self.event_id
    }

    pub fn depth(&self) -> UInt {
        self.depth
    }

    pub fn kind(&self) -> &TimelineEventType {
        &self.kind
    }

    pub fn prev_event_ids(&self) -> &[OwnedEventId] {
        &self.prev_events
    }

    pub fn auth_event_ids(&self) -> &[OwnedEventId] {
        &self.auth_events
    }

    pub fn object(&self) -> &CanonicalJsonObject {
        &self.object
    }

    /// Marks the event as having failed its checks; state resolution then ignores it.
    pub fn mark_rejected(&mut self) {
        self.rejected = true;
    }
}

fn reference_id(value: &serde_json::Value, format: EventsReferenceFormatVersion) -> Result<OwnedEventId, PduError> {
    let id = match (format, value) {
        (EventsReferenceFormatVersion::V1, serde_json::Value::Array(pair)) => pair.first().and_then(|v| v.as_str()),
        (_, serde_json::Value::String(id)) => Some(id.as_str()),
        _ => None,
    };
    let id = id.ok_or_else(|| PduError::Format(format!("bad event reference {value}")))?;
    EventId::parse(id).map_err(|e| PduError::Format(format!("bad event reference {id:?}: {e}")))
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawJsonValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        self.rejected
    }
}
