//! Room state stored as state groups: deltas against a parent, with a full snapshot every
//! `SNAPSHOT_INTERVAL` links, so reading a state touches a bounded number of rows and storage
//! grows with the changes.

use lattice_core::state_resolution::StateMap;
use lattice_storage::records::StateGroupRecord;
use lattice_storage::{KvRead, KvStore, StreamPositions, WriteBatch, keys};
use ruma::OwnedEventId;
use ruma::events::StateEventType;

use crate::ServiceError;

/// Longest delta chain before a full snapshot is written.
const SNAPSHOT_INTERVAL: u32 = 64;

/// The full state of `group`.
pub(super) async fn load(kv: &dyn KvRead, group: u64) -> Result<StateMap, ServiceError> {
    let mut chain = Vec::new();
    let mut next = Some(group);
    while let Some(id) = next {
        let record = lattice_storage::get::<StateGroupRecord>(kv, &keys::state_group(id))
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("state group {id} is missing")))?
            .value;
        if chain.len() > SNAPSHOT_INTERVAL as usize {
            return Err(ServiceError::Internal(format!("state group {group} has an over-long delta chain")));
        }
        next = record.parent;
        chain.push(record);
    }
    let mut state = StateMap::new();
    for record in chain.into_iter().rev() {
        for (kind, key, event_id) in record.delta {
            let slot = (StateEventType::from(kind), key);
            if event_id.is_empty() {
                state.remove(&slot);
            } else {
                let id = OwnedEventId::try_from(event_id).map_err(|e| ServiceError::Internal(e.to_string()))?;
                state.insert(slot, id);
            }
        }
    }
    Ok(state)
}

/// The changes from `from` to `to`, in a stable order.
fn delta(from: &StateMap, to: &StateMap) -> Vec<(String, String, String)> {
    let mut changes: Vec<(String, String, String)> = to
        .iter()
        .filter(|(slot, id)| from.get(*slot) != Some(*id))
        .map(|((kind, key), id)| (kind.to_string(), key.clone(), id.to_string()))
        .collect();
    changes.extend(
        from.keys()
            .filter(|slot| !to.contains_key(*slot))
            .map(|(kind, key)| (kind.to_string(), key.clone(), String::new())),
    );
    changes.sort();
    changes
}

/// The event IDs holding `slots` (`(type, state_key)`) in the state of `group`, read from the
/// group's delta chain and stopping as soon as every slot is decided — usually after the first
/// few links, without loading the whole state.
pub(super) async fn lookup(
    kv: &dyn KvRead,
    group: u64,
    slots: &[(&str, &str)],
) -> Result<Vec<Option<String>>, ServiceError> {
    // `None`: not decided yet; `Some(None)`: decided absent (removed, or not in the snapshot).
    let mut decided: Vec<Option<Option<String>>> = vec![None; slots.len()];
    let mut next = Some(group);
    let mut links = 0;
    while let Some(id) = next {
        if decided.iter().all(Option::is_some) {
            break;
        }
        if links > SNAPSHOT_INTERVAL {
            return Err(ServiceError::Internal(format!("state group {group} has an over-long delta chain")));
        }
        let record = lattice_storage::get::<StateGroupRecord>(kv, &keys::state_group(id))
            .await?
            .ok_or_else(|| ServiceError::Internal(format!("state group {id} is missing")))?
            .value;
        for (slot, decision) in slots.iter().zip(decided.iter_mut()) {
            if decision.is_some() {
                continue;
            }
            // A delta is sorted and holds each slot at most once.
            let found = record.delta.binary_search_by(|(kind, key, _)| (kind.as_str(), key.as_str()).cmp(slot));
            if let Ok(index) = found {
                let event_id = &record.delta[index].2;
                *decision = Some((!event_id.is_empty()).then(|| event_id.clone()));
            }
        }
        next = record.parent;
        links += 1;
    }
    Ok(decided.into_iter().map(Option::flatten).collect())
}

/// A state the ingest path works with: one already stored (read slot by slot, never whole unless
/// it must be), or one just computed — resolved at a fork or supplied by the caller at a gap —
/// whose group is written in the same batch and so cannot be read back from the store yet.
#[derive(Clone)]
pub(super) enum StateRef {
    Stored(u64),
    /// The room's current state, stored as `group`: its slots are read from the room's
    /// `current_state` rows, one point read each, however big the state is.
    Current {
        group: u64,
        room_id: String,
    },
    Fresh {
        group: u64,
        state: StateMap,
        chain_length: u32,
    },
    /// `parent` with one slot set, written in this batch as a one-entry delta.
    Extended {
        group: u64,
        parent: Box<StateRef>,
        slot: (StateEventType, String),
        event_id: OwnedEventId,
        chain_length: u32,
    },
}

impl StateRef {
    pub(super) fn group(&self) -> u64 {
        match self {
            StateRef::Stored(group)
            | StateRef::Current { group, .. }
            | StateRef::Fresh { group, .. }
            | StateRef::Extended { group, .. } => *group,
        }
    }

