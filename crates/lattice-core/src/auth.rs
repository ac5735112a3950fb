//! The authorization rules (spec: server-server API, "Authorization rules"), per room version,
//! through ruma's implementation.

use std::collections::HashMap;

use ruma::EventId;
use ruma::events::StateEventType;
use ruma::state_res::{Event, check_state_dependent_auth_rules, check_state_independent_auth_rules};

use crate::event::Pdu;
use crate::room_version::RoomVersion;

/// Which check refused the event, and the rule it broke (ruma's description).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("not allowed by its auth events: {0}")]
    AuthEvents(String),
    #[error("not allowed by the state before it: {0}")]
    StateBefore(String),
    #[error("an auth event is missing: {0}")]
    MissingAuthEvent(String),
}

/// The state a set of events forms, keyed by (type, state key). Later events of one key win.
pub fn state_of<'a>(events: impl IntoIterator<Item = &'a Pdu>) -> HashMap<(StateEventType, String), &'a Pdu> {
    let mut state = HashMap::new();
    for event in events {
        if let Some(state_key) = event.state_key() {
            state.insert((event.event_type().to_string().into(), state_key.to_owned()), event);
        }
    }
    state
}

/// Step 4 of the checks on receipt: the event is allowed by the events it cites as its auth
/// events (which must be the right ones, and all be present).
pub fn check_against_auth_events<'a>(
    event: &Pdu,
    version: &RoomVersion,
    fetch: impl Fn(&EventId) -> Option<&'a Pdu>,
) -> Result<(), AuthError> {
    let rules = &version.rules().authorization;
    check_state_independent_auth_rules(rules, event, &fetch).map_err(AuthError::AuthEvents)?;
    let mut auth_events = Vec::with_capacity(event.auth_event_ids().len());
    for id in event.auth_event_ids() {
        auth_events.push(fetch(id).ok_or_else(|| AuthError::MissingAuthEvent(id.to_string()))?);
    }
    // From v12 the create event is not cited: the room ID names it.
    if rules.room_create_event_id_as_room_id
        && let Some(room_id) = event.room_id()
        && let Ok(create_id) = EventId::parse(format!("${}", &room_id.as_str()[1..]))
    {
        auth_events.push(fetch(&create_id).ok_or_else(|| AuthError::MissingAuthEvent(create_id.to_string()))?);
    }
    let state = state_of(auth_events);
    check_state_dependent_auth_rules(rules, event, |kind, key| state.get(&(kind.clone(), key.to_owned())).copied())
        .map_err(AuthError::AuthEvents)
}

/// Step 5 (and, against the current state, the soft-fail check): the event is allowed by the
/// room state before it.
pub fn check_against_state<'a>(
    event: &Pdu,
    version: &RoomVersion,
    state: impl Fn(&StateEventType, &str) -> Option<&'a Pdu>,
) -> Result<(), AuthError> {
    check_state_dependent_auth_rules(&version.rules().authorization, event, state).map_err(AuthError::StateBefore)
}
