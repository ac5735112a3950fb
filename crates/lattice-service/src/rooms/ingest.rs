//! The ingest path: every event, local or remote, is checked and stored here, in one batch.
//!
//! The caller has parsed the PDU, checked its signatures and content hash (`lattice_core::pdu`)
//! and typed it (`Pdu::new`). Here: auth against its auth events, auth against the state before
//! it, soft-fail against the current state, then one atomic write of the event, its state, the
//! timeline position, forward extremities, current state and the membership index.

use std::collections::{HashMap, HashSet};

use lattice_core::auth;
use lattice_core::event::Pdu;
use lattice_core::power::RoomPower;
use lattice_core::room_version::RoomVersion;
use lattice_core::state_resolution::{self, StateMap};
use lattice_storage::records::{AuthChainRecord, EventRecord, EventStatus, MemberCounts, RoomRecord};
use lattice_storage::{Fetched, StorageError, Table, WriteBatch, keys};
use ruma::events::{StateEventType, TimelineEventType};
use ruma::state_res::Event;
use ruma::{CanonicalJsonObject, EventId, OwnedEventId, OwnedRoomId};

use super::state_store::{self, Base};
use crate::{Service, ServiceError};

/// What ingest decided about an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    SoftFailed(String),
    Rejected(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingested {
    pub event_id: OwnedEventId,
    pub outcome: Outcome,
    /// The stream position of an accepted event.
    pub stream_position: Option<u64>,
}

/// How often ingest recomputes when a concurrent write to the same room wins the race.
const ROOM_WRITE_RETRIES: usize = 8;

/// Most forward extremities read per room; more means the room needs merging, not more reads.
const MAX_FORWARD_EXTREMITIES: usize = 1_000;

/// Events loaded for one ingest, by ID.
type Loaded = HashMap<OwnedEventId, Pdu>;

/// Memberships that changed in the current state: (before, after), absent as `None`.
type MemberChanges = Vec<(Option<String>, Option<String>)>;

/// The room's member counts after `changes`: a new room starts from zero; a room stored before
/// counts existed (`Some(None)`) stays uncounted.
fn updated_counts(stored: Option<Option<MemberCounts>>, changes: &MemberChanges) -> Option<MemberCounts> {
    let start = match stored {
        None => MemberCounts::default(),
        Some(counts) => counts?,
    };
    Some(changes.iter().fold(start, |counts, (old, new)| counts.moved(old.as_deref(), new.as_deref())))
}

impl Service {
    /// Receives a PDU as bytes from another server: format, canonical JSON, signatures (against
    /// `keys`, the origin servers' verified public keys) and content hash, then [`Service::ingest`].
    /// A PDU failing those first checks is refused with the rule it broke and stores nothing;
    /// one whose content hash is wrong is kept only in its redacted form.
    pub async fn receive_pdu(
        &self,
        version: &RoomVersion,
        bytes: &[u8],
        keys: &ruma::signatures::PublicKeyMap,
    ) -> Result<Ingested, ServiceError> {
        let object = lattice_core::pdu::parse(bytes, version)?;
        let object = match lattice_core::pdu::check_signatures_and_hashes(object, version, keys)? {
            lattice_core::pdu::Checked::Intact(object) | lattice_core::pdu::Checked::Redacted(object) => object,
        };
        let event = Pdu::new(object, version)?;
        // The same check as for local events: types and state keys become parts of storage keys.
        super::local_events::check_type_and_state_key(&event.kind().to_string(), event.state_key())?;
        self.ingest(version, event).await
    }

    /// Checks `event` and stores it with everything it changes, atomically. Idempotent: an event
    /// already stored answers with its earlier outcome.
    pub async fn ingest(&self, version: &RoomVersion, event: Pdu) -> Result<Ingested, ServiceError> {
        self.ingest_with(version, event, &WriteBatch::new()).await
    }

    /// [`Service::ingest`], adding `extra` (writes and their conditions) to the event's batch when
    /// the event is accepted — e.g. the transaction ID of a client send, so that it and the event
    /// are stored together or not at all.
    pub(crate) async fn ingest_with(
        &self,
        version: &RoomVersion,
        event: Pdu,
        extra: &WriteBatch,
    ) -> Result<Ingested, ServiceError> {
        let room_id = room_id_of(&event)?;
        let _room = self.room_lock(room_id.as_str()).lock().await;
        self.ingest_unlocked(version, event, extra).await
    }

    /// The ingest retry loop, for callers already holding the room's lock.
    pub(crate) async fn ingest_unlocked(
        &self,
        version: &RoomVersion,
        event: Pdu,
        extra: &WriteBatch,
    ) -> Result<Ingested, ServiceError> {
        for _ in 0..ROOM_WRITE_RETRIES {
            match self.try_ingest(version, &event, extra).await {
                Err(ServiceError::Storage(StorageError::Conflict)) => continue,
                other => return other,
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent writes to this room".into()))
    }

    async fn try_ingest(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        extra: &WriteBatch,
    ) -> Result<Ingested, ServiceError> {
        if let Some(existing) =
            lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event.id().as_str())).await?
        {
            return Ok(already_stored(event.id(), existing.value));
        }
        let room_id = room_id_of(event)?;
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        check_room_fits(event, &room_id, room.as_ref().map(|r| &r.value), version)?;

        // The event itself takes part in resolving the new current state.
        let mut loaded = Loaded::from([(event.id().to_owned(), event.clone())]);
        let mut needed: Vec<OwnedEventId> =
            event.prev_event_ids().iter().chain(event.auth_event_ids()).cloned().collect();
        // From v12 the create event is an auth event without being cited.
        if version.rules().authorization.room_create_event_id_as_room_id
            && let Some(room) = &room
        {
            needed.push(
                OwnedEventId::try_from(room.value.create_event_id.as_str())
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
            );
        }
        self.load_events(version, &needed, &mut loaded).await?;
        let (before_group, state_before) = self.state_before(version, event, &mut loaded).await?;

        let current = match &room {
            Some(room) => Some((
                room.value.current_state_group,
                state_store::load(self.kv.as_ref(), room.value.current_state_group).await?,
            )),
            None => None,
        };
        let current_state = current.as_ref().map(|(_, state)| state);
        let outcome = self.decide(version, event, &state_before, current_state, &mut loaded).await?;

        let mut batch = WriteBatch::new();
        let room_key = keys::room(room_id.as_str());
        batch.expect(Table::Rooms, room_key.clone(), room.as_ref().map(|r| r.raw.clone()));

        let before = before_group.map(|group| Base { group, state: &state_before });
        let before_group = state_store::save(self.kv.as_ref(), &mut batch, before, &state_before).await?;
        let mut state_after = state_before.clone();
        if !matches!(outcome, Outcome::Rejected(_))
            && let Some(key) = event.state_key()
        {
            state_after.insert((event.kind().to_string().into(), key.to_owned()), event.id().to_owned());
        }
        let after_group = state_store::save(
            self.kv.as_ref(),
            &mut batch,
            Some(Base { group: before_group, state: &state_before }),
            &state_after,
        )
        .await?;

        let _stream = match outcome {
            Outcome::Accepted => Some(self.lock_stream().await),
            _ => None,
        };
        let stream_position = match outcome {
            // Taken inside the event's own batch: no gaps, and no second write per event.
            Outcome::Accepted => Some(lattice_storage::counter_in_batch(self.kv.as_ref(), &mut batch, "stream").await?),
            _ => None,
        };
        let record = EventRecord {
            room_id: room_id.to_string(),
            json: serde_json::to_string(event.object()).map_err(|e| ServiceError::Internal(e.to_string()))?,
            status: match &outcome {
                Outcome::Accepted => EventStatus::Accepted,
                Outcome::SoftFailed(reason) => EventStatus::SoftFailed { reason: reason.clone() },
                Outcome::Rejected(reason) => EventStatus::Rejected { reason: reason.clone() },
            },
            stream_position,
            order: stream_position,
            state_group: if matches!(outcome, Outcome::Rejected(_)) { before_group } else { after_group },
            redacted_by: None,
        };
        let mut record = record;
        let redacted_on_arrival = match self.redact_if_pending(version, event, &mut loaded, &mut batch).await? {
            Some((json, redaction_id)) => {
                record.json = json;
                record.redacted_by = Some(redaction_id);
                true
            }
            None => false,
        };
        if let Some(position) = stream_position
            && !redacted_on_arrival
        {
            self.index_relation(&room_id, event, position, &mut batch).await?;
        }
        lattice_storage::put(&mut batch, keys::event(event.id().as_str()), &record);
        if !matches!(outcome, Outcome::Rejected(_)) && event.state_key().is_some() {
            let chain = self.auth_chain_through(version, event.auth_event_ids(), &mut loaded).await?;
            let mut chain: Vec<String> = chain.into_iter().map(|id| id.to_string()).collect();
            chain.sort();
            lattice_storage::put(&mut batch, keys::event(event.id().as_str()), &AuthChainRecord(chain));
        }
        if outcome == Outcome::Accepted && *event.kind() == TimelineEventType::RoomRedaction {
            self.apply_redaction(version, event, &state_before, &mut loaded, &mut batch).await?;
        }

        let new_room = match stream_position {
            Some(position) => {
                batch.put(
                    Table::Timeline,
                    keys::timeline(room_id.as_str(), position),
                    event.id().as_str().as_bytes().to_vec(),
                );
                super::timestamps::index_event(&mut batch, &room_id, event, position);
                super::topological::index_topological(&mut batch, &room_id, event, position);
                let old_extremities = room.as_ref().map(|r| r.value.forward_extremities.clone()).unwrap_or_default();
                let (current_group, forward_extremities, member_changes) = self
                    .advance_current_state(
                        version,
                        &room_id,
                        event,
                        (after_group, &state_after),
                        current,
                        &old_extremities,
                        &mut loaded,
                        &mut batch,
                    )
                    .await?;
                Some(RoomRecord {
                    room_version: version.id().to_string(),
                    create_event_id: room
                        .as_ref()
                        .map(|r| r.value.create_event_id.clone())
                        .unwrap_or_else(|| event.id().to_string()),
                    current_state_group: current_group,
                    forward_extremities,
                    last_stream_position: position,
                    member_counts: updated_counts(room.as_ref().map(|r| r.value.member_counts), &member_changes),
                })
            }
            None => None,
        };
        if let Some(new_room) = new_room {
            lattice_storage::put(&mut batch, room_key, &new_room);
        }
        if outcome == Outcome::Accepted {
            batch.ops.extend(extra.ops.iter().cloned());
            batch.conditions.extend(extra.conditions.iter().cloned());
        }
        self.kv.write(batch).await?;
        if stream_position.is_some() {
            // Wake the /sync requests of the room's members, and of the user whose membership
            // this is (who may not be a member yet).
            self.notifier.notify_room(&room_id);
            if *event.kind() == TimelineEventType::RoomMember
                && let Some(target) = event.state_key().and_then(|key| ruma::UserId::parse(key).ok())
            {
                self.notifier.notify_user(&target);
            }
        }
        Ok(Ingested { event_id: event.id().to_owned(), outcome, stream_position })
    }

    /// The three auth checks (spec "checks performed on receipt", steps 4–6): against the
    /// event's auth events, against the state before it (both → `Rejected`), and against the
    /// room's current state (→ `SoftFailed`). Only the state slots the rules look at are loaded.
    async fn decide(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        state_before: &StateMap,
        current_state: Option<&StateMap>,
        loaded: &mut Loaded,
    ) -> Result<Outcome, ServiceError> {
        if let Err(e) = auth::check_against_auth_events(event, version, |id: &EventId| loaded.get(id)) {
            return Ok(Outcome::Rejected(e.to_string()));
        }
        let auth_slots = ruma::state_res::auth_types_for_event(
            event.kind(),
            event.sender(),
            event.state_key(),
            event.content(),
            &version.rules().authorization,
        )
        .unwrap_or_default();
        let slots_of = |state: &StateMap| -> Vec<OwnedEventId> {
            auth_slots.iter().filter_map(|slot| state.get(slot).cloned()).collect()
        };
        self.load_events(version, &slots_of(state_before), loaded).await?;
        let lookup = |kind: &StateEventType, key: &str| {
            state_before.get(&(kind.clone(), key.to_owned())).and_then(|id| loaded.get(id))
        };
        if let Err(e) = auth::check_against_state(event, version, lookup) {
            return Ok(Outcome::Rejected(e.to_string()));
        }
        let Some(current_state) = current_state else { return Ok(Outcome::Accepted) };
        self.load_events(version, &slots_of(current_state), loaded).await?;
        let lookup = |kind: &StateEventType, key: &str| {
            current_state.get(&(kind.clone(), key.to_owned())).and_then(|id| loaded.get(id))
        };
        if let Err(e) = auth::check_against_state(event, version, lookup) {
            return Ok(Outcome::SoftFailed(e.to_string()));
        }
        Ok(Outcome::Accepted)
    }

    /// The state before `event`: nothing for the create event; the state after its one
    /// `prev_event`; or the resolution of the states after each of them.
    async fn state_before(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        loaded: &mut Loaded,
    ) -> Result<(Option<u64>, StateMap), ServiceError> {
        let mut groups = Vec::new();
        for prev in event.prev_event_ids() {
            let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(prev.as_str()))
                .await?
                .ok_or_else(|| ServiceError::MissingEvents(prev.to_string()))?;
            let group = match record.value.status {
                EventStatus::Rejected { .. } => {
                    return Err(ServiceError::BadJson(format!("prev event {prev} was rejected")));
                }
                _ => record.value.state_group,
            };
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        match groups.as_slice() {
            [] => Ok((None, StateMap::new())),
            [group] => Ok((Some(*group), state_store::load(self.kv.as_ref(), *group).await?)),
            _ => {
                let mut states = Vec::with_capacity(groups.len());
                for group in &groups {
                    states.push(state_store::load(self.kv.as_ref(), *group).await?);
                }
                Ok((None, self.resolve(version, &states, loaded).await?))
            }
        }
    }

    /// Resolves `states`, first loading every event state resolution may look at.
    async fn resolve(
        &self,
        version: &RoomVersion,
        states: &[StateMap],
        loaded: &mut Loaded,
    ) -> Result<StateMap, ServiceError> {
        let mut auth_chains = Vec::with_capacity(states.len());
        for state in states {
            let mut chain = HashSet::new();
            for id in state.values() {
                chain.extend(self.stored_auth_chain(version, id, loaded).await?);
            }
            auth_chains.push(chain);
        }
        let needed: Vec<OwnedEventId> =
            states.iter().flat_map(|s| s.values().cloned()).chain(auth_chains.iter().flatten().cloned()).collect();
        self.load_events(version, &needed, loaded).await?;
        state_resolution::resolve_with_auth_chains(version, states, auth_chains, |id| loaded.get(id))
            .map_err(|e| ServiceError::Internal(e.to_string()))
    }

    /// Moves the forward extremities past `event` and sets the current state to the resolution
    /// of the states at the extremities; returns the current state's group and the extremities.
    #[allow(clippy::too_many_arguments)]
    async fn advance_current_state(
        &self,
        version: &RoomVersion,
        room_id: &OwnedRoomId,
        event: &Pdu,
        (after_group, state_after): (u64, &StateMap),
        current: Option<(u64, StateMap)>,
        old_extremities: &[String],
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<(u64, Vec<String>, MemberChanges), ServiceError> {
        let prevs: HashSet<&str> = event.prev_event_ids().iter().map(|id| id.as_str()).collect();
        let remaining: Vec<String> =
            old_extremities.iter().filter(|id| !prevs.contains(id.as_str())).cloned().collect();
        if remaining.len() >= MAX_FORWARD_EXTREMITIES {
            return Err(ServiceError::LimitExceeded(format!("room {room_id} has too many forward extremities")));
        }
        let mut extremities = remaining.clone();
        extremities.push(event.id().to_string());

        let (current_group, current_state) = if remaining.is_empty() {
            (after_group, state_after.clone())
        } else {
            let mut states = vec![state_after.clone()];
            for id in &remaining {
                let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(id))
                    .await?
                    .ok_or_else(|| ServiceError::Internal(format!("forward extremity {id} is not stored")))?;
                states.push(state_store::load(self.kv.as_ref(), record.value.state_group).await?);
            }
            let resolved = self.resolve(version, &states, loaded).await?;
            let base = Some(Base { group: after_group, state: state_after });
            (state_store::save(self.kv.as_ref(), batch, base, &resolved).await?, resolved)
        };
        let old_state = current.map(|(_, state)| state).unwrap_or_default();
        let member_counts =
            self.write_current_state(version, room_id, &old_state, &current_state, loaded, batch).await?;
        Ok((current_group, extremities, member_counts))
    }

    /// Writes the difference between two current states, and the membership index with it.
    async fn write_current_state(
        &self,
        version: &RoomVersion,
        room_id: &OwnedRoomId,
        old: &StateMap,
        new: &StateMap,
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<MemberChanges, ServiceError> {
        let mut changes = MemberChanges::new();
        for ((kind, key), id) in new {
            let old_id = old.get(&(kind.clone(), key.clone()));
            if old_id == Some(id) {
                continue;
            }
            let kind_str = kind.to_string();
            batch.put(
                Table::CurrentState,
                keys::current_state(room_id.as_str(), &kind_str, key),
                id.as_str().as_bytes().to_vec(),
            );
            if *kind == StateEventType::RoomMember {
                self.load_events(version, std::slice::from_ref(id), loaded).await?;
                let membership = loaded.get(id).map(membership_of).unwrap_or_default();
                let before = self.membership_in(version, old_id, loaded).await?;
                changes.push((before, Some(membership.clone())));
                batch.put(Table::Memberships, keys::membership(key, room_id.as_str()), membership.into_bytes());
            }
        }
        for ((kind, key), old_id) in old.iter().filter(|(slot, _)| !new.contains_key(*slot)) {
            batch.delete(Table::CurrentState, keys::current_state(room_id.as_str(), &kind.to_string(), key));
            if *kind == StateEventType::RoomMember {
                changes.push((self.membership_in(version, Some(old_id), loaded).await?, None));
                batch.delete(Table::Memberships, keys::membership(key, room_id.as_str()));
            }
        }
        Ok(changes)
    }

    /// The membership a member event sets, when there is one.
    async fn membership_in(
        &self,
        version: &RoomVersion,
        event_id: Option<&OwnedEventId>,
        loaded: &mut Loaded,
    ) -> Result<Option<String>, ServiceError> {
        let Some(id) = event_id else { return Ok(None) };
        self.load_events(version, std::slice::from_ref(id), loaded).await?;
        Ok(loaded.get(id).map(membership_of))
    }

    /// Replaces the stored JSON of the event an accepted redaction names with its redacted form,
    /// when the spec lets the redaction take effect: the redacting user has the `redact` power
    /// level, or is on the same server as the original sender. A target not stored yet is left
    /// alone (applying redactions to events that arrive later comes with backfill).
    async fn apply_redaction(
        &self,
        version: &RoomVersion,
        redaction: &Pdu,
        state_before: &StateMap,
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<(), ServiceError> {
        let Some(target_id) = redaction.redacts() else { return Ok(()) };
        let Some(target) =
            lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(target_id.as_str())).await?
        else {
            // Applied when the target arrives.
            let key = keys::pending_redaction(target_id.as_str(), redaction.id().as_str());
            batch.put(Table::PendingRedactions, key, Vec::new());
            return Ok(());
        };
        if target.value.room_id != room_id_of(redaction)?.as_str() {
            return Ok(());
        }
        self.load_events(version, std::slice::from_ref(target_id), loaded).await?;
        let Some(target_event) = loaded.get(target_id).cloned() else { return Ok(()) };
        if !self.redaction_takes_effect(version, redaction, &target_event, state_before, loaded).await? {
            return Ok(());
        }
        self.unindex_relation(&room_id_of(redaction)?, &target_event, target.value.history_order(), batch).await?;
        let json = redacted_json(target_event.object(), version)?;
        self.keep_redacted_original(batch, target_id, redaction.id(), &target.value.json, &json);
        batch.expect(Table::Events, keys::event(target_id.as_str()), Some(target.raw));
        lattice_storage::put(
            batch,
            keys::event(target_id.as_str()),
            &EventRecord { json, redacted_by: Some(redaction.id().to_string()), ..target.value },
        );
        Ok(())
    }

    /// Whether `redaction` may redact `target`: the spec lets it when the redacting user has the
    /// `redact` power level in the state before the redaction, or is on the target sender's server
    /// (the server rule; this server's own clients are held to the stricter user rule before
    /// their redaction is built, in `check_client_redaction`).
    async fn redaction_takes_effect(
        &self,
        version: &RoomVersion,
        redaction: &Pdu,
        target: &Pdu,
        state_before_redaction: &StateMap,
        loaded: &mut Loaded,
    ) -> Result<bool, ServiceError> {
        if target.sender().server_name() == redaction.sender().server_name() {
            return Ok(true);
        }
        let slot = |kind: StateEventType| state_before_redaction.get(&(kind, String::new())).cloned();
        let Some(create_id) = slot(StateEventType::RoomCreate) else { return Ok(false) };
        let power_id = slot(StateEventType::RoomPowerLevels);
        let ids: Vec<OwnedEventId> = std::iter::once(create_id.clone()).chain(power_id.clone()).collect();
        self.load_events(version, &ids, loaded).await?;
        let Some(create) = loaded.get(&create_id) else { return Ok(false) };
        // Levels the auth rules could not read grant nothing.
        let power_levels = power_id.as_ref().and_then(|id| loaded.get(id));
        Ok(RoomPower::new(version, create, power_levels)
            .and_then(|power| power.may_redact(redaction.sender()))
            .unwrap_or(false))
    }

    /// For an event arriving after redactions of it were accepted: its redacted JSON and the
    /// redaction's ID when one of them takes effect. The pending rows are removed in `batch`
    /// either way.
    async fn redact_if_pending(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<Option<(String, String)>, ServiceError> {
        const MAX_PENDING: usize = 100;
        let prefix = keys::pending_redactions_of(event.id().as_str());
        let rows = self
            .kv
            .scan(
                Table::PendingRedactions,
                &lattice_storage::KeyRange::prefix(&prefix),
                lattice_storage::Direction::Forward,
                MAX_PENDING,
            )
            .await?;
        let mut effective: Option<OwnedEventId> = None;
        for (key, _) in rows {
            let redaction_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            batch.delete(Table::PendingRedactions, key);
            let Some(record) =
                lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&redaction_id)).await?
            else {
                continue;
            };
            if effective.is_some()
                || !matches!(record.value.status, EventStatus::Accepted)
                || record.value.room_id != room_id_of(event)?.as_str()
            {
                continue;
            }
            let redaction_id =
                OwnedEventId::try_from(redaction_id).map_err(|e| ServiceError::Internal(e.to_string()))?;
            let redaction = stored_pdu(version, &redaction_id, record.clone())?;
            // The state after a redaction (a message event) is the state before it.
            let state = state_store::load(self.kv.as_ref(), record.value.state_group).await?;
            if self.redaction_takes_effect(version, &redaction, event, &state, loaded).await? {
                effective = Some(redaction_id);
            }
        }
        let Some(redaction_id) = effective else { return Ok(None) };
        let json = redacted_json(event.object(), version)?;
        let original = serde_json::to_string(event.object()).map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.keep_redacted_original(batch, event.id(), &redaction_id, &original, &json);
        Ok(Some((json, redaction_id.to_string())))
    }

    /// Loads the given events (that are not loaded yet) from storage.
    async fn load_events(
        &self,
        version: &RoomVersion,
        ids: &[OwnedEventId],
        loaded: &mut Loaded,
    ) -> Result<(), ServiceError> {
        let mut missing = Vec::new();
        for id in ids {
            if loaded.contains_key(id) {
                continue;
            }
            match lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(id.as_str())).await? {
                Some(record) => {
                    loaded.insert(id.clone(), stored_pdu(version, id, record)?);
                }
                None => missing.push(id.to_string()),
            }
        }
        if !missing.is_empty() {
            return Err(ServiceError::MissingEvents(missing.join(", ")));
        }
        Ok(())
    }

    /// The auth chain through `auth_events`: each of them and its stored chain.
    async fn auth_chain_through(
        &self,
        version: &RoomVersion,
        auth_events: &[OwnedEventId],
        loaded: &mut Loaded,
    ) -> Result<HashSet<OwnedEventId>, ServiceError> {
        let mut chain = HashSet::new();
        for id in auth_events {
            chain.insert(id.clone());
            chain.extend(self.stored_auth_chain(version, id, loaded).await?);
        }
        if chain.len() > lattice_core::limits::MAX_AUTH_CHAIN_EVENTS {
            return Err(ServiceError::Internal("auth chain over the limit".into()));
        }
        Ok(chain)
    }

    /// The auth chain of a stored event, from the index; for an event without an index row (a
    /// message, or data written before the index existed) it is walked from its auth events.
    async fn stored_auth_chain(
        &self,
        version: &RoomVersion,
        id: &OwnedEventId,
        loaded: &mut Loaded,
    ) -> Result<Vec<OwnedEventId>, ServiceError> {
        if let Some(record) =
            lattice_storage::get::<AuthChainRecord>(self.kv.as_ref(), &keys::event(id.as_str())).await?
        {
            return record
                .value
                .0
                .into_iter()
                .map(|id| OwnedEventId::try_from(id).map_err(|e| ServiceError::Internal(e.to_string())))
                .collect();
        }
        self.load_auth_closure(version, std::slice::from_ref(id), loaded).await?;
        let chain = lattice_core::state_resolution::auth_chain([id.as_ref()], |id| loaded.get(id))
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(chain.into_iter().collect())
    }

    /// Loads `ids` and everything in their auth chains.
    async fn load_auth_closure(
        &self,
        version: &RoomVersion,
        ids: &[OwnedEventId],
        loaded: &mut Loaded,
    ) -> Result<(), ServiceError> {
        let mut frontier: Vec<OwnedEventId> = ids.to_vec();
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        while !frontier.is_empty() {
            self.load_events(version, &frontier, loaded).await?;
            let next: Vec<OwnedEventId> = frontier
                .iter()
                .filter_map(|id| loaded.get(id))
                .flat_map(|e| e.auth_event_ids().iter().cloned())
                .filter(|id| seen.insert(id.clone()))
                .collect();
            if seen.len() > lattice_core::limits::MAX_AUTH_CHAIN_EVENTS {
                return Err(ServiceError::Internal("auth chain over the limit".into()));
            }
            frontier = next;
        }
        Ok(())
    }
}

