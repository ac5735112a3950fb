//! Delayed events (MSC4140, `org.matrix.msc4140`): an event a local user schedules now and
//! this server sends later, as that user, unless it is cancelled first. Element Call schedules
//! a "hang-up" this way and restarts its timer as a heartbeat, so a client that vanishes leaves
//! the call when the heartbeats stop.
//!
//! The service owns four tables for scheduled events, written together in one batch per change:
//! `delayed_events` (`delay_id` → the record), `delayed_events_due` (due time · `delay_id`, what
//! the timer reads), `delayed_events_by_user` (`user\0delay_id`, for listing and the per-user
//! limit) and `delayed_event_transactions` (a scheduling request's transaction ID → its
//! `delay_id`). A sent or cancelled event becomes *finalised* in the same batch that removes it:
//! `delayed_events_finalised` (`delay_id` → the event, its outcome, reason, event ID or error),
//! indexed by `delayed_events_finalised_by_user` (`user\0time·delay_id`) and
//! `delayed_events_finalised_by_time` (`time·delay_id`), kept for the configured retention (at
//! most [`MAX_FINALISED_PER_USER`] per user) and pruned by the timer task.
//!
//! What can be checked when an event is scheduled is checked then (membership, power level,
//! sizes, limits); the send itself goes through the rooms service's one local send path when
//! the event falls due, so the auth rules decide again at that moment. A delayed event is
//! sent with its `delay_id` as the transaction ID, so a send repeated after a crash (or raced
//! by a `send` action) finds the first one's event instead of sending twice.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lattice_core::limits::{MAX_PDU_BYTES, check_event_type, check_state_key};
use lattice_storage::records::DelayedTransactionRecord;
pub use lattice_storage::records::{DelayedEventError, DelayedEventRecord, FinalisedDelayedEventRecord};
use lattice_storage::{Direction, KeyRange, KvStore, ScopedStore, StorageError, Table, TableScope, WriteBatch, keys};
use ruma::{OwnedEventId, RoomId, UserId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::rooms::{Rooms, Txn};
use crate::secrets::{hex, random_alphanumeric};
use crate::{Clock, ServiceError};

pub(crate) const TABLES: TableScope = TableScope {
    owner: "delayed_events",
    tables: &[
        Table::DelayedEvents,
        Table::DelayedEventsDue,
        Table::DelayedEventsByUser,
        Table::DelayedEventTransactions,
        Table::DelayedEventsFinalised,
        Table::DelayedEventsFinalisedByUser,
        Table::DelayedEventsFinalisedByTime,
    ],
};

/// The transaction "device" a due event is sent under, with its `delay_id` as the transaction
/// ID: the rooms service's transaction record makes a repeated send answer with the first event.
const SEND_TRANSACTION_DEVICE: &str = "!delayed_events";
/// Random characters of a `delay_id` (about 190 bits): it is a bearer capability for the
/// unauthenticated management endpoints, so it must not be guessable.
const DELAY_ID_CHARS: usize = 32;
/// Due events fired at once by the timer task (sends into different rooms run in parallel).
const FIRE_CONCURRENCY: usize = 16;
/// Due rows the timer reads per round.
const DUE_ROWS_PER_ROUND: usize = 256;
/// How long a due event whose send failed on a storage error waits before it is tried again.
const STORAGE_RETRY: Duration = Duration::from_secs(5);
/// How soon the timer looks again when every due event was being sent by a `send` action.
const BUSY_RECHECK_MS: u64 = 50;
/// The longest the timer sleeps without looking at the table (a safety net; writes wake it).
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(60);
/// Finalised events kept per user; past it the oldest go.
pub const MAX_FINALISED_PER_USER: usize = 1_000;
/// How often the timer task prunes finalised events past their retention.
const PRUNE_INTERVAL_MS: u64 = 60_000;
/// Finalised events pruned per batch.
const PRUNE_ROWS: usize = 256;
/// Scheduling locks, striped by user.
const SCHEDULING_STRIPES: usize = 64;

/// `[delayed_events]`: whether users may schedule events, and the limits on them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayedEventsConfig {
    pub enabled: bool,
    /// The longest delay a client may ask for; more is `400 M_MAX_DELAY_EXCEEDED`.
    pub max_delay_ms: u64,
    /// Events one user may have scheduled at once; more is `429 M_LIMIT_EXCEEDED`.
    pub max_scheduled_per_user: usize,
    /// How long a sent or cancelled event is kept for its owner to look up; 0 keeps none.
    pub finalised_retention_ms: u64,
}

