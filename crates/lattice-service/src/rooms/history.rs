//! Reading a room's past: the events and state around one event (`/context`) and the members
//! as of an earlier stream position (`/members?at=`). Both read the state stored per event
//! (`EventRecord::state_group`), so nothing is recomputed.

use std::collections::HashSet;

use lattice_storage::records::EventRecord;
use lattice_storage::{Direction, keys};
use ruma::events::StateEventType;
use ruma::{RoomId, UserId};
use serde_json::{Value, json};

use super::Rooms;
use super::filter::EventFilter;
use super::messages::MAX_TIMELINE_LIMIT;
use super::state_store;
use super::topological::{HistoryToken, TopoPos, history_position};
use super::visibility::Viewer;
use crate::ServiceError;

/// Context events `/context` returns when the client does not say.
pub const DEFAULT_CONTEXT_LIMIT: usize = 10;
/// Timeline rows one side of a context may step over looking for events its filter lets through.
const MAX_CONTEXT_SCAN_ROWS: usize = 1_000;
/// Rows read per step when a filter may skip some.
const MIN_SCAN_CHUNK: usize = 20;

/// Events read from one side of an event, and how far the read went.
struct Side {
    events: Vec<Value>,
    /// The history position of the last row looked at, matching or not.
    last_examined: Option<TopoPos>,
    /// The ID of the last event kept (the one furthest from the starting point).
    last_kept: Option<String>,
}

/// What [`Rooms::context_sides`] found.
#[derive(Default)]
pub(super) struct ContextSides {
    pub before: Vec<Value>,
    pub after: Vec<Value>,
    pub start: String,
    pub end: String,
}

impl Rooms {
    /// `GET /rooms/{roomId}/context/{eventId}`: up to `limit` events around the event in the
    /// room's topological order (half before, newest first; the rest after, oldest first), tokens that continue with
    /// `/messages` in both directions, and the state at the last event returned. Members only;
    /// an unknown event, one of another room, or a rejected or soft-failed one is `M_NOT_FOUND`.
    pub async fn event_context(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        event_id: &str,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Value, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        let not_found = || ServiceError::NotFound(format!("no event {event_id} in {room_id}"));
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id))
            .await?
            .ok_or_else(not_found)?
            .value;
        // Rejected and soft-failed events, those of other rooms and those the reader may not see
        // are all equally unknown.
        if !self.may_see(viewer, event_id, &record).await? {
            return Err(not_found());
        }
        let position = history_position(&record)?.ok_or_else(not_found)?;
        let limit = limit.min(MAX_TIMELINE_LIMIT);
        let before_limit = limit / 2;
        let before = (None, Some(position.before()));
        let before = self.filtered_timeline(viewer, before, Direction::Backward, before_limit, filter).await?;
        let after = (Some(position), None);
        let after = self.filtered_timeline(viewer, after, Direction::Forward, limit - before_limit, filter).await?;

        // Tokens name the last position a client has seen: `/messages` backward from `start`
        // holds positions ≤ start, forward from `end` positions > end.
        let start = before.last_examined.unwrap_or(position).before();
        let end = after.last_examined.unwrap_or(position);
        let state_group = match &after.last_kept {
            Some(last) => {
                lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(last))
                    .await?
                    .ok_or_else(|| ServiceError::Internal(format!("timeline event {last} is not stored")))?
                    .value
                    .state_group
            }
            None => record.state_group,
        };
        let event = self.timeline_event(viewer, event_id).await?;
        // Lazy loading: only the members who sent the returned events.
        let senders: HashSet<&str> =
            before.events.iter().chain(&after.events).chain([&event]).filter_map(|e| e["sender"].as_str()).collect();
        let mut state = Vec::new();
        for ((kind, key), id) in state_store::load(self.kv.as_ref(), state_group).await? {
            if filter.lazy_load_members && kind == StateEventType::RoomMember && !senders.contains(key.as_str()) {
                continue;
            }
            let state_event = self.client_event(id.as_str()).await?;
            if filter.allows(&state_event) {
                state.push(state_event);
            }
        }
        Ok(json!({
            "event": event,
            "events_before": before.events,
            "events_after": after.events,
            "start": start.render(),
            "end": end.render(),
            "state": state,
        }))
    }

    /// The events around a stored event that `viewer` may see: up to `before` of them before it
    /// (newest first) and `after` after it (oldest first), with the `/messages` tokens that
    /// continue from either end (search results' `context`).
    pub(super) async fn context_sides(
        &self,
        viewer: &mut Viewer,
        record: &EventRecord,
        before: usize,
        after: usize,
    ) -> Result<ContextSides, ServiceError> {
        let Some(position) = history_position(record)? else {
            return Ok(ContextSides::default());
        };
        let all = EventFilter::default();
        let earlier =
            self.filtered_timeline(viewer, (None, Some(position.before())), Direction::Backward, before, &all);
        let earlier = earlier.await?;
        let later = self.filtered_timeline(viewer, (Some(position), None), Direction::Forward, after, &all).await?;
        Ok(ContextSides {
            start: earlier.last_examined.unwrap_or(position).before().render(),
            end: later.last_examined.unwrap_or(position).render(),
            before: earlier.events,
            after: later.events,
        })
    }

    /// Up to `limit` events of the history in `(after, upto]` in `direction` that `filter` lets
    /// through and the viewer may see, stepping over at most `MAX_CONTEXT_SCAN_ROWS` rows.
    async fn filtered_timeline(
        &self,
        viewer: &mut Viewer,
        (mut after, mut upto): (Option<TopoPos>, Option<TopoPos>),
        direction: Direction,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Side, ServiceError> {
        let mut side = Side { events: Vec::new(), last_examined: None, last_kept: None };
        let mut examined = 0;
        let room_id = viewer.room_id.clone();
        while side.events.len() < limit && examined < MAX_CONTEXT_SCAN_ROWS {
            let chunk = (limit - side.events.len()).max(MIN_SCAN_CHUNK).min(MAX_CONTEXT_SCAN_ROWS - examined);
            let rows = self.history_rows(&room_id, (after, upto), direction, chunk).await?;
            let exhausted = rows.len() < chunk;
            for (position, event_id) in rows {
                examined += 1;
                side.last_examined = Some(position);
                let Some(event) = self.history_event(viewer, &event_id).await? else { continue };
                if filter.allows(&event) {
                    side.events.push(event);
                    side.last_kept = Some(event_id);
                    if side.events.len() == limit {
                        break;
                    }
                }
            }
            let Some(last) = side.last_examined else { break };
            if exhausted {
                break;
            }
            match direction {
                Direction::Forward => after = Some(last),
                Direction::Backward => upto = Some(last.before()),
            }
        }
        Ok(side)
    }

    /// `GET /rooms/{roomId}/members?at=`: the member events of the state after the room's last
    /// event at or before the token `at` in its history (none before the room existed).
    pub async fn members_at(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        at: HistoryToken,
        membership: Option<&str>,
        not_membership: Option<&str>,
    ) -> Result<Vec<Value>, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        let at = self.history_point(room_id, at).await?;
        let rows = self.history_rows(room_id, (None, Some(at)), Direction::Backward, 1).await?;
        let Some((_, event_id)) = rows.first() else { return Ok(Vec::new()) };
        // The members at a point in history are as private as the history there.
        if !self.may_see_in_history(viewer, event_id).await? {
            return Err(ServiceError::Forbidden(format!("{user_id} may not read {room_id} at {}", at.render())));
        }
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id))
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("timeline event {event_id} is not stored")))?;
        let state = state_store::load(self.kv.as_ref(), record.value.state_group).await?;
        let mut member_ids: Vec<(&str, &str)> = state
            .iter()
            .filter(|((kind, _), _)| *kind == StateEventType::RoomMember)
            .map(|((_, user), id)| (user.as_str(), id.as_str()))
            .collect();
        // The current-state listing is ordered by user; keep the same order here.
        member_ids.sort_unstable();
        let mut members = Vec::with_capacity(member_ids.len());
        for (_, id) in member_ids {
            let event = self.client_event(id).await?;
            let current = event["content"]["membership"].as_str().unwrap_or_default();
            if membership.is_some_and(|m| m != current) || not_membership.is_some_and(|m| m == current) {
                continue;
            }
            members.push(event);
        }
        Ok(members)
    }
}

