//! Cross-signing: `/keys/device_signing/upload` and `/keys/signatures/upload`.
//!
//! Rows: `cross_signing_keys` (`user\0usage` → the key as uploaded, with the signatures it came
//! with), `key_signatures` (`target user\0key\0signer` → signer's key ID → signature, where the
//! key is a device ID or a cross-signing public key). Signatures are kept apart from the keys
//! they sign so `/keys/query` can show each requester exactly the ones the spec lets them see:
//! the owner's own signatures to everyone, another user's (made with their user-signing key)
//! only to that user.

use std::collections::BTreeMap;

use lattice_core::limits::MAX_SIGNATURES_PER_UPLOAD;
use lattice_storage::{StorageError, Table, WriteBatch, keys};
use ruma::{OwnedUserId, UserId};
use serde_json::{Map, Value};

use super::device_lists::{DeviceListChange, ListUpdate};
use super::keys::{decode_object, device_ed25519, encode};
use super::signed;
use super::{E2ee, WRITE_RETRIES};
use crate::ServiceError;

/// The keys of one `/keys/device_signing/upload`.
#[derive(Debug, Default)]
pub struct CrossSigningUpload {
    pub master_key: Option<Map<String, Value>>,
    pub self_signing_key: Option<Map<String, Value>>,
    pub user_signing_key: Option<Map<String, Value>>,
}

/// Why one signature of a `/keys/signatures/upload` was not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureFailure {
    pub errcode: &'static str,
    pub error: String,
}

impl SignatureFailure {
    fn new(errcode: &'static str, error: impl Into<String>) -> Self {
        Self { errcode, error: error.into() }
    }
}

/// Signatures not taken: target user → key ID → why.
pub type SignatureFailures = BTreeMap<OwnedUserId, BTreeMap<String, SignatureFailure>>;

const USAGES: [&str; 3] = ["master", "self_signing", "user_signing"];

/// A cross-signing key must be the user's, name its usage, and hold exactly one ed25519 key
/// whose ID is the key itself. Returns the public key.
fn check_cross_signing_key(user_id: &UserId, usage: &str, object: &Map<String, Value>) -> Result<String, ServiceError> {
    let size = serde_json::to_vec(object).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > lattice_core::limits::MAX_KEY_OBJECT_BYTES {
        return Err(ServiceError::InvalidParam(format!("the {usage} key is too large")));
    }
    if object.get("user_id").and_then(Value::as_str) != Some(user_id.as_str()) {
        return Err(ServiceError::InvalidParam(format!("the {usage} key's user_id must be {user_id}")));
    }
    let usage_ok = object.get("usage").and_then(Value::as_array).is_some_and(|u| u.iter().any(|v| v == usage));
    if !usage_ok {
        return Err(ServiceError::InvalidParam(format!("the {usage} key's usage must include {usage}")));
    }
    let keys = object.get("keys").and_then(Value::as_object);
    let Some((key_id, Value::String(public_key))) = keys.filter(|k| k.len() == 1).and_then(|k| k.iter().next()) else {
        return Err(ServiceError::InvalidParam(format!("the {usage} key must hold exactly one key")));
    };
    if key_id.strip_prefix("ed25519:") != Some(public_key.as_str()) {
        return Err(ServiceError::InvalidParam(format!("the {usage} key's ID must be ed25519:<the key>")));
    }
    Ok(public_key.clone())
}

/// The public key of a stored cross-signing key.
fn public_key_of(object: &Map<String, Value>) -> Option<String> {
    object.get("keys")?.as_object()?.values().next()?.as_str().map(str::to_owned)
}

impl E2ee {
    /// The user's stored cross-signing key of `usage`, as uploaded.
    pub(crate) async fn cross_signing_key(
        &self,
        user_id: &UserId,
        usage: &str,
    ) -> Result<Option<Map<String, Value>>, ServiceError> {
        let row = keys::cross_signing_key(user_id.as_str(), usage);
        self.kv
            .get(Table::CrossSigningKeys, &row)
            .await?
            .map(|raw| decode_object(Table::CrossSigningKeys, &raw))
            .transpose()
    }

