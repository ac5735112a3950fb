//! Room upgrades (spec: client-server API, "Room upgrades"): a new room of the requested
//! version that carries the old one's settings, bans and local members on, and a tombstone in
//! the old room pointing at it. Every event is a normal local send through the ingest path.
//!
//! Moving the old room's local aliases to the new room (step 4 of the spec) belongs with the
//! alias code and is not done here.

use lattice_core::power::RoomPower;
use lattice_core::room_version::RoomVersion;
use lattice_storage::records::RoomRecord;
use lattice_storage::{WriteBatch, keys};
use ruma::events::room::power_levels::UserPowerLevel;
use ruma::state_res::events::RoomPowerLevelsIntField;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{Map, Value, json};

use super::Rooms;
use super::membership::content_of;
use crate::ServiceError;

/// State copied to the new room: the spec's recommended list, less the power levels, which are
/// sent first because every later event is checked against them.
const TRANSFERRED_STATE: &[&str] = &[
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
];

/// Fields of the create event that describe the room rather than its version, kept across.
const TRANSFERRED_CREATE_FIELDS: &[&str] = &["type", "m.federate"];

/// The integer fields of a power levels event, and its maps of integers.
const LEVEL_FIELDS: &[&str] = &["ban", "events_default", "invite", "kick", "redact", "state_default", "users_default"];
const LEVEL_MAPS: &[&str] = &["events", "users", "notifications"];

/// The content of a power levels event.
type Levels = Map<String, Value>;

/// The level an old room's `events_default` and `invite` are raised to at least, so that
/// ordinary members can no longer talk or invite there.
const RESTRICTED_LEVEL: i64 = 50;

/// The body of a tombstone.
const TOMBSTONE_BODY: &str = "This room has been replaced";

/// A parsed `POST /rooms/{roomId}/upgrade` request.
pub struct UpgradeRoom {
    pub new_version: String,
    /// From v12: users who are creators of the new room besides the upgrader. Not carried over
    /// from the old room (the spec leaves that to the client).
    pub additional_creators: Vec<OwnedUserId>,
}

impl Rooms {
    /// Upgrades `old_room` to a new room of `request.new_version`; returns the new room's ID.
    pub async fn upgrade_room(
        &self,
        user_id: &UserId,
        old_room: &RoomId,
        request: UpgradeRoom,
    ) -> Result<OwnedRoomId, ServiceError> {
        let new_version = RoomVersion::parse(&request.new_version)?;
        let old_version = self.room_version(old_room).await?;
        self.require_member(user_id, old_room).await?;
        let (create, power_levels) = self.power_events(&old_version, old_room).await?;
        let old_power = RoomPower::new(&old_version, &create, power_levels.as_ref()).map_err(ServiceError::Internal)?;
        if !old_power.may_send_state(user_id, "m.room.tombstone").map_err(ServiceError::Internal)? {
            let needed = old_power.state_level("m.room.tombstone").map_err(ServiceError::Internal)?;
            return Err(ServiceError::Forbidden(format!(
                "upgrading {old_room} needs power level {needed} (the level to send m.room.tombstone)"
            )));
        }
        let upgrader_level = old_power.user_level(user_id).map_err(ServiceError::Internal)?;
        let old_levels = power_levels.as_ref().map(content_of).transpose()?.map(|levels| normalised_levels(&levels));

        let new_creators = new_room_creators(&new_version, user_id, &request.additional_creators);
        let create_content =
            self.successor_create_content(&content_of(&create)?, old_room, &new_version, &new_creators).await?;
        let new_room = self.send_create_event(&new_version, user_id, create_content, |_| WriteBatch::new()).await?;
        self.send_event(
            user_id,
            &new_room,
            "m.room.member",
            Some(user_id.as_str()),
            json!({ "membership": "join" }),
            None,
        )
        .await?;
        let final_levels =
            old_levels.as_ref().map(|levels| successor_levels(levels, user_id, upgrader_level, &new_creators));
        self.furnish_successor(&old_version, old_room, user_id, &new_room, final_levels, &new_creators).await?;
        self.move_aliases(user_id, old_room, &new_room).await?;

        let tombstone = json!({ "body": TOMBSTONE_BODY, "replacement_room": new_room });
        self.send_event(user_id, old_room, "m.room.tombstone", Some(""), tombstone, None).await?;
        if let Some(levels) = old_levels {
            self.restrict_old_room(old_room, user_id, &old_power, upgrader_level, levels).await?;
        }
        tracing::info!(old_room = %old_room, new_room = %new_room, version = %new_version.id(), "upgraded room");
        Ok(new_room)
    }

