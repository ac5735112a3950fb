//! The server-server API as this server answers it. Every PDU another server pushes goes
//! through `Rooms::receive_pdu`'s checks and the one ingest path; every read answers only a
//! server joined to the room, and only with events that server may see.

use std::collections::{BTreeMap, HashSet, VecDeque};

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_storage::WriteBatch;
use lattice_storage::records::EventRecord;
use ruma::{CanonicalJsonObject, EventId, OwnedEventId, OwnedServerName, RoomId, ServerName, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::signature_checks::{self, Prepared, SignatureChecks};
use super::{Federation, server_of};
use crate::ServiceError;
use crate::rooms::Outcome;

/// The spec's limits on one transaction.
pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;
/// Most events one `/backfill` or `/get_missing_events` answer holds.
const MAX_EVENTS_PER_READ: usize = 100;

/// The body of `PUT /send/{txnId}`.
#[derive(Deserialize)]
pub struct TransactionBody {
    #[serde(default)]
    pub pdus: Vec<Box<RawValue>>,
    #[serde(default)]
    pub edus: Vec<Box<RawValue>>,
}

/// Per-PDU results of a transaction: `{}` when accepted, `{"error": …}` when not.
pub type PduResults = BTreeMap<String, Value>;

fn transaction_key(origin: &ServerName, txn_id: &str) -> Vec<u8> {
    let mut key = origin.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(txn_id.as_bytes());
    key
}

#[derive(Deserialize)]
struct RoomOf {
    room_id: Option<String>,
}

impl Federation {
    /// `PUT /send/{txnId}`: each PDU through the ingest path, with its own result. A transaction
    /// already processed answers with its stored results and changes nothing.
    ///
    /// The PDUs' signatures are checked on all cores while they are ingested in order, each
    /// written without its own sync, and the stored results, written durably after them, make
    /// the whole transaction durable with one sync before it is answered
    /// ([`with_deferred_durability`](crate::rooms::with_deferred_durability)).
    pub async fn receive_transaction(
        &self,
        origin: &ServerName,
        txn_id: &str,
        body: TransactionBody,
    ) -> Result<PduResults, ServiceError> {
        if body.pdus.len() > MAX_PDUS || body.edus.len() > MAX_EDUS {
            return Err(ServiceError::BadJson(format!(
                "a transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs"
            )));
        }
        let key = transaction_key(origin, txn_id);
        if let Some(stored) = self.kv.get(lattice_storage::Table::FederationTransactions, &key).await? {
            return serde_json::from_slice(&stored).map_err(|e| ServiceError::Internal(e.to_string()));
        }
        let results = crate::rooms::with_deferred_durability(self.receive_contents(origin, &body)).await?;
        let mut batch = WriteBatch::new();
        let stored = serde_json::to_vec(&results).map_err(|e| ServiceError::Internal(e.to_string()))?;
        batch.put(lattice_storage::Table::FederationTransactions, key, stored);
        // A durable write (with `sync_writes`, the default) after every deferred one above.
        self.kv.write(batch).await?;
        Ok(results)
    }

    /// A transaction's PDUs, then its EDUs.
    async fn receive_contents(&self, origin: &ServerName, body: &TransactionBody) -> Result<PduResults, ServiceError> {
        let mut results = PduResults::new();
        let mut checks = SignatureChecks::new(origin);
        for raw in &body.pdus {
            match self.prepare(origin, raw.get().as_bytes()).await {
                (_, Ok(Some(pdu))) => checks.push(pdu),
                (_, Ok(None)) => {}
                (event_id, Err(reason)) => note_refused(&mut results, origin, event_id, reason),
            }
        }
        for answer in checks.finish() {
            for (event_id, version, checked) in signature_checks::checked(answer).await? {
                let outcome = match checked {
                    Ok(event) => self.receive_checked(origin, &version, event).await,
                    Err(reason) => Err(reason),
                };
                match outcome {
                    Ok(()) => {
                        results.insert(event_id, json!({}));
                    }
                    Err(reason) => note_refused(&mut results, origin, Some(event_id), reason),
                }
            }
        }
        for edu in &body.edus {
            if let Err(reason) = self.receive_edu(origin, edu.get()).await {
                tracing::debug!(%origin, %reason, "an EDU was dropped");
            }
        }
        Ok(results)
    }

    /// One pushed PDU up to its signature checks (format, event ID, the room's server ACL, the
    /// signing servers' keys): its event ID (when it can be computed), and the PDU ready for
    /// them, or nothing more to do (the end of a local user's invite to a room this server is
    /// not in, handled here), or why it is refused.
    async fn prepare(&self, origin: &ServerName, bytes: &[u8]) -> (Option<String>, Result<Option<Prepared>, String>) {
        let Ok(RoomOf { room_id: Some(room_id) }) = serde_json::from_slice::<RoomOf>(bytes) else {
            return (None, Err("no room_id".into()));
        };
        let Ok(room_id) = ruma::OwnedRoomId::try_from(room_id) else { return (None, Err("invalid room_id".into())) };
        // Only rooms this server is in: others' PDUs are dropped, as the spec allows.
        let Ok(version) = self.rooms.room_version(&room_id).await else {
            // Except the end of a local user's invite to such a room.
            return (None, self.receive_out_of_band(origin, bytes).await.map(|()| None));
        };
        let object = match lattice_core::pdu::parse(bytes, &version) {
            Ok(object) => object,
            Err(error) => return (None, Err(error.to_string())),
        };
        let Ok(event_id) = lattice_core::pdu::event_id(&object, &version).map(|id| id.to_string()) else {
            return (None, Err("no event ID can be computed".into()));
        };
        if let Err(error) = self.require_acl(origin, &room_id).await {
            return (Some(event_id), Err(error.to_string()));
        }
        match self.keys_for(&object, &version).await {
            Ok(keys) => (Some(event_id.clone()), Ok(Some(Prepared { event_id, version, object, keys }))),
            Err(error) => (Some(event_id), Err(error.to_string())),
        }
    }

    /// A PDU whose signatures were checked, through the ingest path (filling a gap before it
    /// when its prev events are unknown).
    async fn receive_checked(&self, origin: &ServerName, version: &RoomVersion, event: Pdu) -> Result<(), String> {
        let ingested = self.ingest_or_fill_gap(origin, version, &event).await;
        if let Err(error) = &ingested
            && let Err(keeping) = self.refetch_later(origin, version, &event, error).await
        {
            tracing::warn!(%origin, event_id = %event.id(), error = %keeping, "keeping a refused PDU for a retry failed");
        }
        match ingested.map_err(|e| e.to_string())?.outcome {
            Outcome::Accepted | Outcome::SoftFailed(_) | Outcome::Outlier => Ok(()),
            Outcome::Rejected(reason) => Err(reason),
        }
    }

    /// A checked PDU through the ingest path, filling the gap before it from `origin` when its
    /// prev events are unknown.
    pub(super) async fn ingest_or_fill_gap(
        &self,
        origin: &ServerName,
        version: &RoomVersion,
        event: &Pdu,
    ) -> Result<crate::rooms::Ingested, ServiceError> {
        match self.rooms.ingest(version, event.clone()).await {
            Err(ServiceError::MissingEvents(_)) => self.fill_gap_and_ingest(origin, version, event.clone()).await,
            other => other,
        }
    }

    /// One EDU: typing notices and read receipts of the origin's users in rooms they are joined
    /// to are applied as if they had sent them here; to-device messages go to `e2ee.rs`,
    /// device-list and signing-key updates to `device_lists.rs`, presence to `presence.rs`;
    /// anything else is dropped (the spec lets a server ignore EDUs it does not handle).
    async fn receive_edu(&self, origin: &ServerName, json: &str) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Edu {
            edu_type: String,
            #[serde(default)]
            content: Value,
        }
        let edu: Edu = serde_json::from_str(json).map_err(|e| e.to_string())?;
        match edu.edu_type.as_str() {
            "m.typing" => {
                let content = &edu.content;
                let (room_id, user_id) = edu_room_and_user(origin, &content["room_id"], &content["user_id"])?;
                self.require_acl(origin, &room_id).await.map_err(|e| e.to_string())?;
                let typing = content["typing"].as_bool().ok_or("m.typing without typing")?;
                let timeout = std::time::Duration::from_secs(30);
                self.rooms.set_typing(&user_id, &room_id, typing, timeout).await.map_err(|e| e.to_string())
            }
            "m.receipt" => {
                let rooms = edu.content.as_object().ok_or("m.receipt content is not an object")?;
                for (room_id, by_type) in rooms.iter().take(MAX_EDUS) {
                    let Some(readers) = by_type["m.read"].as_object() else { continue };
                    let Ok(room) = ruma::OwnedRoomId::try_from(room_id.as_str()) else { continue };
                    if self.require_acl(origin, &room).await.is_err() {
                        continue;
                    }
                    for (user_id, receipt) in readers.iter().take(MAX_EDUS) {
                        let (room_id, user_id) = edu_room_and_user(origin, &json!(room_id), &json!(user_id))?;
                        let Some(event_id) =
                            receipt["event_ids"].as_array().and_then(|ids| ids.first()).and_then(Value::as_str)
                        else {
                            continue;
                        };
                        let thread = receipt["data"]["thread_id"].as_str().map(str::to_owned);
                        if let Err(error) = self.rooms.set_receipt(&user_id, &room_id, "m.read", event_id, thread).await
                        {
                            tracing::debug!(%origin, %error, "a remote read receipt was not stored");
                        }
                    }
                }
                Ok(())
            }
            "m.direct_to_device" => self.receive_to_device(origin, edu.content).await,
            "m.device_list_update" => self.receive_device_list_update(origin, &edu.content).await,
            "m.signing_key_update" => self.receive_signing_key_update(origin, &edu.content).await,
            "m.presence" => self.receive_presence(origin, &edu.content).await,
            other => Err(format!("EDU type {other} is not handled")),
        }
    }

    /// `GET /make_join|make_leave|make_knock/{roomId}/{userId}`: a membership template for a
    /// user of `origin`, only when the membership would pass this server's auth checks now.
    pub async fn make_membership(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        user_id: &UserId,
        membership: &str,
        supported_versions: &[String],
    ) -> Result<Value, ServiceError> {
        require_own_user(origin, user_id)?;
        let version = self.rooms.room_version(room_id).await?;
        self.require_resident(room_id).await?;
        self.require_acl(origin, room_id).await?;
        let id = version.id().as_str();
        // The spec's default when the asking server names no versions is version 1 only.
        let supported = if supported_versions.is_empty() { vec!["1".to_owned()] } else { supported_versions.to_vec() };
        if membership != "leave" && !supported.iter().any(|v| v == id) {
            return Err(ServiceError::IncompatibleRoomVersion(id.to_owned()));
        }
        let template = self.rooms.membership_template(&version, room_id, user_id, membership).await?;
        Ok(json!({ "room_version": id, "event": template }))
    }

    /// `PUT /send_join/v2/{roomId}/{eventId}`: the joining server's signed join, through the
    /// ingest path; on acceptance, the state before it and the auth chain, and the join is
    /// passed on to the room's other servers.
    pub async fn send_join(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        bytes: &[u8],
    ) -> Result<Value, ServiceError> {
        let (version, mut object, event) = self.own_membership(origin, room_id, event_id, bytes, "join").await?;
        // A restricted join names a user of this server as its authoriser: this server's
        // signature is part of it, given only because the auth checks below must pass.
        let countersigned =
            event.authoriser.as_deref().and_then(server_of).is_some_and(|server| server == self.server_name());
        if countersigned {
            self.rooms.countersign(&version, &mut object)?;
        }
        self.ingest_membership(origin, room_id, &version, &object).await?;
        let state = self.rooms.state_before_event(event_id).await?;
        let state_ids: Vec<OwnedEventId> = state.values().cloned().collect();
        let mut chain_roots = state_ids.clone();
        chain_roots.push(event_id.to_owned());
        let auth_chain = self.rooms.auth_chain_of(&chain_roots).await?;
        let mut state_pdus = Vec::with_capacity(state_ids.len());
        for id in &state_ids {
            if let Some(json) = self.rooms.stored_pdu_json(id).await? {
                state_pdus.push(raw(&json)?);
            }
        }
        let auth_pdus: Vec<Box<RawValue>> = auth_chain.iter().map(|(_, json)| raw(json)).collect::<Result<_, _>>()?;
        let servers = self.rooms.joined_servers(room_id).await?;
        let mut answer = json!({
            "origin": self.server_name(),
            "state": state_pdus,
            "auth_chain": auth_pdus,
            "members_omitted": false,
            "servers_in_room": servers,
        });
        if countersigned {
            answer["event"] = serde_json::to_value(&object).map_err(|e| ServiceError::Internal(e.to_string()))?;
        }
        Ok(answer)
    }

    /// `PUT /send_leave/v2/{roomId}/{eventId}`: the leaving server's signed leave (after
    /// `make_leave`, e.g. refusing an invite), through the ingest path, then passed on to the
    /// room's other servers.
    pub async fn send_leave(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        bytes: &[u8],
    ) -> Result<Value, ServiceError> {
        let (version, object, _) = self.own_membership(origin, room_id, event_id, bytes, "leave").await?;
        self.ingest_membership(origin, room_id, &version, &object).await?;
        Ok(json!({}))
    }

    /// The checks `send_join` and `send_leave` share: a room this server is in, the event ID
    /// the path names, and a `membership` event of its sender, a user of `origin`, in this room.
    pub(super) async fn own_membership(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        bytes: &[u8],
        membership: &str,
    ) -> Result<(RoomVersion, CanonicalJsonObject, MembershipFields), ServiceError> {
        let version = self.rooms.room_version(room_id).await?;
        self.require_resident(room_id).await?;
        self.require_acl(origin, room_id).await?;
        let object = lattice_core::pdu::parse(bytes, &version)?;
        let computed = lattice_core::pdu::event_id(&object, &version)?;
        if computed != event_id {
            return Err(ServiceError::BadJson(format!("the event's ID is {computed}, not {event_id}")));
        }
        let event = membership_fields(&object)?;
        if event.room_id.as_deref() != Some(room_id.as_str())
            || event.kind != "m.room.member"
            || event.state_key.as_deref() != Some(event.sender.as_str())
            || event.membership != membership
        {
            return Err(ServiceError::BadJson(format!("not a {membership} of its sender in this room")));
        }
        require_own_user(origin, &UserId::parse(&event.sender).map_err(|e| ServiceError::BadJson(e.to_string()))?)?;
        Ok((version, object, event))
    }

    /// A membership event another server made for its user, checked like a pushed PDU and
    /// ingested; accepted, it is queued for the room's other servers.
    pub(super) async fn ingest_membership(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        version: &RoomVersion,
        object: &CanonicalJsonObject,
    ) -> Result<(), ServiceError> {
        let keys = self.keys_for(object, version).await?;
        let signed = serde_json::to_vec(object).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let pdu = self.rooms.check_remote_pdu(origin, version, &signed, &keys)?;
        match self.rooms.ingest(version, pdu).await?.outcome {
            Outcome::Accepted => {}
            Outcome::SoftFailed(reason) | Outcome::Rejected(reason) => {
                return Err(ServiceError::Forbidden(format!("the event was refused: {reason}")));
            }
            Outcome::Outlier => return Err(ServiceError::Internal("a live membership became an outlier".into())),
        }
        let servers = self.rooms.joined_servers(room_id).await?;
        let others: Vec<OwnedServerName> =
            servers.iter().filter(|s| *s != origin && *s != self.server_name()).cloned().collect();
        if let Err(error) = self.queue_now(&others, std::str::from_utf8(&signed).unwrap_or_default()).await {
            tracing::warn!(%error, "queueing another server's membership for the room's other servers failed");
        }
        Ok(())
    }

    /// `GET /event/{eventId}`.
    pub async fn event(&self, origin: &ServerName, event_id: &EventId) -> Result<Value, ServiceError> {
        let record = self
            .rooms
            .event_record_visible_to(origin, event_id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("unknown event {event_id}")))?;
        Ok(json!({ "origin": self.server_name(), "origin_server_ts": self.now_ms(), "pdus": [raw(&record.json)?] }))
    }

    /// `GET /state_ids/{roomId}?event_id=` (and `/state` when `full`): the state before the
    /// event and its auth chain.
    pub async fn state_at(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
        full: bool,
    ) -> Result<Value, ServiceError> {
        self.require_member_server(origin, room_id).await?;
        let record = self.rooms.event_in_room(room_id, event_id).await?;
        if !self.rooms.server_may_see(origin, &record).await? {
            return Err(ServiceError::Forbidden(format!("{origin} may not see {event_id}")));
        }
        let state = self.rooms.state_before_event(event_id).await?;
        let ids: Vec<OwnedEventId> = state.values().cloned().collect();
        let chain = self.rooms.auth_chain_of(&ids).await?;
        if !full {
            let chain_ids: Vec<&OwnedEventId> = chain.iter().map(|(id, _)| id).collect();
            return Ok(json!({ "pdu_ids": ids, "auth_chain_ids": chain_ids }));
        }
        let mut pdus = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(json) = self.rooms.stored_pdu_json(id).await? {
                pdus.push(raw(&json)?);
            }
        }
        let auth: Vec<Box<RawValue>> = chain.iter().map(|(_, json)| raw(json)).collect::<Result<_, _>>()?;
        Ok(json!({ "pdus": pdus, "auth_chain": auth }))
    }

    /// `GET /event_auth/{roomId}/{eventId}`.
    pub async fn event_auth(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        event_id: &EventId,
    ) -> Result<Value, ServiceError> {
        self.require_member_server(origin, room_id).await?;
        let record = self.rooms.event_in_room(room_id, event_id).await?;
        if !self.rooms.server_may_see(origin, &record).await? {
            return Err(ServiceError::Forbidden(format!("{origin} may not see {event_id}")));
        }
        let chain = self.rooms.auth_chain_of(&[event_id.to_owned()]).await?;
        let auth: Vec<Box<RawValue>> = chain.iter().map(|(_, json)| raw(json)).collect::<Result<_, _>>()?;
        Ok(json!({ "auth_chain": auth }))
    }

    /// `POST /get_missing_events/{roomId}`: walking back from `latest` over prev events, the
    /// events not at or before `earliest`, at most `limit`, oldest first.
    pub async fn missing_events(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        earliest: &[OwnedEventId],
        latest: &[OwnedEventId],
        limit: usize,
        min_depth: u64,
    ) -> Result<Value, ServiceError> {
        self.require_member_server(origin, room_id).await?;
        let stop: HashSet<&OwnedEventId> = earliest.iter().collect();
        let walked =
            self.walk_back(origin, room_id, latest, limit.min(MAX_EVENTS_PER_READ), &stop, min_depth, false).await?;
        Ok(json!({ "events": walked }))
    }

    /// `GET /backfill/{roomId}?v=…&limit=`: the events from `from` back, newest first.
    pub async fn backfill(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
    ) -> Result<Value, ServiceError> {
        self.require_member_server(origin, room_id).await?;
        let walked =
            self.walk_back(origin, room_id, from, limit.min(MAX_EVENTS_PER_READ), &HashSet::new(), 0, true).await?;
        Ok(json!({ "origin": self.server_name(), "origin_server_ts": self.now_ms(), "pdus": walked }))
    }

    /// Breadth-first over prev events from `from` (included when `include_start`), skipping
    /// events the asking server may not see, not entering `stop` or events below `min_depth`.
    #[allow(clippy::too_many_arguments)]
    async fn walk_back(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        from: &[OwnedEventId],
        limit: usize,
        stop: &HashSet<&OwnedEventId>,
        min_depth: u64,
        include_start: bool,
    ) -> Result<Vec<Box<RawValue>>, ServiceError> {
        let mut queue: VecDeque<OwnedEventId> = VecDeque::new();
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut found: Vec<(u64, Box<RawValue>)> = Vec::new();
        for id in from {
            if include_start {
                queue.push_back(id.clone());
            } else {
                seen.insert(id.clone());
                if let Ok(record) = self.rooms.event_in_room(room_id, id).await {
                    queue.extend(prev_ids(&record.json));
                }
            }
        }
        while let Some(id) = queue.pop_front() {
            if found.len() >= limit {
                break;
            }
            if stop.contains(&id) || !seen.insert(id.clone()) {
                continue;
            }
            let Ok(record) = self.rooms.event_in_room(room_id, &id).await else { continue };
            let depth = depth_of(&record.json);
            if depth < min_depth {
                continue;
            }
            for prev in prev_ids(&record.json) {
                if !seen.contains(&prev) {
                    queue.push_back(prev);
                }
            }
            if self.rooms.server_may_see(origin, &record).await? {
                found.push((depth, raw(&record.json)?));
            }
        }
        if !include_start {
            found.sort_by_key(|(depth, _)| *depth);
        }
        Ok(found.into_iter().map(|(_, pdu)| pdu).collect())
    }

    /// `GET /timestamp_to_event/{roomId}?ts=&dir=`: the event nearest `ts` that the asking
    /// server may see.
    pub async fn timestamp_to_event(
        &self,
        origin: &ServerName,
        room_id: &RoomId,
        ts: u64,
        forward: bool,
    ) -> Result<Value, ServiceError> {
        self.require_member_server(origin, room_id).await?;
        let found = self.rooms.timestamp_to_event_for_server(origin, room_id, ts, forward).await?;
        Ok(json!({ "event_id": found.event_id, "origin_server_ts": found.origin_server_ts }))
    }

    /// `GET /query/directory?room_alias=`: a local alias's room and the servers in it.
    pub async fn query_directory(&self, alias: &ruma::RoomAliasId) -> Result<Value, ServiceError> {
        if alias.server_name() != self.server_name() {
            return Err(ServiceError::NotFound(format!("{alias} is not an alias of this server")));
        }
        let room_id = self.rooms.resolve_alias(alias).await?;
        let mut servers: Vec<OwnedServerName> = self.rooms.joined_servers(&room_id).await?.into_iter().collect();
        // This server first: it certainly knows the room.
        servers.sort_by_key(|s| s != self.server_name());
        Ok(json!({ "room_id": room_id, "servers": servers }))
    }

    /// The room's server ACL (`m.room.server_acl`) must let `origin` in: the spec's `403
    /// M_FORBIDDEN` for every room-scoped request of a denied server.
    pub(super) async fn require_acl(&self, origin: &ServerName, room_id: &RoomId) -> Result<(), ServiceError> {
        if !self.rooms.server_allowed_by_acl(origin, room_id).await? {
            return Err(ServiceError::Forbidden(format!("{origin} is denied by the server ACL of {room_id}")));
        }
        Ok(())
    }

    /// Only a server with a member in the room can help others into it.
    async fn require_resident(&self, room_id: &RoomId) -> Result<(), ServiceError> {
        if !self.rooms.server_in_room(self.server_name(), room_id).await? {
            return Err(ServiceError::NotFound(format!("this server has no member in {room_id}")));
        }
        Ok(())
    }

    async fn require_member_server(&self, origin: &ServerName, room_id: &RoomId) -> Result<(), ServiceError> {
        self.rooms.room_version(room_id).await?;
        self.require_acl(origin, room_id).await?;
        if !self.rooms.server_in_room(origin, room_id).await? {
            return Err(ServiceError::Forbidden(format!("{origin} is not in {room_id}")));
        }
        Ok(())
    }
}