#[cfg(test)]
mod tests {
    use lattice_core::room_builder::RoomBuilder;
    use lattice_storage::{KeyRange, Table};

    use super::*;
    use crate::rooms::Outcome;

    const ALICE: &str = "@alice:hs.test";
    const BOB: &str = "@bob:hs.test";

    #[tokio::test]
    async fn rejected_events_have_no_context_and_no_timestamp_row() {
        let (service, _) = crate::rooms::tests::service();
        let mut room = RoomBuilder::new("10");
        let create = room.create(ALICE);
        let alice =
            room.event(ALICE, "m.room.member", Some(ALICE), json!({ "membership": "join" }), &[&create], &[&create]);
        let power = room.event(
            ALICE,
            "m.room.power_levels",
            Some(""),
            json!({ "users": { ALICE: 100 } }),
            &[&alice],
            &[&create, &alice],
        );
        // bob never joined: his message is rejected.
        let intruder = room.event(BOB, "m.room.message", None, json!({ "body": "hi" }), &[&power], &[&create, &power]);
        let mut outcomes = Vec::new();
        for id in [&create, &alice, &power, &intruder] {
            outcomes.push(service.rooms().ingest(room.version(), room.get(id).unwrap().clone()).await.unwrap().outcome);
        }
        assert!(matches!(outcomes[3], Outcome::Rejected(_)), "{outcomes:?}");

        let (alice_id, room_id) = (UserId::parse(ALICE).unwrap(), RoomId::parse("!room:hs.test").unwrap());
        let all = EventFilter::default();
        let refused = service.rooms().event_context(&alice_id, &room_id, intruder.as_str(), 10, &all).await;
        assert!(matches!(refused, Err(ServiceError::NotFound(_))), "{refused:?}");
        let context = service.rooms().event_context(&alice_id, &room_id, power.as_str(), 10, &all).await.unwrap();
        let ids = |events: &Value| -> Vec<String> {
            events.as_array().unwrap().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect()
        };
        assert_eq!(ids(&context["events_before"]), [alice.to_string(), create.to_string()]);
        assert!(ids(&context["events_after"]).is_empty());
        assert_eq!(context["state"].as_array().unwrap().len(), 3);

        let prefix = keys::room_rows(room_id.as_str());
        let indexed = service
            .rooms()
            .kv
            .scan(Table::EventTimestamps, &KeyRange::prefix(&prefix), Direction::Forward, 10)
            .await
            .unwrap();
        let indexed: Vec<String> = indexed.into_iter().map(|(_, id)| String::from_utf8(id).unwrap()).collect();
        assert_eq!(indexed, [&create, &alice, &power].map(|id| id.to_string()));
    }
}
