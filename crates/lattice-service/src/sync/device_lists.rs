//! `device_lists` of an incremental `/sync`: `changed` — the users sharing a room with the
//! syncing user whose device lists changed since the token (the device-list stream), and those
//! who newly share a room with them (a member's join in one of their rooms, or their own join of
//! a room: its members); `left` — users who shared a room with them and share none any more (a
//! member's leave, or their own).

use std::collections::BTreeSet;

use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::{Map, Value, json};

use super::{Sync, SyncScope};
use crate::ServiceError;
use crate::composed_keys::shared_with;

/// The member events a room's part of the response carries (state and timeline).
fn member_events(room: &Value) -> impl Iterator<Item = &Value> {
    let events = |section: &str| room[section]["events"].as_array().into_iter().flatten();
    events("state").chain(events("timeline")).filter(|event| event["type"] == "m.room.member")
}

impl Sync {
    pub(super) async fn device_lists_for(
        &self,
        scope: &SyncScope<'_>,
        join: &Map<String, Value>,
        leave: &Map<String, Value>,
    ) -> Result<Value, ServiceError> {
        let me = scope.user_id;
        let mut changed = self.e2ee.device_lists_changed(scope.since.device_lists, scope.now.device_lists).await?;
        let mut departed = BTreeSet::new();
        for (room_id, room) in join {
            for event in member_events(room) {
                let Some(member) = event["state_key"].as_str().and_then(|s| OwnedUserId::try_from(s).ok()) else {
                    continue;
                };
                let membership = event["content"]["membership"].as_str().unwrap_or_default();
                let was_joined = event["unsigned"]["prev_content"]["membership"] == "join";
                match membership {
                    "join" if was_joined => {}
                    "join" if member == me => {
                        let Ok(room_id) = OwnedRoomId::try_from(room_id.as_str()) else { continue };
                        for member in self.rooms.members(me, &room_id, Some("join"), None).await? {
                            if let Some(user) = member["state_key"].as_str().and_then(|s| OwnedUserId::try_from(s).ok())
                            {
                                changed.insert(user);
                            }
                        }
                    }
                    "join" => {
                        changed.insert(member);
                    }
                    "leave" | "ban" => {
                        departed.insert(member);
                    }
                    _ => {}
                }
            }
        }
        for room_id in leave.keys() {
            let Ok(room_id) = OwnedRoomId::try_from(room_id.as_str()) else { continue };
            // A former member reads the members at their leave.
            for member in self.rooms.members(me, &room_id, Some("join"), None).await.unwrap_or_default() {
                if let Some(user) = member["state_key"].as_str().and_then(|s| OwnedUserId::try_from(s).ok()) {
                    departed.insert(user);
                }
            }
        }
        let changed = shared_with(&self.rooms, me, changed).await?;
        let still_shared = shared_with(&self.rooms, me, departed.clone()).await?;
        let left: BTreeSet<OwnedUserId> = departed.into_iter().filter(|user| !still_shared.contains(user)).collect();
        let changed: Vec<&OwnedUserId> = changed.iter().filter(|user| !left.contains(*user)).collect();
        Ok(json!({ "changed": changed, "left": left }))
    }
}
