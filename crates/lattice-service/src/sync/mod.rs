//! The sync service: `/sync`. It owns no table: it reads the rooms, account-data,
//! to-device and presence services through their typed APIs, and a token is a position in each of their
//! streams, so nothing is skipped or delivered twice (architecture invariant 3). `tokens.rs` —
//! the token format; `room.rs` — one room's part of a sync; this module — the long-poll and the
//! assembly of the whole response.

mod device_lists;
mod room;
mod tokens;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ruma::UserId;
use serde_json::{Map, Value, json};

use crate::ServiceError;
use crate::account_data::AccountData;
use crate::e2ee::E2ee;
use crate::notifier::Notifier;
use crate::presence::{Presence, PresenceState};
use crate::rooms::{Rooms, SyncFilter};
use crate::to_device::ToDevice;

pub use tokens::{StreamSet, SyncToken, parse_token};

/// Longest a `/sync` long-poll waits.
pub const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The sync service: `/sync` over the services whose streams it reads.
pub struct Sync {
    rooms: Arc<Rooms>,
    account_data: Arc<AccountData>,
    to_device: Arc<ToDevice>,
    /// Device lists, one-time key counts and fallback keys.
    e2ee: Arc<E2ee>,
    /// The unread notification counts of each joined room.
    push: Arc<crate::push::Push>,
    /// Marks the user active, and the presence of those sharing a room with them.
    presence: Arc<Presence>,
    /// Where a waiting `/sync` registers; the writers notify it.
    notifier: Arc<Notifier>,
}

pub struct SyncRequest {
    /// The `next_batch` of an earlier sync; `None` for an initial sync.
    pub since: Option<SyncToken>,
    pub timeout: Duration,
    /// The syncing device, whose to-device inbox the sync delivers and acknowledges.
    pub device_id: Option<String>,
    pub filter: SyncFilter,
    pub full_state: bool,
    /// `set_presence`: `online` (the default) marks the user active and online while they
    /// sync, `unavailable` idle, `offline` leaves their presence alone.
    pub set_presence: PresenceState,
}

/// What one sync is about, shared by every room it looks at.
#[derive(Clone, Copy)]
pub(crate) struct SyncScope<'a> {
    user_id: &'a UserId,
    since: StreamSet,
    now: StreamSet,
    initial: bool,
    full_state: bool,
    filter: &'a SyncFilter,
    /// Senders whose events the user asked not to see (`m.ignored_user_list`).
    ignored: &'a HashSet<String>,
}

impl SyncScope<'_> {
    /// This sync as an initial one, for a room new to the user.
    fn as_initial(&self) -> Self {
        Self { since: StreamSet::default(), initial: true, ..*self }
    }
}

/// Whether a sync response holds anything for the client (its token aside).
fn has_news(response: &Value) -> bool {
    let non_empty = |value: &Value| {
        value.as_array().is_some_and(|a| !a.is_empty()) || value.as_object().is_some_and(|o| !o.is_empty())
    };
    let rooms = &response["rooms"];
    ["join", "invite", "leave", "knock"].iter().any(|kind| non_empty(&rooms[*kind]))
        || non_empty(&response["account_data"]["events"])
        || non_empty(&response["to_device"]["events"])
        || non_empty(&response["device_lists"]["changed"])
        || non_empty(&response["device_lists"]["left"])
        || non_empty(&response["presence"]["events"])
}

impl Sync {
    pub(crate) fn new(
        rooms: Arc<Rooms>,
        account_data: Arc<AccountData>,
        to_device: Arc<ToDevice>,
        e2ee: Arc<E2ee>,
        push: Arc<crate::push::Push>,
        presence: Arc<Presence>,
        notifier: Arc<Notifier>,
    ) -> Self {
        Self { rooms, account_data, to_device, e2ee, push, presence, notifier }
    }

    /// Each stream's completed mark: every change up to it is visible (typing, kept in memory,
    /// is stamped before its position is published).
    async fn stream_positions(&self) -> Result<StreamSet, ServiceError> {
        let rooms = self.rooms.stream_marks().await?;
        Ok(StreamSet {
            events: rooms.events,
            receipts: rooms.receipts,
            typing: rooms.typing,
            account_data: self.account_data.position().await?,
            to_device: self.to_device.position().await?,
            device_lists: self.e2ee.device_list_position().await?,
            presence: self.presence.position().await?,
        })
    }

