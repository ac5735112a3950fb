//! Pushed PDUs that could not be placed because what they needed could not be fetched.
//!
//! A PDU whose prev events are unknown is placed after fetching them (`/get_missing_events`) or
//! the state before it (`/state`) from the server that sent it. When those requests fail (the
//! server went away meanwhile, a network cut), the PDU is refused in the transaction's answer,
//! and the sending server does not send a refused PDU again. Without another try it would
//! surface only when a later event cites it, so a room that falls quiet right after a cut
//! would keep the gap. These are kept in `federation_refetches` (event ID → [`Waiting`]), once
//! their signatures and hashes were checked, and tried again with back-off, across restarts;
//! at most [`MAX_WAITING`] at a time, since a hostile server can push PDUs that cite events
//! nobody has.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch};
use ruma::{CanonicalJsonObject, OwnedEventId, OwnedServerName, ServerName};
use serde::{Deserialize, Serialize};

use super::Federation;
use crate::ServiceError;

/// PDUs waiting at most; more are dropped (and logged) until some are placed or given up.
const MAX_WAITING: usize = 1_000;
/// The first retry, doubled after each failure.
const FIRST_RETRY: Duration = Duration::from_secs(30);
/// Retries after the first before a PDU is given up: the tries come 30 s after the refusal, then
/// 1, 2, 4 … 128 minutes after each failure, nine in about four hours.
const MAX_RETRIES: u32 = 8;
/// How often the waiting PDUs are looked at.
const TICK: Duration = Duration::from_secs(5);

/// A row of `federation_refetches`.
#[derive(Serialize, Deserialize)]
struct Waiting {
    origin: OwnedServerName,
    room_version: String,
    /// The PDU as it was pushed (checked already).
    pdu: String,
    retries: u32,
    /// When to try next, in the service clock's milliseconds.
    due_ms: u64,
}

/// How many PDUs wait, counted from the table when the retry task starts and kept up to date
/// after; it only bounds the table, so a count off by a few under races is harmless.
#[derive(Default)]
pub(super) struct Refetches {
    waiting: AtomicUsize,
}

/// When the try after `retries` failed retries is due, from a failure at `now_ms`; `None` once
/// the PDU has had all its tries.
fn next_due(retries: u32, now_ms: u64) -> Option<u64> {
    (retries <= MAX_RETRIES).then(|| now_ms + (FIRST_RETRY * 2u32.pow(retries)).as_millis() as u64)
}

/// Whether a PDU refused with this error may be placed later: the fetches it needed failed, as
/// opposed to the PDU or the answers being wrong.
fn worth_retrying(error: &ServiceError) -> bool {
    matches!(error, ServiceError::Federation(_) | ServiceError::MissingEvents(_))
}

