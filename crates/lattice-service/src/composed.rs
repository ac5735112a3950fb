//! The rules that span several services: each checks what one service knows before another
//! writes. The services themselves stay ignorant of each other.

use lattice_storage::WriteBatch;
use lattice_storage::records::JsonObject;
use ruma::api::client::uiaa::AuthData;
use ruma::{OwnedUserId, RoomId, UserId};

use crate::account_data::AccountData;
use crate::accounts::{
    MAX_DEVICES_PER_DELETE, PASSWORD_FLOWS, Profile, ProfileField, Purpose, Session, check_password_length,
    profile_content,
};
use crate::e2ee::{DeviceListChange, ListUpdate};
use crate::rooms::member_content;
use crate::to_device::RecipientDevices;
use crate::{Service, ServiceError, ToDeviceMessages};

/// Which devices lose their session when a password changes.
enum Logout<'a> {
    Nobody,
    AllExcept(&'a str),
    Everyone,
}

/// How often a composed write that lost a race (a concurrent retry of the same transaction)
/// is tried again.
const COMPOSED_WRITE_RETRIES: usize = 8;

impl Service {
    /// `PUT /user/{userId}[/rooms/{roomId}]/account_data/{type}`: per-room data needs a
    /// membership in the room.
    pub async fn set_account_data(
        &self,
        caller: &UserId,
        target: &UserId,
        room_id: Option<&RoomId>,
        event_type: &str,
        content: JsonObject,
    ) -> Result<(), ServiceError> {
        AccountData::check_client_write(caller, target, event_type)?;
        if let Some(room_id) = room_id {
            self.require_any_membership(target, room_id).await?;
        }
        self.account_data.write_account_data(target, room_id, event_type, content).await
    }

    /// `PUT /user/{userId}/rooms/{roomId}/tags/{tag}`: like other room account data, a tag needs
    /// a membership in the room.
    pub async fn set_room_tag(
        &self,
        caller: &UserId,
        target: &UserId,
        room_id: &RoomId,
        tag: &str,
        content: JsonObject,
    ) -> Result<(), ServiceError> {
        crate::account_data::check_owner(caller, target)?;
        self.require_any_membership(target, room_id).await?;
        self.account_data.set_room_tag(caller, target, room_id, tag, content).await
    }