impl Default for DelayedEventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_delay_ms: 24 * 3600 * 1000,
            max_scheduled_per_user: 100,
            finalised_retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// What a client asks to schedule.
pub struct ScheduleRequest<'a> {
    pub room_id: &'a RoomId,
    pub event_type: &'a str,
    /// Set for a state event.
    pub state_key: Option<&'a str>,
    pub content: Value,
    pub delay_ms: u64,
    /// The client's transaction, its device and transaction ID (`PUT /state` has none).
    pub txn: Option<Txn<'a>>,
}

/// The management actions of MSC4140.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelayedAction {
    Cancel,
    Restart,
    Send,
}

impl DelayedAction {
    pub fn parse(action: &str) -> Option<Self> {
        match action {
            "cancel" => Some(Self::Cancel),
            "restart" => Some(Self::Restart),
            "send" => Some(Self::Send),
            _ => None,
        }
    }
}

/// What became of a finalised event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Send,
    Cancel,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Cancel => "cancel",
        }
    }
}

/// Why an event was finalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A management request (`send` or `cancel`).
    Action,
    /// It fell due and was sent.
    Delay,
    /// It fell due and could not be sent.
    Error,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Delay => "delay",
            Self::Error => "error",
        }
    }
}

/// Why a listing asks for a subset of the user's delayed events.
#[derive(Default)]
pub struct ListFilter {
    /// Finalised events rather than scheduled ones.
    pub finalised_only: bool,
    pub room_id: Option<String>,
    pub event_type: Option<String>,
    /// Of finalised events, only those with this outcome (`send`, `cancel`) …
    pub outcome: Option<String>,
    /// … or this reason (`action`, `delay`, `error`).
    pub reason: Option<String>,
}

/// One delayed event of a user, as `GET /delayed_events/{delay_id}` shows it.
pub enum DelayedEventView {
    Scheduled(DelayedEventRecord),
    Finalised(FinalisedDelayedEventRecord),
}

/// Removes a `delay_id` from the set of events being sent when the send is over.
struct Claim<'a> {
    firing: &'a Mutex<HashSet<String>>,
    delay_id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.firing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&self.delay_id);
    }
}

pub struct DelayedEvents {
    config: DelayedEventsConfig,
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
    rooms: Arc<Rooms>,
    /// Wakes the timer task when an event is scheduled or restarted.
    timer: Notify,
    /// Serialise each user's scheduling, so their count and the write agree (the transaction
    /// row is written with a condition; the count is this process's, which is all one server
    /// has). Striped by user: everything read under one is that user's, so users never wait for
    /// each other but on a shared stripe.
    scheduling: Vec<tokio::sync::Mutex<()>>,
    /// When finalised events were last pruned (ms since the epoch).
    last_prune_ms: std::sync::atomic::AtomicU64,
    /// `delay_id`s being sent right now, by the timer or a `send` action.
    firing: Mutex<HashSet<String>>,
}