    /// `GET /sync`: rooms the user is in, invited to or has left since `since`, with their new
    /// timeline events, ephemeral events, account data and to-device messages. With nothing
    /// new for the user it waits up to `timeout`, woken only by writes that concern the user;
    /// a wake-up that brings nothing for them goes back to waiting.
    pub async fn sync(&self, user_id: &UserId, request: SyncRequest) -> Result<Value, ServiceError> {
        // Before the first look, so the user's own change (coming online) is in this response.
        let _syncing = self.presence.sync_started(user_id, request.set_presence).await;
        let Some(since) = request.since else {
            let now = self.stream_positions().await?;
            return Box::pin(self.sync_once(user_id, &request, now)).await;
        };
        if since.streams.any_past(&self.stream_positions().await?) {
            return Err(ServiceError::InvalidParam("the since token is from the future".into()));
        }
        if let Some(device) = &request.device_id {
            self.to_device.acknowledge_to_device(user_id, device, since.streams.to_device).await?;
        }
        if request.timeout.is_zero() {
            let now = self.stream_positions().await?;
            return Box::pin(self.sync_once(user_id, &request, now)).await;
        }
        let deadline = tokio::time::Instant::now() + request.timeout.min(MAX_SYNC_TIMEOUT);
        // Listening starts before the first look, so a write after that look still wakes it.
        let listener = self.listen_for_sync(user_id).await?;
        loop {
            let now = self.stream_positions().await?;
            // Each look is boxed (here and above), so what a parked long-poll holds is the wait,
            // not the look's state machine (`tests::a_parked_sync_future_is_small`).
            let response = Box::pin(self.sync_once(user_id, &request, now)).await?;
            if has_news(&response) || tokio::time::timeout_at(deadline, listener.notified()).await.is_err() {
                return Ok(response);
            }
        }
    }

    /// Registers a waiting sync for the user's own news and the rooms they are in, invited to
    /// or knocking on.
    async fn listen_for_sync(&self, user_id: &UserId) -> Result<crate::notifier::Listener, ServiceError> {
        let rooms = self.rooms.memberships_of(user_id).await?;
        let watched = rooms.iter().filter(|(_, membership)| matches!(membership.as_str(), "join" | "invite" | "knock"));
        Ok(self.notifier.listen(user_id, watched.map(|(room, _)| &**room)))
    }

