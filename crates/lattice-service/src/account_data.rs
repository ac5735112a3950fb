//! Global account data and filters: JSON objects a client stores for itself.

use lattice_core::limits::{MAX_ACCOUNT_DATA_BYTES, MAX_EVENT_TYPE_BYTES, MAX_FILTER_BYTES};
use lattice_storage::records::{AccountDataRecord, FilterRecord, JsonObject};
use lattice_storage::{KeyRange, Table, WriteBatch, keys};
use ruma::api::client::filter::FilterDefinition;
use ruma::{RoomId, UserId};

use crate::{Service, ServiceError};

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

impl Service {
    /// Global (`room_id` `None`) or per-room account data of the caller.
    pub async fn account_data(
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
            None => Err(ServiceError::NotFound(format!("no account data of type {event_type}"))),
        }
    }

    /// `PUT /user/{userId}[/rooms/{roomId}]/account_data/{type}`: types the server manages
    /// (`m.fully_read`, `m.push_rules`) are refused; per-room data needs a membership in the room.
    pub async fn set_account_data(
        &self,
        caller: &UserId,
        target: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
        content: JsonObject,
    ) -> Result<(), ServiceError> {
        check_owner(caller, target)?;
        if event_type.is_empty() || event_type.len() > MAX_EVENT_TYPE_BYTES || event_type.contains('\0') {
            return Err(ServiceError::InvalidParam(format!("type must be 1 to {MAX_EVENT_TYPE_BYTES} bytes")));
        }
        if SERVER_MANAGED_TYPES.contains(&event_type) {
            return Err(ServiceError::ServerManaged(format!(
                "{event_type} is managed by the server and cannot be set by clients"
            )));
        }
        if let Some(room_id) = room_id
            && self.membership(target, room_id).await?.is_none()
        {
            return Err(ServiceError::Forbidden(format!("{target} has no membership in {room_id}")));
        }
        self.write_account_data(target, room_id, event_type, content).await
    }

    /// Stores account data with a stream position from the one counter, in one batch, so
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

    /// [`Service::write_account_data`] for a read-modify-write: with `expected` set, the write
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
        let position = self.stream.take().await?;
        lattice_storage::put(&mut batch, key.clone(), &AccountDataRecord(content));
        batch.put(Table::AccountDataPositions, key, position.get().to_be_bytes().to_vec());
        self.kv.write(batch).await?;
        position.published().await;
        self.notifier.notify_user(user_id);
        Ok(())
    }

    /// The user's account data changed in `(since, now]`: global entries under `None`, per-room
    /// ones under their room.
    pub(crate) async fn account_data_since(
        &self,
        user_id: &UserId,
        since: u64,
        now: u64,
    ) -> Result<Vec<(Option<String>, String, JsonObject)>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::AccountDataPositions, &KeyRange::prefix(&prefix))
            .await?;
        let mut changed = Vec::new();
        for (key, raw) in rows {
            let position = <[u8; 8]>::try_from(raw.as_slice()).map(u64::from_be_bytes).unwrap_or(0);
            if position <= since || position > now {
                continue;
            }
            let rest = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let Some((room, event_type)) = rest.split_once('\0') else { continue };
            let Some(record) = lattice_storage::get::<AccountDataRecord>(self.kv.as_ref(), &key).await? else {
                continue;
            };
            let room = (!room.is_empty()).then(|| room.to_owned());
            changed.push((room, event_type.to_owned(), record.value.0));
        }
        Ok(changed)
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
        serde_json::from_value::<FilterDefinition>(value)
            .map_err(|e| ServiceError::BadJson(format!("invalid filter: {e}")))?;
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