impl DelayedEvents {
    pub(crate) fn new(
        config: DelayedEventsConfig,
        kv: Arc<dyn KvStore>,
        clock: Arc<dyn Clock>,
        rooms: Arc<Rooms>,
    ) -> Self {
        Self {
            config,
            kv: ScopedStore::new(kv, TABLES),
            clock,
            rooms,
            timer: Notify::new(),
            scheduling: (0..SCHEDULING_STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            last_prune_ms: std::sync::atomic::AtomicU64::new(0),
            firing: Mutex::new(HashSet::new()),
        }
    }

    pub fn config(&self) -> &DelayedEventsConfig {
        &self.config
    }

    /// Schedules an event; answers its `delay_id`. The same transaction again answers the same
    /// `delay_id` (another request under the same transaction ID is `M_INVALID_PARAM`).
    pub async fn schedule(&self, user_id: &UserId, request: ScheduleRequest<'_>) -> Result<String, ServiceError> {
        self.check_request(&request)?;
        let txn_key = request
            .txn
            .as_ref()
            .map(|txn| keys::room_transaction(user_id.as_str(), txn.device_id, request.room_id.as_str(), txn.txn_id));
        let request_hash = hex(&Sha256::digest(
            json!([request.event_type, request.state_key, request.content, request.delay_ms]).to_string().as_bytes(),
        ));
        let _scheduling = self.scheduling_lock(user_id).lock().await;
        if let Some(key) = &txn_key
            && let Some(done) = self.transaction(key, &request_hash).await?
        {
            return Ok(done);
        }
        self.rooms.require_may_send(user_id, request.room_id, request.event_type, request.state_key).await?;
        self.check_user_limit(user_id).await?;
        let record = DelayedEventRecord {
            delay_id: random_alphanumeric(DELAY_ID_CHARS),
            user_id: user_id.to_string(),
            room_id: request.room_id.to_string(),
            event_type: request.event_type.to_owned(),
            state_key: request.state_key.map(str::to_owned),
            content: request.content,
            delay_ms: request.delay_ms,
            running_since_ms: self.clock.now_ms(),
        };
        let mut batch = WriteBatch::new();
        if let Some(key) = &txn_key {
            batch.expect(Table::DelayedEventTransactions, key.clone(), None);
            let done =
                DelayedTransactionRecord { delay_id: record.delay_id.clone(), request_hash: request_hash.clone() };
            lattice_storage::put(&mut batch, key.clone(), &done);
        }
        batch.expect(Table::DelayedEvents, keys::delayed_event(&record.delay_id), None);
        put_record(&mut batch, &record);
        match self.kv.write(batch).await {
            Ok(()) => {}
            // Another process stored this transaction meanwhile: its answer is ours.
            Err(StorageError::Conflict) if txn_key.is_some() => {
                let key = txn_key.as_deref().unwrap_or_default();
                return self
                    .transaction(key, &request_hash)
                    .await?
                    .ok_or_else(|| ServiceError::Internal("scheduling a delayed event conflicted".into()));
            }
            Err(error) => return Err(error.into()),
        }
        tracing::debug!(delay_id = %record.delay_id, user = %user_id, room = %record.room_id, "delayed event scheduled");
        self.timer.notify_one();
        Ok(record.delay_id)
    }

    fn scheduling_lock(&self, user_id: &UserId) -> &tokio::sync::Mutex<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        user_id.hash(&mut hasher);
        &self.scheduling[(hasher.finish() % SCHEDULING_STRIPES as u64) as usize]
    }

    fn check_request(&self, request: &ScheduleRequest<'_>) -> Result<(), ServiceError> {
        if !self.config.enabled {
            return Err(ServiceError::BadRequest("delayed events are disabled on this server".into()));
        }
        if request.delay_ms == 0 {
            return Err(ServiceError::InvalidParam("the delay must be a positive number of milliseconds".into()));
        }
        if request.delay_ms > self.config.max_delay_ms {
            return Err(ServiceError::MaxDelayExceeded { max_delay_ms: self.config.max_delay_ms });
        }
        check_event_type(request.event_type).map_err(ServiceError::InvalidParam)?;
        if let Some(key) = request.state_key {
            check_state_key(key).map_err(ServiceError::InvalidParam)?;
        }
        if !request.content.is_object() {
            return Err(ServiceError::BadJson("the content must be a JSON object".into()));
        }
        if request.content.to_string().len() > MAX_PDU_BYTES {
            return Err(ServiceError::TooLarge { what: "the event content", limit: MAX_PDU_BYTES });
        }
        Ok(())
    }

    /// The `delay_id` a stored transaction produced.
    async fn transaction(&self, key: &[u8], request_hash: &str) -> Result<Option<String>, ServiceError> {
        let Some(done) = lattice_storage::get::<DelayedTransactionRecord>(self.kv.as_ref(), key).await? else {
            return Ok(None);
        };
        if done.value.request_hash != request_hash {
            return Err(ServiceError::InvalidParam("this transaction ID was used for a different request".into()));
        }
        Ok(Some(done.value.delay_id))
    }

    /// At the limit, the user learns when their next event falls due (the MSC's `Retry-After`).
    async fn check_user_limit(&self, user_id: &UserId) -> Result<(), ServiceError> {
        let scheduled = self.user_records(user_id).await?;
        if scheduled.len() < self.config.max_scheduled_per_user {
            return Ok(());
        }
        let next_due = scheduled.iter().map(DelayedEventRecord::due_ms).min().unwrap_or(0);
        let retry_after_ms = next_due.saturating_sub(self.clock.now_ms()).max(1);
        Err(ServiceError::TooManyDelayedEvents { retry_after_ms })
    }