    /// Everything the new room gets after its creator's join: power levels, the copied state,
    /// bans and invites.
    async fn furnish_successor(
        &self,
        old_version: &RoomVersion,
        old_room: &RoomId,
        user_id: &UserId,
        new_room: &RoomId,
        final_levels: Option<Levels>,
        new_creators: &[OwnedUserId],
    ) -> Result<(), ServiceError> {
        if let Some(levels) = &final_levels {
            // Until the copied state, bans and invites are in, the upgrader may need more power
            // than the old room gave them; the old room's levels are restored afterwards.
            let initial = with_upgrader_raised(levels, user_id, new_creators);
            self.send_event(user_id, new_room, "m.room.power_levels", Some(""), Value::Object(initial), None).await?;
        }
        self.copy_state(old_version, old_room, user_id, new_room).await?;
        self.carry_members_over(old_version, old_room, user_id, new_room).await?;
        if let Some(levels) = final_levels
            && levels != with_upgrader_raised(&levels, user_id, new_creators)
        {
            self.send_event(user_id, new_room, "m.room.power_levels", Some(""), Value::Object(levels), None).await?;
        }
        Ok(())
    }

    /// The new room's create content: `predecessor`, the old room's `type` and `m.federate`, and
    /// from v12 the additional creators.
    async fn successor_create_content(
        &self,
        old_create: &Value,
        old_room: &RoomId,
        new_version: &RoomVersion,
        new_creators: &[OwnedUserId],
    ) -> Result<Value, ServiceError> {
        let mut content = json!({ "predecessor": { "room_id": old_room } });
        // Spec v1.16: `predecessor.event_id` (the old room's last known event) may be left out
        // when the new room is v12 or later, where it is deprecated.
        if !new_version.rules().authorization.room_create_event_id_as_room_id {
            let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(old_room.as_str()))
                .await?
                .ok_or_else(|| ServiceError::NotFound(format!("unknown room {old_room}")))?;
            if let Some(last) = room.value.forward_extremities.last() {
                content["predecessor"]["event_id"] = json!(last);
            }
        }
        for field in TRANSFERRED_CREATE_FIELDS {
            if let Some(value) = old_create.get(*field) {
                content[*field] = value.clone();
            }
        }
        if let [_upgrader, additional @ ..] = new_creators
            && !additional.is_empty()
        {
            content["additional_creators"] = json!(additional);
        }
        Ok(content)
    }

    async fn copy_state(
        &self,
        old_version: &RoomVersion,
        old_room: &RoomId,
        user_id: &UserId,
        new_room: &RoomId,
    ) -> Result<(), ServiceError> {
        for kind in TRANSFERRED_STATE {
            if let Some(event) = self.current_state_pdu(old_version, old_room, kind, "").await? {
                self.send_event(user_id, new_room, kind, Some(""), content_of(&event)?, None).await?;
            }
        }
        Ok(())
    }

    /// Bans carry over as bans; this server's joined users are invited to the new room (members
    /// cannot be joined on their behalf).
    async fn carry_members_over(
        &self,
        old_version: &RoomVersion,
        old_room: &RoomId,
        user_id: &UserId,
        new_room: &RoomId,
    ) -> Result<(), ServiceError> {
        for (member, _) in self.member_event_ids(old_room).await? {
            let Ok(member) = UserId::parse(member.as_str()) else { continue };
            if *member == *user_id {
                continue;
            }
            let content = match self.membership(&member, old_room).await?.as_deref() {
                Some("ban") => {
                    let mut content = json!({ "membership": "ban" });
                    if let Some(event) =
                        self.current_state_pdu(old_version, old_room, "m.room.member", member.as_str()).await?
                        && let Some(reason) = content_of(&event)?.get("reason").filter(|r| r.is_string())
                    {
                        content["reason"] = reason.clone();
                    }
                    content
                }
                Some("join") if member.server_name() == self.server_name() => json!({ "membership": "invite" }),
                _ => continue,
            };
            self.send_event(user_id, new_room, "m.room.member", Some(member.as_str()), content, None).await?;
        }
        Ok(())
    }

    /// Spec step 6, "if possible": raises the old room's `events_default` and `invite` so that
    /// only moderators can still talk or invite there. Skipped when the upgrader may not.
    async fn restrict_old_room(
        &self,
        old_room: &RoomId,
        user_id: &UserId,
        old_power: &RoomPower<'_>,
        upgrader_level: UserPowerLevel,
        mut levels: Levels,
    ) -> Result<(), ServiceError> {
        // The old room's levels as the auth rules read them (one power-level reader: core's).
        let field = |field| old_power.field_level(field).map(i64::from).map_err(ServiceError::Internal);
        let restricted = RESTRICTED_LEVEL.max(field(RoomPowerLevelsIntField::UsersDefault)?.saturating_add(1));
        let current = [field(RoomPowerLevelsIntField::EventsDefault)?, field(RoomPowerLevelsIntField::Invite)?];
        let allowed = old_power.may_send_state(user_id, "m.room.power_levels").map_err(ServiceError::Internal)?
            && current.iter().chain([&restricted]).all(|level| upgrader_level >= ruma::Int::new_saturating(*level));
        if !allowed {
            tracing::info!(room = %old_room, user = %user_id, "upgrader may not restrict the old room's power levels");
            return Ok(());
        }
        levels.insert("events_default".into(), json!(restricted));
        levels.insert("invite".into(), json!(restricted));
        self.send_event(user_id, old_room, "m.room.power_levels", Some(""), Value::Object(levels), None).await?;
        Ok(())
    }
}