    /// `PUT /sendToDevice/{eventType}/{txnId}`: the accounts know which devices each local
    /// recipient has; the to-device service queues the messages for them, and federation one
    /// `m.direct_to_device` EDU per other server, in the same batch: the request is answered
    /// only once every message is durably on its way, and a repeated transaction ID sends
    /// nothing again.
    pub async fn send_to_device(
        &self,
        sender: &UserId,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: ToDeviceMessages,
    ) -> Result<(), ServiceError> {
        let mut devices = RecipientDevices::new();
        for user in messages.keys().filter(|user| user.server_name() == self.server_name()) {
            devices.insert(user.clone(), self.accounts.device_ids(user).await?);
        }
        for _ in 0..COMPOSED_WRITE_RETRIES {
            let prepared =
                self.to_device.prepare_send(sender, sender_device, event_type, txn_id, &messages, &devices).await?;
            let Some(mut send) = prepared else { return Ok(()) };
            let servers = self.federation.queue_to_device(&mut send.batch, sender, event_type, &messages).await?;
            match self.commit_composed(send.batch.clone()).await {
                Ok(()) => {
                    self.to_device.sent(send).await;
                    self.federation.wake(&servers);
                    return Ok(());
                }
                Err(lattice_storage::StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent writes; try again".into()))
    }

    async fn require_any_membership(&self, user_id: &UserId, room_id: &RoomId) -> Result<(), ServiceError> {
        if self.rooms.membership(user_id, room_id).await?.is_none() {
            return Err(ServiceError::Forbidden(format!("{user_id} has no membership in {room_id}")));
        }
        Ok(())
    }

    /// `POST /account/password`.
    pub async fn change_password(
        &self,
        user_id: &UserId,
        current_device: &str,
        new_password: String,
        logout_devices: bool,
        auth: Option<&AuthData>,
    ) -> Result<(), ServiceError> {
        check_password_length(&new_password)?;
        self.accounts.user_interactive_auth(Purpose::ChangePassword, Some(user_id), PASSWORD_FLOWS, auth).await?;
        let logout = if logout_devices { Logout::AllExcept(current_device) } else { Logout::Nobody };
        self.set_password(user_id, new_password, logout).await
    }

    /// `lattice user reset-password`: sets a new password and logs out every device.
    pub async fn reset_password(&self, username: &str, password: String) -> Result<OwnedUserId, ServiceError> {
        let user_id = lattice_core::user_id::login_user_id(username, self.server_name())
            .map_err(|e| ServiceError::InvalidUsername(e.to_string()))?;
        self.set_password(&user_id, password, Logout::Everyone).await?;
        Ok(user_id)
    }

    /// The new password and the logouts it brings commit together.
    async fn set_password(&self, user_id: &UserId, password: String, logout: Logout<'_>) -> Result<(), ServiceError> {
        let mut batch = WriteBatch::new();
        self.accounts.set_password_to_batch(&mut batch, user_id, password).await?;
        let change = match logout {
            Logout::Nobody => None,
            Logout::AllExcept(kept) => {
                self.remove_devices_to_batch(&mut batch, user_id, |device| device != kept).await?
            }
            Logout::Everyone => self.remove_devices_to_batch(&mut batch, user_id, |_| true).await?,
        };
        self.commit_composed(batch).await?;
        self.announce_device_list_change(change).await
    }

    /// `POST /account/deactivate`: the account can never log in again and its name is never
    /// reused; devices, tokens, inboxes and profile are removed in one batch. Then the user
    /// leaves every room (and rejects invites, withdraws knocks), so nothing of theirs stays in
    /// member lists.
    pub async fn deactivate(&self, user_id: &UserId, auth: Option<&AuthData>) -> Result<(), ServiceError> {
        self.accounts.user_interactive_auth(Purpose::Deactivate, Some(user_id), PASSWORD_FLOWS, auth).await?;
        let mut batch = WriteBatch::new();
        self.accounts.deactivate_to_batch(&mut batch, user_id).await?;
        let change = self.remove_devices_to_batch(&mut batch, user_id, |_| true).await?;
        self.commit_composed(batch).await?;
        self.announce_device_list_change(change).await?;
        let rooms_left = self.rooms.leave_every_room(user_id).await?;
        tracing::info!(user_id = %user_id, rooms_left, "deactivated account");
        Ok(())
    }

    /// `POST /logout`: removes the caller's device, its tokens and its inbox.
    pub async fn logout(&self, session: &Session) -> Result<(), ServiceError> {
        self.delete_devices(&session.user_id, &[session.device_id.to_string()]).await
    }

    /// `POST /logout/all`.
    pub async fn logout_all(&self, user_id: &UserId) -> Result<(), ServiceError> {
        let mut batch = WriteBatch::new();
        let change = self.remove_devices_to_batch(&mut batch, user_id, |_| true).await?;
        self.commit_composed(batch).await?;
        self.announce_device_list_change(change).await
    }

    /// `DELETE /devices/{deviceId}` and `POST /delete_devices`, behind UIA with the password.
    pub async fn delete_devices_with_auth(
        &self,
        user_id: &UserId,
        device_ids: &[String],
        auth: Option<&AuthData>,
    ) -> Result<(), ServiceError> {
        if device_ids.len() > MAX_DEVICES_PER_DELETE {
            return Err(ServiceError::InvalidParam(format!("at most {MAX_DEVICES_PER_DELETE} devices per request")));
        }
        self.accounts.user_interactive_auth(Purpose::DeleteDevices, Some(user_id), PASSWORD_FLOWS, auth).await?;
        self.delete_devices(user_id, device_ids).await
    }

    async fn delete_devices(&self, user_id: &UserId, device_ids: &[String]) -> Result<(), ServiceError> {
        let mut batch = WriteBatch::new();
        let change = self.remove_devices_to_batch(&mut batch, user_id, |id| device_ids.iter().any(|d| d == id)).await?;
        self.commit_composed(batch).await?;
        self.announce_device_list_change(change).await
    }

    /// A device goes with its tokens (the accounts' rows), its inbox (the to-device rows) and its
    /// keys (the e2ee rows), so no later device of the same ID inherits its messages or keys.
    /// When any device went, the change of the user's device list is recorded in the same batch;
    /// publish it with [`Service::announce_device_list_change`] once the batch is committed.
    pub(crate) async fn remove_devices_to_batch(
        &self,
        batch: &mut WriteBatch,
        user_id: &UserId,
        selected: impl Fn(&str) -> bool,
    ) -> Result<Option<DeviceListChange>, ServiceError> {
        let removed = self.accounts.remove_devices_to_batch(batch, user_id, selected).await?;
        for device_id in &removed {
            self.to_device.clear_inbox_to_batch(batch, user_id, device_id).await?;
            self.e2ee.remove_device_keys_to_batch(batch, user_id, device_id).await?;
        }
        if removed.is_empty() {
            return Ok(None);
        }
        let updates =
            removed.into_iter().map(|device_id| ListUpdate::Deleted { user: user_id.to_owned(), device_id }).collect();
        Ok(Some(self.e2ee.device_list_change_to_batch(batch, updates).await?))
    }

    /// Sets (or with `None`, removes) one field of the caller's own profile, then announces it,
    /// as the spec asks: a new `join` member event with the new profile in every room the user
    /// is joined to. A room that refuses is logged and skipped.
    pub async fn set_profile_field(
        &self,
        caller: &UserId,
        target: &UserId,
        field: ProfileField,
        value: Option<String>,
    ) -> Result<(), ServiceError> {
        let profile = self.accounts.store_profile_field(caller, target, field, value).await?;
        self.announce_profile(caller, &profile).await
    }

    async fn announce_profile(&self, user_id: &UserId, profile: &Profile) -> Result<(), ServiceError> {
        let mut announced = 0;
        for room_id in self.rooms.joined_rooms(user_id).await? {
            let content = profile_content(member_content("join", None), profile);
            match self.rooms.send_event(user_id, &room_id, "m.room.member", Some(user_id.as_str()), content, None).await
            {
                Ok(_) => announced += 1,
                Err(error) => tracing::warn!(%user_id, %room_id, %error, "profile change not announced in room"),
            }
        }
        tracing::debug!(%user_id, rooms = announced, "profile change announced");
        Ok(())
    }
}
