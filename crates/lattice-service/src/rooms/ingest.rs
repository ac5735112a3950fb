//! The ingest path: every event, local or remote, is checked and stored here, in one batch.
//!
//! The caller has parsed the PDU, checked its signatures and content hash (`lattice_core::pdu`)
//! and typed it (`Pdu::new`). Here: auth against its auth events, auth against the state before
//! it, soft-fail against the current state (live events only), then one atomic write of the
//! event, its state group, its positions (stream and topological), the forward and backward
//! extremities, the current state and the membership index.
//!
//! Three ways in, one path:
//! - **live** ([`Arrival::Live`]): a new event at the front of the room; it gets a stream
//!   position, so `/sync` shows it, and moves the forward extremities and the current state;
//! - **backfill** ([`Arrival::Backfill`]): older history filling a gap; placed in the room's
//!   topological order for `/messages`, never in `/sync`, never changing the current state;
//! - **outlier** ([`Rooms::ingest_outlier`]): an event whose state is unknown (auth chains and
//!   state from another server's answer, an invite from another server, a fetched event),
//!   checked against its own auth events only, in no timeline, until it is ingested again.
//!
//! An event whose prev events are not all stored needs the state before it from the caller
//! (federation fetches it with `/state_ids`); the missing prev events are recorded as backward
//! extremities (gaps) that backfill later fills.
//!
//! The cost of an event does not grow with the room's state: the auth checks read only the slots
//! the rules look at, a message keeps the state group of its prev event, a state event adds a
//! one-entry delta, and the current state moves by its changed slots. Whole states are read only
//! at forks, gaps and snapshot points.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use lattice_core::auth;
use lattice_core::event::Pdu;
use lattice_core::power::RoomPower;
use lattice_core::room_version::RoomVersion;
use lattice_core::state_resolution::{self, StateMap};
use lattice_storage::records::{EventRecord, EventStatus, RoomRecord};
use lattice_storage::{Fetched, StorageError, Table, WriteBatch, keys};
use ruma::events::{StateEventType, TimelineEventType};
use ruma::state_res::Event;
use ruma::{CanonicalJsonObject, EventId, OwnedEventId, OwnedRoomId, ServerName};

use super::Rooms;
use super::front::{self, MERGE_THRESHOLD};
use super::state_store::{self, StateRef};
use crate::ServiceError;

/// What ingest decided about an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    SoftFailed(String),
    Rejected(String),
    /// Stored as an outlier: allowed by its own auth events; its state is not known yet.
    Outlier,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingested {
    pub event_id: OwnedEventId,
    pub outcome: Outcome,
    /// The stream position of an accepted live event.
    pub stream_position: Option<u64>,
}

/// How an event reaches the room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// New at the front of the room: shown by `/sync`, moves the current state.
    Live,
    /// Older history (backfill): shown by `/messages` in its place, never by `/sync`.
    Backfill,
}

/// How ingest should place one event.
pub(crate) struct Placement<'a> {
    pub arrival: Arrival,
    /// The state before the event, for an event whose prev events are not all stored.
    pub supplied_state: Option<&'a StateMap>,
    /// Writes (and conditions) stored with the event when it is accepted.
    pub extra: &'a WriteBatch,
}

/// How often ingest recomputes when a concurrent write to the same room wins the race.
const ROOM_WRITE_RETRIES: usize = 8;

/// Events loaded for one ingest, by ID: shared with the cache of parsed events rather than
/// copied, since each PDU loads its auth events and a copy is the event's whole JSON tree.
pub(super) type Loaded = HashMap<OwnedEventId, Arc<Pdu>>;

/// Where an event's prev events are: stored with their state, or unknown (not stored, or only
/// as outliers) — a gap.
pub(super) struct Prevs {
    pub placed: Vec<(OwnedEventId, u64)>,
    pub unknown: Vec<OwnedEventId>,
}

impl Rooms {
    /// Receives a PDU as bytes from another server, `origin`: format, canonical JSON, signatures
    /// (against `keys`, the origin servers' verified public keys) and content hash, that the
    /// sender belongs to `origin`, then [`Rooms::ingest`]. A PDU failing those first checks is
    /// refused with the rule it broke and stores nothing; one whose content hash is wrong is kept
    /// only in its redacted form.
    pub async fn receive_pdu(
        &self,
        origin: &ServerName,
        version: &RoomVersion,
        bytes: &[u8],
        keys: &ruma::signatures::PublicKeyMap,
    ) -> Result<Ingested, ServiceError> {
        let event = self.check_remote_pdu(origin, version, bytes, keys)?;
        self.ingest(version, event).await
    }

