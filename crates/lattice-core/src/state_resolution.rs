//! State resolution: v1 (room version 1) written here from the spec, v2 (room versions 2–11)
//! and v2.1 (room version 12) through ruma.

use std::collections::{HashMap, HashSet};

use ruma::events::StateEventType;
use ruma::room_version_rules::StateResolutionVersion;
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::{EventId, OwnedEventId};

use crate::event::Pdu;
use crate::limits::MAX_AUTH_CHAIN_EVENTS;
use crate::room_version::RoomVersion;

/// Room state: which event holds each (type, state key).
pub type StateMap = HashMap<(StateEventType, String), OwnedEventId>;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateResolutionError {
    #[error("event {0} is needed but not known")]
    MissingEvent(OwnedEventId),
    #[error("an auth chain has more than {MAX_AUTH_CHAIN_EVENTS} events")]
    AuthChainTooLong,
    #[error("state resolution failed: {0}")]
    Failed(String),
}

/// Resolves several states of one room (the states at the tips of a fork) into one.
pub fn resolve<'a>(
    version: &RoomVersion,
    state_sets: &[StateMap],
    fetch: impl Fn(&EventId) -> Option<&'a Pdu>,
) -> Result<StateMap, StateResolutionError> {
    let mut auth_chains = Vec::with_capacity(state_sets.len());
    if matches!(version.rules().state_res, StateResolutionVersion::V2(_)) {
        for state in state_sets {
            auth_chains.push(auth_chain(state.values().map(|id| id.as_ref()), &fetch)?);
        }
    }
    resolve_with_auth_chains(version, state_sets, auth_chains, fetch)
}

/// [`resolve`] with the auth chain of each state set already known (from an index), so no
/// graph walk is needed. `auth_chains[i]` is the union of the auth chains of `state_sets[i]`'s
/// events; `fetch` must still know every event in those chains.
pub fn resolve_with_auth_chains<'a>(
    version: &RoomVersion,
    state_sets: &[StateMap],
    auth_chains: Vec<HashSet<OwnedEventId>>,
    fetch: impl Fn(&EventId) -> Option<&'a Pdu>,
) -> Result<StateMap, StateResolutionError> {
    let StateResolutionVersion::V2(v2_rules) = version.rules().state_res else {
        return resolve_v1(version, state_sets, &fetch);
    };
    let auth_chains =
        auth_chains.into_iter().map(|chain| chain.into_iter().collect::<EventIdSet<OwnedEventId>>()).collect();
    let subgraph = |conflicted: &ruma::state_res::StateMap<Vec<OwnedEventId>>| {
        conflicted_subgraph(conflicted.values().flatten(), &fetch).ok().map(|ids| ids.into_iter().collect())
    };
    ruma::state_res::resolve(&version.rules().authorization, &v2_rules, state_sets, auth_chains, &fetch, subgraph)
        .map_err(|e| StateResolutionError::Failed(e.to_string()))
}

