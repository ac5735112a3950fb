//! Room aliases (`#name:server`): the local ones this server hands out, resolving them, deleting
//! them, and checking the aliases an `m.room.canonical_alias` event names. Aliases of other
//! servers need federation, which is not built yet: they resolve to `M_NOT_FOUND` saying so.

use lattice_core::power::RoomPower;
use lattice_storage::records::RoomAliasRecord;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::{OwnedRoomAliasId, OwnedRoomId, RoomAliasId, RoomId, UserId};
use serde_json::{Value, json};

use super::Rooms;
use crate::ServiceError;

/// Local aliases one room may have; `GET /rooms/{roomId}/aliases` lists them all.
pub const MAX_ALIASES_PER_ROOM: usize = 100;

const CANONICAL_ALIAS: &str = "m.room.canonical_alias";

impl Rooms {
    /// `PUT /directory/room/{roomAlias}`: maps a new local alias to a room the user is in.
    pub async fn create_alias(&self, user: &UserId, alias: &RoomAliasId, room_id: &RoomId) -> Result<(), ServiceError> {
        self.require_local_alias_grammar(alias)?;
        self.require_joined(user, room_id).await?;
        let existing = self
            .kv
            .scan(
                Table::RoomAliasIndex,
                &KeyRange::prefix(&keys::room_rows(room_id.as_str())),
                Direction::Forward,
                MAX_ALIASES_PER_ROOM,
            )
            .await?;
        if existing.len() >= MAX_ALIASES_PER_ROOM {
            return Err(ServiceError::InvalidParam(format!(
                "a room may have at most {MAX_ALIASES_PER_ROOM} local aliases"
            )));
        }
        let mut batch = WriteBatch::new();
        self.add_alias_to_batch(&mut batch, user, alias, room_id);
        match self.kv.write(batch).await {
            Err(lattice_storage::StorageError::Conflict) => Err(alias_in_use(alias)),
            Err(e) => Err(e.into()),
            Ok(()) => Ok(()),
        }
    }

    /// The writes that create a local alias, conditional on it not existing yet: the alias row
    /// and the room's index row go together. `createRoom` adds them to its create event's batch.
    pub(crate) fn add_alias_to_batch(
        &self,
        batch: &mut WriteBatch,
        creator: &UserId,
        alias: &RoomAliasId,
        room_id: &RoomId,
    ) {
        let key = keys::room_alias(alias.as_str());
        batch.expect(Table::RoomAliases, key.clone(), None);
        let record =
            RoomAliasRecord { room_id: room_id.to_string(), creator: creator.to_string(), created_ms: self.now_ms() };
        lattice_storage::put(batch, key, &record);
        batch.put(Table::RoomAliasIndex, keys::room_alias_of(room_id.as_str(), alias.as_str()), Vec::new());
    }

    /// An alias this server may hand out: ours, with a localpart people can type and link.
    pub(crate) fn require_local_alias_grammar(&self, alias: &RoomAliasId) -> Result<(), ServiceError> {
        if alias.server_name() != self.server_name() {
            return Err(ServiceError::InvalidParam(format!(
                "only aliases on {} can be created here",
                self.server_name()
            )));
        }
        check_alias_localpart(alias.alias())
    }

    /// Whether a local alias is free; `createRoom` checks this before it creates any event.
    pub(crate) async fn require_alias_free(&self, alias: &RoomAliasId) -> Result<(), ServiceError> {
        if self.kv.get(Table::RoomAliases, &keys::room_alias(alias.as_str())).await?.is_some() {
            return Err(ServiceError::RoomInUse(format!("room alias {alias} is already taken")));
        }
        Ok(())
    }

    /// The room a local alias points to. Used by `GET /directory/room/{alias}`, joins by alias
    /// and knocks by alias.
    pub async fn resolve_alias(&self, alias: &RoomAliasId) -> Result<OwnedRoomId, ServiceError> {
        let record = self.alias_record(alias).await?;
        OwnedRoomId::try_from(record.value.room_id).map_err(|e| ServiceError::Internal(e.to_string()))
    }