/// The new room's creators from v12 (the upgrader first, then the additional creators, without
/// repeats); none in earlier versions, where creators are users like any other.
fn new_room_creators(version: &RoomVersion, upgrader: &UserId, additional: &[OwnedUserId]) -> Vec<OwnedUserId> {
    if !version.rules().authorization.explicitly_privilege_room_creators {
        return Vec::new();
    }
    let mut creators = vec![upgrader.to_owned()];
    for user in additional {
        if !creators.contains(user) {
            creators.push(user.clone());
        }
    }
    creators
}

/// Power levels with every level an integer: rooms before v10 may hold strings of digits, which
/// later versions refuse.
fn normalised_levels(levels: &Value) -> Levels {
    let as_integer = |value: &Value| match value {
        Value::String(digits) => digits.trim().parse::<i64>().map(Value::from).unwrap_or_else(|_| value.clone()),
        other => other.clone(),
    };
    let mut levels = levels.as_object().cloned().unwrap_or_default();
    for field in LEVEL_FIELDS {
        if let Some(value) = levels.get_mut(*field) {
            *value = as_integer(value);
        }
    }
    for map in LEVEL_MAPS {
        if let Some(Value::Object(entries)) = levels.get_mut(*map) {
            for value in entries.values_mut() {
                *value = as_integer(value);
            }
        }
    }
    levels
}

/// The old room's levels as the new room's: creators (from v12) out of `users`, where the auth
/// rules refuse them; an upgrader who was a creator of a v12 room and upgrades to an older
/// version keeps the top level.
fn successor_levels(
    old_levels: &Levels,
    upgrader: &UserId,
    upgrader_level: UserPowerLevel,
    new_creators: &[OwnedUserId],
) -> Levels {
    let mut levels = old_levels.clone();
    let top = highest_level(&levels).max(100);
    let users = users_of(&mut levels);
    for creator in new_creators {
        users.remove(creator.as_str());
    }
    if upgrader_level == UserPowerLevel::Infinite && new_creators.is_empty() {
        users.insert(upgrader.to_string(), json!(top));
    }
    levels
}