impl crate::rooms::Rooms {
    /// A stored event, when `server` is in its room and may see it.
    pub async fn event_record_visible_to(
        &self,
        server: &ServerName,
        event_id: &EventId,
    ) -> Result<Option<EventRecord>, ServiceError> {
        let Some(record) = self.event_record(event_id.as_str()).await? else { return Ok(None) };
        let Ok(room_id) = ruma::OwnedRoomId::try_from(record.room_id.as_str()) else { return Ok(None) };
        let Ok(record) = self.event_in_room(&room_id, event_id).await else { return Ok(None) };
        if !self.server_in_room(server, &room_id).await? || !self.server_may_see(server, &record).await? {
            return Ok(None);
        }
        Ok(Some(record))
    }
}

pub(super) struct MembershipFields {
    room_id: Option<String>,
    kind: String,
    sender: String,
    state_key: Option<String>,
    membership: String,
    authoriser: Option<String>,
}

impl MembershipFields {
    pub(super) fn sender(&self) -> &str {
        &self.sender
    }
}

fn membership_fields(object: &CanonicalJsonObject) -> Result<MembershipFields, ServiceError> {
    let value = serde_json::to_value(object).map_err(|e| ServiceError::Internal(e.to_string()))?;
    let text = |v: &Value| v.as_str().map(str::to_owned);
    Ok(MembershipFields {
        room_id: text(&value["room_id"]),
        kind: text(&value["type"]).unwrap_or_default(),
        sender: text(&value["sender"]).ok_or_else(|| ServiceError::BadJson("no sender".into()))?,
        state_key: text(&value["state_key"]),
        membership: text(&value["content"]["membership"]).unwrap_or_default(),
        authoriser: text(&value["content"]["join_authorised_via_users_server"]),
    })
}

