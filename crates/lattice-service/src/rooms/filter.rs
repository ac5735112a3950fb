//! Event filters (spec "Filtering"): what `/sync`, `/messages` and `/context` return. Pure
//! matching over client-format events; parsing accepts the spec's JSON.

use serde::Deserialize;
use serde_json::Value;

use crate::ServiceError;

/// Most entries in one filter list (`types`, `senders`, `rooms`, …).
const MAX_FILTER_LIST: usize = 1_000;

/// A `RoomEventFilter` (and, with the fields it lacks left empty, an `EventFilter` or a
/// `StateFilter`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    pub limit: Option<u64>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub contains_url: Option<bool>,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    /// `/sync` gives unread counts per thread (`unread_thread_notifications`).
    pub unread_thread_notifications: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub ephemeral: EventFilter,
    pub account_data: EventFilter,
}

/// A whole filter as `POST /user/{userId}/filter` stores it and `/sync` applies it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SyncFilter {
    pub room: RoomFilter,
    pub account_data: EventFilter,
    pub presence: EventFilter,
    /// Read so that a stored filter is checked whole when it is created; `/sync` answers every
    /// field in the client format whatever these say.
    pub event_fields: Option<Vec<String>>,
    pub event_format: Option<EventFormat>,
}

/// `event_format`: the two formats the spec names.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    Client,
    Federation,
}

impl SyncFilter {
    pub fn from_json(value: Value) -> Result<Self, ServiceError> {
        let filter: Self =
            serde_json::from_value(value).map_err(|e| ServiceError::BadJson(format!("invalid filter: {e}")))?;
        filter.check()?;
        Ok(filter)
    }

    fn check(&self) -> Result<(), ServiceError> {
        let room = &self.room;
        check_list("event_fields", self.event_fields.as_deref().unwrap_or_default())?;
        check_list("room.rooms", room.rooms.as_deref().unwrap_or_default())?;
        check_list("room.not_rooms", &room.not_rooms)?;
        for (name, filter) in [
            ("room.timeline", &room.timeline),
            ("room.state", &room.state),
            ("room.ephemeral", &room.ephemeral),
            ("room.account_data", &room.account_data),
            ("account_data", &self.account_data),
            ("presence", &self.presence),
        ] {
            filter.check(name)?;
        }
        Ok(())
    }

    /// Whether `room_id` takes part in this sync at all.
    pub fn includes_room(&self, room_id: &str) -> bool {
        in_list(self.room.rooms.as_deref(), &self.room.not_rooms, room_id)
    }

    /// Whether members are lazy-loaded: only those the returned events need come with them.
    pub fn lazy_load_members(&self) -> bool {
        self.room.state.lazy_load_members || self.room.timeline.lazy_load_members
    }
}

impl EventFilter {
    pub fn from_json(value: Value) -> Result<Self, ServiceError> {
        let filter: Self =
            serde_json::from_value(value).map_err(|e| ServiceError::BadJson(format!("invalid filter: {e}")))?;
        filter.check("filter")?;
        Ok(filter)
    }

    fn check(&self, name: &str) -> Result<(), ServiceError> {
        check_list(&format!("{name}.types"), self.types.as_deref().unwrap_or_default())?;
        check_list(&format!("{name}.not_types"), &self.not_types)?;
        check_list(&format!("{name}.senders"), self.senders.as_deref().unwrap_or_default())?;
        check_list(&format!("{name}.not_senders"), &self.not_senders)?;
        check_list(&format!("{name}.rooms"), self.rooms.as_deref().unwrap_or_default())?;
        check_list(&format!("{name}.not_rooms"), &self.not_rooms)
    }

    /// Whether anything but `limit` and member loading narrows this filter.
    pub fn narrows(&self) -> bool {
        self.types.is_some()
            || !self.not_types.is_empty()
            || self.senders.is_some()
            || !self.not_senders.is_empty()
            || self.rooms.is_some()
            || !self.not_rooms.is_empty()
            || self.contains_url.is_some()
    }

    /// Whether a client-format event passes the filter.
    pub fn allows(&self, event: &Value) -> bool {
        let kind = event["type"].as_str().unwrap_or_default();
        let sender = event["sender"].as_str().unwrap_or_default();
        let room = event["room_id"].as_str().unwrap_or_default();
        let types_ok = self.types.as_ref().is_none_or(|types| types.iter().any(|t| type_matches(t, kind)))
            && !self.not_types.iter().any(|t| type_matches(t, kind));
        let url_ok = self.contains_url.is_none_or(|wanted| event["content"]["url"].is_string() == wanted);
        types_ok
            && url_ok
            && in_list(self.senders.as_deref(), &self.not_senders, sender)
            && in_list(self.rooms.as_deref(), &self.not_rooms, room)
    }

