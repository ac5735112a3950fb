//! What local users do to rooms: create them, send events (with transaction IDs), read state,
//! and change their membership. Every event goes through `build_local_event` and `ingest`.

use lattice_core::room_version::RoomVersion;
use lattice_storage::records::{EventRecord, JsonObject, RoomRecord, TransactionRecord};
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::{OwnedEventId, OwnedRoomId, RoomId, UserId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Rooms;
use super::local_events::check_type_and_state_key;
use super::visibility::StateView;
use super::{LocalEvent, Outcome};
use crate::ServiceError;
use crate::accounts::profile_content;
use crate::secrets::{hex, random_alphanumeric};

/// The room version new rooms get unless the client or the operator (`rooms.default_room_version`)
/// asks for another: the spec's recommendation.
pub const DEFAULT_ROOM_VERSION: &str = "11";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

/// A parsed `createRoom` request.
#[derive(Debug, Default)]
pub struct CreateRoom {
    pub preset: Option<Preset>,
    pub public_visibility: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub invite: Vec<ruma::OwnedUserId>,
    pub room_version: Option<String>,
    pub creation_content: Option<JsonObject>,
    pub initial_state: Vec<(String, String, JsonObject)>,
    pub power_level_content_override: Option<JsonObject>,
    pub is_direct: bool,
    /// The local part of an alias on this server to create for the room.
    pub room_alias_name: Option<String>,
    /// Invitees of other servers are left to the caller, which invites them over federation
    /// once the room exists (their servers must countersign); they still count for power levels.
    pub remote_invites_by_caller: bool,
}

/// A client's transaction: who sent it, from which device, under which ID.
pub struct Txn<'a> {
    pub device_id: &'a str,
    pub txn_id: &'a str,
}

impl Rooms {
    /// `POST /createRoom`: the create event, the creator's join, power levels, canonical alias,
    /// join rules, history visibility, guest access, initial state, name, topic, invites — each
    /// through ingest, in the spec's order. A requested alias is checked before any event exists
    /// and is written in the create event's batch, together with the directory entry.
    pub async fn create_room(&self, creator: &UserId, request: CreateRoom) -> Result<OwnedRoomId, ServiceError> {
        let version =
            RoomVersion::parse(request.room_version.as_deref().unwrap_or(&self.config().default_room_version))?;
        // Checked before the create event, so a bad request leaves no half-made room behind.
        for (kind, key, _) in &request.initial_state {
            check_type_and_state_key(kind, Some(key))?;
        }
        let preset = preset_of(&request);
        let power = power_levels(creator, &request.invite, preset, &version, request.power_level_content_override)?;
        lattice_core::power::check_power_levels_content(&power, &version).map_err(ServiceError::BadJson)?;
        let alias = match &request.room_alias_name {
            Some(name) => Some(self.free_local_alias(name).await?),
            None => None,
        };
        let create_content = serde_json::to_value(request.creation_content.unwrap_or(JsonObject(Default::default())))
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        // The alias and the directory entry are written in the create event's own batch.
        let with_create = |room_id: &RoomId| {
            let mut batch = WriteBatch::new();
            if let Some(alias) = &alias {
                self.add_alias_to_batch(&mut batch, creator, alias, room_id);
            }
            if request.public_visibility {
                self.publish_in_batch(&mut batch, room_id, true);
            }
            batch
        };
        let room_id = match self.send_create_event(&version, creator, create_content, with_create).await {
            Ok(room_id) => room_id,
            Err(e) => {
                // The alias may have been taken after the check above, failing the batch's
                // condition: nothing was written; say that rather than what the retries ran into.
                if let Some(alias) = &alias {
                    self.require_alias_free(alias).await?;
                }
                return Err(e);
            }
        };

        let member = profile_content(json!({ "membership": "join" }), &self.accounts.member_profile(creator).await?);
        self.send_state(&version, creator, &room_id, "m.room.member", creator.as_str(), member).await?;
        self.send_state(&version, creator, &room_id, "m.room.power_levels", "", power).await?;
        if let Some(alias) = &alias {
            let content = super::aliases::canonical_alias_content(alias);
            self.send_state(&version, creator, &room_id, "m.room.canonical_alias", "", content).await?;
        }
        let join_rule = if preset == Preset::PublicChat { "public" } else { "invite" };
        self.send_state(&version, creator, &room_id, "m.room.join_rules", "", json!({ "join_rule": join_rule }))
            .await?;
        self.send_state(
            &version,
            creator,
            &room_id,
            "m.room.history_visibility",
            "",
            json!({ "history_visibility": "shared" }),
        )
        .await?;
        let guest_access = if preset == Preset::PublicChat { "forbidden" } else { "can_join" };
        self.send_state(
            &version,
            creator,
            &room_id,
            "m.room.guest_access",
            "",
            json!({ "guest_access": guest_access }),
        )
        .await?;
        for (kind, key, content) in request.initial_state {
            let content = serde_json::to_value(content).map_err(|e| ServiceError::Internal(e.to_string()))?;
            self.send_state(&version, creator, &room_id, &kind, &key, content).await?;
        }
        if let Some(name) = request.name {
            self.send_state(&version, creator, &room_id, "m.room.name", "", json!({ "name": name })).await?;
        }
        if let Some(topic) = request.topic {
            self.send_state(&version, creator, &room_id, "m.room.topic", "", json!({ "topic": topic })).await?;
        }
        let by_caller =
            |user: &&ruma::OwnedUserId| request.remote_invites_by_caller && user.server_name() != self.server_name();
        for invitee in request.invite.iter().filter(|user| !by_caller(user)) {
            let content = json!({ "membership": "invite", "is_direct": request.is_direct });
            let content = profile_content(content, &self.accounts.member_profile(invitee).await?);
            self.send_state(&version, creator, &room_id, "m.room.member", invitee.as_str(), content).await?;
        }
        tracing::info!(room_id = %room_id, creator = %creator, version = %version.id(), "created room");
        Ok(room_id)
    }

