//! Durable per-destination transaction queues (architecture invariant 6): a PDU for another
//! server is written to the `federation_outbox` table in the same batch that records why it is
//! owed (see the service's forwarder), and one worker per destination sends the rows in order,
//! at most [`MAX_PDUS_PER_TRANSACTION`] per `PUT /send/{txnId}`, deleting them only once the
//! destination answered 200. A destination that fails backs off (the client's per-destination
//! back-off) and holds up nobody else: each has its own worker.
//!
//! Row keys: `destination \0 seq` (big-endian seq, so a prefix scan reads one destination's queue
//! in order). The transaction ID names the first and last row's sequence numbers: a retry after
//! a lost answer sends the same rows under the same ID (the worker remembers how far the
//! unanswered transaction went), so the destination drops the duplicate; a transaction with
//! other rows (more queued meanwhile, after a restart) has another ID, so the destination
//! never answers it from the stored result of a smaller one and loses the rows it did not
//! have. PDUs it already has are taken once (by event ID), to-device EDUs once (by message ID).
//!
//! Catch-up: once a destination has been unreachable for longer than the sender's
//! `catch_up_after`, its queue keeps only the newest PDU of each room (EDUs all stay: to-device
//! messages must arrive exactly once). When it is back it receives those, fetches the state at
//! them (`/state_ids`) and the events it lacks as it needs them (`/get_missing_events`,
//! `/backfill` when its users page back), instead of hours of transactions in order. The queue
//! of a server that is gone for good stays one row per room.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, which is the real one except in simulations, where tests move it.
use tokio::time::Instant;

use http::Method;
use lattice_storage::{Direction, KeyRange, KvStore, StreamPositions, Table, TableScope, WriteBatch};
use ruma::{OwnedServerName, ServerName};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::client::{Auth, FederationClient};
use crate::error::FederationError;

pub const TABLES: TableScope = TableScope { owner: "federation sender", tables: &[Table::FederationOutbox] };

/// The spec's limits on PDUs and EDUs in one transaction.
pub const MAX_PDUS_PER_TRANSACTION: usize = 50;
pub const MAX_EDUS_PER_TRANSACTION: usize = 100;
/// The first byte of a queued row's value: what follows is a PDU, or an EDU.
const PDU_ROW: u8 = b'p';
const EDU_ROW: u8 = b'e';
/// Largest answer read from a `/send` (the per-PDU results).
const MAX_SEND_RESPONSE_BYTES: usize = 1024 * 1024;
/// Longest wait between attempts while a destination backs off.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// Queue rows read per step of a catch-up compaction.
const COMPACTION_PAGE_ROWS: usize = 1_000;

/// The outbox and its workers.
pub struct Sender {
    kv: Arc<dyn KvStore>,
    client: Arc<FederationClient>,
    sequence: StreamPositions,
    workers: Mutex<Workers>,
    /// Unreachable this long, a destination is caught up with the newest PDU of each room.
    catch_up_after: Duration,
}

#[derive(Default)]
struct Workers {
    running: HashMap<OwnedServerName, (Arc<tokio::sync::Notify>, tokio::task::AbortHandle)>,
    /// Set at shutdown: no worker starts again.
    stopped: bool,
}

/// Where the forwarder's mark is kept: a key no destination's rows can have (server names never
/// start with a NUL byte).
const FORWARDED_KEY: &[u8] = b"\0forwarded";

fn row_prefix(destination: &str) -> Vec<u8> {
    let mut key = destination.as_bytes().to_vec();
    key.push(0);
    key
}

