//! Dehydrated devices (MSC3814), composed from three services: the accounts keep the device
//! and its owner's encrypted `device_data`, the e2ee service its keys, the to-device service
//! its inbox. Replacing or deleting one removes all of it, and records the device-list change,
//! in one batch.

use lattice_storage::{StorageError, WriteBatch};
use ruma::UserId;
use serde_json::Value;

use crate::accounts::DehydratedDevice;
use crate::accounts::dehydrated::check_new_dehydrated_device;
use crate::e2ee::{ListUpdate, UploadKeys};
use crate::{Service, ServiceError};

/// How often a replacement that lost a race with another is tried again.
const DEHYDRATED_WRITE_RETRIES: usize = 8;

/// What `PUT /dehydrated_device` carries.
#[derive(Debug)]
pub struct NewDehydratedDevice {
    pub device_id: String,
    pub display_name: Option<String>,
    pub device_data: Value,
    pub keys: UploadKeys,
}

impl Service {
    /// `PUT /dehydrated_device`: creates the user's dehydrated device with its keys, replacing
    /// (and wholly deleting: device, keys, inbox) the previous one, in one batch. Others learn
    /// of the new device, and of the old one's deletion, through the device-list stream.
    pub async fn put_dehydrated_device(&self, user_id: &UserId, new: NewDehydratedDevice) -> Result<(), ServiceError> {
        check_new_dehydrated_device(&new.device_id, new.display_name.as_deref(), &new.device_data)?;
        for _ in 0..DEHYDRATED_WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            let device = DehydratedDevice { device_id: new.device_id.clone(), device_data: new.device_data.clone() };
            let replaced = self
                .accounts
                .put_dehydrated_device_to_batch(&mut batch, user_id, device, new.display_name.clone())
                .await?;
            let mut updates = Vec::new();
            if let Some(old) = &replaced {
                // The old device's rows are deleted before the new one's are written: with the
                // same device ID, the new keys must not be deleted with the old.
                self.to_device.clear_inbox_to_batch(&mut batch, user_id, old).await?;
                self.e2ee.remove_device_keys_to_batch(&mut batch, user_id, old).await?;
                if *old != new.device_id {
                    updates.push(ListUpdate::Deleted { user: user_id.to_owned(), device_id: old.clone() });
                }
            }
            self.e2ee.dehydrated_device_keys_to_batch(&mut batch, user_id, &new.device_id, &new.keys)?;
            updates.push(ListUpdate::Device { user: user_id.to_owned(), device_id: new.device_id.clone() });
            let change = self.e2ee.device_list_change_to_batch(&mut batch, updates).await?;
            match self.commit_composed(batch).await {
                Ok(()) => {
                    tracing::info!(%user_id, device_id = %new.device_id, replaced = ?replaced, "dehydrated device stored");
                    return self.announce_device_list_change(Some(change)).await;
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent dehydrated-device uploads; try again".into()))
    }

    /// `GET /dehydrated_device`.
    pub async fn dehydrated_device(&self, user_id: &UserId) -> Result<DehydratedDevice, ServiceError> {
        self.accounts.dehydrated_device(user_id).await?.ok_or_else(no_dehydrated_device)
    }

    /// `DELETE /dehydrated_device`: the device goes as any deleted device does (keys, inbox,
    /// device-list change). Returns its ID.
    pub async fn delete_dehydrated_device(&self, user_id: &UserId) -> Result<String, ServiceError> {
        let device = self.dehydrated_device(user_id).await?;
        let mut batch = WriteBatch::new();
        let change =
            self.remove_devices_to_batch(&mut batch, user_id, |device_id| device_id == device.device_id).await?;
        self.commit_composed(batch).await?;
        self.announce_device_list_change(change).await?;
        Ok(device.device_id)
    }

    /// `POST /dehydrated_device/{deviceId}/events`: the to-device messages waiting for the
    /// caller's current dehydrated device, after deleting those `next_batch` acknowledges.
    /// Another device ID (someone else's, an ordinary one, a replaced one) is refused.
    pub async fn dehydrated_device_events(
        &self,
        user_id: &UserId,
        device_id: &str,
        next_batch: Option<&str>,
    ) -> Result<(Vec<Value>, String), ServiceError> {
        let device = self.accounts.dehydrated_device(user_id).await?;
        if device.as_ref().is_none_or(|device| device.device_id != device_id) {
            return Err(ServiceError::Forbidden(format!("{device_id} is not your dehydrated device")));
        }
        let acknowledged = next_batch
            .map(|token| token.parse::<u64>().map_err(|_| ServiceError::InvalidParam("invalid next_batch".into())))
            .transpose()?;
        let (events, next) = self.to_device.dehydrated_device_events(user_id, device_id, acknowledged).await?;
        Ok((events, next.to_string()))
    }
}

fn no_dehydrated_device() -> ServiceError {
    ServiceError::NotFound("no dehydrated device".into())
}
