//! Device keys, one-time keys and fallback keys: `/keys/upload`, `/keys/query`, `/keys/claim`.
//!
//! Rows: `device_keys` (`user\0device` → the signed device keys as uploaded), `one_time_keys`
//! (`user\0device\0algorithm\0key ID` → the key), `fallback_keys` (`user\0device\0algorithm` →
//! the key, its ID and whether it was claimed). A one-time key is claimed by one conditional
//! batch that deletes it, so two claimers never get the same key.

use std::collections::{BTreeMap, BTreeSet};

use lattice_core::limits::{
    MAX_DEVICES_PER_USER, MAX_KEY_OBJECT_BYTES, MAX_KEYS_PER_UPLOAD, MAX_ONE_TIME_KEYS_PER_DEVICE,
};
use lattice_storage::{Direction, KeyRange, StorageError, Table, WriteBatch, keys};
use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::device_lists::{DeviceListChange, ListUpdate};
use super::signed::{self, SignatureProblem};
use super::{E2ee, WRITE_RETRIES, check_key_part};
use crate::ServiceError;

/// What one `/keys/upload` carries.
#[derive(Debug, Default)]
pub struct UploadKeys {
    pub device_keys: Option<Map<String, Value>>,
    /// Key ID (`algorithm:name`) → key (a string, or an object with `key` and `signatures`).
    pub one_time_keys: BTreeMap<String, Value>,
    pub fallback_keys: BTreeMap<String, Value>,
}

/// Unclaimed one-time keys per algorithm.
pub type KeyCounts = BTreeMap<String, u64>;

/// What `/keys/query` finds for local users.
#[derive(Debug, Default)]
pub struct QueriedKeys {
    /// User → device → signed device keys.
    pub device_keys: BTreeMap<OwnedUserId, BTreeMap<String, Map<String, Value>>>,
    pub master_keys: BTreeMap<OwnedUserId, Map<String, Value>>,
    pub self_signing_keys: BTreeMap<OwnedUserId, Map<String, Value>>,
    pub user_signing_keys: BTreeMap<OwnedUserId, Map<String, Value>>,
}

/// User → device → key ID → key: what `/keys/claim` hands out.
pub type ClaimedKeys = BTreeMap<OwnedUserId, BTreeMap<String, BTreeMap<String, Value>>>;

/// A device's fallback key of one algorithm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct FallbackKey {
    /// The key ID without its algorithm.
    key_id: String,
    key: Value,
    /// Claimed at least once since it was uploaded.
    used: bool,
}

/// The algorithm every client asks for; its count is answered even when zero.
const SIGNED_CURVE25519: &str = "signed_curve25519";

fn corrupt(table: Table, detail: impl ToString) -> ServiceError {
    ServiceError::Storage(StorageError::Corrupt { table: table.name(), detail: detail.to_string() })
}

pub(super) fn decode_object(table: Table, raw: &[u8]) -> Result<Map<String, Value>, ServiceError> {
    serde_json::from_slice(raw).map_err(|e| corrupt(table, e))
}

pub(super) fn encode(value: &impl Serialize) -> Vec<u8> {
    // Values built from parsed JSON serialise back to JSON.
    serde_json::to_vec(value).unwrap_or_default()
}

pub(super) fn object_size_ok(what: &str, value: &impl Serialize) -> Result<(), ServiceError> {
    let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_KEY_OBJECT_BYTES {
        return Err(ServiceError::InvalidParam(format!("{what} is larger than {MAX_KEY_OBJECT_BYTES} bytes")));
    }
    Ok(())
}

/// `algorithm:name` → its parts, both non-empty and free of NUL.
pub(super) fn split_key_id(key_id: &str) -> Result<(&str, &str), ServiceError> {
    let (algorithm, name) = key_id
        .split_once(':')
        .ok_or_else(|| ServiceError::InvalidParam(format!("key ID {key_id:?} is not algorithm:name")))?;
    check_key_part("key algorithm", algorithm)?;
    check_key_part("key ID", name)?;
    Ok((algorithm, name))
}