/// The room and user an EDU names, when the user is one of the origin's (a server speaks for
/// its own users only).
fn edu_room_and_user(
    origin: &ServerName,
    room: &Value,
    user: &Value,
) -> Result<(ruma::OwnedRoomId, ruma::OwnedUserId), String> {
    let room_id = room.as_str().and_then(|r| ruma::OwnedRoomId::try_from(r).ok()).ok_or("invalid room_id")?;
    let user_id = user.as_str().and_then(|u| ruma::OwnedUserId::try_from(u).ok()).ok_or("invalid user_id")?;
    if user_id.server_name() != origin {
        return Err(format!("{origin} cannot speak for {user_id}"));
    }
    Ok((room_id, user_id))
}

fn require_own_user(origin: &ServerName, user_id: &UserId) -> Result<(), ServiceError> {
    if user_id.server_name() != origin {
        return Err(ServiceError::Forbidden(format!("{origin} cannot act for {user_id}")));
    }
    Ok(())
}

fn raw(json: &str) -> Result<Box<RawValue>, ServiceError> {
    RawValue::from_string(json.to_owned()).map_err(|e| ServiceError::Internal(e.to_string()))
}

fn prev_ids(json: &str) -> Vec<OwnedEventId> {
    crate::rooms::referenced_ids(json, "prev_events")
}

fn depth_of(json: &str) -> u64 {
    serde_json::from_str::<Value>(json).ok().and_then(|v| v["depth"].as_u64()).unwrap_or(0)
}

/// Records a PDU's refusal in the transaction's results (when its event ID is known) and logs it.
fn note_refused(results: &mut PduResults, origin: &ServerName, event_id: Option<String>, reason: String) {
    tracing::info!(%origin, event_id = event_id.as_deref().unwrap_or("?"), %reason, "a pushed PDU was not accepted");
    if let Some(event_id) = event_id {
        results.insert(event_id, json!({ "error": reason }));
    }
}