    /// The user's scheduled events, in the order they fall due.
    async fn user_records(&self, user_id: &UserId) -> Result<Vec<DelayedEventRecord>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        // The per-user limit bounds the rows; one more than it shows an over-full list too.
        let limit = self.config.max_scheduled_per_user.saturating_add(1).min(lattice_storage::MAX_SCAN_ROWS);
        let rows =
            self.kv.scan(Table::DelayedEventsByUser, &KeyRange::prefix(&prefix), Direction::Forward, limit).await?;
        let mut records = Vec::with_capacity(rows.len());
        for (key, _) in rows {
            let Some(delay_id) = key.get(prefix.len()..).and_then(|id| std::str::from_utf8(id).ok()) else { continue };
            if let Some(record) = self.record(delay_id).await? {
                records.push(record);
            }
        }
        records.sort_by(|a, b| (a.due_ms(), &a.delay_id).cmp(&(b.due_ms(), &b.delay_id)));
        Ok(records)
    }

    async fn record(&self, delay_id: &str) -> Result<Option<DelayedEventRecord>, ServiceError> {
        let fetched =
            lattice_storage::get::<DelayedEventRecord>(self.kv.as_ref(), &keys::delayed_event(delay_id)).await?;
        Ok(fetched.map(|fetched| fetched.value))
    }

    /// `GET /delayed_events`: the user's scheduled events, in the order they fall due, or
    /// (`finalised_only`) their finalised ones kept, oldest finalised first.
    pub async fn list(&self, user_id: &UserId, filter: &ListFilter) -> Result<Vec<DelayedEventView>, ServiceError> {
        let matches = |record: &DelayedEventRecord| {
            filter.room_id.as_ref().is_none_or(|room| *room == record.room_id)
                && filter.event_type.as_ref().is_none_or(|kind| *kind == record.event_type)
        };
        if filter.finalised_only {
            let mut finalised = self.user_finalised(user_id).await?;
            finalised.retain(|done| {
                matches(&done.event)
                    && filter.outcome.as_ref().is_none_or(|outcome| *outcome == done.outcome)
                    && filter.reason.as_ref().is_none_or(|reason| *reason == done.reason)
            });
            return Ok(finalised.into_iter().map(DelayedEventView::Finalised).collect());
        }
        let mut records = self.user_records(user_id).await?;
        records.retain(matches);
        Ok(records.into_iter().map(DelayedEventView::Scheduled).collect())
    }

    /// `GET /delayed_events/{delay_id}`: one of the user's scheduled or finalised events.
    pub async fn get(&self, user_id: &UserId, delay_id: &str) -> Result<DelayedEventView, ServiceError> {
        if let Some(record) = self.record(delay_id).await?.filter(|record| record.user_id == user_id.as_str()) {
            return Ok(DelayedEventView::Scheduled(record));
        }
        self.finalised(delay_id, Some(user_id))
            .await?
            .map(DelayedEventView::Finalised)
            .ok_or_else(|| not_found(delay_id))
    }

    /// A finalised event, if it is kept (and `owner`'s, when given).
    async fn finalised(
        &self,
        delay_id: &str,
        owner: Option<&UserId>,
    ) -> Result<Option<FinalisedDelayedEventRecord>, ServiceError> {
        let key = keys::delayed_event_finalised(delay_id);
        let fetched = lattice_storage::get::<FinalisedDelayedEventRecord>(self.kv.as_ref(), &key).await?;
        Ok(fetched
            .map(|fetched| fetched.value)
            .filter(|done| owner.is_none_or(|owner| done.event.user_id == owner.as_str())))
    }

    /// The user's finalised events kept, oldest finalised first.
    async fn user_finalised(&self, user_id: &UserId) -> Result<Vec<FinalisedDelayedEventRecord>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let range = KeyRange::prefix(&prefix);
        let limit = MAX_FINALISED_PER_USER.min(lattice_storage::MAX_SCAN_ROWS);
        let rows = self.kv.scan(Table::DelayedEventsFinalisedByUser, &range, Direction::Forward, limit).await?;
        let mut finalised = Vec::with_capacity(rows.len());
        for (key, _) in rows {
            let Some(delay_id) = key.get(prefix.len()..).and_then(keys::delay_id_of_due_key) else { continue };
            if let Some(done) = self.finalised(delay_id, Some(user_id)).await? {
                finalised.push(done);
            }
        }
        Ok(finalised)
    }

    /// Cancels, restarts or sends a scheduled event. `owner` is the authenticated caller of the
    /// endpoint with the action in the body; the per-action endpoints are unauthenticated (the
    /// `delay_id` is the capability) and pass `None`. Another user's `delay_id` is unknown.
    pub async fn update(
        &self,
        delay_id: &str,
        action: DelayedAction,
        owner: Option<&UserId>,
    ) -> Result<(), ServiceError> {
        if !self.config.enabled {
            return Err(not_found(delay_id));
        }
        let scheduled =
            self.record(delay_id).await?.filter(|record| owner.is_none_or(|owner| record.user_id == owner.as_str()));
        let Some(record) = scheduled else { return self.answer_finalised(delay_id, action, owner).await };
        match action {
            DelayedAction::Send => self.send_now(record).await.map(|_| ()),
            DelayedAction::Cancel | DelayedAction::Restart => {
                if self.is_firing(delay_id) {
                    return Err(ServiceError::Conflict(format!("the delayed event {delay_id} is being sent")));
                }
                let mut batch = WriteBatch::new();
                self.condition_on(&mut batch, &record).await?;
                delete_record(&mut batch, &record);
                if action == DelayedAction::Restart {
                    let restarted = DelayedEventRecord { running_since_ms: self.clock.now_ms(), ..record };
                    put_record(&mut batch, &restarted);
                } else {
                    self.finalise_into(&mut batch, record, Outcome::Cancel, Reason::Action, None, None).await?;
                }
                match self.kv.write(batch).await {
                    Ok(()) => {}
                    // Sent, cancelled or restarted meanwhile: answered as finalised, or gone.
                    Err(StorageError::Conflict) => return self.answer_finalised(delay_id, action, owner).await,
                    Err(error) => return Err(error.into()),
                }
                if action == DelayedAction::Restart {
                    self.timer.notify_one();
                }
                Ok(())
            }
        }
    }

    /// An action on an event no longer scheduled, as the MSC asks, so a client can retry
    /// safely: the same outcome again succeeds (`send` of a sent event, `cancel` of a cancelled
    /// one, whether by an action or an error), another is `409`; unknown or pruned is `404`.
    async fn answer_finalised(
        &self,
        delay_id: &str,
        action: DelayedAction,
        owner: Option<&UserId>,
    ) -> Result<(), ServiceError> {
        let done = self.finalised(delay_id, owner).await?.ok_or_else(|| not_found(delay_id))?;
        match (action, done.outcome.as_str()) {
            (DelayedAction::Send, "send") | (DelayedAction::Cancel, "cancel") => Ok(()),
            _ => Err(ServiceError::Conflict(format!(
                "the delayed event {delay_id} was already finalised with the outcome {}",
                done.outcome
            ))),
        }
    }

    fn is_firing(&self, delay_id: &str) -> bool {
        self.firing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(delay_id)
    }

    /// Marks `delay_id` as being sent; `None` when something else is sending it.
    fn claim(&self, delay_id: &str) -> Option<Claim<'_>> {
        let mut firing = self.firing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        firing.insert(delay_id.to_owned()).then(|| Claim { firing: &self.firing, delay_id: delay_id.to_owned() })
    }

    /// The batch applies only if the record is still exactly as read.
    async fn condition_on(&self, batch: &mut WriteBatch, record: &DelayedEventRecord) -> Result<(), ServiceError> {
        let key = keys::delayed_event(&record.delay_id);
        let raw = self.kv.get(Table::DelayedEvents, &key).await?.ok_or_else(|| not_found(&record.delay_id))?;
        batch.expect(Table::DelayedEvents, key, Some(raw));
        Ok(())
    }

    /// The `send` action: the event now; an error (the user may no longer send it) is the
    /// caller's, and the event stays scheduled, as the MSC asks.
    async fn send_now(&self, record: DelayedEventRecord) -> Result<OwnedEventId, ServiceError> {
        let Some(_claim) = self.claim(&record.delay_id) else {
            // The timer is sending it this moment; that send is the answer.
            return Err(ServiceError::Conflict(format!("the delayed event {} is being sent", record.delay_id)));
        };
        let event_id = self.send(&record).await?;
        self.finish(record, Outcome::Send, Reason::Action, Some(event_id.to_string()), None).await?;
        Ok(event_id)
    }

    /// Sends the event through the rooms service's local send path, as its user.
    async fn send(&self, record: &DelayedEventRecord) -> Result<OwnedEventId, ServiceError> {
        let (user_id, room_id) = parse_ids(record)?;
        let txn = Txn { device_id: SEND_TRANSACTION_DEVICE, txn_id: &record.delay_id };
        let content = record.content.clone();
        let state_key = record.state_key.as_deref();
        self.rooms.send_event(&user_id, &room_id, &record.event_type, state_key, content, Some(txn)).await
    }

    /// Replaces a sent or dropped event's rows with its finalised record, in one batch (the
    /// transaction row stays, so a retried scheduling request still answers its `delay_id`).
    async fn finish(
        &self,
        record: DelayedEventRecord,
        outcome: Outcome,
        reason: Reason,
        event_id: Option<String>,
        error: Option<DelayedEventError>,
    ) -> Result<(), ServiceError> {
        let mut batch = WriteBatch::new();
        delete_record(&mut batch, &record);
        // A restart that raced the send leaves a due row under its new time: remove it too.
        if let Some(current) = self.record(&record.delay_id).await? {
            delete_record(&mut batch, &current);
        }
        self.finalise_into(&mut batch, record, outcome, reason, event_id, error).await?;
        Ok(self.kv.write(batch).await?)
    }

    /// Adds the finalised record and its index rows to `batch` (nothing with a retention of
    /// zero), and drops the user's oldest past [`MAX_FINALISED_PER_USER`].
    async fn finalise_into(
        &self,
        batch: &mut WriteBatch,
        event: DelayedEventRecord,
        outcome: Outcome,
        reason: Reason,
        event_id: Option<String>,
        error: Option<DelayedEventError>,
    ) -> Result<(), ServiceError> {
        if self.config.finalised_retention_ms == 0 {
            return Ok(());
        }
        let prefix = keys::user_rows(&event.user_id);
        let kept = self
            .kv
            .scan(
                Table::DelayedEventsFinalisedByUser,
                &KeyRange::prefix(&prefix),
                Direction::Forward,
                MAX_FINALISED_PER_USER,
            )
            .await?;
        let excess = (kept.len() + 1).saturating_sub(MAX_FINALISED_PER_USER);
        for (key, _) in kept.into_iter().take(excess) {
            let Some(at) = key.get(prefix.len()..) else { continue };
            let (Some(delay_id), Some(ms)) = (keys::delay_id_of_due_key(at), due_time_of(at)) else { continue };
            delete_finalised(batch, &event.user_id, ms, delay_id);
        }
        let done = FinalisedDelayedEventRecord {
            outcome: outcome.as_str().to_owned(),
            reason: reason.as_str().to_owned(),
            event_id,
            error,
            finalised_ms: self.clock.now_ms(),
            event,
        };
        let (user, delay_id, ms) = (&done.event.user_id, &done.event.delay_id, done.finalised_ms);
        batch.put(
            Table::DelayedEventsFinalisedByUser,
            keys::delayed_event_finalised_of_user(user, ms, delay_id),
            Vec::new(),
        );
        batch.put(
            Table::DelayedEventsFinalisedByTime,
            keys::delayed_event_finalised_at(ms, delay_id),
            user.as_bytes().to_vec(),
        );
        lattice_storage::put(batch, keys::delayed_event_finalised(delay_id), &done);
        Ok(())
    }

    /// Deletes finalised events older than the retention, a bounded batch at a time; at most
    /// once per [`PRUNE_INTERVAL_MS`].
    async fn prune_finalised(&self) -> Result<(), ServiceError> {
        let now = self.clock.now_ms();
        let last = self.last_prune_ms.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) < PRUNE_INTERVAL_MS {
            return Ok(());
        }
        self.last_prune_ms.store(now, std::sync::atomic::Ordering::Relaxed);
        let cutoff = now.saturating_sub(self.config.finalised_retention_ms);
        let expired = KeyRange::between(&[], &keys::delayed_event_finalised_at(cutoff, ""));
        loop {
            let rows =
                self.kv.scan(Table::DelayedEventsFinalisedByTime, &expired, Direction::Forward, PRUNE_ROWS).await?;
            let mut batch = WriteBatch::new();
            for (key, user) in &rows {
                let (Some(delay_id), Some(ms)) = (keys::delay_id_of_due_key(key), due_time_of(key)) else {
                    batch.delete(Table::DelayedEventsFinalisedByTime, key.clone());
                    continue;
                };
                delete_finalised(&mut batch, &String::from_utf8_lossy(user), ms, delay_id);
            }
            if !batch.ops.is_empty() {
                self.kv.write(batch).await?;
            }
            if rows.len() < PRUNE_ROWS {
                return Ok(());
            }
        }
    }

    /// The timer task (one per server, run by the binary): sends each event when it falls
    /// due, overdue ones at once (after a restart of the server, too).
    pub async fn run(self: Arc<Self>) {
        if !self.config.enabled {
            return;
        }
        loop {
            if let Err(error) = self.prune_finalised().await {
                tracing::warn!(%error, "pruning finalised delayed events failed");
            }
            match self.fire_due().await {
                Ok(Some(next_due)) => {
                    let wait = Duration::from_millis(next_due.saturating_sub(self.clock.now_ms())).min(MAX_TIMER_SLEEP);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.timer.notified() => {}
                    }
                }
                Ok(None) => {
                    tokio::select! {
                        () = tokio::time::sleep(MAX_TIMER_SLEEP) => {}
                        () = self.timer.notified() => {}
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "reading due delayed events failed");
                    tokio::time::sleep(STORAGE_RETRY).await;
                }
            }
        }
    }

    /// Sends every event due now; answers when the next one falls due, if any is scheduled.
    async fn fire_due(self: &Arc<Self>) -> Result<Option<u64>, ServiceError> {
        loop {
            let now = self.clock.now_ms();
            let rows =
                self.kv.scan(Table::DelayedEventsDue, &KeyRange::all(), Direction::Forward, DUE_ROWS_PER_ROUND).await?;
            let mut due = Vec::new();
            let mut next_due = None;
            for (key, _) in &rows {
                let at = key.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
                if at > now {
                    next_due = Some(at);
                    break;
                }
                if let Some(delay_id) = keys::delay_id_of_due_key(key) {
                    due.push((key.clone(), delay_id.to_owned()));
                }
            }
            if due.is_empty() {
                return Ok(next_due);
            }
            let mut sends = JoinSet::new();
            let mut handled = 0;
            for (due_key, delay_id) in due {
                while sends.len() >= FIRE_CONCURRENCY {
                    handled += usize::from(matches!(sends.join_next().await, Some(Ok(true))));
                }
                let this = self.clone();
                sends.spawn(async move { this.fire(due_key, &delay_id).await });
            }
            while let Some(done) = sends.join_next().await {
                handled += usize::from(matches!(done, Ok(true)));
            }
            if handled == 0 {
                // Every due event is being sent by a `send` action: look again shortly.
                return Ok(Some(now.saturating_add(BUSY_RECHECK_MS)));
            }
        }
    }

    /// Sends one due event. A send the auth rules refuse now (the user left, or lost the power
    /// to send it) drops the event with the reason logged; a storage failure tries again later.
    /// `false` when a `send` action is sending it already.
    async fn fire(&self, due_key: Vec<u8>, delay_id: &str) -> bool {
        let Some(_claim) = self.claim(delay_id) else { return false };
        self.fire_claimed(due_key, delay_id).await;
        true
    }

    async fn fire_claimed(&self, due_key: Vec<u8>, delay_id: &str) {
        let record = match self.record(delay_id).await {
            Ok(Some(record)) if keys::delayed_event_due(record.due_ms(), delay_id) == due_key => record,
            Ok(_) => {
                // A stale due row (its event is gone or was restarted): remove it.
                let mut batch = WriteBatch::new();
                batch.delete(Table::DelayedEventsDue, due_key);
                if let Err(error) = self.kv.write(batch).await {
                    tracing::warn!(%error, delay_id, "removing a stale due row failed");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, delay_id, "reading a due delayed event failed");
                return self.retry_later(due_key, delay_id).await;
            }
        };
        let finished = match self.send(&record).await {
            Ok(event_id) => {
                tracing::debug!(delay_id, %event_id, user = %record.user_id, room = %record.room_id, "delayed event sent");
                self.finish(record, Outcome::Send, Reason::Delay, Some(event_id.to_string()), None).await
            }
            Err(error @ (ServiceError::Storage(_) | ServiceError::Internal(_))) => {
                tracing::warn!(%error, delay_id, "sending a delayed event failed; trying again later");
                return self.retry_later(due_key, delay_id).await;
            }
            Err(error) => {
                tracing::info!(
                    %error, delay_id, user = %record.user_id, room = %record.room_id, kind = %record.event_type,
                    "delayed event dropped: it may not be sent now"
                );
                let stored = stored_error(&error);
                self.finish(record, Outcome::Cancel, Reason::Error, None, Some(stored)).await
            }
        };
        if let Err(error) = finished {
            tracing::warn!(%error, delay_id, "finalising a delayed event failed");
        }
    }

    /// Moves a due row a few seconds on, so a failing event does not spin the timer.
    async fn retry_later(&self, due_key: Vec<u8>, delay_id: &str) {
        let retry_at = self.clock.now_ms().saturating_add(STORAGE_RETRY.as_millis() as u64);
        let mut batch = WriteBatch::new();
        batch.delete(Table::DelayedEventsDue, due_key);
        batch.put(Table::DelayedEventsDue, keys::delayed_event_due(retry_at, delay_id), Vec::new());
        if let Err(error) = self.kv.write(batch).await {
            tracing::warn!(%error, delay_id, "postponing a delayed event failed");
        }
    }

    /// How many events are scheduled and not yet sent (benchmarks and tests).
    pub async fn scheduled_count(&self) -> Result<usize, ServiceError> {
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::DelayedEvents, &KeyRange::all()).await?;
        Ok(rows.len())
    }
}

