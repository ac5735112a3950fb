//! `/sync` and `/messages` over the room timeline: stream positions are the tokens, so nothing
//! is skipped or delivered twice (architecture invariant 3).

use std::time::Duration;

use lattice_storage::records::EventRecord;
use lattice_storage::{Direction, KeyRange, Table, keys};
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{Map, Value, json};

use crate::{Service, ServiceError};

/// Most timeline events one room gets in one sync or one page of `/messages`.
pub const MAX_TIMELINE_LIMIT: usize = 1_000;
const DEFAULT_TIMELINE_LIMIT: usize = 20;
/// Longest a `/sync` long-poll waits.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

pub struct SyncRequest {
    /// The `next_batch` of an earlier sync; `None` for an initial sync.
    pub since: Option<u64>,
    pub timeout: Duration,
    pub timeline_limit: Option<usize>,
}

/// A stream position as a token, and back.
pub fn parse_token(token: &str) -> Result<u64, ServiceError> {
    token
        .strip_prefix('s')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ServiceError::InvalidParam(format!("invalid stream token {token:?}")))
}

fn token(position: u64) -> String {
    format!("s{position}")
}

impl Service {
    /// The newest stream position.
    async fn stream_position(&self) -> Result<u64, ServiceError> {
        Ok(lattice_storage::counter(self.kv.as_ref(), "stream").await?)
    }

    /// `GET /sync`: rooms the user is in, invited to or has left since `since`, with their new
    /// timeline events. With nothing new it waits up to `timeout` for the next event.
    pub async fn sync(&self, user_id: &UserId, request: SyncRequest) -> Result<Value, ServiceError> {
        let limit = request.timeline_limit.unwrap_or(DEFAULT_TIMELINE_LIMIT).clamp(1, MAX_TIMELINE_LIMIT);
        let mut now = self.stream_position().await?;
        if let Some(since) = request.since {
            if since > now {
                return Err(ServiceError::InvalidParam("the since token is from the future".into()));
            }
            if since == now && !request.timeout.is_zero() {
                let mut waiter = self.stream.subscribe();
                let _ = tokio::time::timeout(
                    request.timeout.min(MAX_SYNC_TIMEOUT),
                    waiter.wait_for(|newest| *newest > since),
                )
                .await;
                now = self.stream_position().await?;
            }
        }
        let since = request.since.unwrap_or(0);
        let (mut join, mut invite, mut leave) = (Map::new(), Map::new(), Map::new());
        let mut global_data = Vec::new();
        let mut room_data: std::collections::HashMap<String, Vec<Value>> = std::collections::HashMap::new();
        for (room, kind, content) in self.account_data_since(user_id, since, now).await? {
            let event = json!({ "type": kind, "content": content });
            match room {
                Some(room) => room_data.entry(room).or_default().push(event),
                None => global_data.push(event),
            }
        }
        for (room_id, membership) in self.memberships_of(user_id).await? {
            match membership.as_str() {
                "join" => {
                    let initial = request.since.is_none();
                    let mut ephemeral = Vec::new();
                    if let Some(users) = self.typing_since(&room_id, since, now, initial) {
                        ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": users } }));
                    }
                    if let Some(receipts) = self.receipts_since(user_id, &room_id, since, now).await? {
                        ephemeral.push(receipts);
                    }
                    let data = room_data.remove(room_id.as_str()).unwrap_or_default();
                    let room = match self.joined_room_sync(&room_id, since, now, limit, initial).await? {
                        Some(room) => Some(room),
                        // Only ephemeral or account-data news: the room still appears, with an
                        // empty timeline.
                        None if !ephemeral.is_empty() || !data.is_empty() => Some(json!({
                            "timeline": { "events": [], "limited": false, "prev_batch": token(now) },
                            "state": { "events": [] },
                        })),
                        None => None,
                    };
                    if let Some(mut room) = room {
                        if !ephemeral.is_empty() {
                            room["ephemeral"] = json!({ "events": ephemeral });
                        }
                        if !data.is_empty() {
                            room["account_data"] = json!({ "events": data });
                        }
                        join.insert(room_id.to_string(), room);
                    }
                }
                "invite" => {
                    if let Some(room) = self.invited_room_sync(user_id, &room_id, since).await? {
                        invite.insert(room_id.to_string(), room);
                    }
                }
                "leave" | "ban" if request.since.is_some() => {
                    // Nothing after the user left is theirs to see.
                    let left_at = self.membership_position(user_id, &room_id).await?.unwrap_or(since).min(now);
                    if left_at <= since {
                        continue;
                    }
                    if let Some(room) = self.joined_room_sync(&room_id, since, left_at, limit, false).await? {
                        leave.insert(room_id.to_string(), room);
                    }
                }
                _ => {}
            }
        }
        Ok(json!({
            "next_batch": token(now),
            "account_data": { "events": global_data },
            "rooms": { "join": join, "invite": invite, "leave": leave },
        }))
    }

    async fn memberships_of(&self, user_id: &UserId) -> Result<Vec<(OwnedRoomId, String)>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows = self
            .kv
            .scan(Table::Memberships, &KeyRange::prefix(&prefix), Direction::Forward, lattice_storage::MAX_SCAN_ROWS)
            .await?;
        rows.into_iter()
            .map(|(key, membership)| {
                let room = OwnedRoomId::try_from(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                Ok((room, String::from_utf8_lossy(&membership).into_owned()))
            })
            .collect()
    }

