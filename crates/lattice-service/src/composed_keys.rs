//! The key operations that span services: the e2ee service stores the keys; the accounts know
//! devices' display names and run UIA; the rooms know who shares a room with whom, so a
//! device-list change wakes exactly those users.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use lattice_core::limits::MAX_KEYS_REQUEST_TARGETS;
use ruma::api::client::uiaa::AuthData;
use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde_json::{Map, Value};

use crate::accounts::{PASSWORD_FLOWS, Purpose};
use crate::e2ee::{
    ClaimedKeys, CrossSigningUpload, DeviceListChange, E2ee, KeyCounts, QueriedKeys, SignatureFailure, UploadKeys,
};
use crate::federation::MAX_REMOTE_KEYS_WAIT;
use crate::sync::SyncToken;
use crate::{Service, ServiceError};

/// Servers that could not answer for their users' keys: server name → error.
pub type KeyFailures = crate::federation::RemoteFailures;

/// How long a client's key request waits for other servers: its `timeout`, at most 10 s.
fn remote_wait(timeout: Option<Duration>) -> Duration {
    timeout.unwrap_or(MAX_REMOTE_KEYS_WAIT).min(MAX_REMOTE_KEYS_WAIT)
}

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
        let change = change.published().await;
        for user in change.users() {
            self.notifier.notify_user(&user);
            for room in self.rooms.joined_rooms(&user).await? {
                self.notifier.notify_room(&room);
            }
        }
        // The change is committed and this server's users know; a failure to queue it for
        // other servers is theirs to recover from (the next update's `prev_id` shows the gap).
        if let Err(error) = self.federation.announce_device_list(&change).await {
            tracing::warn!(%error, "a device-list change was not queued for other servers");
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
    /// servers' users' keys from the device-list cache when it holds them (fresh), else asked
    /// of their servers, waiting at most `timeout` (10 s when not
    /// given); servers that fail or do not answer in time are reported in the failures.
    pub async fn query_keys(
        &self,
        requester: &UserId,
        targets: &BTreeMap<OwnedUserId, Vec<String>>,
        timeout: Option<Duration>,
    ) -> Result<(QueriedKeys, KeyFailures), ServiceError> {
        if targets.len() > MAX_KEYS_REQUEST_TARGETS {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_KEYS_REQUEST_TARGETS} users per query")));
        }
        let (local, remote) = self.split_local(targets);
        let (cached, remote) = self.federation.cached_remote_keys(remote).await?;
        let asked_remotely = self.federation.query_remote_keys(remote, remote_wait(timeout));
        let (found, (from_remote, failures)) =
            tokio::join!(self.e2ee.query_keys(Some(requester), &local), asked_remotely);
        let mut found = found?;
        for other in [cached, from_remote] {
            found.device_keys.extend(other.device_keys);
            found.master_keys.extend(other.master_keys);
            found.self_signing_keys.extend(other.self_signing_keys);
        }
        for (user, devices) in &mut found.device_keys {
            // Other servers' users' display names came with their keys, if their server shares them.
            if devices.is_empty() || user.server_name() != self.server_name() {
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

    /// `POST /keys/claim`: one key per named device, local ones here, other servers' from
    /// their servers (waiting as [`Service::query_keys`] does).
    pub async fn claim_keys(
        &self,
        targets: &BTreeMap<OwnedUserId, BTreeMap<String, String>>,
        timeout: Option<Duration>,
    ) -> Result<(ClaimedKeys, KeyFailures), ServiceError> {
        let devices: usize = targets.values().map(BTreeMap::len).sum();
        if devices > MAX_KEYS_REQUEST_TARGETS {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_KEYS_REQUEST_TARGETS} devices per claim")));
        }
        let (local, remote) = self.split_local(targets);
        let claimed_remotely = self.federation.claim_remote_keys(remote, remote_wait(timeout));
        let (claimed, (from_remote, failures)) = tokio::join!(self.e2ee.claim_keys(&local), claimed_remotely);
        let mut claimed = claimed?;
        claimed.extend(from_remote);
        Ok((claimed, failures))
    }

    /// This server's users' part of `targets`, and the other servers' users' part.
    fn split_local<T: Clone>(
        &self,
        targets: &BTreeMap<OwnedUserId, T>,
    ) -> (BTreeMap<OwnedUserId, T>, BTreeMap<OwnedUserId, T>) {
        targets
            .iter()
            .map(|(user, wanted)| (user.clone(), wanted.clone()))
            .partition(|(user, _)| user.server_name() == self.server_name())
    }

    /// `GET /keys/changes`: the users sharing a room with `user_id` whose device lists changed
    /// between two `/sync` tokens, and those who share no room with them any more — exactly
    /// what `/sync`'s `device_lists` reports for the same tokens (one function computes both).
    pub async fn key_changes(
        &self,
        user_id: &UserId,
        from: &str,
        to: &str,
    ) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>), ServiceError> {
        let from = SyncToken::parse(from)?.streams;
        let mut to = SyncToken::parse(to)?.streams;
        to.device_lists = to.device_lists.min(self.e2ee.device_list_position().await?);
        to.events = to.events.min(self.rooms.stream_marks().await?.events);
        let delta = self.sync.device_list_delta(user_id, &from, &to).await?;
        Ok((delta.changed.into_iter().collect(), delta.left.into_iter().collect()))
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
    if mine.is_empty() {
        // In no room, the user shares one with nobody but themselves: no read per candidate
        // (a burst of `/sync`s by such users each asked about every user whose presence changed).
        return Ok(users.into_iter().filter(|user| user == user_id).collect());
    }
    let mut shared = BTreeSet::new();
    for user in users {
        if user == user_id || rooms.joined_rooms(&user).await?.iter().any(|room| mine.contains(room)) {
            shared.insert(user);
        }
    }
    Ok(shared)
}
