//! Who may read what of a room (architecture invariant 8): one [`Viewer`] per reader and room
//! gathers the facts the spec's history-visibility rule needs — the setting and the reader's
//! membership in the state at each event — and `lattice_core::visibility::may_see` decides.
//! Every path that serves room events to a user asks [`Rooms::may_see`]; state reads ask
//! [`Rooms::state_view`].

use std::collections::HashMap;

use lattice_core::visibility::{EventFacts, HistoryVisibility, StateFacts, may_see};
use lattice_storage::records::{EventRecord, EventStatus};
use lattice_storage::{Table, keys};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;

use super::Rooms;
use super::state_store;
use super::topological::{TopoPos, history_position};
use crate::ServiceError;

/// Membership events walked back to find a reader's latest join.
const MAX_MEMBERSHIP_WALK: usize = 32;

/// Hidden events in a row after which a page stops looking further (and says there is more):
/// history before a reader's join can be long, and the reader may page on through it.
pub(crate) const MAX_HIDDEN_RUN: usize = 500;

/// One reader of one room, with what has been learnt about the room's past so far.
pub(crate) struct Viewer {
    pub user_id: OwnedUserId,
    pub room_id: OwnedRoomId,
    /// The reader's membership now.
    pub membership: Option<String>,
    /// When the reader is joined now: the position of the join they have been joined since.
    /// Every event from there on is theirs to see without looking anything up.
    joined_since: Option<u64>,
    /// The position of the reader's latest join, for `shared` history.
    last_join: Option<u64>,
    /// Where that join sits in the room's history, for backfilled events (which have no
    /// stream position to compare).
    last_join_in_history: Option<TopoPos>,
    /// Facts by state group: the events of a page mostly share a few groups.
    facts: HashMap<u64, StateFacts>,
    /// Whether the membership fields above have been read yet (see [`Viewer::lazy`]).
    known: bool,
}

impl Viewer {
    /// A viewer that reads nothing until its first question: a sync looks at many rooms where
    /// nothing happened, and those should cost no membership reads.
    pub(crate) fn lazy(user_id: &UserId, room_id: &RoomId) -> Self {
        Self {
            user_id: user_id.to_owned(),
            room_id: room_id.to_owned(),
            membership: None,
            joined_since: None,
            last_join: None,
            last_join_in_history: None,
            facts: HashMap::new(),
            known: false,
        }
    }
}

/// Which state a reader may read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateView {
    /// The room's current state: members, and anyone while the room is world-readable.
    Current,
    /// The state as the reader left it (the state group of their leave or ban).
    AtGroup(u64),
}

/// The parts of a stored event the rule looks at.
#[derive(Deserialize)]
struct EventShape {
    #[serde(rename = "type")]
    kind: String,
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<serde_json::Value>,
    #[serde(default)]
    content: serde_json::Value,
}

impl EventShape {
    fn parse(record: &EventRecord) -> Result<Self, ServiceError> {
        serde_json::from_str(&record.json).map_err(|e| ServiceError::Internal(e.to_string()))
    }

    /// The first `prev_event` (v1 and v2 cite `[id, hashes]` pairs, later versions plain IDs).
    fn first_prev(&self) -> Option<&str> {
        let prev = self.prev_events.first()?;
        prev.as_str().or_else(|| prev[0].as_str())
    }
}

impl Rooms {
    /// The facts about `user_id` in `room_id` that every later check builds on.
    pub(crate) async fn viewer(&self, user_id: &UserId, room_id: &RoomId) -> Result<Viewer, ServiceError> {
        let mut viewer = Viewer::lazy(user_id, room_id);
        self.get_to_know(&mut viewer).await?;
        Ok(viewer)
    }

