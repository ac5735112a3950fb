//! Relations (`m.relates_to`): the index ingest keeps of them, `/relations`, `/threads`, and the
//! aggregations bundled into events' `unsigned` (`m.replace`, `m.thread`, `m.reference`).
//! Annotations (reactions) are served by `/relations`; the spec no longer bundles them.

use std::ops::Bound;

use lattice_core::event::Pdu;
use lattice_storage::records::{EventRecord, RelationRecord, ThreadRecord};
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::state_res::Event;
use ruma::{CanonicalJsonValue, RoomId, UserId};
use serde_json::{Value, json};

use super::Rooms;
use super::messages::{MAX_TIMELINE_LIMIT, position_of};
use super::topological::{HistoryToken, TopoPos, depth_of};
use super::visibility::Viewer;
use crate::ServiceError;

/// Writers a thread summary remembers; later ones still count, they are just not listed.
pub(super) const MAX_THREAD_PARTICIPANTS: usize = 1_000;
/// Edits looked at to find the newest valid one.
const MAX_EDITS_SCANNED: usize = 50;
/// References bundled into one event.
const MAX_BUNDLED_REFERENCES: usize = 50;
/// Relation rows one `/relations` page looks at while skipping other event types.
const MAX_RELATIONS_SCANNED: usize = lattice_storage::MAX_SCAN_ROWS;

/// A parsed `m.relates_to` with a relation type.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Relation {
    pub rel_type: String,
    pub parent: String,
}

/// The relation an event's content declares, if any (replies without `rel_type` are not one).
pub(crate) fn relation_of(event: &Pdu) -> Option<Relation> {
    let CanonicalJsonValue::Object(content) = event.object().get("content")? else { return None };
    let CanonicalJsonValue::Object(relates_to) = content.get("m.relates_to")? else { return None };
    let (Some(CanonicalJsonValue::String(rel_type)), Some(CanonicalJsonValue::String(parent))) =
        (relates_to.get("rel_type"), relates_to.get("event_id"))
    else {
        return None;
    };
    let valid = !rel_type.is_empty() && rel_type.len() <= 255 && parent.starts_with('$') && !parent.contains('\0');
    valid.then(|| Relation { rel_type: rel_type.clone(), parent: parent.clone() })
}

/// Parameters of `GET /relations`.
pub struct RelationsQuery<'a> {
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub from: Option<HistoryToken>,
    pub to: Option<HistoryToken>,
    pub limit: usize,
    pub backward: bool,
}

impl Rooms {
    /// Adds an accepted event's relation to the index (and its thread's summary) in its batch;
    /// `position`: the event's order in the room's history (`EventRecord::order`).
    pub(crate) async fn index_relation(
        &self,
        room_id: &RoomId,
        event: &Pdu,
        position: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), ServiceError> {
        let Some(relation) = relation_of(event) else { return Ok(()) };
        if !self.is_event_of_room(&relation.parent, room_id).await? {
            // A relation to another room's event (or one not stored) would serve that event,
            // its edits and its thread to readers of this room: it is not indexed.
            return Ok(());
        }
        let record = RelationRecord {
            event_id: event.id().to_string(),
            rel_type: relation.rel_type.clone(),
            event_type: event.kind().to_string(),
            sender: event.sender().to_string(),
        };
        let depth = depth_of(event.depth());
        lattice_storage::put(batch, keys::relation(&relation.parent, "", depth, position), &record);
        lattice_storage::put(batch, keys::relation(&relation.parent, &relation.rel_type, depth, position), &record);
        if relation.rel_type == "m.thread" {
            self.add_thread_reply(room_id, &relation.parent, event, position, batch).await?;
        }
        Ok(())
    }

