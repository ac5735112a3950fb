//! The account-data service: global and per-room account data and filters, JSON objects a
//! client stores for itself. It owns the `account_data*` and `filters` tables; rules that need a
//! room (per-room data needs a membership) are checked by the composer in `lib.rs` first.

use lattice_core::limits::{MAX_ACCOUNT_DATA_BYTES, MAX_EVENT_TYPE_BYTES, MAX_FILTER_BYTES};
use lattice_storage::records::{AccountDataRecord, FilterRecord, JsonObject};
mod tags;

use std::collections::HashSet;
use std::sync::Arc;

use lattice_storage::{KeyRange, KvStore, ScopedStore, StreamPositions, Table, TableScope, WriteBatch, keys};
use ruma::{RoomId, UserId};
use serde_json::Value;

use crate::ServiceError;
use crate::notifier::Notifier;
use crate::user_cache::UserCache;

/// Filter IDs are per-user decimal counters.
pub type FilterId = u64;

/// Account data types the server manages itself (spec: "Client Config"); clients may not set them.
const SERVER_MANAGED_TYPES: &[&str] = &["m.fully_read", "m.push_rules"];

pub(crate) fn check_owner(caller: &UserId, target: &UserId) -> Result<(), ServiceError> {
    if caller != target {
        return Err(ServiceError::Forbidden("you can only access your own account data and filters".into()));
    }
    Ok(())
}

fn serialized_len(object: &JsonObject) -> usize {
    serde_json::to_vec(object).map(|v| v.len()).unwrap_or(usize::MAX)
}

/// The tables this service owns. `counters` holds the per-user filter ID counters
/// (`filter\0{user}`), named so no other counter can collide with them.
pub(crate) const TABLES: TableScope = TableScope {
    owner: "account data",
    tables: &[
        Table::AccountData,
        Table::AccountDataPositions,
        Table::AccountDataChanges,
        Table::Filters,
        Table::Counters,
    ],
};

/// One changed entry: its room (`None` for global data), type and content.
pub type AccountDataEntry = (Option<String>, String, JsonObject);

pub struct AccountData {
    kv: Arc<dyn KvStore>,
    /// The account-data stream (`stream.account_data`): its positions order account-data
    /// changes for `/sync`, independent of the other streams.
    stream: StreamPositions,
    notifier: Arc<Notifier>,
    /// Each user's ignored senders as last read, for push evaluation, which asks for every
    /// local member of a room on every event. This service is the only writer of account data
    /// ([`AccountData::write_account_data_if`]), and it drops the user's entry on every write of
    /// `m.ignored_user_list`.
    ignored_cache: UserCache<HashSet<String>>,
}

/// The global account-data type listing the senders a user ignores.
const IGNORED_USER_LIST_TYPE: &str = "m.ignored_user_list";

impl AccountData {
    pub(crate) fn new(kv: Arc<dyn KvStore>, stream: StreamPositions, notifier: Arc<Notifier>) -> Self {
        Self { kv: ScopedStore::new(kv, TABLES), stream, notifier, ignored_cache: UserCache::default() }
    }

    /// Global (`room_id` `None`) or per-room account data of the caller.
    pub async fn get(
        &self,
        caller: &UserId,
        target: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
    ) -> Result<JsonObject, ServiceError> {
        check_owner(caller, target)?;
        let key = keys::account_data(target.as_str(), room_id.map(|r| r.as_str()), event_type);
        match lattice_storage::get::<AccountDataRecord>(self.kv.as_ref(), &key).await? {
            Some(fetched) => Ok(fetched.value.0),
            None => server_default(target, room_id, event_type)
                .ok_or_else(|| ServiceError::NotFound(format!("no account data of type {event_type}"))),
        }
    }

    /// The user's stored global account data of `event_type`, with its stored bytes for a
    /// conditional write ([`AccountData::write_account_data_if`]); `None` when never written.
    pub(crate) async fn stored_global(
        &self,
        user_id: &UserId,
        event_type: &str,
    ) -> Result<Option<(JsonObject, Vec<u8>)>, ServiceError> {
        let key = keys::account_data(user_id.as_str(), None, event_type);
        let stored = lattice_storage::get::<AccountDataRecord>(self.kv.as_ref(), &key).await?;
        Ok(stored.map(|fetched| (fetched.value.0, fetched.raw)))
    }

    /// The completed mark of the account-data stream: every change up to it is readable.
    pub(crate) async fn position(&self) -> Result<u64, ServiceError> {
        Ok(self.stream.completed().await?)
    }