    /// The checks [`Rooms::receive_pdu`] makes before ingest, for callers that place the
    /// event themselves (as an outlier, as backfill, with a supplied state).
    pub fn check_remote_pdu(
        &self,
        origin: &ServerName,
        version: &RoomVersion,
        bytes: &[u8],
        keys: &ruma::signatures::PublicKeyMap,
    ) -> Result<Pdu, ServiceError> {
        let object = lattice_core::pdu::parse(bytes, version)?;
        check_remote_object(origin, version, object, keys)
    }

    /// Checks `event` and stores it, live, with everything it changes, atomically. Its prev
    /// events must be stored. Idempotent: an event already stored answers with its earlier
    /// outcome.
    pub async fn ingest(&self, version: &RoomVersion, event: Pdu) -> Result<Ingested, ServiceError> {
        self.ingest_with(version, event, &WriteBatch::new()).await
    }

    /// [`Rooms::ingest`] for an event that may arrive out of order or as history: when some of
    /// its prev events are not stored, `supplied_state` is the state before it (as another server
    /// answered `/state_ids`; those events must be stored, as outliers at least) and the missing
    /// prev events are recorded as gaps.
    pub async fn ingest_placed(
        &self,
        version: &RoomVersion,
        event: Pdu,
        arrival: Arrival,
        supplied_state: Option<&StateMap>,
    ) -> Result<Ingested, ServiceError> {
        let room_id = room_id_of(&event)?;
        let _room = self.room_lock(room_id.as_str()).lock().await;
        let placement = Placement { arrival, supplied_state, extra: &WriteBatch::new() };
        self.ingest_retrying(version, &event, &placement).await
    }

    /// Stores `event` as an outlier: checked against its own auth events (which must be
    /// stored), not placed in any timeline or state. An event already stored is left as it is.
    pub async fn ingest_outlier(&self, version: &RoomVersion, event: Pdu) -> Result<Ingested, ServiceError> {
        let room_id = room_id_of(&event)?;
        let _room = self.room_lock(room_id.as_str()).lock().await;
        self.store_outlier(version, &event, &room_id).await
    }

    /// [`Rooms::ingest`], adding `extra` (writes and their conditions) to the event's batch when
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

    /// The live ingest retry loop, for callers already holding the room's lock.
    pub(crate) async fn ingest_unlocked(
        &self,
        version: &RoomVersion,
        event: Pdu,
        extra: &WriteBatch,
    ) -> Result<Ingested, ServiceError> {
        let placement = Placement { arrival: Arrival::Live, supplied_state: None, extra };
        self.ingest_retrying(version, &event, &placement).await
    }

