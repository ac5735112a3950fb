//! Pushed PDUs that could not be placed because what they needed could not be fetched.
//!
//! A PDU whose prev events are unknown is placed after fetching them (`/get_missing_events`) or
//! the state before it (`/state`) from the server that sent it. When those requests fail (the
//! server went away meanwhile, a network cut), the PDU is refused in the transaction's answer,
//! and the sending server does not send a refused PDU again. Without another try it would
//! surface only when a later event cites it, so a room that falls quiet right after a cut
//! would keep the gap. These are tried again here, with back-off, after their signatures and
//! hashes were checked; in memory only (an unanswered PDU was never promised to anyone) and
//! bounded, since a hostile server can push PDUs that cite events nobody has.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lattice_core::event::Pdu;
use lattice_core::room_version::RoomVersion;
use ruma::{OwnedEventId, OwnedServerName, ServerName};
use tokio::time::Instant;

use super::Federation;
use crate::ServiceError;

/// PDUs waiting at most; more are dropped (and logged) until some are placed or given up.
const MAX_WAITING: usize = 1_000;
/// The first retry, doubled after each failure.
const FIRST_RETRY: Duration = Duration::from_secs(30);
/// Tries after the first refusal before a PDU is given up (30 s doubling: about two hours).
const MAX_RETRIES: u32 = 8;
/// How often the waiting PDUs are looked at.
const TICK: Duration = Duration::from_secs(5);

struct Waiting {
    origin: OwnedServerName,
    version: RoomVersion,
    event: Pdu,
    retries: u32,
    due: Instant,
}

#[derive(Default)]
pub(super) struct Refetches {
    waiting: Mutex<HashMap<OwnedEventId, Waiting>>,
}

impl Refetches {
    /// Keeps a PDU refused for a failed fetch, to be tried again after `FIRST_RETRY` (an event
    /// already waiting keeps its schedule).
    fn remember(&self, origin: &ServerName, version: &RoomVersion, event: Pdu, now: Instant) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if waiting.contains_key(event.id()) {
            return;
        }
        if waiting.len() >= MAX_WAITING {
            tracing::warn!(%origin, event_id = %event.id(), "too many PDUs waiting for a refetch; this one is dropped");
            return;
        }
        let entry =
            Waiting { origin: origin.to_owned(), version: version.clone(), event, retries: 0, due: now + FIRST_RETRY };
        waiting.insert(entry.event.id().to_owned(), entry);
    }

    /// Takes the PDUs whose retry is due.
    fn take_due(&self, now: Instant) -> Vec<Waiting> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let due: Vec<OwnedEventId> = waiting.iter().filter(|(_, w)| w.due <= now).map(|(id, _)| id.clone()).collect();
        due.iter().filter_map(|id| waiting.remove(id)).collect()
    }

    /// Puts a PDU whose retry failed back, later, unless it has had all its tries.
    fn put_back(&self, mut entry: Waiting, now: Instant) {
        entry.retries += 1;
        if entry.retries > MAX_RETRIES {
            tracing::info!(origin = %entry.origin, event_id = %entry.event.id(), "a refused PDU was given up after its retries");
            return;
        }
        entry.due = now + FIRST_RETRY * 2u32.pow(entry.retries);
        let mut waiting = self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        waiting.entry(entry.event.id().to_owned()).or_insert(entry);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

/// Whether a PDU refused with this error may be placed later: the fetches it needed failed, as
/// opposed to the PDU or the answers being wrong.
fn worth_retrying(error: &ServiceError) -> bool {
    matches!(error, ServiceError::Federation(_) | ServiceError::MissingEvents(_))
}

impl Federation {
    /// Keeps `event` for another try when `error` says a fetch it needed failed.
    pub(super) fn refetch_later(&self, origin: &ServerName, version: &RoomVersion, event: &Pdu, error: &ServiceError) {
        if worth_retrying(error) {
            self.refetches.remember(origin, version, event.clone(), Instant::now());
        }
    }

    /// Tries the waiting PDUs again as they fall due, until the process ends.
    pub async fn refetch_forever(&self) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            self.refetch_due().await;
        }
    }

    async fn refetch_due(&self) {
        for entry in self.refetches.take_due(Instant::now()) {
            let event_id = entry.event.id().to_owned();
            match self.ingest_or_fill_gap(&entry.origin, &entry.version, &entry.event).await {
                Ok(ingested) => {
                    tracing::info!(%event_id, outcome = ?ingested.outcome, "a refused PDU was placed on a retry")
                }
                Err(error) if worth_retrying(&error) => {
                    tracing::debug!(%event_id, %error, "a refused PDU's fetches failed again");
                    self.refetches.put_back(entry, Instant::now());
                }
                Err(error) => tracing::info!(%event_id, %error, "a refused PDU was refused again"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::CanonicalJsonObject;

    fn event(n: usize) -> Pdu {
        let object: CanonicalJsonObject = serde_json::from_value(serde_json::json!({
            "room_id": "!r:remote.test", "sender": "@a:remote.test", "type": "m.room.message",
            "content": { "body": "hi" }, "origin_server_ts": 1, "depth": 2,
            "prev_events": [], "auth_events": [], "hashes": { "sha256": "x" }, "signatures": {},
        }))
        .unwrap();
        let version = RoomVersion::parse("10").unwrap();
        Pdu::stored(object, &version, OwnedEventId::try_from(format!("$e{n}")).unwrap()).unwrap()
    }

    #[test]
    fn a_refused_pdu_is_retried_with_back_off_then_given_up_and_the_wait_is_bounded() {
        let refetches = Refetches::default();
        let (origin, version, start) =
            (ruma::server_name!("remote.test"), RoomVersion::parse("10").unwrap(), Instant::now());
        refetches.remember(origin, &version, event(0), start);
        refetches.remember(origin, &version, event(0), start);
        assert_eq!(refetches.len(), 1, "one entry per event");
        assert!(refetches.take_due(start + FIRST_RETRY - Duration::from_secs(1)).is_empty());
        let mut now = start + FIRST_RETRY;
        let mut tries = 0;
        loop {
            let due = refetches.take_due(now);
            if due.is_empty() {
                break;
            }
            tries += 1;
            for entry in due {
                refetches.put_back(entry, now);
            }
            now += FIRST_RETRY * 2u32.pow(tries);
        }
        assert_eq!(tries, MAX_RETRIES + 1, "the first retry and MAX_RETRIES more");
        assert_eq!(refetches.len(), 0, "given up");

        for n in 0..MAX_WAITING + 10 {
            refetches.remember(origin, &version, event(n), start);
        }
        assert_eq!(refetches.len(), MAX_WAITING);
    }

    #[test]
    fn only_failed_fetches_are_worth_retrying() {
        assert!(worth_retrying(&ServiceError::MissingEvents("$x".into())));
        assert!(!worth_retrying(&ServiceError::BadJson("bad".into())));
        assert!(!worth_retrying(&ServiceError::Forbidden("no".into())));
    }
}