/// The device's ed25519 public key, from its device keys.
pub(super) fn device_ed25519(device_keys: &Map<String, Value>, device_id: &str) -> Option<String> {
    device_keys.get("keys")?.get(format!("ed25519:{device_id}"))?.as_str().map(str::to_owned)
}

/// Device keys must be the caller's own device's, name their algorithms and keys, and carry a
/// valid signature by the device's own ed25519 key. Returns that key.
pub(super) fn check_device_keys(
    user_id: &UserId,
    device_id: &str,
    object: &Map<String, Value>,
) -> Result<String, ServiceError> {
    object_size_ok("device_keys", object)?;
    if object.get("user_id").and_then(Value::as_str) != Some(user_id.as_str()) {
        return Err(ServiceError::InvalidParam(format!("device_keys.user_id must be {user_id}")));
    }
    if object.get("device_id").and_then(Value::as_str) != Some(device_id) {
        return Err(ServiceError::InvalidParam(format!(
            "device_keys.device_id must be {device_id}, the caller's device"
        )));
    }
    let algorithms_ok =
        object.get("algorithms").and_then(Value::as_array).is_some_and(|a| a.iter().all(Value::is_string));
    let keys_ok = object.get("keys").and_then(Value::as_object).is_some_and(|k| k.values().all(Value::is_string));
    if !algorithms_ok || !keys_ok {
        return Err(ServiceError::BadJson("device_keys needs algorithms (strings) and keys (strings)".into()));
    }
    let key_id = format!("ed25519:{device_id}");
    let ed25519 = device_ed25519(object, device_id)
        .ok_or_else(|| ServiceError::InvalidParam(format!("device_keys.keys has no {key_id}")))?;
    signed::verify(object, user_id.as_str(), &key_id, &ed25519)
        .map_err(|problem| ServiceError::InvalidParam(problem.describe(user_id.as_str(), &key_id)))?;
    Ok(ed25519)
}

/// A one-time or fallback key: an unsigned key is a string; a signed one an object whose `key` is
/// a string, signed by the device's ed25519 key when that key is known.
fn check_one_time_key(
    user_id: &UserId,
    device_id: &str,
    key_id: &str,
    key: &Value,
    ed25519: Option<&str>,
) -> Result<(), ServiceError> {
    object_size_ok("a one-time key", key)?;
    match key {
        Value::String(_) => Ok(()),
        Value::Object(object) => {
            if !object.get("key").is_some_and(Value::is_string) {
                return Err(ServiceError::BadJson(format!("one-time key {key_id} has no key")));
            }
            let Some(ed25519) = ed25519 else { return Ok(()) };
            let signer_key = format!("ed25519:{device_id}");
            signed::verify(object, user_id.as_str(), &signer_key, ed25519).map_err(|problem| {
                let detail = match problem {
                    SignatureProblem::Missing => format!("key {key_id} is not signed by {signer_key}"),
                    other => format!("key {key_id}: {}", other.describe(user_id.as_str(), &signer_key)),
                };
                ServiceError::InvalidParam(detail)
            })
        }
        _ => Err(ServiceError::BadJson(format!("one-time key {key_id} must be a string or an object"))),
    }
}

