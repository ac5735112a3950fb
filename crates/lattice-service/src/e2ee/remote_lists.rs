//! The cache of other servers' users' device lists (spec v1.16, server-server "Device
//! Management"): kept for remote users who share a room with a local user, filled from
//! `GET /user/devices/{userId}` (a resync) and kept up to date by `m.device_list_update` and
//! `m.signing_key_update` EDUs, so `/keys/query` answers them without asking their server.
//!
//! Rows: `remote_device_lists` (user → [`RemoteList`]: the last `stream_id`, the stream IDs an
//! EDU's `prev_id` may name, whether the copy is stale, the master and self-signing keys) and
//! `remote_devices` (`user\0device` → [`RemoteDevice`]). Every change is one batch, conditional
//! on the list row it read, and carries the device-list change row that tells local room-mates.
//! A stale list is not served: `/keys/query` asks the user's server until a resync succeeds.
//!
//! Everything here comes from another server and is checked as hostile input: device keys
//! must name their user and device and carry the device's own valid signature, cross-signing
//! keys must name their user and usage, sizes and counts are bounded.

use std::collections::{BTreeMap, BTreeSet};

use lattice_core::limits::{MAX_DEVICES_PER_USER, MAX_KEY_OBJECT_BYTES};
use lattice_storage::{Direction, KeyRange, StorageError, Table, WriteBatch, keys};
use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::device_lists::{ListUpdate, PublishedChange};
use super::keys::{QueriedKeys, check_device_keys, encode};
use super::{E2ee, WRITE_RETRIES, check_key_part};
use crate::ServiceError;

/// How many applied stream IDs are remembered per user: an EDU's `prev_id` naming an older one
/// than these is treated as a gap (a resync costs one request).
const SEEN_STREAM_IDS: usize = 32;
/// The longest `prev_id` list accepted; a longer one is treated as a gap.
const MAX_PREV_IDS: usize = 64;
/// The longest device display name kept from another server.
const MAX_DISPLAY_NAME_BYTES: usize = 512;

/// One remote user's cached device list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemoteList {
    /// The latest `stream_id` applied.
    pub stream_id: u64,
    /// The stream IDs applied lately: what a following update's `prev_id` may name.
    pub seen: Vec<u64>,
    /// An update was missed or a resync failed: not served until a resync succeeds.
    pub stale: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signing_key: Option<Map<String, Value>>,
}

/// One device of a cached list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemoteDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// A whole device list as `/user/devices` answers it, checked.
#[derive(Debug, Default)]
pub struct RemoteSnapshot {
    pub stream_id: u64,
    pub devices: BTreeMap<String, RemoteDevice>,
    pub master_key: Option<Map<String, Value>>,
    pub self_signing_key: Option<Map<String, Value>>,
}

/// One `m.device_list_update`, checked.
#[derive(Debug)]
pub struct RemoteDeviceUpdate {
    pub user: OwnedUserId,
    pub device_id: String,
    pub stream_id: u64,
    pub prev_id: Vec<u64>,
    /// `None`: the device was deleted.
    pub device: Option<RemoteDevice>,
}

/// What became of an update.
pub enum Applied {
    /// Applied; the change to announce.
    Changed(PublishedChange),
    /// The user's list is not cached: nothing stored (a resync starts caching it).
    Untracked,
    /// A `prev_id` was not seen, or the list was already stale: it is (now) stale and needs a
    /// resync.
    Gap,
}

fn corrupt(table: Table, detail: impl ToString) -> ServiceError {
    ServiceError::Storage(StorageError::Corrupt { table: table.name(), detail: detail.to_string() })
}

fn invalid(detail: impl Into<String>) -> ServiceError {
    ServiceError::InvalidParam(detail.into())
}

/// A device's keys from another server: they must be the named user's and device's, and
/// validly self-signed (as `/keys/upload` requires of local devices).
fn checked_device_keys(user: &UserId, device_id: &str, keys: &Value) -> Result<Map<String, Value>, ServiceError> {
    let keys = keys.as_object().ok_or_else(|| invalid("device keys are not an object"))?;
    check_device_keys(user, device_id, keys)?;
    Ok(keys.clone())
}