/// The error a dropped event keeps, by the kind of service error a send refused it with.
fn stored_error(error: &ServiceError) -> DelayedEventError {
    let kind = match error {
        ServiceError::Forbidden(_) => "forbidden",
        ServiceError::NotFound(_) => "not_found",
        ServiceError::InvalidParam(_) => "invalid_param",
        ServiceError::BadJson(_) => "bad_json",
        ServiceError::TooLarge { .. } => "too_large",
        _ => "bad_request",
    };
    DelayedEventError { kind: kind.to_owned(), message: error.to_string() }
}

/// The service error a stored one stands for, for the HTTP edge to map to its errcode.
pub fn error_of(stored: &DelayedEventError) -> ServiceError {
    let message = stored.message.clone();
    match stored.kind.as_str() {
        "forbidden" => ServiceError::Forbidden(message),
        "not_found" => ServiceError::NotFound(message),
        "invalid_param" => ServiceError::InvalidParam(message),
        "bad_json" => ServiceError::BadJson(message),
        _ => ServiceError::BadRequest(message),
    }
}

/// The time (big-endian, first) of a due or finalised-at key.
fn due_time_of(key: &[u8]) -> Option<u64> {
    key.get(..8).and_then(|bytes| bytes.try_into().ok()).map(u64::from_be_bytes)
}

