//! Spaces: what the rooms service knows of a room as a node of a space tree — its summary with
//! its `m.space.child` events (`children_state`), its children in the spec's order, and who may
//! preview it. The walk over the tree, with rooms of other servers, is the federation service's
//! (`federation/hierarchy.rs`), for `GET /rooms/{roomId}/hierarchy` and the federation
//! `/hierarchy`.

use lattice_storage::{Direction, KeyRange, Table, keys};
use ruma::{OwnedRoomId, OwnedServerName, RoomId, ServerName, UserId};
use serde_json::{Value, json};

use super::Rooms;
use crate::ServiceError;

/// `m.space.child` events read per room.
pub const MAX_SPACE_CHILDREN: usize = 500;
/// Servers of a child's `via` remembered (and tried).
const MAX_VIA: usize = 10;
/// Rooms of a restricted join rule's `allow` looked at.
const MAX_ALLOWED_ROOMS: usize = 50;

/// One child of a space, from a (stripped) `m.space.child` event with a non-empty `via`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceChild {
    pub room_id: OwnedRoomId,
    pub via: Vec<OwnedServerName>,
    pub suggested: bool,
    /// A valid `order`: at most 50 characters of printable ASCII.
    order: Option<String>,
    origin_server_ts: u64,
}

/// The children a summary's `children_state` names, in the spec's order: those with an
/// `order` first by it, then by the child event's `origin_server_ts`, then by room ID.
/// Events without a non-empty `via`, or with an invalid room ID, are not children.
pub fn children_of(summary: &Value) -> Vec<SpaceChild> {
    let mut children: Vec<SpaceChild> = summary["children_state"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .take(MAX_SPACE_CHILDREN)
        .filter_map(|event| {
            if event["type"] != "m.space.child" {
                return None;
            }
            let room_id = OwnedRoomId::try_from(event["state_key"].as_str()?).ok()?;
            let via: Vec<OwnedServerName> = event["content"]["via"]
                .as_array()?
                .iter()
                .filter_map(|server| OwnedServerName::try_from(server.as_str()?).ok())
                .take(MAX_VIA)
                .collect();
            if via.is_empty() {
                return None;
            }
            let order = event["content"]["order"]
                .as_str()
                .filter(|o| o.len() <= 50 && o.bytes().all(|b| (0x20..=0x7e).contains(&b)))
                .map(str::to_owned);
            Some(SpaceChild {
                room_id,
                via,
                suggested: event["content"]["suggested"] == true,
                order,
                origin_server_ts: event["origin_server_ts"].as_u64().unwrap_or(0),
            })
        })
        .collect();
    children.sort_by(|a, b| {
        let ordered = |c: &SpaceChild| (c.order.is_none(), c.order.clone(), c.origin_server_ts, c.room_id.clone());
        ordered(a).cmp(&ordered(b))
    });
    children
}

impl Rooms {
    /// The summary of a room this server is in, as the hierarchy endpoints give it: the
    /// directory's fields, the room version, encryption, the `allow` rooms of a restricted
    /// join rule, and `children_state`. `None` when this server has no member in the room.
    pub async fn space_summary(&self, room_id: &RoomId) -> Result<Option<Value>, ServiceError> {
        if !self.server_in_room(self.server_name(), room_id).await? {
            return Ok(None);
        }
        let mut summary = Value::Object(self.room_summary(room_id).await?);
        summary["room_version"] = json!(self.room_version(room_id).await?.id());
        if let Some(encryption) = self.current_state_content(room_id, "m.room.encryption", "").await? {
            summary["encryption"] = encryption["algorithm"].clone();
        }
        if let Some(rules) = self.current_state_content(room_id, "m.room.join_rules", "").await? {
            let allowed: Vec<&str> = rules["allow"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .filter(|allow| allow["type"] == "m.room_membership")
                .filter_map(|allow| allow["room_id"].as_str())
                .take(MAX_ALLOWED_ROOMS)
                .collect();
            if !allowed.is_empty() {
                summary["allowed_room_ids"] = json!(allowed);
            }
        }
        summary["children_state"] = Value::Array(self.children_state(room_id).await?);
        Ok(Some(summary))
    }

    /// The room's current `m.space.child` events, stripped, with their `origin_server_ts`.
    async fn children_state(&self, room_id: &RoomId) -> Result<Vec<Value>, ServiceError> {
        let prefix = keys::current_state(room_id.as_str(), "m.space.child", "");
        let rows = self
            .kv
            .scan(Table::CurrentState, &KeyRange::prefix(&prefix), Direction::Forward, MAX_SPACE_CHILDREN)
            .await?;
        let mut children = Vec::with_capacity(rows.len());
        for (_, event_id) in rows {
            let event = self.client_event(&String::from_utf8_lossy(&event_id)).await?;
            // A removed child is an event with empty content.
            if event["content"].as_object().is_none_or(|content| content.is_empty()) {
                continue;
            }
            children.push(json!({
                "type": event["type"],
                "state_key": event["state_key"],
                "content": event["content"],
                "sender": event["sender"],
                "origin_server_ts": event["origin_server_ts"],
            }));
        }
        Ok(children)
    }

    /// Whether `user_id` may see `summary`'s room in a hierarchy (spec, `GET /hierarchy`):
    /// joined or invited; a public, knockable or world-readable room; a restricted one when
    /// they are in one of the rooms it allows.
    pub async fn user_may_preview(&self, user_id: &UserId, summary: &Value) -> Result<bool, ServiceError> {
        if previewable_by_anyone(summary) {
            return Ok(true);
        }
        let Some(room_id) = summary["room_id"].as_str().and_then(|r| RoomId::parse(r).ok()) else { return Ok(false) };
        if matches!(self.membership(user_id, &room_id).await?.as_deref(), Some("join" | "invite")) {
            return Ok(true);
        }
        for allowed in allowed_rooms(summary) {
            if self.membership(user_id, &allowed).await?.as_deref() == Some("join") {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether another server may be told about `summary`'s room (federation `/hierarchy`):
    /// it is in the room, or could join or peek it — public, knockable or world-readable, or
    /// restricted to a room it is in.
    pub async fn server_may_preview(&self, server: &ServerName, summary: &Value) -> Result<bool, ServiceError> {
        if previewable_by_anyone(summary) {
            return Ok(true);
        }
        let Some(room_id) = summary["room_id"].as_str().and_then(|r| RoomId::parse(r).ok()) else { return Ok(false) };
        if self.server_in_room(server, &room_id).await? {
            return Ok(true);
        }
        for allowed in allowed_rooms(summary) {
            if self.server_in_room(server, &allowed).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// World-readable, or a join rule that lets anyone join or knock.
fn previewable_by_anyone(summary: &Value) -> bool {
    summary["world_readable"] == true
        || matches!(summary["join_rule"].as_str(), Some("public" | "knock" | "knock_restricted"))
}

/// The rooms a restricted summary's join rule allows.
fn allowed_rooms(summary: &Value) -> Vec<OwnedRoomId> {
    if !matches!(summary["join_rule"].as_str(), Some("restricted" | "knock_restricted")) {
        return Vec::new();
    }
    summary["allowed_room_ids"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|room| OwnedRoomId::try_from(room.as_str()?).ok())
        .take(MAX_ALLOWED_ROOMS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_come_in_the_spec_order_and_need_a_via() {
        let child = |room: &str, content: Value, ts: u64| json!({ "type": "m.space.child", "state_key": room, "content": content, "origin_server_ts": ts });
        let summary = json!({ "children_state": [
            child("!late:x", json!({ "via": ["x"] }), 5),
            child("!early:x", json!({ "via": ["x"] }), 1),
            child("!ordered:x", json!({ "via": ["x"], "order": "a", "suggested": true }), 9),
            child("!novia:x", json!({ "via": [] }), 0),
            child("!badorder:x", json!({ "via": ["x"], "order": "\u{e9}" }), 3),
            json!({ "type": "m.room.topic", "state_key": "!other:x", "content": { "via": ["x"] } }),
        ] });
        let ids: Vec<String> = children_of(&summary).iter().map(|c| c.room_id.to_string()).collect();
        assert_eq!(ids, ["!ordered:x", "!early:x", "!badorder:x", "!late:x"]);
        assert!(children_of(&summary)[0].suggested);
    }
}
