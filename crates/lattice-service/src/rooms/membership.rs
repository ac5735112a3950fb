//! Membership changes that need more than one event's worth of thought: joining restricted
//! rooms (the server names a local user who vouches for the join), knocking, and forgetting
//! rooms one has left.

use std::ops::Bound;

use lattice_core::event::Pdu;
use lattice_core::power::RoomPower;
use lattice_core::room_version::RoomVersion;
use lattice_storage::records::{EventRecord, ForgottenRoomRecord};
use lattice_storage::{Direction, KeyRange, StorageError, Table, WriteBatch, keys};
use ruma::state_res::Event;
use ruma::{CanonicalJsonObject, OwnedEventId, OwnedUserId, RoomId, UserId};
use serde_json::{Value, json};

use super::Rooms;
use crate::ServiceError;
use crate::accounts::profile_content;

/// Most `allow` entries of a restricted room looked at for one join.
const MAX_ALLOW_RULES: usize = 100;

/// How often a forget is retried when the user's membership changes at the same moment.
const FORGET_RETRIES: usize = 4;

impl Rooms {
    /// `POST /join`: the user's join event. In a restricted room (`restricted` from v8,
    /// `knock_restricted` from v10) a user who is not invited may join by being in one of the
    /// rooms the join rules allow; the join then names a local member who may invite
    /// (`join_authorised_via_users_server`), which the auth rules check.
    pub async fn join_room(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let version = self.room_version(room_id).await?;
        let profile = self.accounts.member_profile(user_id).await?;
        let mut content = profile_content(member_content("join", reason), &profile);
        if let Some(authoriser) = self.restricted_join_authoriser(&version, user_id, room_id).await? {
            content["join_authorised_via_users_server"] = json!(authoriser);
        }
        self.send_event(user_id, room_id, "m.room.member", Some(user_id.as_str()), content, None).await
    }

    /// `POST /knock`: asks to be let into a room whose join rule is `knock` (from v7) or
    /// `knock_restricted` (from v10). Anything else is refused by the auth rules, with the rule.
    pub async fn knock(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let version = self.room_version(room_id).await?;
        if !version.rules().authorization.knocking {
            return Err(ServiceError::Forbidden(format!(
                "room {room_id} is version {}, which has no knocking (it came with version 7)",
                version.id()
            )));
        }
        let profile = self.accounts.member_profile(user_id).await?;
        let content = profile_content(member_content("knock", reason), &profile);
        self.send_event(user_id, room_id, "m.room.member", Some(user_id.as_str()), content, None).await
    }

    /// `POST /unban`: lifts a ban, leaving the target with membership `leave`. Refused unless the
    /// target is banned now, so that an unban can never act as a kick. Checked under the room's
    /// lock, so no local membership change slips in between the check and the event.
    pub async fn unban(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        target: &UserId,
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let version = self.room_version(room_id).await?;
        let _room = self.room_lock(room_id.as_str()).lock().await;
        if self.membership(target, room_id).await?.as_deref() != Some("ban") {
            return Err(ServiceError::Forbidden(format!("{target} is not banned from {room_id}")));
        }
        let content = member_content("leave", reason);
        let event = super::LocalEvent {
            room_id: Some(room_id),
            sender,
            kind: "m.room.member",
            state_key: Some(target.as_str()),
            content,
        };
        let event = self.build_local_event(&version, event).await?;
        let event_id = event.id().to_owned();
        match self.ingest_unlocked(&version, event, &WriteBatch::new()).await?.outcome {
            super::Outcome::Accepted => Ok(event_id),
            super::Outcome::Rejected(reason) | super::Outcome::SoftFailed(reason) => {
                Err(ServiceError::Forbidden(reason))
            }
            super::Outcome::Outlier => Err(ServiceError::Internal("a local event was stored as an outlier".into())),
        }
    }

    /// `POST /invite`, `/kick` and `/ban`: `target`'s membership set by `sender`. An invite of a
    /// local user carries the invitee's display name and avatar, so clients can show who it is.
    pub async fn set_membership(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        target: &UserId,
        membership: &str,
        reason: Option<String>,
    ) -> Result<OwnedEventId, ServiceError> {
        let mut content = member_content(membership, reason);
        if membership == "invite" {
            content = profile_content(content, &self.accounts.member_profile(target).await?);
        }
        self.send_event(sender, room_id, "m.room.member", Some(target.as_str()), content, None).await
    }

