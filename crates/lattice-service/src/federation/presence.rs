//! Presence across servers: `m.presence` EDUs (spec server-server "Presence"). Outbound, each
//! local change goes to the servers that share a room with the user, through the durable
//! per-destination queues; inbound, a server speaks only for its own users, and only about
//! users who share a room with a user of this server.

use std::collections::BTreeMap;

use lattice_core::limits::MAX_PRESENCE_PUSHES;
use lattice_storage::WriteBatch;
use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};
use serde_json::{Value, json};

use super::Federation;
use crate::ServiceError;
use crate::presence::{PresenceState, PresenceUpdate, UserPresence, check_status_msg};

/// One entry of an EDU's `push` list.
fn push_entry(update: &PresenceUpdate, now: u64) -> Value {
    let presence = &update.presence;
    let mut entry = json!({
        "user_id": update.user,
        "presence": presence.state.as_str(),
        // Required by the spec; a user never seen active reads as active at the epoch.
        "last_active_ago": now.saturating_sub(presence.last_active_ts),
        "currently_active": presence.currently_active(),
    });
    if let Some(message) = &presence.status_msg {
        entry["status_msg"] = json!(message);
    }
    entry
}

impl Federation {
    /// Queues the local users' changes for every server sharing a room with them: one EDU per
    /// destination with up to [`MAX_PRESENCE_PUSHES`] updates, all in one batch.
    pub(crate) async fn send_presence(&self, updates: &[PresenceUpdate]) -> Result<(), ServiceError> {
        let Ok(remote) = self.remote() else { return Ok(()) };
        let now = self.presence.now_ms();
        let mut by_destination: BTreeMap<OwnedServerName, Vec<Value>> = BTreeMap::new();
        for update in updates.iter().filter(|update| update.user.server_name() == self.server_name()) {
            let entry = push_entry(update, now);
            for server in self.servers_sharing_a_room_with(&update.user).await? {
                by_destination.entry(server).or_default().push(entry.clone());
            }
        }
        if by_destination.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        for (server, pushes) in &by_destination {
            for chunk in pushes.chunks(MAX_PRESENCE_PUSHES) {
                let edu = json!({ "edu_type": "m.presence", "content": { "push": chunk } });
                remote.sender.queue_edu(&mut batch, std::slice::from_ref(server), &edu.to_string()).await?;
            }
        }
        remote.sender.commit(batch).await?;
        remote.sender.wake(&by_destination.into_keys().collect::<Vec<_>>());
        Ok(())
    }

    /// An `m.presence` EDU: each update of one of the origin's users who shares a room with a
    /// user of this server is taken; others are dropped, one by one.
    pub(super) async fn receive_presence(&self, origin: &ServerName, content: &Value) -> Result<(), String> {
        if !self.presence.is_enabled() {
            return Ok(());
        }
        let pushes = content["push"].as_array().ok_or("m.presence without a push list")?;
        for push in pushes.iter().take(MAX_PRESENCE_PUSHES) {
            if let Err(reason) = self.receive_one_presence(origin, push).await {
                tracing::debug!(%origin, %reason, "a presence update was dropped");
            }
        }
        Ok(())
    }

    async fn receive_one_presence(&self, origin: &ServerName, push: &Value) -> Result<(), String> {
        let user = push["user_id"]
            .as_str()
            .and_then(|user| OwnedUserId::try_from(user).ok())
            .ok_or("presence without a valid user_id")?;
        if user.server_name() != origin {
            return Err(format!("{origin} cannot speak for {user}"));
        }
        let state = push["presence"].as_str().and_then(PresenceState::parse).ok_or("presence is not a spec value")?;
        let status_msg = match &push["status_msg"] {
            Value::String(message) => Some(message.clone()),
            Value::Null => None,
            _ => return Err("status_msg is not a string".into()),
        };
        check_status_msg(status_msg.as_deref()).map_err(|e| e.to_string())?;
        if !self.shares_a_room_with_a_local_user(origin, &user).await.map_err(|e| e.to_string())? {
            return Err(format!("{user} shares no room with a user of this server"));
        }
        let now = self.presence.now_ms();
        let last_active_ts = push["last_active_ago"].as_u64().map_or(0, |ago| now.saturating_sub(ago));
        let presence = UserPresence { state, status_msg, last_active_ts, explicit: false };
        self.presence.receive_remote(&user, presence).await.map_err(|e| e.to_string())
    }

    /// Whether `user` is joined to a room this server is in, whose server ACL lets `origin` in.
    async fn shares_a_room_with_a_local_user(&self, origin: &ServerName, user: &UserId) -> Result<bool, ServiceError> {
        for room in self.rooms.joined_rooms(user).await? {
            if self.rooms.server_in_room(self.server_name(), &room).await?
                && self.rooms.server_allowed_by_acl(origin, &room).await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
