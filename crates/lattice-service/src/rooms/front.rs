//! The front of a room: its forward extremities (events nothing cites yet) and its current
//! state, the resolution of the states at those extremities. Moved by every live event that
//! ingest accepts; a wide front is merged back by events that cite many extremities.

use std::collections::HashMap;

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_storage::records::{EventRecord, MemberCounts, RoomRecord};
use lattice_storage::{Table, WriteBatch, keys};
use ruma::events::StateEventType;
use ruma::state_res::Event;
use ruma::{OwnedEventId, OwnedRoomId};

use super::Rooms;
use super::ingest::{Loaded, Prevs, membership_of};
use super::state_store::{self, SlotChange, StateRef};
use crate::ServiceError;

/// Forward extremities above which the room is merged by dummy events (see `merge.rs`).
pub(crate) const MERGE_THRESHOLD: usize = 10;

/// Memberships that changed in the current state: (before, after), absent as `None`.
type MemberChanges = Vec<(Option<String>, Option<String>)>;

/// The room's front after a live event.
pub(super) struct Front {
    pub current_state_group: u64,
    pub extremities: Vec<String>,
    pub extremity_groups: Vec<(u64, u32)>,
    pub member_changes: MemberChanges,
}

impl Rooms {
    /// Moves the forward extremities past `event` and the current state to the resolution of
    /// the states at the extremities, writing the changed current-state slots and memberships.
    /// When every extremity has one state (a linear room, or a wide front of messages), nothing
    /// is resolved and only the event's own slot can change.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn advance_front(
        &self,
        version: &RoomVersion,
        room_id: &OwnedRoomId,
        event: &Pdu,
        prevs: &Prevs,
        (before, after): (&StateRef, Option<&StateRef>),
        room: Option<&RoomRecord>,
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<Front, ServiceError> {
        let event_state = after.unwrap_or(before);
        let mut groups = match room {
            Some(room) => match &room.extremity_groups {
                Some(groups) => groups.clone(),
                None => self.count_extremity_groups(&room.forward_extremities).await?,
            },
            None => Vec::new(),
        };
        let cited: HashMap<&str, u64> = prevs.placed.iter().map(|(id, group)| (id.as_str(), *group)).collect();
        let mut extremities = Vec::new();
        for id in room.map(|room| room.forward_extremities.as_slice()).unwrap_or_default() {
            match cited.get(id.as_str()) {
                Some(group) => count(&mut groups, *group, false),
                None => extremities.push(id.clone()),
            }
        }
        extremities.push(event.id().to_string());
        count(&mut groups, event_state.group(), true);

        let new_current = match groups.as_slice() {
            [(group, _)] if *group == event_state.group() => event_state.clone(),
            [(group, _)] => StateRef::Stored(*group),
            _ => self.resolve_front(version, &groups, event_state, loaded, batch).await?,
        };
        let changes = match room {
            None => new_current
                .full(self.kv.as_ref())
                .await?
                .into_iter()
                .map(|(slot, id)| SlotChange { slot, old: None, new: Some(id) })
                .collect(),
            Some(room) => {
                let old = StateRef::Current { group: room.current_state_group, room_id: room_id.to_string() };
                // The event's own slot is the only change when it extends the current state.
                let extended = match (after, event.state_key()) {
                    (Some(after), Some(key))
                        if new_current.group() == after.group() && before.group() == old.group() =>
                    {
                        Some((StateEventType::from(event.kind().to_string()), key.to_owned()))
                    }
                    _ => None,
                };
                let event_id = event.id().to_owned();
                state_store::changes(
                    self.kv.as_ref(),
                    &old,
                    &new_current,
                    extended.as_ref().map(|slot| (slot, &event_id)),
                )
                .await?
            }
        };
        let member_changes = self.write_current_state(version, room_id, &changes, loaded, batch).await?;
        Ok(Front { current_state_group: new_current.group(), extremities, extremity_groups: groups, member_changes })
    }