/// A cross-signing key from another server: it must name the user and the usage.
pub(crate) fn checked_cross_signing_key(
    user: &UserId,
    usage: &str,
    key: &Value,
) -> Result<Map<String, Value>, ServiceError> {
    let key = key.as_object().ok_or_else(|| invalid(format!("{usage} key is not an object")))?;
    let size = serde_json::to_vec(key).map(|v| v.len()).unwrap_or(usize::MAX);
    let usage_ok = key.get("usage").and_then(Value::as_array).is_some_and(|u| u.iter().any(|u| u == usage));
    let keys_ok = key.get("keys").and_then(Value::as_object).is_some_and(|k| !k.is_empty());
    if size > MAX_KEY_OBJECT_BYTES
        || key.get("user_id").and_then(Value::as_str) != Some(user.as_str())
        || !usage_ok
        || !keys_ok
    {
        return Err(invalid(format!("{usage} key of {user} is not valid")));
    }
    Ok(key.clone())
}

fn display_name(value: &Value) -> Option<String> {
    value.as_str().filter(|name| name.len() <= MAX_DISPLAY_NAME_BYTES).map(str::to_owned)
}

impl RemoteSnapshot {
    /// Parses another server's `/user/devices/{userId}` answer for `user`. Devices whose keys
    /// do not check out are left out (the rest of the list is still the server's word); more
    /// than [`MAX_DEVICES_PER_USER`] devices or a wrong `user_id` refuse the whole answer.
    pub fn parse(user: &UserId, answer: &Value) -> Result<Self, ServiceError> {
        if answer["user_id"].as_str() != Some(user.as_str()) {
            return Err(invalid(format!("the device list is not {user}'s")));
        }
        let stream_id = answer["stream_id"].as_u64().ok_or_else(|| invalid("the device list has no stream_id"))?;
        let listed = answer["devices"].as_array().ok_or_else(|| invalid("the device list has no devices"))?;
        if listed.len() > MAX_DEVICES_PER_USER {
            return Err(invalid(format!("{user} has more than {MAX_DEVICES_PER_USER} devices")));
        }
        let mut devices = BTreeMap::new();
        for entry in listed {
            let Some(device_id) = entry["device_id"].as_str() else { continue };
            if check_key_part("device ID", device_id).is_err() {
                continue;
            }
            let keys = match &entry["keys"] {
                Value::Null => None,
                keys => match checked_device_keys(user, device_id, keys) {
                    Ok(keys) => Some(keys),
                    Err(error) => {
                        tracing::info!(%user, device_id, %error, "a device of a resynced list left out");
                        continue;
                    }
                },
            };
            let device = RemoteDevice { keys, display_name: display_name(&entry["device_display_name"]) };
            devices.insert(device_id.to_owned(), device);
        }
        let cross_signing = |field: &str, usage: &str| match &answer[field] {
            Value::Null => Ok(None),
            key => checked_cross_signing_key(user, usage, key).map(Some),
        };
        Ok(Self {
            stream_id,
            devices,
            master_key: cross_signing("master_key", "master")?,
            self_signing_key: cross_signing("self_signing_key", "self_signing")?,
        })
    }
}

impl RemoteDeviceUpdate {
    /// Parses the content of an `m.device_list_update` EDU about `user` (whose server the
    /// caller has checked).
    pub fn parse(user: OwnedUserId, content: &Value) -> Result<Self, ServiceError> {
        let device_id = content["device_id"].as_str().ok_or_else(|| invalid("device-list update without device_id"))?;
        check_key_part("device ID", device_id)?;
        let stream_id =
            content["stream_id"].as_u64().ok_or_else(|| invalid("device-list update without a stream_id"))?;
        let prev_id = match &content["prev_id"] {
            Value::Null => Vec::new(),
            Value::Array(ids) => {
                ids.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>().ok_or_else(|| invalid("invalid prev_id"))?
            }
            _ => return Err(invalid("invalid prev_id")),
        };
        let device = match content["deleted"].as_bool().unwrap_or(false) {
            true => None,
            false => {
                let keys = match &content["keys"] {
                    Value::Null => None,
                    keys => Some(checked_device_keys(&user, device_id, keys)?),
                };
                Some(RemoteDevice { keys, display_name: display_name(&content["device_display_name"]) })
            }
        };
        Ok(Self { user, device_id: device_id.to_owned(), stream_id, prev_id, device })
    }
}

