//! The to-device service: messages between local devices. Each waits in its device's inbox,
//! under a stream position, until the device syncs past it (architecture invariant 3: delivered
//! exactly once, deleted only once acknowledged). It owns the `to_device*` tables; which devices
//! a user has is the accounts' business, so callers pass the recipients' devices in.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use lattice_storage::records::{JsonObject, ToDeviceRecord};
use lattice_storage::{
    Direction, KeyRange, KvStore, ScopedStore, StorageError, StreamPositions, Table, TableScope, WriteBatch, keys,
};
use ruma::{OwnedUserId, UserId};
use serde_json::{Value, json};

use crate::ServiceError;
use crate::notifier::Notifier;

pub(crate) const TABLES: TableScope =
    TableScope { owner: "to-device", tables: &[Table::ToDevice, Table::ToDeviceTransactions] };

/// Messages one `/sync` delivers; the rest follow in the next sync.
pub const MAX_TO_DEVICE_PER_SYNC: usize = 100;
/// Recipient devices one `sendToDevice` request may reach (after `*` is expanded).
pub const MAX_TO_DEVICE_RECIPIENTS: usize = 10_000;
/// Acknowledged messages removed per sync; more are removed by the following syncs.
const MAX_ACK_DELETES: usize = 1_000;
const WRITE_RETRIES: usize = 8;

/// `messages` of a `sendToDevice` request: user → device ID (or `*`) → content.
pub type ToDeviceMessages = BTreeMap<ruma::OwnedUserId, BTreeMap<String, JsonObject>>;

/// What one sync takes from a device's inbox.
pub struct ToDeviceBatch {
    pub events: Vec<Value>,
    /// The position of the last message delivered when more are waiting; the next sync token
    /// acknowledges only up to it.
    pub delivered_up_to: Option<u64>,
}

/// One send's batch, prepared by [`ToDevice::prepare_send`].
pub(crate) struct PreparedSend {
    pub batch: WriteBatch,
    position: lattice_storage::StreamPosition,
    recipients: Vec<OwnedUserId>,
}

/// The devices of each local recipient, as the accounts service lists them.
pub(crate) type RecipientDevices = HashMap<OwnedUserId, Vec<String>>;

pub struct ToDevice {
    kv: Arc<dyn KvStore>,
    /// The to-device stream (`stream.to_device`): inbox keys are its positions.
    stream: StreamPositions,
    notifier: Arc<Notifier>,
}

impl ToDevice {
    pub(crate) fn new(kv: Arc<dyn KvStore>, stream: StreamPositions, notifier: Arc<Notifier>) -> Self {
        Self { kv: ScopedStore::new(kv, TABLES), stream, notifier }
    }

    /// The completed mark of the to-device stream: every message up to it is readable.
    pub(crate) async fn position(&self) -> Result<u64, ServiceError> {
        Ok(self.stream.completed().await?)
    }

