//! The device-list stream: every change of a user's device list (new device keys, a deleted
//! device, new cross-signing keys or signatures) takes a position of `stream.device_lists` and
//! writes one `device_list_changes` row per changed user (`position·user`, big-endian) in the
//! change's own batch. `/sync` and `/keys/changes` read the rows between two positions.
//!
//! Each user's latest position is kept too (`device_list_latest`): it is the `stream_id` other
//! servers are told in `m.device_list_update` and `/user/devices`, and the `prev_id` of the
//! next update, so a server that missed one sees the gap and asks for the whole list.

use std::collections::{BTreeMap, BTreeSet};

use lattice_storage::{KeyRange, StreamPosition, Table, WriteBatch, keys};
use ruma::{OwnedUserId, UserId};

use super::E2ee;
use crate::ServiceError;

/// What changed in one user's device list: what other servers are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListUpdate {
    /// A device's keys are new, or newly signed.
    Device { user: OwnedUserId, device_id: String },
    /// A device was deleted.
    Deleted { user: OwnedUserId, device_id: String },
    /// The user's cross-signing keys, or the signatures on their master key, changed.
    CrossSigning { user: OwnedUserId },
    /// Something only this server's users care about (a signature the user made on another
    /// user's master key), or a remote user's change reported by their server.
    Quiet { user: OwnedUserId },
}

impl ListUpdate {
    pub fn user(&self) -> &UserId {
        match self {
            ListUpdate::Device { user, .. }
            | ListUpdate::Deleted { user, .. }
            | ListUpdate::CrossSigning { user }
            | ListUpdate::Quiet { user } => user,
        }
    }
}

/// A change written in a batch, to publish once the batch is committed (dropping it abandons
/// the position).
pub struct DeviceListChange {
    position: StreamPosition,
    updates: Vec<ListUpdate>,
    previous: BTreeMap<OwnedUserId, u64>,
}

/// A published change: what the wake-ups and other servers need.
pub struct PublishedChange {
    /// The stream position of the change: the `stream_id` of the updates sent for it.
    pub position: u64,
    pub updates: Vec<ListUpdate>,
    /// Each changed user's previous position, when there was one (the updates' `prev_id`).
    pub previous: BTreeMap<OwnedUserId, u64>,
}

impl PublishedChange {
    /// The users whose lists changed, once each.
    pub fn users(&self) -> BTreeSet<OwnedUserId> {
        self.updates.iter().map(|update| update.user().to_owned()).collect()
    }
}

impl DeviceListChange {
    /// Publishes the position.
    pub(crate) async fn published(self) -> PublishedChange {
        let position = self.position.get();
        self.position.published().await;
        PublishedChange { position, updates: self.updates, previous: self.previous }
    }
}

impl E2ee {
    /// Takes a position and adds a change row for each changed user to `batch`, with the
    /// user's new latest position.
    pub(crate) async fn device_list_change_to_batch(
        &self,
        batch: &mut WriteBatch,
        updates: Vec<ListUpdate>,
    ) -> Result<DeviceListChange, ServiceError> {
        let position = self.device_lists.take().await?;
        let users: BTreeSet<OwnedUserId> = updates.iter().map(|update| update.user().to_owned()).collect();
        let mut previous = BTreeMap::new();
        for user in &users {
            if let Some(latest) = self.device_list_latest(user).await? {
                previous.insert(user.clone(), latest);
            }
            batch.put(Table::DeviceListChanges, keys::device_list_change(position.get(), user.as_str()), Vec::new());
            batch.put(
                Table::DeviceListLatest,
                user.as_str().as_bytes().to_vec(),
                position.get().to_be_bytes().to_vec(),
            );
        }
        Ok(DeviceListChange { position, updates, previous })
    }

    /// Records a change in a batch of its own (a remote user's, reported by their server).
    pub(crate) async fn record_device_list_change(
        &self,
        updates: Vec<ListUpdate>,
    ) -> Result<PublishedChange, ServiceError> {
        let mut batch = WriteBatch::new();
        let change = self.device_list_change_to_batch(&mut batch, updates).await?;
        self.kv.write(batch).await?;
        Ok(change.published().await)
    }

    /// The position of the user's latest device-list change, if any was recorded.
    pub(crate) async fn device_list_latest(&self, user_id: &UserId) -> Result<Option<u64>, ServiceError> {
        let raw = self.kv.get(Table::DeviceListLatest, user_id.as_str().as_bytes()).await?;
        Ok(raw.as_deref().and_then(keys::stored_position))
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