fn room_id_of(event: &Pdu) -> Result<OwnedRoomId, ServiceError> {
    match event.room_id() {
        Some(room_id) => Ok(room_id.to_owned()),
        // A v12 create event carries no room ID: the room is named after the event.
        None => OwnedRoomId::try_from(format!("!{}", &event.id().as_str()[1..]))
            .map_err(|e| ServiceError::BadJson(e.to_string())),
    }
}

/// A create event needs a room that does not exist yet; any other event one that exists, of the
/// event's room version.
fn check_room_fits(
    event: &Pdu,
    room_id: &OwnedRoomId,
    room: Option<&RoomRecord>,
    version: &RoomVersion,
) -> Result<(), ServiceError> {
    let is_create = *event.kind() == TimelineEventType::RoomCreate;
    match (room, is_create) {
        (Some(_), true) => Err(ServiceError::Forbidden("the room already has a create event".into())),
        (None, false) => Err(ServiceError::NotFound(format!("unknown room {room_id}"))),
        (Some(room), false) if room.room_version != version.id().as_str() => {
            Err(ServiceError::BadJson(format!("room {room_id} is version {}", room.room_version)))
        }
        _ => Ok(()),
    }
}

fn membership_of(event: &Pdu) -> String {
    #[derive(serde::Deserialize)]
    struct Membership {
        membership: String,
    }
    serde_json::from_str::<Membership>(event.content().get()).map(|m| m.membership).unwrap_or_default()
}

