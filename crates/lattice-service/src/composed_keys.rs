//! The key operations that span services: the e2ee service stores the keys; the accounts know
//! devices' display names and run UIA; the rooms know who shares a room with whom, so a
//! device-list change wakes exactly those users.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use lattice_core::limits::MAX_KEYS_REQUEST_TARGETS;
use ruma::api::client::uiaa::AuthData;
use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde_json::{Map, Value, json};

use crate::accounts::{PASSWORD_FLOWS, Purpose};
use crate::e2ee::{
    ClaimedKeys, CrossSigningUpload, DeviceListChange, E2ee, KeyCounts, QueriedKeys, SignatureFailure, UploadKeys,
};
use crate::sync::SyncToken;
use crate::{Service, ServiceError};

/// Servers that could not answer for their users' keys: server name → error.
pub type KeyFailures = BTreeMap<String, Value>;

impl Service {
    pub fn e2ee(&self) -> &E2ee {
        &self.e2ee
    }

    /// Publishes a device-list change committed in a batch, and wakes the changed users and
    /// everyone who shares a room with them (their rooms' waiters), no one else.
    pub(crate) async fn announce_device_list_change(
        &self,
        change: Option<DeviceListChange>,
    ) -> Result<(), ServiceError> {
        let Some(change) = change else { return Ok(()) };
        for user in change.published().await {
            self.notifier.notify_user(&user);
            for room in self.rooms.joined_rooms(&user).await? {
                self.notifier.notify_room(&room);
            }
        }
        Ok(())
    }

    /// `POST /keys/upload` by the session's device.
    pub async fn upload_keys(
        &self,
        user_id: &UserId,
        device_id: &str,
        upload: &UploadKeys,
    ) -> Result<KeyCounts, ServiceError> {
        let (counts, change) = self.e2ee.upload_keys(user_id, device_id, upload).await?;
        self.announce_device_list_change(change).await?;
        Ok(counts)
    }

    /// `POST /keys/query`: local users' keys, each device's display name in `unsigned`; other
    /// servers' users are reported in the failures until federation queries exist.
    pub async fn query_keys(
        &self,
        requester: &UserId,
        targets: &BTreeMap<OwnedUserId, Vec<String>>,
    ) -> Result<(QueriedKeys, KeyFailures), ServiceError> {
        if targets.len() > MAX_KEYS_REQUEST_TARGETS {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_KEYS_REQUEST_TARGETS} users per query")));
        }
        let (local, failures) = self.split_local(targets);
        let mut found = self.e2ee.query_keys(requester, &local).await?;
        for (user, devices) in &mut found.device_keys {
            if devices.is_empty() {
                continue;
            }
            let names: BTreeMap<String, Option<String>> = self
                .accounts
                .devices(user)
                .await?
                .into_iter()
                .map(|device| (device.device_id, device.display_name))
                .collect();
            for (device_id, keys) in devices.iter_mut() {
                if let Some(Some(name)) = names.get(device_id) {
                    let mut unsigned = Map::new();
                    unsigned.insert("device_display_name".into(), Value::String(name.clone()));
                    keys.insert("unsigned".into(), Value::Object(unsigned));
                }
            }
        }
        Ok((found, failures))
    }

    /// `POST /keys/claim`: one key per named local device.
    pub async fn claim_keys(
        &self,
        targets: &BTreeMap<OwnedUserId, BTreeMap<String, String>>,
    ) -> Result<(ClaimedKeys, KeyFailures), ServiceError> {
        let devices: usize = targets.values().map(BTreeMap::len).sum();
        if devices > MAX_KEYS_REQUEST_TARGETS {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_KEYS_REQUEST_TARGETS} devices per claim")));
        }
        let (local, failures) = self.split_local(targets);
        Ok((self.e2ee.claim_keys(&local).await?, failures))
    }

    fn split_local<T: Clone>(&self, targets: &BTreeMap<OwnedUserId, T>) -> (BTreeMap<OwnedUserId, T>, KeyFailures) {
        let mut local = BTreeMap::new();
        let mut failures = KeyFailures::new();
        for (user, wanted) in targets {
            if user.server_name() == self.server_name() {
                local.insert(user.clone(), wanted.clone());
            } else {
                failures.insert(
                    user.server_name().to_string(),
                    json!({ "errcode": "M_UNRECOGNIZED", "error": "keys of other servers' users are not fetched yet" }),
                );
            }
        }
        (local, failures)
    }

    /// `GET /keys/changes`: the users sharing a room with `user_id` whose device lists changed
    /// between two `/sync` tokens.
    pub async fn key_changes(
        &self,
        user_id: &UserId,
        from: &str,
        to: &str,
    ) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>), ServiceError> {
        let from = SyncToken::parse(from)?.streams.device_lists;
        let to = SyncToken::parse(to)?.streams.device_lists;
        let now = self.e2ee.device_list_position().await?;
        let changed = self.e2ee.device_lists_changed(from, to.min(now)).await?;
        let shared = self.users_sharing_a_room(user_id, changed).await?;
        Ok((shared.into_iter().collect(), Vec::new()))
    }

    /// Of `users`, those who share a joined room with `user_id` (and `user_id` itself).
    pub(crate) async fn users_sharing_a_room(
        &self,
        user_id: &UserId,
        users: BTreeSet<OwnedUserId>,
    ) -> Result<BTreeSet<OwnedUserId>, ServiceError> {
        shared_with(&self.rooms, user_id, users).await
    }

    /// `POST /keys/device_signing/upload`: the first upload needs no authentication (as the spec
    /// allows since v1.11), nor does repeating the stored keys; replacing them needs the password.
    pub async fn upload_signing_keys(
        &self,
        user_id: &UserId,
        upload: &CrossSigningUpload,
        auth: Option<&AuthData>,
    ) -> Result<(), ServiceError> {
        if self.e2ee.signing_upload_needs_auth(user_id, upload).await? {
            self.accounts.user_interactive_auth(Purpose::CrossSigning, Some(user_id), PASSWORD_FLOWS, auth).await?;
        }
        let change = self.e2ee.upload_signing_keys(user_id, upload).await?;
        self.announce_device_list_change(change).await
    }

    /// `POST /keys/signatures/upload`: the signatures that did not check out, per key.
    pub async fn upload_signatures(
        &self,
        signer: &UserId,
        signed_keys: &BTreeMap<OwnedUserId, BTreeMap<String, Map<String, Value>>>,
    ) -> Result<BTreeMap<OwnedUserId, BTreeMap<String, SignatureFailure>>, ServiceError> {
        let server = self.server_name().to_owned();
        let (failures, change) =
            self.e2ee.upload_signatures(signer, signed_keys, |user| user.server_name() == server).await?;
        self.announce_device_list_change(change).await?;
        Ok(failures)
    }
}

/// Of `users`, those who share a joined room with `user_id`; `user_id` itself is always kept
/// (its own other devices care about its device list).
pub(crate) async fn shared_with(
    rooms: &crate::Rooms,
    user_id: &UserId,
    users: BTreeSet<OwnedUserId>,
) -> Result<BTreeSet<OwnedUserId>, ServiceError> {
    if users.is_empty() {
        return Ok(users);
    }
    let mine: HashSet<OwnedRoomId> = rooms.joined_rooms(user_id).await?.into_iter().collect();
    let mut shared = BTreeSet::new();
    for user in users {
        if user == user_id || rooms.joined_rooms(&user).await?.iter().any(|room| mine.contains(room)) {
            shared.insert(user);
        }
    }
    Ok(shared)
}
