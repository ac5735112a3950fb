//! Accounts: registration, passwords, deactivation.

use lattice_core::limits::MAX_PASSWORD_BYTES;
use lattice_core::user_id::new_user_id;
use lattice_storage::records::{ProfileRecord, RegistrationTokenRecord, UserRecord};
use lattice_storage::{StorageError, WriteBatch, keys};
use ruma::api::client::uiaa::AuthData;
use ruma::{OwnedUserId, UserId};

use super::Accounts;
use super::sessions::{NewDevice, SessionTokens};
use super::uia::{Purpose, STAGE_DUMMY, STAGE_PASSWORD, STAGE_REGISTRATION_TOKEN};
use crate::{RegistrationMode, ServiceError};

/// A registration request as the client sent it, already parsed.
#[derive(Debug, Default)]
pub struct RegisterRequest {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub refresh_token: bool,
    pub auth: Option<AuthData>,
    pub ip: Option<String>,
}

#[derive(Debug)]
pub struct Registered {
    pub user_id: OwnedUserId,
    /// `None` when the client asked for `inhibit_login`.
    pub tokens: Option<SessionTokens>,
}

/// An account made by an operator (`lattice user create`).
#[derive(Debug)]
pub struct NewAccount {
    pub username: String,
    pub password: String,
    pub admin: bool,
}

const REGISTER_TOKEN_FLOWS: &[&[&str]] = &[&[STAGE_REGISTRATION_TOKEN]];
const REGISTER_OPEN_FLOWS: &[&[&str]] = &[&[STAGE_DUMMY], &[STAGE_REGISTRATION_TOKEN]];
pub(crate) const PASSWORD_FLOWS: &[&[&str]] = &[&[STAGE_PASSWORD]];

pub(crate) fn check_password_length(password: &str) -> Result<(), ServiceError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ServiceError::TooLarge { what: "password", limit: MAX_PASSWORD_BYTES });
    }
    Ok(())
}

impl Accounts {
    /// `POST /register`: validates the name first (so clients learn of a taken name before
    /// they go through UIA), then runs UIA, then creates the account in one batch.
    pub async fn register(&self, request: RegisterRequest) -> Result<Registered, ServiceError> {
        let flows = match self.config.registration {
            RegistrationMode::Disabled => return Err(ServiceError::RegistrationDisabled),
            RegistrationMode::Token => REGISTER_TOKEN_FLOWS,
            RegistrationMode::Open => REGISTER_OPEN_FLOWS,
        };
        let user_id = match &request.username {
            Some(name) => self.available_user_id(name).await?,
            None => self.generated_user_id().await?,
        };
        if let Some(password) = &request.password {
            check_password_length(password)?;
        }
        let completed = self.user_interactive_auth(Purpose::Register, None, flows, request.auth.as_ref()).await?;
        let password_hash = match request.password {
            Some(password) => Some(self.hasher.hash(password).await?),
            None => None,
        };
        let device = (!request.inhibit_login).then_some(NewDevice {
            device_id: request.device_id,
            display_name: request.initial_device_display_name,
            refreshable: request.refresh_token,
            ip: request.ip,
        });
        let record = UserRecord {
            user_id: user_id.to_string(),
            password_hash,
            admin: false,
            deactivated: false,
            created_ms: self.now_ms(),
        };
        let tokens = self.create_account(&user_id, record, completed.registration_token.as_deref(), device).await?;
        tracing::info!(user_id = %user_id, "registered account");
        Ok(Registered { user_id, tokens })
    }

    /// `GET /register/available`.
    pub async fn username_available(&self, username: &str) -> Result<(), ServiceError> {
        if self.config.registration == RegistrationMode::Disabled {
            return Err(ServiceError::RegistrationDisabled);
        }
        self.available_user_id(username).await.map(|_| ())
    }

    async fn available_user_id(&self, username: &str) -> Result<OwnedUserId, ServiceError> {
        let user_id =
            new_user_id(username, self.server_name()).map_err(|e| ServiceError::InvalidUsername(e.to_string()))?;
        if self.user_record(&user_id).await?.is_some() {
            return Err(ServiceError::UserInUse);
        }
        Ok(user_id)
    }

    async fn generated_user_id(&self) -> Result<OwnedUserId, ServiceError> {
        const ATTEMPTS: usize = 8;
        for _ in 0..ATTEMPTS {
            let name = crate::secrets::random_alphanumeric(12).to_lowercase();
            if let Ok(user_id) = self.available_user_id(&name).await {
                return Ok(user_id);
            }
        }
        Err(ServiceError::Internal("could not generate a free user ID".into()))
    }