impl E2ee {
    /// `POST /keys/upload`. Device keys are the caller's device's, validly self-signed, and never
    /// change once published (the same keys again are accepted); one-time keys are added (the
    /// same ID with another key is refused); a fallback key replaces the algorithm's previous
    /// one. All in one batch. Returns the unclaimed one-time key counts, and the device-list
    /// change to publish when the device keys are new.
    pub(crate) async fn upload_keys(
        &self,
        user_id: &UserId,
        device_id: &str,
        upload: &UploadKeys,
    ) -> Result<(KeyCounts, Option<DeviceListChange>), ServiceError> {
        check_key_part("device ID", device_id)?;
        let total = upload.one_time_keys.len() + upload.fallback_keys.len();
        if total > MAX_KEYS_PER_UPLOAD {
            return Err(ServiceError::InvalidParam(format!(
                "at most {MAX_KEYS_PER_UPLOAD} one-time and fallback keys per upload"
            )));
        }
        let new_ed25519 = match &upload.device_keys {
            Some(device_keys) => Some(check_device_keys(user_id, device_id, device_keys)?),
            None => None,
        };
        let device_row = keys::device(user_id.as_str(), device_id);
        for _ in 0..WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            let stored = self.kv.get(Table::DeviceKeys, &device_row).await?;
            let stored_keys = stored.as_deref().map(|raw| decode_object(Table::DeviceKeys, raw)).transpose()?;
            let mut device_keys_new = false;
            if let Some(device_keys) = &upload.device_keys {
                match &stored_keys {
                    Some(old) if signed::signed_part(old) == signed::signed_part(device_keys) => {}
                    Some(_) => {
                        return Err(ServiceError::InvalidParam(format!(
                            "device {device_id} already published different keys; a device's keys never change"
                        )));
                    }
                    None => {
                        batch.expect(Table::DeviceKeys, device_row.clone(), None);
                        batch.put(Table::DeviceKeys, device_row.clone(), encode(device_keys));
                        device_keys_new = true;
                    }
                }
            }
            let ed25519 =
                new_ed25519.clone().or_else(|| stored_keys.as_ref().and_then(|keys| device_ed25519(keys, device_id)));
            let mut added = 0;
            for (key_id, key) in &upload.one_time_keys {
                let (algorithm, name) = split_key_id(key_id)?;
                check_one_time_key(user_id, device_id, key_id, key, ed25519.as_deref())?;
                let row = keys::one_time_key(user_id.as_str(), device_id, algorithm, name);
                let encoded = encode(key);
                match self.kv.get(Table::OneTimeKeys, &row).await? {
                    Some(existing) if existing == encoded => {}
                    Some(_) => {
                        return Err(ServiceError::InvalidParam(format!(
                            "one-time key {key_id} already exists with another value"
                        )));
                    }
                    None => {
                        batch.expect(Table::OneTimeKeys, row.clone(), None);
                        batch.put(Table::OneTimeKeys, row, encoded);
                        added += 1;
                    }
                }
            }
            if added > 0 {
                let held: u64 = self.one_time_key_counts(user_id, device_id).await?.values().sum();
                if held as usize + added > MAX_ONE_TIME_KEYS_PER_DEVICE {
                    return Err(ServiceError::InvalidParam(format!(
                        "a device may hold at most {MAX_ONE_TIME_KEYS_PER_DEVICE} unclaimed one-time keys"
                    )));
                }
            }
            for (key_id, key) in &upload.fallback_keys {
                let (algorithm, name) = split_key_id(key_id)?;
                check_one_time_key(user_id, device_id, key_id, key, ed25519.as_deref())?;
                let row = keys::fallback_key(user_id.as_str(), device_id, algorithm);
                let existing = self.kv.get(Table::FallbackKeys, &row).await?;
                let same = existing
                    .as_deref()
                    .and_then(|raw| serde_json::from_slice::<FallbackKey>(raw).ok())
                    .is_some_and(|old| old.key_id == name && old.key == *key);
                if same {
                    continue;
                }
                let record = FallbackKey { key_id: name.to_owned(), key: key.clone(), used: false };
                batch.expect(Table::FallbackKeys, row.clone(), existing);
                batch.put(Table::FallbackKeys, row, encode(&record));
            }
            let change = match device_keys_new {
                true => {
                    let update = ListUpdate::Device { user: user_id.to_owned(), device_id: device_id.to_owned() };
                    Some(self.device_list_change_to_batch(&mut batch, vec![update]).await?)
                }
                false => None,
            };
            if batch.is_empty() && change.is_none() {
                return Ok((self.one_time_key_counts(user_id, device_id).await?, None));
            }
            match self.kv.write(batch).await {
                Ok(()) => return Ok((self.one_time_key_counts(user_id, device_id).await?, change)),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent key uploads; try again".into()))
    }

    /// Adds the keys of a new dehydrated device (MSC3814) to `batch`: its device keys, checked
    /// as `/keys/upload` checks them and marked `dehydrated: true` by their owner's signature,
    /// and its one-time and fallback keys. The device is new (or its old keys are deleted
    /// earlier in the same batch), so nothing stored is read.
    pub(crate) fn dehydrated_device_keys_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        device_id: &str,
        upload: &UploadKeys,
    ) -> Result<(), ServiceError> {
        check_key_part("device ID", device_id)?;
        let Some(device_keys) = &upload.device_keys else {
            return Err(ServiceError::MissingParam("a dehydrated device needs device_keys".into()));
        };
        let ed25519 = check_device_keys(user_id, device_id, device_keys)?;
        if device_keys.get("dehydrated") != Some(&Value::Bool(true)) {
            return Err(ServiceError::InvalidParam(
                "a dehydrated device's device_keys must carry \"dehydrated\": true (MSC3814)".into(),
            ));
        }
        if upload.one_time_keys.len() + upload.fallback_keys.len() > MAX_KEYS_PER_UPLOAD {
            return Err(ServiceError::InvalidParam(format!(
                "at most {MAX_KEYS_PER_UPLOAD} one-time and fallback keys per upload"
            )));
        }
        if upload.one_time_keys.len() > MAX_ONE_TIME_KEYS_PER_DEVICE {
            return Err(ServiceError::InvalidParam(format!(
                "a device may hold at most {MAX_ONE_TIME_KEYS_PER_DEVICE} unclaimed one-time keys"
            )));
        }
        batch.put(Table::DeviceKeys, keys::device(user_id.as_str(), device_id), encode(device_keys));
        for (key_id, key) in &upload.one_time_keys {
            let (algorithm, name) = split_key_id(key_id)?;
            check_one_time_key(user_id, device_id, key_id, key, Some(&ed25519))?;
            batch.put(
                Table::OneTimeKeys,
                keys::one_time_key(user_id.as_str(), device_id, algorithm, name),
                encode(key),
            );
        }
        for (key_id, key) in &upload.fallback_keys {
            let (algorithm, name) = split_key_id(key_id)?;
            check_one_time_key(user_id, device_id, key_id, key, Some(&ed25519))?;
            let record = FallbackKey { key_id: name.to_owned(), key: key.clone(), used: false };
            batch.put(Table::FallbackKeys, keys::fallback_key(user_id.as_str(), device_id, algorithm), encode(&record));
        }
        Ok(())
    }