    async fn ingest_retrying(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        placement: &Placement<'_>,
    ) -> Result<Ingested, ServiceError> {
        for _ in 0..ROOM_WRITE_RETRIES {
            match self.try_ingest(version, event, placement).await {
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
        placement: &Placement<'_>,
    ) -> Result<Ingested, ServiceError> {
        let event_key = keys::event(event.id().as_str());
        let existing = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &event_key).await?;
        if let Some(existing) = &existing
            && existing.value.status != EventStatus::Outlier
        {
            return Ok(already_stored(event.id(), existing.value.clone()));
        }
        let room_id = room_id_of(event)?;
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        let placed = (placement.arrival, placement.supplied_state);
        check_room_fits(event, &room_id, room.as_ref().map(|r| &r.value), version, placed)?;

        let mut batch = WriteBatch::new();
        let was_outlier = existing.is_some();
        // An outlier becomes a placed event only once, and an event is stored only once.
        batch.expect(Table::Events, event_key.clone(), existing.map(|e| e.raw));
        // The event itself takes part in resolving the new current state.
        let mut loaded = Loaded::from([(event.id().to_owned(), Arc::new(event.clone()))]);
        let prevs = self.place_prevs(event, &room_id).await?;
        self.load_auth_events(version, event, &room_id, room.as_ref().map(|r| &r.value), &mut loaded).await?;
        let before = self.state_before(version, &prevs, placement.supplied_state, &mut loaded, &mut batch).await?;
        let current_of =
            |room: &RoomRecord| StateRef::Current { group: room.current_state_group, room_id: room_id.to_string() };
        // Built on the current state (the usual case): read its slots from the current-state rows.
        let before = match (&before, room.as_ref()) {
            (StateRef::Stored(group), Some(room)) if *group == room.value.current_state_group => {
                current_of(&room.value)
            }
            _ => before,
        };
        let live = placement.arrival == Arrival::Live;
        let current = room.as_ref().filter(|_| live).map(|r| current_of(&r.value));
        let outcome = self.decide(version, event, &before, current.as_ref(), &mut loaded).await?;
        let accepted = outcome == Outcome::Accepted;

        let state_slot = event.state_key().map(|key| (StateEventType::from(event.kind().to_string()), key.to_owned()));
        let after = match (&outcome, &state_slot) {
            (Outcome::Rejected(_), _) | (_, None) => None,
            (_, Some(slot)) => Some(
                state_store::extend(
                    self.kv.as_ref(),
                    &self.state_group_ids,
                    &mut batch,
                    &before,
                    slot,
                    &event.id().to_owned(),
                )
                .await?,
            ),
        };
        let mut record = EventRecord {
            room_id: room_id.to_string(),
            json: serde_json::to_string(event.object()).map_err(|e| ServiceError::Internal(e.to_string()))?,
            status: match &outcome {
                Outcome::Accepted => EventStatus::Accepted,
                Outcome::SoftFailed(reason) => EventStatus::SoftFailed { reason: reason.clone() },
                Outcome::Rejected(reason) => EventStatus::Rejected { reason: reason.clone() },
                Outcome::Outlier => EventStatus::Outlier,
            },
            stream_position: None,
            state_group: after.as_ref().unwrap_or(&before).group(),
            redacted_by: None,
            order: None,
        };
        let redacted_on_arrival = match self.redact_if_pending(version, event, &mut loaded, &mut batch).await? {
            Some((json, redaction_id)) => {
                record.json = json;
                record.redacted_by = Some(redaction_id);
                true
            }
            None => false,
        };
        let redacted_target = match accepted && *event.kind() == TimelineEventType::RoomRedaction {
            true => self.apply_redaction(version, event, &before, &mut loaded, &mut batch).await?,
            false => None,
        };
        let fills_gap = self.record_gaps(&room_id, event, &prevs, &mut batch).await?;
        // Only a live event that nothing stored cites yet moves the room's front.
        let front = match live && accepted && !fills_gap {
            true => {
                let room = room.as_ref().map(|r| &r.value);
                let states = (&before, after.as_ref());
                Some(self.advance_front(version, &room_id, event, &prevs, states, room, &mut loaded, &mut batch).await?)
            }
            false => None,
        };
        let wide_front = front.as_ref().is_some_and(|front| front.extremities.len() > MERGE_THRESHOLD);

        // Positions are taken last, right before the write, and published once it is written:
        // no other room waits for this one's state resolution or write. Backfilled history
        // takes its order from the same allocator, with no stream position.
        let taken = match accepted {
            true => Some(self.stream.take().await?),
            false => None,
        };
        let position = taken.as_ref().map(|position| position.get());
        if let Some(position) = position {
            record.order = Some(position);
            super::topological::index_topological(&mut batch, &room_id, event, position);
            if !redacted_on_arrival {
                self.index_relation(&room_id, event, position, &mut batch).await?;
                super::search::index_event(&mut batch, room_id.as_str(), event, position);
            }
            super::timestamps::index_event(&mut batch, &room_id, event, position);
            if live {
                record.stream_position = Some(position);
                batch.put(
                    Table::Timeline,
                    keys::timeline(room_id.as_str(), position),
                    event.id().as_str().as_bytes().to_vec(),
                );
                batch.put(
                    Table::RoomActivity,
                    keys::room_activity(keys::ACTIVITY_EVENTS, position, room_id.as_str()),
                    super::peers::event_activity(event.sender().server_name() == self.server_name()),
                );
                let create_id = match (placement.supplied_state, room.is_none()) {
                    (Some(state), true) => {
                        state.get(&(StateEventType::RoomCreate, String::new())).map(|id| id.to_string())
                    }
                    _ => None,
                };
                let room_record =
                    front::updated_room(version, event, room.as_ref().map(|r| &r.value), create_id, front, position);
                lattice_storage::put(&mut batch, keys::room(room_id.as_str()), &room_record);
                batch.expect(Table::Rooms, keys::room(room_id.as_str()), room.as_ref().map(|r| r.raw.clone()));
            }
        }
        lattice_storage::put(&mut batch, event_key, &record);
        if accepted {
            batch.ops.extend(placement.extra.ops.iter().cloned());
            batch.conditions.extend(placement.extra.conditions.iter().cloned());
        }
        // Push rules run before the write, and what they notified is stored in the event's own
        // batch: one durable write per event, and a `/sync` that shows the event also shows the
        // counts it raised.
        let queued_push = match record.stream_position {
            Some(position) => self.push_event(version, &room_id, event, position, &mut batch).await,
            None => false,
        };
        match super::deferred::deferred() {
            true => self.event_writes.write_deferred(batch).await?,
            false => self.event_writes.write(batch).await?,
        }
        // The records whose parsed form may be kept, changed: a placed outlier, a redacted target.
        if was_outlier {
            self.parsed_events.forget(event.id());
        }
        if let Some(target) = &redacted_target {
            self.parsed_events.forget(target);
        }
        if queued_push {
            self.push.wake_delivery();
        }
        if let Some(taken) = taken {
            taken.published().await;
        }
        if record.stream_position.is_some() {
            self.notify_event(&room_id, event);
        }
        if wide_front {
            self.want_merge(&room_id);
        }
        Ok(Ingested { event_id: event.id().to_owned(), outcome, stream_position: record.stream_position })
    }

    /// Wakes the `/sync` requests of the room's members, and of the user whose membership this
    /// is (who may not be a member yet).
    fn notify_event(&self, room_id: &OwnedRoomId, event: &Pdu) {
        self.notifier.notify_room(room_id);
        self.events_written.notify_one();
        if *event.kind() == TimelineEventType::RoomMember
            && let Some(target) = event.state_key().and_then(|key| ruma::UserId::parse(key).ok())
        {
            self.notifier.notify_user(&target);
        }
    }

    /// Stores an outlier: its auth events must be stored (as outliers at least) and in its room,
    /// and allow it.
    async fn store_outlier(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        room_id: &OwnedRoomId,
    ) -> Result<Ingested, ServiceError> {
        let event_key = keys::event(event.id().as_str());
        if let Some(existing) = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &event_key).await? {
            return Ok(already_stored(event.id(), existing.value));
        }
        let room = self.outlier_room(version, room_id).await?;
        let (record, outcome) = self.outlier_record(version, event, room_id, room.as_ref()).await?;
        let mut batch = WriteBatch::new();
        batch.expect(Table::Events, event_key.clone(), None);
        lattice_storage::put(&mut batch, event_key, &record);
        self.kv.write(batch).await?;
        Ok(Ingested { event_id: event.id().to_owned(), outcome, stream_position: None })
    }