    /// Reads the reader's membership now, and walks their member events back to their latest
    /// join; once per viewer.
    async fn get_to_know(&self, viewer: &mut Viewer) -> Result<(), ServiceError> {
        if viewer.known {
            return Ok(());
        }
        viewer.known = true;
        let (user_id, room_id) = (viewer.user_id.clone(), viewer.room_id.clone());
        let key = keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str());
        let Some(member_id) = self.kv.get(Table::CurrentState, &key).await? else { return Ok(()) };
        let mut member_id = String::from_utf8_lossy(&member_id).into_owned();
        for step in 0..MAX_MEMBERSHIP_WALK {
            let Some(record) = self.event_record(&member_id).await? else { break };
            let shape = EventShape::parse(&record)?;
            let membership = shape.content["membership"].as_str().map(str::to_owned);
            if step == 0 {
                viewer.membership = membership.clone();
            }
            if membership.as_deref() == Some("join") {
                viewer.last_join = record.stream_position;
                viewer.last_join_in_history = history_position(&record)?;
                if step == 0 {
                    viewer.joined_since = record.stream_position;
                }
                break;
            }
            // The member event before this one: the reader's slot in the state it was built on.
            let Some(previous) = self.member_event_before(&shape, &user_id).await? else { break };
            member_id = previous;
        }
        Ok(())
    }

    /// A viewer for a read endpoint: the room exists (else 404) and the reader is joined, has
    /// left or been banned (reading up to then), or the room is world-readable now (else 403).
    pub(crate) async fn reader(&self, user_id: &UserId, room_id: &RoomId) -> Result<Viewer, ServiceError> {
        self.room_version(room_id).await?;
        let viewer = self.viewer(user_id, room_id).await?;
        if self.is_former_or_current_member(&viewer).await? || self.world_readable_now(room_id).await? {
            return Ok(viewer);
        }
        Err(ServiceError::Forbidden(format!("{user_id} may not read room {room_id}")))
    }

    /// Which state `viewer` may read: the current state for members and world-readable rooms,
    /// the state at their leave for former members; `M_FORBIDDEN` for anyone else.
    pub(crate) async fn state_view(&self, viewer: &Viewer) -> Result<StateView, ServiceError> {
        if viewer.membership.as_deref() == Some("join") || self.world_readable_now(&viewer.room_id).await? {
            return Ok(StateView::Current);
        }
        if self.is_former_or_current_member(viewer).await? {
            let key = keys::current_state(viewer.room_id.as_str(), "m.room.member", viewer.user_id.as_str());
            if let Some(member_id) = self.kv.get(Table::CurrentState, &key).await?
                && let Some(record) = self.event_record(&String::from_utf8_lossy(&member_id)).await?
            {
                return Ok(StateView::AtGroup(record.state_group));
            }
        }
        Err(ServiceError::Forbidden(format!("{} may not read the state of {}", viewer.user_id, viewer.room_id)))
    }

    /// Joined now, or joined once and since left or banned — and the room not forgotten, which
    /// asks the server to treat the user as a stranger to it.
    async fn is_former_or_current_member(&self, viewer: &Viewer) -> Result<bool, ServiceError> {
        match viewer.membership.as_deref() {
            Some("join") => Ok(true),
            // A refused invite or a withdrawn knock is a leave too, but never gave any history.
            Some(membership @ ("leave" | "ban")) if viewer.last_join.is_some() => {
                Ok(!self.is_forgotten(&viewer.user_id, &viewer.room_id, membership).await?)
            }
            _ => Ok(false),
        }
    }

    /// Whether the room's current `history_visibility` is `world_readable`.
    async fn world_readable_now(&self, room_id: &RoomId) -> Result<bool, ServiceError> {
        let key = keys::current_state(room_id.as_str(), "m.room.history_visibility", "");
        let Some(id) = self.kv.get(Table::CurrentState, &key).await? else { return Ok(false) };
        let Some(record) = self.event_record(&String::from_utf8_lossy(&id)).await? else { return Ok(false) };
        let shape = EventShape::parse(&record)?;
        Ok(HistoryVisibility::from_setting(shape.content["history_visibility"].as_str())
            == HistoryVisibility::WorldReadable)
    }

    /// Whether `viewer` may see the event `event_id` at stream `position` (from a timeline or
    /// index row). Events the reader has been joined for need no lookup at all.
    pub(crate) async fn may_see_at(
        &self,
        viewer: &mut Viewer,
        event_id: &str,
        position: u64,
    ) -> Result<bool, ServiceError> {
        self.get_to_know(viewer).await?;
        if viewer.joined_since.is_some_and(|since| position >= since) {
            return Ok(true);
        }
        let Some(record) = self.event_record(event_id).await? else { return Ok(false) };
        self.may_see(viewer, event_id, &record).await
    }

    /// Whether `viewer` may see a stored event: accepted, of the viewer's room, and allowed by
    /// the history-visibility rule at the event.
    pub(crate) async fn may_see(
        &self,
        viewer: &mut Viewer,
        event_id: &str,
        record: &EventRecord,
    ) -> Result<bool, ServiceError> {
        // Part of the room's history: arrived live, or backfilled (no stream position).
        if record.history_order().is_none() || record.room_id != viewer.room_id.as_str() {
            return Ok(false);
        }
        self.get_to_know(viewer).await?;
        if viewer.joined_since.is_some_and(|since| record.stream_position.is_some_and(|position| position >= since)) {
            return Ok(true);
        }
        let shape = EventShape::parse(record)?;
        let at = self.facts_at(viewer, record.state_group).await?;
        // An event that changes one of the facts may be seen if the state before it allows.
        let changes_a_fact = shape.state_key.as_deref().is_some_and(|key| {
            shape.kind == "m.room.history_visibility"
                || (shape.kind == "m.room.member" && key == viewer.user_id.as_str())
        });
        let before = match changes_a_fact {
            true => Some(self.facts_before(viewer, &shape).await?),
            false => None,
        };
        let joined_later = match record.stream_position {
            Some(position) => viewer.last_join.is_some_and(|join| join > position),
            None => {
                let at = history_position(record)?;
                viewer.last_join_in_history.is_some_and(|join| Some(join) > at)
            }
        };
        tracing::trace!(event_id, ?at, joined_later, "history visibility check");
        Ok(may_see(&EventFacts { at, before, joined_later }))
    }

    /// [`Rooms::may_see`] for an event known only by ID.
    pub(crate) async fn may_see_id(&self, viewer: &mut Viewer, event_id: &str) -> Result<bool, ServiceError> {
        match self.event_record(event_id).await? {
            Some(record) => self.may_see(viewer, event_id, &record).await,
            None => Ok(false),
        }
    }

    /// `M_NOT_FOUND` unless `user_id` may see `event_id` in `room_id`: for writes that name an
    /// event (receipts, read markers, reports), which must not confirm what the reader may not see.
    pub(crate) async fn require_visible(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        event_id: &str,
    ) -> Result<(), ServiceError> {
        let viewer = &mut self.viewer(user_id, room_id).await?;
        if !self.may_see_id(viewer, event_id).await? {
            return Err(ServiceError::NotFound(format!("no event {event_id} in {room_id}")));
        }
        Ok(())
    }

    /// The setting and the reader's membership in the state of `group`.
    async fn facts_at(&self, viewer: &mut Viewer, group: u64) -> Result<StateFacts, ServiceError> {
        if let Some(facts) = viewer.facts.get(&group) {
            return Ok(facts.clone());
        }
        let slots = [("m.room.history_visibility", ""), ("m.room.member", viewer.user_id.as_str())];
        let found = state_store::lookup(self.kv.as_ref(), group, &slots).await?;
        let content_field = |id: Option<String>, field: &'static str| async move {
            let Some(id) = id else { return Ok::<_, ServiceError>(None) };
            let Some(record) = self.event_record(&id).await? else { return Ok(None) };
            Ok(EventShape::parse(&record)?.content[field].as_str().map(str::to_owned))
        };
        let mut found = found.into_iter();
        let setting = content_field(found.next().flatten(), "history_visibility").await?;
        let membership = content_field(found.next().flatten(), "membership").await?;
        let facts = StateFacts { visibility: HistoryVisibility::from_setting(setting.as_deref()), membership };
        viewer.facts.insert(group, facts.clone());
        Ok(facts)
    }

    /// The facts in the state an event was built on (none for the create event).
    async fn facts_before(&self, viewer: &mut Viewer, shape: &EventShape) -> Result<StateFacts, ServiceError> {
        let Some(prev) = shape.first_prev() else {
            return Ok(StateFacts { visibility: HistoryVisibility::Shared, membership: None });
        };
        match self.event_record(prev).await? {
            Some(record) if record.status != EventStatus::Outlier => self.facts_at(viewer, record.state_group).await,
            // A prev event not stored, or stored without its state: nothing is known before.
            _ => Ok(StateFacts { visibility: HistoryVisibility::Shared, membership: None }),
        }
    }

    /// The membership `user_id` had in the state `member_event_id` was built on (for a leave:
    /// what they left from).
    pub(crate) async fn membership_before(
        &self,
        member_event_id: &str,
        user_id: &UserId,
    ) -> Result<Option<String>, ServiceError> {
        let Some(record) = self.event_record(member_event_id).await? else { return Ok(None) };
        let Some(previous) = self.member_event_before(&EventShape::parse(&record)?, user_id).await? else {
            return Ok(None);
        };
        let Some(previous) = self.event_record(&previous).await? else { return Ok(None) };
        Ok(EventShape::parse(&previous)?.content["membership"].as_str().map(str::to_owned))
    }

    /// The reader's member event in the state `shape` was built on.
    async fn member_event_before(&self, shape: &EventShape, user_id: &UserId) -> Result<Option<String>, ServiceError> {
        let Some(prev) = shape.first_prev() else { return Ok(None) };
        let Some(record) = self.event_record(prev).await? else { return Ok(None) };
        if record.status == EventStatus::Outlier {
            return Ok(None);
        }
        let slots = [("m.room.member", user_id.as_str())];
        Ok(state_store::lookup(self.kv.as_ref(), record.state_group, &slots).await?.pop().flatten())
    }

    pub(crate) async fn event_record(&self, event_id: &str) -> Result<Option<EventRecord>, ServiceError> {
        Ok(lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id)).await?.map(|r| r.value))
    }
}
