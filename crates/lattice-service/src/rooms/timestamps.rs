//! `timestamp_to_event`: an index of each room's timeline by `origin_server_ts`, written by
//! ingest in the event's own batch, so finding the event nearest a time is one bounded seek.

use std::ops::Bound;

use lattice_core::event::Pdu;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::state_res::Event;
use ruma::{RoomId, UserId};

use super::Rooms;
use crate::ServiceError;

/// Adds the timestamp-index row of an accepted event at stream `position` to its batch.
pub(super) fn index_event(batch: &mut WriteBatch, room_id: &RoomId, event: &Pdu, position: u64) {
    let ts = u64::from(event.origin_server_ts().get());
    batch.put(
        Table::EventTimestamps,
        keys::event_timestamp(room_id.as_str(), ts, position),
        event.id().as_str().as_bytes().to_vec(),
    );
}

/// Index rows `timestamp_to_event` steps over looking for an event the user may see.
const MAX_HIDDEN_STEPS: usize = 100;

/// The event `timestamp_to_event` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventAtTime {
    pub event_id: String,
    pub origin_server_ts: u64,
}

impl Rooms {
    /// `GET /rooms/{roomId}/timestamp_to_event`: the first event at or after `ts` (`forward`),
    /// or the last one at or before it, among those the user may see.
    pub async fn timestamp_to_event(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        ts: u64,
        forward: bool,
    ) -> Result<EventAtTime, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        let room = room_id.as_str();
        let room_rows = KeyRange::prefix(&keys::room_rows(room));
        let (range, direction) = if forward {
            let start = Bound::Included(keys::event_timestamp(room, ts, 0));
            (KeyRange { start, end: room_rows.end }, Direction::Forward)
        } else {
            let end = Bound::Included(keys::event_timestamp(room, ts, u64::MAX));
            (KeyRange { start: room_rows.start, end }, Direction::Backward)
        };
        let rows = self.kv.scan(Table::EventTimestamps, &range, direction, MAX_HIDDEN_STEPS).await?;
        for (key, event_id) in rows {
            let event_id = String::from_utf8_lossy(&event_id).into_owned();
            if self.may_see_at(viewer, &event_id, super::messages::position_of(&key)).await? {
                return Ok(EventAtTime { event_id, origin_server_ts: timestamp_of(&key) });
            }
        }
        let dir = if forward { "after" } else { "before" };
        Err(ServiceError::NotFound(format!("no event in {room_id} at or {dir} {ts}")))
    }
}

/// The timestamp part of an `event_timestamp` key: the 8 bytes before `\0position`.
fn timestamp_of(key: &[u8]) -> u64 {
    let end = key.len().saturating_sub(9);
    key.get(end.saturating_sub(8)..end).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timestamp_is_read_back_from_the_key() {
        assert_eq!(timestamp_of(&keys::event_timestamp("!r:hs", 1_700_000_000_123, 42)), 1_700_000_000_123);
        assert_eq!(timestamp_of(b"short"), 0);
    }
}