    async fn alias_record(
        &self,
        alias: &RoomAliasId,
    ) -> Result<lattice_storage::Fetched<RoomAliasRecord>, ServiceError> {
        if alias.server_name() != self.server_name() {
            return Err(ServiceError::NotFound(format!(
                "room alias {alias} belongs to another server; resolving it needs federation, which is not built yet"
            )));
        }
        lattice_storage::get::<RoomAliasRecord>(self.kv.as_ref(), &keys::room_alias(alias.as_str()))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("room alias {alias} not found")))
    }

    /// `DELETE /directory/room/{roomAlias}`: by the alias's creator, a user who may change the
    /// room's canonical alias, or a server admin. When the room's `m.room.canonical_alias` names
    /// the alias, an updated event without it follows, sent by the deleting user if their power
    /// allows; the spec recommends deleting the alias even when it does not.
    pub async fn delete_alias(&self, user: &UserId, alias: &RoomAliasId) -> Result<(), ServiceError> {
        let record = self.alias_record(alias).await?;
        let room_id =
            OwnedRoomId::try_from(record.value.room_id.as_str()).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let may_delete = record.value.creator == user.as_str()
            || self.is_server_admin(user).await?
            || self.may_change_canonical_alias(user, &room_id).await?;
        if !may_delete {
            return Err(ServiceError::Forbidden(format!(
                "only its creator, room moderators or server admins may delete {alias}"
            )));
        }
        let mut batch = WriteBatch::new();
        let key = keys::room_alias(alias.as_str());
        batch.expect(Table::RoomAliases, key.clone(), Some(record.raw));
        batch.delete(Table::RoomAliases, key);
        batch.delete(Table::RoomAliasIndex, keys::room_alias_of(room_id.as_str(), alias.as_str()));
        match self.kv.write(batch).await {
            // Someone else deleted (or re-pointed) it in between: as far as this caller knows, gone.
            Err(lattice_storage::StorageError::Conflict) => {
                return Err(ServiceError::NotFound(format!("room alias {alias} not found")));
            }
            other => other?,
        }
        // A second write: a crash right here leaves a canonical alias that no longer resolves,
        // which clients already have to expect (aliases of other servers can vanish any time).
        self.drop_from_canonical_alias(user, &room_id, alias).await
    }

    async fn drop_from_canonical_alias(
        &self,
        user: &UserId,
        room_id: &RoomId,
        alias: &RoomAliasId,
    ) -> Result<(), ServiceError> {
        let Some(current) = self.current_state_content(room_id, CANONICAL_ALIAS, "").await? else { return Ok(()) };
        let Some(updated) = canonical_alias_without(&current, alias.as_str()) else { return Ok(()) };
        if !self.may_change_canonical_alias(user, room_id).await? {
            tracing::info!(room_id = %room_id, alias = %alias, "alias deleted; the deleting user may not update the canonical alias");
            return Ok(());
        }
        self.send_event(user, room_id, CANONICAL_ALIAS, Some(""), updated, None).await?;
        Ok(())
    }

    /// `GET /rooms/{roomId}/aliases`: for members, or anyone when history is world-readable.
    pub async fn room_aliases(&self, user: &UserId, room_id: &RoomId) -> Result<Vec<OwnedRoomAliasId>, ServiceError> {
        self.room_version(room_id).await?;
        let world_readable = self
            .current_state_content(room_id, "m.room.history_visibility", "")
            .await?
            .is_some_and(|c| c["history_visibility"] == "world_readable");
        if !world_readable {
            self.require_member(user, room_id).await?;
        }
        let prefix = keys::room_rows(room_id.as_str());
        let rows = self
            .kv
            .scan(Table::RoomAliasIndex, &KeyRange::prefix(&prefix), Direction::Forward, MAX_ALIASES_PER_ROOM)
            .await?;
        rows.into_iter()
            .map(|(key, _)| {
                OwnedRoomAliasId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
                    .map_err(|e| ServiceError::Internal(e.to_string()))
            })
            .collect()
    }

    /// The check `send_event` runs on `m.room.canonical_alias` from local users: every alias it
    /// adds (compared with the current event) is valid, and local ones point to this room.
    /// Aliases already listed pass unchecked, so a stale one never blocks the room's moderators.
    pub(crate) async fn check_canonical_alias(&self, room_id: &RoomId, content: &Value) -> Result<(), ServiceError> {
        let current = self.current_state_content(room_id, CANONICAL_ALIAS, "").await?;
        let listed = current.as_ref().and_then(|c| listed_aliases(c).ok()).unwrap_or_default();
        for alias in listed_aliases(content)? {
            if listed.contains(&alias) {
                continue;
            }
            let alias = <&RoomAliasId>::try_from(alias.as_str())
                .map_err(|e| ServiceError::BadAlias(format!("{alias:?} is not a valid room alias: {e}")))?;
            // Remote aliases cannot be checked without federation; their grammar is.
            if alias.server_name() != self.server_name() {
                continue;
            }
            match self.resolve_alias(alias).await {
                Ok(target) if target == room_id => {}
                Ok(_) => return Err(ServiceError::BadAlias(format!("{alias} points to another room"))),
                Err(ServiceError::NotFound(_)) => {
                    return Err(ServiceError::BadAlias(format!("{alias} does not exist")));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the user may send `m.room.canonical_alias` in the room now: joined, with the
    /// power level the room's power levels ask for it. This also gates directory publishing.
    pub(crate) async fn may_change_canonical_alias(
        &self,
        user: &UserId,
        room_id: &RoomId,
    ) -> Result<bool, ServiceError> {
        if self.membership(user, room_id).await?.as_deref() != Some("join") {
            return Ok(false);
        }
        let version = self.room_version(room_id).await?;
        let (create, power_levels) = self.power_events(&version, room_id).await?;
        let power = RoomPower::new(&version, &create, power_levels.as_ref()).map_err(ServiceError::Internal)?;
        power.may_send_state(user, CANONICAL_ALIAS).map_err(ServiceError::Internal)
    }

    /// A room upgrade moves the old room's local aliases, and its directory entry, to the new
    /// room in one batch; the canonical alias event follows them (sent in the new room, emptied
    /// in the old one, as far as `user` may).
    pub(crate) async fn move_aliases(
        &self,
        user: &UserId,
        old_room: &RoomId,
        new_room: &RoomId,
    ) -> Result<(), ServiceError> {
        let prefix = keys::room_rows(old_room.as_str());
        let rows = self
            .kv
            .scan(Table::RoomAliasIndex, &KeyRange::prefix(&prefix), Direction::Forward, MAX_ALIASES_PER_ROOM)
            .await?;
        let mut batch = WriteBatch::new();
        for (index_key, _) in rows {
            let alias = String::from_utf8_lossy(&index_key[prefix.len()..]).into_owned();
            let alias_key = keys::room_alias(&alias);
            batch.delete(Table::RoomAliasIndex, index_key);
            let Some(record) = lattice_storage::get::<RoomAliasRecord>(self.kv.as_ref(), &alias_key).await? else {
                continue;
            };
            batch.expect(Table::RoomAliases, alias_key.clone(), Some(record.raw));
            lattice_storage::put(
                &mut batch,
                alias_key,
                &RoomAliasRecord { room_id: new_room.to_string(), ..record.value },
            );
            batch.put(Table::RoomAliasIndex, keys::room_alias_of(new_room.as_str(), &alias), Vec::new());
        }
        if self.kv.get(Table::PublicRooms, &keys::public_room(old_room.as_str())).await?.is_some() {
            self.publish_in_batch(&mut batch, old_room, false);
            self.publish_in_batch(&mut batch, new_room, true);
        }
        if !batch.is_empty() {
            self.kv.write(batch).await?;
        }
        let Some(canonical) = self.current_state_content(old_room, CANONICAL_ALIAS, "").await? else { return Ok(()) };
        if canonical.as_object().is_none_or(|c| c.is_empty()) {
            return Ok(());
        }
        self.send_event(user, new_room, CANONICAL_ALIAS, Some(""), canonical, None).await?;
        if let Err(e) = self.send_event(user, old_room, CANONICAL_ALIAS, Some(""), json!({}), None).await {
            // The aliases already point at the new room; a stale event in the old one only
            // misnames it.
            tracing::warn!(room = %old_room, error = %e, "could not clear the old room's canonical alias");
        }
        Ok(())
    }

    pub(crate) async fn is_server_admin(&self, user: &UserId) -> Result<bool, ServiceError> {
        let record = self.accounts.user_record(user).await?;
        Ok(record.is_some_and(|r| r.value.admin && !r.value.deactivated))
    }

    /// The content of a current state event, without any membership check (callers decide).
    pub(crate) async fn current_state_content(
        &self,
        room_id: &RoomId,
        kind: &str,
        key: &str,
    ) -> Result<Option<Value>, ServiceError> {
        let Some(event_id) =
            self.kv.get(Table::CurrentState, &keys::current_state(room_id.as_str(), kind, key)).await?
        else {
            return Ok(None);
        };
        let event = self.client_event(&String::from_utf8_lossy(&event_id)).await?;
        Ok(Some(event["content"].clone()))
    }
}

fn alias_in_use(alias: &RoomAliasId) -> ServiceError {
    ServiceError::AliasInUse(format!("room alias {alias} already exists"))
}

/// The localpart of an alias this server creates: 1 or more characters, none of them NUL, `:`,
/// whitespace or control characters (the spec only forbids `:` and NUL, but aliases are typed and
/// linked by people, and invisible characters make look-alikes). Total length is ruma's 255 bytes.
pub(crate) fn check_alias_localpart(localpart: &str) -> Result<(), ServiceError> {
    if localpart.is_empty() {
        return Err(ServiceError::InvalidParam("a room alias needs a local part".into()));
    }
    if localpart.chars().any(|c| c == ':' || c.is_whitespace() || c.is_control()) {
        return Err(ServiceError::InvalidParam(
            "a room alias's local part may not hold ':', whitespace or control characters".into(),
        ));
    }
    Ok(())
}

/// `alias` and `alt_aliases` of canonical-alias content, as strings; anything of another shape is
/// `M_BAD_ALIAS` (a null or absent `alias` means none).
fn listed_aliases(content: &Value) -> Result<Vec<String>, ServiceError> {
    let bad = |what: &str| ServiceError::BadAlias(format!("{what} must be a string room alias"));
    let mut aliases = Vec::new();
    match content.get("alias") {
        None | Some(Value::Null) => {}
        Some(Value::String(alias)) => aliases.push(alias.clone()),
        Some(_) => return Err(bad("alias")),
    }
    match content.get("alt_aliases") {
        None => {}
        Some(Value::Array(items)) => {
            for item in items {
                aliases.push(item.as_str().ok_or_else(|| bad("every alt_aliases entry"))?.to_owned());
            }
        }
        Some(_) => return Err(bad("alt_aliases")),
    }
    Ok(aliases)
}

/// Canonical-alias content with `alias` removed, or `None` when it did not name it.
fn canonical_alias_without(content: &Value, alias: &str) -> Option<Value> {
    let mut updated = content.as_object()?.clone();
    let mut changed = false;
    if updated.get("alias").and_then(Value::as_str) == Some(alias) {
        updated.remove("alias");
        changed = true;
    }
    if let Some(Value::Array(alt)) = updated.get_mut("alt_aliases") {
        let before = alt.len();
        alt.retain(|a| a.as_str() != Some(alias));
        changed |= alt.len() != before;
    }
    changed.then_some(Value::Object(updated))
}

/// Canonical-alias content naming one alias (what `createRoom` sends for `room_alias_name`).
pub(crate) fn canonical_alias_content(alias: &RoomAliasId) -> Value {
    json!({ "alias": alias })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localparts_people_can_type_are_accepted() {
        assert!(check_alias_localpart("coffee").is_ok());
        assert!(check_alias_localpart("café-talk_2").is_ok());
        for bad in ["", "a:b", "a b", "tab\there", "nul\0", "\u{200b}x\u{7}"] {
            assert!(check_alias_localpart(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn listed_aliases_reads_alias_and_alt_aliases_and_refuses_other_shapes() {
        let content = json!({ "alias": "#a:hs", "alt_aliases": ["#b:hs", "#c:other"] });
        assert_eq!(listed_aliases(&content).unwrap(), ["#a:hs", "#b:hs", "#c:other"]);
        assert!(listed_aliases(&json!({ "alias": null })).unwrap().is_empty());
        assert!(listed_aliases(&json!({ "alias": 5 })).is_err());
        assert!(listed_aliases(&json!({ "alt_aliases": "#a:hs" })).is_err());
        assert!(listed_aliases(&json!({ "alt_aliases": [1] })).is_err());
    }

    #[test]
    fn removing_an_alias_from_canonical_alias_content() {
        let content = json!({ "alias": "#a:hs", "alt_aliases": ["#b:hs", "#a:hs"] });
        assert_eq!(canonical_alias_without(&content, "#a:hs"), Some(json!({ "alt_aliases": ["#b:hs"] })));
        assert_eq!(
            canonical_alias_without(&content, "#b:hs"),
            Some(json!({ "alias": "#a:hs", "alt_aliases": ["#a:hs"] }))
        );
        assert_eq!(canonical_alias_without(&content, "#z:hs"), None);
    }

    /// Server admins moderate aliases and the directory without being in the room; other
    /// outsiders may do neither.
    #[tokio::test]
    async fn server_admins_delete_aliases_and_publish_rooms_of_rooms_they_are_not_in() {
        let (service, _) = crate::rooms::tests::service();
        let account = |name: &str, admin| crate::NewAccount { username: name.into(), password: "pw".into(), admin };
        let alice = service.accounts().create_user(account("alice", false)).await.unwrap();
        let admin = service.accounts().create_user(account("admin", true)).await.unwrap();
        let bob = service.accounts().create_user(account("bob", false)).await.unwrap();
        let request = crate::rooms::CreateRoom { room_alias_name: Some("lobby".into()), ..Default::default() };
        let room = service.rooms().create_room(&alice, request).await.unwrap();
        let alias = <&RoomAliasId>::try_from("#lobby:hs.test").unwrap();
        assert_eq!(service.rooms().resolve_alias(alias).await.unwrap(), room);

        assert!(matches!(
            service.rooms().set_room_visibility(&bob, &room, true).await,
            Err(ServiceError::Forbidden(_))
        ));
        service.rooms().set_room_visibility(&admin, &room, true).await.unwrap();
        assert!(service.rooms().room_is_public(&room).await.unwrap());
        assert!(matches!(service.rooms().delete_alias(&bob, alias).await, Err(ServiceError::Forbidden(_))));
        service.rooms().delete_alias(&admin, alias).await.unwrap();
        assert!(matches!(service.rooms().resolve_alias(alias).await, Err(ServiceError::NotFound(_))));
        // The admin is not in the room, so the canonical alias stays as it was (the spec's advice).
        let content = service.rooms().current_state_content(&room, CANONICAL_ALIAS, "").await.unwrap();
        assert_eq!(content, Some(json!({ "alias": "#lobby:hs.test" })));
    }
}
