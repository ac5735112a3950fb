//! The push service: each user's push rules (spec v1.16, "Push notifications"), kept as the
//! user's `m.push_rules` global account data through the account-data service, so clients get
//! them and every change to them in `/sync` as the spec says; and what the rules decide for each
//! new event (`notify.rs`): the notifications of each local member, their unread counts, and the
//! read markers their receipts move.

mod audience;
mod migrations;
mod notify;
mod pushers;
mod rules;

use std::sync::Arc;

use lattice_storage::{KvStore, ScopedStore, Table, TableScope};

use crate::{AccountData, Clock};

pub(crate) use migrations::schema_5;
pub use notify::{Notification, NotificationsPage, PushedEvent, Recipient, RoomCounts, UnreadCounts};
pub use pushers::{DELIVERY_INTERVAL, MAX_DELIVERY_ATTEMPTS, MAX_PUSHERS_PER_USER};
pub(crate) use rules::PUSH_RULES_TYPE;
pub use rules::{default_rules_content, is_known_kind};

/// The tables this service owns (the rules themselves are account data).
pub(crate) const TABLES: TableScope = TableScope {
    owner: "push",
    tables: &[
        Table::PushNotifications,
        Table::PushEvents,
        Table::PushUnread,
        Table::PushRoomNotifications,
        Table::PushReadMarkers,
        Table::Pushers,
        Table::PusherKeys,
        Table::PushQueue,
    ],
};

pub struct Push {
    kv: Arc<dyn KvStore>,
    account_data: Arc<AccountData>,
    clock: Arc<dyn Clock>,
    /// Posts to push gateways.
    http: reqwest::Client,
    allow_insecure_gateways: bool,
    /// `counts.unread` counts events, not rooms (`badge_count`).
    badge_counts_messages: bool,
    /// Wakes the delivery task when a push is queued.
    queued: tokio::sync::Notify,
    /// Parsed rulesets of the users events were evaluated for (`rules.rs`).
    rules_cache: rules::RulesCache,
    /// Each user's pushers, read for every event that notifies them (`pushers.rs`).
    pushers_cache: pushers::PushersCache,
    /// Rooms' members sorted into shared and individual evaluation (`audience.rs`).
    audiences: audience::AudienceCache,
}

/// How long one `POST` to a push gateway may take.
const GATEWAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Push {
    pub(crate) fn new(
        kv: Arc<dyn KvStore>,
        account_data: Arc<AccountData>,
        clock: Arc<dyn Clock>,
        allow_insecure_gateways: bool,
        badge_counts_messages: bool,
    ) -> Self {
        let http = reqwest::Client::builder().timeout(GATEWAY_TIMEOUT).build().unwrap_or_default();
        Self {
            kv: ScopedStore::new(kv, TABLES),
            account_data,
            clock,
            http,
            allow_insecure_gateways,
            badge_counts_messages,
            queued: tokio::sync::Notify::new(),
            rules_cache: rules::RulesCache::default(),
            pushers_cache: pushers::PushersCache::default(),
            audiences: audience::AudienceCache::default(),
        }
    }

    /// Waits until a push is queued or `timeout` passes: the delivery task's sleep.
    pub async fn wait_for_queued(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.queued.notified()).await;
    }
}

impl crate::Service {
    /// `GET /notifications`: the push service's page, each entry with its event as the user's
    /// clients see it (redacted if it was redacted since). An event no longer stored is left out.
    pub async fn notifications(
        &self,
        user_id: &ruma::UserId,
        from: Option<&str>,
        limit: Option<usize>,
        only_highlights: bool,
    ) -> Result<(Vec<(Notification, serde_json::Value)>, Option<String>), crate::ServiceError> {
        let joined_rooms = self.rooms.joined_rooms(user_id).await?;
        let page = self.push.notifications(user_id, &joined_rooms, from, limit, only_highlights).await?;
        let mut listed = Vec::with_capacity(page.notifications.len());
        for notification in page.notifications {
            match self.rooms.client_event(&notification.event_id).await {
                Ok(event) => listed.push((notification, event)),
                Err(crate::ServiceError::NotFound(_)) => continue,
                Err(other) => return Err(other),
            }
        }
        Ok((listed, page.next_token))
    }

    /// Sends every queued push that is due, each with the badge of its user's joined rooms;
    /// returns how many were delivered. Called by the server's delivery task.
    pub async fn deliver_due_pushes(&self) -> Result<usize, crate::ServiceError> {
        self.push.deliver_due(self.rooms.as_ref()).await
    }
}