    /// Whether events of `sender` pass `senders`/`not_senders` (for events judged apart from
    /// their content, like presence).
    pub fn allows_sender(&self, sender: &str) -> bool {
        in_list(self.senders.as_deref(), &self.not_senders, sender)
    }

    /// Whether an event of `kind` passes (for events that are only a type, like ephemeral ones).
    pub fn allows_type(&self, kind: &str) -> bool {
        self.types.as_ref().is_none_or(|types| types.iter().any(|t| type_matches(t, kind)))
            && !self.not_types.iter().any(|t| type_matches(t, kind))
    }
}

fn check_list(name: &str, list: &[String]) -> Result<(), ServiceError> {
    if list.len() > MAX_FILTER_LIST {
        return Err(ServiceError::BadJson(format!("{name} may list at most {MAX_FILTER_LIST} entries")));
    }
    Ok(())
}

/// `allowed` (when given) must hold `value` and `denied` must not; `denied` wins.
fn in_list(allowed: Option<&[String]>, denied: &[String], value: &str) -> bool {
    allowed.is_none_or(|list| list.iter().any(|v| v == value)) && !denied.iter().any(|v| v == value)
}

/// Type patterns may use `*` for any run of characters (`m.room.*`).
fn type_matches(pattern: &str, kind: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = kind.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn type_patterns() {
        let cases = [
            ("m.room.message", "m.room.message", true),
            ("m.room.message", "m.room.messages", false),
            ("m.room.*", "m.room.message", true),
            ("m.room.*", "m.reaction", false),
            ("*", "anything", true),
            ("m.*.message", "m.room.message", true),
            ("m.*.message", "m.room.member", false),
            ("*.member", "m.room.member", true),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("m.*", "m.", true),
            ("*", "", true),
            ("m.*.m*r", "m.room.member", true),
            ("m.*.x", "m.room.member", false),
            ("", "m", false),
        ];
        for (pattern, kind, expected) in cases {
            assert_eq!(type_matches(pattern, kind), expected, "{pattern} vs {kind}");
        }
    }

    #[test]
    fn event_filters() {
        let event = json!({ "type": "m.room.message", "sender": "@a:hs", "room_id": "!r:hs", "content": {} });
        let cases = [
            (json!({}), true),
            (json!({ "types": ["m.room.*"] }), true),
            (json!({ "types": [] }), false),
            (json!({ "not_types": ["m.room.message"] }), false),
            (json!({ "types": ["*"], "not_types": ["m.room.message"] }), false),
            (json!({ "senders": ["@b:hs"] }), false),
            (json!({ "not_senders": ["@a:hs"] }), false),
            (json!({ "rooms": ["!r:hs"] }), true),
            (json!({ "not_rooms": ["!r:hs"] }), false),
            (json!({ "contains_url": true }), false),
            (json!({ "contains_url": false }), true),
        ];
        for (filter, expected) in cases {
            let parsed = EventFilter::from_json(filter.clone()).expect("valid filter");
            assert_eq!(parsed.allows(&event), expected, "{filter}");
        }
    }

    #[test]
    fn bad_filters_are_refused() {
        for filter in [
            json!({ "room": { "timeline": { "types": "m.room.message" } } }),
            json!({ "room": 5 }),
            json!({ "event_format": "xml" }),
            json!({ "event_fields": "content.body" }),
        ] {
            assert!(matches!(SyncFilter::from_json(filter), Err(ServiceError::BadJson(_))));
        }
        let whole = json!({ "event_format": "client", "event_fields": ["type", "content.body"], "presence": {} });
        assert!(SyncFilter::from_json(whole).is_ok());
        let long: Vec<String> = (0..=MAX_FILTER_LIST).map(|i| format!("t{i}")).collect();
        assert!(SyncFilter::from_json(json!({ "room": { "rooms": long } })).is_err());
    }

    #[test]
    fn room_selection() {
        let filter = SyncFilter::from_json(json!({ "room": { "rooms": ["!a:hs", "!b:hs"], "not_rooms": ["!b:hs"] } }))
            .expect("valid");
        assert!(filter.includes_room("!a:hs"));
        assert!(!filter.includes_room("!b:hs"));
        assert!(!filter.includes_room("!c:hs"));
    }
}