impl RemoteList {
    /// Whether an update whose `prev_id` is `prev_id` follows what was applied: every ID it
    /// names was seen. An empty `prev_id` starts a sequence; an update already applied (another
    /// device of the same change shares its stream ID) follows too.
    fn follows(&self, stream_id: u64, prev_id: &[u64]) -> bool {
        if self.seen.contains(&stream_id) {
            return true;
        }
        prev_id.len() <= MAX_PREV_IDS && prev_id.iter().all(|id| self.seen.contains(id))
    }

    fn saw(&mut self, stream_id: u64) {
        if !self.seen.contains(&stream_id) {
            self.seen.push(stream_id);
        }
        if self.seen.len() > SEEN_STREAM_IDS {
            let extra = self.seen.len() - SEEN_STREAM_IDS;
            self.seen.drain(..extra);
        }
        self.stream_id = self.stream_id.max(stream_id);
    }
}

fn list_key(user: &UserId) -> Vec<u8> {
    user.as_str().as_bytes().to_vec()
}

impl E2ee {
    /// The cached list of `user` and its raw row (for a conditional write), if it is cached.
    pub(crate) async fn remote_list(&self, user: &UserId) -> Result<Option<(RemoteList, Vec<u8>)>, ServiceError> {
        let Some(raw) = self.kv.get(Table::RemoteDeviceLists, &list_key(user)).await? else { return Ok(None) };
        let list = serde_json::from_slice(&raw).map_err(|e| corrupt(Table::RemoteDeviceLists, e))?;
        Ok(Some((list, raw)))
    }