    /// Starts a new room with its create event (`content` plus the version and, before v11, the
    /// creator); returns the room ID, which from v12 is derived from the event.
    pub(super) async fn send_create_event(
        &self,
        version: &RoomVersion,
        creator: &UserId,
        mut content: Value,
        written_with: impl FnOnce(&RoomId) -> WriteBatch,
    ) -> Result<OwnedRoomId, ServiceError> {
        content["room_version"] = json!(version.id().as_str());
        if !version.rules().authorization.use_room_create_sender {
            content["creator"] = json!(creator);
        }
        let derives_room_id = version.rules().authorization.room_create_event_id_as_room_id;
        let chosen: OwnedRoomId = format!("!{}:{}", random_alphanumeric(18), self.server_name())
            .try_into()
            .map_err(|e: ruma::IdParseError| ServiceError::Internal(e.to_string()))?;
        let create = LocalEvent {
            room_id: (!derives_room_id).then_some(&*chosen),
            sender: creator,
            kind: "m.room.create",
            state_key: Some(""),
            content,
        };
        let create = self.build_local_event(version, create).await?;
        let room_id = if derives_room_id {
            OwnedRoomId::try_from(format!("!{}", &create.id().as_str()[1..]))
                .map_err(|e| ServiceError::Internal(e.to_string()))?
        } else {
            chosen
        };
        self.accept_with(version, create, &written_with(&room_id)).await?;
        Ok(room_id)
    }

