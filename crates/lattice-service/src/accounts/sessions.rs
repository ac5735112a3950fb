//! Logging in and out: devices, access tokens and refresh tokens.

use lattice_core::limits::{MAX_DEVICE_DISPLAY_NAME_BYTES, MAX_DEVICE_ID_BYTES, MAX_DEVICES_PER_USER};
use lattice_core::user_id::login_user_id;
use lattice_storage::records::{AccessTokenRecord, DeviceRecord, RefreshTokenRecord};
use lattice_storage::{StorageError, Table, WriteBatch, keys};
use ruma::{OwnedDeviceId, OwnedUserId, UserId};

use super::Accounts;
use crate::ServiceError;
use crate::secrets::{hex, new_device_id, new_token, token_hash};

/// The caller of an authenticated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
}

#[derive(Debug)]
pub struct LoginRequest {
    /// What the user typed: a localpart or a full user ID.
    pub user: String,
    pub password: String,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub refresh_token: bool,
    pub ip: Option<String>,
}

#[derive(Debug)]
pub struct LoginResult {
    pub user_id: OwnedUserId,
    pub tokens: SessionTokens,
}

/// What a client receives when a device logs in or refreshes.
#[derive(Debug, Clone)]
pub struct SessionTokens {
    pub device_id: String,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in_ms: Option<u64>,
}

#[derive(Clone)]
pub(crate) struct NewDevice {
    pub device_id: Option<String>,
    pub display_name: Option<String>,
    pub refreshable: bool,
    pub ip: Option<String>,
}

/// Token prefixes, so a leaked secret says what it is.
const ACCESS_TOKEN_PREFIX: &str = "lat";
const REFRESH_TOKEN_PREFIX: &str = "latr";

/// How often a login retries when a concurrent login to the same device wins the race.
const DEVICE_WRITE_RETRIES: usize = 4;

fn check_device_fields(device: &NewDevice) -> Result<(), ServiceError> {
    if let Some(id) = &device.device_id
        && (id.is_empty() || id.len() > MAX_DEVICE_ID_BYTES || id.contains('\0'))
    {
        return Err(ServiceError::InvalidParam(format!("device_id must be 1 to {MAX_DEVICE_ID_BYTES} bytes")));
    }
    if device.display_name.as_ref().is_some_and(|n| n.len() > MAX_DEVICE_DISPLAY_NAME_BYTES) {
        return Err(ServiceError::TooLarge { what: "device display name", limit: MAX_DEVICE_DISPLAY_NAME_BYTES });
    }
    Ok(())
}

impl Accounts {
    /// `POST /login` with `m.login.password`.
    pub async fn login(&self, request: LoginRequest) -> Result<LoginResult, ServiceError> {
        let invalid = || ServiceError::Forbidden("invalid username or password".into());
        let Ok(user_id) = login_user_id(&request.user, self.server_name()) else {
            return Err(invalid());
        };
        let device = NewDevice {
            device_id: request.device_id,
            display_name: request.initial_device_display_name,
            refreshable: request.refresh_token,
            ip: request.ip,
        };
        check_device_fields(&device)?;
        let record = self.user_record(&user_id).await?.map(|f| f.value);
        // The hash work is done for unknown and deactivated accounts too, and a wrong password
        // gets one answer: neither its content nor its timing says whether the account exists.
        let stored_hash = record.as_ref().and_then(|r| r.password_hash.clone());
        if !self.hasher.verify(request.password, stored_hash).await? {
            return Err(invalid());
        }
        if record.as_ref().is_some_and(|r| r.deactivated) {
            return Err(ServiceError::UserDeactivated);
        }
        let tokens = self.write_device_session(&user_id, device).await?;
        tracing::info!(user_id = %user_id, device_id = %tokens.device_id, "logged in");
        Ok(LoginResult { user_id, tokens })
    }

