//! A user's dehydrated device (MSC3814): a device with no session, kept so others can encrypt
//! to the user while all their real devices are offline. Its record in `dehydrated_devices`
//! (user → device ID and the owner's encrypted `device_data`) points at an ordinary `devices`
//! row marked `dehydrated`, so it is listed, found by `sendToDevice` and deleted like any device,
//! but no one can log in to it.

use lattice_core::limits::{MAX_DEHYDRATED_DEVICE_DATA_BYTES, MAX_DEVICE_DISPLAY_NAME_BYTES, MAX_DEVICE_ID_BYTES};
use lattice_storage::records::{DehydratedDeviceRecord, DeviceRecord};
use lattice_storage::{Table, WriteBatch, keys};
use ruma::UserId;
use serde_json::Value;

use super::Accounts;
use super::sessions::revoke_tokens;
use crate::ServiceError;

/// A dehydrated device as its owner stored it.
#[derive(Clone, Debug, PartialEq)]
pub struct DehydratedDevice {
    pub device_id: String,
    pub device_data: Value,
}

/// Checks what the owner sends before anything is read: a usable device ID and display name,
/// and `device_data` an object naming its `algorithm`, within its limit.
pub(crate) fn check_new_dehydrated_device(
    device_id: &str,
    display_name: Option<&str>,
    device_data: &Value,
) -> Result<(), ServiceError> {
    if device_id.is_empty() || device_id.len() > MAX_DEVICE_ID_BYTES || device_id.contains('\0') {
        return Err(ServiceError::InvalidParam(format!("device_id must be 1 to {MAX_DEVICE_ID_BYTES} bytes")));
    }
    if display_name.is_some_and(|name| name.len() > MAX_DEVICE_DISPLAY_NAME_BYTES) {
        return Err(ServiceError::TooLarge { what: "device display name", limit: MAX_DEVICE_DISPLAY_NAME_BYTES });
    }
    if !device_data.get("algorithm").is_some_and(Value::is_string) {
        return Err(ServiceError::BadJson("device_data must be an object with a string algorithm".into()));
    }
    let size = serde_json::to_vec(device_data).map(|bytes| bytes.len()).unwrap_or(usize::MAX);
    if size > MAX_DEHYDRATED_DEVICE_DATA_BYTES {
        return Err(ServiceError::TooLarge { what: "device_data", limit: MAX_DEHYDRATED_DEVICE_DATA_BYTES });
    }
    Ok(())
}

impl Accounts {
    /// The user's dehydrated device, if they have one.
    pub async fn dehydrated_device(&self, user_id: &UserId) -> Result<Option<DehydratedDevice>, ServiceError> {
        let record = self.dehydrated_record(user_id).await?;
        Ok(record.map(|(record, _)| DehydratedDevice { device_id: record.device_id, device_data: record.device_data }))
    }

    async fn dehydrated_record(
        &self,
        user_id: &UserId,
    ) -> Result<Option<(DehydratedDeviceRecord, Vec<u8>)>, ServiceError> {
        let fetched =
            lattice_storage::get::<DehydratedDeviceRecord>(self.kv.as_ref(), &keys::user(user_id.as_str())).await?;
        Ok(fetched.map(|fetched| (fetched.value, fetched.raw)))
    }

    /// Adds the user's new dehydrated device to `batch`, replacing the previous one, whose ID
    /// is returned so its keys and inbox can go in the same batch. The batch requires the
    /// user's record and the new device's row to be as read, so two concurrent uploads (or a
    /// login choosing the same device ID) cannot both win. The new ID may be the previous
    /// dehydrated device's, never one of the user's ordinary devices.
    pub(crate) async fn put_dehydrated_device_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        device: DehydratedDevice,
        display_name: Option<String>,
    ) -> Result<Option<String>, ServiceError> {
        let record_key = keys::user(user_id.as_str());
        let previous = self.dehydrated_record(user_id).await?;
        batch.expect(Table::DehydratedDevices, record_key.clone(), previous.as_ref().map(|(_, raw)| raw.clone()));
        let previous_id = previous.map(|(record, _)| record.device_id);
        if let Some(previous_id) = &previous_id {
            let previous_key = keys::device(user_id.as_str(), previous_id);
            if let Some(old) = lattice_storage::get::<DeviceRecord>(self.kv.as_ref(), &previous_key).await? {
                batch.expect(Table::Devices, previous_key.clone(), Some(old.raw));
                revoke_tokens(batch, &old.value);
                batch.delete(Table::Devices, previous_key);
            }
        }
        let device_key = keys::device(user_id.as_str(), &device.device_id);
        if previous_id.as_deref() != Some(device.device_id.as_str()) {
            if lattice_storage::get::<DeviceRecord>(self.kv.as_ref(), &device_key).await?.is_some() {
                return Err(ServiceError::InvalidParam(format!(
                    "device ID {} is in use by another of your devices",
                    device.device_id
                )));
            }
            batch.expect(Table::Devices, device_key.clone(), None);
            self.check_device_count(user_id).await?;
        }
        let row = DeviceRecord {
            device_id: device.device_id.clone(),
            display_name,
            created_ms: self.now_ms(),
            last_seen_ms: None,
            last_seen_ip: None,
            // No access token is ever issued for it.
            access_token_hash: String::new(),
            refresh_token_hash: None,
            dehydrated: true,
        };
        lattice_storage::put(batch, device_key, &row);
        let record = DehydratedDeviceRecord { device_id: device.device_id, device_data: device.device_data };
        lattice_storage::put(batch, record_key, &record);
        Ok(previous_id)
    }
}
