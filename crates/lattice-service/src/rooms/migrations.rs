//! The schema migrations that need Matrix knowledge (parsing stored events), run at open by the
//! chunked runner in `lattice_storage::schema`. Each step handles one row at a time and is
//! idempotent, so a chunk that runs twice after a crash changes nothing the second time.

use async_trait::async_trait;
use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_storage::records::{
    EventRecord, EventStatus, MemberCounts, ReceiptRecord, RelationRecord, RoomRecord, ThreadRecord,
};
use lattice_storage::{KeyRange, KvRead, Migration, MigrationStep, RowRewrite, StorageError, Table, WriteBatch, keys};
use ruma::events::TimelineEventType;
use ruma::state_res::Event;
use ruma::{CanonicalJsonObject, OwnedEventId};

use super::relations::{MAX_THREAD_PARTICIPANTS, relation_of};

/// Every migration this binary knows, oldest first, for `lattice_storage::open_schema` (the
/// push service's own, schema 5, included).
pub fn schema_migrations() -> Vec<Migration> {
    vec![schema_2(), schema_3(), schema_4(), crate::push::schema_5()]
}

/// Schema 3 → 4: the message-search index, for the events stored before it existed.
fn schema_4() -> Migration {
    Migration {
        from: 3,
        describe: "message search index",
        steps: vec![MigrationStep::new("search_words", Table::Events, &[Table::SearchWords], SearchWords)],
    }
}

/// Schema 2 → 3: the account-data change index and the room activity index, so an incremental
/// `/sync` reads what changed since its token instead of every entry and room of the user.
fn schema_3() -> Migration {
    let activity =
        |name, reads, stream| MigrationStep::new(name, reads, &[Table::RoomActivity], RoomActivity { reads, stream });
    Migration {
        from: 2,
        describe: "account data change index, room activity index",
        steps: vec![
            MigrationStep::new(
                "account_data_changes",
                Table::AccountDataPositions,
                &[Table::AccountDataChanges],
                AccountDataChanges,
            ),
            activity("room_activity_of_events", Table::Timeline, keys::ACTIVITY_EVENTS),
            activity("room_activity_of_receipts", Table::ReceiptPositions, keys::ACTIVITY_RECEIPTS),
        ],
    }
}

/// Schema 1 → 2 (issue #10): the topological index, the state groups of each room's front, relations in
/// topological order, and the indexes and fields that stores older than them lack.
fn schema_2() -> Migration {
    use MigrationStep as Step;
    Migration {
        from: 1,
        describe: "topological order, front state groups, and indexes older stores lack",
        steps: vec![
            Step::new("topological_rows", Table::Events, &[Table::Topological], TopologicalRows),
            Step::new("extremity_groups", Table::Rooms, &[Table::Rooms], ExtremityGroups),
            Step::new("redacted_by", Table::Events, &[Table::Events], RedactedBy),
            Step::new("relations_in_topological_order", Table::Events, &[Table::Relations], RelationsInOrder),
            Step::drop_table("drop_thread_summaries", Table::Threads, &[Table::Threads]),
            Step::drop_table("drop_thread_activity", Table::ThreadActivity, &[Table::ThreadActivity]),
            Step::new("thread_summaries", Table::Relations, &[Table::Threads, Table::ThreadActivity], ThreadSummaries),
            Step::new("event_timestamps", Table::Events, &[Table::EventTimestamps], EventTimestamps),
            Step::new("receipt_positions", Table::Receipts, &[Table::ReceiptPositions], ReceiptPositions),
            Step::new("member_counts", Table::Rooms, &[Table::Rooms], CountedMembers),
            Step::drop_table("drop_auth_chains", Table::AuthChains, &[Table::AuthChains]),
        ],
    }
}

fn corrupt(table: Table, detail: impl ToString) -> StorageError {
    StorageError::Corrupt { table: table.name(), detail: detail.to_string() }
}

fn decode<T: serde::de::DeserializeOwned>(table: Table, raw: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(raw).map_err(|e| corrupt(table, e))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialise to JSON")
}

/// A stored event row, typed: the event and its room's version.
struct Stored {
    event: Pdu,
    version: RoomVersion,
}