    /// Timeline events in `(since, now]`, newest `limit` of them; `None` when there are none and
    /// this is not an initial sync.
    async fn joined_room_sync(
        &self,
        room_id: &RoomId,
        since: u64,
        now: u64,
        limit: usize,
        initial: bool,
    ) -> Result<Option<Value>, ServiceError> {
        let range = KeyRange::between(
            &keys::timeline(room_id.as_str(), since + 1),
            &keys::timeline(room_id.as_str(), now.saturating_add(1)),
        );
        let mut rows = self.kv.scan(Table::Timeline, &range, Direction::Backward, limit + 1).await?;
        if rows.is_empty() && !initial {
            return Ok(None);
        }
        let limited = rows.len() > limit;
        rows.truncate(limit);
        rows.reverse();
        let mut events = Vec::with_capacity(rows.len());
        let mut first_position = now;
        for (key, event_id) in &rows {
            let position = position_of(key);
            first_position = first_position.min(position);
            events.push(self.client_event(&String::from_utf8_lossy(event_id)).await?);
        }
        // The state before the timeline: what the timeline does not itself carry. An incremental
        // sync with a complete timeline needs none.
        let state = if initial || limited {
            let in_timeline: Vec<&Value> = events.iter().map(|e| &e["event_id"]).collect();
            let prefix = keys::room_rows(room_id.as_str());
            let current = self
                .kv
                .scan(
                    Table::CurrentState,
                    &KeyRange::prefix(&prefix),
                    Direction::Forward,
                    lattice_storage::MAX_SCAN_ROWS,
                )
                .await?;
            let mut state = Vec::new();
            for (_, event_id) in current {
                let id = String::from_utf8_lossy(&event_id).into_owned();
                if !in_timeline.iter().any(|e| e.as_str() == Some(id.as_str())) {
                    state.push(self.client_event(&id).await?);
                }
            }
            state
        } else {
            Vec::new()
        };
        let prev_batch = token(first_position.saturating_sub(1));
        Ok(Some(json!({
            "timeline": { "events": events, "limited": limited, "prev_batch": prev_batch },
            "state": { "events": state },
        })))
    }

    /// The stream position of the user's current membership event in the room.
    async fn membership_position(&self, user_id: &UserId, room_id: &RoomId) -> Result<Option<u64>, ServiceError> {
        let Some(id) = self
            .kv
            .get(Table::CurrentState, &keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str()))
            .await?
        else {
            return Ok(None);
        };
        let record =
            lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&String::from_utf8_lossy(&id))).await?;
        Ok(record.and_then(|r| r.value.stream_position))
    }

    /// An invite with the stripped state the spec suggests, when it is new since `since`.
    async fn invited_room_sync(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        since: u64,
    ) -> Result<Option<Value>, ServiceError> {
        let Some(invite_id) = self
            .kv
            .get(Table::CurrentState, &keys::current_state(room_id.as_str(), "m.room.member", user_id.as_str()))
            .await?
        else {
            return Ok(None);
        };
        let invite_id = String::from_utf8_lossy(&invite_id).into_owned();
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(&invite_id)).await?;
        if record.and_then(|r| r.value.stream_position).is_none_or(|position| position <= since) {
            return Ok(None);
        }
        let mut stripped = Vec::new();
        for (kind, key) in [
            ("m.room.create", ""),
            ("m.room.join_rules", ""),
            ("m.room.name", ""),
            ("m.room.avatar", ""),
            ("m.room.encryption", ""),
            ("m.room.member", user_id.as_str()),
        ] {
            if let Some(id) =
                self.kv.get(Table::CurrentState, &keys::current_state(room_id.as_str(), kind, key)).await?
            {
                let event = self.client_event(&String::from_utf8_lossy(&id)).await?;
                stripped.push(json!({ "type": event["type"], "state_key": event["state_key"], "content": event["content"], "sender": event["sender"] }));
            }
        }
        Ok(Some(json!({ "invite_state": { "events": stripped } })))
    }

    /// `GET /rooms/{roomId}/messages`: a page of the timeline before (`backward`) or after `from`.
    pub async fn messages(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        from: Option<u64>,
        backward: bool,
        limit: usize,
    ) -> Result<Value, ServiceError> {
        self.require_joined(user_id, room_id).await?;
        let limit = limit.clamp(1, MAX_TIMELINE_LIMIT);
        let now = self.stream_position().await?;
        let from = from.unwrap_or(if backward { now } else { 0 });
        // Tokens name the last position a client has seen: backward pages hold positions ≤ from,
        // forward pages positions > from.
        let (range, direction) = if backward {
            (
                KeyRange::between(
                    &keys::timeline(room_id.as_str(), 0),
                    &keys::timeline(room_id.as_str(), from.saturating_add(1)),
                ),
                Direction::Backward,
            )
        } else {
            (
                KeyRange::between(
                    &keys::timeline(room_id.as_str(), from.saturating_add(1)),
                    &keys::timeline(room_id.as_str(), u64::MAX),
                ),
                Direction::Forward,
            )
        };
        let rows = self.kv.scan(Table::Timeline, &range, direction, limit).await?;
        let mut chunk = Vec::with_capacity(rows.len());
        let mut end = from;
        for (key, event_id) in &rows {
            let position = position_of(key);
            end = if backward { position.saturating_sub(1) } else { position };
            chunk.push(self.client_event(&String::from_utf8_lossy(event_id)).await?);
        }
        let mut page = json!({ "chunk": chunk, "start": token(from) });
        if rows.len() == limit {
            page["end"] = json!(token(end));
        }
        Ok(page)
    }
}

pub(super) fn position_of(timeline_key: &[u8]) -> u64 {
    let tail = &timeline_key[timeline_key.len().saturating_sub(8)..];
    <[u8; 8]>::try_from(tail).map(u64::from_be_bytes).unwrap_or(0)
}