    /// The device IDs of a cached list (at most `limit`).
    async fn remote_device_rows(&self, user: &UserId, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ServiceError> {
        let range = KeyRange::prefix(&keys::user_rows(user.as_str()));
        Ok(self.kv.scan(Table::RemoteDevices, &range, Direction::Forward, limit).await?)
    }

    /// Cached keys of `targets` (user → device IDs, empty for all), as `/keys/query` shows
    /// them: device keys with the display name the user's server shared, master and
    /// self-signing keys. Only lists that are cached and not stale are read; the users
    /// answered are returned with them.
    pub(crate) async fn cached_remote_keys(
        &self,
        targets: &BTreeMap<OwnedUserId, Vec<String>>,
    ) -> Result<(QueriedKeys, BTreeSet<OwnedUserId>), ServiceError> {
        let mut found = QueriedKeys::default();
        let mut answered = BTreeSet::new();
        for (user, wanted) in targets {
            let Some((list, _)) = self.remote_list(user).await? else { continue };
            if list.stale {
                continue;
            }
            let prefix_len = keys::user_rows(user.as_str()).len();
            let mut devices = BTreeMap::new();
            for (key, raw) in self.remote_device_rows(user, MAX_DEVICES_PER_USER).await? {
                let device_id = String::from_utf8_lossy(&key[prefix_len..]).into_owned();
                if !wanted.is_empty() && !wanted.contains(&device_id) {
                    continue;
                }
                let device: RemoteDevice =
                    serde_json::from_slice(&raw).map_err(|e| corrupt(Table::RemoteDevices, e))?;
                let Some(mut keys) = device.keys else { continue };
                if let Some(name) = device.display_name {
                    let mut unsigned = Map::new();
                    unsigned.insert("device_display_name".into(), Value::String(name));
                    keys.insert("unsigned".into(), Value::Object(unsigned));
                }
                devices.insert(device_id, keys);
            }
            found.device_keys.insert(user.clone(), devices);
            if let Some(master) = list.master_key {
                found.master_keys.insert(user.clone(), master);
            }
            if let Some(self_signing) = list.self_signing_key {
                found.self_signing_keys.insert(user.clone(), self_signing);
            }
            answered.insert(user.clone());
        }
        Ok((found, answered))
    }

    /// Applies one `m.device_list_update` to a cached list when it follows the updates applied
    /// (its `prev_id`s were all seen): the device's row replaced or deleted, the stream ID
    /// recorded and a device-list change, in one batch conditional on the list row. A gap
    /// marks the list stale instead. A new device beyond [`MAX_DEVICES_PER_USER`] is a gap too
    /// (a resync's bounded answer decides).
    pub(crate) async fn apply_remote_device_update(
        &self,
        update: &RemoteDeviceUpdate,
    ) -> Result<Applied, ServiceError> {
        let user = &update.user;
        let device_row = keys::device(user.as_str(), &update.device_id);
        for _ in 0..WRITE_RETRIES {
            let Some((mut list, raw)) = self.remote_list(user).await? else { return Ok(Applied::Untracked) };
            if list.stale {
                return Ok(Applied::Gap);
            }
            let mut batch = WriteBatch::new();
            batch.expect(Table::RemoteDeviceLists, list_key(user), Some(raw));
            let follows = list.follows(update.stream_id, &update.prev_id);
            let too_many = follows
                && update.device.is_some()
                && self.kv.get(Table::RemoteDevices, &device_row).await?.is_none()
                && self.remote_device_rows(user, MAX_DEVICES_PER_USER).await?.len() >= MAX_DEVICES_PER_USER;
            if !follows || too_many {
                // No change is recorded yet: the resync's (or its failure's) tells local clients.
                list.stale = true;
                batch.put(Table::RemoteDeviceLists, list_key(user), encode(&list));
                match self.kv.write(batch).await {
                    Ok(()) => return Ok(Applied::Gap),
                    Err(StorageError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            match &update.device {
                Some(device) => batch.put(Table::RemoteDevices, device_row.clone(), encode(device)),
                None => batch.delete(Table::RemoteDevices, device_row.clone()),
            }
            list.saw(update.stream_id);
            batch.put(Table::RemoteDeviceLists, list_key(user), encode(&list));
            let change = self.device_list_change_to_batch(&mut batch, vec![quiet(user)]).await?;
            match self.kv.write(batch).await {
                Ok(()) => return Ok(Applied::Changed(change.published().await)),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent device-list updates".into()))
    }

    /// Applies an `m.signing_key_update` to a cached, fresh list (the keys given replace the
    /// cached ones). `None` when the list is not cached or stale: nothing to update.
    pub(crate) async fn apply_remote_signing_keys(
        &self,
        user: &UserId,
        master_key: Option<Map<String, Value>>,
        self_signing_key: Option<Map<String, Value>>,
    ) -> Result<Option<PublishedChange>, ServiceError> {
        for _ in 0..WRITE_RETRIES {
            let Some((mut list, raw)) = self.remote_list(user).await? else { return Ok(None) };
            if list.stale {
                return Ok(None);
            }
            if master_key.is_some() {
                list.master_key = master_key.clone();
            }
            if self_signing_key.is_some() {
                list.self_signing_key = self_signing_key.clone();
            }
            let mut batch = WriteBatch::new();
            batch.expect(Table::RemoteDeviceLists, list_key(user), Some(raw));
            batch.put(Table::RemoteDeviceLists, list_key(user), encode(&list));
            let change = self.device_list_change_to_batch(&mut batch, vec![quiet(user)]).await?;
            match self.kv.write(batch).await {
                Ok(()) => return Ok(Some(change.published().await)),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent signing-key updates".into()))
    }

    /// Replaces `user`'s cached list with a resync's snapshot — every device row, the stream
    /// ID, the cross-signing keys, fresh — and records a device-list change, in one batch,
    /// only if the list row is still `expected` (what it was before the snapshot was asked
    /// for). `None` when it changed meanwhile: the caller asks again.
    pub(crate) async fn replace_remote_list(
        &self,
        user: &UserId,
        expected: Option<Vec<u8>>,
        snapshot: RemoteSnapshot,
    ) -> Result<Option<PublishedChange>, ServiceError> {
        let mut batch = WriteBatch::new();
        batch.expect(Table::RemoteDeviceLists, list_key(user), expected);
        for (key, _) in self.remote_device_rows(user, MAX_DEVICES_PER_USER + 1).await? {
            batch.delete(Table::RemoteDevices, key);
        }
        for (device_id, device) in &snapshot.devices {
            batch.put(Table::RemoteDevices, keys::device(user.as_str(), device_id), encode(device));
        }
        let mut list = RemoteList {
            master_key: snapshot.master_key,
            self_signing_key: snapshot.self_signing_key,
            ..RemoteList::default()
        };
        list.saw(snapshot.stream_id);
        batch.put(Table::RemoteDeviceLists, list_key(user), encode(&list));
        let change = self.device_list_change_to_batch(&mut batch, vec![quiet(user)]).await?;
        match self.kv.write(batch).await {
            Ok(()) => Ok(Some(change.published().await)),
            Err(StorageError::Conflict) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Marks a cached list stale after a failed resync (so `/keys/query` asks the user's
    /// server), with a device-list change when `announce` (an update asked for the resync, so
    /// local clients must hear the list changed; a user not cached then gets the change alone).
    pub(crate) async fn mark_remote_list_stale(
        &self,
        user: &UserId,
        announce: bool,
    ) -> Result<Option<PublishedChange>, ServiceError> {
        for _ in 0..WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            if let Some((mut list, raw)) = self.remote_list(user).await? {
                list.stale = true;
                batch.expect(Table::RemoteDeviceLists, list_key(user), Some(raw));
                batch.put(Table::RemoteDeviceLists, list_key(user), encode(&list));
            }
            let change = match announce {
                true => Some(self.device_list_change_to_batch(&mut batch, vec![quiet(user)]).await?),
                false => None,
            };
            if batch.is_empty() {
                return Ok(None);
            }
            match self.kv.write(batch).await {
                Ok(()) => {
                    return Ok(match change {
                        Some(change) => Some(change.published().await),
                        None => None,
                    });
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent device-list updates".into()))
    }

    /// Stops caching `user`'s list (no local user shares a room with them any more): the list
    /// row and every device row, in one batch.
    pub(crate) async fn drop_remote_list(&self, user: &UserId) -> Result<(), ServiceError> {
        let mut batch = WriteBatch::new();
        batch.delete(Table::RemoteDeviceLists, list_key(user));
        for (key, _) in self.remote_device_rows(user, MAX_DEVICES_PER_USER + 1).await? {
            batch.delete(Table::RemoteDevices, key);
        }
        Ok(self.kv.write(batch).await?)
    }
}

fn quiet(user: &UserId) -> ListUpdate {
    ListUpdate::Quiet { user: user.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_follows_only_what_was_seen() {
        let mut list = RemoteList::default();
        list.saw(5);
        assert!(list.follows(6, &[5]));
        assert!(list.follows(6, &[]));
        assert!(!list.follows(7, &[6]), "6 was never applied: a gap");
        list.saw(6);
        assert!(list.follows(6, &[4]), "a second device of an applied change");
        assert!(list.follows(7, &[5, 6]));
        for id in 7..100 {
            list.saw(id);
        }
        assert_eq!(list.stream_id, 99);
        assert_eq!(list.seen.len(), SEEN_STREAM_IDS);
        assert!(!list.follows(100, &[5]), "forgotten: treated as a gap");
    }

    #[test]
    fn a_snapshot_keeps_only_the_users_checked_devices() {
        let user: OwnedUserId = "@bob:remote.test".try_into().expect("user");
        let answer = serde_json::json!({
            "user_id": "@bob:remote.test",
            "stream_id": 7,
            "devices": [
                { "device_id": "NOKEYS", "device_display_name": "phone" },
                { "device_id": "FORGED", "keys": { "user_id": "@bob:remote.test", "device_id": "OTHER" } },
                { "device_id": "UNSIGNED", "keys": { "user_id": "@bob:remote.test", "device_id": "UNSIGNED",
                    "algorithms": [], "keys": { "ed25519:UNSIGNED": "AAAA" } } },
                { "keys": {} },
            ],
            "master_key": { "user_id": "@carol:remote.test", "usage": ["master"], "keys": { "ed25519:x": "x" } },
        });
        assert!(RemoteSnapshot::parse(&user, &answer).is_err(), "another user's master key");
        let mut answer = answer;
        answer["master_key"] = serde_json::json!({ "user_id": "@bob:remote.test", "usage": ["master"],
            "keys": { "ed25519:x": "x" } });
        let snapshot = RemoteSnapshot::parse(&user, &answer).expect("parsed");
        assert_eq!(snapshot.stream_id, 7);
        assert_eq!(snapshot.devices.keys().collect::<Vec<_>>(), ["NOKEYS"]);
        assert_eq!(snapshot.devices["NOKEYS"].display_name.as_deref(), Some("phone"));
        assert!(snapshot.master_key.is_some() && snapshot.self_signing_key.is_none());
        let carol: OwnedUserId = "@carol:remote.test".try_into().expect("user");
        assert!(RemoteSnapshot::parse(&carol, &answer).is_err(), "bob's list is not carol's");
    }
}
