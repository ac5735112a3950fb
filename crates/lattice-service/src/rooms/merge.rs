//! Merging a wide room front. Forks from other servers, or a partition, can leave a room with
//! many forward extremities; each local event cites at most 20 of them, so the front would only
//! shrink as fast as local users talk. When a live event leaves more than `MERGE_THRESHOLD`, the
//! room is queued and a background task sends `org.matrix.dummy_event`s (empty, ignored by
//! clients, as other servers do) from a local member until the front is narrow again. Sends
//! never fail because a front is wide.

use std::collections::BTreeSet;

use lattice_storage::records::RoomRecord;
use lattice_storage::{Direction, KeyRange, Table, keys};
use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use serde_json::json;

use super::Rooms;
use super::front::MERGE_THRESHOLD;
use super::{LocalEvent, Outcome};
use crate::ServiceError;

/// Rooms whose front is waiting to be merged, and the wake-up of the task that merges them.
#[derive(Default)]
pub(crate) struct MergeQueue {
    rooms: std::sync::Mutex<BTreeSet<OwnedRoomId>>,
    wake: tokio::sync::Notify,
}

/// The event type of a merge, as every server uses it.
const DUMMY_EVENT_TYPE: &str = "org.matrix.dummy_event";

/// Members read when looking for a local one to send the merge.
const MEMBER_SCAN_ROWS: usize = 10_000;

impl Rooms {
    /// Queues `room_id` for a merge of its front.
    pub(super) fn want_merge(&self, room_id: &RoomId) {
        self.merges.rooms.lock().unwrap_or_else(|e| e.into_inner()).insert(room_id.to_owned());
        self.merges.wake.notify_one();
    }

    /// Waits until some room is queued, then merges the front of every queued room; returns
    /// the dummy events sent. The binary runs this in a loop.
    pub async fn merge_wide_fronts(&self) -> usize {
        let rooms = loop {
            let rooms = std::mem::take(&mut *self.merges.rooms.lock().unwrap_or_else(|e| e.into_inner()));
            if !rooms.is_empty() {
                break rooms;
            }
            self.merges.wake.notified().await;
        };
        let mut sent = 0;
        for room_id in rooms {
            match self.merge_front(&room_id).await {
                Ok(count) => sent += count,
                Err(e) => tracing::warn!(room = %room_id, error = %e, "could not merge the room's forward extremities"),
            }
        }
        sent
    }

    /// Sends dummy events into `room_id` until it has at most `MERGE_THRESHOLD` forward
    /// extremities; returns how many it sent. Without a local member who may send, nothing.
    pub async fn merge_front(&self, room_id: &RoomId) -> Result<usize, ServiceError> {
        let version = self.room_version(room_id).await?;
        let mut sent = 0;
        loop {
            // The room's lock is taken per event, so users' sends interleave with the merge.
            let _room = self.room_lock(room_id.as_str()).lock().await;
            let Some(room) =
                lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?
            else {
                return Ok(sent);
            };
            let width = room.value.forward_extremities.len();
            if width <= MERGE_THRESHOLD {
                return Ok(sent);
            }
            let Some(sender) = self.local_member(room_id).await? else {
                tracing::info!(room = %room_id, width, "no local member to merge the room's forward extremities");
                return Ok(sent);
            };
            let event = LocalEvent {
                room_id: Some(room_id),
                sender: &sender,
                kind: DUMMY_EVENT_TYPE,
                state_key: None,
                content: json!({}),
            };
            let event = self.build_local_event(&version, event).await?;
            let outcome = self.ingest_unlocked(&version, event, &Default::default()).await?.outcome;
            if outcome != Outcome::Accepted {
                tracing::warn!(room = %room_id, ?outcome, "a merge event was not accepted");
                return Ok(sent);
            }
            sent += 1;
            if sent == 1 {
                tracing::info!(room = %room_id, width, "merging the room's forward extremities");
            }
        }
    }

    /// A user of this server who is joined to the room, if any.
    async fn local_member(&self, room_id: &RoomId) -> Result<Option<OwnedUserId>, ServiceError> {
        let prefix = keys::current_state(room_id.as_str(), "m.room.member", "");
        let rows =
            self.kv.scan(Table::CurrentState, &KeyRange::prefix(&prefix), Direction::Forward, MEMBER_SCAN_ROWS).await?;
        for (key, _) in rows {
            let Ok(user_id) = ruma::UserId::parse(String::from_utf8_lossy(&key[prefix.len()..]).as_ref()) else {
                continue;
            };
            if user_id.server_name() != self.server_name() {
                continue;
            }
            let membership =
                self.kv.get(Table::Memberships, &keys::membership(user_id.as_str(), room_id.as_str())).await?;
            if membership.as_deref() == Some(b"join") {
                return Ok(Some(user_id));
            }
        }
        Ok(None)
    }
}