    /// The key as `requester` may see it: with the owner's own signatures, and on a master key
    /// also the requester's (another server asking sees the owner's signatures only).
    pub(super) async fn cross_signing_key_for(
        &self,
        requester: Option<&UserId>,
        user_id: &UserId,
        usage: &str,
    ) -> Result<Option<Map<String, Value>>, ServiceError> {
        let Some(mut object) = self.cross_signing_key(user_id, usage).await? else { return Ok(None) };
        if let Some(public_key) = public_key_of(&object) {
            let signers: Vec<&UserId> = match (usage, requester) {
                ("master", Some(requester)) => vec![user_id, requester],
                _ => vec![user_id],
            };
            self.merge_signatures(user_id, &public_key, &signers, &mut object).await?;
        }
        Ok(Some(object))
    }

    /// Whether this upload needs the user to authenticate: not for the first master key, nor for
    /// keys identical to the stored ones (a retried upload); for any replacement, yes.
    pub(crate) async fn signing_upload_needs_auth(
        &self,
        user_id: &UserId,
        upload: &CrossSigningUpload,
    ) -> Result<bool, ServiceError> {
        if self.cross_signing_key(user_id, "master").await?.is_none() {
            return Ok(false);
        }
        for (usage, new) in USAGES.iter().zip([&upload.master_key, &upload.self_signing_key, &upload.user_signing_key])
        {
            if let Some(new) = new
                && self.cross_signing_key(user_id, usage).await?.as_ref() != Some(new)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `POST /keys/device_signing/upload` (after any UIA): the self-signing and user-signing
    /// keys must be signed by the master key (the new one or the stored one). A new master key
    /// drops the stored keys it did not sign.
    pub(crate) async fn upload_signing_keys(
        &self,
        user_id: &UserId,
        upload: &CrossSigningUpload,
    ) -> Result<Option<DeviceListChange>, ServiceError> {
        let new_master =
            upload.master_key.as_ref().map(|key| check_cross_signing_key(user_id, "master", key)).transpose()?;
        for _ in 0..WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            let master_row = keys::cross_signing_key(user_id.as_str(), "master");
            let stored_master_raw = self.kv.get(Table::CrossSigningKeys, &master_row).await?;
            let stored_master =
                stored_master_raw.as_deref().map(|raw| decode_object(Table::CrossSigningKeys, raw)).transpose()?;
            let master_public = match (&new_master, &stored_master) {
                (Some(public), _) => public.clone(),
                (None, Some(stored)) => public_key_of(stored)
                    .ok_or_else(|| ServiceError::Internal("a stored master key without a key".into()))?,
                (None, None) => {
                    return Err(ServiceError::InvalidParam("upload a master key first".into()));
                }
            };
            let master_changed = new_master.is_some()
                && stored_master.as_ref().and_then(public_key_of).as_deref() != new_master.as_deref();
            let mut changed = false;
            for (usage, key) in [("self_signing", &upload.self_signing_key), ("user_signing", &upload.user_signing_key)]
            {
                let row = keys::cross_signing_key(user_id.as_str(), usage);
                let stored = self.kv.get(Table::CrossSigningKeys, &row).await?;
                match key {
                    Some(key) => {
                        check_cross_signing_key(user_id, usage, key)?;
                        let master_key_id = format!("ed25519:{master_public}");
                        signed::verify(key, user_id.as_str(), &master_key_id, &master_public).map_err(|problem| {
                            ServiceError::InvalidParam(format!(
                                "the {usage} key: {}",
                                problem.describe(user_id.as_str(), &master_key_id)
                            ))
                        })?;
                        let encoded = encode(key);
                        if stored.as_deref() != Some(encoded.as_slice()) {
                            batch.expect(Table::CrossSigningKeys, row.clone(), stored);
                            batch.put(Table::CrossSigningKeys, row, encoded);
                            changed = true;
                        }
                    }
                    None if master_changed && stored.is_some() => {
                        batch.expect(Table::CrossSigningKeys, row.clone(), stored);
                        batch.delete(Table::CrossSigningKeys, row);
                        changed = true;
                    }
                    None => {}
                }
            }
            if let Some(master) = &upload.master_key {
                let encoded = encode(master);
                if stored_master_raw.as_deref() != Some(encoded.as_slice()) {
                    batch.expect(Table::CrossSigningKeys, master_row.clone(), stored_master_raw.clone());
                    batch.put(Table::CrossSigningKeys, master_row, encoded);
                    changed = true;
                }
            }
            if !changed {
                return Ok(None);
            }
            let update = ListUpdate::CrossSigning { user: user_id.to_owned() };
            let change = self.device_list_change_to_batch(&mut batch, vec![update]).await?;
            match self.kv.write(batch).await {
                Ok(()) => return Ok(Some(change)),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent key uploads; try again".into()))
    }

    /// `POST /keys/signatures/upload`: each signature by `signer` is checked on its own and kept
    /// or reported in the failures. A user's own device keys take signatures by their
    /// self-signing key; their own master key signatures by their devices; another local user's
    /// master key signatures by the signer's user-signing key.
    pub(crate) async fn upload_signatures(
        &self,
        signer: &UserId,
        signed_keys: &BTreeMap<OwnedUserId, BTreeMap<String, Map<String, Value>>>,
        is_local: impl Fn(&UserId) -> bool,
    ) -> Result<(SignatureFailures, Option<DeviceListChange>), ServiceError> {
        let total: usize = signed_keys.values().map(BTreeMap::len).sum();
        if total > MAX_SIGNATURES_PER_UPLOAD {
            return Err(ServiceError::InvalidParam(format!(
                "at most {MAX_SIGNATURES_PER_UPLOAD} signed keys per upload"
            )));
        }
        let mut failures = SignatureFailures::new();
        // Target row → signer key ID → signature.
        let mut accepted: BTreeMap<Vec<u8>, Vec<(String, Value)>> = BTreeMap::new();
        let mut updates = Vec::new();
        for (target, objects) in signed_keys {
            for (key_id, object) in objects {
                match self.check_signed_key(signer, target, key_id, object, &is_local).await? {
                    Ok(signatures) => {
                        let row = keys::key_signatures(target.as_str(), key_id, signer.as_str());
                        accepted.entry(row).or_default().extend(signatures);
                        updates.push(self.signature_update(signer, target, key_id).await?);
                    }
                    Err(failure) => {
                        failures.entry(target.clone()).or_default().insert(key_id.clone(), failure);
                    }
                }
            }
        }
        if accepted.is_empty() {
            return Ok((failures, None));
        }
        for _ in 0..WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            for (row, signatures) in &accepted {
                let stored = self.kv.get(Table::KeySignatures, row).await?;
                let mut merged = match &stored {
                    Some(raw) => decode_object(Table::KeySignatures, raw)?,
                    None => Map::new(),
                };
                merged.extend(signatures.iter().cloned());
                batch.expect(Table::KeySignatures, row.clone(), stored);
                batch.put(Table::KeySignatures, row.clone(), encode(&merged));
            }
            let change = self.device_list_change_to_batch(&mut batch, updates.clone()).await?;
            match self.kv.write(batch).await {
                Ok(()) => return Ok((failures, Some(change))),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent signature uploads; try again".into()))
    }

    /// What a signature by `signer` on `target`'s key `key_id` changes for other servers: a
    /// signed device of one's own is that device's update; one's own master key, the
    /// cross-signing keys'; a signature on another user's master key concerns the signer's own
    /// devices only.
    async fn signature_update(
        &self,
        signer: &UserId,
        target: &UserId,
        key_id: &str,
    ) -> Result<ListUpdate, ServiceError> {
        if signer != target {
            return Ok(ListUpdate::Quiet { user: signer.to_owned() });
        }
        let is_device = self.kv.get(Table::DeviceKeys, &keys::device(target.as_str(), key_id)).await?.is_some();
        Ok(match is_device {
            true => ListUpdate::Device { user: signer.to_owned(), device_id: key_id.to_owned() },
            false => ListUpdate::CrossSigning { user: signer.to_owned() },
        })
    }

    /// The valid signatures by `signer` on one key, or why there are none.
    async fn check_signed_key(
        &self,
        signer: &UserId,
        target: &UserId,
        key_id: &str,
        object: &Map<String, Value>,
        is_local: &impl Fn(&UserId) -> bool,
    ) -> Result<Result<Vec<(String, Value)>, SignatureFailure>, ServiceError> {
        if !is_local(target) {
            return Ok(Err(SignatureFailure::new(
                "M_INVALID_PARAM",
                "keys of other servers' users cannot be signed here yet",
            )));
        }
        if super::check_key_part("key ID", key_id).is_err() {
            return Ok(Err(SignatureFailure::new("M_INVALID_PARAM", "invalid key ID")));
        }
        let target_master = self.cross_signing_key(target, "master").await?;
        let is_master = target_master.as_ref().and_then(public_key_of).as_deref() == Some(key_id);
        // The signed object must be the stored key, and which keys may sign it depends on what it is.
        let (stored, signing_keys): (Map<String, Value>, Vec<(String, String)>) = if target == signer && !is_master {
            let Some(raw) = self.kv.get(Table::DeviceKeys, &keys::device(target.as_str(), key_id)).await? else {
                return Ok(Err(SignatureFailure::new(
                    "M_NOT_FOUND",
                    format!("{target} has no device or key {key_id}"),
                )));
            };
            let Some(self_signing) =
                self.cross_signing_key(signer, "self_signing").await?.as_ref().and_then(public_key_of)
            else {
                return Ok(Err(SignatureFailure::new("M_INVALID_SIGNATURE", "upload a self-signing key first")));
            };
            (decode_object(Table::DeviceKeys, &raw)?, vec![(format!("ed25519:{self_signing}"), self_signing)])
        } else if target == signer {
            let mut devices = Vec::new();
            for (device, keys) in self.device_keys(signer, &[]).await? {
                if let Some(ed25519) = device_ed25519(&keys, &device) {
                    devices.push((format!("ed25519:{device}"), ed25519));
                }
            }
            (target_master.unwrap_or_default(), devices)
        } else if is_master {
            let Some(user_signing) =
                self.cross_signing_key(signer, "user_signing").await?.as_ref().and_then(public_key_of)
            else {
                return Ok(Err(SignatureFailure::new("M_INVALID_SIGNATURE", "upload a user-signing key first")));
            };
            (target_master.unwrap_or_default(), vec![(format!("ed25519:{user_signing}"), user_signing)])
        } else {
            return Ok(Err(SignatureFailure::new(
                "M_INVALID_PARAM",
                "only another user's master key can be signed, with a user-signing key",
            )));
        };
        if signed::signed_part(&stored) != signed::signed_part(object) {
            return Ok(Err(SignatureFailure::new("M_INVALID_PARAM", "the signed object is not the published key")));
        }
        let mut valid = Vec::new();
        let mut problem = None;
        for (signing_key_id, public_key) in signing_keys {
            match signed::verify(object, signer.as_str(), &signing_key_id, &public_key) {
                Ok(()) => {
                    let signature = signed::signature(object, signer.as_str(), &signing_key_id).unwrap_or_default();
                    valid.push((signing_key_id, Value::String(signature.to_owned())));
                }
                Err(signed::SignatureProblem::Missing) => {}
                Err(other) => problem = Some(other.describe(signer.as_str(), &signing_key_id)),
            }
        }
        if valid.is_empty() {
            let error = problem.unwrap_or_else(|| "no signature by a key allowed to sign it".into());
            return Ok(Err(SignatureFailure::new("M_INVALID_SIGNATURE", error)));
        }
        Ok(Ok(valid))
    }
}