    /// For a deactivated account: leaves every room the user is joined to, rejects their
    /// pending invites and withdraws their knocks, each with a bare `leave` (no display name or
    /// avatar). Pages through all their memberships; a room that refuses is logged and skipped.
    /// Returns how many rooms were left.
    pub(crate) async fn leave_every_room(&self, user_id: &UserId) -> Result<usize, ServiceError> {
        const PAGE_ROWS: usize = 1_000;
        let prefix = keys::user_rows(user_id.as_str());
        let mut range = KeyRange::prefix(&prefix);
        let mut left = 0;
        loop {
            let rows = self.kv.scan(Table::Memberships, &range, Direction::Forward, PAGE_ROWS).await?;
            let last_page = rows.len() < PAGE_ROWS;
            if let Some((last, _)) = rows.last() {
                range.start = Bound::Excluded(last.clone());
            }
            for (key, membership) in rows {
                if !matches!(membership.as_slice(), b"join" | b"invite" | b"knock") {
                    continue;
                }
                let room_id = RoomId::parse(String::from_utf8_lossy(&key[prefix.len()..]).as_ref())
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                let content = member_content("leave", None);
                match self.send_event(user_id, &room_id, "m.room.member", Some(user_id.as_str()), content, None).await {
                    Ok(_) => left += 1,
                    Err(error) => tracing::warn!(%user_id, %room_id, %error, "deactivated user could not leave room"),
                }
            }
            if last_page {
                return Ok(left);
            }
        }
    }

    /// `POST /forget`: the user no longer sees the room in `/sync`. Only for rooms they have left
    /// or been banned from; a later membership change (an invite, a join) ends it.
    pub async fn forget_room(&self, user_id: &UserId, room_id: &RoomId) -> Result<(), ServiceError> {
        self.room_version(room_id).await?;
        let member_key = keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str());
        for _ in 0..FORGET_RETRIES {
            let membership = self.membership(user_id, room_id).await?;
            if !matches!(membership.as_deref(), Some("leave" | "ban")) {
                return Err(ServiceError::BadRequest(format!(
                    "{user_id} has not left room {room_id}; leave it before forgetting it"
                )));
            }
            let Some(event_id) = self.kv.get(Table::CurrentState, &member_key).await? else {
                return Err(ServiceError::Internal(format!("no member event of {user_id} in {room_id}")));
            };
            // Written only if the membership is still the one checked above.
            let mut batch = WriteBatch::new();
            batch.expect(Table::CurrentState, member_key.clone(), Some(event_id.clone()));
            let record = ForgottenRoomRecord { membership_event_id: String::from_utf8_lossy(&event_id).into_owned() };
            lattice_storage::put(&mut batch, keys::forgotten_room(user_id.as_str(), room_id.as_str()), &record);
            match self.kv.write(batch).await {
                Ok(()) => return Ok(()),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("the membership keeps changing; try again".into()))
    }

