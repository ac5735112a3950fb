//! What the federation service needs from the room model, and nothing else reaches: the
//! servers in a room, whether a server may see an event (the same history-visibility rule users
//! get), the state before an event and auth chains as other servers ask for them, the local
//! events owed to other servers, membership templates for remote users, and events checked as
//! fetched (not pushed) PDUs.

use std::collections::{BTreeSet, HashMap, HashSet};

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_core::state_resolution::StateMap;
use lattice_core::visibility::{EventFacts, HistoryVisibility, StateFacts, may_see};
use lattice_storage::records::{EventRecord, EventStatus, RoomRecord, StateGroupRecord};
use lattice_storage::{Direction, KeyRange, Table, keys};
use ruma::events::StateEventType;
use ruma::{CanonicalJsonObject, EventId, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId, ServerName, UserId};
use serde_json::{Value, json};

use super::ingest::{Loaded, room_id_of};
use super::state_store::{self, StateRef};
use super::{LocalEvent, Outcome, Rooms};
use crate::ServiceError;

/// Fetched outliers written per batch: a big room's state arrives in a few writes.
const OUTLIERS_PER_WRITE: usize = 1_000;

/// A live event of this server's users, owed to the other servers in its room.
pub struct OwedEvent {
    pub position: u64,
    pub room_id: OwnedRoomId,
    pub pdu_json: String,
    /// For a membership event: whose (their server is owed it even when it leaves the room).
    pub member: Option<String>,
}

/// The value of an event's row in the room-activity stream: whether its sender is a user of
/// this server, so that the forwarder passes over other servers' events without reading them.
/// Rows written before this was recorded (and out-of-band events' rows) are empty: the forwarder
/// reads their events.
pub(super) fn event_activity(local_sender: bool) -> Vec<u8> {
    vec![if local_sender { BY_LOCAL_SENDER } else { BY_REMOTE_SENDER }]
}
const BY_LOCAL_SENDER: u8 = 1;
const BY_REMOTE_SENDER: u8 = 0;

/// What the forwarder reads of a stored event to learn whether it is owed.
#[derive(serde::Deserialize)]
struct EventHead {
    sender: String,
    #[serde(rename = "type")]
    kind: String,
    state_key: Option<String>,
}

/// Rooms whose joined servers are kept at most; full, the cache starts again empty.
const MAX_CACHED_ROOMS: usize = 4_096;

/// Each room's joined servers as of a current state group. Memberships change only with the
/// room's state, which moves its current state group, so a set read at or after group `g` is
/// right for every reader who finds the room at `g`: the forwarder asks once per pass, and a
/// big room's members are read again only after a state change.
#[derive(Default)]
pub(super) struct JoinedServersCache {
    rooms: std::sync::Mutex<HashMap<OwnedRoomId, (u64, BTreeSet<OwnedServerName>)>>,
}

impl JoinedServersCache {
    fn get(&self, room_id: &RoomId, group: u64) -> Option<BTreeSet<OwnedServerName>> {
        let rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        rooms.get(room_id).filter(|(cached, _)| *cached == group).map(|(_, servers)| servers.clone())
    }

    fn insert(&self, room_id: &RoomId, group: u64, servers: &BTreeSet<OwnedServerName>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if rooms.len() >= MAX_CACHED_ROOMS {
            rooms.clear();
        }
        rooms.insert(room_id.to_owned(), (group, servers.clone()));
    }
}