    /// The device's unclaimed one-time keys per algorithm (`signed_curve25519` always present).
    pub(crate) async fn one_time_key_counts(
        &self,
        user_id: &UserId,
        device_id: &str,
    ) -> Result<KeyCounts, ServiceError> {
        let mut counts = KeyCounts::from([(SIGNED_CURVE25519.to_owned(), 0)]);
        if check_key_part("device ID", device_id).is_err() {
            return Ok(counts);
        }
        let prefix = keys::device_key_rows(user_id.as_str(), device_id);
        let rows = self
            .kv
            .scan(Table::OneTimeKeys, &KeyRange::prefix(&prefix), Direction::Forward, MAX_ONE_TIME_KEYS_PER_DEVICE + 1)
            .await?;
        for (key, _) in rows {
            let rest = &key[prefix.len()..];
            let algorithm = rest.split(|b| *b == 0).next().unwrap_or_default();
            *counts.entry(String::from_utf8_lossy(algorithm).into_owned()).or_default() += 1;
        }
        Ok(counts)
    }

    /// The algorithms of the device's fallback keys not claimed since they were uploaded.
    pub(crate) async fn unused_fallback_key_types(
        &self,
        user_id: &UserId,
        device_id: &str,
    ) -> Result<Vec<String>, ServiceError> {
        if check_key_part("device ID", device_id).is_err() {
            return Ok(Vec::new());
        }
        let prefix = keys::device_key_rows(user_id.as_str(), device_id);
        let rows = self.kv.scan(Table::FallbackKeys, &KeyRange::prefix(&prefix), Direction::Forward, 64).await?;
        let mut unused = Vec::new();
        for (key, raw) in rows {
            let record: FallbackKey = serde_json::from_slice(&raw).map_err(|e| corrupt(Table::FallbackKeys, e))?;
            if !record.used {
                unused.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
            }
        }
        Ok(unused)
    }