/// Types an `events` row.
async fn stored_event(kv: &dyn KvRead, key: &[u8], raw: &[u8]) -> Result<Stored, StorageError> {
    let record: EventRecord = decode(Table::Events, raw)?;
    let room = lattice_storage::get::<RoomRecord>(kv, &keys::room(&record.room_id))
        .await?
        .ok_or_else(|| corrupt(Table::Events, format!("event of unknown room {}", record.room_id)))?;
    let version = RoomVersion::parse(&room.value.room_version).map_err(|e| corrupt(Table::Rooms, e))?;
    let id =
        OwnedEventId::try_from(String::from_utf8_lossy(key).into_owned()).map_err(|e| corrupt(Table::Events, e))?;
    let object: CanonicalJsonObject = serde_json::from_str(&record.json).map_err(|e| corrupt(Table::Events, e))?;
    let event = Pdu::stored(object, &version, id).map_err(|e| corrupt(Table::Events, e))?;
    Ok(Stored { event, version })
}

/// The event's depth as the topological index orders it (`depth` is at most 2^53 − 1, so no
/// clamping is needed beyond the type).
fn depth_of(event: &Pdu) -> u64 {
    u64::from(event.depth())
}

/// `topological` rows for every event with a stream position; its order is that position.
struct TopologicalRows;

#[async_trait]
impl RowRewrite for TopologicalRows {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let record: EventRecord = decode(Table::Events, raw)?;
        let Some(position) = record.stream_position else { return Ok(()) };
        let stored = stored_event(kv, key, raw).await?;
        batch.put(
            Table::Topological,
            keys::topological(&record.room_id, depth_of(&stored.event), position),
            key.to_vec(),
        );
        Ok(())
    }
}

/// `extremity_groups` in each room record: how many of its forward extremities are at each state
/// group, so the next event learns whether the front has one state without reading every
/// extremity (ingest would otherwise count them on the room's next event).
struct ExtremityGroups;

#[async_trait]
impl RowRewrite for ExtremityGroups {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let mut room: RoomRecord = decode(Table::Rooms, raw)?;
        if room.extremity_groups.is_some() {
            return Ok(());
        }
        let mut groups: Vec<(u64, u32)> = Vec::new();
        for extremity in &room.forward_extremities {
            let event = lattice_storage::get::<EventRecord>(kv, &keys::event(extremity))
                .await?
                .ok_or_else(|| corrupt(Table::Rooms, format!("forward extremity {extremity} is not stored")))?;
            super::front::count(&mut groups, event.value.state_group, true);
        }
        room.extremity_groups = Some(groups);
        batch.put(Table::Rooms, key.to_vec(), encode(&room));
        Ok(())
    }
}

/// `redacted_by` for events redacted before that field existed: an accepted redaction of the
/// same room whose target is stored in its redacted form. The first such redaction in event-ID
/// order names it (read through the chunk's batch, so the answer does not depend on chunking).
struct RedactedBy;

#[async_trait]
impl RowRewrite for RedactedBy {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let record: EventRecord = decode(Table::Events, raw)?;
        if record.status != EventStatus::Accepted || !record.json.contains("m.room.redaction") {
            return Ok(());
        }
        let redaction = stored_event(kv, key, raw).await?;
        if *redaction.event.kind() != TimelineEventType::RoomRedaction {
            return Ok(());
        }
        let Some(target_id) = redaction.event.redacts() else { return Ok(()) };
        let target_key = keys::event(target_id.as_str());
        let Some(target_raw) = lattice_storage::read_through(kv, batch, Table::Events, &target_key).await? else {
            return Ok(());
        };
        let mut target: EventRecord = decode(Table::Events, &target_raw)?;
        if target.redacted_by.is_some()
            || target.room_id != record.room_id
            || !stored_redacted(&target, &redaction.version)?
        {
            return Ok(());
        }
        target.redacted_by = Some(redaction.event.id().to_string());
        batch.put(Table::Events, target_key, encode(&target));
        Ok(())
    }
}

/// Whether the stored JSON is already in its redacted form.
fn stored_redacted(record: &EventRecord, version: &RoomVersion) -> Result<bool, StorageError> {
    let object: CanonicalJsonObject = serde_json::from_str(&record.json).map_err(|e| corrupt(Table::Events, e))?;
    let redacted = lattice_core::pdu::redacted(object.clone(), version).map_err(|e| corrupt(Table::Events, e))?;
    Ok(redacted == object)
}

/// The relations index in schema 2's layout (`parent\0rel_type\0depth·order`), built from the
/// events by ingest's rules (accepted, not redacted, parent an event of the same room); the
/// schema-1 rows (`parent\0rel_type\0position`) are deleted.
struct RelationsInOrder;

