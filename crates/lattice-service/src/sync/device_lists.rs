//! Device-list changes between two positions, for `device_lists` of an incremental `/sync` and
//! for `/keys/changes` alike (one function, so the two always agree): `changed` — the users
//! sharing a room with the user whose device lists changed in the range (the device-list
//! stream), and those who newly share a room with them (a member's join in one of their rooms,
//! or their own join of a room: its members); `left` — users who shared a room with them and
//! share none any more (a member's leave, or their own).
//!
//! The joins and leaves come from the member events in the range of each room the user is
//! joined to or whose membership changed in the range: the room's timeline rows between the two
//! positions, newest first, the last member event of each user deciding. A room with more than
//! [`MAX_TIMELINE_ROWS`] rows in the range is read from its current member events instead (those
//! changed after the start of the range), so the cost stays bounded by the room's size.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use super::{StreamSet, Sync};
use crate::ServiceError;
use crate::composed_keys::shared_with;

/// Timeline rows of one room read for its member events before reading its members instead.
const MAX_TIMELINE_ROWS: usize = 500;

/// What `device_lists` reports: users to ask about again, and users no longer shared.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceListDelta {
    pub changed: BTreeSet<OwnedUserId>,
    pub left: BTreeSet<OwnedUserId>,
}

impl Sync {
    /// The device-list delta of `me` between `since` and `now` (the events and device-list
    /// positions of two sync tokens).
    pub(crate) async fn device_list_delta(
        &self,
        me: &UserId,
        since: &StreamSet,
        now: &StreamSet,
    ) -> Result<DeviceListDelta, ServiceError> {
        let mut changed = self.e2ee.device_lists_changed(since.device_lists, now.device_lists).await?;
        let mut departed = BTreeSet::new();
        // Only rooms with events in the range can hold member events (`None`: too many to
        // list, look at each).
        let active = match now.events > since.events {
            true => self.rooms.rooms_active_in(since, now).await?,
            false => Some(Default::default()),
        };
        for (room_id, membership) in self.rooms.memberships_of(me).await? {
            if active.as_ref().is_some_and(|active| !active.contains(room_id.as_str())) {
                continue;
            }
            let moved_in_range = self
                .rooms
                .membership_position(me, &room_id)
                .await?
                .is_some_and(|position| position > since.events && position <= now.events);
            if membership != "join" && !moved_in_range {
                continue;
            }
            if !self.rooms.room_changed(&room_id, since.events).await? {
                continue;
            }
            for (member, membership) in self.member_moves(&room_id, since.events, now.events).await? {
                // Invites and knocks share no keys: only joins and departures count.
                match (member == me, membership.as_str()) {
                    (true, "join") => changed.extend(self.joined_members(me, &room_id).await?),
                    // A former member reads the members at their leave.
                    (true, "leave" | "ban") => {
                        departed.extend(self.joined_members(me, &room_id).await.unwrap_or_default())
                    }
                    (false, "join") => {
                        changed.insert(member);
                    }
                    (false, "leave" | "ban") => {
                        departed.insert(member);
                    }
                    _ => {}
                }
            }
        }
        let still_shared = shared_with(&self.rooms, me, departed.clone()).await?;
        let left: BTreeSet<OwnedUserId> =
            departed.into_iter().filter(|user| !still_shared.contains(user) && user != me).collect();
        let changed = shared_with(&self.rooms, me, changed).await?.into_iter().filter(|u| !left.contains(u)).collect();
        Ok(DeviceListDelta { changed, left })
    }

    /// Each user whose membership in the room changed in `(since, now]`, with the membership
    /// they ended the range with.
    async fn member_moves(
        &self,
        room_id: &RoomId,
        since: u64,
        now: u64,
    ) -> Result<BTreeMap<OwnedUserId, String>, ServiceError> {
        if now <= since {
            return Ok(BTreeMap::new());
        }
        let range = (since.saturating_add(1), now.saturating_add(1));
        let rows = self.rooms.timeline_rows_before(room_id, range, MAX_TIMELINE_ROWS + 1).await?;
        let mut moves = BTreeMap::new();
        if rows.len() > MAX_TIMELINE_ROWS {
            for (member, event_id) in self.rooms.member_event_ids(room_id).await? {
                let Ok(member) = OwnedUserId::try_from(member) else { continue };
                let position = self.rooms.membership_position(&member, room_id).await?;
                if position.is_some_and(|position| position > since) {
                    let event = self.rooms.client_event(&event_id).await?;
                    let membership = event["content"]["membership"].as_str().unwrap_or_default().to_owned();
                    moves.insert(member, membership);
                }
            }
            return Ok(moves);
        }
        // Newest first: the first member event of each user is the one they ended with.
        for (_, event_id) in rows {
            let event = self.rooms.client_event(&event_id).await?;
            if event["type"] != "m.room.member" {
                continue;
            }
            let Some(member) = event["state_key"].as_str().and_then(|s| OwnedUserId::try_from(s).ok()) else {
                continue;
            };
            let membership = event["content"]["membership"].as_str().unwrap_or_default().to_owned();
            moves.entry(member).or_insert(membership);
        }
        Ok(moves)
    }

    /// The joined members of the room as `me` may see them (at their leave for a former member).
    async fn joined_members(&self, me: &UserId, room_id: &OwnedRoomId) -> Result<Vec<OwnedUserId>, ServiceError> {
        Ok(self
            .rooms
            .members(me, room_id, Some("join"), None)
            .await?
            .iter()
            .filter_map(|member| member["state_key"].as_str().and_then(|s| OwnedUserId::try_from(s).ok()))
            .collect())
    }
}