    /// Sends an event as a local user; a send the auth rules refuse is `M_FORBIDDEN` with the rule.
    pub async fn send_event(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        txn: Option<Txn<'_>>,
    ) -> Result<OwnedEventId, ServiceError> {
        let version = self.room_version(room_id).await?;
        if kind == "m.room.canonical_alias" && state_key.is_some() {
            self.check_canonical_alias(room_id, &content).await?;
        }
        // Concurrent retries of one transaction line up behind the room's lock, so the later
        // ones find the first one's record and answer with its event.
        let _room = self.room_lock(room_id.as_str()).lock().await;
        let txn_key = txn.as_ref().map(|txn| {
            let key = keys::room_transaction(sender.as_str(), txn.device_id, room_id.as_str(), txn.txn_id);
            let request_hash = hex(&Sha256::digest(json!([kind, state_key, content]).to_string().as_bytes()));
            (key, request_hash)
        });
        if let Some((key, request_hash)) = &txn_key
            && let Some(done) = self.transaction_event(key, request_hash).await?
        {
            return Ok(done);
        }
        // Building on the newest extremities and writing happen under the room's lock, so
        // concurrent sends line up instead of forking the room.
        let event = LocalEvent { room_id: Some(room_id), sender, kind, state_key, content };
        let event = self.build_local_event(&version, event).await?;
        let mut extra = WriteBatch::new();
        if let Some((key, request_hash)) = &txn_key {
            extra.expect(Table::Transactions, key.clone(), None);
            let record = TransactionRecord { event_id: event.id().to_string(), request_hash: request_hash.clone() };
            lattice_storage::put(&mut extra, key.clone(), &record);
        }
        let id = event.id().to_owned();
        let ingested = match self.ingest_unlocked(&version, event, &extra).await {
            Ok(ingested) => ingested,
            Err(e) => {
                // Another process may have stored the same transaction meanwhile (the batch's
                // condition failed): its event is the answer.
                if let Some((key, request_hash)) = &txn_key
                    && let Some(done) = self.transaction_event(key, request_hash).await?
                {
                    return Ok(done);
                }
                return Err(e);
            }
        };
        match ingested.outcome {
            Outcome::Accepted => Ok(id),
            Outcome::Rejected(reason) | Outcome::SoftFailed(reason) => Err(ServiceError::Forbidden(reason)),
            Outcome::Outlier => Err(ServiceError::Internal("a local event was stored as an outlier".into())),
        }
    }

    /// The event a stored transaction produced; the same transaction ID with another request
    /// is `M_INVALID_PARAM`.
    async fn transaction_event(&self, key: &[u8], request_hash: &str) -> Result<Option<OwnedEventId>, ServiceError> {
        let Some(done) = lattice_storage::get::<TransactionRecord>(self.kv.as_ref(), key).await? else {
            return Ok(None);
        };
        if done.value.request_hash != request_hash {
            return Err(ServiceError::InvalidParam("this transaction ID was used for a different request".into()));
        }
        OwnedEventId::try_from(done.value.event_id).map(Some).map_err(|e| ServiceError::Internal(e.to_string()))
    }

    async fn send_state(
        &self,
        version: &RoomVersion,
        sender: &UserId,
        room_id: &RoomId,
        kind: &str,
        key: &str,
        content: Value,
    ) -> Result<(), ServiceError> {
        let _room = self.room_lock(room_id.as_str()).lock().await;
        let event = LocalEvent { room_id: Some(room_id), sender, kind, state_key: Some(key), content };
        let event = self.build_local_event(version, event).await?;
        match self.ingest_unlocked(version, event, &WriteBatch::new()).await?.outcome {
            Outcome::Accepted => Ok(()),
            Outcome::Rejected(reason) | Outcome::SoftFailed(reason) => Err(ServiceError::Forbidden(reason)),
            Outcome::Outlier => Err(ServiceError::Internal("a local event was stored as an outlier".into())),
        }
    }

    /// Ingests `event` with `extra` in its batch; anything but acceptance is `M_FORBIDDEN`.
    async fn accept_with(
        &self,
        version: &RoomVersion,
        event: lattice_core::event::Pdu,
        extra: &WriteBatch,
    ) -> Result<(), ServiceError> {
        match self.ingest_with(version, event, extra).await?.outcome {
            Outcome::Accepted => Ok(()),
            Outcome::Rejected(reason) | Outcome::SoftFailed(reason) => Err(ServiceError::Forbidden(reason)),
            Outcome::Outlier => Err(ServiceError::Internal("a local event was stored as an outlier".into())),
        }
    }

    /// `#name:<this server>` for `createRoom`'s `room_alias_name`, valid and not yet taken.
    async fn free_local_alias(&self, name: &str) -> Result<ruma::OwnedRoomAliasId, ServiceError> {
        super::aliases::check_alias_localpart(name)?;
        let alias = ruma::OwnedRoomAliasId::try_from(format!("#{name}:{}", self.server_name()))
            .map_err(|e| ServiceError::InvalidParam(format!("invalid room alias name: {e}")))?;
        self.require_alias_free(&alias).await?;
        Ok(alias)
    }