    /// Stores fetched events as outliers in one write, each as [`Rooms::ingest_outlier`] would:
    /// for the events of a join's state and auth chain whose auth events are stored already, so
    /// a room with 10,000 state events costs a few writes rather than 10,000. An event that
    /// cannot be checked (an auth event missing, say) is left out. Returns the IDs stored
    /// (accepted or rejected) or found stored already.
    pub async fn ingest_outliers(
        &self,
        version: &RoomVersion,
        room_id: &OwnedRoomId,
        events: Vec<Pdu>,
    ) -> Result<Vec<OwnedEventId>, ServiceError> {
        let _room = self.room_lock(room_id.as_str()).lock().await;
        let room = self.outlier_room(version, room_id).await?;
        let mut batch = WriteBatch::new();
        let mut done = Vec::with_capacity(events.len());
        for event in &events {
            let event_key = keys::event(event.id().as_str());
            if lattice_storage::get::<EventRecord>(self.kv.as_ref(), &event_key).await?.is_some() {
                done.push(event.id().to_owned());
                continue;
            }
            match self.outlier_record(version, event, room_id, room.as_ref()).await {
                Ok((record, _)) => {
                    batch.expect(Table::Events, event_key.clone(), None);
                    lattice_storage::put(&mut batch, event_key, &record);
                    done.push(event.id().to_owned());
                }
                Err(error) => tracing::info!(event_id = %event.id(), %error, "a fetched event could not be stored"),
            }
        }
        self.kv.write(batch).await?;
        Ok(done)
    }

    /// The room's record, if this server has the room, which must be of `version`.
    async fn outlier_room(
        &self,
        version: &RoomVersion,
        room_id: &OwnedRoomId,
    ) -> Result<Option<Fetched<RoomRecord>>, ServiceError> {
        let room = lattice_storage::get::<RoomRecord>(self.kv.as_ref(), &keys::room(room_id.as_str())).await?;
        if let Some(room) = &room
            && room.value.room_version != version.id().as_str()
        {
            return Err(ServiceError::BadJson(format!("room {room_id} is version {}", room.value.room_version)));
        }
        Ok(room)
    }