    /// The stored device keys of a user: of the named devices, or of every device when `devices`
    /// is empty. Devices without keys are left out.
    pub(crate) async fn device_keys(
        &self,
        user_id: &UserId,
        devices: &[String],
    ) -> Result<BTreeMap<String, Map<String, Value>>, ServiceError> {
        let mut found = BTreeMap::new();
        if devices.is_empty() {
            let prefix = keys::user_rows(user_id.as_str());
            let rows = self
                .kv
                .scan(Table::DeviceKeys, &KeyRange::prefix(&prefix), Direction::Forward, MAX_DEVICES_PER_USER)
                .await?;
            for (key, raw) in rows {
                found.insert(
                    String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                    decode_object(Table::DeviceKeys, &raw)?,
                );
            }
        } else {
            for device in devices.iter().take(MAX_DEVICES_PER_USER) {
                if check_key_part("device ID", device).is_err() {
                    continue;
                }
                if let Some(raw) = self.kv.get(Table::DeviceKeys, &keys::device(user_id.as_str(), device)).await? {
                    found.insert(device.clone(), decode_object(Table::DeviceKeys, &raw)?);
                }
            }
        }
        for (device, object) in &mut found {
            self.merge_signatures(user_id, device, &[user_id], object).await?;
        }
        Ok(found)
    }

    /// `POST /keys/query` for local users: device keys, and cross-signing keys with the
    /// signatures the requester may see (a user-signing key's signatures only to its owner; a
    /// user-signing key only to its owner).
    pub(crate) async fn query_keys(
        &self,
        requester: Option<&UserId>,
        targets: &BTreeMap<OwnedUserId, Vec<String>>,
    ) -> Result<QueriedKeys, ServiceError> {
        let mut result = QueriedKeys::default();
        for (user_id, devices) in targets {
            let device_keys = self.device_keys(user_id, devices).await?;
            result.device_keys.insert(user_id.clone(), device_keys);
            if let Some(master) = self.cross_signing_key_for(requester, user_id, "master").await? {
                result.master_keys.insert(user_id.clone(), master);
            }
            if let Some(self_signing) = self.cross_signing_key_for(requester, user_id, "self_signing").await? {
                result.self_signing_keys.insert(user_id.clone(), self_signing);
            }
            if requester == Some(user_id.as_ref())
                && let Some(user_signing) = self.cross_signing_key_for(requester, user_id, "user_signing").await?
            {
                result.user_signing_keys.insert(user_id.clone(), user_signing);
            }
        }
        Ok(result)
    }

    /// `POST /keys/claim` for local devices: for each, one one-time key of the algorithm, taken
    /// by one conditional delete (a second claimer gets another key), else the fallback key,
    /// marked used. Devices with neither are left out.
    pub(crate) async fn claim_keys(
        &self,
        targets: &BTreeMap<OwnedUserId, BTreeMap<String, String>>,
    ) -> Result<ClaimedKeys, ServiceError> {
        let mut claimed = ClaimedKeys::new();
        for (user_id, devices) in targets {
            for (device_id, algorithm) in devices {
                if check_key_part("device ID", device_id).is_err() || check_key_part("algorithm", algorithm).is_err() {
                    continue;
                }
                if let Some((key_id, key)) = self.claim_one(user_id, device_id, algorithm).await? {
                    claimed
                        .entry(user_id.clone())
                        .or_default()
                        .entry(device_id.clone())
                        .or_default()
                        .insert(key_id, key);
                }
            }
        }
        Ok(claimed)
    }

