//! The push service's schema migration: schema 4 → 5 made the rows each notification writes
//! smaller (a room of 1,000 local members writes 2,000 of them per message). What every
//! recipient's notification of an event shares moved to one `push_events` row; each recipient's
//! `push_notifications` row keeps only the actions, and a `push_unread` row is a flag byte and
//! the thread. Both steps are idempotent: a row already in the new format is left alone.

use async_trait::async_trait;
use lattice_storage::records::PushEventRecord;
use lattice_storage::{KvRead, Migration, MigrationStep, RowRewrite, StorageError, Table, WriteBatch, keys};
use serde::Deserialize;

use super::notify::{UnreadRow, encode_actions_json};

/// Schema 4 → 5: compact notification rows.
pub(crate) fn schema_5() -> Migration {
    Migration {
        from: 4,
        describe: "compact notification rows",
        steps: vec![
            MigrationStep::new(
                "push_events",
                Table::PushNotifications,
                &[Table::PushNotifications, Table::PushEvents],
                SharedNotificationParts,
            ),
            MigrationStep::new("push_unread", Table::PushUnread, &[Table::PushUnread], CompactUnread),
        ],
    }
}

/// A `push_notifications` value as schema 4 wrote it.
#[derive(Deserialize)]
struct NotificationV4 {
    room_id: String,
    event_id: String,
    #[serde(default)]
    thread: Option<String>,
    actions: serde_json::Value,
    ts: u64,
}

/// A `push_unread` value as schema 4 wrote it.
#[derive(Deserialize)]
struct UnreadV4 {
    #[serde(default)]
    thread: Option<String>,
    highlight: bool,
}

struct SharedNotificationParts;

#[async_trait]
impl RowRewrite for SharedNotificationParts {
    async fn row(&self, _: &dyn KvRead, key: &[u8], value: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        // A new row is the actions array; only an old one is an object.
        let Ok(old) = serde_json::from_slice::<NotificationV4>(value) else { return Ok(()) };
        let Some(position) = keys::trailing_position(key) else { return Ok(()) };
        let shared = PushEventRecord {
            room_id: old.room_id,
            event_id: old.event_id,
            thread: old.thread,
            ts: old.ts,
            actions: None,
        };
        lattice_storage::put(batch, keys::push_event(position), &shared);
        batch.put(Table::PushNotifications, key.to_vec(), encode_actions_json(&old.actions));
        Ok(())
    }
}

struct CompactUnread;

#[async_trait]
impl RowRewrite for CompactUnread {
    async fn row(&self, _: &dyn KvRead, key: &[u8], value: &[u8], batch: &mut WriteBatch) -> Result<(), StorageError> {
        let Ok(old) = serde_json::from_slice::<UnreadV4>(value) else { return Ok(()) };
        let row = UnreadRow { thread: old.thread, highlight: old.highlight, suppressed: false };
        batch.put(Table::PushUnread, key.to_vec(), row.encode());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lattice_storage::{KeyRange, KvStore, MemoryStore};
    use serde_json::json;

    use super::*;

    async fn rows(kv: &MemoryStore, table: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
        lattice_storage::scan_all(kv, table, &KeyRange::all()).await.unwrap()
    }

    /// Two users notified by one event and one by another, as schema 4 stored them, become one
    /// shared row per event and compact rows per user; running the migration's steps again (as
    /// after a crash) changes nothing.
    #[tokio::test]
    async fn schema_4_notifications_become_one_shared_row_per_event_and_compact_rows() {
        let kv = MemoryStore::new();
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, keys::meta("schema_version"), 4u32.to_be_bytes().to_vec());
        let notify = json!(["notify"]);
        let mention = json!(["notify", { "set_tweak": "highlight" }]);
        for (user, position, actions, thread) in
            [("@a:hs", 7u64, &notify, None), ("@b:hs", 7, &mention, None), ("@a:hs", 9, &notify, Some("$root"))]
        {
            let old = json!({ "room_id": "!r:hs", "event_id": format!("$e{position}"), "thread": thread,
                "highlight": actions == &mention, "actions": actions, "ts": 1_000 + position });
            batch.put(Table::PushNotifications, keys::push_notification(user, position), old.to_string().into_bytes());
            let unread = json!({ "thread": thread, "highlight": actions == &mention });
            batch.put(Table::PushUnread, keys::push_unread(user, "!r:hs", position), unread.to_string().into_bytes());
        }
        kv.write(batch).await.unwrap();

        lattice_storage::migrate_with(&kv, 5, &[schema_5()], 2).await.unwrap();
        let shared = rows(&kv, Table::PushEvents).await;
        assert_eq!(shared.len(), 2, "one row per event");
        let seventh: PushEventRecord = serde_json::from_slice(&shared[0].1).unwrap();
        assert_eq!(
            seventh,
            PushEventRecord { room_id: "!r:hs".into(), event_id: "$e7".into(), thread: None, ts: 1_007, actions: None }
        );
        let ninth: PushEventRecord = serde_json::from_slice(&shared[1].1).unwrap();
        assert_eq!(ninth.thread.as_deref(), Some("$root"));
        let notifications = rows(&kv, Table::PushNotifications).await;
        let b_row = notifications.iter().find(|(key, _)| key.starts_with(b"@b:hs")).unwrap();
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&b_row.1).unwrap(), mention);
        let unread = rows(&kv, Table::PushUnread).await;
        let decoded: Vec<UnreadRow> = unread.iter().map(|(_, value)| UnreadRow::decode(value).unwrap()).collect();
        assert!(decoded.contains(&UnreadRow { thread: Some("$root".into()), highlight: false, suppressed: false }));
        assert!(decoded.contains(&UnreadRow { thread: None, highlight: true, suppressed: false }));

        // Each step again over the migrated rows: nothing changes.
        let before = (rows(&kv, Table::PushNotifications).await, rows(&kv, Table::PushUnread).await);
        for step in &schema_5().steps {
            let mut batch = WriteBatch::new();
            for (key, value) in rows(&kv, step.reads).await {
                step.rewrite.row(&kv, &key, &value, &mut batch).await.unwrap();
            }
            assert!(batch.ops.is_empty(), "step {} rewrote a migrated row", step.name);
        }
        assert_eq!(before, (rows(&kv, Table::PushNotifications).await, rows(&kv, Table::PushUnread).await));
    }
}