    /// An outlier's record: checked against its own auth events (stored), accepted or rejected.
    async fn outlier_record(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        room_id: &OwnedRoomId,
        room: Option<&Fetched<RoomRecord>>,
    ) -> Result<(EventRecord, Outcome), ServiceError> {
        let mut loaded = Loaded::from([(event.id().to_owned(), Arc::new(event.clone()))]);
        self.load_auth_events(version, event, room_id, room.map(|r| &r.value), &mut loaded).await?;
        let status =
            match auth::check_against_auth_events(event, version, |id: &EventId| loaded.get(id).map(Arc::as_ref)) {
                Ok(()) => EventStatus::Outlier,
                Err(e) => EventStatus::Rejected { reason: e.to_string() },
            };
        let outcome = match &status {
            EventStatus::Rejected { reason } => Outcome::Rejected(reason.clone()),
            _ => Outcome::Outlier,
        };
        let record = EventRecord {
            room_id: room_id.to_string(),
            json: serde_json::to_string(event.object()).map_err(|e| ServiceError::Internal(e.to_string()))?,
            status,
            stream_position: None,
            state_group: 0,
            redacted_by: None,
            order: None,
        };
        Ok((record, outcome))
    }

    /// Sorts the prev events into those stored with a state (and their state groups) and the
    /// unknown ones. A prev event of another room is refused; one that was rejected too (its
    /// successors are built on a state it never had).
    async fn place_prevs(&self, event: &Pdu, room_id: &OwnedRoomId) -> Result<Prevs, ServiceError> {
        let mut prevs = Prevs { placed: Vec::new(), unknown: Vec::new() };
        for prev in event.prev_event_ids() {
            let Some(record) =
                lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(prev.as_str())).await?
            else {
                prevs.unknown.push(prev.clone());
                continue;
            };
            if record.value.room_id != room_id.as_str() {
                return Err(ServiceError::BadJson(format!("prev event {prev} belongs to another room")));
            }
            match record.value.status {
                EventStatus::Rejected { .. } => {
                    return Err(ServiceError::BadJson(format!("prev event {prev} was rejected")));
                }
                EventStatus::Outlier => prevs.unknown.push(prev.clone()),
                _ => prevs.placed.push((prev.clone(), record.value.state_group)),
            }
        }
        Ok(prevs)
    }

    /// Loads the event's auth events (and, from v12, the room's create event, an auth event
    /// without being cited); each must be stored and belong to the event's room.
    pub(super) async fn load_auth_events(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        room_id: &OwnedRoomId,
        room: Option<&RoomRecord>,
        loaded: &mut Loaded,
    ) -> Result<(), ServiceError> {
        let mut needed: Vec<OwnedEventId> = event.auth_event_ids().to_vec();
        if version.rules().authorization.room_create_event_id_as_room_id
            && *event.kind() != TimelineEventType::RoomCreate
        {
            // The room ID names the create event (`!x` for `$x`), known or not.
            let create_id = match room {
                Some(room) => room.create_event_id.clone(),
                None => format!("${}", &room_id.as_str()[1..]),
            };
            needed.push(OwnedEventId::try_from(create_id).map_err(|e| ServiceError::BadJson(e.to_string()))?);
        }
        self.load_events(version, &needed, loaded).await?;
        for id in &needed {
            if let Some(auth_event) = loaded.get(id)
                && room_id_of(auth_event)? != *room_id
            {
                return Err(ServiceError::BadJson(format!("auth event {id} belongs to another room")));
            }
        }
        Ok(())
    }

    /// The state before an event: nothing for the create event; the state after its one placed
    /// prev event; the resolution of the states after each of them; and, when some prev events
    /// are unknown, the state the caller supplied (resolved with the placed ones' states).
    async fn state_before(
        &self,
        version: &RoomVersion,
        prevs: &Prevs,
        supplied: Option<&StateMap>,
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<StateRef, ServiceError> {
        let mut groups: Vec<u64> = Vec::new();
        for (_, group) in &prevs.placed {
            if !groups.contains(group) {
                groups.push(*group);
            }
        }
        let kv = self.kv.as_ref();
        if !prevs.unknown.is_empty() {
            let supplied = supplied.ok_or_else(|| {
                ServiceError::MissingEvents(prevs.unknown.iter().map(|id| id.as_str()).collect::<Vec<_>>().join(", "))
            })?;
            let ids: Vec<OwnedEventId> = supplied.values().cloned().collect();
            self.load_events(version, &ids, loaded).await?;
            let mut states = vec![supplied.clone()];
            for group in groups {
                states.push(state_store::load(kv, group).await?);
            }
            let state = match states.len() {
                1 => states.pop().unwrap_or_default(),
                _ => self.resolve(version, &states, loaded).await?,
            };
            return state_store::save_fresh(kv, &self.state_group_ids, batch, None, state).await;
        }
        match groups.as_slice() {
            [] => state_store::save_fresh(kv, &self.state_group_ids, batch, None, StateMap::new()).await,
            [group] => Ok(StateRef::Stored(*group)),
            _ => {
                let mut states = Vec::with_capacity(groups.len());
                for group in &groups {
                    states.push(state_store::load(kv, *group).await?);
                }
                let resolved = self.resolve(version, &states, loaded).await?;
                let base = StateRef::Stored(groups[0]);
                state_store::save_fresh(kv, &self.state_group_ids, batch, Some((&base, &states[0])), resolved).await
            }
        }
    }

    /// Records the event's unknown prev events as gaps, and removes the gap the event fills, if
    /// any; returns whether it filled one (some stored event already cites it).
    async fn record_gaps(
        &self,
        room_id: &OwnedRoomId,
        event: &Pdu,
        prevs: &Prevs,
        batch: &mut WriteBatch,
    ) -> Result<bool, ServiceError> {
        for missing in &prevs.unknown {
            batch.put(
                Table::BackwardExtremities,
                keys::backward_extremity(room_id.as_str(), missing.as_str()),
                Vec::new(),
            );
        }
        let own = keys::backward_extremity(room_id.as_str(), event.id().as_str());
        let fills_gap = self.kv.get(Table::BackwardExtremities, &own).await?.is_some();
        if fills_gap {
            batch.delete(Table::BackwardExtremities, own);
        }
        Ok(fills_gap)
    }

    /// Resolves `states`, first loading every event state resolution may look at: the states'
    /// events and their auth chains, walked from the auth event IDs each event names.
    pub(super) async fn resolve(
        &self,
        version: &RoomVersion,
        states: &[StateMap],
        loaded: &mut Loaded,
    ) -> Result<StateMap, ServiceError> {
        let mut auth_chains = Vec::with_capacity(states.len());
        for state in states {
            let ids: Vec<OwnedEventId> = state.values().cloned().collect();
            self.load_auth_closure(version, &ids, loaded).await?;
            let chain =
                state_resolution::auth_chain(ids.iter().map(|id| id.as_ref()), |id| loaded.get(id).map(Arc::as_ref))
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
            auth_chains.push(chain);
        }
        state_resolution::resolve_with_auth_chains(version, states, auth_chains, |id| loaded.get(id).map(Arc::as_ref))
            .map_err(|e| ServiceError::Internal(e.to_string()))
    }

    /// The three auth checks (spec "checks performed on receipt", steps 4–6): against the
    /// event's auth events, against the state before it (both → `Rejected`), and against the
    /// room's current state (→ `SoftFailed`; live events only, and only when the current state
    /// differs from the state before). Only the state slots the rules look at are read.
    pub(super) async fn decide(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        before: &StateRef,
        current: Option<&StateRef>,
        loaded: &mut Loaded,
    ) -> Result<Outcome, ServiceError> {
        if let Err(e) = auth::check_against_auth_events(event, version, |id: &EventId| loaded.get(id).map(Arc::as_ref))
        {
            return Ok(Outcome::Rejected(e.to_string()));
        }
        let auth_slots: Vec<(StateEventType, String)> = ruma::state_res::auth_types_for_event(
            event.kind(),
            event.sender(),
            event.state_key(),
            event.content(),
            &version.rules().authorization,
        )
        .unwrap_or_default();
        // The rules read the create event in every version (from v12 without citing it).
        let mut auth_slots = auth_slots;
        let create = (StateEventType::RoomCreate, String::new());
        if !auth_slots.contains(&create) {
            auth_slots.push(create);
        }
        if let Err(e) = self.check_against(version, event, before, &auth_slots, loaded).await? {
            return Ok(Outcome::Rejected(e.to_string()));
        }
        let Some(current) = current.filter(|current| current.group() != before.group()) else {
            return Ok(Outcome::Accepted);
        };
        if let Err(e) = self.check_against(version, event, current, &auth_slots, loaded).await? {
            return Ok(Outcome::SoftFailed(e.to_string()));
        }
        Ok(Outcome::Accepted)
    }

    /// The state-dependent auth rules for `event` against `state`, reading only `slots`.
    async fn check_against(
        &self,
        version: &RoomVersion,
        event: &Pdu,
        state: &StateRef,
        slots: &[(StateEventType, String)],
        loaded: &mut Loaded,
    ) -> Result<Result<(), auth::AuthError>, ServiceError> {
        let ids = state.slots(self.kv.as_ref(), slots).await?;
        let found: Vec<OwnedEventId> = ids.iter().flatten().cloned().collect();
        self.load_events(version, &found, loaded).await?;
        let in_state: HashMap<&(StateEventType, String), &OwnedEventId> =
            slots.iter().zip(ids.iter()).filter_map(|(slot, id)| Some((slot, id.as_ref()?))).collect();
        let lookup = |kind: &StateEventType, key: &str| {
            in_state.get(&(kind.clone(), key.to_owned())).and_then(|id| loaded.get(*id).map(Arc::as_ref))
        };
        Ok(auth::check_against_state(event, version, lookup))
    }

    /// Replaces the stored JSON of the event an accepted redaction names with its redacted form,
    /// when the spec lets the redaction take effect: the redacting user has the `redact` power
    /// level, or is on the same server as the original sender. A target not stored yet is
    /// redacted when it arrives. Returns the target when its record is rewritten in `batch`.
    async fn apply_redaction(
        &self,
        version: &RoomVersion,
        redaction: &Pdu,
        state_before: &StateRef,
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<Option<OwnedEventId>, ServiceError> {
        let Some(target_id) = redaction.redacts() else { return Ok(None) };
        let Some(target) =
            lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(target_id.as_str())).await?
        else {
            // Applied when the target arrives.
            let key = keys::pending_redaction(target_id.as_str(), redaction.id().as_str());
            batch.put(Table::PendingRedactions, key, Vec::new());
            return Ok(None);
        };
        if target.value.room_id != room_id_of(redaction)?.as_str() {
            return Ok(None);
        }
        self.load_events(version, std::slice::from_ref(target_id), loaded).await?;
        let Some(target_event) = loaded.get(target_id).cloned() else { return Ok(None) };
        if !self.redaction_takes_effect(version, redaction, &target_event, state_before, loaded).await? {
            return Ok(None);
        }
        self.unindex_relation(&room_id_of(redaction)?, &target_event, target.value.history_order(), batch).await?;
        if let Some(order) = target.value.history_order() {
            super::search::unindex_event(batch, &target.value.room_id, &target_event, order);
        }
        let json = redacted_json(target_event.object(), version)?;
        self.keep_redacted_original(batch, target_id, redaction.id(), &target.value.json, &json);
        batch.expect(Table::Events, keys::event(target_id.as_str()), Some(target.raw));
        lattice_storage::put(
            batch,
            keys::event(target_id.as_str()),
            &EventRecord { json, redacted_by: Some(redaction.id().to_string()), ..target.value },
        );
        Ok(Some(target_id.to_owned()))
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
        state_before_redaction: &StateRef,
        loaded: &mut Loaded,
    ) -> Result<bool, ServiceError> {
        if target.sender().server_name() == redaction.sender().server_name() {
            return Ok(true);
        }
        let slots = [(StateEventType::RoomCreate, String::new()), (StateEventType::RoomPowerLevels, String::new())];
        let [create_id, power_id]: [Option<OwnedEventId>; 2] = state_before_redaction
            .slots(self.kv.as_ref(), &slots)
            .await?
            .try_into()
            .map_err(|_| ServiceError::Internal("one answer per slot".into()))?;
        let Some(create_id) = create_id else { return Ok(false) };
        let ids: Vec<OwnedEventId> = std::iter::once(create_id.clone()).chain(power_id.clone()).collect();
        self.load_events(version, &ids, loaded).await?;
        let Some(create) = loaded.get(&create_id) else { return Ok(false) };
        // Levels the auth rules could not read grant nothing.
        let power_levels = power_id.as_ref().and_then(|id| loaded.get(id).map(Arc::as_ref));
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
            let state = StateRef::Stored(record.value.state_group);
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
    pub(super) async fn load_events(
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
            if let Some(event) = self.parsed_events.get(id) {
                loaded.insert(id.clone(), event);
                continue;
            }
            let generation = self.parsed_events.generation();
            match lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(id.as_str())).await? {
                Some(record) => {
                    let event = Arc::new(stored_pdu(version, id, record)?);
                    self.parsed_events.insert_if_unchanged(id, event.clone(), generation);
                    loaded.insert(id.clone(), event);
                }
                None => missing.push(id.to_string()),
            }
        }
        if !missing.is_empty() {
            return Err(ServiceError::MissingEvents(missing.join(", ")));
        }
        Ok(())
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
                .filter_map(|id| loaded.get(id).map(Arc::as_ref))
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

/// [`Rooms::check_remote_pdu`] of a PDU already parsed: [`check_fetched_object`], and that the
/// sender belongs to `origin`. Pure computation, so callers may spread many over threads.
pub fn check_remote_object(
    origin: &ServerName,
    version: &RoomVersion,
    object: CanonicalJsonObject,
    keys: &ruma::signatures::PublicKeyMap,
) -> Result<Pdu, ServiceError> {
    let event = check_fetched_object(version, object, keys)?;
    // A server speaks for its own users only: an event pushed by `origin` is from one of them.
    if event.sender().server_name() != origin {
        return Err(ServiceError::Forbidden(format!(
            "event {} is sent by {}, not by a user of {origin}",
            event.id(),
            event.sender()
        )));
    }
    Ok(event)
}

/// Signatures (against `keys`, the signing servers' verified public keys) and content hash of
/// a parsed PDU (kept redacted when the hash does not match), its format, and its type and
/// state key. No origin check: a server answering a fetch may relay other servers' events.
pub fn check_fetched_object(
    version: &RoomVersion,
    object: CanonicalJsonObject,
    keys: &ruma::signatures::PublicKeyMap,
) -> Result<Pdu, ServiceError> {
    let object = match lattice_core::pdu::check_signatures_and_hashes(object, version, keys)? {
        lattice_core::pdu::Checked::Intact(object) | lattice_core::pdu::Checked::Redacted(object) => object,
    };
    let event = Pdu::new(object, version)?;
    // The same check as for local events: types and state keys become parts of storage keys.
    super::local_events::check_type_and_state_key(&event.kind().to_string(), event.state_key())?;
    Ok(event)
}

pub(crate) fn room_id_of(event: &Pdu) -> Result<OwnedRoomId, ServiceError> {
    match event.room_id() {
        Some(room_id) => Ok(room_id.to_owned()),
        // A v12 create event carries no room ID: the room is named after the event.
        None => OwnedRoomId::try_from(format!("!{}", &event.id().as_str()[1..]))
            .map_err(|e| ServiceError::BadJson(e.to_string())),
    }
}

/// A create event needs a room that does not exist yet; any other event one that exists, of the
/// event's room version.
/// A room this server does not have yet is also entered by an event that comes with the state
/// before it (joining through another server).
fn check_room_fits(
    event: &Pdu,
    room_id: &OwnedRoomId,
    room: Option<&RoomRecord>,
    version: &RoomVersion,
    (arrival, supplied): (Arrival, Option<&StateMap>),
) -> Result<(), ServiceError> {
    let is_create = *event.kind() == TimelineEventType::RoomCreate;
    let entered_with_state =
        supplied.is_some_and(|state| state.contains_key(&(StateEventType::RoomCreate, String::new())));
    match (room, is_create) {
        // The room's own create event, known as an outlier since the join, is placed when
        // backfill reaches the start of the room's history.
        (Some(room), true) if arrival != Arrival::Live && room.create_event_id == event.id().as_str() => Ok(()),
        (Some(_), true) => Err(ServiceError::Forbidden("the room already has a create event".into())),
        (None, false) if !entered_with_state => Err(ServiceError::NotFound(format!("unknown room {room_id}"))),
        (Some(room), false) if room.room_version != version.id().as_str() => {
            Err(ServiceError::BadJson(format!("room {room_id} is version {}", room.room_version)))
        }
        _ => Ok(()),
    }
}

pub(crate) fn membership_of(event: &Pdu) -> String {
    #[derive(serde::Deserialize)]
    struct Membership {
        membership: String,
    }
    serde_json::from_str::<Membership>(event.content().get()).map(|m| m.membership).unwrap_or_default()
}

pub(super) fn stored_pdu(
    version: &RoomVersion,
    id: &EventId,
    record: Fetched<EventRecord>,
) -> Result<Pdu, ServiceError> {
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
        EventStatus::Outlier => Outcome::Outlier,
    };
    Ingested { event_id: event_id.to_owned(), outcome, stream_position: record.stream_position }
}

fn redacted_json(object: &CanonicalJsonObject, version: &RoomVersion) -> Result<String, ServiceError> {
    let redacted =
        lattice_core::pdu::redacted(object.clone(), version).map_err(|e| ServiceError::Internal(e.to_string()))?;
    serde_json::to_string(&redacted).map_err(|e| ServiceError::Internal(e.to_string()))
}