    async fn add_thread_reply(
        &self,
        room_id: &RoomId,
        root: &str,
        reply: &Pdu,
        position: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), ServiceError> {
        let key = keys::thread(room_id.as_str(), root);
        let mut thread = match lattice_storage::get::<ThreadRecord>(self.kv.as_ref(), &key).await? {
            Some(existing) => {
                batch.delete(
                    Table::ThreadActivity,
                    keys::thread_activity(room_id.as_str(), existing.value.latest_position),
                );
                existing.value
            }
            None => {
                let mut fresh = ThreadRecord::default();
                if let Some(root_sender) = self.sender_of(root).await? {
                    fresh.participants.push(root_sender);
                }
                fresh
            }
        };
        thread.latest_event_id = reply.id().to_string();
        thread.latest_position = position;
        thread.count += 1;
        let sender = reply.sender().to_string();
        if !thread.participants.contains(&sender) && thread.participants.len() < MAX_THREAD_PARTICIPANTS {
            thread.participants.push(sender);
        }
        batch.put(Table::ThreadActivity, keys::thread_activity(room_id.as_str(), position), root.as_bytes().to_vec());
        lattice_storage::put(batch, key, &thread);
        Ok(())
    }

    /// Whether `event_id` is stored as an accepted event of `room_id`.
    async fn is_event_of_room(&self, event_id: &str, room_id: &RoomId) -> Result<bool, ServiceError> {
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id)).await?;
        Ok(record.is_some_and(|r| r.value.room_id == room_id.as_str() && r.value.history_order().is_some()))
    }

    async fn sender_of(&self, event_id: &str) -> Result<Option<String>, ServiceError> {
        let Some(record) = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(event_id)).await? else {
            return Ok(None);
        };
        let event: Value =
            serde_json::from_str(&record.value.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(event["sender"].as_str().map(str::to_owned))
    }

    /// Removes a redacted event's relation from the index: redaction strips `m.relates_to`.
    /// `position`: the target's order in the room's history.
    pub(crate) async fn unindex_relation(
        &self,
        room_id: &RoomId,
        target: &Pdu,
        position: Option<u64>,
        batch: &mut WriteBatch,
    ) -> Result<(), ServiceError> {
        let (Some(relation), Some(position)) = (relation_of(target), position) else { return Ok(()) };
        let depth = depth_of(target.depth());
        batch.delete(Table::Relations, keys::relation(&relation.parent, "", depth, position));
        batch.delete(Table::Relations, keys::relation(&relation.parent, &relation.rel_type, depth, position));
        if relation.rel_type != "m.thread" {
            return Ok(());
        }
        let key = keys::thread(room_id.as_str(), &relation.parent);
        let Some(thread) = lattice_storage::get::<ThreadRecord>(self.kv.as_ref(), &key).await? else { return Ok(()) };
        let mut thread = thread.value;
        thread.count = thread.count.saturating_sub(1);
        if thread.latest_event_id == target.id().as_str() {
            batch.delete(Table::ThreadActivity, keys::thread_activity(room_id.as_str(), thread.latest_position));
            // The newest reply that is not the one being redacted.
            let replies = KeyRange::prefix(&keys::relations_of(&relation.parent, "m.thread"));
            let newest = self.kv.scan(Table::Relations, &replies, Direction::Backward, 2).await?;
            let previous = newest.into_iter().find_map(|(key, raw)| {
                let record: RelationRecord = serde_json::from_slice(&raw).ok()?;
                (record.event_id != target.id().as_str()).then(|| (position_of(&key), record.event_id))
            });
            match previous {
                Some((position, event_id)) => {
                    thread.latest_event_id = event_id;
                    thread.latest_position = position;
                    batch.put(
                        Table::ThreadActivity,
                        keys::thread_activity(room_id.as_str(), position),
                        relation.parent.as_bytes().to_vec(),
                    );
                }
                None => {
                    batch.delete(Table::Threads, key);
                    return Ok(());
                }
            }
        }
        lattice_storage::put(batch, key, &thread);
        Ok(())
    }

    /// An event as a client sees it in a timeline: the client format with its bundled
    /// aggregations in `unsigned["m.relations"]`.
    pub(crate) async fn timeline_event(&self, viewer: &mut Viewer, event_id: &str) -> Result<Value, ServiceError> {
        let event = self.client_event(event_id).await?;
        self.with_aggregations(viewer, event).await
    }

    /// [`Rooms::timeline_event`] from a record already read.
    pub(crate) async fn timeline_event_of(
        &self,
        viewer: &mut Viewer,
        event_id: &str,
        record: &EventRecord,
    ) -> Result<Value, ServiceError> {
        let event = self.client_event_of(event_id, record).await?;
        self.with_aggregations(viewer, event).await
    }

    async fn with_aggregations(&self, viewer: &mut Viewer, mut event: Value) -> Result<Value, ServiceError> {
        if let Some(bundled) = self.bundled_aggregations(viewer, &event).await? {
            event["unsigned"]["m.relations"] = bundled;
        }
        Ok(event)
    }

    /// What relates to `event`, as far as `viewer` may see: a relating event the reader may not
    /// see is neither bundled nor counted as the latest of a thread.
    async fn bundled_aggregations(&self, viewer: &mut Viewer, event: &Value) -> Result<Option<Value>, ServiceError> {
        let event_id = event["event_id"].as_str().unwrap_or_default();
        // Most events have no relations: one probe answers that.
        let any = KeyRange::prefix(&keys::relations_of(event_id, ""));
        if self.kv.scan(Table::Relations, &any, Direction::Forward, 1).await?.is_empty() {
            return Ok(None);
        }
        let mut bundled = serde_json::Map::new();
        if let Some(edit) = self.latest_edit(viewer, event).await? {
            bundled.insert("m.replace".into(), edit);
        }
        let room_id = event["room_id"].as_str().unwrap_or_default();
        if let Some(thread) =
            lattice_storage::get::<ThreadRecord>(self.kv.as_ref(), &keys::thread(room_id, event_id)).await?
            && self.may_see_id(viewer, &thread.value.latest_event_id).await?
        {
            let thread = thread.value;
            bundled.insert(
                "m.thread".into(),
                json!({
                    "latest_event": self.client_event(&thread.latest_event_id).await?,
                    "count": thread.count,
                    "current_user_participated": thread.participants.iter().any(|p| p == viewer.user_id.as_str()),
                }),
            );
        }
        let references = KeyRange::prefix(&keys::relations_of(event_id, "m.reference"));
        let rows = self.kv.scan(Table::Relations, &references, Direction::Forward, MAX_BUNDLED_REFERENCES).await?;
        let mut chunk = Vec::new();
        for (_, raw) in rows {
            let Ok(reference) = serde_json::from_slice::<RelationRecord>(&raw) else { continue };
            if self.may_see_in_history(viewer, &reference.event_id).await? {
                chunk.push(json!({ "event_id": reference.event_id }));
            }
        }
        if !chunk.is_empty() {
            bundled.insert("m.reference".into(), json!({ "chunk": chunk }));
        }
        Ok((!bundled.is_empty()).then_some(Value::Object(bundled)))
    }

    /// The newest valid edit of `original`: same sender, same type, and the original is not a
    /// state event (spec "Validity of replacement events").
    async fn latest_edit(&self, viewer: &mut Viewer, original: &Value) -> Result<Option<Value>, ServiceError> {
        if original.get("state_key").is_some() {
            return Ok(None);
        }
        let event_id = original["event_id"].as_str().unwrap_or_default();
        let edits = KeyRange::prefix(&keys::relations_of(event_id, "m.replace"));
        for (_, raw) in self.kv.scan(Table::Relations, &edits, Direction::Backward, MAX_EDITS_SCANNED).await? {
            let edit: RelationRecord =
                serde_json::from_slice(&raw).map_err(|e| ServiceError::Internal(e.to_string()))?;
            if original["sender"] == edit.sender.as_str()
                && original["type"] == edit.event_type.as_str()
                && self.may_see_in_history(viewer, &edit.event_id).await?
            {
                return Ok(Some(self.client_event(&edit.event_id).await?));
            }
        }
        Ok(None)
    }

    /// `GET /rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]`: the events that
    /// relate to a parent, newest first by default, paginated in the room's topological order.
    pub async fn relations(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        parent: &str,
        query: RelationsQuery<'_>,
    ) -> Result<Value, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        // A parent the reader may not see is as unknown as one of another room.
        if !self.may_see_id(viewer, parent).await? {
            return Err(ServiceError::NotFound(format!("no event {parent} in {room_id}")));
        }
        let limit = query.limit.clamp(1, MAX_TIMELINE_LIMIT);
        let rel_type = query.rel_type.unwrap_or("");
        let from = match query.from {
            Some(token) => Some(self.history_point(room_id, token).await?),
            None => None,
        };
        let to = match query.to {
            Some(token) => Some(self.history_point(room_id, token).await?),
            None => None,
        };
        // Tokens as in `/messages`: backward pages hold positions ≤ from, forward ones > from.
        let (after, upto) = if query.backward { (to, from) } else { (from, to) };
        let range = relation_range(parent, rel_type, after, upto);
        let direction = if query.backward { Direction::Backward } else { Direction::Forward };
        let scan_limit = if query.event_type.is_some() { MAX_RELATIONS_SCANNED } else { limit + 1 };
        let rows = self.kv.scan(Table::Relations, &range, direction, scan_limit).await?;
        let ignored = self.account_data.ignored_users(user_id).await?;
        let mut chunk = Vec::new();
        let mut next = None;
        for (key, raw) in rows {
            let relation: RelationRecord =
                serde_json::from_slice(&raw).map_err(|e| ServiceError::Internal(e.to_string()))?;
            if query.event_type.is_some_and(|t| t != relation.event_type) || ignored.contains(&relation.sender) {
                continue;
            }
            if chunk.len() == limit {
                break;
            }
            let position = TopoPos::of_key(&key);
            next = Some(if query.backward { position.before() } else { position });
            if let Some(event) = self.history_event(viewer, &relation.event_id).await? {
                chunk.push(event);
            }
        }
        let mut page = json!({ "chunk": chunk });
        if chunk_full(&page, limit)
            && let Some(next) = next
        {
            page["next_batch"] = json!(next.render());
        }
        Ok(page)
    }

    /// `GET /rooms/{roomId}/threads`: thread roots, most recently active first.
    pub async fn threads(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        participated_only: bool,
        from: Option<u64>,
        limit: usize,
    ) -> Result<Value, ServiceError> {
        let viewer = &mut self.reader(user_id, room_id).await?;
        let limit = limit.clamp(1, MAX_TIMELINE_LIMIT);
        let high = from.map_or(u64::MAX, |from| from.saturating_add(1));
        let range = KeyRange::between(
            &keys::thread_activity(room_id.as_str(), 0),
            &keys::thread_activity(room_id.as_str(), high),
        );
        let rows =
            self.kv.scan(Table::ThreadActivity, &range, Direction::Backward, lattice_storage::MAX_SCAN_ROWS).await?;
        let mut chunk = Vec::new();
        let mut next = None;
        for (key, root) in rows {
            let root = String::from_utf8_lossy(&root).into_owned();
            if participated_only {
                let thread =
                    lattice_storage::get::<ThreadRecord>(self.kv.as_ref(), &keys::thread(room_id.as_str(), &root))
                        .await?;
                if !thread.is_some_and(|t| t.value.participants.iter().any(|p| p == user_id.as_str())) {
                    continue;
                }
            }
            if chunk.len() == limit {
                break;
            }
            next = Some(position_of(&key).saturating_sub(1));
            if !self.may_see_id(viewer, &root).await? {
                continue;
            }
            chunk.push(self.timeline_event(viewer, &root).await?);
        }
        let mut page = json!({ "chunk": chunk });
        if chunk_full(&page, limit)
            && let Some(next) = next
        {
            page["next_batch"] = json!(format!("s{next}"));
        }
        Ok(page)
    }
}

/// The relation rows of `parent` and `rel_type` in `(after, upto]` (`None`: unbounded).
fn relation_range(parent: &str, rel_type: &str, after: Option<TopoPos>, upto: Option<TopoPos>) -> KeyRange {
    let all = KeyRange::prefix(&keys::relations_of(parent, rel_type));
    let key = |pos: TopoPos| keys::relation(parent, rel_type, pos.depth, pos.order);
    KeyRange {
        start: after.map_or(all.start, |pos| Bound::Excluded(key(pos))),
        end: upto.map_or(all.end, |pos| Bound::Included(key(pos))),
    }
}

fn chunk_full(page: &Value, limit: usize) -> bool {
    page["chunk"].as_array().is_some_and(|c| c.len() == limit)
}
