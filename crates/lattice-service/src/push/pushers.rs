//! Pushers (`GET /pushers`, `POST /pushers/set`) and delivery to their HTTP push gateways
//! (push gateway API v1, `POST {url}` = `…/_matrix/push/v1/notify`). A notification for a user
//! with pushers is queued durably (`push_queue`, one row per pusher, written in the same batch as
//! the notification itself); [`Push::deliver_due`] sends what is due, deletes what was accepted,
//! and backs off what failed (2 s doubling to an hour, at most [`MAX_DELIVERY_ATTEMPTS`] tries).
//! A gateway that names a pushkey `rejected` loses that pusher.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lattice_storage::records::{PushQueueRecord, PusherRecord};
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};
use ruma::UserId;
use ruma::api::client::push::{Pusher, PusherIds, PusherKind};
use ruma::push::Action;
use serde_json::{Value, json};

use super::Push;
use crate::ServiceError;

/// Each user's pushers as stored, for the notifications of every event: most users have none,
/// and a room of 1,000 members would otherwise seek the table 1,000 times per message. Every
/// write of `pushers` here forgets the users it touched.
pub(super) type PushersCache = crate::user_cache::UserCache<Vec<Pusher>>;

/// The spec's limits on pusher IDs.
const MAX_APP_ID_BYTES: usize = 64;
const MAX_PUSHKEY_BYTES: usize = 512;
/// Pushers one user may have.
pub const MAX_PUSHERS_PER_USER: usize = 100;
/// Queued pushes looked at per delivery round.
const DELIVERY_BATCH: usize = 100;
pub const MAX_DELIVERY_ATTEMPTS: u32 = 12;
const FIRST_RETRY_MS: u64 = 2_000;
const MAX_RETRY_MS: u64 = 3_600_000;
/// The path every push gateway URL must end with (spec: `data.url`).
const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::InvalidParam(message.into())
}

fn check_ids(ids: &PusherIds) -> Result<(), ServiceError> {
    let fits = |value: &str, limit: usize| !value.is_empty() && value.len() <= limit && !value.contains('\0');
    if !fits(&ids.app_id, MAX_APP_ID_BYTES) {
        return Err(invalid(format!("app_id must be 1 to {MAX_APP_ID_BYTES} bytes")));
    }
    if !fits(&ids.pushkey, MAX_PUSHKEY_BYTES) {
        return Err(invalid(format!("pushkey must be 1 to {MAX_PUSHKEY_BYTES} bytes")));
    }
    Ok(())
}

/// Back-off after `attempts` failed tries.
fn retry_after_ms(attempts: u32) -> u64 {
    FIRST_RETRY_MS.saturating_mul(1u64 << attempts.saturating_sub(1).min(20)).min(MAX_RETRY_MS)
}

