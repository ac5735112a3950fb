//! Listing, renaming and deleting a user's devices.

use lattice_core::limits::{MAX_DEVICE_DISPLAY_NAME_BYTES, MAX_DEVICES_PER_USER};
use lattice_storage::records::DeviceRecord;
use lattice_storage::{Table, WriteBatch, keys};
use ruma::UserId;

use super::Accounts;
use crate::ServiceError;

/// What the client API shows of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ip: Option<String>,
    pub last_seen_ts: Option<u64>,
}

impl From<DeviceRecord> for DeviceInfo {
    fn from(record: DeviceRecord) -> Self {
        Self {
            device_id: record.device_id,
            display_name: record.display_name,
            last_seen_ip: record.last_seen_ip,
            last_seen_ts: record.last_seen_ms,
        }
    }
}

/// The most device IDs one `delete_devices` request may name.
pub(crate) const MAX_DEVICES_PER_DELETE: usize = MAX_DEVICES_PER_USER;

impl Accounts {
    pub async fn devices(&self, user_id: &UserId) -> Result<Vec<DeviceInfo>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows =
            lattice_storage::scan_prefix::<DeviceRecord>(self.kv.as_ref(), &prefix, MAX_DEVICES_PER_USER).await?;
        Ok(rows.into_iter().map(|(_, record)| record.into()).collect())
    }

    pub async fn device(&self, user_id: &UserId, device_id: &str) -> Result<DeviceInfo, ServiceError> {
        let key = keys::device(user_id.as_str(), device_id);
        match lattice_storage::get::<DeviceRecord>(self.kv.as_ref(), &key).await? {
            Some(fetched) => Ok(fetched.value.into()),
            None => Err(ServiceError::NotFound(format!("no device {device_id}"))),
        }
    }

    /// `PUT /devices/{deviceId}`: only the display name can change.
    pub async fn rename_device(
        &self,
        user_id: &UserId,
        device_id: &str,
        display_name: Option<String>,
    ) -> Result<(), ServiceError> {
        if display_name.as_ref().is_some_and(|n| n.len() > MAX_DEVICE_DISPLAY_NAME_BYTES) {
            return Err(ServiceError::TooLarge { what: "device display name", limit: MAX_DEVICE_DISPLAY_NAME_BYTES });
        }
        let key = keys::device(user_id.as_str(), device_id);
        let Some(fetched) = lattice_storage::get::<DeviceRecord>(self.kv.as_ref(), &key).await? else {
            return Err(ServiceError::NotFound(format!("no device {device_id}")));
        };
        let record = DeviceRecord { display_name, ..fetched.value };
        let mut batch = WriteBatch::new();
        // Renaming a device that a logout is removing right now must not bring it back.
        batch.expect(Table::Devices, key.clone(), Some(fetched.raw));
        lattice_storage::put(&mut batch, key, &record);
        Ok(self.kv.write(batch).await?)
    }
}

impl Accounts {
    /// The IDs of the user's devices.
    pub(crate) async fn device_ids(&self, user_id: &UserId) -> Result<Vec<String>, ServiceError> {
        Ok(self.devices(user_id).await?.into_iter().map(|device| device.device_id).collect())
    }
}