    /// The event IDs holding `slots`, without loading the whole state of a stored group.
    pub(super) async fn slots(
        &self,
        kv: &dyn KvRead,
        slots: &[(StateEventType, String)],
    ) -> Result<Vec<Option<OwnedEventId>>, ServiceError> {
        match self {
            StateRef::Fresh { state, .. } => Ok(slots.iter().map(|slot| state.get(slot).cloned()).collect()),
            StateRef::Current { room_id, .. } => {
                let mut found = Vec::with_capacity(slots.len());
                for (kind, key) in slots {
                    let row = keys::current_state(room_id, &kind.to_string(), key);
                    found.push(match kv.get(lattice_storage::Table::CurrentState, &row).await? {
                        Some(id) => Some(
                            OwnedEventId::try_from(String::from_utf8_lossy(&id).into_owned())
                                .map_err(|e| ServiceError::Internal(e.to_string()))?,
                        ),
                        None => None,
                    });
                }
                Ok(found)
            }
            StateRef::Extended { parent, slot, event_id, .. } => {
                let mut found = Box::pin(parent.slots(kv, slots)).await?;
                for (wanted, found) in slots.iter().zip(found.iter_mut()) {
                    if wanted == slot {
                        *found = Some(event_id.clone());
                    }
                }
                Ok(found)
            }
            StateRef::Stored(group) => {
                let names: Vec<String> = slots.iter().map(|(kind, _)| kind.to_string()).collect();
                let wanted: Vec<(&str, &str)> =
                    names.iter().zip(slots).map(|(kind, (_, key))| (kind.as_str(), key.as_str())).collect();
                lookup(kv, *group, &wanted)
                    .await?
                    .into_iter()
                    .map(|found| {
                        found
                            .map(|id| OwnedEventId::try_from(id).map_err(|e| ServiceError::Internal(e.to_string())))
                            .transpose()
                    })
                    .collect()
            }
        }
    }

    /// The whole state (a fork or a gap needs it; a linear history never does).
    pub(super) async fn full(&self, kv: &dyn KvRead) -> Result<StateMap, ServiceError> {
        match self {
            StateRef::Stored(group) | StateRef::Current { group, .. } => load(kv, *group).await,
            StateRef::Fresh { state, .. } => Ok(state.clone()),
            StateRef::Extended { parent, slot, event_id, .. } => {
                let mut state = Box::pin(parent.full(kv)).await?;
                state.insert(slot.clone(), event_id.clone());
                Ok(state)
            }
        }
    }

    async fn chain_length(&self, kv: &dyn KvRead) -> Result<u32, ServiceError> {
        match self {
            StateRef::Fresh { chain_length, .. } | StateRef::Extended { chain_length, .. } => Ok(*chain_length),
            StateRef::Stored(group) | StateRef::Current { group, .. } => {
                Ok(lattice_storage::get::<StateGroupRecord>(kv, &keys::state_group(*group))
                    .await?
                    .ok_or_else(|| ServiceError::Internal(format!("state group {group} is missing")))?
                    .value
                    .chain_length)
            }
        }
    }
}

/// A new state group ID from the allocator's reserved block: no write of its own (a block of
/// IDs is reserved with one synced write), so the group is written only in the event's batch.
/// IDs need no order, so it is released at once.
async fn new_group_id(ids: &StreamPositions) -> Result<u64, ServiceError> {
    let id = ids.take().await?;
    let value = id.get();
    id.published().await;
    Ok(value)
}

/// Adds to `batch` a group holding the state of `parent` with one slot set to `event_id`, and
/// returns it: one row read and one written, whatever the size of the state — except every
/// `SNAPSHOT_INTERVAL` links, when the chain is cut with a full snapshot.
pub(super) async fn extend(
    kv: &dyn KvStore,
    ids: &StreamPositions,
    batch: &mut WriteBatch,
    parent: &StateRef,
    slot: &(StateEventType, String),
    event_id: &OwnedEventId,
) -> Result<StateRef, ServiceError> {
    let length = parent.chain_length(kv).await?;
    if length + 1 >= SNAPSHOT_INTERVAL {
        let mut state = parent.full(kv).await?;
        state.insert(slot.clone(), event_id.clone());
        return save_fresh(kv, ids, batch, None, state).await;
    }
    let change = (slot.0.to_string(), slot.1.clone(), event_id.to_string());
    let record = StateGroupRecord { parent: Some(parent.group()), delta: vec![change], chain_length: length + 1 };
    let group = new_group_id(ids).await?;
    lattice_storage::put(batch, keys::state_group(group), &record);
    Ok(StateRef::Extended {
        group,
        parent: Box::new(parent.clone()),
        slot: slot.clone(),
        event_id: event_id.clone(),
        chain_length: length + 1,
    })
}