fn stored_pdu(version: &RoomVersion, id: &EventId, record: Fetched<EventRecord>) -> Result<Pdu, ServiceError> {
    let object: CanonicalJsonObject =
        serde_json::from_str(&record.value.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
    let mut pdu = Pdu::stored(object, version, id.to_owned()).map_err(|e| ServiceError::Internal(e.to_string()))?;
    if matches!(record.value.status, EventStatus::Rejected { .. }) {
        pdu.mark_rejected();
    }
    Ok(pdu)
}

fn already_stored(event_id: &EventId, record: EventRecord) -> Ingested {
    let outcome = match record.status {
        EventStatus::Accepted => Outcome::Accepted,
        EventStatus::SoftFailed { reason } => Outcome::SoftFailed(reason),
        EventStatus::Rejected { reason } => Outcome::Rejected(reason),
    };
    Ingested { event_id: event_id.to_owned(), outcome, stream_position: record.stream_position }
}

fn redacted_json(object: &CanonicalJsonObject, version: &RoomVersion) -> Result<String, ServiceError> {
    let redacted =
        lattice_core::pdu::redacted(object.clone(), version).map_err(|e| ServiceError::Internal(e.to_string()))?;
    serde_json::to_string(&redacted).map_err(|e| ServiceError::Internal(e.to_string()))
}