    async fn write_device_session(&self, user_id: &UserId, device: NewDevice) -> Result<SessionTokens, ServiceError> {
        // A client-chosen device ID fixes the key; a generated one is fixed once for all retries.
        let device = NewDevice { device_id: Some(device.device_id.unwrap_or_else(new_device_id)), ..device };
        for _ in 0..DEVICE_WRITE_RETRIES {
            let mut batch = WriteBatch::new();
            let tokens = self.add_device_to_batch(&mut batch, user_id, device.clone()).await?;
            match self.kv.write(batch).await {
                Ok(()) => return Ok(tokens),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent logins to one device".into()))
    }

    /// Adds a device (or replaces the session of an existing one) to `batch`: the device row,
    /// its new tokens, and the removal of the tokens it had. The batch requires the device row
    /// to be unchanged, so two concurrent logins cannot leave an orphaned token behind.
    pub(crate) async fn add_device_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        device: NewDevice,
    ) -> Result<SessionTokens, ServiceError> {
        check_device_fields(&device)?;
        let device_id = device.device_id.unwrap_or_else(new_device_id);
        let key = keys::device(user_id.as_str(), &device_id);
        let existing = lattice_storage::get::<DeviceRecord>(self.kv.as_ref(), &key).await?;
        batch.expect(Table::Devices, key.clone(), existing.as_ref().map(|f| f.raw.clone()));
        let now = self.now_ms();
        let record = match existing {
            Some(fetched) if fetched.value.dehydrated => {
                // MSC3814: a dehydrated device is rehydrated into a new device by its owner's
                // client, never logged in to.
                return Err(ServiceError::Forbidden(format!(
                    "{device_id} is a dehydrated device; log in as a new device"
                )));
            }
            Some(fetched) => {
                revoke_tokens(batch, &fetched.value);
                fetched.value
            }
            None => {
                self.check_device_count(user_id).await?;
                DeviceRecord {
                    device_id: device_id.clone(),
                    display_name: device.display_name,
                    created_ms: now,
                    last_seen_ms: None,
                    last_seen_ip: None,
                    access_token_hash: String::new(),
                    refresh_token_hash: None,
                    dehydrated: false,
                }
            }
        };
        let record =
            DeviceRecord { last_seen_ms: Some(now), last_seen_ip: device.ip.or(record.last_seen_ip.clone()), ..record };
        Ok(self.issue_tokens(batch, user_id, record, device.refreshable))
    }

    pub(super) async fn check_device_count(&self, user_id: &UserId) -> Result<(), ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let rows = self
            .kv
            .scan(
                Table::Devices,
                &lattice_storage::KeyRange::prefix(&prefix),
                lattice_storage::Direction::Forward,
                MAX_DEVICES_PER_USER,
            )
            .await?;
        if rows.len() >= MAX_DEVICES_PER_USER {
            return Err(ServiceError::Forbidden(format!(
                "an account may have at most {MAX_DEVICES_PER_USER} devices; log out some first"
            )));
        }
        Ok(())
    }

    /// Puts fresh tokens for `device` into `batch` and stores the device pointing at them.
    fn issue_tokens(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        mut device: DeviceRecord,
        refreshable: bool,
    ) -> SessionTokens {
        let access_token = new_token(ACCESS_TOKEN_PREFIX);
        let expires_in_ms = refreshable.then_some(self.config.refreshable_token_lifetime_ms);
        device.access_token_hash = hex(&token_hash(&access_token));
        let access = AccessTokenRecord {
            user_id: user_id.to_string(),
            device_id: device.device_id.clone(),
            expires_ms: expires_in_ms.map(|lifetime| self.now_ms().saturating_add(lifetime)),
        };
        lattice_storage::put(batch, keys::token(&device.access_token_hash), &access);
        let refresh_token = refreshable.then(|| new_token(REFRESH_TOKEN_PREFIX));
        device.refresh_token_hash = refresh_token.as_ref().map(|t| hex(&token_hash(t)));
        if let Some(hash) = &device.refresh_token_hash {
            let refresh = RefreshTokenRecord { user_id: user_id.to_string(), device_id: device.device_id.clone() };
            lattice_storage::put(batch, keys::token(hash), &refresh);
        }
        let device_id = device.device_id.clone();
        lattice_storage::put(batch, keys::device(user_id.as_str(), &device_id), &device);
        SessionTokens { device_id, access_token, refresh_token, expires_in_ms }
    }

