//! The device-list stream: every change of a user's device list (new device keys, a deleted
//! device, new cross-signing keys or signatures) takes a position of `stream.device_lists` and
//! writes one `device_list_changes` row per changed user (`position·user`, big-endian) in the
//! change's own batch. `/sync` and `/keys/changes` read the rows between two positions.

use std::collections::BTreeSet;

use lattice_storage::{KeyRange, StreamPosition, Table, WriteBatch, keys};
use ruma::OwnedUserId;

use super::E2ee;
use crate::ServiceError;

/// A change written in a batch, to publish once the batch is committed (dropping it abandons
/// the position).
pub struct DeviceListChange {
    position: StreamPosition,
    users: Vec<OwnedUserId>,
}

impl DeviceListChange {
    /// Publishes the position; returns the users whose lists changed, for the wake-ups.
    pub(crate) async fn published(self) -> Vec<OwnedUserId> {
        self.position.published().await;
        self.users
    }
}

impl E2ee {
    /// Takes a position and adds a change row for each user to `batch`.
    pub(crate) async fn device_list_change_to_batch(
        &self,
        batch: &mut WriteBatch,
        users: Vec<OwnedUserId>,
    ) -> Result<DeviceListChange, ServiceError> {
        let position = self.device_lists.take().await?;
        for user in &users {
            batch.put(Table::DeviceListChanges, keys::device_list_change(position.get(), user.as_str()), Vec::new());
        }
        Ok(DeviceListChange { position, users })
    }

    /// The completed mark of the device-list stream.
    pub(crate) async fn device_list_position(&self) -> Result<u64, ServiceError> {
        Ok(self.device_lists.completed().await?)
    }

    /// The users whose device lists changed in `(since, now]`.
    pub(crate) async fn device_lists_changed(
        &self,
        since: u64,
        now: u64,
    ) -> Result<BTreeSet<OwnedUserId>, ServiceError> {
        if now <= since {
            return Ok(BTreeSet::new());
        }
        let range = KeyRange::between(
            &keys::device_list_change(since.saturating_add(1), ""),
            &keys::device_list_change(now.saturating_add(1), ""),
        );
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::DeviceListChanges, &range).await?;
        Ok(rows
            .iter()
            .filter_map(|(key, _)| keys::device_list_change_user(key))
            .filter_map(|user| OwnedUserId::try_from(user).ok())
            .collect())
    }
}
