//! Building the events this server's users create: prev events from the forward extremities,
//! auth events chosen by the auth rules from the current state, depth, timestamp, content hash
//! and this server's signature. The result goes through `ingest` like any remote event.

use lattice_core::event::Pdu;
use lattice_core::pdu;
use lattice_core::room_version::RoomVersion;
use lattice_storage::records::{EventRecord, RoomRecord};
use lattice_storage::{Table, keys};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::{EventIdFormatVersion, EventsReferenceFormatVersion};
use ruma::signatures::reference_hash;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, UserId};
use serde_json::{Value, json};

use super::Rooms;
use crate::ServiceError;

/// The spec's limit on `prev_events` (and so on how many extremities one event merges).
const MAX_PREV_EVENTS: usize = 20;

/// An event a local user wants to send.
pub struct LocalEvent<'a> {
    /// `None` only for the create event of a room version that derives the room ID from it.
    pub room_id: Option<&'a RoomId>,
    pub sender: &'a UserId,
    pub kind: &'a str,
    pub state_key: Option<&'a str>,
    pub content: Value,
}

impl Rooms {
    /// Builds and signs `event` on top of the room's current state. A redaction must pass the
    /// client rule (own event, or the `redact` level); callers hold the room's lock, so it is
    /// checked against the state the event is built on.
    pub async fn build_local_event(&self, version: &RoomVersion, event: LocalEvent<'_>) -> Result<Pdu, ServiceError> {
        check_type_and_state_key(event.kind, event.state_key)?;
        if event.kind == TimelineEventType::RoomRedaction.to_string()
            && let Some(room_id) = event.room_id
        {
            self.check_client_redaction(version, event.sender, room_id, &event.content).await?;
        }
        let content =
            serde_json::value::to_raw_value(&event.content).map_err(|e| ServiceError::BadJson(e.to_string()))?;
        let (prev, auth) = match event.room_id {
            Some(room_id) if event.kind != TimelineEventType::RoomCreate.to_string() => {
                let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str()))
                    .await?
                    .ok_or_else(|| ServiceError::NotFound(format!("unknown room {room_id}")))?;
                if room.value.room_version != version.id().as_str() {
                    return Err(ServiceError::BadJson(format!(
                        "room {room_id} is version {}",
                        room.value.room_version
                    )));
                }
                // The newest extremities, if there are more than one event may cite.
                let extremities = &room.value.forward_extremities;
                let prev = extremities[extremities.len().saturating_sub(MAX_PREV_EVENTS)..]
                    .iter()
                    .map(|id| OwnedEventId::try_from(id.as_str()).map_err(|e| ServiceError::Internal(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                let wanted = ruma::state_res::auth_types_for_event(
                    &TimelineEventType::from(event.kind),
                    event.sender,
                    event.state_key,
                    &content,
                    &version.rules().authorization,
                )
                .map_err(ServiceError::BadJson)?;
                let mut auth = Vec::new();
                for (kind, key) in wanted {
                    if let Some(id) = self
                        .kv
                        .get(Table::CurrentState, &keys::current_state(room_id.as_str(), &kind.to_string(), &key))
                        .await?
                    {
                        let id = String::from_utf8(id).map_err(|e| ServiceError::Internal(e.to_string()))?;
                        auth.push(OwnedEventId::try_from(id).map_err(|e| ServiceError::Internal(e.to_string()))?);
                    }
                }
                (prev, auth)
            }
            _ => (Vec::new(), Vec::new()),
        };
        let mut depth = 0_u64;
        let mut prev_refs = Vec::with_capacity(prev.len());
        let mut auth_refs = Vec::with_capacity(auth.len());
        for (ids, refs) in [(&prev, &mut prev_refs), (&auth, &mut auth_refs)] {
            for id in ids {
                let stored = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(id.as_str()))
                    .await?
                    .ok_or_else(|| ServiceError::MissingEvents(id.to_string()))?;
                let object: CanonicalJsonObject =
                    serde_json::from_str(&stored.value.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
                if let Some(CanonicalJsonValue::Integer(d)) = object.get("depth") {
                    depth = depth.max(u64::try_from(i64::from(*d)).unwrap_or(0));
                }
                refs.push(reference(id, &object, version)?);
            }
        }
        let depth = if prev.is_empty() { 1 } else { depth.saturating_add(1) };

        let mut value = json!({
            "sender": event.sender, "type": event.kind, "content": event.content,
            "origin": self.server_name().as_str(), "origin_server_ts": self.now_ms(), "depth": depth,
            "prev_events": prev_refs, "auth_events": auth_refs,
        });
        if let Some(room_id) = event.room_id {
            value["room_id"] = json!(room_id);
        }
        if let Some(key) = event.state_key {
            value["state_key"] = json!(key);
        }
        // Clients name a redaction's target in `content.redacts`; before v11 it belongs at the
        // top level of the event.
        if event.kind == TimelineEventType::RoomRedaction.to_string()
            && !version.rules().redaction.content_field_redacts
            && let Some(target) = value["content"].as_object_mut().and_then(|c| c.remove("redacts"))
        {
            value["redacts"] = target;
        }
        if version.rules().event_id_format == EventIdFormatVersion::V1 {
            value["event_id"] = json!(format!("${}:{}", crate::secrets::random_alphanumeric(18), self.server_name()));
        }
        let mut object = match CanonicalJsonValue::try_from(value) {
            Ok(CanonicalJsonValue::Object(object)) => object,
            Ok(_) => return Err(ServiceError::Internal("event is not an object".into())),
            Err(e) => return Err(ServiceError::BadJson(format!("content is not canonical JSON: {e}"))),
        };
        // The signer refuses more than MAX_PDU_BYTES - 1 bytes (an event that big cannot fit once
        // signed anyway); that is the client's error, so it is said before signing.
        check_pdu_size(&object, lattice_core::limits::MAX_PDU_BYTES - 1)?;
        pdu::hash_and_sign(&mut object, self.server_name().as_str(), &self.signing_key, version)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        // The limit itself applies to the signed event, as other servers will see it.
        check_pdu_size(&object, lattice_core::limits::MAX_PDU_BYTES)?;
        Pdu::new(object, version).map_err(|e| ServiceError::BadJson(e.to_string()))
    }
}

/// The one check of an event's type and state key, for every event this server builds (and
/// `createRoom` before it starts a room).
pub(crate) fn check_type_and_state_key(kind: &str, state_key: Option<&str>) -> Result<(), ServiceError> {
    lattice_core::limits::check_event_type(kind).map_err(ServiceError::BadJson)?;
    if let Some(key) = state_key {
        lattice_core::limits::check_state_key(key).map_err(ServiceError::BadJson)?;
    }
    Ok(())
}

/// Refuses an event whose JSON is longer than `limit` bytes with `M_TOO_LARGE`.
fn check_pdu_size(object: &CanonicalJsonObject, limit: usize) -> Result<(), ServiceError> {
    let size = serde_json::to_vec(object).map(|bytes| bytes.len()).unwrap_or(usize::MAX);
    if size > limit {
        return Err(ServiceError::TooLarge { what: "the event", limit: lattice_core::limits::MAX_PDU_BYTES });
    }
    Ok(())
}

/// How a PDU of this room version refers to another event.
pub(super) fn reference(
    id: &OwnedEventId,
    object: &CanonicalJsonObject,
    version: &RoomVersion,
) -> Result<Value, ServiceError> {
    Ok(match version.rules().events_reference_format {
        EventsReferenceFormatVersion::V1 => {
            let hash = reference_hash(object, version.rules()).map_err(|e| ServiceError::Internal(e.to_string()))?;
            json!([id, { "sha256": hash }])
        }
        _ => json!(id),
    })
}