    /// Writes the user, profile, first device and the spent registration token as one batch
    /// whose conditions make a concurrent registration of the same name fail cleanly instead of
    /// overwriting. A race on the token's use count alone is retried.
    async fn create_account(
        &self,
        user_id: &UserId,
        record: UserRecord,
        registration_token: Option<&str>,
        device: Option<NewDevice>,
    ) -> Result<Option<SessionTokens>, ServiceError> {
        const ATTEMPTS: usize = 8;
        let _spending = match registration_token {
            Some(_) => Some(self.token_spending.lock().await),
            None => None,
        };
        for _ in 0..ATTEMPTS {
            let mut batch = WriteBatch::new();
            batch.expect(lattice_storage::Table::Users, keys::user(user_id.as_str()), None);
            lattice_storage::put(&mut batch, keys::user(user_id.as_str()), &record);
            let profile = ProfileRecord { displayname: Some(user_id.localpart().to_owned()), avatar_url: None };
            lattice_storage::put(&mut batch, keys::user(user_id.as_str()), &profile);
            if let Some(token) = registration_token {
                self.spend_registration_token(&mut batch, token).await?;
            }
            let tokens = match device.clone() {
                Some(device) => Some(self.add_device_to_batch(&mut batch, user_id, device).await?),
                None => None,
            };
            match self.kv.write(batch).await {
                Ok(()) => return Ok(tokens),
                Err(StorageError::Conflict) if self.user_record(user_id).await?.is_some() => {
                    return Err(ServiceError::UserInUse);
                }
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent registrations; try again".into()))
    }

    /// `lattice user create`: an account made by the operator, bypassing registration rules
    /// but not the username grammar.
    pub async fn create_user(&self, account: NewAccount) -> Result<OwnedUserId, ServiceError> {
        let user_id = self.available_user_id(&account.username).await?;
        check_password_length(&account.password)?;
        let password_hash = Some(self.hasher.hash(account.password).await?);
        let record = UserRecord {
            user_id: user_id.to_string(),
            password_hash,
            admin: account.admin,
            deactivated: false,
            created_ms: self.now_ms(),
        };
        self.create_account(&user_id, record, None, None).await?;
        Ok(user_id)
    }

    /// Adds a new password for an existing, active user to `batch`, required to commit only
    /// if the user record is still the one read.
    pub(crate) async fn set_password_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        password: String,
    ) -> Result<(), ServiceError> {
        check_password_length(&password)?;
        let hash = self.hasher.hash(password).await?;
        let fetched = self.existing_user(user_id).await?;
        let mut record = fetched.value.clone();
        record.password_hash = Some(hash);
        batch.expect(lattice_storage::Table::Users, keys::user(user_id.as_str()), Some(fetched.raw));
        lattice_storage::put(batch, keys::user(user_id.as_str()), &record);
        Ok(())
    }

    /// Adds the deactivation of an existing user to `batch`: the account can never log in
    /// again, its name is never reused, and its profile is emptied.
    pub(crate) async fn deactivate_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
    ) -> Result<(), ServiceError> {
        let fetched = self.existing_user(user_id).await?;
        let mut record = fetched.value.clone();
        record.deactivated = true;
        record.password_hash = None;
        batch.expect(lattice_storage::Table::Users, keys::user(user_id.as_str()), Some(fetched.raw));
        lattice_storage::put(batch, keys::user(user_id.as_str()), &record);
        lattice_storage::put(batch, keys::user(user_id.as_str()), &ProfileRecord::default());
        Ok(())
    }

    pub(crate) async fn user_record(
        &self,
        user_id: &UserId,
    ) -> Result<Option<lattice_storage::Fetched<UserRecord>>, ServiceError> {
        Ok(lattice_storage::get::<UserRecord>(self.kv.as_ref(), &keys::user(user_id.as_str())).await?)
    }

    /// A user that exists and is not deactivated.
    pub(crate) async fn existing_user(
        &self,
        user_id: &UserId,
    ) -> Result<lattice_storage::Fetched<UserRecord>, ServiceError> {
        match self.user_record(user_id).await? {
            Some(fetched) if fetched.value.deactivated => Err(ServiceError::UserDeactivated),
            Some(fetched) => Ok(fetched),
            None => Err(ServiceError::NotFound(format!("no such user {user_id}"))),
        }
    }

    pub(crate) async fn password_matches(&self, user_id: &UserId, password: &str) -> Result<bool, ServiceError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Ok(false);
        }
        let stored =
            self.user_record(user_id).await?.filter(|u| !u.value.deactivated).and_then(|u| u.value.password_hash);
        self.hasher.verify(password.to_owned(), stored).await
    }

    pub(crate) async fn spend_registration_token(
        &self,
        batch: &mut WriteBatch,
        token: &str,
    ) -> Result<(), ServiceError> {
        let key = keys::registration_token(token);
        let fetched = lattice_storage::get::<RegistrationTokenRecord>(self.kv.as_ref(), &key).await?;
        let Some(fetched) = fetched.filter(|f| self.token_is_usable(&f.value)) else {
            return Err(ServiceError::Forbidden("invalid or expired registration token".into()));
        };
        let mut record = fetched.value.clone();
        record.completed = record.completed.saturating_add(1);
        batch.expect(lattice_storage::Table::RegistrationTokens, key.clone(), Some(fetched.raw));
        lattice_storage::put(batch, key, &record);
        Ok(())
    }
}
