//! Read receipts (`m.read`, `m.read.private`, threaded or not), stored with a stream position
//! so `/sync` delivers each change once.

use lattice_storage::records::ReceiptRecord;
use lattice_storage::{KeyRange, StorageError, Table, WriteBatch, keys};
use ruma::{RoomId, UserId};
use serde_json::{Map, Value, json};

use super::Rooms;
use crate::ServiceError;

const RECEIPT_TYPES: &[&str] = &["m.read", "m.read.private"];
/// The read marker, which `/receipt` also sets (spec v1.4+), stored as room account data.
const FULLY_READ: &str = "m.fully_read";
/// How often a receipt is re-read and written again when the same user's other receipt for the
/// same slot keeps winning the race.
const RECEIPT_WRITE_RETRIES: usize = 8;

impl Rooms {
    /// `POST /rooms/{roomId}/receipt/{receiptType}/{eventId}`.
    pub async fn set_receipt(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        receipt_type: &str,
        event_id: &str,
        thread_id: Option<String>,
    ) -> Result<(), ServiceError> {
        if receipt_type == FULLY_READ {
            // Since v1.4 the read marker may come this way too; it is not a receipt.
            if thread_id.is_some() {
                return Err(ServiceError::InvalidParam("m.fully_read takes no thread_id".into()));
            }
            return self.set_read_markers(user_id, room_id, Some(event_id), None, None).await;
        }
        if !RECEIPT_TYPES.contains(&receipt_type) {
            return Err(ServiceError::InvalidParam(format!(
                "receipt type must be one of {RECEIPT_TYPES:?} or {FULLY_READ}"
            )));
        }
        self.store_receipt(user_id, room_id, receipt_type, event_id, thread_id).await
    }

