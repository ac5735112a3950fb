//! The reads of the rooms service's tables that `/sync` (the sync service, `crate::sync`) asks
//! for: memberships, which rooms changed in a range of positions, timeline rows, state entries
//! and member counts. The sync service owns no room table and reaches them only through these.

use std::collections::HashSet;

use lattice_storage::records::{EventRecord, MemberCounts, RoomRecord};
use lattice_storage::{Direction, KeyRange, Table, keys};
use ruma::{OwnedRoomId, RoomId, UserId};

use super::Rooms;
use crate::ServiceError;
use crate::sync::StreamSet;

/// The completed marks of the streams the rooms service writes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoomMarks {
    pub events: u64,
    pub receipts: u64,
    pub typing: u64,
}

impl Rooms {
    /// Each of the rooms service's streams' completed mark: every change up to it is visible
    /// (typing, kept in memory, is stamped before its position is published).
    pub(crate) async fn stream_marks(&self) -> Result<RoomMarks, ServiceError> {
        Ok(RoomMarks {
            events: self.stream.completed().await?,
            receipts: self.receipts_stream.completed().await?,
            typing: self.typing_stream.completed().await?,
        })
    }

    /// The user's membership in every room they have one in.
    pub(crate) async fn memberships_of(&self, user_id: &UserId) -> Result<Vec<(OwnedRoomId, String)>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::Memberships, &KeyRange::prefix(&prefix)).await?;
        rows.into_iter()
            .map(|(key, membership)| {
                let room = OwnedRoomId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                Ok((room, String::from_utf8_lossy(&membership).into_owned()))
            })
            .collect()
    }

    /// The rooms with events, receipts or typing changes in `(since, now]`; `None` when more
    /// changed than one read of the activity index holds, and every room must be looked at.
    pub(crate) async fn rooms_active_in(
        &self,
        since: &StreamSet,
        now: &StreamSet,
    ) -> Result<Option<HashSet<String>>, ServiceError> {
        let mut active = self.typing_rooms_since(since.typing, now.typing);
        let ranges = [
            (keys::ACTIVITY_EVENTS, since.events, now.events),
            (keys::ACTIVITY_RECEIPTS, since.receipts, now.receipts),
        ];
        for (stream, since, now) in ranges {
            let range = KeyRange::between(
                &keys::room_activity_from(stream, since.saturating_add(1)),
                &keys::room_activity_from(stream, now.saturating_add(1)),
            );
            let limit = lattice_storage::MAX_SCAN_ROWS;
            let rows = self.kv.scan(Table::RoomActivity, &range, Direction::Forward, limit).await?;
            if rows.len() == limit {
                return Ok(None);
            }
            active.extend(rows.iter().filter_map(|(key, _)| keys::room_activity_room(key)).map(str::to_owned));
        }
        Ok(Some(active))
    }

    /// Whether the room has events after `since`, from its record alone (one read), so an
    /// incremental sync's cost does not grow with the user's quiet rooms. Rooms stored before
    /// the record kept a position count as changed.
    pub(crate) async fn room_changed(&self, room_id: &RoomId, since: u64) -> Result<bool, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        Ok(room.is_none_or(|room| room.value.last_stream_position == 0 || room.value.last_stream_position > since))
    }

    /// Whether the user was joined in the state after the room's last event at or before
    /// `position`.
    pub(crate) async fn was_joined_at(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        position: u64,
    ) -> Result<bool, ServiceError> {
        let room = room_id.as_str();
        let range = KeyRange::between(&keys::timeline(room, 0), &keys::timeline(room, position.saturating_add(1)));
        let Some((_, event_id)) = self.kv.scan(Table::Timeline, &range, Direction::Backward, 1).await?.pop() else {
            return Ok(false);
        };
        let key = keys::event(&String::from_utf8_lossy(&event_id));
        let Some(record) = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &key).await? else {
            return Ok(false);
        };
        let state = super::state_store::load(self.kv.as_ref(), record.value.state_group).await?;
        let slot = (ruma::events::StateEventType::RoomMember, user_id.to_string());
        let Some(member) = state.get(&slot) else { return Ok(false) };
        Ok(self.client_event(member.as_str()).await?["content"]["membership"] == "join")
    }

    /// The ID of the user's current member event in the room.
    pub(crate) async fn current_member_event(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
    ) -> Result<Option<String>, ServiceError> {
        let key = keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str());
        Ok(self.kv.get(Table::CurrentState, &key).await?.map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    /// `(type, state_key, event ID)` of the room's current state, or of the state group given.
    pub(crate) async fn state_entries(
        &self,
        room_id: &RoomId,
        group: Option<u64>,
    ) -> Result<Vec<(String, String, String)>, ServiceError> {
        if let Some(group) = group {
            let state = super::state_store::load(self.kv.as_ref(), group).await?;
            return Ok(state.into_iter().map(|((kind, key), id)| (kind.to_string(), key, id.to_string())).collect());
        }
        let prefix = keys::room_rows(room_id.as_str());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::CurrentState, &KeyRange::prefix(&prefix)).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, id)| {
                let slot = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let (kind, state_key) = slot.split_once('\0')?;
                Some((kind.to_owned(), state_key.to_owned(), String::from_utf8_lossy(&id).into_owned()))
            })
            .collect())
    }

    /// The stream position of the user's current membership event in the room.
    pub(crate) async fn membership_position(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
    ) -> Result<Option<u64>, ServiceError> {
        let Some(id) = self
            .kv
            .get(Table::CurrentState, &keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str()))
            .await?
        else {
            return Ok(None);
        };
        let record =
            lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&String::from_utf8_lossy(&id))).await?;
        Ok(record.and_then(|r| r.value.stream_position))
    }

    /// The ID of the event at `(kind, state_key)` in the room's current state.
    pub(crate) async fn current_state_id(
        &self,
        room_id: &RoomId,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<String>, ServiceError> {
        let key = keys::current_state(room_id.as_str(), kind, state_key);
        Ok(self.kv.get(Table::CurrentState, &key).await?.map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    /// The room's timeline rows in `[from, end)` by stream position, newest first, at most
    /// `limit`: `(position, event ID)`.
    pub(crate) async fn timeline_rows_before(
        &self,
        room_id: &RoomId,
        (from, end): (u64, u64),
        limit: usize,
    ) -> Result<Vec<(u64, String)>, ServiceError> {
        let range = KeyRange::between(&keys::timeline(room_id.as_str(), from), &keys::timeline(room_id.as_str(), end));
        let rows = self.kv.scan(Table::Timeline, &range, Direction::Backward, limit).await?;
        Ok(rows
            .into_iter()
            .map(|(key, event_id)| {
                (super::messages::position_of(&key), String::from_utf8_lossy(&event_id).into_owned())
            })
            .collect())
    }

    /// The joined and invited counts kept in the room's record; `None` for rooms stored before
    /// the record kept them.
    pub(crate) async fn member_counts(&self, room_id: &RoomId) -> Result<Option<MemberCounts>, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        Ok(room.and_then(|r| r.value.member_counts))
    }
}
