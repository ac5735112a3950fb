//! Presence operations that span services: who may read a user's presence (the rooms know who
//! shares a room with whom, the accounts who exists), and the one task that moves users on with
//! time and tells other servers of local changes.

use std::time::Duration;

use ruma::UserId;

use crate::composed_keys::shared_with;
use crate::presence::{PresenceState, UserPresence};
use crate::{Presence, Service, ServiceError};

/// The longest the presence task sleeps between looks at the timeouts.
const MAX_PRESENCE_TICK: Duration = Duration::from_secs(5);

impl Service {
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// `GET /presence/{userId}/status`: for the user themself and for users who share a room
    /// with them (`403` for anyone else, as the spec's answer for "not allowed to see"); `404`
    /// for a local user who does not exist. With presence off, everyone reads as offline.
    pub async fn get_presence(&self, reader: &UserId, target: &UserId) -> Result<UserPresence, ServiceError> {
        if target.server_name() == self.server_name() {
            // Refuses an unknown or deactivated account.
            self.accounts.profile(target).await?;
        }
        if reader != target && shared_with(&self.rooms, reader, [target.to_owned()].into()).await?.is_empty() {
            return Err(ServiceError::Forbidden("you are not allowed to see their presence".into()));
        }
        self.presence.current(target).await
    }

    /// `PUT /presence/{userId}/status`: only the user's own; other servers hear of it through
    /// the presence task.
    pub async fn set_presence(
        &self,
        caller: &UserId,
        target: &UserId,
        state: PresenceState,
        status_msg: Option<String>,
    ) -> Result<(), ServiceError> {
        if caller != target {
            return Err(ServiceError::Forbidden("you can only set your own presence".into()));
        }
        self.presence.set_by_user(caller, state, status_msg).await
    }

    /// The presence task (one per server, run by the binary): applies the timeouts
    /// periodically, and queues local changes for other servers as soon as they are made.
    pub async fn run_presence(&self) {
        let timeouts = self.presence.config().timeouts;
        let tick = Duration::from_millis(timeouts.idle_ms.min(timeouts.offline_ms) / 2)
            .clamp(Duration::from_millis(100), MAX_PRESENCE_TICK);
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                () = self.presence.outbound_waiting() => {}
            }
            if let Err(error) = self.presence.apply_timeouts().await {
                tracing::warn!(%error, "applying presence timeouts failed");
            }
            let updates = self.presence.take_outbound();
            if !updates.is_empty()
                && let Err(error) = self.federation.send_presence(&updates).await
            {
                tracing::warn!(%error, "queueing presence for other servers failed");
            }
        }
    }
}
