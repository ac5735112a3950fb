//! Display names and avatars of local users.

use lattice_core::limits::{MAX_AVATAR_URL_BYTES, MAX_DISPLAYNAME_BYTES};
use lattice_storage::records::ProfileRecord;
use lattice_storage::{WriteBatch, keys};
use ruma::UserId;
use serde_json::{Value, json};

use super::Accounts;
use crate::ServiceError;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// Which profile field a request reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileField {
    DisplayName,
    AvatarUrl,
}

impl Accounts {
    /// The profile of a local user; remote profiles need federation.
    pub async fn profile(&self, user_id: &UserId) -> Result<Profile, ServiceError> {
        if user_id.server_name() != self.server_name() {
            return Err(ServiceError::NotFound("profiles of users on other servers are not available yet".into()));
        }
        let user = self.user_record(user_id).await?;
        if user.is_none_or(|u| u.value.deactivated) {
            return Err(ServiceError::NotFound(format!("no such user {user_id}")));
        }
        self.stored_profile(user_id).await
    }

    /// Stores (or with `None`, removes) one field of the caller's own profile, and returns
    /// the profile as it now is.
    pub(crate) async fn store_profile_field(
        &self,
        caller: &UserId,
        target: &UserId,
        field: ProfileField,
        value: Option<String>,
    ) -> Result<Profile, ServiceError> {
        if caller != target {
            return Err(ServiceError::Forbidden("you can only change your own profile".into()));
        }
        let limit = match field {
            ProfileField::DisplayName => MAX_DISPLAYNAME_BYTES,
            ProfileField::AvatarUrl => MAX_AVATAR_URL_BYTES,
        };
        if value.as_ref().is_some_and(|v| v.len() > limit) {
            return Err(ServiceError::TooLarge { what: "profile field", limit });
        }
        if field == ProfileField::AvatarUrl && value.as_ref().is_some_and(|v| !v.is_empty() && !v.starts_with("mxc://"))
        {
            return Err(ServiceError::InvalidParam("avatar_url must be an mxc:// URI".into()));
        }
        let key = keys::user(caller.as_str());
        let fetched = lattice_storage::get::<ProfileRecord>(self.kv.as_ref(), &key).await?;
        let mut record = fetched.as_ref().map(|f| f.value.clone()).unwrap_or_default();
        match field {
            ProfileField::DisplayName => record.displayname = value,
            ProfileField::AvatarUrl => record.avatar_url = value,
        }
        let mut batch = WriteBatch::new();
        batch.expect(lattice_storage::Table::Profiles, key.clone(), fetched.map(|f| f.raw));
        lattice_storage::put(&mut batch, key, &record);
        self.kv.write(batch).await?;
        Ok(Profile { displayname: record.displayname, avatar_url: record.avatar_url })
    }

    /// A local user's profile for their member events; nothing for users of other servers or
    /// accounts without one.
    pub(crate) async fn member_profile(&self, user_id: &UserId) -> Result<Profile, ServiceError> {
        if user_id.server_name() != self.server_name() {
            return Ok(Profile::default());
        }
        self.stored_profile(user_id).await
    }

    /// Every local account that is not deactivated (the user directory's "all local users").
    pub(crate) async fn active_local_users(&self) -> Result<Vec<ruma::OwnedUserId>, ServiceError> {
        let rows = lattice_storage::scan_all(
            self.kv.as_ref(),
            lattice_storage::Table::Users,
            &lattice_storage::KeyRange::all(),
        )
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, raw)| serde_json::from_slice::<lattice_storage::records::UserRecord>(&raw).ok())
            .filter(|user| !user.deactivated)
            .filter_map(|user| ruma::OwnedUserId::try_from(user.user_id).ok())
            .collect())
    }

    /// The stored profile record, empty when there is none.
    async fn stored_profile(&self, user_id: &UserId) -> Result<Profile, ServiceError> {
        let record = lattice_storage::get::<ProfileRecord>(self.kv.as_ref(), &keys::user(user_id.as_str())).await?;
        let record = record.map(|f| f.value).unwrap_or_default();
        Ok(Profile { displayname: record.displayname, avatar_url: record.avatar_url })
    }
}

/// Adds the profile's fields to member event content, as clients show them.
pub(crate) fn profile_content(mut content: Value, profile: &Profile) -> Value {
    if let Some(name) = &profile.displayname {
        content["displayname"] = json!(name);
    }
    if let Some(avatar) = profile.avatar_url.as_ref().filter(|a| !a.is_empty()) {
        content["avatar_url"] = json!(avatar);
    }
    content
}