    pub(crate) async fn room_version(&self, room_id: &RoomId) -> Result<RoomVersion, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str()))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("unknown room {room_id}")))?;
        Ok(RoomVersion::parse(&room.value.room_version)?)
    }

    /// A user's membership in a room (`join`, `invite`, `leave`, `ban`, `knock`), if any.
    pub async fn membership(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<String>, ServiceError> {
        let raw = self.kv.get(Table::Memberships, &keys::membership(user_id.as_str(), room_id.as_str())).await?;
        Ok(raw.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// `GET /joined_rooms`.
    pub async fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<OwnedRoomId>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::Memberships, &KeyRange::prefix(&prefix)).await?;
        rows.into_iter()
            .filter(|(_, membership)| membership == b"join")
            .map(|(key, _)| {
                OwnedRoomId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
                    .map_err(|e| ServiceError::Internal(e.to_string()))
            })
            .collect()
    }

    /// The room's state as client events: the current state for members (and anyone while the
    /// room is world-readable), the state at their leave for former members.
    pub async fn room_state(&self, user_id: &UserId, room_id: &RoomId) -> Result<Vec<Value>, ServiceError> {
        let viewer = self.reader(user_id, room_id).await?;
        if let StateView::AtGroup(group) = self.state_view(&viewer).await? {
            let state = super::state_store::load(self.kv.as_ref(), group).await?;
            let mut events = Vec::with_capacity(state.len());
            for id in state.values() {
                events.push(self.client_event(id.as_str()).await?);
            }
            return Ok(events);
        }
        let prefix = keys::room_rows(room_id.as_str());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::CurrentState, &KeyRange::prefix(&prefix)).await?;
        let mut events = Vec::with_capacity(rows.len());
        for (_, event_id) in rows {
            events.push(self.client_event(&String::from_utf8_lossy(&event_id)).await?);
        }
        Ok(events)
    }

    /// The content of one state event of the room's current state.
    pub async fn state_content(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        kind: &str,
        key: &str,
    ) -> Result<Value, ServiceError> {
        Ok(self.state_event(user_id, room_id, kind, key).await?["content"].take())
    }

    /// `GET /rooms/{roomId}/state/{eventType}/{stateKey}?format=event`: the whole state event
    /// (client format), as `state_content` finds it.
    pub async fn state_event(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        kind: &str,
        key: &str,
    ) -> Result<Value, ServiceError> {
        let viewer = self.reader(user_id, room_id).await?;
        let event_id = match self.state_view(&viewer).await? {
            StateView::Current => self
                .kv
                .get(Table::CurrentState, &keys::current_state(room_id.as_str(), kind, key))
                .await?
                .map(|id| String::from_utf8_lossy(&id).into_owned()),
            StateView::AtGroup(group) => {
                super::state_store::lookup(self.kv.as_ref(), group, &[(kind, key)]).await?.pop().flatten()
            }
        };
        let Some(event_id) = event_id else {
            return Err(ServiceError::NotFound(format!("no {kind} state with key {key:?}")));
        };
        self.client_event(&event_id).await
    }

    /// `GET /rooms/{roomId}/event/{eventId}`: an event of the room that the user may see.
    pub async fn room_event(&self, user_id: &UserId, room_id: &RoomId, event_id: &str) -> Result<Value, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        // Rejected and soft-failed events, events of other rooms and events hidden by the
        // history visibility are all equally unknown.
        if !self.may_see_id(viewer, event_id).await? {
            return Err(ServiceError::NotFound(format!("no event {event_id} in {room_id}")));
        }
        self.timeline_event(viewer, event_id).await
    }

    /// The room's current member events, optionally only those with (or without) a membership.
    pub async fn members(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        membership: Option<&str>,
        not_membership: Option<&str>,
    ) -> Result<Vec<Value>, ServiceError> {
        let viewer = self.reader(user_id, room_id).await?;
        let rows = match self.state_view(&viewer).await? {
            StateView::Current => self.member_event_ids(room_id).await?,
            StateView::AtGroup(group) => {
                let state = super::state_store::load(self.kv.as_ref(), group).await?;
                let mut rows: Vec<(String, String)> = state
                    .into_iter()
                    .filter(|((kind, _), _)| *kind == ruma::events::StateEventType::RoomMember)
                    .map(|((_, user), id)| (user, id.to_string()))
                    .collect();
                rows.sort_unstable();
                rows
            }
        };
        let mut members = Vec::with_capacity(rows.len());
        for (_, event_id) in rows {
            let event = self.client_event(&event_id).await?;
            let current = event["content"]["membership"].as_str().unwrap_or_default();
            if membership.is_some_and(|m| m != current) || not_membership.is_some_and(|m| m == current) {
                continue;
            }
            members.push(event);
        }
        Ok(members)
    }

    /// Every user with a member event in the room's current state (any membership), with the
    /// event's ID, in user-ID order.
    pub(crate) async fn member_event_ids(&self, room_id: &RoomId) -> Result<Vec<(String, String)>, ServiceError> {
        let prefix = keys::current_state(room_id.as_str(), "m.room.member", "");
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::CurrentState, &KeyRange::prefix(&prefix)).await?;
        Ok(member_rows(&prefix, rows))
    }

    /// [`Rooms::member_event_ids`], the first `limit` of them.
    pub(crate) async fn first_member_event_ids(
        &self,
        room_id: &RoomId,
        limit: usize,
    ) -> Result<Vec<(String, String)>, ServiceError> {
        let prefix = keys::current_state(room_id.as_str(), "m.room.member", "");
        let rows = self.kv.scan(Table::CurrentState, &KeyRange::prefix(&prefix), Direction::Forward, limit).await?;
        Ok(member_rows(&prefix, rows))
    }

    /// The room exists (else 404) and the user is joined to it (else 403).
    pub(crate) async fn require_joined(&self, user_id: &UserId, room_id: &RoomId) -> Result<(), ServiceError> {
        self.room_version(room_id).await?;
        self.require_member(user_id, room_id).await
    }

    /// Whether `user` could send an event of `kind` (a state event with `state_key`) into the
    /// room now: the room exists (else 404), the user is joined and has the power level the
    /// type needs (else 403). For what is scheduled now and sent later (delayed events), where
    /// the send itself checks again.
    pub(crate) async fn require_may_send(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        kind: &str,
        state_key: Option<&str>,
    ) -> Result<(), ServiceError> {
        let version = self.room_version(room_id).await?;
        self.require_member(user_id, room_id).await?;
        let (create, power_levels) = self.power_events(&version, room_id).await?;
        let power = lattice_core::power::RoomPower::new(&version, &create, power_levels.as_ref())
            .map_err(ServiceError::Internal)?;
        if !power.may_send_event(user_id, kind, state_key).map_err(ServiceError::Internal)? {
            return Err(ServiceError::Forbidden(format!("{user_id} may not send {kind} events in {room_id}")));
        }
        Ok(())
    }

    /// The user is joined to the room (`M_FORBIDDEN` otherwise, also for unknown rooms).
    pub(crate) async fn require_member(&self, user_id: &UserId, room_id: &RoomId) -> Result<(), ServiceError> {
        if self.membership(user_id, room_id).await?.as_deref() != Some("join") {
            return Err(ServiceError::Forbidden(format!("{user_id} is not in room {room_id}")));
        }
        Ok(())
    }

    /// A stored event in the client format (no hashes, signatures or graph fields); a redacted
    /// event carries the redaction that removed its content as `unsigned.redacted_because`.
    pub(crate) async fn client_event(&self, event_id: &str) -> Result<Value, ServiceError> {
        self.client_event_of(event_id, &self.stored_event(event_id).await?).await
    }

    /// [`Rooms::client_event`] from a record already read.
    pub(crate) async fn client_event_of(&self, event_id: &str, record: &EventRecord) -> Result<Value, ServiceError> {
        let mut event = client_format(event_id, record)?;
        if let Some(redaction_id) = &record.redacted_by {
            // The redaction is shown in its own client format, without following its own redaction.
            let redaction = client_format(redaction_id, &self.stored_event(redaction_id).await?)?;
            event["unsigned"]["redacted_because"] = redaction;
        }
        Ok(event)
    }

    async fn stored_event(&self, event_id: &str) -> Result<EventRecord, ServiceError> {
        Ok(lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id))
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("event {event_id} is not stored")))?
            .value)
    }
}

