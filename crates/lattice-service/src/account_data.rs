//! Global account data and filters: JSON objects a client stores for itself.

use lattice_core::limits::{MAX_ACCOUNT_DATA_BYTES, MAX_EVENT_TYPE_BYTES, MAX_FILTER_BYTES};
use lattice_storage::records::{AccountDataRecord, FilterRecord, JsonObject};
use lattice_storage::{WriteBatch, keys};
use ruma::UserId;
use ruma::api::client::filter::FilterDefinition;

use crate::{Service, ServiceError};

/// Filter IDs are per-user decimal counters.
pub type FilterId = u64;

/// Account data types the server manages itself (spec: "Client Config"); clients may not set them.
const SERVER_MANAGED_TYPES: &[&str] = &["m.fully_read", "m.push_rules"];

fn check_owner(caller: &UserId, target: &UserId) -> Result<(), ServiceError> {
    if caller != target {
        return Err(ServiceError::Forbidden("you can only access your own account data and filters".into()));
    }
    Ok(())
}

fn serialized_len(object: &JsonObject) -> usize {
    serde_json::to_vec(object).map(|v| v.len()).unwrap_or(usize::MAX)
}

impl Service {
    pub async fn account_data(
        &self,
        caller: &UserId,
        target: &UserId,
        event_type: &str,
    ) -> Result<JsonObject, ServiceError> {
        check_owner(caller, target)?;
        let key = keys::account_data(target.as_str(), None, event_type);
        match lattice_storage::get::<AccountDataRecord>(self.kv.as_ref(), &key).await? {
            Some(fetched) => Ok(fetched.value.0),
            None => Err(ServiceError::NotFound(format!("no account data of type {event_type}"))),
        }
    }

    pub async fn set_account_data(
        &self,
        caller: &UserId,
        target: &UserId,
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
        if serialized_len(&content) > MAX_ACCOUNT_DATA_BYTES {
            return Err(ServiceError::TooLarge { what: "account data", limit: MAX_ACCOUNT_DATA_BYTES });
        }
        let mut batch = WriteBatch::new();
        lattice_storage::put(
            &mut batch,
            keys::account_data(target.as_str(), None, event_type),
            &AccountDataRecord(content),
        );
        Ok(self.kv.write(batch).await?)
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