    async fn claim_one(
        &self,
        user_id: &UserId,
        device_id: &str,
        algorithm: &str,
    ) -> Result<Option<(String, Value)>, ServiceError> {
        let prefix = keys::one_time_keys_of(user_id.as_str(), device_id, algorithm);
        for _ in 0..WRITE_RETRIES {
            let first = self.kv.scan(Table::OneTimeKeys, &KeyRange::prefix(&prefix), Direction::Forward, 1).await?;
            let mut batch = WriteBatch::new();
            let claimed = if let Some((row, raw)) = first.into_iter().next() {
                let name = String::from_utf8_lossy(&row[prefix.len()..]).into_owned();
                let key: Value = serde_json::from_slice(&raw).map_err(|e| corrupt(Table::OneTimeKeys, e))?;
                batch.expect(Table::OneTimeKeys, row.clone(), Some(raw));
                batch.delete(Table::OneTimeKeys, row);
                (format!("{algorithm}:{name}"), key)
            } else {
                let row = keys::fallback_key(user_id.as_str(), device_id, algorithm);
                let Some(raw) = self.kv.get(Table::FallbackKeys, &row).await? else { return Ok(None) };
                let record: FallbackKey = serde_json::from_slice(&raw).map_err(|e| corrupt(Table::FallbackKeys, e))?;
                let key_id = format!("{algorithm}:{}", record.key_id);
                if record.used {
                    return Ok(Some((key_id, record.key)));
                }
                let used = FallbackKey { used: true, ..record.clone() };
                batch.expect(Table::FallbackKeys, row.clone(), Some(raw));
                batch.put(Table::FallbackKeys, row, encode(&used));
                (key_id, record.key)
            };
            match self.kv.write(batch).await {
                Ok(()) => return Ok(Some(claimed)),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent claims of these keys; try again".into()))
    }

    /// Adds the removal of a device's keys, one-time and fallback keys and the signatures on
    /// them (the device is being deleted).
    pub(crate) async fn remove_device_keys_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        device_id: &str,
    ) -> Result<bool, ServiceError> {
        if check_key_part("device ID", device_id).is_err() {
            return Ok(false);
        }
        let device_row = keys::device(user_id.as_str(), device_id);
        let had_keys = self.kv.get(Table::DeviceKeys, &device_row).await?.is_some();
        batch.delete(Table::DeviceKeys, device_row);
        let rows = keys::device_key_rows(user_id.as_str(), device_id);
        let signatures = keys::key_signatures_of(user_id.as_str(), device_id);
        for (table, prefix) in
            [(Table::OneTimeKeys, &rows), (Table::FallbackKeys, &rows), (Table::KeySignatures, &signatures)]
        {
            for (key, _) in lattice_storage::scan_all(self.kv.as_ref(), table, &KeyRange::prefix(prefix)).await? {
                batch.delete(table, key);
            }
        }
        Ok(had_keys)
    }

    /// Adds to `object.signatures` the stored signatures on `target_user`'s key `target_key`
    /// made by the `signers`.
    pub(super) async fn merge_signatures(
        &self,
        target_user: &UserId,
        target_key: &str,
        signers: &[&UserId],
        object: &mut Map<String, Value>,
    ) -> Result<(), ServiceError> {
        let signers: BTreeSet<&str> = signers.iter().map(|s| s.as_str()).collect();
        for signer in signers {
            let row = keys::key_signatures(target_user.as_str(), target_key, signer);
            let Some(raw) = self.kv.get(Table::KeySignatures, &row).await? else { continue };
            for (key_id, signature) in decode_object(Table::KeySignatures, &raw)? {
                signed::add_signature(object, signer, &key_id, signature);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_split_into_algorithm_and_name() {
        assert_eq!(split_key_id("signed_curve25519:AAAAHg").expect("valid"), ("signed_curve25519", "AAAAHg"));
        for bad in ["", "nocolon", ":name", "alg:", "alg:a\0b"] {
            assert!(split_key_id(bad).is_err(), "{bad:?}");
        }
    }
}