#[async_trait]
impl RowRewrite for RelationsInOrder {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let record: EventRecord = decode(Table::Events, raw)?;
        let Some(position) = record.stream_position else { return Ok(()) };
        if !record.json.contains("m.relates_to") {
            return Ok(());
        }
        let stored = stored_event(kv, key, raw).await?;
        let Some(relation) = relation_of(&stored.event) else { return Ok(()) };
        for rel_type in ["", relation.rel_type.as_str()] {
            batch.delete(Table::Relations, keys::relation_schema1(&relation.parent, rel_type, position));
        }
        if record.redacted_by.is_some() || !is_event_of_room(kv, &relation.parent, &record.room_id).await? {
            return Ok(());
        }
        let row = RelationRecord {
            event_id: stored.event.id().to_string(),
            rel_type: relation.rel_type.clone(),
            event_type: stored.event.kind().to_string(),
            sender: stored.event.sender().to_string(),
        };
        let depth = depth_of(&stored.event);
        for rel_type in ["", relation.rel_type.as_str()] {
            let key = keys::relation(&relation.parent, rel_type, depth, position);
            batch.put(Table::Relations, key, encode(&row));
        }
        Ok(())
    }
}

/// The rule ingest applies before indexing a relation: the parent is an accepted event of the
/// relating event's room.
async fn is_event_of_room(kv: &dyn KvRead, event_id: &str, room_id: &str) -> Result<bool, StorageError> {
    let record = lattice_storage::get::<EventRecord>(kv, &keys::event(event_id)).await?;
    Ok(record.is_some_and(|r| r.value.room_id == room_id && r.value.stream_position.is_some()))
}

/// Thread summaries and the `/threads` order, rebuilt from the (just rebuilt) `m.thread`
/// relation rows as ingest keeps them: the root's sender first among the participants, then
/// each replier; the newest reply by stream position is the latest. The two steps before this
/// one empty both tables, so counting from zero is right, and a chunk that runs again after a
/// crash starts from the summaries its predecessor committed.
struct ThreadSummaries;

#[async_trait]
impl RowRewrite for ThreadSummaries {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        // Parent event IDs hold no NUL (`relation_of`), so the parent is the key's first part.
        let root = String::from_utf8_lossy(key.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        let typed_prefix = keys::relations_of(&root, "m.thread");
        let reply: RelationRecord = decode(Table::Relations, raw)?;
        // Each relation has a row under its type and one under "": count the typed one.
        if reply.rel_type != "m.thread" || key.len() != typed_prefix.len() + 16 || !key.starts_with(&typed_prefix) {
            return Ok(());
        }
        let Some((_, position)) = keys::depth_and_order_of(key) else { return Ok(()) };
        let Some(root_record) = lattice_storage::get::<EventRecord>(kv, &keys::event(&root)).await? else {
            return Ok(());
        };
        let room = root_record.value.room_id.clone();
        let thread_key = keys::thread(&room, &root);
        let mut thread = match lattice_storage::read_through(kv, batch, Table::Threads, &thread_key).await? {
            Some(stored) => decode::<ThreadRecord>(Table::Threads, &stored)?,
            None => ThreadRecord {
                participants: sender_of(&root_record.value)?.into_iter().collect(),
                ..Default::default()
            },
        };
        if thread.count == 0 || position > thread.latest_position {
            if thread.count > 0 {
                batch.delete(Table::ThreadActivity, keys::thread_activity(&room, thread.latest_position));
            }
            thread.latest_event_id = reply.event_id.clone();
            thread.latest_position = position;
            batch.put(Table::ThreadActivity, keys::thread_activity(&room, position), root.as_bytes().to_vec());
        }
        thread.count += 1;
        if !thread.participants.contains(&reply.sender) && thread.participants.len() < MAX_THREAD_PARTICIPANTS {
            thread.participants.push(reply.sender);
        }
        batch.put(Table::Threads, thread_key, encode(&thread));
        Ok(())
    }
}

fn sender_of(record: &EventRecord) -> Result<Option<String>, StorageError> {
    let event: serde_json::Value = serde_json::from_str(&record.json).map_err(|e| corrupt(Table::Events, e))?;
    Ok(event["sender"].as_str().map(str::to_owned))
}

/// `event_timestamps` rows for events stored before that index existed.
struct EventTimestamps;