    /// `PUT /sendToDevice/{eventType}/{txnId}` of local recipients only: queues each message
    /// in its recipient devices' inboxes, all in one batch. Repeating a transaction ID does
    /// nothing a second time. Recipients missing from `devices` are skipped.
    pub(crate) async fn send(
        &self,
        sender: &UserId,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: &ToDeviceMessages,
        devices: &RecipientDevices,
    ) -> Result<(), ServiceError> {
        for _ in 0..WRITE_RETRIES {
            let Some(send) = self.prepare_send(sender, sender_device, event_type, txn_id, messages, devices).await?
            else {
                return Ok(());
            };
            match self.kv.write(send.batch.clone()).await {
                Ok(()) => {
                    self.sent(send).await;
                    return Ok(());
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent writes; try again".into()))
    }

    /// The batch of one send (its transaction mark, conditional on its absence, and the
    /// messages under one new position), for the caller to extend and write; `None` when the
    /// transaction was already sent. Once written, hand it to [`ToDevice::sent`].
    pub(crate) async fn prepare_send(
        &self,
        sender: &UserId,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: &ToDeviceMessages,
        devices: &RecipientDevices,
    ) -> Result<Option<PreparedSend>, ServiceError> {
        if event_type.is_empty() || event_type.len() > lattice_core::limits::MAX_EVENT_TYPE_BYTES {
            return Err(ServiceError::BadJson("invalid event type".into()));
        }
        let txn_key = keys::transaction(sender.as_str(), sender_device, txn_id);
        if self.kv.get(Table::ToDeviceTransactions, &txn_key).await?.is_some() {
            return Ok(None);
        }
        let mut batch = WriteBatch::new();
        batch.expect(Table::ToDeviceTransactions, txn_key.clone(), None);
        batch.put(Table::ToDeviceTransactions, txn_key, Vec::new());
        let position = self.stream.take().await?;
        let queued = queue_messages(&mut batch, sender, event_type, messages, devices, position.get())?;
        tracing::debug!(sender = %sender, event_type, queued, "queueing to-device messages");
        let recipients = messages.keys().filter(|user| devices.contains_key(*user)).cloned().collect();
        Ok(Some(PreparedSend { batch, position, recipients }))
    }

    /// Publishes a written send and wakes its recipients.
    pub(crate) async fn sent(&self, send: PreparedSend) {
        send.position.published().await;
        for recipient in &send.recipients {
            self.notifier.notify_user(recipient);
        }
    }

    /// Deletes the messages a device acknowledged by syncing with a token past them.
    pub(crate) async fn acknowledge_to_device(
        &self,
        user_id: &UserId,
        device_id: &str,
        acknowledged: u64,
    ) -> Result<(), ServiceError> {
        let range = KeyRange::between(
            &keys::to_device_inbox(user_id.as_str(), device_id),
            &keys::to_device(user_id.as_str(), device_id, acknowledged.saturating_add(1), 0),
        );
        let rows = self.kv.scan(Table::ToDevice, &range, Direction::Forward, MAX_ACK_DELETES).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        for (key, _) in rows {
            batch.delete(Table::ToDevice, key);
        }
        Ok(self.kv.write(batch).await?)
    }

    /// A dehydrated device's inbox, read by its owner (MSC3814 `/events`): first deletes what
    /// the owner acknowledged by passing back a `next_batch` (as a sync token does for a
    /// device), then returns the next messages, oldest first, and the `next_batch` that
    /// acknowledges them. Past the last message the same call returns no events.
    pub(crate) async fn dehydrated_device_events(
        &self,
        user_id: &UserId,
        device_id: &str,
        acknowledged: Option<u64>,
    ) -> Result<(Vec<Value>, u64), ServiceError> {
        let now = self.position().await?;
        if let Some(acknowledged) = acknowledged {
            // A token from the future acknowledges at most what exists.
            self.acknowledge_to_device(user_id, device_id, acknowledged.min(now)).await?;
        }
        let pending = self.pending_to_device(user_id, device_id, now).await?;
        Ok((pending.events, pending.delivered_up_to.unwrap_or(now)))
    }

    /// Adds the removal of a device's whole inbox (its device is being deleted).
    pub(crate) async fn clear_inbox_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        device_id: &str,
    ) -> Result<(), ServiceError> {
        let inbox = KeyRange::prefix(&keys::to_device_inbox(user_id.as_str(), device_id));
        for (key, _) in
            self.kv.scan(Table::ToDevice, &inbox, Direction::Forward, lattice_storage::MAX_SCAN_ROWS).await?
        {
            batch.delete(Table::ToDevice, key);
        }
        Ok(())
    }

    /// Messages waiting for the device with positions up to `now`, oldest first.
    pub(crate) async fn pending_to_device(
        &self,
        user_id: &UserId,
        device_id: &str,
        now: u64,
    ) -> Result<ToDeviceBatch, ServiceError> {
        let range = KeyRange::between(
            &keys::to_device_inbox(user_id.as_str(), device_id),
            &keys::to_device(user_id.as_str(), device_id, now.saturating_add(1), 0),
        );
        let rows = self.kv.scan(Table::ToDevice, &range, Direction::Forward, MAX_TO_DEVICE_PER_SYNC + 1).await?;
        // A send's messages to one device share a position and are delivered all or none:
        // acknowledging half of a position would lose the other half.
        let cut = rows.get(MAX_TO_DEVICE_PER_SYNC).and_then(|(key, _)| keys::to_device_position(key));
        let mut events = Vec::with_capacity(rows.len());
        for (key, raw) in rows {
            let position = keys::to_device_position(&key).unwrap_or(0);
            if cut.is_some_and(|cut| position >= cut) {
                break;
            }
            let message: ToDeviceRecord =
                serde_json::from_slice(&raw).map_err(|e| ServiceError::Internal(e.to_string()))?;
            events.push(json!({ "sender": message.sender, "type": message.event_type, "content": message.content }));
        }
        let delivered_up_to = cut.map(|cut| cut.saturating_sub(1));
        Ok(ToDeviceBatch { events, delivered_up_to })
    }
}

/// Puts each message into its recipients' inboxes under one position.
fn queue_messages(
    batch: &mut WriteBatch,
    sender: &UserId,
    event_type: &str,
    messages: &ToDeviceMessages,
    devices: &RecipientDevices,
    position: u64,
) -> Result<usize, ServiceError> {
    let mut seq: u32 = 0;
    for (user, wanted) in messages {
        let Some(known) = devices.get(user) else {
            tracing::debug!(recipient = %user, "skipping a to-device message for a user with no local devices");
            continue;
        };
        for (device, content) in wanted {
            // `*` means every device; unknown devices are skipped, as the spec asks.
            for target in known.iter().filter(|d| device == "*" || *d == device) {
                if seq as usize >= MAX_TO_DEVICE_RECIPIENTS {
                    return Err(ServiceError::LimitExceeded(format!(
                        "one request may reach at most {MAX_TO_DEVICE_RECIPIENTS} devices"
                    )));
                }
                let record = ToDeviceRecord {
                    sender: sender.to_string(),
                    event_type: event_type.to_owned(),
                    content: content.clone(),
                };
                lattice_storage::put(batch, keys::to_device(user.as_str(), target, position, seq), &record);
                seq += 1;
            }
        }
    }
    Ok(seq as usize)
}
