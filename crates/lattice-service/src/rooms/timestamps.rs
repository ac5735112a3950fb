//! `timestamp_to_event`: an index of each room's timeline by `origin_server_ts`, written by
//! ingest in the event's own batch, so finding the event nearest a time is one bounded seek.

use std::ops::Bound;

use lattice_core::event::Pdu;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::state_res::Event;
use ruma::{EventId, RoomId, ServerName, UserId};

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

/// An index row: an event near the asked time, at stream `position`.
struct Candidate {
    event_id: String,
    position: u64,
    origin_server_ts: u64,
}

impl Candidate {
    fn found(self) -> EventAtTime {
        EventAtTime { event_id: self.event_id, origin_server_ts: self.origin_server_ts }
    }
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
        for candidate in self.candidates(room_id, ts, forward).await? {
            if self.may_see_at(viewer, &candidate.event_id, candidate.position).await? {
                return Ok(candidate.found());
            }
        }
        Err(nothing_near(room_id, ts, forward))
    }

    /// The federation `GET /timestamp_to_event/{roomId}`: as for a user, among the events
    /// `server` may see (the caller checked that it is in the room).
    pub async fn timestamp_to_event_for_server(
        &self,
        server: &ServerName,
        room_id: &RoomId,
        ts: u64,
        forward: bool,
    ) -> Result<EventAtTime, ServiceError> {
        for candidate in self.candidates(room_id, ts, forward).await? {
            let Ok(event_id) = <&EventId>::try_from(candidate.event_id.as_str()) else { continue };
            let Ok(record) = self.event_in_room(room_id, event_id).await else { continue };
            if self.server_may_see(server, &record).await? {
                return Ok(candidate.found());
            }
        }
        Err(nothing_near(room_id, ts, forward))
    }

    /// The index rows nearest `ts` in the direction asked for, nearest first: at most
    /// [`MAX_HIDDEN_STEPS`], which bounds how many hidden events a search steps over.
    async fn candidates(&self, room_id: &RoomId, ts: u64, forward: bool) -> Result<Vec<Candidate>, ServiceError> {
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
        Ok(rows
            .into_iter()
            .map(|(key, event_id)| Candidate {
                event_id: String::from_utf8_lossy(&event_id).into_owned(),
                position: super::messages::position_of(&key),
                origin_server_ts: timestamp_of(&key),
            })
            .collect())
    }
}

fn nothing_near(room_id: &RoomId, ts: u64, forward: bool) -> ServiceError {
    let dir = if forward { "after" } else { "before" };
    ServiceError::NotFound(format!("no event in {room_id} at or {dir} {ts}"))
}

impl EventAtTime {
    /// Whether this event is nearer the asked time than `other`, in the direction asked for.
    pub fn nearer_than(&self, other: &EventAtTime, forward: bool) -> bool {
        if forward {
            self.origin_server_ts < other.origin_server_ts
        } else {
            self.origin_server_ts > other.origin_server_ts
        }
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
