//! Reads of the room graph as servers see it — stored PDUs and state as event IDs — for
//! federation and benchmarks. They ask no "may this reader see it?": a caller serving another
//! server checks history visibility for that server first.

use lattice_core::state_resolution::StateMap;
use lattice_storage::keys;
use lattice_storage::records::{EventRecord, EventStatus, RoomRecord};
use ruma::{EventId, RoomId};

use super::Rooms;
use super::state_store;
use crate::ServiceError;

impl Rooms {
    /// The event's stored PDU JSON (its redacted form once redacted), when it is stored and was
    /// not rejected.
    pub async fn stored_pdu_json(&self, event_id: &EventId) -> Result<Option<String>, ServiceError> {
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id.as_str())).await?;
        Ok(record.filter(|r| !matches!(r.value.status, EventStatus::Rejected { .. })).map(|r| r.value.json))
    }

    /// The room's current state as event IDs.
    pub async fn room_state_ids(&self, room_id: &RoomId) -> Result<StateMap, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str()))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("unknown room {room_id}")))?;
        state_store::load(self.kv.as_ref(), room.value.current_state_group).await
    }
}
