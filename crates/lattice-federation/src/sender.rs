//! Durable per-destination transaction queues (architecture invariant 6): a PDU for another
//! server is written to the `federation_outbox` table in the same batch that records why it is
//! owed (see the service's forwarder), and one worker per destination sends the rows in order,
//! at most [`MAX_PDUS_PER_TRANSACTION`] per `PUT /send/{txnId}`, deleting them only once the
//! destination answered 200. A destination that fails backs off (the client's per-destination
//! back-off) and holds up nobody else: each has its own worker.
//!
//! Row keys: `destination \0 seq` (big-endian seq, so a prefix scan reads one destination's queue
//! in order). The transaction ID is the first row's sequence number, so a retry after a lost
//! answer repeats the same ID and the destination drops the duplicate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use lattice_storage::{Direction, KeyRange, KvStore, StreamPositions, Table, TableScope, WriteBatch};
use ruma::{OwnedServerName, ServerName};
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

/// The outbox and its workers.
pub struct Sender {
    kv: Arc<dyn KvStore>,
    client: Arc<FederationClient>,
    sequence: StreamPositions,
    workers: Mutex<Workers>,
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

impl Sender {
    /// `kv` must reach the `federation_outbox` table; `sequence` hands out row numbers.
    pub fn new(kv: Arc<dyn KvStore>, client: Arc<FederationClient>, sequence: StreamPositions) -> Arc<Self> {
        Arc::new(Self { kv, client, sequence, workers: Mutex::new(Workers::default()) })
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
    /// a transaction cut off mid-flight is sent again with the same ID.
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
        Ok(self.kv.scan(Table::FederationOutbox, &range, Direction::Forward, usize::MAX).await?.len())
    }

    async fn run_worker(self: Arc<Self>, destination: OwnedServerName, wake: Arc<tokio::sync::Notify>) {
        loop {
            match self.send_next(&destination).await {
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

    /// Sends the oldest queued rows of `destination` as one transaction (in queue order, as
    /// many as the per-transaction limits allow); returns how many.
    async fn send_next(&self, destination: &ServerName) -> Result<usize, FederationError> {
        let range = KeyRange::prefix(&row_prefix(destination.as_str()));
        let limit = MAX_PDUS_PER_TRANSACTION + MAX_EDUS_PER_TRANSACTION;
        let mut rows = self.kv.scan(Table::FederationOutbox, &range, Direction::Forward, limit).await?;
        let Some((first_key, _)) = rows.first() else { return Ok(0) };
        let txn_id = lattice_storage::keys::trailing_position(first_key).unwrap_or_default();
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
                tracing::warn!(%destination, status, %body, txn_id, "a transaction was refused; dropping it");
            }
            Err(error) => return Err(error),
        }
        let mut batch = WriteBatch::new();
        for (key, _) in &rows {
            batch.delete(Table::FederationOutbox, key.clone());
        }
        self.kv.write(batch).await?;
        tracing::debug!(%destination, txn_id, pdus = rows.len(), "sent a federation transaction");
        Ok(rows.len())
    }
}
