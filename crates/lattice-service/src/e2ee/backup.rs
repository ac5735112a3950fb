//! Server-side key backup: `/room_keys/version` and `/room_keys/keys`.
//!
//! Rows: `backup_versions` (`user\0version`, big-endian → algorithm, `auth_data`, key count and
//! etag), `backup_keys` (`user\0version\0room\0session` → the encrypted session key as the
//! client sent it). Every write of keys is conditional on the version's row, which carries the
//! count and the etag, so the count stays exact under concurrent writers. Version numbers come
//! from one counter and are never reused, so a deleted version's keys (removed in pages) are
//! never read again.

use std::collections::BTreeMap;

use lattice_core::limits::{MAX_BACKUP_KEYS_PER_UPLOAD, MAX_BACKUP_KEYS_PER_VERSION, MAX_BACKUP_OBJECT_BYTES};
use lattice_storage::{Direction, KeyRange, StorageError, Table, WriteBatch, keys};
use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::keys::encode;
use super::{E2ee, WRITE_RETRIES};
use crate::ServiceError;

/// A backup version as `GET /room_keys/version` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupInfo {
    pub version: String,
    pub algorithm: String,
    pub auth_data: Value,
    pub count: u64,
    pub etag: String,
}

/// Room → session → backed-up key data.
pub type BackupKeys = BTreeMap<String, BTreeMap<String, Value>>;

/// What a write of keys answers: the version's key count and etag after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupWrite {
    pub count: u64,
    pub etag: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct VersionRecord {
    algorithm: String,
    auth_data: Value,
    count: u64,
    etag: u64,
}

const VERSION_COUNTER: &str = "backup_versions";
/// Keys one batch of a deletion removes; a larger deletion takes several.
const DELETE_PAGE: usize = 10_000;

fn corrupt(detail: impl ToString) -> ServiceError {
    ServiceError::Storage(StorageError::Corrupt { table: Table::BackupVersions.name(), detail: detail.to_string() })
}

fn no_backup(version: &str) -> ServiceError {
    ServiceError::NotFound(format!("unknown backup version {version:?}"))
}

/// A version as the client names it; one this server never handed out is simply unknown.
fn parse_version(version: &str) -> Option<u64> {
    version.parse().ok().filter(|v| *v > 0)
}

fn check_auth_data(algorithm: &str, auth_data: &Value) -> Result<(), ServiceError> {
    if algorithm.is_empty() || algorithm.len() > 255 {
        return Err(ServiceError::InvalidParam("invalid backup algorithm".into()));
    }
    if !auth_data.is_object() {
        return Err(ServiceError::BadJson("auth_data must be an object".into()));
    }
    if encode(auth_data).len() > MAX_BACKUP_OBJECT_BYTES {
        return Err(ServiceError::InvalidParam(format!("auth_data is larger than {MAX_BACKUP_OBJECT_BYTES} bytes")));
    }
    Ok(())
}

/// `KeyBackupData`: `first_message_index` and `forwarded_count` (non-negative integers),
/// `is_verified` and `session_data` (an object).
fn check_key_data(room: &str, session: &str, data: &Value) -> Result<(), ServiceError> {
    let bad = |what: &str| ServiceError::BadJson(format!("key of session {session} in {room}: {what}"));
    if room.is_empty() || room.contains('\0') || room.len() > 255 || session.is_empty() || session.len() > 255 {
        return Err(ServiceError::InvalidParam(format!("invalid room or session ID in {room}/{session}")));
    }
    if !data.get("first_message_index").is_some_and(Value::is_u64) {
        return Err(bad("first_message_index must be a non-negative integer"));
    }
    if !data.get("forwarded_count").is_some_and(Value::is_u64) {
        return Err(bad("forwarded_count must be a non-negative integer"));
    }
    if !data.get("is_verified").is_some_and(Value::is_boolean) {
        return Err(bad("is_verified must be a boolean"));
    }
    if !data.get("session_data").is_some_and(Value::is_object) {
        return Err(bad("session_data must be an object"));
    }
    if encode(data).len() > MAX_BACKUP_OBJECT_BYTES {
        return Err(bad("larger than the limit"));
    }
    Ok(())
}

/// Whether `new` should replace `old`, as the spec orders them: a verified key over an
/// unverified one, then the lower first message index, then the lower forwarded count.
fn replaces(new: &Value, old: &Value) -> bool {
    let rank = |data: &Value| {
        (
            !data["is_verified"].as_bool().unwrap_or(false),
            data["first_message_index"].as_u64().unwrap_or(u64::MAX),
            data["forwarded_count"].as_u64().unwrap_or(u64::MAX),
        )
    };
    rank(new) < rank(old)
}