/// A stored event's JSON as clients see it: no hashes, signatures or graph fields, with its ID
/// and room, and always an `unsigned` object.
fn client_format(event_id: &str, record: &EventRecord) -> Result<Value, ServiceError> {
    let mut event: Value = serde_json::from_str(&record.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
    if let Some(object) = event.as_object_mut() {
        for field in
            ["hashes", "signatures", "auth_events", "prev_events", "depth", "origin", "prev_state", "membership"]
        {
            object.remove(field);
        }
        object.insert("event_id".into(), json!(event_id));
        object.insert("room_id".into(), json!(record.room_id));
        if object.get("type").and_then(Value::as_str) == Some("m.room.redaction") {
            mirror_redacts(object);
        }
        // Writers below index into `unsigned`, which must be an object for that.
        if !object.get("unsigned").is_some_and(Value::is_object) {
            object.insert("unsigned".into(), json!({}));
        }
    }
    Ok(event)
}

/// A redaction names its target at the top level up to room version 10 and in `content` from
/// v11. Clients read one or the other (matrix-js-sdk, and so Element Web, reads only the top
/// level), so the client API shows it in both places, as the v11 rules ask of servers.
fn mirror_redacts(redaction: &mut serde_json::Map<String, Value>) {
    let top_level = redaction.get("redacts").filter(|target| target.is_string()).cloned();
    let in_content =
        redaction.get("content").and_then(|content| content.get("redacts")).filter(|t| t.is_string()).cloned();
    match (top_level, in_content) {
        (None, Some(target)) => {
            redaction.insert("redacts".into(), target);
        }
        (Some(target), None) => {
            if let Some(content) = redaction.get_mut("content").and_then(Value::as_object_mut) {
                content.insert("redacts".into(), target);
            }
        }
        _ => {}
    }
}

/// `(user ID, member event ID)` of current-state member rows under `prefix`.
fn member_rows(prefix: &[u8], rows: Vec<lattice_storage::Row>) -> Vec<(String, String)> {
    rows.into_iter()
        .map(|(key, id)| {
            (String::from_utf8_lossy(&key[prefix.len()..]).into_owned(), String::from_utf8_lossy(&id).into_owned())
        })
        .collect()
}

/// The preset the client chose, or the one its visibility implies.
fn preset_of(request: &CreateRoom) -> Preset {
    request.preset.unwrap_or(if request.public_visibility { Preset::PublicChat } else { Preset::PrivateChat })
}

/// The power levels `createRoom` starts a room with: the spec's defaults, the creator at 100
/// (from v12 creators stand above power levels and are left out), invitees of a trusted chat at
/// 100, then the client's override on top.
fn power_levels(
    creator: &UserId,
    invite: &[ruma::OwnedUserId],
    preset: Preset,
    version: &RoomVersion,
    override_content: Option<JsonObject>,
) -> Result<Value, ServiceError> {
    let creators_privileged = version.rules().authorization.explicitly_privilege_room_creators;
    let mut users = serde_json::Map::new();
    if !creators_privileged {
        users.insert(creator.to_string(), json!(100));
    }
    if preset == Preset::TrustedPrivateChat {
        for user in invite {
            users.insert(user.to_string(), json!(100));
        }
    }
    let mut content = json!({
        "users": users, "users_default": 0, "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100,
        },
        "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50,
        "invite": 0,
        "notifications": { "room": 50 },
    });
    if let Some(overrides) = override_content
        && let Some(target) = content.as_object_mut()
    {
        for (key, value) in overrides.0 {
            target.insert(key, value);
        }
    }
    Ok(content)
}