/// A finalised record and its two index rows.
fn delete_finalised(batch: &mut WriteBatch, user_id: &str, finalised_ms: u64, delay_id: &str) {
    batch.delete(Table::DelayedEventsFinalised, keys::delayed_event_finalised(delay_id));
    batch.delete(
        Table::DelayedEventsFinalisedByUser,
        keys::delayed_event_finalised_of_user(user_id, finalised_ms, delay_id),
    );
    batch.delete(Table::DelayedEventsFinalisedByTime, keys::delayed_event_finalised_at(finalised_ms, delay_id));
}

fn not_found(delay_id: &str) -> ServiceError {
    ServiceError::NotFound(format!("no scheduled delayed event {delay_id}"))
}

fn parse_ids(record: &DelayedEventRecord) -> Result<(ruma::OwnedUserId, ruma::OwnedRoomId), ServiceError> {
    let user_id = ruma::OwnedUserId::try_from(record.user_id.as_str())
        .map_err(|e| ServiceError::Internal(format!("stored delayed event has a bad user ID: {e}")))?;
    let room_id = ruma::OwnedRoomId::try_from(record.room_id.as_str())
        .map_err(|e| ServiceError::Internal(format!("stored delayed event has a bad room ID: {e}")))?;
    Ok((user_id, room_id))
}