impl Federation {
    /// Keeps `event` for another try when `error` says a fetch it needed failed (an event
    /// already waiting keeps its schedule). Written with the transaction's other writes.
    pub(super) async fn refetch_later(
        &self,
        origin: &ServerName,
        version: &RoomVersion,
        event: &Pdu,
        error: &ServiceError,
    ) -> Result<(), ServiceError> {
        if !worth_retrying(error) {
            return Ok(());
        }
        let key = event.id().as_str().as_bytes();
        if self.kv.get(Table::FederationRefetches, key).await?.is_some() {
            return Ok(());
        }
        if self.refetches.waiting.load(Ordering::Relaxed) >= MAX_WAITING {
            tracing::warn!(%origin, event_id = %event.id(), "too many PDUs waiting for a refetch; this one is dropped");
            return Ok(());
        }
        let waiting = Waiting {
            origin: origin.to_owned(),
            room_version: version.id().to_string(),
            pdu: serde_json::to_string(event.object()).map_err(|e| ServiceError::Internal(e.to_string()))?,
            retries: 0,
            due_ms: self.rooms.now_millis() + FIRST_RETRY.as_millis() as u64,
        };
        self.write_waiting(key.to_vec(), &waiting).await?;
        self.refetches.waiting.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Tries the waiting PDUs again as they fall due, until the process ends.
    pub async fn refetch_forever(&self) {
        match self.kv.scan(Table::FederationRefetches, &KeyRange::all(), Direction::Forward, MAX_WAITING).await {
            Ok(rows) => self.refetches.waiting.store(rows.len(), Ordering::Relaxed),
            Err(error) => tracing::warn!(%error, "counting the PDUs waiting for a refetch failed"),
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            if let Err(error) = self.refetch_due().await {
                tracing::warn!(%error, "retrying refused PDUs failed");
            }
        }
    }

    async fn refetch_due(&self) -> Result<(), ServiceError> {
        let rows = self.kv.scan(Table::FederationRefetches, &KeyRange::all(), Direction::Forward, MAX_WAITING).await?;
        for (key, value) in rows {
            let Ok(waiting) = serde_json::from_slice::<Waiting>(&value) else {
                self.forget_refetch(key).await?;
                continue;
            };
            if waiting.due_ms > self.rooms.now_millis() {
                continue;
            }
            let event_id = String::from_utf8_lossy(&key).into_owned();
            let tried = match stored_pdu(&event_id, &waiting) {
                Some((version, event)) => self.ingest_or_fill_gap(&waiting.origin, &version, &event).await,
                None => Err(ServiceError::Internal("unreadable".into())),
            };
            match tried {
                Ok(ingested) => {
                    tracing::info!(%event_id, outcome = ?ingested.outcome, "a refused PDU was placed on a retry");
                    self.forget_refetch(key).await?;
                }
                Err(error) if worth_retrying(&error) => match next_due(waiting.retries + 1, self.rooms.now_millis()) {
                    Some(due_ms) => {
                        tracing::debug!(%event_id, %error, "a refused PDU's fetches failed again");
                        let again = Waiting { retries: waiting.retries + 1, due_ms, ..waiting };
                        self.write_waiting(key, &again).await?;
                    }
                    None => {
                        tracing::info!(%event_id, %error, "a refused PDU was given up after its retries");
                        self.forget_refetch(key).await?;
                    }
                },
                Err(error) => {
                    tracing::info!(%event_id, %error, "a refused PDU was refused again");
                    self.forget_refetch(key).await?;
                }
            }
        }
        Ok(())
    }

    async fn write_waiting(&self, key: Vec<u8>, waiting: &Waiting) -> Result<(), ServiceError> {
        let value = serde_json::to_vec(waiting).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let mut batch = WriteBatch::new();
        batch.put(Table::FederationRefetches, key, value);
        Ok(self.kv.write(batch).await?)
    }

    async fn forget_refetch(&self, key: Vec<u8>) -> Result<(), ServiceError> {
        let mut batch = WriteBatch::new();
        batch.delete(Table::FederationRefetches, key);
        self.kv.write(batch).await?;
        let _ = self.refetches.waiting.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        Ok(())
    }
}

/// A waiting row's PDU, as it was checked when pushed.
fn stored_pdu(event_id: &str, waiting: &Waiting) -> Option<(RoomVersion, Pdu)> {
    let version = RoomVersion::parse(&waiting.room_version).ok()?;
    let object: CanonicalJsonObject = serde_json::from_str(&waiting.pdu).ok()?;
    let event = Pdu::stored(object, &version, OwnedEventId::try_from(event_id).ok()?).ok()?;
    Some((version, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tries_back_off_then_stop() {
        let first = FIRST_RETRY.as_millis() as u64;
        assert_eq!(next_due(0, 0), Some(first));
        assert_eq!(next_due(1, 1_000), Some(1_000 + 2 * first));
        assert_eq!(next_due(MAX_RETRIES, 0), Some(first << MAX_RETRIES));
        assert_eq!(next_due(MAX_RETRIES + 1, 0), None, "given up");
        let all: u64 = (0..=MAX_RETRIES).map(|retries| next_due(retries, 0).unwrap()).sum();
        let hour_ms = 3_600_000;
        assert!((4 * hour_ms..4 * hour_ms + hour_ms / 2).contains(&all), "about four hours: {all} ms");
    }

    #[test]
    fn only_failed_fetches_are_worth_retrying() {
        assert!(worth_retrying(&ServiceError::MissingEvents("$x".into())));
        assert!(!worth_retrying(&ServiceError::BadJson("bad".into())));
        assert!(!worth_retrying(&ServiceError::Forbidden("no".into())));
    }
}