    /// Stores a receipt with a new stream position, and moves its row in the room's
    /// position index (`receipt_positions`) in the same batch.
    async fn store_receipt(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        receipt_type: &str,
        event_id: &str,
        thread_id: Option<String>,
    ) -> Result<(), ServiceError> {
        self.require_member(user_id, room_id).await?;
        self.require_visible(user_id, room_id, event_id).await?;
        let key = keys::receipt(room_id.as_str(), user_id.as_str(), receipt_type, thread_id.as_deref().unwrap_or(""));
        // Two receipts of one user in one room race only with each other: the loser re-reads.
        for _ in 0..RECEIPT_WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            let previous = lattice_storage::get::<ReceiptRecord>(self.kv.as_ref(), &key).await?;
            if let Some(previous) = &previous {
                let moved = previous.value.stream_position;
                batch.delete(Table::ReceiptPositions, keys::receipt_position(room_id.as_str(), moved));
                batch
                    .delete(Table::RoomActivity, keys::room_activity(keys::ACTIVITY_RECEIPTS, moved, room_id.as_str()));
            }
            batch.expect(Table::Receipts, key.clone(), previous.map(|p| p.raw));
            // The position and the receipt commit together, like an event and its position.
            let position = self.receipts_stream.take().await?;
            let record = ReceiptRecord {
                user_id: user_id.to_string(),
                receipt_type: receipt_type.to_owned(),
                event_id: event_id.to_owned(),
                thread_id: thread_id.clone(),
                ts: self.now_ms(),
                stream_position: position.get(),
            };
            batch.put(Table::ReceiptPositions, keys::receipt_position(room_id.as_str(), position.get()), key.clone());
            batch.put(
                Table::RoomActivity,
                keys::room_activity(keys::ACTIVITY_RECEIPTS, position.get(), room_id.as_str()),
                Vec::new(),
            );
            lattice_storage::put(&mut batch, key.clone(), &record);
            match self.kv.write(batch).await {
                Ok(()) => {
                    // The counts it clears are cleared before the receipt shows.
                    self.receipt_read(user_id, room_id, event_id, thread_id.as_deref()).await;
                    position.published().await;
                    self.notifier.notify_room(room_id);
                    return Ok(());
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent receipts; try again".into()))
    }

    /// Moves the user's push read marker to the receipt's event (if it has a stream position:
    /// only live events notify). Logged, not returned: the receipt is stored.
    async fn receipt_read(&self, user_id: &UserId, room_id: &RoomId, event_id: &str, thread_id: Option<&str>) {
        let marked = async {
            let record =
                lattice_storage::get::<lattice_storage::records::EventRecord>(self.kv.as_ref(), &keys::event(event_id))
                    .await?;
            if let Some(position) = record.and_then(|r| r.value.stream_position) {
                self.push.mark_read(user_id, room_id, thread_id, position).await?;
            }
            Ok::<_, ServiceError>(())
        };
        if let Err(error) = marked.await {
            tracing::warn!(room = %room_id, user = %user_id, %error, "the receipt did not reset unread counts");
        }
    }

    /// `POST /rooms/{roomId}/read_markers`: the fully-read marker (room account data
    /// `m.fully_read`) and, optionally, receipts, in one call.
    pub async fn set_read_markers(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        fully_read: Option<&str>,
        read: Option<&str>,
        read_private: Option<&str>,
    ) -> Result<(), ServiceError> {
        self.require_member(user_id, room_id).await?;
        if let Some(event_id) = fully_read {
            self.require_visible(user_id, room_id, event_id).await?;
            let content = serde_json::from_value(json!({ "event_id": event_id }))
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            self.account_data.write_account_data(user_id, Some(room_id), "m.fully_read", content).await?;
        }
        for (kind, event_id) in [("m.read", read), ("m.read.private", read_private)] {
            if let Some(event_id) = event_id {
                self.store_receipt(user_id, room_id, kind, event_id, None).await?;
            }
        }
        Ok(())
    }

    /// The room's `m.receipt` event for `viewer` with the receipts changed in `(since, now]`
    /// (private receipts only the viewer's own), if any. An incremental sync reads only the
    /// changed ones, from the room's position index; an initial one (`since` 0) every receipt.
    pub(crate) async fn receipts_since(
        &self,
        viewer: &UserId,
        room_id: &RoomId,
        since: u64,
        now: u64,
    ) -> Result<Option<Value>, ServiceError> {
        let receipts = if since == 0 {
            let prefix = keys::room_rows(room_id.as_str());
            lattice_storage::scan_all(self.kv.as_ref(), Table::Receipts, &KeyRange::prefix(&prefix))
                .await?
                .into_iter()
                .map(|(_, raw)| raw)
                .collect()
        } else {
            self.changed_receipts(room_id, since, now).await?
        };
        let mut content: Map<String, Value> = Map::new();
        for raw in receipts {
            let receipt: ReceiptRecord =
                serde_json::from_slice(&raw).map_err(|e| ServiceError::Internal(e.to_string()))?;
            let fresh = receipt.stream_position > since && receipt.stream_position <= now;
            let visible = receipt.receipt_type != "m.read.private" || receipt.user_id == viewer.as_str();
            if !fresh || !visible {
                continue;
            }
            let mut entry = json!({ "ts": receipt.ts });
            if let Some(thread) = &receipt.thread_id {
                entry["thread_id"] = json!(thread);
            }
            let by_type = content.entry(receipt.event_id.clone()).or_insert_with(|| json!({}));
            by_type[&receipt.receipt_type][&receipt.user_id] = entry;
        }
        Ok((!content.is_empty()).then(|| json!({ "type": "m.receipt", "content": content })))
    }

    /// The stored receipts of the room whose position is in `(since, now]`, via the index.
    async fn changed_receipts(&self, room_id: &RoomId, since: u64, now: u64) -> Result<Vec<Vec<u8>>, ServiceError> {
        let range = KeyRange::between(
            &keys::receipt_position(room_id.as_str(), since.saturating_add(1)),
            &keys::receipt_position(room_id.as_str(), now.saturating_add(1)),
        );
        let mut receipts = Vec::new();
        for (_, receipt_key) in lattice_storage::scan_all(self.kv.as_ref(), Table::ReceiptPositions, &range).await? {
            if let Some(raw) = self.kv.get(Table::Receipts, &receipt_key).await? {
                receipts.push(raw);
            }
        }
        Ok(receipts)
    }
}