    /// The checks of `PUT /user/{userId}[/rooms/{roomId}]/account_data/{type}` that need no
    /// room: the caller's own data, a valid type, not one the server manages (`m.fully_read`,
    /// `m.push_rules`).
    pub(crate) fn check_client_write(caller: &UserId, target: &UserId, event_type: &str) -> Result<(), ServiceError> {
        check_owner(caller, target)?;
        if event_type.is_empty() || event_type.len() > MAX_EVENT_TYPE_BYTES || event_type.contains('\0') {
            return Err(ServiceError::InvalidParam(format!("type must be 1 to {MAX_EVENT_TYPE_BYTES} bytes")));
        }
        if SERVER_MANAGED_TYPES.contains(&event_type) {
            return Err(ServiceError::ServerManaged(format!(
                "{event_type} is managed by the server and cannot be set by clients"
            )));
        }
        Ok(())
    }

    /// Stores account data with a position of the account-data stream, in one batch, so
    /// `/sync` delivers the change exactly once.
    pub(crate) async fn write_account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
        content: JsonObject,
    ) -> Result<(), ServiceError> {
        self.write_account_data_if(user_id, room_id, event_type, content, None).await
    }

    /// [`AccountData::write_account_data`] for a read-modify-write: with `expected` set, the write
    /// only happens if the stored value is still the one read (`Some(None)`: still absent),
    /// else it fails with a storage conflict the caller retries.
    pub(crate) async fn write_account_data_if(
        &self,
        user_id: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
        content: JsonObject,
        expected: Option<Option<Vec<u8>>>,
    ) -> Result<(), ServiceError> {
        if serialized_len(&content) > MAX_ACCOUNT_DATA_BYTES {
            return Err(ServiceError::TooLarge { what: "account data", limit: MAX_ACCOUNT_DATA_BYTES });
        }
        let key = keys::account_data(user_id.as_str(), room_id.map(|r| r.as_str()), event_type);
        let mut batch = WriteBatch::new();
        if let Some(expected) = expected {
            batch.expect(Table::AccountData, key.clone(), expected);
        }
        // The entry's previous change row goes: a since-read then finds each entry once. A row
        // left by a concurrent writer is harmless, since readers check it against the position.
        if let Some(previous) = self.kv.get(Table::AccountDataPositions, &key).await? {
            batch.delete(Table::AccountDataChanges, change_key(user_id, &previous));
        }
        let position = self.stream.take().await?;
        lattice_storage::put(&mut batch, key.clone(), &AccountDataRecord(content));
        batch.put(Table::AccountDataPositions, key.clone(), position.get().to_be_bytes().to_vec());
        batch.put(Table::AccountDataChanges, keys::account_data_change(user_id.as_str(), position.get()), key);
        let written = self.kv.write(batch).await;
        if room_id.is_none() && event_type == IGNORED_USER_LIST_TYPE {
            // Whatever the outcome (a failed write may still have reached the store), the next
            // read goes to the store.
            self.ignored_cache.forget(user_id);
        }
        written?;
        position.published().await;
        self.notifier.notify_user(user_id);
        Ok(())
    }

    /// The user's account data changed in `(since, now]`, oldest first, read from the change
    /// index: the cost follows the number of entries changed, not the number stored (each entry
    /// has one current change row). An `initial` read also holds the server-managed types the
    /// user never wrote, at their defaults (`m.push_rules`), so a client's first `/sync` has them.
    pub(crate) async fn account_data_since(
        &self,
        user_id: &UserId,
        (since, now): (u64, u64),
        initial: bool,
    ) -> Result<Vec<AccountDataEntry>, ServiceError> {
        let range = KeyRange::between(
            &keys::account_data_change(user_id.as_str(), since.saturating_add(1)),
            &keys::account_data_change(user_id.as_str(), now.saturating_add(1)),
        );
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::AccountDataChanges, &range).await?;
        let prefix = keys::user_rows(user_id.as_str());
        let mut seen = HashSet::new();
        let mut changed = Vec::new();
        for (change, entry_key) in rows {
            let current = self.kv.get(Table::AccountDataPositions, &entry_key).await?;
            // A stale row (the entry changed again since) is skipped: the newer row delivers it.
            if current.as_deref().and_then(keys::stored_position) != keys::trailing_position(&change)
                || !seen.insert(entry_key.clone())
            {
                continue;
            }
            let Some(rest) = entry_key.strip_prefix(prefix.as_slice()) else { continue };
            let rest = String::from_utf8_lossy(rest).into_owned();
            let Some((room, event_type)) = rest.split_once('\0') else { continue };
            let Some(record) = lattice_storage::get::<AccountDataRecord>(self.kv.as_ref(), &entry_key).await? else {
                continue;
            };
            let room = (!room.is_empty()).then(|| room.to_owned());
            changed.push((room, event_type.to_owned(), record.value.0));
        }
        if initial {
            for event_type in SERVER_MANAGED_GLOBAL_TYPES {
                let written = changed.iter().any(|(room, kind, _)| room.is_none() && kind == event_type);
                if !written
                    && self.stored_global(user_id, event_type).await?.is_none()
                    && let Some(content) = server_default(user_id, None, event_type)
                {
                    changed.push((None, (*event_type).to_owned(), content));
                }
            }
        }
        Ok(changed)
    }

    /// Changes whenever any user's ignored users may have changed.
    pub(crate) fn ignored_users_generation(&self) -> u64 {
        self.ignored_cache.generation()
    }

    /// Senders whose events the user asked not to see (`m.ignored_user_list`): from the cache,
    /// else read and cached.
    pub(crate) async fn ignored_users(&self, user_id: &UserId) -> Result<Arc<HashSet<String>>, ServiceError> {
        self.ignored_cache.get_or_load(user_id, self.stored_ignored_users(user_id)).await
    }

    async fn stored_ignored_users(&self, user_id: &UserId) -> Result<HashSet<String>, ServiceError> {
        let key = keys::account_data(user_id.as_str(), None, IGNORED_USER_LIST_TYPE);
        let Some(record) = lattice_storage::get::<AccountDataRecord>(self.kv.as_ref(), &key).await? else {
            return Ok(HashSet::new());
        };
        let ignored = record.value.0.0.get("ignored_users").and_then(Value::as_object);
        Ok(ignored.map(|users| users.keys().cloned().collect()).unwrap_or_default())
    }

    /// `POST /user/{userId}/filter`: checks the filter's shape, stores it as given.
    pub async fn create_filter(
        &self,
        caller: &UserId,
        target: &UserId,
        filter: JsonObject,
    ) -> Result<FilterId, ServiceError> {
        check_owner(caller, target)?;
        if serialized_len(&filter) > MAX_FILTER_BYTES {
            return Err(ServiceError::TooLarge { what: "filter", limit: MAX_FILTER_BYTES });
        }
        let value = serde_json::to_value(&filter).map_err(|e| ServiceError::Internal(e.to_string()))?;
        // Checked by the one filter parser, the one `/sync` applies it with, so a stored filter
        // never fails there.
        crate::rooms::SyncFilter::from_json(value)?;
        let id = lattice_storage::next_counter(self.kv.as_ref(), &format!("filter\0{target}")).await?;
        let mut batch = WriteBatch::new();
        lattice_storage::put(&mut batch, keys::filter(target.as_str(), id), &FilterRecord(filter));
        self.kv.write(batch).await?;
        Ok(id)
    }

    pub async fn filter(&self, caller: &UserId, target: &UserId, filter_id: &str) -> Result<JsonObject, ServiceError> {
        check_owner(caller, target)?;
        let not_found = || ServiceError::NotFound(format!("no filter {filter_id}"));
        let id: FilterId = filter_id.parse().map_err(|_| not_found())?;
        match lattice_storage::get::<FilterRecord>(self.kv.as_ref(), &keys::filter(target.as_str(), id)).await? {
            Some(fetched) => Ok(fetched.value.0),
            None => Err(not_found()),
        }
    }
}

/// Global types that every user has, at a server default until first changed.
const SERVER_MANAGED_GLOBAL_TYPES: &[&str] = &[crate::push::PUSH_RULES_TYPE];

/// The value of a server-managed type for a user who never changed it.
fn server_default(user_id: &UserId, room_id: Option<&RoomId>, event_type: &str) -> Option<JsonObject> {
    match (room_id, event_type) {
        (None, crate::push::PUSH_RULES_TYPE) => Some(crate::push::default_rules_content(user_id)),
        _ => None,
    }
}

/// The change row of an entry whose stored position is `raw_position`.
fn change_key(user_id: &UserId, raw_position: &[u8]) -> Vec<u8> {
    keys::account_data_change(user_id.as_str(), keys::stored_position(raw_position).unwrap_or(0))
}