impl Rooms {
    /// The servers with a joined member in the room's current state.
    pub async fn joined_servers(&self, room_id: &RoomId) -> Result<BTreeSet<OwnedServerName>, ServiceError> {
        // Read before the members, so what is cached under it is at least as new.
        let group = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str()))
            .await?
            .map(|room| room.value.current_state_group);
        if let Some(servers) = group.and_then(|group| self.joined_servers_cache.get(room_id, group)) {
            return Ok(servers);
        }
        let servers = self.read_joined_servers(room_id).await?;
        if let Some(group) = group {
            self.joined_servers_cache.insert(room_id, group, &servers);
        }
        Ok(servers)
    }

    async fn read_joined_servers(&self, room_id: &RoomId) -> Result<BTreeSet<OwnedServerName>, ServiceError> {
        let mut servers = BTreeSet::new();
        for (user, _) in self.member_event_ids(room_id).await? {
            let Ok(user_id) = UserId::parse(user.as_str()) else { continue };
            if servers.contains(user_id.server_name()) {
                continue;
            }
            if self.membership(&user_id, room_id).await?.as_deref() == Some("join") {
                servers.insert(user_id.server_name().to_owned());
            }
        }
        Ok(servers)
    }

    /// Whether a user of this server is joined to the room now (the remote members' device
    /// lists are cached only while one is).
    pub async fn has_local_member(&self, room_id: &RoomId) -> Result<bool, ServiceError> {
        for (user, _) in self.member_event_ids(room_id).await? {
            let Ok(user_id) = UserId::parse(user.as_str()) else { continue };
            if user_id.server_name() == self.server_name()
                && self.membership(&user_id, room_id).await?.as_deref() == Some("join")
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The room's forward extremities (the newest events, which nothing cites yet).
    pub async fn forward_extremities(&self, room_id: &RoomId) -> Result<Vec<String>, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str()))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("unknown room {room_id}")))?;
        Ok(room.value.forward_extremities)
    }

    /// Whether the room's server ACL (`m.room.server_acl` in the current state) lets `server`
    /// take part. No ACL allows every server; an ACL whose content cannot be read denies all
    /// but this server, as an empty allow list would.
    pub async fn server_allowed_by_acl(&self, server: &ServerName, room_id: &RoomId) -> Result<bool, ServiceError> {
        let Some(id) = self.current_state_id(room_id, "m.room.server_acl", "").await? else { return Ok(true) };
        let id = OwnedEventId::try_from(id).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let Some(json) = self.stored_pdu_json(&id).await? else { return Ok(true) };
        let pdu: Value = serde_json::from_str(&json).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(
            match serde_json::from_value::<ruma::events::room::server_acl::RoomServerAclEventContent>(
                pdu["content"].clone(),
            ) {
                Ok(acl) => acl.is_allowed(server),
                Err(_) => server == self.server_name(),
            },
        )
    }

    /// Whether a user of `server` is joined to the room now: who may ask about its history.
    pub async fn server_in_room(&self, server: &ServerName, room_id: &RoomId) -> Result<bool, ServiceError> {
        Ok(self.joined_servers(room_id).await?.contains(server))
    }

    /// The stored, not rejected, event with its record, when it belongs to `room_id`.
    pub async fn event_in_room(&self, room_id: &RoomId, event_id: &EventId) -> Result<EventRecord, ServiceError> {
        match self.event_record(event_id.as_str()).await? {
            Some(record)
                if record.room_id == room_id.as_str() && !matches!(record.status, EventStatus::Rejected { .. }) =>
            {
                Ok(record)
            }
            _ => Err(ServiceError::NotFound(format!("unknown event {event_id} in {room_id}"))),
        }
    }

    /// The spec's history-visibility rule for a server (server-server API, "Room history
    /// visibility" for servers): a server sees what one of its users could — world-readable and
    /// shared history to a server now in the room, `invited` history to one with an invited or
    /// joined user at the event, `joined` history to one with a joined user at the event.
    pub async fn server_may_see(&self, server: &ServerName, record: &EventRecord) -> Result<bool, ServiceError> {
        if record.status == EventStatus::Outlier {
            return Ok(false);
        }
        let room_id =
            OwnedRoomId::try_from(record.room_id.as_str()).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let state = state_store::load(self.kv.as_ref(), record.state_group).await?;
        let setting = match state.get(&(StateEventType::RoomHistoryVisibility, String::new())) {
            Some(id) => self.content_field(id, "history_visibility").await?,
            None => None,
        };
        let mut best: Option<String> = None;
        let suffix = format!(":{server}");
        for ((kind, key), id) in &state {
            if *kind != StateEventType::RoomMember || !key.ends_with(&suffix) {
                continue;
            }
            match self.content_field(id, "membership").await?.as_deref() {
                Some("join") => best = Some("join".to_owned()),
                Some("invite") if best.is_none() => best = Some("invite".to_owned()),
                _ => {}
            }
        }
        let facts = EventFacts {
            at: StateFacts { visibility: HistoryVisibility::from_setting(setting.as_deref()), membership: best },
            before: None,
            // Only servers in the room may ask at all.
            joined_later: self.server_in_room(server, &room_id).await?,
        };
        Ok(may_see(&facts))
    }

    async fn content_field(&self, event_id: &EventId, field: &str) -> Result<Option<String>, ServiceError> {
        let Some(record) = self.event_record(event_id.as_str()).await? else { return Ok(None) };
        let value: serde_json::Value =
            serde_json::from_str(&record.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(value["content"][field].as_str().map(str::to_owned))
    }

    /// The state before a stored, placed event, as event IDs: what `/state_ids` and `/state`
    /// answer. A state event's group is its parent with the event's slot set (one delta); when
    /// the group is a snapshot instead, the state is recomputed from the event's prev events.
    pub async fn state_before_event(&self, event_id: &EventId) -> Result<StateMap, ServiceError> {
        let record = self
            .event_record(event_id.as_str())
            .await?
            .filter(|r| !matches!(r.status, EventStatus::Outlier | EventStatus::Rejected { .. }))
            .ok_or_else(|| ServiceError::NotFound(format!("no state is known at {event_id}")))?;
        let pdu: serde_json::Value =
            serde_json::from_str(&record.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let Some(state_key) = pdu["state_key"].as_str() else {
            return state_store::load(self.kv.as_ref(), record.state_group).await;
        };
        let kind = pdu["type"].as_str().unwrap_or_default();
        let group = lattice_storage::get::<StateGroupRecord>(self.kv.as_ref(), &keys::state_group(record.state_group))
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("state group {} is missing", record.state_group)))?
            .value;
        let own_delta = group.delta.len() == 1
            && group.delta[0] == (kind.to_owned(), state_key.to_owned(), event_id.as_str().to_owned());
        if let (true, Some(parent)) = (own_delta, group.parent) {
            return state_store::load(self.kv.as_ref(), parent).await;
        }
        // A snapshot (or a soft-failed event, whose group is the state before it).
        let mut state = state_store::load(self.kv.as_ref(), record.state_group).await?;
        if state.get(&(StateEventType::from(kind), state_key.to_owned())).map(|id| id.as_ref()) != Some(event_id) {
            return Ok(state);
        }
        let version = self
            .room_version(
                &OwnedRoomId::try_from(record.room_id.as_str()).map_err(|e| ServiceError::Internal(e.to_string()))?,
            )
            .await?;
        let prevs = referenced_ids(&record.json, "prev_events");
        let mut states = Vec::new();
        for prev in &prevs {
            if let Some(prev) = self.event_record(prev.as_str()).await?
                && !matches!(prev.status, EventStatus::Outlier | EventStatus::Rejected { .. })
            {
                states.push(state_store::load(self.kv.as_ref(), prev.state_group).await?);
            }
        }
        match states.len() {
            0 => {
                state.remove(&(StateEventType::from(kind), state_key.to_owned()));
                Ok(state)
            }
            1 => Ok(states.pop().unwrap_or_default()),
            _ => self.resolve(&version, &states, &mut Loaded::new()).await,
        }
    }

    /// Every event in the auth chains of `ids` (not `ids` themselves unless one is in another's
    /// chain), as stored PDU JSON, in no particular order.
    pub async fn auth_chain_of(&self, ids: &[OwnedEventId]) -> Result<Vec<(OwnedEventId, String)>, ServiceError> {
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut chain = Vec::new();
        let mut frontier: Vec<OwnedEventId> = Vec::new();
        for id in ids {
            frontier.extend(self.auth_event_ids_of(id).await?);
        }
        while let Some(id) = frontier.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if seen.len() > lattice_core::limits::MAX_AUTH_CHAIN_EVENTS {
                return Err(ServiceError::Internal("auth chain over the limit".into()));
            }
            let Some(record) = self.event_record(id.as_str()).await? else { continue };
            frontier.extend(auth_ids_in(&record.json));
            chain.push((id, record.json));
        }
        Ok(chain)
    }

    async fn auth_event_ids_of(&self, id: &EventId) -> Result<Vec<OwnedEventId>, ServiceError> {
        Ok(self.event_record(id.as_str()).await?.map(|r| auth_ids_in(&r.json)).unwrap_or_default())
    }

    /// This server's users' live events after stream position `after`, up to the completed
    /// mark, at most `limit`; and the position read up to (to resume from).
    pub async fn owed_events_after(&self, after: u64, limit: usize) -> Result<(Vec<OwedEvent>, u64), ServiceError> {
        let completed = self.stream.completed().await?;
        if completed <= after {
            return Ok((Vec::new(), after));
        }
        let range = KeyRange::between(
            &keys::room_activity_from(keys::ACTIVITY_EVENTS, after + 1),
            &keys::room_activity_from(keys::ACTIVITY_EVENTS, completed + 1),
        );
        let rows = self.kv.scan(Table::RoomActivity, &range, Direction::Forward, limit).await?;
        let mut reached = if rows.len() < limit { completed } else { after };
        let mut owed = Vec::new();
        for (key, activity) in rows {
            let Some(room) = keys::room_activity_room(&key) else { continue };
            let position = u64::from_be_bytes(key[1..9].try_into().unwrap_or_default());
            reached = reached.max(position);
            if activity.as_slice() == [BY_REMOTE_SENDER] {
                continue;
            }
            let Some(event_id) = self.kv.get(Table::Timeline, &keys::timeline(room, position)).await? else { continue };
            let event_id = String::from_utf8_lossy(&event_id).into_owned();
            let Some(record) = self.event_record(&event_id).await? else { continue };
            let head: EventHead =
                serde_json::from_str(&record.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
            let sender_is_local =
                UserId::parse(&head.sender).is_ok_and(|sender| sender.server_name() == self.server_name());
            if !sender_is_local {
                continue;
            }
            let member = (head.kind == "m.room.member").then_some(head.state_key).flatten();
            let room_id = OwnedRoomId::try_from(room).map_err(|e| ServiceError::Internal(e.to_string()))?;
            owed.push(OwedEvent { position, room_id, pdu_json: record.json, member });
        }
        Ok((owed, reached))
    }

    /// The position of the newest event the stream has completed.
    pub async fn events_completed(&self) -> Result<u64, ServiceError> {
        Ok(self.stream.completed().await?)
    }

    /// A membership event template for a user of another server (`make_join`, `make_leave`,
    /// `make_knock`): built on the room's current state like a local event, and only handed out
    /// when it would pass this server's own auth checks against that state.
    pub async fn membership_template(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        user_id: &UserId,
        membership: &str,
    ) -> Result<CanonicalJsonObject, ServiceError> {
        let mut content = json!({ "membership": membership });
        if membership == "join"
            && let Some(authoriser) = self.restricted_join_authoriser(version, user_id, room_id).await?
        {
            content["join_authorised_via_users_server"] = json!(authoriser);
        }
        let event = LocalEvent {
            room_id: Some(room_id),
            sender: user_id,
            kind: "m.room.member",
            state_key: Some(user_id.as_str()),
            content,
        };
        // Signed here only to check it; the other server signs the real one.
        let probe = self.checked_local_event(version, event).await?;
        let mut template = probe.object().clone();
        // The other server names and signs the event; before v3 it also picks the event ID.
        for field in ["signatures", "hashes", "unsigned", "event_id", "origin"] {
            template.remove(field);
        }
        Ok(template)
    }

    /// A local event built on the room's current state, signed, and checked against that state
    /// by this server's auth rules, but not stored: for events another server must see first
    /// (a template it completes, an invite it countersigns).
    pub async fn checked_local_event(&self, version: &RoomVersion, event: LocalEvent<'_>) -> Result<Pdu, ServiceError> {
        let (sender, kind) = (event.sender.to_owned(), event.kind.to_owned());
        let room_id = event.room_id.ok_or_else(|| ServiceError::Internal("a checked event needs a room".into()))?;
        let room_id = room_id.to_owned();
        let built = self.build_local_event(version, event).await?;
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str()))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("unknown room {room_id}")))?;
        let current = StateRef::Current { group: room.value.current_state_group, room_id: room_id.to_string() };
        let mut loaded = Loaded::from([(built.id().to_owned(), std::sync::Arc::new(built.clone()))]);
        self.load_auth_events(version, &built, &room_id, Some(&room.value), &mut loaded).await?;
        match self.decide(version, &built, &current, None, &mut loaded).await? {
            Outcome::Accepted => Ok(built),
            Outcome::Rejected(reason) | Outcome::SoftFailed(reason) => {
                Err(ServiceError::Forbidden(format!("{sender} may not send {kind} in {room_id}: {reason}")))
            }
            Outcome::Outlier => Err(ServiceError::Internal("a local event cannot be an outlier".into())),
        }
    }

    /// The state another server is given to describe the room to its user
    /// (`invite_room_state`, `knock_room_state`): the create event (which the spec requires),
    /// join rules, name, avatar, topic, canonical alias, encryption, and the membership of
    /// `member` (the inviter, or the knocker's knock), as PDUs.
    pub async fn invite_room_state(&self, room_id: &RoomId, member: &UserId) -> Result<Vec<Value>, ServiceError> {
        let slots = [
            ("m.room.create", ""),
            ("m.room.join_rules", ""),
            ("m.room.name", ""),
            ("m.room.avatar", ""),
            ("m.room.topic", ""),
            ("m.room.canonical_alias", ""),
            ("m.room.encryption", ""),
            ("m.room.member", member.as_str()),
        ];
        let mut state = Vec::with_capacity(slots.len());
        for (kind, key) in slots {
            let Some(id) = self.current_state_id(room_id, kind, key).await? else { continue };
            let id = OwnedEventId::try_from(id).map_err(|e| ServiceError::Internal(e.to_string()))?;
            if let Some(json) = self.stored_pdu_json(&id).await? {
                state.push(serde_json::from_str(&json).map_err(|e| ServiceError::Internal(e.to_string()))?);
            }
        }
        Ok(state)
    }

    /// Signs an event this server's user completed from another server's template.
    pub fn sign_template(&self, version: &RoomVersion, mut object: CanonicalJsonObject) -> Result<Pdu, ServiceError> {
        for field in ["signatures", "hashes", "unsigned"] {
            object.remove(field);
        }
        lattice_core::pdu::hash_and_sign(&mut object, self.server_name().as_str(), &self.signing_key, version)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Pdu::new(object, version).map_err(|e| ServiceError::BadJson(e.to_string()))
    }

    /// Adds this server's signature to a PDU built elsewhere (a restricted join this server
    /// authorises, an invite of one of its users), leaving its hashes as they are.
    pub fn countersign(&self, version: &RoomVersion, object: &mut CanonicalJsonObject) -> Result<(), ServiceError> {
        let redacted = lattice_core::pdu::redacted(object.clone(), version)?;
        let mut signed = redacted;
        ruma::signatures::sign_json(self.server_name().as_str(), self.signing_key.as_ref(), &mut signed)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        if let Some(signatures) = signed.remove("signatures") {
            object.insert("signatures".into(), signatures);
        }
        Ok(())
    }

    /// Checks a PDU fetched from another server (a join's state, a missing event): format,
    /// signatures and hashes, as for pushed PDUs, without the origin check (whoever answers
    /// may relay other servers' events).
    pub fn check_fetched_pdu(
        &self,
        version: &RoomVersion,
        object: CanonicalJsonObject,
        keys: &ruma::signatures::PublicKeyMap,
    ) -> Result<Pdu, ServiceError> {
        super::ingest::check_fetched_object(version, object, keys)
    }

    /// Stores fetched events as outliers, each after its auth events. Events that cannot be
    /// placed (an auth event missing from the set and the store) are left out and named.
    pub async fn store_outliers(
        &self,
        version: &RoomVersion,
        room_id: &RoomId,
        events: Vec<Pdu>,
    ) -> Result<Vec<OwnedEventId>, ServiceError> {
        let mut pending: HashMap<OwnedEventId, Pdu> = HashMap::new();
        for event in events {
            if room_id_of(&event)? != room_id {
                return Err(ServiceError::BadJson(format!("event {} belongs to another room", event.id())));
            }
            pending.insert(event.id().to_owned(), event);
        }
        let mut stored: HashSet<OwnedEventId> = HashSet::new();
        let mut left_out: Vec<OwnedEventId> = Vec::new();
        // The create event first: from v12 every other event depends on it without citing it.
        let creates: Vec<OwnedEventId> = pending
            .values()
            .filter(|event| *event.kind() == ruma::events::TimelineEventType::RoomCreate)
            .map(|event| event.id().to_owned())
            .collect();
        for id in creates {
            if let Some(event) = pending.remove(&id) {
                match self.ingest_outlier(version, event).await {
                    Ok(_) => {
                        stored.insert(id);
                    }
                    Err(error) => {
                        tracing::info!(event_id = %id, %error, "a fetched create event could not be stored");
                        left_out.push(id);
                    }
                }
            }
        }
        loop {
            let ready: Vec<OwnedEventId> = pending
                .values()
                .filter(|event| {
                    event.auth_event_ids().iter().all(|id| !pending.contains_key(id) || stored.contains(id))
                })
                .map(|event| event.id().to_owned())
                .collect();
            if ready.is_empty() {
                break;
            }
            // Each wave (events whose auth events are stored) is written a chunk at a time.
            for chunk in ready.chunks(OUTLIERS_PER_WRITE) {
                let events: Vec<Pdu> = chunk.iter().filter_map(|id| pending.remove(id)).collect();
                match self.ingest_outliers(version, &room_id.to_owned(), events).await {
                    Ok(done) => stored.extend(done),
                    Err(error) => tracing::info!(%room_id, %error, "fetched events could not be stored"),
                }
                left_out.extend(chunk.iter().filter(|id| !stored.contains(*id)).cloned());
            }
        }
        left_out.extend(pending.into_keys());
        Ok(left_out)
    }
}

/// The event IDs a stored PDU names in `field` (`prev_events` or `auth_events`: plain IDs, or
/// `[id, hashes]` pairs before v3).
pub(crate) fn referenced_ids(json: &str, field: &str) -> Vec<OwnedEventId> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else { return Vec::new() };
    value[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().or_else(|| a[0].as_str()))
        .filter_map(|id| OwnedEventId::try_from(id).ok())
        .collect()
}

fn auth_ids_in(json: &str) -> Vec<OwnedEventId> {
    referenced_ids(json, "auth_events")
}