    /// The resolution of the distinct states at the extremities, saved as a new group.
    async fn resolve_front(
        &self,
        version: &RoomVersion,
        groups: &[(u64, u32)],
        event_state: &StateRef,
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<StateRef, ServiceError> {
        let event_full = event_state.full(self.kv.as_ref()).await?;
        let mut states = vec![event_full.clone()];
        for (group, _) in groups.iter().filter(|(group, _)| *group != event_state.group()) {
            states.push(state_store::load(self.kv.as_ref(), *group).await?);
        }
        let resolved = self.resolve(version, &states, loaded).await?;
        state_store::save_fresh(
            self.kv.as_ref(),
            &self.state_group_ids,
            batch,
            Some((event_state, &event_full)),
            resolved,
        )
        .await
    }

    /// How many extremities are at each state group, read from the events (rooms stored before
    /// the room record kept the count).
    async fn count_extremity_groups(&self, extremities: &[String]) -> Result<Vec<(u64, u32)>, ServiceError> {
        let mut groups = Vec::new();
        for id in extremities {
            let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(id))
                .await?
                .ok_or_else(|| ServiceError::Internal(format!("forward extremity {id} is not stored")))?;
            count(&mut groups, record.value.state_group, true);
        }
        Ok(groups)
    }

    /// Writes the changed slots of the current state, and the membership index with them.
    async fn write_current_state(
        &self,
        version: &RoomVersion,
        room_id: &OwnedRoomId,
        changes: &[SlotChange],
        loaded: &mut Loaded,
        batch: &mut WriteBatch,
    ) -> Result<MemberChanges, ServiceError> {
        let mut member_changes = MemberChanges::new();
        for SlotChange { slot: (kind, key), old, new } in changes {
            let row = keys::current_state(room_id.as_str(), &kind.to_string(), key);
            match new {
                Some(id) => batch.put(Table::CurrentState, row, id.as_str().as_bytes().to_vec()),
                None => batch.delete(Table::CurrentState, row),
            }
            if *kind != StateEventType::RoomMember {
                continue;
            }
            let before = self.membership_in(version, old.as_ref(), loaded).await?;
            let after = self.membership_in(version, new.as_ref(), loaded).await?;
            let index = keys::membership(key, room_id.as_str());
            // The room's own membership ends one that came from outside it (an invite from
            // another server before this one was in the room).
            batch.delete(Table::OutOfBandMemberships, index.clone());
            match &after {
                Some(membership) => batch.put(Table::Memberships, index, membership.clone().into_bytes()),
                None => batch.delete(Table::Memberships, index),
            }
            member_changes.push((before, after));
        }
        Ok(member_changes)
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
        Ok(loaded.get(id).map(std::sync::Arc::as_ref).map(membership_of))
    }
}

/// Adds one extremity at `group` to the sorted counts, or takes one away.
pub(super) fn count(groups: &mut Vec<(u64, u32)>, group: u64, add: bool) {
    match groups.binary_search_by_key(&group, |(g, _)| *g) {
        Ok(index) if add => groups[index].1 += 1,
        Ok(index) => {
            groups[index].1 = groups[index].1.saturating_sub(1);
            if groups[index].1 == 0 {
                groups.remove(index);
            }
        }
        Err(index) if add => groups.insert(index, (group, 1)),
        Err(_) => {}
    }
}

/// The room record after a live event at `position`; `front` is `None` for an event that
/// filled a gap (it is older than the front, which stays where it is).
/// A room new to this server starts with `create_event_id` (the event itself when it is the
/// create event).
pub(super) fn updated_room(
    version: &RoomVersion,
    event: &Pdu,
    room: Option<&RoomRecord>,
    create_event_id: Option<String>,
    front: Option<Front>,
    position: u64,
) -> RoomRecord {
    let mut record = room.cloned().unwrap_or_else(|| RoomRecord {
        room_version: version.id().to_string(),
        create_event_id: create_event_id.unwrap_or_else(|| event.id().to_string()),
        current_state_group: 0,
        forward_extremities: Vec::new(),
        last_stream_position: 0,
        member_counts: Some(MemberCounts::default()),
        extremity_groups: Some(Vec::new()),
    });
    record.last_stream_position = position;
    if let Some(front) = front {
        record.current_state_group = front.current_state_group;
        record.forward_extremities = front.extremities;
        record.extremity_groups = Some(front.extremity_groups);
        record.member_counts = record.member_counts.map(|counts| {
            front.member_changes.iter().fold(counts, |counts, (old, new)| counts.moved(old.as_deref(), new.as_deref()))
        });
    }
    record
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn extremity_counts_stay_sorted_and_drop_empty_groups() {
        let mut groups = Vec::new();
        for group in [5, 3, 5, 9] {
            count(&mut groups, group, true);
        }
        assert_eq!(groups, vec![(3, 1), (5, 2), (9, 1)]);
        count(&mut groups, 3, false);
        count(&mut groups, 5, false);
        count(&mut groups, 7, false);
        assert_eq!(groups, vec![(5, 1), (9, 1)]);
    }
}