    /// One look at what is new for the user in `(since, now]`, without waiting.
    async fn sync_once(&self, user_id: &UserId, request: &SyncRequest, now: StreamSet) -> Result<Value, ServiceError> {
        let since = request.since.map(|s| s.streams);
        let to_device = self.to_device_for(user_id, request.device_id.as_deref(), now.to_device).await?;
        let ignored = self.account_data.ignored_users(user_id).await?;
        let scope = SyncScope {
            user_id,
            since: since.unwrap_or_default(),
            now,
            initial: since.is_none(),
            full_state: request.full_state,
            filter: &request.filter,
            ignored: &ignored,
        };
        let (global_data, mut room_data) = self.account_data_for(&scope).await?;
        // Rooms with nothing new since the token are passed over without a read, so an
        // incremental sync costs what changed, not how many rooms the user is in.
        let active = match scope.initial || scope.full_state {
            true => None,
            false => self.rooms.rooms_active_in(&scope.since, &scope.now).await?,
        };
        let (mut join, mut invite, mut leave, mut knock) = (Map::new(), Map::new(), Map::new(), Map::new());
        for (room_id, membership) in self.rooms.memberships_of(user_id).await? {
            let quiet = active.as_ref().is_some_and(|active| !active.contains(room_id.as_str()))
                && !room_data.contains_key(room_id.as_str());
            if quiet
                || !scope.filter.includes_room(room_id.as_str())
                || self.rooms.is_forgotten(user_id, &room_id, &membership).await?
            {
                continue;
            }
            let data = room_data.remove(room_id.as_str()).unwrap_or_default();
            match membership.as_str() {
                "join" => {
                    let changed = scope.initial
                        || scope.full_state
                        || self.rooms.room_changed(&room_id, scope.since.events).await?;
                    // A room new to the user comes whole, as in an initial sync.
                    let fresh = !scope.initial
                        && changed
                        && self.newly_joined(scope.user_id, &room_id, scope.since.events).await?;
                    let room_scope = if fresh { scope.as_initial() } else { scope };
                    if let Some(room) = self.joined_room(&room_scope, &room_id, data, changed).await? {
                        join.insert(room_id.to_string(), room);
                    }
                }
                "invite" => {
                    if let Some(room) = self.invited_room_sync(&scope, &room_id).await? {
                        invite.insert(room_id.to_string(), room);
                    }
                }
                "knock" => {
                    if let Some(room) = self.knocked_room_sync(&scope, &room_id).await? {
                        knock.insert(room_id.to_string(), room);
                    }
                }
                "leave" | "ban" if !scope.initial || scope.filter.room.include_leave => {
                    // A room the user just left comes with its whole state at the leave.
                    let leave_scope = SyncScope { full_state: true, ..scope };
                    if let Some(room) = self.left_room(&leave_scope, &room_id).await? {
                        leave.insert(room_id.to_string(), room);
                    }
                }
                _ => {}
            }
        }
        let delivered = StreamSet { to_device: to_device.delivered_up_to.unwrap_or(now.to_device), ..now };
        let next_batch = SyncToken { streams: delivered };
        let device_lists = match scope.initial {
            true => json!({}),
            false => {
                let delta = self.device_list_delta(user_id, &scope.since, &scope.now).await?;
                json!({ "changed": delta.changed, "left": delta.left })
            }
        };
        let to_device_events: Vec<Value> = to_device
            .events
            .into_iter()
            .filter(|e| !ignored.contains(e["sender"].as_str().unwrap_or_default()))
            .collect();
        let presence = self
            .presence
            .events_for(user_id, (scope.since.presence, now.presence), scope.initial, &request.filter.presence)
            .await?;
        let mut response = json!({
            "next_batch": next_batch.render(),
            "presence": { "events": presence },
            "account_data": { "events": global_data },
            "to_device": { "events": to_device_events },
            "device_lists": device_lists,
            "rooms": { "join": join, "invite": invite, "leave": leave, "knock": knock },
        });
        if let Some(device) = &request.device_id {
            response["device_one_time_keys_count"] = json!(self.e2ee.one_time_key_counts(user_id, device).await?);
            response["device_unused_fallback_key_types"] =
                json!(self.e2ee.unused_fallback_key_types(user_id, device).await?);
        }
        Ok(response)
    }

    async fn to_device_for(
        &self,
        user_id: &UserId,
        device_id: Option<&str>,
        now: u64,
    ) -> Result<crate::to_device::ToDeviceBatch, ServiceError> {
        match device_id {
            Some(device) => self.to_device.pending_to_device(user_id, device, now).await,
            None => Ok(crate::to_device::ToDeviceBatch { events: Vec::new(), delivered_up_to: None }),
        }
    }

    /// Global account data, and per-room account data by room, changed in the sync's range.
    async fn account_data_for(
        &self,
        scope: &SyncScope<'_>,
    ) -> Result<(Vec<Value>, HashMap<String, Vec<Value>>), ServiceError> {
        let mut global = Vec::new();
        let mut by_room: HashMap<String, Vec<Value>> = HashMap::new();
        for (room, kind, content) in self
            .account_data
            .account_data_since(scope.user_id, (scope.since.account_data, scope.now.account_data), scope.initial)
            .await?
        {
            let event = json!({ "type": kind, "content": content });
            match room {
                Some(room) if scope.filter.room.account_data.allows_type(&kind) => {
                    by_room.entry(room).or_default().push(event)
                }
                None if scope.filter.account_data.allows_type(&kind) => global.push(event),
                _ => {}
            }
        }
        Ok((global, by_room))
    }
}