#[async_trait]
impl RowRewrite for EventTimestamps {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let record: EventRecord = decode(Table::Events, raw)?;
        let Some(position) = record.stream_position else { return Ok(()) };
        let stored = stored_event(kv, key, raw).await?;
        let ts = u64::from(stored.event.origin_server_ts().get());
        batch.put(Table::EventTimestamps, keys::event_timestamp(&record.room_id, ts, position), key.to_vec());
        Ok(())
    }
}

/// `receipt_positions` rows for receipts written before that index existed.
struct ReceiptPositions;

#[async_trait]
impl RowRewrite for ReceiptPositions {
    async fn row(&self, _: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let receipt: ReceiptRecord = decode(Table::Receipts, raw)?;
        // `room\0user\0type\0thread`: room IDs hold no NUL, so the room is the first part.
        let room = key.split(|b| *b == 0).next().unwrap_or_default();
        let room = String::from_utf8_lossy(room);
        batch.put(Table::ReceiptPositions, keys::receipt_position(&room, receipt.stream_position), key.to_vec());
        Ok(())
    }
}

/// `account_data_changes` rows for account data written before that index existed: one per
/// entry, under the entry's stored position.
struct AccountDataChanges;

#[async_trait]
impl RowRewrite for AccountDataChanges {
    async fn row(&self, _: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let position = keys::stored_position(raw)
            .ok_or_else(|| corrupt(Table::AccountDataPositions, "a position is not eight bytes"))?;
        // `user\0room\0type`: user IDs hold no NUL, so the user is the first part.
        let user = key.split(|b| *b == 0).next().unwrap_or_default();
        let user = String::from_utf8_lossy(user);
        batch.put(Table::AccountDataChanges, keys::account_data_change(&user, position), key.to_vec());
        Ok(())
    }
}

/// `room_activity` rows for the events and receipts stored before that index existed, from the
/// `timeline` and `receipt_positions` rows, which share the key `room\0position`.
struct RoomActivity {
    reads: Table,
    /// The stream tag of the rows written (`keys::ACTIVITY_*`).
    stream: u8,
}

#[async_trait]
impl RowRewrite for RoomActivity {
    async fn row(&self, _: &dyn KvRead, key: &[u8], _: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        // The position is the last eight bytes, after the room and its separator.
        let too_short = || corrupt(self.reads, "a key too short for a position");
        let position = keys::trailing_position(key).ok_or_else(too_short)?;
        let room_end = key.len().checked_sub(9).ok_or_else(too_short)?;
        let room = String::from_utf8_lossy(&key[..room_end]);
        batch.put(Table::RoomActivity, keys::room_activity(self.stream, position, &room), Vec::new());
        Ok(())
    }
}

/// Member counts for rooms stored before counts existed, counted from the room's current member
/// state (through the memberships table, which mirrors it).
struct CountedMembers;

#[async_trait]
impl RowRewrite for CountedMembers {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let mut room: RoomRecord = decode(Table::Rooms, raw)?;
        if room.member_counts.is_some() {
            return Ok(());
        }
        let room_id = String::from_utf8_lossy(key).into_owned();
        let prefix = keys::current_state(&room_id, "m.room.member", "");
        let members = lattice_storage::scan_all(kv, Table::CurrentState, &KeyRange::prefix(&prefix)).await?;
        let mut counts = MemberCounts::default();
        for (member_key, _) in members {
            let user = String::from_utf8_lossy(&member_key[prefix.len()..]).into_owned();
            let membership = kv.get(Table::Memberships, &keys::membership(&user, &room_id)).await?;
            let membership = membership.map(|m| String::from_utf8_lossy(&m).into_owned());
            counts = counts.moved(None, membership.as_deref());
        }
        room.member_counts = Some(counts);
        batch.put(Table::Rooms, key.to_vec(), encode(&room));
        Ok(())
    }
}

/// `search_words` rows for every accepted, unredacted event in a room's history, as ingest
/// writes them (`rooms/search.rs`).
struct SearchWords;

#[async_trait]
impl RowRewrite for SearchWords {
    async fn row(&self, kv: &dyn KvRead, key: &[u8], raw: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let record: EventRecord = decode(Table::Events, raw)?;
        let Some(order) = record.history_order() else { return Ok(()) };
        if record.status != EventStatus::Accepted || record.redacted_by.is_some() {
            return Ok(());
        }
        let stored = stored_event(kv, key, raw).await?;
        super::search::index_event(batch, &record.room_id, &stored.event, order);
        Ok(())
    }
}
