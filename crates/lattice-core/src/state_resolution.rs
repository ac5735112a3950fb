//! State resolution v2 (room versions 2–11) and v2.1 (room version 12), through ruma.

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
    #[error("room version {0} uses state resolution v1, which Lattice does not implement yet")]
    UnsupportedAlgorithm(String),
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
    let StateResolutionVersion::V2(v2_rules) = version.rules().state_res else {
        return Err(StateResolutionError::UnsupportedAlgorithm(version.id().to_string()));
    };
    let mut auth_chains = Vec::with_capacity(state_sets.len());
    for state in state_sets {
        let chain = auth_chain(state.values().map(|id| id.as_ref()), &fetch)?;
        auth_chains.push(chain.into_iter().collect::<EventIdSet<OwnedEventId>>());
    }
    let subgraph = |conflicted: &ruma::state_res::StateMap<Vec<OwnedEventId>>| {
        conflicted_subgraph(conflicted.values().flatten(), &fetch).ok().map(|ids| ids.into_iter().collect())
    };
    ruma::state_res::resolve(&version.rules().authorization, &v2_rules, state_sets, auth_chains, &fetch, subgraph)
        .map_err(|e| StateResolutionError::Failed(e.to_string()))
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
