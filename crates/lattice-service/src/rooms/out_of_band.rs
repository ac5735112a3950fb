//! Memberships of this server's users in rooms this server is not in: an invite from another
//! server, the rejection of one, or the inviting server taking it back. Nothing here knows the
//! room's state, so the membership event is stored as an outlier and the membership is kept
//! beside the room's own `memberships` rows, with the stripped state the inviting server sent
//! for clients to show. The room's own rows take over (and end the record) once this server is
//! in the room.

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_storage::records::{EventRecord, EventStatus, OutOfBandRecord};
use lattice_storage::{Table, WriteBatch, keys};
use ruma::room_version_rules::EventIdFormatVersion;
use ruma::state_res::Event;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, UserId};
use serde_json::{Value, json};

use super::Rooms;
use super::ingest::{membership_of, room_id_of};
use crate::ServiceError;

impl Rooms {
    /// Records `event`, a membership event of a local user (its state key) in a room this
    /// server is not in, as that user's membership, at a new stream position so `/sync` shows
    /// it once. The caller checked the event's signatures and that it came from the sender's
    /// server. Recording the same event again changes nothing. Returns the stream position, or
    /// `None` when this server is in the room after all (the event then comes through the room).
    pub async fn record_out_of_band(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        stripped_state: Vec<Value>,
    ) -> Result<Option<u64>, ServiceError> {
        let room_id = room_id_of(event)?;
        let user_id = event
            .state_key()
            .and_then(|key| UserId::parse(key).ok())
            .filter(|user| user.server_name() == self.server_name())
            .ok_or_else(|| ServiceError::BadJson("not a membership event of a user of this server".into()))?;
        let _room = self.room_lock(room_id.as_str()).lock().await;
        // A room this server is in hears of its members through the room itself.
        if self.server_in_room(self.server_name(), &room_id).await? {
            return Ok(None);
        }
        let index = keys::membership(user_id.as_str(), room_id.as_str());
        let existing = lattice_storage::get::<OutOfBandRecord>(self.kv.as_ref(), &index).await?;
        if let Some(existing) = &existing
            && existing.value.event_id == event.id().as_str()
        {
            return Ok(Some(existing.value.stream_position));
        }
        let mut batch = WriteBatch::new();
        batch.expect(Table::OutOfBandMemberships, index.clone(), existing.map(|e| e.raw));
        let event_key = keys::event(event.id().as_str());
        if lattice_storage::get::<EventRecord>(self.kv.as_ref(), &event_key).await?.is_none() {
            let record = EventRecord {
                room_id: room_id.to_string(),
                json: serde_json::to_string(event.object()).map_err(|e| ServiceError::Internal(e.to_string()))?,
                status: EventStatus::Outlier,
                stream_position: None,
                state_group: 0,
                redacted_by: None,
                order: None,
            };
            batch.expect(Table::Events, event_key.clone(), None);
            lattice_storage::put(&mut batch, event_key, &record);
        }
        let membership = membership_of(event);
        let taken = self.stream.take().await?;
        let position = taken.get();
        let record = OutOfBandRecord {
            event_id: event.id().to_string(),
            room_version: version.id().to_string(),
            membership: membership.clone(),
            stream_position: position,
            stripped_state,
        };
        lattice_storage::put(&mut batch, index.clone(), &record);
        batch.put(Table::Memberships, index, membership.into_bytes());
        batch.put(
            Table::RoomActivity,
            keys::room_activity(keys::ACTIVITY_EVENTS, position, room_id.as_str()),
            Vec::new(),
        );
        self.kv.write(batch).await?;
        taken.published().await;
        self.notifier.notify_user(&user_id);
        Ok(Some(position))
    }

    /// A stored event (an outlier too) as a PDU of `version`.
    pub async fn stored_pdu(&self, version: &RoomVersion, event_id: &str) -> Result<Pdu, ServiceError> {
        let id = OwnedEventId::try_from(event_id).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("unknown event {event_id}")))?;
        super::ingest::stored_pdu(version, &id, record)
    }

    /// The user's membership in a room this server is not in, when it came from outside the
    /// room (see [`Rooms::record_out_of_band`]).
    pub async fn out_of_band(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
    ) -> Result<Option<OutOfBandRecord>, ServiceError> {
        let index = keys::membership(user_id.as_str(), room_id.as_str());
        Ok(lattice_storage::get::<OutOfBandRecord>(self.kv.as_ref(), &index).await?.map(|r| r.value))
    }
}

impl Rooms {
    /// A refusal of an invite that only this server knows of, for when no server of the room
    /// answers: the user's `leave`, built on the invite and signed here, so the invite ends for
    /// the user and `/sync` says so. The room never sees it.
    pub fn local_rejection(
        &self,
        version: &RoomVersion,
        invite: &Pdu,
        reason: Option<String>,
    ) -> Result<Pdu, ServiceError> {
        let user_id = invite.state_key().ok_or_else(|| ServiceError::Internal("an invite has a state key".into()))?;
        let object: CanonicalJsonObject = invite.object().clone();
        let depth = match object.get("depth") {
            Some(CanonicalJsonValue::Integer(depth)) => i64::from(*depth).saturating_add(1),
            _ => 1,
        };
        let reference = super::local_events::reference(&invite.id().to_owned(), &object, version)?;
        let mut value = json!({
            "room_id": room_id_of(invite)?, "sender": user_id, "type": "m.room.member", "state_key": user_id,
            "content": super::member_content("leave", reason), "origin": self.server_name().as_str(),
            "origin_server_ts": self.now_ms(), "depth": depth,
            "prev_events": [reference.clone()], "auth_events": [reference],
        });
        if version.rules().event_id_format == EventIdFormatVersion::V1 {
            value["event_id"] = json!(format!("${}:{}", crate::secrets::random_alphanumeric(18), self.server_name()));
        }
        let Ok(CanonicalJsonValue::Object(object)) = CanonicalJsonValue::try_from(value) else {
            return Err(ServiceError::Internal("a rejection is a JSON object".into()));
        };
        self.sign_template(version, object)
    }
}