impl Push {
    /// `GET /pushers`: the caller's pushers.
    pub async fn pushers(&self, user_id: &UserId) -> Result<Vec<Pusher>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows =
            self.kv.scan(Table::Pushers, &KeyRange::prefix(&prefix), Direction::Forward, MAX_PUSHERS_PER_USER).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, raw)| serde_json::from_slice::<PusherRecord>(&raw).ok())
            .filter_map(|record| serde_json::from_value(record.0).ok())
            .collect())
    }

    /// The user's pushers, from the cache when they are in it.
    pub(super) async fn cached_pushers(&self, user_id: &UserId) -> Result<Arc<Vec<Pusher>>, ServiceError> {
        self.pushers_cache.get_or_load(user_id, self.pushers(user_id)).await
    }

    /// `POST /pushers/set` with a pusher: adds or replaces the caller's pusher with its
    /// `app_id` and `pushkey`; without `append`, other users' pushers with the same IDs go.
    pub async fn set_pusher(&self, user_id: &UserId, pusher: Pusher, append: bool) -> Result<(), ServiceError> {
        check_ids(&pusher.ids)?;
        let PusherKind::Http(data) = &pusher.kind else {
            return Err(invalid("only http pushers are supported"));
        };
        let url = reqwest::Url::parse(&data.url).map_err(|e| invalid(format!("data.url: {e}")))?;
        if !url.path().ends_with(NOTIFY_PATH) {
            return Err(invalid(format!("data.url must end with {NOTIFY_PATH}")));
        }
        match url.scheme() {
            "https" => {}
            "http" if self.allow_insecure_gateways => {}
            _ => return Err(invalid("data.url must be https (push.allow_insecure_gateways allows http)")),
        }
        let (user, ids) = (user_id.as_str(), &pusher.ids);
        let key = keys::pusher(user, &ids.app_id, &ids.pushkey);
        let existing = self.pushers(user_id).await?;
        let replaces = existing.iter().any(|p| p.ids.app_id == ids.app_id && p.ids.pushkey == ids.pushkey);
        if !replaces && existing.len() >= MAX_PUSHERS_PER_USER {
            return Err(ServiceError::LimitExceeded(format!("at most {MAX_PUSHERS_PER_USER} pushers per user")));
        }
        let mut batch = WriteBatch::new();
        let mut touched = vec![user_id.to_owned()];
        if !append {
            let prefix = keys::pusher_key_users(&ids.app_id, &ids.pushkey);
            for (row, _) in
                self.kv.scan(Table::PusherKeys, &KeyRange::prefix(&prefix), Direction::Forward, 1_000).await?
            {
                let other = String::from_utf8_lossy(&row[prefix.len()..]).into_owned();
                if other != user {
                    batch.delete(Table::Pushers, keys::pusher(&other, &ids.app_id, &ids.pushkey));
                    batch.delete(Table::PusherKeys, row);
                    touched.extend(ruma::OwnedUserId::try_from(other).ok());
                }
            }
        }
        let value = serde_json::to_value(&pusher).map_err(|e| ServiceError::Internal(e.to_string()))?;
        lattice_storage::put(&mut batch, key, &PusherRecord(value));
        batch.put(Table::PusherKeys, keys::pusher_key(&ids.app_id, &ids.pushkey, user), Vec::new());
        let written = self.kv.write(batch).await;
        for user_id in &touched {
            self.pushers_cache.forget(user_id);
        }
        Ok(written?)
    }

    /// Whether the user has any pusher.
    pub(super) async fn has_pushers(&self, user_id: &UserId) -> Result<bool, ServiceError> {
        Ok(!self.cached_pushers(user_id).await?.is_empty())
    }

    /// `POST /pushers/set` with `kind: null`: deletes the caller's pusher (absent is fine).
    pub async fn delete_pusher(&self, user_id: &UserId, ids: &PusherIds) -> Result<(), ServiceError> {
        check_ids(ids)?;
        let mut batch = WriteBatch::new();
        batch.delete(Table::Pushers, keys::pusher(user_id.as_str(), &ids.app_id, &ids.pushkey));
        batch.delete(Table::PusherKeys, keys::pusher_key(&ids.app_id, &ids.pushkey, user_id.as_str()));
        let written = self.kv.write(batch).await;
        self.pushers_cache.forget(user_id);
        Ok(written?)
    }

    /// Adds one queued push per pusher of the recipient to `batch` (the notification's batch).
    /// `object` is the event as JSON.
    pub(super) async fn queue_pushes(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        event: &super::PushedEvent<'_>,
        actions: &[Action],
        object: &Value,
    ) -> Result<bool, ServiceError> {
        let pushers = self.cached_pushers(user_id).await?;
        if pushers.is_empty() {
            return Ok(false);
        }
        let tweaks: serde_json::Map<String, Value> = actions
            .iter()
            .filter_map(|action| match action {
                // A tweak without a value (`highlight`) means `true`.
                Action::SetTweak(tweak) => {
                    let value = tweak.value().and_then(|value| serde_json::from_str(value.get()).ok());
                    Some((tweak.set_tweak().to_owned(), value.unwrap_or(Value::Bool(true))))
                }
                _ => None,
            })
            .collect();
        for pusher in pushers.iter() {
            let record = PushQueueRecord {
                user_id: user_id.to_string(),
                app_id: pusher.ids.app_id.clone(),
                pushkey: pusher.ids.pushkey.clone(),
                room_id: event.room_id.to_string(),
                event_id: event.event_id.to_owned(),
                event_type: object["type"].as_str().unwrap_or_default().to_owned(),
                sender: object["sender"].as_str().unwrap_or_default().to_owned(),
                content: object["content"].clone(),
                tweaks: Value::Object(tweaks.clone()),
                highlight: actions.iter().any(Action::is_highlight),
                position: event.position,
                attempts: 0,
            };
            lattice_storage::put(batch, queue_key(0, &record), &record);
        }
        Ok(!pushers.is_empty())
    }

    /// Adds a counts-only push (no event: the gateway updates the badge) per pusher of the user
    /// to `batch`, after a receipt at `position` read a notification. Such pushes to one pusher
    /// share one queue key, so a burst of receipts sends one update, with the counts at delivery.
    pub(super) async fn queue_badge_updates(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        position: u64,
    ) -> Result<bool, ServiceError> {
        let pushers = self.cached_pushers(user_id).await?;
        for pusher in pushers.iter() {
            let record = PushQueueRecord {
                user_id: user_id.to_string(),
                app_id: pusher.ids.app_id.clone(),
                pushkey: pusher.ids.pushkey.clone(),
                room_id: String::new(),
                event_id: String::new(),
                event_type: String::new(),
                sender: String::new(),
                content: Value::Null,
                tweaks: json!({}),
                highlight: false,
                // Not the key's order (see `queue_key`): it tells a later receipt's row apart
                // from one being delivered, whose deletion is conditional on its bytes.
                position,
                attempts: 0,
            };
            lattice_storage::put(batch, queue_key(0, &record), &record);
        }
        Ok(!pushers.is_empty())
    }

    /// Sends every queued push that is due; returns how many were delivered. Called by the
    /// server's delivery task (through [`crate::Service::deliver_due_pushes`], which gives each
    /// user's joined rooms for their badge), and woken early when a push is queued.
    pub(crate) async fn deliver_due(&self, rooms: &dyn JoinedRooms) -> Result<usize, ServiceError> {
        let now = self.clock.now_ms();
        let due = KeyRange::between(&keys::push_queue_due(0), &keys::push_queue_due(now.saturating_add(1)));
        let rows = self.kv.scan(Table::PushQueue, &due, Direction::Forward, DELIVERY_BATCH).await?;
        // Each user's badge is read once per round, however many pushes they have in it.
        let mut badges: HashMap<String, u64> = HashMap::new();
        let mut delivered = 0;
        for (key, raw) in rows {
            let Ok(mut queued) = serde_json::from_slice::<PushQueueRecord>(&raw) else {
                self.kv.write(single_delete(key, raw)).await?;
                continue;
            };
            let pusher_key = keys::pusher(&queued.user_id, &queued.app_id, &queued.pushkey);
            let pusher = lattice_storage::get::<PusherRecord>(self.kv.as_ref(), &pusher_key).await?;
            let Some(pusher) = pusher.and_then(|p| serde_json::from_value::<Pusher>(p.value.0).ok()) else {
                // The pusher is gone: so is what was waiting for it.
                self.kv.write(single_delete(key, raw)).await?;
                continue;
            };
            let badge = match badges.get(&queued.user_id) {
                Some(&badge) => badge,
                None => {
                    let badge = match UserId::parse(&queued.user_id) {
                        Ok(user_id) => self.badge_count(&user_id, &rooms.joined_rooms(&user_id).await?).await?,
                        // Never stored by this server; the push still goes out.
                        Err(_) => 0,
                    };
                    badges.insert(queued.user_id.clone(), badge);
                    badge
                }
            };
            // Only if the row is still the one read: a counts-only row replaced meanwhile by a
            // later receipt's stays, to be sent with the counts after that receipt.
            let mut batch = single_delete(key, raw);
            let mut removes_pusher = false;
            match self.post(&pusher, &queued, badge).await {
                Ok(rejected) => {
                    delivered += 1;
                    if rejected {
                        removes_pusher = true;
                        tracing::info!(user = %queued.user_id, app_id = %queued.app_id, "the push gateway rejected a pushkey; its pusher is removed");
                        batch.delete(Table::Pushers, pusher_key);
                        let ids = (&queued.app_id, &queued.pushkey, &queued.user_id);
                        batch.delete(Table::PusherKeys, keys::pusher_key(ids.0, ids.1, ids.2));
                    }
                }
                Err(error) if queued.attempts + 1 >= MAX_DELIVERY_ATTEMPTS => {
                    tracing::warn!(user = %queued.user_id, app_id = %queued.app_id, %error, "push dropped after its last attempt");
                }
                Err(error) => {
                    queued.attempts += 1;
                    let due = now.saturating_add(retry_after_ms(queued.attempts));
                    tracing::debug!(user = %queued.user_id, app_id = %queued.app_id, %error, attempts = queued.attempts, "push gateway failed; backing off");
                    lattice_storage::put(&mut batch, queue_key(due, &queued), &queued);
                }
            }
            let written = self.kv.write(batch).await;
            if removes_pusher && let Ok(user_id) = UserId::parse(&queued.user_id) {
                self.pushers_cache.forget(&user_id);
            }
            match written {
                Err(lattice_storage::StorageError::Conflict) => {}
                other => other?,
            }
        }
        Ok(delivered)
    }

    /// One `POST` to the pusher's gateway; `Ok(true)` when the gateway rejected the pushkey.
    async fn post(&self, pusher: &Pusher, queued: &PushQueueRecord, badge: u64) -> Result<bool, String> {
        let PusherKind::Http(data) = &pusher.kind else { return Err("not an http pusher".into()) };
        let mut device_data = serde_json::to_value(data).unwrap_or_default();
        if let Some(object) = device_data.as_object_mut() {
            object.remove("url");
        }
        let device = json!({
            "app_id": pusher.ids.app_id,
            "pushkey": pusher.ids.pushkey,
            "data": device_data,
            "tweaks": queued.tweaks,
        });
        let mut notification = json!({
            "prio": if queued.highlight { "high" } else { "low" },
            "counts": counts(badge, is_badge_update(queued)),
            "devices": [device],
        });
        // A counts-only push names no event (the spec lets `event_id` be left out then);
        // `event_id_only` keeps the event's IDs, `counts` and `devices`.
        if !is_badge_update(queued) {
            notification["event_id"] = json!(queued.event_id);
            notification["room_id"] = json!(queued.room_id);
            if data.format.as_ref().map(|format| format.as_str()) != Some("event_id_only") {
                notification["type"] = json!(queued.event_type);
                notification["sender"] = json!(queued.sender);
                notification["content"] = queued.content.clone();
            }
        }
        let response = self
            .http
            .post(&data.url)
            .json(&json!({ "notification": notification }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("gateway answered {status}"));
        }
        let body: Value = response.json().await.unwrap_or_default();
        let rejected =
            body["rejected"].as_array().is_some_and(|keys| keys.iter().any(|k| k == &json!(pusher.ids.pushkey)));
        Ok(rejected)
    }
}