/// The room version 1 algorithm (spec: rooms/v1, "State resolution"). Keys with one value across
/// the states are kept. Conflicted power levels, then join rules, then each member key are
/// resolved by walking their events from the lowest depth (ties: highest SHA-1 of the ID) and
/// taking each next event while it passes auth against the state so far. Any other conflicted
/// key takes the deepest event (ties: lowest SHA-1) that passes auth.
fn resolve_v1<'a>(
    version: &RoomVersion,
    state_sets: &[StateMap],
    fetch: &impl Fn(&EventId) -> Option<&'a Pdu>,
) -> Result<StateMap, StateResolutionError> {
    let mut values: HashMap<(StateEventType, String), Vec<OwnedEventId>> = HashMap::new();
    for state in state_sets {
        for (slot, id) in state {
            let ids = values.entry(slot.clone()).or_default();
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
    }
    let (mut resolved, mut conflicted) = (StateMap::new(), Vec::new());
    for (slot, mut ids) in values {
        if ids.len() == 1 {
            resolved.insert(slot, ids.remove(0));
        } else {
            conflicted.push((slot, ids));
        }
    }
    // Power levels first, then join rules, then members (each key in a fixed order), then the rest.
    let rank = |kind: &StateEventType| match kind {
        StateEventType::RoomPowerLevels => 0,
        StateEventType::RoomJoinRules => 1,
        StateEventType::RoomMember => 2,
        _ => 3,
    };
    conflicted.sort_by(|(a, _), (b, _)| (rank(&a.0), &a.1).cmp(&(rank(&b.0), &b.1)));
    for (slot, ids) in conflicted {
        let mut events = Vec::with_capacity(ids.len());
        for id in &ids {
            events.push(fetch(id).ok_or_else(|| StateResolutionError::MissingEvent(id.clone()))?);
        }
        let passes = |event: &Pdu, state: &StateMap| {
            crate::auth::check_against_state(event, version, |kind, key| {
                state.get(&(kind.clone(), key.to_owned())).and_then(|id| fetch(id))
            })
            .is_ok()
        };
        if rank(&slot.0) < 3 {
            events.sort_by(|a, b| a.depth().cmp(&b.depth()).then_with(|| sha1_of(b.id()).cmp(&sha1_of(a.id()))));
            let mut events = events.into_iter();
            if let Some(first) = events.next() {
                resolved.insert(slot.clone(), first.id().to_owned());
            }
            for event in events {
                if !passes(event, &resolved) {
                    break;
                }
                resolved.insert(slot.clone(), event.id().to_owned());
            }
        } else {
            events.sort_by(|a, b| b.depth().cmp(&a.depth()).then_with(|| sha1_of(a.id()).cmp(&sha1_of(b.id()))));
            if let Some(event) = events.into_iter().find(|event| passes(event, &resolved)) {
                resolved.insert(slot, event.id().to_owned());
            }
        }
    }
    Ok(resolved)
}

fn sha1_of(id: &EventId) -> [u8; 20] {
    use sha1::Digest;
    sha1::Sha1::digest(id.as_str().as_bytes()).into()
}

/// Every event reachable from `from` through `auth_events`, excluding `from` itself.
pub fn auth_chain<'a, 'e>(
    from: impl IntoIterator<Item = &'e EventId>,
    fetch: impl Fn(&EventId) -> Option<&'a Pdu>,
) -> Result<HashSet<OwnedEventId>, StateResolutionError> {
    let mut chain = HashSet::new();
    let mut stack: Vec<OwnedEventId> = Vec::new();
    for id in from {
        let event = fetch(id).ok_or_else(|| StateResolutionError::MissingEvent(id.to_owned()))?;
        stack.extend(event.auth_event_ids().iter().cloned());
    }
    while let Some(id) = stack.pop() {
        if !chain.insert(id.clone()) {
            continue;
        }
        if chain.len() > MAX_AUTH_CHAIN_EVENTS {
            return Err(StateResolutionError::AuthChainTooLong);
        }
        let event = fetch(&id).ok_or(StateResolutionError::MissingEvent(id))?;
        stack.extend(event.auth_event_ids().iter().filter(|a| !chain.contains(*a)).cloned());
    }
    Ok(chain)
}

/// v2.1's conflicted state subgraph: the events on an `auth_events` path from one conflicted
/// event to another (the conflicted events included).
pub fn conflicted_subgraph<'a, 'e>(
    conflicted: impl IntoIterator<Item = &'e OwnedEventId>,
    fetch: impl Fn(&EventId) -> Option<&'a Pdu>,
) -> Result<HashSet<OwnedEventId>, StateResolutionError> {
    let conflicted: HashSet<OwnedEventId> = conflicted.into_iter().cloned().collect();
    // Everything below a conflicted event, and each event's auth parents within that region.
    let region = auth_chain(conflicted.iter().map(|id| id.as_ref()), &fetch)?;
    let mut reaches: HashMap<OwnedEventId, bool> = HashMap::new();
    let mut subgraph: HashSet<OwnedEventId> = HashSet::new();
    for start in region.iter().chain(conflicted.iter()) {
        if reaches_conflicted(start, &conflicted, &fetch, &mut reaches)? {
            subgraph.insert(start.clone());
        }
    }
    subgraph.extend(conflicted);
    Ok(subgraph)
}

/// Whether some strict auth ancestor of `start` is conflicted; memoised, iterative (auth DAGs
/// can be deeper than the stack).
fn reaches_conflicted<'a>(
    start: &OwnedEventId,
    conflicted: &HashSet<OwnedEventId>,
    fetch: &impl Fn(&EventId) -> Option<&'a Pdu>,
    memo: &mut HashMap<OwnedEventId, bool>,
) -> Result<bool, StateResolutionError> {
    // `visiting` guards against cycles, which hostile v1–v2 events (IDs not hashes) can form.
    let mut visiting: HashSet<OwnedEventId> = HashSet::new();
    let mut stack = vec![(start.clone(), false)];
    while let Some((id, parents_done)) = stack.pop() {
        if memo.contains_key(&id) {
            continue;
        }
        let event = fetch(&id).ok_or_else(|| StateResolutionError::MissingEvent(id.clone()))?;
        if parents_done {
            let answer =
                event.auth_event_ids().iter().any(|p| conflicted.contains(p) || memo.get(p).copied().unwrap_or(false));
            memo.insert(id, answer);
        } else if visiting.insert(id.clone()) {
            stack.push((id.clone(), true));
            let unvisited = event.auth_event_ids().iter().filter(|p| !memo.contains_key(*p) && !visiting.contains(*p));
            stack.extend(unvisited.map(|p| (p.clone(), false)));
        }
        if memo.len() > MAX_AUTH_CHAIN_EVENTS {
            return Err(StateResolutionError::AuthChainTooLong);
        }
    }
    Ok(memo.get(start).copied().unwrap_or(false))
}