/// `levels` with the upgrader at the highest level they contain, unless the upgrader is a
/// creator (above every level from v12) or already that high.
fn with_upgrader_raised(levels: &Levels, upgrader: &UserId, new_creators: &[OwnedUserId]) -> Levels {
    if new_creators.iter().any(|creator| creator == upgrader) {
        return levels.clone();
    }
    let top = highest_level(levels);
    let mut raised = levels.clone();
    let users_default = level(&raised, "users_default").unwrap_or(0);
    let users = users_of(&mut raised);
    let current = users.get(upgrader.as_str()).and_then(Value::as_i64).unwrap_or(users_default);
    if current < top {
        users.insert(upgrader.to_string(), json!(top));
    }
    raised
}

/// The highest level anywhere in the content: enough to send any event and set any level.
fn highest_level(levels: &Levels) -> i64 {
    let fields = LEVEL_FIELDS.iter().filter_map(|field| level(levels, field));
    let maps = LEVEL_MAPS
        .iter()
        .filter_map(|map| levels.get(*map).and_then(Value::as_object))
        .flat_map(|entries| entries.values().filter_map(Value::as_i64));
    fields.chain(maps).max().unwrap_or(0)
}

fn level(levels: &Levels, field: &str) -> Option<i64> {
    levels.get(field).and_then(Value::as_i64)
}

/// The `users` map, created when absent (or not a map).
fn users_of(levels: &mut Levels) -> &mut Map<String, Value> {
    if !levels.get("users").is_some_and(Value::is_object) {
        levels.insert("users".into(), json!({}));
    }
    match levels.get_mut("users") {
        Some(Value::Object(users)) => users,
        _ => unreachable!("`users` was made a map above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> OwnedUserId {
        id.try_into().unwrap()
    }

    #[test]
    fn string_levels_become_integers() {
        let levels = json!({ "ban": "50", "users": { "@a:hs": " 100" }, "events": { "m.room.name": 50 } });
        assert_eq!(
            Value::Object(normalised_levels(&levels)),
            json!({ "ban": 50, "users": { "@a:hs": 100 }, "events": { "m.room.name": 50 } })
        );
        assert!(normalised_levels(&json!("not an object")).is_empty());
    }

    #[test]
    fn a_moderator_is_raised_for_the_copy_and_restored_after() {
        let levels = normalised_levels(&json!({ "users": { "@owner:hs": 100, "@mod:hs": 50 }, "users_default": 0 }));
        let raised = with_upgrader_raised(&levels, &user("@mod:hs"), &[]);
        assert_eq!(raised["users"]["@mod:hs"], 100);
        assert_eq!(with_upgrader_raised(&levels, &user("@owner:hs"), &[]), levels);
    }

    #[test]
    fn v12_creators_leave_the_users_map() {
        let levels = normalised_levels(&json!({ "users": { "@owner:hs": 100, "@co:hs": 100, "@mod:hs": 50 } }));
        let creators = [user("@owner:hs"), user("@co:hs")];
        let next = successor_levels(&levels, &user("@owner:hs"), ruma::int!(100).into(), &creators);
        assert_eq!(next["users"], json!({ "@mod:hs": 50 }));
        assert_eq!(with_upgrader_raised(&next, &user("@owner:hs"), &creators), next);
    }

    #[test]
    fn a_v12_creator_downgrading_keeps_the_top_level() {
        let levels = normalised_levels(&json!({ "users": { "@mod:hs": 50 } }));
        let next = successor_levels(&levels, &user("@owner:hs"), UserPowerLevel::Infinite, &[]);
        assert_eq!(next["users"]["@owner:hs"], 100);
    }
}