/// Where a user's badge is counted: their joined rooms (the rooms service's).
#[async_trait::async_trait]
pub(crate) trait JoinedRooms: Send + Sync {
    async fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<ruma::OwnedRoomId>, ServiceError>;
}

#[async_trait::async_trait]
impl JoinedRooms for crate::rooms::Rooms {
    async fn joined_rooms(&self, user_id: &UserId) -> Result<Vec<ruma::OwnedRoomId>, ServiceError> {
        crate::rooms::Rooms::joined_rooms(self, user_id).await
    }
}

/// Deletes a queued push, if it is still the one read.
fn single_delete(key: Vec<u8>, raw: Vec<u8>) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.expect(Table::PushQueue, key.clone(), Some(raw));
    batch.delete(Table::PushQueue, key);
    batch
}

/// A counts-only push, queued by a receipt: it names no event.
fn is_badge_update(queued: &PushQueueRecord) -> bool {
    queued.event_id.is_empty()
}

/// The queue key of a push due at `due_ms`: in event order, counts-only pushes after every
/// event push, all of one pusher's counts-only pushes under one key.
fn queue_key(due_ms: u64, queued: &PushQueueRecord) -> Vec<u8> {
    let order = if is_badge_update(queued) { u64::MAX } else { queued.position };
    keys::push_queue(due_ms, order, &queued.user_id, &queued.app_id, &queued.pushkey)
}

/// The push's `counts`: `unread` is left out when zero (the spec: counts of zero should be
/// omitted), except in a counts-only push, whose zero is what clears a badge.
fn counts(unread: u64, badge_update: bool) -> Value {
    match unread > 0 || badge_update {
        true => json!({ "unread": unread }),
        false => json!({}),
    }
}

/// How long a delivery task sleeps between rounds when nothing wakes it.
pub const DELIVERY_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_from_two_seconds_to_an_hour() {
        assert_eq!(retry_after_ms(1), 2_000);
        assert_eq!(retry_after_ms(2), 4_000);
        assert_eq!(retry_after_ms(5), 32_000);
        assert_eq!(retry_after_ms(30), MAX_RETRY_MS);
    }

    #[test]
    fn a_zero_count_is_left_out_but_for_a_counts_only_push() {
        assert_eq!(counts(0, false), json!({}));
        assert_eq!(counts(3, false), json!({ "unread": 3 }));
        assert_eq!(counts(0, true), json!({ "unread": 0 }));
    }
}