impl E2ee {
    async fn version_record(
        &self,
        user_id: &UserId,
        version: u64,
    ) -> Result<Option<(VersionRecord, Vec<u8>)>, ServiceError> {
        let Some(raw) = self.kv.get(Table::BackupVersions, &keys::backup_version(user_id.as_str(), version)).await?
        else {
            return Ok(None);
        };
        Ok(Some((serde_json::from_slice(&raw).map_err(corrupt)?, raw)))
    }

    /// The user's newest backup version, if any.
    async fn current_version(&self, user_id: &UserId) -> Result<Option<u64>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows = self.kv.scan(Table::BackupVersions, &KeyRange::prefix(&prefix), Direction::Backward, 1).await?;
        Ok(rows.first().and_then(|(key, _)| key[prefix.len()..].try_into().ok()).map(u64::from_be_bytes))
    }

    /// `POST /room_keys/version`.
    pub async fn create_backup(
        &self,
        user_id: &UserId,
        algorithm: &str,
        auth_data: Value,
    ) -> Result<String, ServiceError> {
        check_auth_data(algorithm, &auth_data)?;
        let version = lattice_storage::next_counter(self.kv.as_ref(), VERSION_COUNTER).await?;
        let record = VersionRecord { algorithm: algorithm.to_owned(), auth_data, count: 0, etag: 0 };
        let row = keys::backup_version(user_id.as_str(), version);
        let mut batch = WriteBatch::new();
        batch.expect(Table::BackupVersions, row.clone(), None);
        batch.put(Table::BackupVersions, row, encode(&record));
        self.kv.write(batch).await?;
        Ok(version.to_string())
    }

    /// `GET /room_keys/version[/{version}]`: the named version, or the newest.
    pub async fn backup_info(&self, user_id: &UserId, version: Option<&str>) -> Result<BackupInfo, ServiceError> {
        let number = match version {
            Some(version) => parse_version(version).ok_or_else(|| no_backup(version))?,
            None => self.current_version(user_id).await?.ok_or_else(|| ServiceError::NotFound("no backup".into()))?,
        };
        let (record, _) =
            self.version_record(user_id, number).await?.ok_or_else(|| no_backup(version.unwrap_or_default()))?;
        Ok(BackupInfo {
            version: number.to_string(),
            algorithm: record.algorithm,
            auth_data: record.auth_data,
            count: record.count,
            etag: record.etag.to_string(),
        })
    }

    /// `PUT /room_keys/version/{version}`: only `auth_data` may change; the algorithm stays.
    pub async fn update_backup(
        &self,
        user_id: &UserId,
        version: &str,
        body_version: Option<&str>,
        algorithm: &str,
        auth_data: Value,
    ) -> Result<(), ServiceError> {
        check_auth_data(algorithm, &auth_data)?;
        if body_version.is_some_and(|v| v != version) {
            return Err(ServiceError::InvalidParam("the body's version does not match the path".into()));
        }
        let number = parse_version(version).ok_or_else(|| no_backup(version))?;
        for _ in 0..WRITE_RETRIES {
            let (record, raw) = self.version_record(user_id, number).await?.ok_or_else(|| no_backup(version))?;
            if record.algorithm != algorithm {
                return Err(ServiceError::InvalidParam("a backup's algorithm cannot change".into()));
            }
            let row = keys::backup_version(user_id.as_str(), number);
            let mut batch = WriteBatch::new();
            batch.expect(Table::BackupVersions, row.clone(), Some(raw));
            batch.put(Table::BackupVersions, row, encode(&VersionRecord { auth_data: auth_data.clone(), ..record }));
            match self.kv.write(batch).await {
                Ok(()) => return Ok(()),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("the backup is changing; try again".into()))
    }

    /// `DELETE /room_keys/version/{version}`: the version goes at once, with a first page of its
    /// keys; later pages follow in further batches (the version is never reused, so they are
    /// unreachable meanwhile).
    pub async fn delete_backup(&self, user_id: &UserId, version: &str) -> Result<(), ServiceError> {
        let number = parse_version(version).ok_or_else(|| no_backup(version))?;
        let (_, raw) = self.version_record(user_id, number).await?.ok_or_else(|| no_backup(version))?;
        let row = keys::backup_version(user_id.as_str(), number);
        let prefix = KeyRange::prefix(&keys::backup_keys_of(user_id.as_str(), number, None));
        let mut batch = WriteBatch::new();
        batch.expect(Table::BackupVersions, row.clone(), Some(raw));
        batch.delete(Table::BackupVersions, row);
        loop {
            let page =
                self.kv.scan(Table::BackupKeys, &prefix, Direction::Forward, lattice_storage::MAX_SCAN_ROWS).await?;
            let done = page.len() < lattice_storage::MAX_SCAN_ROWS;
            for (key, _) in page {
                batch.delete(Table::BackupKeys, key);
            }
            self.kv.write(std::mem::take(&mut batch)).await?;
            if done {
                return Ok(());
            }
        }
    }

    /// `PUT /room_keys/keys[/{roomId}[/{sessionId}]]`: only into the current version (else
    /// `M_WRONG_ROOM_KEYS_VERSION`); a stored key is replaced only by a better one.
    pub async fn put_backup_keys(
        &self,
        user_id: &UserId,
        version: &str,
        keys_in: &BackupKeys,
    ) -> Result<BackupWrite, ServiceError> {
        let total: usize = keys_in.values().map(BTreeMap::len).sum();
        if total > MAX_BACKUP_KEYS_PER_UPLOAD {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_BACKUP_KEYS_PER_UPLOAD} keys per upload")));
        }
        for (room, sessions) in keys_in {
            for (session, data) in sessions {
                check_key_data(room, session, data)?;
            }
        }
        let current = self.current_version(user_id).await?.ok_or_else(|| ServiceError::NotFound("no backup".into()))?;
        if parse_version(version) != Some(current) {
            return Err(ServiceError::WrongRoomKeysVersion { current_version: current.to_string() });
        }
        for _ in 0..WRITE_RETRIES {
            let Some((record, raw)) = self.version_record(user_id, current).await? else {
                return Err(ServiceError::NotFound("no backup".into()));
            };
            let mut batch = WriteBatch::new();
            let mut added = 0u64;
            let mut changed = false;
            for (room, sessions) in keys_in {
                for (session, data) in sessions {
                    let row = keys::backup_key(user_id.as_str(), current, room, session);
                    let stored = self.kv.get(Table::BackupKeys, &row).await?;
                    let keep_old = match &stored {
                        Some(old) => {
                            let old: Value = serde_json::from_slice(old).map_err(corrupt)?;
                            !replaces(data, &old)
                        }
                        None => false,
                    };
                    if keep_old {
                        continue;
                    }
                    added += u64::from(stored.is_none());
                    changed = true;
                    batch.put(Table::BackupKeys, row, encode(data));
                }
            }
            if !changed {
                return Ok(BackupWrite { count: record.count, etag: record.etag.to_string() });
            }
            let count = record.count + added;
            if count as usize > MAX_BACKUP_KEYS_PER_VERSION {
                return Err(ServiceError::InvalidParam(format!(
                    "a backup holds at most {MAX_BACKUP_KEYS_PER_VERSION} keys"
                )));
            }
            let updated = VersionRecord { count, etag: record.etag + 1, ..record };
            let row = keys::backup_version(user_id.as_str(), current);
            batch.expect(Table::BackupVersions, row.clone(), Some(raw));
            batch.put(Table::BackupVersions, row, encode(&updated));
            match self.kv.write(batch).await {
                Ok(()) => return Ok(BackupWrite { count: updated.count, etag: updated.etag.to_string() }),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("the backup is changing; try again".into()))
    }

    /// `GET /room_keys/keys[/{roomId}[/{sessionId}]]` of an existing version. A missing session
    /// is `404`; a room without keys is an empty map.
    pub async fn backup_keys(
        &self,
        user_id: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<BackupKeys, ServiceError> {
        let number = parse_version(version).ok_or_else(|| no_backup(version))?;
        self.version_record(user_id, number).await?.ok_or_else(|| no_backup(version))?;
        let mut found = BackupKeys::new();
        if let (Some(room), Some(session)) = (room, session) {
            let row = keys::backup_key(user_id.as_str(), number, room, session);
            let raw = self
                .kv
                .get(Table::BackupKeys, &row)
                .await?
                .ok_or_else(|| ServiceError::NotFound(format!("no key for session {session}")))?;
            let data: Value = serde_json::from_slice(&raw).map_err(corrupt)?;
            found.entry(room.to_owned()).or_default().insert(session.to_owned(), data);
            return Ok(found);
        }
        let base = keys::backup_keys_of(user_id.as_str(), number, None);
        let range = KeyRange::prefix(&keys::backup_keys_of(user_id.as_str(), number, room));
        for (key, raw) in lattice_storage::scan_all(self.kv.as_ref(), Table::BackupKeys, &range).await? {
            let rest = &key[base.len()..];
            let Some(split) = rest.iter().position(|b| *b == 0) else { continue };
            let room = String::from_utf8_lossy(&rest[..split]).into_owned();
            let session = String::from_utf8_lossy(&rest[split + 1..]).into_owned();
            let data: Value = serde_json::from_slice(&raw).map_err(corrupt)?;
            found.entry(room).or_default().insert(session, data);
        }
        Ok(found)
    }

    /// `DELETE /room_keys/keys[/{roomId}[/{sessionId}]]` of an existing version.
    pub async fn delete_backup_keys(
        &self,
        user_id: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> Result<BackupWrite, ServiceError> {
        let number = parse_version(version).ok_or_else(|| no_backup(version))?;
        let mut conflicts = 0;
        loop {
            let (record, raw) = self.version_record(user_id, number).await?.ok_or_else(|| no_backup(version))?;
            let rows: Vec<Vec<u8>> = match (room, session) {
                (Some(room), Some(session)) => {
                    let row = keys::backup_key(user_id.as_str(), number, room, session);
                    self.kv.get(Table::BackupKeys, &row).await?.map(|_| row).into_iter().collect()
                }
                _ => {
                    let range = KeyRange::prefix(&keys::backup_keys_of(user_id.as_str(), number, room));
                    let page = self.kv.scan(Table::BackupKeys, &range, Direction::Forward, DELETE_PAGE).await?;
                    page.into_iter().map(|(key, _)| key).collect()
                }
            };
            if rows.is_empty() {
                return Ok(BackupWrite { count: record.count, etag: record.etag.to_string() });
            }
            // The condition on the version's row (every write of keys changes it) keeps the count
            // exact: a concurrent writer makes this batch fail and read again.
            let mut batch = WriteBatch::new();
            for row in &rows {
                batch.delete(Table::BackupKeys, row.clone());
            }
            let updated = VersionRecord {
                count: record.count.saturating_sub(rows.len() as u64),
                etag: record.etag + 1,
                ..record
            };
            let version_row = keys::backup_version(user_id.as_str(), number);
            batch.expect(Table::BackupVersions, version_row.clone(), Some(raw));
            batch.put(Table::BackupVersions, version_row, encode(&updated));
            match self.kv.write(batch).await {
                // A page at a time; the next round deletes the rest.
                Ok(()) if rows.len() == DELETE_PAGE => continue,
                Ok(()) => return Ok(BackupWrite { count: updated.count, etag: updated.etag.to_string() }),
                Err(StorageError::Conflict) if conflicts < WRITE_RETRIES => conflicts += 1,
                Err(StorageError::Conflict) => {
                    return Err(ServiceError::LimitExceeded("the backup is changing; try again".into()));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(verified: bool, index: u64, forwarded: u64) -> Value {
        json!({ "is_verified": verified, "first_message_index": index, "forwarded_count": forwarded, "session_data": {} })
    }

    #[test]
    fn a_better_key_replaces_a_worse_one_only() {
        assert!(replaces(&key(true, 5, 5), &key(false, 0, 0)), "verified wins");
        assert!(!replaces(&key(false, 0, 0), &key(true, 5, 5)));
        assert!(replaces(&key(false, 1, 5), &key(false, 2, 0)), "lower index wins");
        assert!(replaces(&key(false, 1, 0), &key(false, 1, 1)), "then fewer forwards");
        assert!(!replaces(&key(false, 1, 1), &key(false, 1, 1)), "an equal key keeps the stored one");
    }

    #[test]
    fn malformed_key_data_is_refused() {
        assert!(check_key_data("!r:hs", "s", &key(false, 0, 0)).is_ok());
        for bad in [
            json!({}),
            json!({ "is_verified": "yes", "first_message_index": 0, "forwarded_count": 0, "session_data": {} }),
            json!({ "is_verified": true, "first_message_index": -1, "forwarded_count": 0, "session_data": {} }),
            json!({ "is_verified": true, "first_message_index": 0, "forwarded_count": 0, "session_data": "x" }),
        ] {
            assert!(check_key_data("!r:hs", "s", &bad).is_err(), "{bad}");
        }
    }
}