fn row_key(destination: &str, seq: u64) -> Vec<u8> {
    let mut key = row_prefix(destination);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The ID of the transaction of the queue rows from `first_key` to `last_key`.
fn transaction_id(first_key: &[u8], last_key: &[u8]) -> String {
    let position = |key| lattice_storage::keys::trailing_position(key).unwrap_or_default();
    format!("{}-{}", position(first_key), position(last_key))
}

/// The room of a queued PDU row; `None` for an EDU row (or a row that is not a PDU).
fn queued_pdu_room(value: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct RoomOf {
        room_id: String,
    }
    match value.split_first() {
        Some((&PDU_ROW, json)) => serde_json::from_slice::<RoomOf>(json).ok().map(|pdu| pdu.room_id),
        _ => None,
    }
}

impl Sender {
    /// `kv` must reach the `federation_outbox` table; `sequence` hands out row numbers; a
    /// destination unreachable for `catch_up_after` gets only the newest PDU of each room.
    pub fn new(
        kv: Arc<dyn KvStore>,
        client: Arc<FederationClient>,
        sequence: StreamPositions,
        catch_up_after: Duration,
    ) -> Arc<Self> {
        Arc::new(Self { kv, client, sequence, workers: Mutex::new(Workers::default()), catch_up_after })
    }

    pub fn client(&self) -> &Arc<FederationClient> {
        &self.client
    }

    /// Adds `pdu` to each destination's queue in `batch`. The caller writes the batch, then
    /// calls [`Sender::wake`].
    pub async fn queue_pdu(
        &self,
        batch: &mut WriteBatch,
        destinations: &[OwnedServerName],
        pdu: &str,
    ) -> Result<(), FederationError> {
        self.queue(batch, destinations, PDU_ROW, pdu).await
    }

    /// Adds an EDU (`{"edu_type": …, "content": …}`) to each destination's queue in `batch`.
    pub async fn queue_edu(
        &self,
        batch: &mut WriteBatch,
        destinations: &[OwnedServerName],
        edu: &str,
    ) -> Result<(), FederationError> {
        self.queue(batch, destinations, EDU_ROW, edu).await
    }

    async fn queue(
        &self,
        batch: &mut WriteBatch,
        destinations: &[OwnedServerName],
        kind: u8,
        json: &str,
    ) -> Result<(), FederationError> {
        // A denied server gets nothing: its rows would only wait forever.
        for destination in destinations.iter().filter(|destination| !self.client.denies(destination)) {
            let seq = self.sequence.take().await?;
            let mut value = Vec::with_capacity(json.len() + 1);
            value.push(kind);
            value.extend_from_slice(json.as_bytes());
            batch.put(Table::FederationOutbox, row_key(destination.as_str(), seq.get()), value);
            // The rows are ordered by the batch they are in; the position only names them.
            seq.published().await;
        }
        Ok(())
    }

    /// The stream position up to which events were handed to the queues, if any ever were.
    pub async fn forwarded_up_to(&self) -> Result<Option<u64>, FederationError> {
        let raw = self.kv.get(Table::FederationOutbox, FORWARDED_KEY).await?;
        Ok(raw.as_deref().and_then(lattice_storage::keys::stored_position))
    }

    /// Records, in `batch`, that events up to `position` were handed to the queues.
    pub fn set_forwarded_up_to(batch: &mut WriteBatch, position: u64) {
        batch.put(Table::FederationOutbox, FORWARDED_KEY.to_vec(), position.to_be_bytes().to_vec());
    }

    /// Writes a batch of queued rows (and the forwarding mark) atomically.
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), FederationError> {
        Ok(self.kv.write(batch).await?)
    }

    /// [`Sender::commit`] for rows derived from the event stream together with the forwarding
    /// mark, without a sync of their own: they become durable with the next durable write (any
    /// writer's). A power cut before that takes the rows and the mark together, and forwarding
    /// repeats from the older mark, so no event misses a destination; what was sent meanwhile
    /// is sent again, and the destination drops events it has. This keeps the forwarder, which
    /// passes after every stored event, from adding a sync to each.
    pub async fn commit_forwarded(&self, batch: WriteBatch) -> Result<(), FederationError> {
        Ok(self.kv.write_deferred(batch).await?)
    }

    /// Starts (or nudges) the workers of `destinations`.
    pub fn wake(self: &Arc<Self>, destinations: &[OwnedServerName]) {
        for destination in destinations {
            let notify = {
                let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
                if workers.stopped {
                    return;
                }
                match workers.running.get(destination) {
                    Some((notify, _)) => notify.clone(),
                    None => {
                        let notify = Arc::new(tokio::sync::Notify::new());
                        let this = self.clone();
                        let (name, wake) = (destination.clone(), notify.clone());
                        let task = tokio::spawn(async move { this.run_worker(name, wake).await });
                        workers.running.insert(destination.clone(), (notify.clone(), task.abort_handle()));
                        notify
                    }
                }
            };
            notify.notify_one();
        }
    }

    /// `origin` sent a request that verified, so it is up again: its back-off ends and what is
    /// queued for it goes now rather than when the back-off would have run out (a server back
    /// after an hour is caught up at once).
    pub fn heard_from(self: &Arc<Self>, origin: &ServerName) {
        if self.client.heard_from(origin) {
            self.wake(&[origin.to_owned()]);
        }
    }

    /// Stops every worker (at shutdown). What they had not sent stays queued for the next start;
    /// a transaction cut off mid-flight is sent again (under another ID if rows were queued since).
    pub fn stop(&self) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.stopped = true;
        for (_, (_, task)) in workers.running.drain() {
            task.abort();
        }
    }

    /// Starts a worker for every destination with queued rows (after a restart).
    pub async fn resume(self: &Arc<Self>) -> Result<usize, FederationError> {
        let mut destinations = Vec::new();
        let mut from = Vec::new();
        loop {
            let range = KeyRange { start: std::ops::Bound::Included(from.clone()), end: std::ops::Bound::Unbounded };
            let rows = self.kv.scan(Table::FederationOutbox, &range, Direction::Forward, 1).await?;
            let Some((key, _)) = rows.into_iter().next() else { break };
            let Some(end) = key.iter().position(|b| *b == 0) else { break };
            let name = String::from_utf8_lossy(&key[..end]).into_owned();
            // Skip the rest of this destination's rows: the next key after `name \x01`.
            from = key[..end].to_vec();
            from.push(1);
            if let Ok(name) = OwnedServerName::try_from(name) {
                destinations.push(name);
            }
        }
        self.wake(&destinations);
        Ok(destinations.len())
    }

    /// How many PDUs wait for `destination`.
    pub async fn queued(&self, destination: &ServerName) -> Result<usize, FederationError> {
        let range = KeyRange::prefix(&row_prefix(destination.as_str()));
        Ok(lattice_storage::scan_all(self.kv.as_ref(), Table::FederationOutbox, &range).await?.len())
    }

    async fn run_worker(self: Arc<Self>, destination: OwnedServerName, wake: Arc<tokio::sync::Notify>) {
        // Since when the destination has failed every attempt (in this process).
        let mut down_since: Option<Instant> = None;
        // The last row of a transaction sent without an answer: the retry stops there too.
        let mut unanswered: Option<Vec<u8>> = None;
        loop {
            if down_since.is_some_and(|since| since.elapsed() >= self.catch_up_after) {
                match self.compact_for_catch_up(&destination).await {
                    Ok(0) => {}
                    Ok(dropped) => tracing::info!(
                        %destination,
                        dropped,
                        "destination unreachable for long: its queue now holds the newest event of each room, \
                         the rest it fetches or backfills when back"
                    ),
                    Err(error) => tracing::warn!(%destination, %error, "compacting a federation queue failed"),
                }
            }
            let outcome = self.send_next(&destination, &mut unanswered).await;
            if outcome.is_ok() {
                down_since = None;
            } else {
                down_since.get_or_insert_with(Instant::now);
            }
            match outcome {
                Ok(0) => wake.notified().await,
                Ok(_) => {}
                Err(FederationError::BackingOff { retry_in_ms, .. }) => {
                    // A wake-up ends the wait early: the destination was heard from.
                    let wait = Duration::from_millis(retry_in_ms).min(MAX_RETRY_WAIT);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = wake.notified() => {}
                    }
                }
                Err(error) => {
                    tracing::info!(%destination, %error, "sending a federation transaction failed; will retry");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Compacts the queue of `destination` for catch-up ([`compact_queue`]); returns how many
    /// rows were dropped.
    pub async fn compact_for_catch_up(&self, destination: &ServerName) -> Result<usize, FederationError> {
        compact_queue(self.kv.as_ref(), destination).await
    }

    /// Sends the oldest queued rows of `destination` as one transaction (in queue order, as
    /// many as the per-transaction limits allow, and no further than `unanswered`, the last
    /// row of an earlier attempt that got no answer); returns how many. Sets `unanswered` when
    /// this attempt gets none.
    async fn send_next(
        &self,
        destination: &ServerName,
        unanswered: &mut Option<Vec<u8>>,
    ) -> Result<usize, FederationError> {
        let mut range = KeyRange::prefix(&row_prefix(destination.as_str()));
        if let Some(last) = unanswered.clone() {
            range.end = std::ops::Bound::Included(last);
        }
        let limit = MAX_PDUS_PER_TRANSACTION + MAX_EDUS_PER_TRANSACTION;
        let mut rows = self.kv.scan(Table::FederationOutbox, &range, Direction::Forward, limit).await?;
        if rows.is_empty() && unanswered.take().is_some() {
            // The unanswered rows are gone (a catch-up compaction dropped them): start afresh.
            let range = KeyRange::prefix(&row_prefix(destination.as_str()));
            rows = self.kv.scan(Table::FederationOutbox, &range, Direction::Forward, limit).await?;
        }
        let mut pdus: Vec<Box<RawValue>> = Vec::new();
        let mut edus: Vec<Box<RawValue>> = Vec::new();
        let mut taken = 0;
        for (_, value) in &rows {
            let (kind, list, max) = match value.first() {
                Some(&EDU_ROW) => ("EDU", &mut edus, MAX_EDUS_PER_TRANSACTION),
                _ => ("PDU", &mut pdus, MAX_PDUS_PER_TRANSACTION),
            };
            if list.len() == max {
                break;
            }
            taken += 1;
            let json = value.get(1..).and_then(|bytes| String::from_utf8(bytes.to_vec()).ok());
            match json.and_then(|json| RawValue::from_string(json).ok()) {
                Some(item) => list.push(item),
                None => tracing::error!(%destination, kind, "a queued row is not JSON; dropping it"),
            }
        }
        rows.truncate(taken);
        let (Some((first_key, _)), Some((last_key, _))) = (rows.first(), rows.last()) else { return Ok(0) };
        let txn_id = transaction_id(first_key, last_key);
        let body = serde_json::json!({
            "origin": self.client.own_keys().server_name(),
            "origin_server_ts": self.client.clock().now_ms(),
            "pdus": pdus,
            "edus": edus,
        });
        let path = format!("/_matrix/federation/v1/send/{txn_id}");
        let outcome = self
            .client
            .request(destination, Method::PUT, &path, Some(&body), Auth::Signed, MAX_SEND_RESPONSE_BYTES)
            .await;
        match outcome {
            Ok(_) => {}
            // The destination refuses this transaction as such (not a PDU in it): retrying the
            // same bytes can never succeed, and would block everything queued behind it.
            Err(FederationError::Status { status, body, .. }) if (400..500).contains(&status) && status != 429 => {
                tracing::warn!(%destination, status, %body, %txn_id, "a transaction was refused; dropping it");
            }
            Err(error) => {
                *unanswered = Some(last_key.clone());
                return Err(error);
            }
        }
        *unanswered = None;
        let mut batch = WriteBatch::new();
        for (key, _) in &rows {
            batch.delete(Table::FederationOutbox, key.clone());
        }
        self.kv.write(batch).await?;
        tracing::debug!(%destination, %txn_id, pdus = rows.len(), "sent a federation transaction");
        Ok(rows.len())
    }
}

/// Drops every queued PDU of `destination` but the newest of its room (walking the queue from
/// its end, the first row seen of a room is the one kept); EDUs stay. Returns how many rows were
/// dropped. Each page's deletes are one batch: an interrupted compaction leaves a valid, partly
/// compacted queue.
async fn compact_queue(kv: &dyn KvStore, destination: &ServerName) -> Result<usize, FederationError> {
    let prefix = row_prefix(destination.as_str());
    let mut rooms_seen: HashSet<String> = HashSet::new();
    let mut range = KeyRange::prefix(&prefix);
    let mut dropped = 0;
    loop {
        let rows = kv.scan(Table::FederationOutbox, &range, Direction::Backward, COMPACTION_PAGE_ROWS).await?;
        let mut batch = WriteBatch::new();
        for (key, value) in &rows {
            let Some(room) = queued_pdu_room(value) else { continue };
            if !rooms_seen.insert(room) {
                batch.delete(Table::FederationOutbox, key.clone());
                dropped += 1;
            }
        }
        if !batch.ops.is_empty() {
            kv.write(batch).await?;
        }
        match rows.last() {
            Some((oldest, _)) if rows.len() == COMPACTION_PAGE_ROWS => {
                range.end = std::ops::Bound::Excluded(oldest.clone());
            }
            _ => return Ok(dropped),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use lattice_storage::{KvRead, MemoryStore};
    use ruma::server_name;
    use ruma::signatures::Ed25519KeyPair;

    use super::*;
    use crate::{OwnKeys, SystemClock, Transport};

    /// Records each transaction's path and PDU count; loses the answer of the first one.
    #[derive(Default)]
    struct LosesFirstAnswer {
        sent: Mutex<Vec<(String, usize)>>,
        answered_once: AtomicBool,
    }

    #[async_trait]
    impl Transport for LosesFirstAnswer {
        async fn exchange(
            &self,
            destination: &ServerName,
            request: http::Request<Vec<u8>>,
        ) -> Result<(u16, Vec<u8>), FederationError> {
            let body: serde_json::Value = serde_json::from_slice(request.body()).expect("a JSON body");
            let pdus = body["pdus"].as_array().map_or(0, Vec::len);
            self.sent.lock().unwrap().push((request.uri().path().to_owned(), pdus));
            if !self.answered_once.swap(true, Ordering::SeqCst) {
                return Err(FederationError::Transport {
                    server: destination.to_string(),
                    detail: "answer lost".into(),
                });
            }
            Ok((200, br#"{"pdus":{}}"#.to_vec()))
        }
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_rows_under_the_same_id_and_rows_queued_meanwhile_go_under_another() {
        let kv: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let destination = server_name!("peer.test");
        let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "k".into()).unwrap();
        let own =
            Arc::new(OwnKeys::new(server_name!("hs.test").to_owned(), Arc::new(key), Vec::new(), 3_600_000).unwrap());
        let transport = Arc::new(LosesFirstAnswer::default());
        let client = Arc::new(FederationClient::in_process(own, transport.clone(), Arc::new(SystemClock)).unwrap());
        let sender = Sender::new(
            kv.clone(),
            client.clone(),
            StreamPositions::new(kv.clone(), "outbox"),
            Duration::from_secs(600),
        );
        let queue = |seqs: std::ops::Range<u64>| {
            let mut batch = WriteBatch::new();
            for seq in seqs {
                batch.put(Table::FederationOutbox, row_key(destination.as_str(), seq), pdu_row("!a:hs", seq as usize));
            }
            batch
        };
        kv.write(queue(1..4)).await.unwrap();
        let mut unanswered = None;
        assert!(sender.send_next(destination, &mut unanswered).await.is_err());
        // Two more rows are queued before the retry; the destination is heard from again.
        kv.write(queue(4..6)).await.unwrap();
        client.heard_from(destination);
        assert_eq!(sender.send_next(destination, &mut unanswered).await.unwrap(), 3);
        assert_eq!(sender.send_next(destination, &mut unanswered).await.unwrap(), 2);
        assert_eq!(sender.send_next(destination, &mut unanswered).await.unwrap(), 0);
        let sent = transport.sent.lock().unwrap().clone();
        let path = |id: &str| format!("/_matrix/federation/v1/send/{id}");
        assert_eq!(sent, vec![(path("1-3"), 3), (path("1-3"), 3), (path("4-5"), 2)]);
    }

    fn pdu_row(room: &str, n: usize) -> Vec<u8> {
        let mut value = vec![PDU_ROW];
        value.extend_from_slice(serde_json::json!({ "room_id": room, "content": { "n": n } }).to_string().as_bytes());
        value
    }

    #[tokio::test]
    async fn catch_up_keeps_the_newest_pdu_of_each_room_every_edu_and_other_destinations() {
        let kv = MemoryStore::new();
        let (down, other) = (server_name!("down.test"), server_name!("other.test"));
        let mut batch = WriteBatch::new();
        // 2,500 rows (more than two compaction pages): PDUs of three rooms and an EDU every 100.
        for seq in 0..2_500u64 {
            let value = if seq % 100 == 0 {
                let mut edu = vec![EDU_ROW];
                edu.extend_from_slice(br#"{"edu_type":"m.direct_to_device","content":{}}"#);
                edu
            } else {
                pdu_row(["!a:hs", "!b:hs", "!c:hs"][seq as usize % 3], seq as usize)
            };
            batch.put(Table::FederationOutbox, row_key(down.as_str(), seq), value);
        }
        batch.put(Table::FederationOutbox, row_key(other.as_str(), 1), pdu_row("!a:hs", 0));
        batch.put(Table::FederationOutbox, row_key(other.as_str(), 2), pdu_row("!a:hs", 1));
        kv.write(batch).await.unwrap();

        let dropped = compact_queue(&kv, down).await.unwrap();
        let queue = KeyRange::prefix(&row_prefix(down.as_str()));
        let left = kv.scan(Table::FederationOutbox, &queue, Direction::Forward, 100).await.unwrap();
        let seqs: Vec<u64> = left.iter().filter_map(|(key, _)| lattice_storage::keys::trailing_position(key)).collect();
        let edus = (0..2_500u64).step_by(100).collect::<Vec<_>>();
        // The newest PDU of each room: 2,499 (seq % 3 == 0 → !a), 2,498 (!c), 2,497 (!b).
        let mut expected = [edus.as_slice(), &[2_497, 2_498, 2_499]].concat();
        expected.sort_unstable();
        assert_eq!(seqs, expected);
        assert_eq!(dropped, 2_500 - 25 - 3);
        // Another destination's queue is untouched; a second compaction drops nothing.
        let others = KeyRange::prefix(&row_prefix(other.as_str()));
        assert_eq!(kv.scan(Table::FederationOutbox, &others, Direction::Forward, 10).await.unwrap().len(), 2);
        assert_eq!(compact_queue(&kv, down).await.unwrap(), 0);
    }
}