/// Adds `state` to `batch` as a new group (a delta against `base` when given and its chain is
/// short enough) and returns it as a [`StateRef::Fresh`], readable before the batch is written.
pub(super) async fn save_fresh(
    kv: &dyn KvStore,
    ids: &StreamPositions,
    batch: &mut WriteBatch,
    base: Option<(&StateRef, &StateMap)>,
    state: StateMap,
) -> Result<StateRef, ServiceError> {
    if let Some((base, base_state)) = base
        && *base_state == state
    {
        return Ok(base.clone());
    }
    let parent = match base {
        Some((base, base_state)) => {
            let length = base.chain_length(kv).await? + 1;
            (length < SNAPSHOT_INTERVAL).then_some((base.group(), base_state, length))
        }
        None => None,
    };
    let (record, chain_length) = match parent {
        Some((group, base_state, length)) => {
            (StateGroupRecord { parent: Some(group), delta: delta(base_state, &state), chain_length: length }, length)
        }
        None => (StateGroupRecord { parent: None, delta: delta(&StateMap::new(), &state), chain_length: 0 }, 0),
    };
    let group = new_group_id(ids).await?;
    lattice_storage::put(batch, keys::state_group(group), &record);
    Ok(StateRef::Fresh { group, state, chain_length })
}

/// The slots whose event differs between two states, with the event before and after (either
/// absent). Reads only the changed slots when `new` is `old` extended by `extended` (the common
/// case of a state event on top of the current state); compares whole states otherwise.
pub(super) async fn changes(
    kv: &dyn KvRead,
    old: &StateRef,
    new: &StateRef,
    extended: Option<(&(StateEventType, String), &OwnedEventId)>,
) -> Result<Vec<SlotChange>, ServiceError> {
    if old.group() == new.group() {
        return Ok(Vec::new());
    }
    if let Some((slot, id)) = extended {
        let before = old.slots(kv, std::slice::from_ref(slot)).await?.pop().flatten();
        return Ok(vec![SlotChange { slot: slot.clone(), old: before, new: Some(id.clone()) }]);
    }
    let (old, new) = (old.full(kv).await?, new.full(kv).await?);
    let mut changes: Vec<SlotChange> = new
        .iter()
        .filter(|(slot, id)| old.get(*slot) != Some(*id))
        .map(|(slot, id)| SlotChange { slot: slot.clone(), old: old.get(slot).cloned(), new: Some(id.clone()) })
        .collect();
    changes.extend(old.iter().filter(|(slot, _)| !new.contains_key(*slot)).map(|(slot, id)| SlotChange {
        slot: slot.clone(),
        old: Some(id.clone()),
        new: None,
    }));
    Ok(changes)
}

/// One slot of the current state that changes.
pub(super) struct SlotChange {
    pub slot: (StateEventType, String),
    pub old: Option<OwnedEventId>,
    pub new: Option<OwnedEventId>,
}

#[cfg(test)]
mod tests {
    use lattice_storage::MemoryStore;

    use super::*;

    fn slot(kind: &str, key: &str) -> (StateEventType, String) {
        (StateEventType::from(kind), key.to_owned())
    }

    fn id(n: usize) -> OwnedEventId {
        OwnedEventId::try_from(format!("$e{n}")).expect("valid event ID")
    }

    /// A chain longer than a snapshot interval, where members come, change and go and the
    /// setting changes now and then: a lookup agrees with the full state at every group.
    #[tokio::test]
    async fn a_lookup_agrees_with_the_full_state_along_a_long_chain() {
        let kv = std::sync::Arc::new(MemoryStore::new());
        let ids = StreamPositions::new(kv.clone(), "state_group");
        let mut state = StateMap::new();
        let mut previous: Option<(u64, StateMap)> = None;
        let mut groups = Vec::new();
        for step in 0..150usize {
            match step % 5 {
                0 => state.insert(slot("m.room.history_visibility", ""), id(step)),
                4 => state.remove(&slot("m.room.member", &format!("@u{}:hs", step % 7))),
                _ => state.insert(slot("m.room.member", &format!("@u{}:hs", step % 7)), id(step)),
            };
            let mut batch = WriteBatch::new();
            let base = previous.as_ref().map(|(group, state)| (StateRef::Stored(*group), state));
            let saved = save_fresh(
                kv.as_ref(),
                &ids,
                &mut batch,
                base.as_ref().map(|(group, state)| (group, *state)),
                state.clone(),
            );
            let group = saved.await.expect("saved").group();
            kv.write(batch).await.expect("written");
            groups.push((group, state.clone()));
            previous = Some((group, state.clone()));
        }
        for (group, expected) in &groups {
            for user in 0..8 {
                let member = format!("@u{user}:hs");
                let slots = [("m.room.history_visibility", ""), ("m.room.member", member.as_str())];
                let found = lookup(kv.as_ref(), *group, &slots).await.expect("looked up");
                let want: Vec<Option<String>> = [slot(slots[0].0, slots[0].1), slot(slots[1].0, slots[1].1)]
                    .iter()
                    .map(|s| expected.get(s).map(|id| id.to_string()))
                    .collect();
                assert_eq!(found, want, "group {group}, {member}");
            }
        }
    }
}