    /// The session an access token belongs to.
    pub async fn authenticate(&self, access_token: &str) -> Result<Session, ServiceError> {
        let hash = hex(&token_hash(access_token));
        let Some(record) = lattice_storage::get::<AccessTokenRecord>(self.kv.as_ref(), &keys::token(&hash)).await?
        else {
            return Err(ServiceError::UnknownToken { soft_logout: false });
        };
        let record = record.value;
        if record.expires_ms.is_some_and(|expiry| expiry <= self.now_ms()) {
            // The device still exists and can refresh: the spec's soft logout.
            return Err(ServiceError::UnknownToken { soft_logout: true });
        }
        let user_id = OwnedUserId::try_from(record.user_id).map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(Session { user_id, device_id: record.device_id.into() })
    }

    /// `POST /refresh`: swaps a refresh token for a new access and refresh token. The old pair
    /// stops working at once.
    pub async fn refresh(&self, refresh_token: &str) -> Result<SessionTokens, ServiceError> {
        let hash = hex(&token_hash(refresh_token));
        let unknown = || ServiceError::UnknownToken { soft_logout: false };
        let Some(record) = lattice_storage::get::<RefreshTokenRecord>(self.kv.as_ref(), &keys::token(&hash)).await?
        else {
            return Err(unknown());
        };
        let user_id = OwnedUserId::try_from(record.value.user_id).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let device_key = keys::device(user_id.as_str(), &record.value.device_id);
        let Some(device) = lattice_storage::get::<DeviceRecord>(self.kv.as_ref(), &device_key).await? else {
            return Err(unknown());
        };
        if device.value.refresh_token_hash.as_deref() != Some(hash.as_str()) {
            return Err(unknown());
        }
        let mut batch = WriteBatch::new();
        batch.expect(Table::Devices, device_key, Some(device.raw));
        revoke_tokens(&mut batch, &device.value);
        let tokens = self.issue_tokens(&mut batch, &user_id, device.value, true);
        match self.kv.write(batch).await {
            Ok(()) => Ok(tokens),
            // Someone else refreshed or logged out this device meanwhile: this token is spent.
            Err(StorageError::Conflict) => Err(unknown()),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds the removal of every device of `user_id` that `selected` picks, with its tokens,
    /// and returns the IDs of the devices removed.
    pub(crate) async fn remove_devices_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        selected: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, ServiceError> {
        let prefix = keys::user_rows(user_id.as_str());
        let devices =
            lattice_storage::scan_prefix::<DeviceRecord>(self.kv.as_ref(), &prefix, MAX_DEVICES_PER_USER).await?;
        let mut removed = Vec::new();
        for (key, device) in devices {
            if selected(&device.device_id) {
                revoke_tokens(batch, &device);
                batch.delete(Table::Devices, key);
                if device.dehydrated {
                    // The dehydrated device goes with its record, whichever endpoint deletes it.
                    batch.delete(Table::DehydratedDevices, keys::user(user_id.as_str()));
                }
                removed.push(device.device_id);
            }
        }
        Ok(removed)
    }
}

pub(super) fn revoke_tokens(batch: &mut WriteBatch, device: &DeviceRecord) {
    batch.delete(Table::AccessTokens, keys::token(&device.access_token_hash));
    if let Some(hash) = &device.refresh_token_hash {
        batch.delete(Table::RefreshTokens, keys::token(hash));
    }
}
