//! Power levels as the auth rules read them, for servers deciding what to do before they build
//! an event: a user's level (from v12 the room's creators stand above every level), and the
//! level an action needs. The numbers come from ruma's auth-rule types, so a decision made here
//! agrees with the check the event will later pass through.

use std::collections::HashSet;

use ruma::events::TimelineEventType;
use ruma::events::room::power_levels::UserPowerLevel;
use ruma::state_res::events::{RoomCreateEvent, RoomPowerLevelsEvent, RoomPowerLevelsIntField};
use ruma::{Int, OwnedUserId, UserId};

use crate::event::Pdu;
use crate::room_version::RoomVersion;

/// The level a creator had before v12 when no power levels event says otherwise.
const DEFAULT_CREATOR_LEVEL: u8 = 100;

/// The power levels of one room state: its create event and power levels event.
pub struct RoomPower<'a> {
    version: &'a RoomVersion,
    creators: HashSet<OwnedUserId>,
    power_levels: Option<RoomPowerLevelsEvent<&'a Pdu>>,
}

impl<'a> RoomPower<'a> {
    /// Errors describe content the auth rules could not read either.
    pub fn new(version: &'a RoomVersion, create: &'a Pdu, power_levels: Option<&'a Pdu>) -> Result<Self, String> {
        let creators = RoomCreateEvent::new(create).creators(&version.rules().authorization)?;
        Ok(Self { version, creators, power_levels: power_levels.map(RoomPowerLevelsEvent::new) })
    }

    /// `user`'s level: infinite for creators from v12, else from `users` or `users_default`.
    pub fn user_level(&self, user: &UserId) -> Result<UserPowerLevel, String> {
        let rules = &self.version.rules().authorization;
        if rules.explicitly_privilege_room_creators && self.creators.contains(user) {
            return Ok(UserPowerLevel::Infinite);
        }
        match &self.power_levels {
            Some(levels) => Ok(levels.user_power_level(user, rules)?.into()),
            None if self.creators.contains(user) => Ok(Int::from(DEFAULT_CREATOR_LEVEL).into()),
            None => Ok(RoomPowerLevelsIntField::UsersDefault.default_value().into()),
        }
    }

    /// The level needed to send a state event of type `kind`.
    pub fn state_level(&self, kind: &str) -> Result<Int, String> {
        let rules = &self.version.rules().authorization;
        match &self.power_levels {
            Some(levels) => levels.event_power_level(&TimelineEventType::from(kind), Some(""), rules),
            None => Ok(RoomPowerLevelsIntField::StateDefault.default_value()),
        }
    }

    /// The level of one of the integer fields (`invite`, `ban`, …), or its default.
    pub fn field_level(&self, field: RoomPowerLevelsIntField) -> Result<Int, String> {
        match &self.power_levels {
            Some(levels) => levels.get_as_int_or_default(field, &self.version.rules().authorization),
            None => Ok(field.default_value()),
        }
    }

    /// Whether `user` may send a state event of type `kind`.
    pub fn may_send_state(&self, user: &UserId, kind: &str) -> Result<bool, String> {
        Ok(self.user_level(user)? >= self.state_level(kind)?)
    }

    /// Whether `user` may send an event of type `kind`: a state event when `state_key` is set
    /// (`events` or `state_default`), else a message-like one (`events` or `events_default`).
    pub fn may_send_event(&self, user: &UserId, kind: &str, state_key: Option<&str>) -> Result<bool, String> {
        let rules = &self.version.rules().authorization;
        let needed = match &self.power_levels {
            Some(levels) => levels.event_power_level(&TimelineEventType::from(kind), state_key, rules)?,
            None if state_key.is_some() => RoomPowerLevelsIntField::StateDefault.default_value(),
            None => RoomPowerLevelsIntField::EventsDefault.default_value(),
        };
        Ok(self.user_level(user)? >= needed)
    }

    /// Whether `user` has the `invite` level (the level a restricted join's authoriser needs).
    pub fn may_invite(&self, user: &UserId) -> Result<bool, String> {
        Ok(self.user_level(user)? >= self.field_level(RoomPowerLevelsIntField::Invite)?)
    }

    /// Whether `user` has the `redact` level, which redacting other users' events needs
    /// (everyone may redact their own).
    pub fn may_redact(&self, user: &UserId) -> Result<bool, String> {
        Ok(self.user_level(user)? >= self.field_level(RoomPowerLevelsIntField::Redact)?)
    }
}

/// The largest magnitude of a power level (canonical JSON integers).
const MAX_LEVEL: i64 = (1 << 53) - 1;

