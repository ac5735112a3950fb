//! Room state stored as state groups: deltas against a parent, with a full snapshot every
//! `SNAPSHOT_INTERVAL` links, so reading a state touches a bounded number of rows and storage
//! grows with the changes.

use lattice_core::state_resolution::StateMap;
use lattice_storage::records::StateGroupRecord;
use lattice_storage::{KvRead, KvStore, WriteBatch, keys};
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

/// A group known to hold `state`, and the state it holds.
pub(super) struct Base<'a> {
    pub group: u64,
    pub state: &'a StateMap,
}

/// Adds a group holding `state` to `batch`, as a delta against `base` when one is given (and
/// its chain is short enough); returns its ID. Unchanged state reuses the base group.
pub(super) async fn save(
    kv: &dyn KvStore,
    batch: &mut WriteBatch,
    base: Option<Base<'_>>,
    state: &StateMap,
) -> Result<u64, ServiceError> {
    if let Some(base) = &base
        && base.state == state
    {
        return Ok(base.group);
    }
    let parent = match &base {
        Some(base) => {
            let record = lattice_storage::get::<StateGroupRecord>(kv, &keys::state_group(base.group)).await?;
            record
                .map(|r| r.value.chain_length)
                .filter(|length| length + 1 < SNAPSHOT_INTERVAL)
                .map(|length| (base, length))
        }
        None => None,
    };
    let record = match parent {
        Some((base, length)) => {
            StateGroupRecord { parent: Some(base.group), delta: delta(base.state, state), chain_length: length + 1 }
        }
        None => StateGroupRecord { parent: None, delta: delta(&StateMap::new(), state), chain_length: 0 },
    };
    let id = lattice_storage::next_counter(kv, "state_group").await?;
    lattice_storage::put(batch, keys::state_group(id), &record);
    Ok(id)
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
        let kv = MemoryStore::new();
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
            let base = previous.as_ref().map(|(group, state)| Base { group: *group, state });
            let group = save(&kv, &mut batch, base, &state).await.expect("saved");
            kv.write(batch).await.expect("written");
            groups.push((group, state.clone()));
            previous = Some((group, state.clone()));
        }
        for (group, expected) in &groups {
            for user in 0..8 {
                let member = format!("@u{user}:hs");
                let slots = [("m.room.history_visibility", ""), ("m.room.member", member.as_str())];
                let found = lookup(&kv, *group, &slots).await.expect("looked up");
                let want: Vec<Option<String>> = [slot(slots[0].0, slots[0].1), slot(slots[1].0, slots[1].1)]
                    .iter()
                    .map(|s| expected.get(s).map(|id| id.to_string()))
                    .collect();
                assert_eq!(found, want, "group {group}, {member}");
            }
        }
    }
}
