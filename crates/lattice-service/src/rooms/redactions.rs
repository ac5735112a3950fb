//! Who may redact what, from this server's clients, and what moderators keep afterwards: the
//! unredacted original of each redacted event, readable by server admins (MSC2815) until the
//! retention (`rooms.redaction_retention`) has passed.
//!
//! The spec's rule for clients: a user may redact their own events, and others' only with the
//! `redact` power level. Ingest applies the looser server rule to events from other servers (a
//! server vouches for its own users), so a local client's redaction is checked here, first.

use lattice_core::power::RoomPower;
use lattice_core::room_version::RoomVersion;
use lattice_storage::records::{EventRecord, RedactedOriginalRecord};
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::{EventId, RoomId, UserId};
use serde_json::Value;

use super::Rooms;
use crate::ServiceError;

/// Kept originals deleted per batch by one purge step.
const PURGE_BATCH_ROWS: usize = 1_000;

impl Rooms {
    /// Refuses a local user's redaction unless its target is an event of the same room and the
    /// user sent it or has the `redact` power level in the room's current state.
    pub(super) async fn check_client_redaction(
        &self,
        version: &RoomVersion,
        sender: &UserId,
        room_id: &RoomId,
        content: &Value,
    ) -> Result<(), ServiceError> {
        let Some(target) = content.get("redacts").and_then(Value::as_str) else {
            return Err(ServiceError::BadJson("a redaction names the event it redacts in content.redacts".into()));
        };
        let target = EventId::parse(target)
            .map_err(|e| ServiceError::InvalidParam(format!("invalid event ID to redact {target:?}: {e}")))?;
        let not_found = || ServiceError::NotFound(format!("no event {target} in {room_id}"));
        let record = lattice_storage::get::<EventRecord>(self.kv.as_ref(), &keys::event(target.as_str()))
            .await?
            .ok_or_else(not_found)?;
        // Rejected and soft-failed events are not part of the room as clients see it.
        if record.value.room_id != room_id.as_str() || record.value.stream_position.is_none() {
            return Err(not_found());
        }
        let original: Value =
            serde_json::from_str(&record.value.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
        if original["sender"].as_str() == Some(sender.as_str()) {
            return Ok(());
        }
        let (create, power_levels) = self.power_events(version, room_id).await?;
        let power = RoomPower::new(version, &create, power_levels.as_ref()).map_err(ServiceError::Internal)?;
        if !power.may_redact(sender).map_err(ServiceError::Internal)? {
            return Err(ServiceError::Forbidden(format!(
                "{sender} may redact only their own events in {room_id}; others' need the redact power level"
            )));
        }
        Ok(())
    }

    /// Keeps `original_json`, the stored form of `event_id` before a redaction took effect, in
    /// the redaction's own batch. Nothing is kept when the retention is zero or the stored form
    /// is redacted already (a second redaction must not replace the original with it).
    pub(super) fn keep_redacted_original(
        &self,
        batch: &mut WriteBatch,
        event_id: &EventId,
        redaction_id: &EventId,
        original_json: &str,
        redacted_json: &str,
    ) {
        if self.config().redaction_retention_ms == 0 || original_json == redacted_json {
            return;
        }
        let redacted_ms = self.now_ms();
        let record = RedactedOriginalRecord {
            json: original_json.to_owned(),
            redaction_id: redaction_id.to_string(),
            redacted_ms,
        };
        lattice_storage::put(batch, keys::redacted_original(event_id.as_str()), &record);
        batch.put(
            Table::RedactedOriginalsByTime,
            keys::redacted_original_by_time(redacted_ms, event_id.as_str()),
            Vec::new(),
        );
    }

    /// Deletes the kept originals whose retention has passed; returns how many.
    pub async fn purge_expired_redacted_originals(&self) -> Result<usize, ServiceError> {
        // Expired: redacted at or before `now - retention` (the read side agrees).
        let cutoff = self.now_ms().saturating_sub(self.config().redaction_retention_ms);
        let expired = KeyRange::between(
            &keys::redacted_original_by_time(0, ""),
            &keys::redacted_original_by_time(cutoff.saturating_add(1), ""),
        );
        let mut purged = 0;
        loop {
            let rows =
                self.kv.scan(Table::RedactedOriginalsByTime, &expired, Direction::Forward, PURGE_BATCH_ROWS).await?;
            if rows.is_empty() {
                return Ok(purged);
            }
            let mut batch = WriteBatch::new();
            for (key, _) in &rows {
                if let Some(event_id) = keys::event_of_redacted_original_by_time(key) {
                    let event_id = String::from_utf8_lossy(event_id);
                    self.delete_kept_original_if_from(&mut batch, &event_id, key).await?;
                }
                batch.delete(Table::RedactedOriginalsByTime, key.clone());
            }
            self.kv.write(batch).await?;
            purged += rows.len();
        }
    }

    /// Deletes the kept original of `event_id` when it is the one the time index row
    /// `by_time_key` points at.
    async fn delete_kept_original_if_from(
        &self,
        batch: &mut WriteBatch,
        event_id: &str,
        by_time_key: &[u8],
    ) -> Result<(), ServiceError> {
        let key = keys::redacted_original(event_id);
        if let Some(kept) = lattice_storage::get::<RedactedOriginalRecord>(self.kv.as_ref(), &key).await?
            && keys::redacted_original_by_time(kept.value.redacted_ms, event_id) == by_time_key
        {
            batch.delete(Table::RedactedOriginals, key);
        }
        Ok(())
    }

    /// `GET /rooms/{roomId}/event/{eventId}?fi.mau.msc2815.include_unredacted_content=true`:
    /// the event as `room_event` serves it, with the content it had before a redaction while
    /// the original is kept. Only for server admins.
    pub async fn room_event_unredacted(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        event_id: &str,
    ) -> Result<Value, ServiceError> {
        if !self.is_server_admin(user_id).await? {
            return Err(ServiceError::Forbidden("only server admins may read the content of redacted events".into()));
        }
        let mut event = self.room_event(user_id, room_id, event_id).await?;
        let kept = lattice_storage::get::<RedactedOriginalRecord>(self.kv.as_ref(), &keys::redacted_original(event_id))
            .await?;
        let retention = self.config().redaction_retention_ms;
        if let Some(kept) = kept.filter(|k| k.value.redacted_ms.saturating_add(retention) > self.now_ms()) {
            let original: Value =
                serde_json::from_str(&kept.value.json).map_err(|e| ServiceError::Internal(e.to_string()))?;
            event["content"] = original["content"].clone();
        }
        Ok(event)
    }
}