/// The record and its two index rows.
fn put_record(batch: &mut WriteBatch, record: &DelayedEventRecord) {
    lattice_storage::put(batch, keys::delayed_event(&record.delay_id), record);
    batch.put(Table::DelayedEventsDue, keys::delayed_event_due(record.due_ms(), &record.delay_id), Vec::new());
    batch.put(Table::DelayedEventsByUser, keys::delayed_event_of_user(&record.user_id, &record.delay_id), Vec::new());
}

fn delete_record(batch: &mut WriteBatch, record: &DelayedEventRecord) {
    batch.delete(Table::DelayedEvents, keys::delayed_event(&record.delay_id));
    batch.delete(Table::DelayedEventsDue, keys::delayed_event_due(record.due_ms(), &record.delay_id));
    batch.delete(Table::DelayedEventsByUser, keys::delayed_event_of_user(&record.user_id, &record.delay_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_unknown_ones_do_not() {
        assert_eq!(DelayedAction::parse("cancel"), Some(DelayedAction::Cancel));
        assert_eq!(DelayedAction::parse("restart"), Some(DelayedAction::Restart));
        assert_eq!(DelayedAction::parse("send"), Some(DelayedAction::Send));
        assert_eq!(DelayedAction::parse("refresh"), None);
        assert_eq!(DelayedAction::parse("Send"), None);
    }

    #[test]
    fn due_keys_sort_by_time_and_give_back_the_delay_id() {
        let early = keys::delayed_event_due(5, "zzz");
        let late = keys::delayed_event_due(256, "aaa");
        assert!(early < late);
        assert_eq!(keys::delay_id_of_due_key(&late), Some("aaa"));
    }
}