/// The shape the auth rules demand of `m.room.power_levels` content: the integer fields, and
/// `events`, `notifications` and `users` as maps to integers (strings of integers before v10),
/// `users` keyed by user IDs. Lets a server refuse content before it sends anything.
pub fn check_power_levels_content(content: &serde_json::Value, version: &RoomVersion) -> Result<(), String> {
    let integers_only = version.rules().authorization.integer_power_levels;
    let is_level = |value: &serde_json::Value| match value {
        serde_json::Value::Number(n) => n.as_i64().is_some_and(|level| level.abs() <= MAX_LEVEL),
        serde_json::Value::String(s) if !integers_only => s.trim().parse::<i64>().is_ok_and(|l| l.abs() <= MAX_LEVEL),
        _ => false,
    };
    let object = content.as_object().ok_or("power levels content must be an object")?;
    for field in ["users_default", "events_default", "state_default", "ban", "redact", "kick", "invite"] {
        if object.get(field).is_some_and(|level| !is_level(level)) {
            return Err(format!("power level `{field}` must be an integer"));
        }
    }
    for map in ["events", "notifications", "users"] {
        let Some(entries) = object.get(map) else { continue };
        let entries = entries.as_object().ok_or_else(|| format!("power levels `{map}` must be an object"))?;
        for (key, level) in entries {
            if !is_level(level) {
                return Err(format!("power level `{map}.{key}` must be an integer"));
            }
            if map == "users" && UserId::parse(key.as_str()).is_err() {
                return Err(format!("power levels `users` key {key:?} is not a user ID"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::room_builder::RoomBuilder;

    fn levels() -> serde_json::Value {
        json!({ "users": { "@mod:hs.test": 50 }, "users_default": 0, "invite": 50,
                "events": { "m.room.tombstone": 100 }, "state_default": 50 })
    }

    #[test]
    fn before_v12_the_creator_is_a_user_with_a_level() {
        let mut room = RoomBuilder::new("11");
        let create = room.create("@alice:hs.test");
        let mut content = levels();
        content["users"]["@alice:hs.test"] = json!(100);
        let power = room.event("@alice:hs.test", "m.room.power_levels", Some(""), content, &[&create], &[&create]);
        let version = room.version().clone();
        let power = RoomPower::new(&version, room.get(&create).unwrap(), room.get(&power)).unwrap();
        let user = |name: &str| UserId::parse(name).unwrap();
        assert!(power.may_send_state(&user("@alice:hs.test"), "m.room.tombstone").unwrap());
        assert!(!power.may_send_state(&user("@mod:hs.test"), "m.room.tombstone").unwrap());
        assert!(power.may_send_state(&user("@mod:hs.test"), "m.room.name").unwrap());
        assert!(power.may_invite(&user("@mod:hs.test")).unwrap());
        assert!(!power.may_invite(&user("@bob:hs.test")).unwrap());
        // `redact` is not set: the spec's default, 50.
        assert!(power.may_redact(&user("@mod:hs.test")).unwrap());
        assert!(!power.may_redact(&user("@bob:hs.test")).unwrap());
    }

    #[test]
    fn from_v12_creators_outrank_every_level() {
        let mut room = RoomBuilder::new("12");
        let create = room.create("@alice:hs.test");
        let power = room.event("@alice:hs.test", "m.room.power_levels", Some(""), levels(), &[&create], &[]);
        let version = room.version().clone();
        let power = RoomPower::new(&version, room.get(&create).unwrap(), room.get(&power)).unwrap();
        let alice = UserId::parse("@alice:hs.test").unwrap();
        assert_eq!(power.user_level(&alice).unwrap(), UserPowerLevel::Infinite);
        assert!(power.may_send_state(&alice, "m.room.tombstone").unwrap());
        // Not listed in `users`, yet above any `redact` level.
        assert!(power.may_redact(&alice).unwrap());
        assert!(!power.may_redact(&UserId::parse("@bob:hs.test").unwrap()).unwrap());
    }

    #[test]
    fn power_levels_content_must_have_the_shape_the_auth_rules_read() {
        let v9 = RoomVersion::parse("9").unwrap();
        let v11 = RoomVersion::parse("11").unwrap();
        assert!(check_power_levels_content(&levels(), &v11).is_ok());
        assert!(check_power_levels_content(&json!({ "ban": "50" }), &v9).is_ok());
        assert!(check_power_levels_content(&json!({ "ban": "50" }), &v11).is_err());
        for bad in [
            json!([]),
            json!({ "kick": "a lot" }),
            json!({ "users": { "not a user": 50 } }),
            json!({ "users": { "@a:hs.test": 1.5 } }),
            json!({ "events": [] }),
            json!({ "notifications": { "room": null } }),
            json!({ "redact": 9_007_199_254_740_992_i64 }),
        ] {
            assert!(check_power_levels_content(&bad, &v9).is_err(), "{bad}");
        }
    }

    #[test]
    fn without_power_levels_only_the_creator_has_power() {
        let mut room = RoomBuilder::new("10");
        let create = room.create("@alice:hs.test");
        let version = room.version().clone();
        let power = RoomPower::new(&version, room.get(&create).unwrap(), None).unwrap();
        assert!(power.may_send_state(&UserId::parse("@alice:hs.test").unwrap(), "m.room.name").unwrap());
        assert!(!power.may_send_state(&UserId::parse("@bob:hs.test").unwrap(), "m.room.name").unwrap());
    }
}
