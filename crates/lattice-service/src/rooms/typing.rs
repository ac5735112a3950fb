//! Typing notifications: kept in memory (they last seconds), each change stamped with a position
//! from the one stream so `/sync` delivers it exactly once (architecture invariant 2).

use std::collections::HashMap;
use std::time::Duration;

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::Rooms;
use crate::ServiceError;

/// Longest a client may claim to keep typing without renewing it.
pub const MAX_TYPING_TIMEOUT: Duration = Duration::from_secs(120);

/// The typing users of one room and the stream position of its last change.
#[derive(Default)]
pub(crate) struct RoomTyping {
    /// User → when their typing notice expires (ms since the epoch).
    users: HashMap<OwnedUserId, u64>,
    position: u64,
}

/// One entry per room that ever had a typing notice (bounded by the rooms of this server): an
/// empty entry still tells syncs from before its last change that nobody types any more.
#[derive(Default)]
pub(crate) struct Typing {
    rooms: HashMap<OwnedRoomId, RoomTyping>,
}

impl Rooms {
    /// `PUT /rooms/{roomId}/typing/{userId}`.
    pub async fn set_typing(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        typing: bool,
        timeout: Duration,
    ) -> Result<(), ServiceError> {
        self.require_member(user_id, room_id).await?;
        let expires = self.now_ms().saturating_add(timeout.min(MAX_TYPING_TIMEOUT).as_millis() as u64);
        let changed = {
            let mut all = self.typing.lock().unwrap_or_else(|p| p.into_inner());
            let room = all.rooms.entry(room_id.to_owned()).or_default();
            if typing {
                room.users.insert(user_id.to_owned(), expires).is_none()
            } else {
                room.users.remove(user_id).is_some()
            }
        };
        if changed {
            self.stamp_typing(&[room_id.to_owned()]).await?;
        }
        Ok(())
    }

    /// Removes expired typing notices; returns how many rooms changed.
    pub async fn expire_typing(&self) -> Result<usize, ServiceError> {
        let now = self.now_ms();
        let changed: Vec<OwnedRoomId> = {
            let mut all = self.typing.lock().unwrap_or_else(|p| p.into_inner());
            let mut changed = Vec::new();
            for (room_id, room) in all.rooms.iter_mut() {
                let before = room.users.len();
                room.users.retain(|_, expires| *expires > now);
                if room.users.len() != before {
                    changed.push(room_id.clone());
                }
            }
            changed
        };
        self.stamp_typing(&changed).await?;
        Ok(changed.len())
    }

    /// Gives the rooms' typing state a new stream position and wakes the syncs of their members.
    /// The change is stamped before its position is published, and `/sync` reads only up to the
    /// completed mark: no sync can pass the position before the change carries it. A room keeps
    /// the highest position stamped on it, so a slower, older stamp never hides a newer one.
    async fn stamp_typing(&self, rooms: &[OwnedRoomId]) -> Result<(), ServiceError> {
        if rooms.is_empty() {
            return Ok(());
        }
        let position = self.typing_stream.take().await?;
        {
            let mut all = self.typing.lock().unwrap_or_else(|p| p.into_inner());
            for room_id in rooms {
                let room = all.rooms.entry(room_id.clone()).or_default();
                room.position = room.position.max(position.get());
            }
        }
        position.published().await;
        for room_id in rooms {
            self.notifier.notify_room(room_id);
        }
        Ok(())
    }

    /// The room's typing users, if that changed in `(since, now]` (or, initially, if anyone types).
    /// The rooms whose typing notices changed in `(since, now]`.
    pub(crate) fn typing_rooms_since(&self, since: u64, now: u64) -> std::collections::HashSet<String> {
        let all = self.typing.lock().unwrap_or_else(|p| p.into_inner());
        let changed = all.rooms.iter().filter(|(_, room)| room.position > since && room.position <= now);
        changed.map(|(room_id, _)| room_id.to_string()).collect()
    }

    pub(crate) fn typing_since(
        &self,
        room_id: &RoomId,
        since: u64,
        now: u64,
        initial: bool,
    ) -> Option<Vec<OwnedUserId>> {
        let all = self.typing.lock().unwrap_or_else(|p| p.into_inner());
        let room = all.rooms.get(room_id)?;
        let changed = room.position > since && room.position <= now;
        let mut users: Vec<OwnedUserId> = room.users.keys().cloned().collect();
        users.sort();
        if changed || (initial && !users.is_empty()) { Some(users) } else { None }
    }
}