    /// Whether `/sync` leaves the room out: the user forgot it and has not changed membership since.
    pub(crate) async fn is_forgotten(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        membership: &str,
    ) -> Result<bool, ServiceError> {
        if !matches!(membership, "leave" | "ban") {
            return Ok(false);
        }
        let key = keys::forgotten_room(user_id.as_str(), room_id.as_str());
        let Some(forgotten) = lattice_storage::get::<ForgottenRoomRecord>(self.kv.as_ref(), &key).await? else {
            return Ok(false);
        };
        let current = self
            .kv
            .get(Table::CurrentState, &keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str()))
            .await?;
        Ok(current.is_some_and(|id| id == forgotten.value.membership_event_id.as_bytes()))
    }

    /// For a join the restricted join rules decide: a local member who may invite, to vouch
    /// for it. `None` when the join needs no one (another join rule, or the user is invited or
    /// joined already — or banned, which the auth rules refuse with their own reason).
    pub(super) async fn restricted_join_authoriser(
        &self,
        version: &RoomVersion,
        user_id: &UserId,
        room_id: &RoomId,
    ) -> Result<Option<OwnedUserId>, ServiceError> {
        let Some(join_rules) = self.current_state_pdu(version, room_id, "m.room.join_rules", "").await? else {
            return Ok(None);
        };
        let content = content_of(&join_rules)?;
        let rules = &version.rules().authorization;
        let restricted = match content["join_rule"].as_str() {
            Some("restricted") => rules.restricted_join_rule,
            Some("knock_restricted") => rules.knock_restricted_join_rule,
            _ => false,
        };
        if !restricted
            || self.membership(user_id, room_id).await?.is_some_and(|m| matches!(m.as_str(), "join" | "invite" | "ban"))
        {
            return Ok(None);
        }
        let allowed_rooms: Vec<&str> = content["allow"]
            .as_array()
            .map(|allow| {
                allow
                    .iter()
                    .take(MAX_ALLOW_RULES)
                    .filter(|rule| rule["type"] == "m.room_membership")
                    .filter_map(|rule| rule["room_id"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let mut member_of_allowed = false;
        for allowed in &allowed_rooms {
            let Ok(allowed) = RoomId::parse(*allowed) else { continue };
            if self.membership(user_id, &allowed).await?.as_deref() == Some("join") {
                member_of_allowed = true;
                break;
            }
        }
        if !member_of_allowed {
            return Err(ServiceError::Forbidden(format!(
                "{room_id} is restricted: join one of the rooms it allows ({}) or ask for an invite",
                if allowed_rooms.is_empty() { "it allows none".to_owned() } else { allowed_rooms.join(", ") }
            )));
        }
        match self.local_inviter(version, room_id).await? {
            Some(authoriser) => Ok(Some(authoriser)),
            None => Err(ServiceError::Forbidden(format!(
                "no user of this server in {room_id} may invite, so nobody can authorise a restricted join"
            ))),
        }
    }

    /// A user of this server joined to the room with the `invite` power level.
    async fn local_inviter(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
    ) -> Result<Option<OwnedUserId>, ServiceError> {
        let (create, power_levels) = self.power_events(version, room_id).await?;
        let power = RoomPower::new(version, &create, power_levels.as_ref()).map_err(ServiceError::Internal)?;
        for (member, _) in self.member_event_ids(room_id).await? {
            let Ok(member) = UserId::parse(member.as_str()) else { continue };
            if member.server_name() != self.server_name()
                || self.membership(&member, room_id).await?.as_deref() != Some("join")
            {
                continue;
            }
            if power.may_invite(&member).map_err(ServiceError::Internal)? {
                return Ok(Some(member));
            }
        }
        Ok(None)
    }

    /// The room's current create and power levels events, for [`RoomPower`].
    pub(super) async fn power_events(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
    ) -> Result<(Pdu, Option<Pdu>), ServiceError> {
        let create = self
            .current_state_pdu(version, room_id, "m.room.create", "")
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("room {room_id} has no create event")))?;
        let power_levels = self.current_state_pdu(version, room_id, "m.room.power_levels", "").await?;
        Ok((create, power_levels))
    }

    /// One event of the room's current state, as a PDU.
    pub(super) async fn current_state_pdu(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        kind: &str,
        key: &str,
    ) -> Result<Option<Pdu>, ServiceError> {
        let Some(id) = self.kv.get(Table::CurrentState, &keys::current_state(room_id.as_str(), kind, key)).await?
        else {
            return Ok(None);
        };
        let id = OwnedEventId::try_from(String::from_utf8_lossy(&id).into_owned())
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(id.as_str()))
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("state event {id} is not stored")))?;
        let object: CanonicalJsonObject =
            serde_json::from_str(&record.value.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let pdu = Pdu::stored(object, version, id).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(Some(pdu))
    }
}

/// A state event's content as JSON.
pub(super) fn content_of(event: &Pdu) -> Result<Value, ServiceError> {
    serde_json::from_str(event.content().get()).map_err(|e| ServiceError::Internal(e.to_string()))
}

/// The content of a member event: the membership and, when given, the reason for it.
pub fn member_content(membership: &str, reason: Option<String>) -> Value {
    let mut content = json!({ "membership": membership });
    if let Some(reason) = reason {
        content["reason"] = json!(reason);
    }
    content
}
